"""The embedded toy_coco dataset: written once, deterministic, valid COCO that pycocotools reads."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf
from pycocotools.coco import COCO

from dynconv.tasks.detection.coco import ann_to_mask
from dynconv.tasks.detection.loaders import build_detection_data
from dynconv.tasks.detection.toy_coco import TOY_TRAIN_IMAGES, TOY_VAL_IMAGES, ensure_toy_coco, toy_coco_counts


@pytest.fixture(scope="module")
def toy_root(module_tmp) -> Path:
    return ensure_toy_coco(module_tmp("toy") / "toy_coco")


def _coco(root: Path, split: str) -> COCO:
    return COCO(str(root / "annotations" / f"instances_{split}.json"))


def test_counts_and_categories(toy_root):
    counts = toy_coco_counts(toy_root)
    for split, images in (("train2017", TOY_TRAIN_IMAGES), ("val2017", TOY_VAL_IMAGES)):
        coco = _coco(toy_root, split)
        assert len(coco.getImgIds()) == images == counts[f"{split}_images"]
        assert len(coco.getAnnIds()) == counts[f"{split}_annotations"]
        assert images <= len(coco.getAnnIds()) <= 4 * images  # 1-4 shapes per image
        assert [(c["id"], c["name"]) for c in coco.loadCats(coco.getCatIds())] == [
            (1, "circle"), (3, "square"), (7, "triangle")]
        assert all((toy_root / split / img["file_name"]).is_file() for img in coco.dataset["images"])
    assert (TOY_TRAIN_IMAGES, TOY_VAL_IMAGES) == (320, 80)


def test_annotations_match_their_masks(toy_root):
    coco = _coco(toy_root, "val2017")
    train = _coco(toy_root, "train2017")
    assert {img["width"] >= img["height"] for img in train.dataset["images"]} == {True, False}
    for ann in coco.dataset["annotations"]:
        img = coco.imgs[ann["image_id"]]
        x, y, w, h = ann["bbox"]
        assert ann["iscrowd"] == 0 and 20 <= w <= 60 and 20 <= h <= 60
        assert 0 <= x and x + w <= img["width"] and 0 <= y and y + h <= img["height"]
        mask = ann_to_mask(coco, ann)
        ys, xs = np.nonzero(mask)
        assert mask.sum() == ann["area"]
        assert abs(xs.min() - x) <= 1 and abs(xs.max() + 1 - (x + w)) <= 1
        assert abs(ys.min() - y) <= 1 and abs(ys.max() + 1 - (y + h)) <= 1


def test_second_call_reuses(toy_root):
    probe = toy_root / "annotations" / "instances_train2017.json"
    before = (probe.stat().st_mtime_ns, (toy_root / ".complete").stat().st_mtime_ns)
    assert ensure_toy_coco(toy_root) == toy_root
    assert (probe.stat().st_mtime_ns, (toy_root / ".complete").stat().st_mtime_ns) == before


def test_deterministic(toy_root, tmp_path):
    other = ensure_toy_coco(tmp_path / "again")
    for split in ("train2017", "val2017"):
        name = f"annotations/instances_{split}.json"
        assert json.loads((other / name).read_text()) == json.loads((toy_root / name).read_text())
    assert (other / "val2017" / "000000000321.png").read_bytes() == (
        toy_root / "val2017" / "000000000321.png").read_bytes()
    # Nothing left behind but the published tree.
    assert [p.name for p in tmp_path.iterdir()] == ["again"]


def test_foreign_directory_is_not_overwritten(tmp_path):
    root = tmp_path / "taken"
    root.mkdir()
    (root / "notes.txt").write_text("user data")
    with pytest.raises(FileExistsError, match=str(root)):
        ensure_toy_coco(root)
    assert (root / "notes.txt").read_text() == "user data"
    assert [p.name for p in tmp_path.iterdir()] == ["taken"]


def test_builds_through_the_detection_loaders(toy_root):
    loaded = OmegaConf.load(Path(__file__).resolve().parents[1] / "configs" / "data" / "toy_coco.yaml")
    cfg = loaded.data if "data" in loaded else loaded  # a global-package file nests its keys under data:
    cfg.root, cfg.num_workers = str(toy_root), 0
    data = build_detection_data(cfg, OmegaConf.create({"batch_size": 4}), with_masks=True)
    assert data.num_classes == 3 and data.category_ids == [1, 3, 7]
    assert data.stats["train_images"] == 320 and data.stats["val_images"] == 80
    assert data.stats["crowd_ignored"] == data.stats["degenerate_dropped"] == data.stats["missing_images"] == 0
    assert len(data.train_loader) == len(data.train_sampler) >= 80
    images, targets, skipped = next(iter(data.train_loader))
    assert len(images) == 4 and skipped == []
    for image, target in zip(images, targets):
        assert target["masks"].shape == (len(target["boxes"]), *image.shape[-2:])
        assert set(target["labels"].tolist()) <= {1, 2, 3}
