"""The COCO detection data pipeline on a tiny hand-written COCO-format fixture.

The fixture has what real COCO throws at the pipeline: a crowd annotation, a zero-width box, a training
image without annotations, an image listed in the JSON whose file is missing, non-contiguous category ids
and both aspect-ratio groups.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from dynconv.tasks.detection.coco import CocoDetectionDataset, validate_coco_root
from dynconv.tasks.detection.loaders import DetectionData, build_detection_data
from dynconv.tasks.detection.data_transforms import build_detection_transforms
from dynconv.tasks.detection.grouped_sampler import GroupedBatchSampler

CATEGORIES = [{"id": 2, "name": "ant"}, {"id": 5, "name": "bee"}, {"id": 9, "name": "cat"}]


def _square(x, y, w, h):
    return [[x, y, x + w, y, x + w, y + h, x, y + h]]


def _ann(ann_id, image_id, category_id, bbox, **extra):
    ann = {"id": ann_id, "image_id": image_id, "category_id": category_id, "bbox": bbox,
           "area": float(bbox[2] * bbox[3]), "iscrowd": 0, "segmentation": _square(*bbox)}
    ann.update(extra)
    return ann


def _write_coco(root: Path) -> Path:
    rng = np.random.default_rng(0)
    splits = {
        "train2017": (
            # id, width, height, write the file?
            [(1, 32, 20, True), (2, 20, 32, True), (3, 32, 20, True), (4, 32, 20, False)],
            [
                _ann(1, 1, 5, [2, 3, 10, 8]),
                _ann(2, 1, 2, [15, 2, 12, 10], iscrowd=1,
                     segmentation={"size": [20, 32], "counts": [100, 40, 500]}),
                _ann(3, 1, 9, [5, 5, 0, 4]),  # zero width: degenerate
                _ann(4, 2, 9, [4, 4, 8, 12]),
                _ann(5, 2, 2, [1, 20, 6, 6]),
                _ann(6, 4, 5, [1, 1, 5, 5]),  # on the missing image
            ],
        ),
        "val2017": (
            [(11, 32, 20, True), (12, 20, 32, True), (13, 32, 20, True)],
            [_ann(21, 11, 2, [3, 3, 9, 9]), _ann(22, 13, 9, [10, 2, 8, 8])],  # 12 has none
        ),
    }
    (root / "annotations").mkdir(parents=True)
    for split, (images, anns) in splits.items():
        (root / split).mkdir()
        infos = []
        for image_id, w, h, write in images:
            name = f"{image_id:012d}.png"
            infos.append({"id": image_id, "file_name": name, "width": w, "height": h})
            if write:
                Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / split / name)
        payload = {"images": infos, "annotations": anns, "categories": CATEGORIES}
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(payload))
    return root


@pytest.fixture(scope="module")
def coco_root(module_tmp) -> Path:
    return _write_coco(module_tmp("coco") / "coco")


def _data_cfg(root, **overrides):
    cfg = dict(name="coco", root=str(root), train_split="train2017", val_split="val2017", train_sizes=[32, 40],
               test_size=32, max_size=64, image_size=32, hflip=0.0, strict=False, num_workers=0,
               pin_memory=True, persistent_workers=True, mean=[0.5, 0.5, 0.5], std=[0.2, 0.2, 0.2],
               max_train_samples=None, max_val_samples=None)
    cfg.update(overrides)
    return OmegaConf.create(cfg)


def _recipe(**overrides):
    return OmegaConf.create({"batch_size": 1, "eval_batch_size": None, **overrides})


def _build(root, with_masks=True, rank=0, world_size=1, recipe=None, **overrides) -> DetectionData:
    return build_detection_data(_data_cfg(root, **overrides), recipe or _recipe(), rank=rank,
                                world_size=world_size, seed=0, with_masks=with_masks)


def test_counts_and_what_reaches_training(coco_root):
    data = _build(coco_root)
    assert data.stats["crowd_ignored"] == 1
    assert data.stats["degenerate_dropped"] == 1
    assert data.stats["train_images_without_annotations"] == 1  # image 3
    assert data.stats["missing_images"] == 1  # image 4 (non-strict)
    assert data.stats["train_images"] == 2 and data.stats["train_annotations"] == 3
    targets = {}
    for images, batch_targets, skipped in data.train_loader:
        assert skipped == [] and images[0].dtype == torch.float32 and images[0].max() <= 1.0
        targets.update({t["image_id"]: t for t in batch_targets})
    assert sorted(targets) == [1, 2]
    # Image 1 keeps only its plain annotation: the crowd one and the zero-width one are gone.
    assert targets[1]["boxes"].tolist() == [[2.0, 3.0, 12.0, 11.0]]
    assert targets[1]["labels"].tolist() == [2]
    assert targets[1]["masks"].shape == (1, 20, 32) and targets[1]["masks"].dtype == torch.uint8
    assert targets[2]["labels"].dtype == torch.int64


def test_labels_are_contiguous_and_map_back(coco_root):
    data = _build(coco_root)
    assert data.num_classes == 3
    assert data.category_ids == [2, 5, 9] and [data.val_coco.cats[c]["name"] for c in data.category_ids] == ["ant", "bee", "cat"]
    seen = {}
    for _, targets, _ in data.train_loader:
        for t in targets:
            seen[t["image_id"]] = [data.category_ids[label - 1] for label in t["labels"].tolist()]
    assert seen == {1: [5], 2: [9, 2]}


def test_val_keeps_images_without_annotations(coco_root):
    data = _build(coco_root)
    ids = [t["image_id"] for _, targets, _ in data.val_loader for t in targets]
    assert ids == [11, 12, 13] and data.val_image_ids == [11, 12, 13]
    assert data.val_loader.batch_size == 2  # eval_batch_size unset
    assert sorted(data.val_coco.getImgIds()) == [11, 12, 13]


def test_max_val_samples_restricts_the_ground_truth(coco_root):
    data = _build(coco_root, max_val_samples=2, max_train_samples=1)
    assert len(data.val_image_ids) == 2 and data.stats["val_images"] == 2
    assert sorted(data.val_coco.getImgIds()) == data.val_image_ids
    assert {a["image_id"] for a in data.val_coco.dataset["annotations"]} <= set(data.val_image_ids)
    assert len(data.train_loader) == 1


def test_missing_file_strict_names_path(coco_root):
    with pytest.raises(FileNotFoundError, match=r"train2017/000000000004\.png"):
        _build(coco_root, strict=True)


def test_corrupt_file_skipped_and_reported(tmp_path):
    root = _write_coco(tmp_path / "coco")
    bad = root / "train2017" / "000000000002.png"
    bad.write_bytes(b"\x89PNG not really")
    data = _build(root)
    skipped, good = [], 0
    for images, _, paths in data.train_loader:
        skipped += paths
        good += 0 if images is None else len(images)
    assert skipped == [str(bad)] and good == 1


def test_flip_moves_masks_and_boxes_with_the_image(coco_root):
    def dataset(hflip):
        return CocoDetectionDataset(coco_root / "train2017", coco_root / "annotations/instances_train2017.json",
                                    train=True, with_masks=True, strict=False,
                                    transforms=build_detection_transforms({"hflip": hflip}, train=True))

    plain, flipped = dataset(0.0)[1], dataset(1.0)[1]  # image 2: 20 wide, two annotations
    width = plain[0].shape[-1]
    assert torch.equal(flipped[0], plain[0].flip(-1))
    assert torch.equal(flipped[1]["masks"], plain[1]["masks"].flip(-1))
    x1, y1, x2, y2 = plain[1]["boxes"].unbind(-1)
    assert torch.equal(flipped[1]["boxes"], torch.stack([width - x2, y1, width - x1, y2], -1))
    assert torch.equal(flipped[1]["labels"], plain[1]["labels"])
    for mask, box in zip(flipped[1]["masks"], flipped[1]["boxes"]):
        ys, xs = torch.nonzero(mask, as_tuple=True)
        assert [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1] == box.tolist()


def test_validate_coco_root_names_missing_path(coco_root, tmp_path):
    assert validate_coco_root(coco_root) == coco_root
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nope")):
        validate_coco_root(tmp_path / "nope")
    (tmp_path / "annotations").mkdir()
    with pytest.raises(FileNotFoundError, match="instances_train2017.json"):
        validate_coco_root(tmp_path)
    with pytest.raises(ValueError, match="data.root"):
        validate_coco_root(None)
    with pytest.raises(ValueError, match="coco, toy_coco"):
        build_detection_data(_data_cfg(coco_root, name="cocoa"), _recipe(), with_masks=False)


def test_loader_batches_are_lists_of_one_group(coco_root):
    data = _build(coco_root, with_masks=False, recipe=_recipe(batch_size=2))
    assert data.train_loader.batch_size is None and data.train_sampler.batch_size == 2
    for images, targets, _ in data.train_loader:
        assert isinstance(images, list) and isinstance(targets, list) and len(images) == 2
        assert len({img.shape[-1] >= img.shape[-2] for img in images}) == 1
        assert all("masks" not in t for t in targets)


GROUPS = [0, 1, 0, 0, 1, 1, 0, 1, 0, 0, 1, 0, 0, 1, 0, 0, 0]  # 11 of group 0, 6 of group 1


def test_grouped_sampler_groups_and_determinism():
    sampler = GroupedBatchSampler(GROUPS, 3, seed=5)
    assert len(sampler) == 4 + 2  # ceil(11 / 3) + ceil(6 / 3), every epoch
    first = [[i for i, _ in batch] for batch in sampler]
    assert all(len(batch) == 3 and len({GROUPS[i] for i in batch}) == 1 for batch in first)
    assert set(i for batch in first for i in batch) == set(range(len(GROUPS)))
    assert first == [[i for i, _ in batch] for batch in GroupedBatchSampler(GROUPS, 3, seed=5)]
    sampler.set_epoch(1)
    assert len(sampler) == 6 and [[i for i, _ in batch] for batch in sampler] != first
    seeds = [s for batch in GroupedBatchSampler(GROUPS, 3, seed=5) for _, s in batch]
    assert len(set(seeds)) > len(GROUPS) // 2  # per-sample seeds, not one per batch


def test_grouped_sampler_ranks_disjoint_and_equal():
    groups = GROUPS + [0]  # 12 + 6: whole batches only, so no image is repeated to fill one
    per_rank = [GroupedBatchSampler(groups, 3, seed=1, rank=r, world_size=2) for r in range(2)]
    batches = [s.epoch_batches() for s in per_rank]
    assert len(batches[0]) == len(batches[1]) == len(per_rank[0]) == 3
    flat = [set(i for b in rank_batches for i in b) for rank_batches in batches]
    assert not flat[0] & flat[1]  # 6 batches deal evenly: no padding, so no overlap
    assert flat[0] | flat[1] == set(range(len(groups)))
    # An odd number of batches (3 + 2): the last rank is padded by wrapping, lengths stay equal.
    odd = [GroupedBatchSampler([0] * 9 + [1] * 6, 3, seed=1, rank=r, world_size=2) for r in range(2)]
    assert len(odd[0]) == len(odd[1]) == len(odd[0].epoch_batches()) == len(odd[1].epoch_batches()) == 3


def test_grouped_sampler_set_start_resumes_mid_epoch():
    sampler = GroupedBatchSampler(GROUPS, 3, seed=2)
    sampler.set_epoch(3)
    full = list(sampler)
    sampler.set_start(2 * 3 + 1)  # samples seen so far -> skip two whole batches
    assert len(sampler) == 4
    assert list(sampler) == full[2:]
    assert len(sampler) == 6  # the skip applies to one iteration only
    with pytest.raises(ValueError, match="cannot skip"):
        sampler.set_start(100)


def test_flips_are_reproducible_per_sample(coco_root):
    def batches():
        data = _build(coco_root, hflip=0.5, recipe=_recipe(batch_size=1))
        data.train_sampler.set_epoch(4)
        return [(t[0]["image_id"], t[0]["boxes"].tolist()) for _, t, _ in data.train_loader]

    torch.manual_seed(123)
    first = batches()
    torch.manual_seed(456)  # the global RNG does not matter: every sample has its own seed
    assert batches() == first
