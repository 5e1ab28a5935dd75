"""Hostile data on disk: every case is a clear error naming the path (a ConfigError, so train.py exits 2 with one
`error:` line), and `data.strict` decides between stopping and skipping (warn, count) where skipping makes sense.

Everything here uses real files: PNG files written by PIL, broken files, JSON read by pycocotools, pickles.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import subprocess
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

from conftest import REPO, describe, train_command
from dynconv.config import ConfigError, validate_data_config
from dynconv.data import DATASETS, DataError, ForeignFolderError, MissingFilesError, UnreadableImageError
from dynconv.tasks.classification.cifar import Cifar100
from dynconv.tasks.classification.digits import ensure_digits_imagefolder
from dynconv.tasks.classification.loaders import build_classification_data
from dynconv.tasks.detection.loaders import build_detection_data
from dynconv.tasks.detection.toy_coco import ensure_toy_coco

SIDE = 16


def _png(path: Path, seed: int, size: tuple[int, int] = (SIDE, SIDE)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def _tree(root: Path) -> dict[str, bytes]:
    """Every file under root with its content: to prove that nothing was written or changed."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------------------ ImageFolder
def _imagefolder(root: Path, classes=("a", "b", "c"), per_class: int = 3) -> Path:
    for split in ("train", "val"):
        for c, name in enumerate(classes):
            for i in range(per_class):
                _png(root / split / name / f"{i}.png", seed=100 * c + i + (0 if split == "train" else 50))
    return root


def _classification_cfg(root: Path, **overrides):
    cfg = dict(name="imagefolder", root=str(root), image_size=SIDE, num_classes=None, strict=False, num_workers=0,
               pin_memory=False, persistent_workers=False, mean=[0.5] * 3, std=[0.5] * 3, crop_pct=1.0,
               interpolation="bilinear", max_train_samples=None, max_val_samples=None)
    cfg.update(overrides)
    return OmegaConf.create(cfg)


def _classification_recipe(batch_size: int = 2):
    return OmegaConf.create({"batch_size": batch_size, "eval_batch_size": 4, "drop_last": False,
                             "aug": {"scale": [0.5, 1.0], "ratio": [0.75, 1.333], "hflip": 0.0, "vflip": 0.0,
                                     "color_jitter": 0.0, "auto_augment": None, "re_prob": 0.0}})


def test_class_folder_without_images_strict_stops_at_validation(tmp_path, compose_cfg):
    root = _imagefolder(tmp_path / "flowers")
    for image in (root / "train" / "b").iterdir():
        image.unlink()
    cfg = compose_cfg(["data=imagefolder", f"data.root={root}", "data.strict=true"])
    with pytest.raises(ConfigError) as info:
        validate_data_config(cfg)
    message = str(info.value)
    assert str(root / "train" / "b") in message and "data.strict=false" in message, message
    assert "delete" not in message.lower() and "remove" not in message.lower()


def test_class_folder_without_images_non_strict_keeps_the_labels(tmp_path, compose_cfg, caplog):
    root = _imagefolder(tmp_path / "flowers")
    for image in (root / "train" / "b").iterdir():
        image.unlink()
    validate_data_config(compose_cfg(["data=imagefolder", f"data.root={root}", "data.strict=false"]))
    with caplog.at_level(logging.WARNING, logger="dynconv"):
        data = build_classification_data(_classification_cfg(root), _classification_recipe())
    assert data.empty_class_folders == [str(root / "train" / "b")]
    assert str(root / "train" / "b") in caplog.text and "without images" in caplog.text
    assert data.num_classes == 3  # b is still a class: c keeps label 2 in both splits
    train_labels = {int(t) for _, targets, _ in data.train_loader for t in targets}
    val_labels = [int(t) for _, targets, _ in data.val_loader for t in targets]
    assert train_labels == {0, 2} and sorted(set(val_labels)) == [0, 1, 2]


def test_a_split_without_any_image_is_an_error_either_way(tmp_path):
    root = _imagefolder(tmp_path / "flowers", classes=("a", "b"))
    for image in (root / "val").rglob("*.png"):
        image.unlink()
    for strict in (True, False):
        with pytest.raises(FileNotFoundError, match="no images in any class folder") as info:
            build_classification_data(_classification_cfg(root, strict=strict), _classification_recipe())
        assert str(root / "val") in str(info.value)


def _break_val(root: Path) -> list[str]:
    """Every val image becomes undecodable: text, a truncated PNG, an empty file."""
    files = sorted((root / "val").rglob("*.png"))
    for i, path in enumerate(files):
        content = path.read_bytes()
        path.write_bytes([b"not an image at all", content[: len(content) // 3], b""][i % 3])
    return [str(p) for p in files]


def test_val_split_all_broken_non_strict_stops_instead_of_scoring_nothing(tmp_path):
    root = _imagefolder(tmp_path / "flowers", classes=("a", "b"))
    broken = _break_val(root)
    data = build_classification_data(_classification_cfg(root, strict=False), _classification_recipe())
    assert sum(len(t) for images, t, _ in data.train_loader if images is not None) == 6  # train is fine
    with pytest.raises(DataError) as info:
        for _ in data.val_loader:
            pass
    message = str(info.value)
    assert f"every image read from the val split {root / 'val'} was undecodable" in message, message
    assert "6 file(s)" in message and broken[0] in message and "replace those files" in message


def test_val_split_all_broken_strict_names_the_first_file_and_reason(tmp_path):
    root = _imagefolder(tmp_path / "flowers", classes=("a", "b"))
    broken = _break_val(root)
    # One worker: the reason travels from the worker process with the skipped path.
    data = build_classification_data(_classification_cfg(root, strict=True, num_workers=1), _classification_recipe())
    with pytest.raises(UnreadableImageError) as info:
        next(iter(data.val_loader))
    message = str(info.value)
    assert message.startswith(f"corrupt or unreadable image file {broken[0]}: not in an image format PIL can "
                              "read"), message
    assert "data.strict=false" in message and "Traceback" not in message


def test_some_broken_val_images_are_skipped_and_named(tmp_path, caplog):
    root = _imagefolder(tmp_path / "flowers", classes=("a", "b"))
    bad = root / "val" / "b" / "1.png"
    bad.write_bytes(b"")
    data = build_classification_data(_classification_cfg(root), _classification_recipe())
    with caplog.at_level(logging.WARNING, logger="dynconv"):
        seen = sum(len(t) for images, t, _ in data.val_loader if images is not None)
    assert seen == 5 and data.val_loader.last_skipped == [str(bad)]
    assert f"skipped 1 undecodable image(s) of the val split {root / 'val'}" in caplog.text and str(bad) in caplog.text


# ------------------------------------------------------------------------------------------------------ COCO
CATEGORIES = [{"id": 1, "name": "ant"}, {"id": 4, "name": "bee"}]


def _coco(root: Path, edit=None) -> Path:
    """train2017: images 1-3, val2017: images 11-12, two boxes each; `edit(split, payload)` changes the JSON."""
    (root / "annotations").mkdir(parents=True)
    for split, ids in (("train2017", (1, 2, 3)), ("val2017", (11, 12))):
        images, annotations = [], []
        for image_id in ids:
            name = f"{image_id:012d}.png"
            _png(root / split / name, seed=image_id, size=(24, 20))
            images.append({"id": image_id, "file_name": name, "width": 24, "height": 20})
            for k, category in enumerate((1, 4)):
                annotations.append({"id": 10 * image_id + k, "image_id": image_id, "category_id": category,
                                    "bbox": [2 + 8 * k, 3, 6, 7], "area": 42.0, "iscrowd": 0})
        payload = {"images": images, "annotations": annotations, "categories": CATEGORIES}
        if edit is not None:
            edit(split, payload)
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(payload))
    return root


def _coco_cfg(root: Path, **overrides):
    cfg = dict(name="coco", root=str(root), train_split="train2017", val_split="val2017", train_sizes=[20],
               test_size=20, max_size=32, image_size=32, hflip=0.0, strict=True, num_workers=0, pin_memory=False,
               persistent_workers=False, mean=[0.5] * 3, std=[0.2] * 3, max_train_samples=None,
               max_val_samples=None)
    cfg.update(overrides)
    return OmegaConf.create(cfg)


def _build_coco(root: Path, **overrides):
    return build_detection_data(_coco_cfg(root, **overrides), OmegaConf.create({"batch_size": 1}),
                                with_masks=False)


def _validate_coco(compose_cfg, root: Path) -> None:
    validate_data_config(compose_cfg(["task=retinanet", "data=coco", f"data.root={root}"]))


def test_coco_baseline_fixture_builds(tmp_path, compose_cfg):
    root = _coco(tmp_path / "coco")
    _validate_coco(compose_cfg, root)
    data = _build_coco(root)
    assert data.stats["train_images"] == 3 and data.stats["val_images"] == 2 and data.category_ids == [1, 4]


@pytest.mark.parametrize(("content", "shown"), [
    (b"<!DOCTYPE html><html><body>403 Forbidden</body></html>", "it starts with '<!DOCTYPE html>"),
    (b"PK\x03\x04\x14\x00\x00\x00\x08\x00", "it starts with 'PK"),
    (b'[{"id": 1}]', "it starts with '[{"),
    (b"", "is empty"),
])
def test_coco_annotation_file_that_is_not_json_stops_validation(tmp_path, compose_cfg, content, shown):
    root = _coco(tmp_path / "coco")
    ann = root / "annotations" / "instances_train2017.json"
    ann.write_bytes(content)
    with pytest.raises(ConfigError) as info:
        _validate_coco(compose_cfg, root)
    message = str(info.value)
    assert str(ann) in message and shown in message and "replace it with the dataset's annotation file" in message


def test_coco_annotation_file_with_broken_json_is_named_when_read(tmp_path, compose_cfg):
    root = _coco(tmp_path / "coco")
    ann = root / "annotations" / "instances_val2017.json"
    ann.write_text(ann.read_text()[:-40])  # a JSON object cut short: passes the first-bytes check
    _validate_coco(compose_cfg, root)
    for strict in (True, False):
        with pytest.raises(DataError) as info:
            _build_coco(root, strict=strict)
        message = str(info.value)
        assert f"cannot read the annotation file {ann}: it is not valid JSON (" in message, message
        assert "line 1, column" in message and "replace it" in message


def _drop_file(split_dir: Path, image_id: int) -> Path:
    path = split_dir / f"{image_id:012d}.png"
    path.unlink()
    return path


def test_coco_missing_images_strict_names_them(tmp_path):
    root = _coco(tmp_path / "coco")
    missing = [_drop_file(root / "train2017", 2), _drop_file(root / "train2017", 3)]
    with pytest.raises(MissingFilesError) as info:
        _build_coco(root, strict=True)
    message = str(info.value)
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, ConfigError)
    assert message.startswith(f"image file not found: {missing[0]}") and "and 1 more problem(s)" in message
    assert "data.strict=false" in message


def test_coco_missing_images_non_strict_are_skipped_counted_and_named(tmp_path, caplog):
    root = _coco(tmp_path / "coco")
    missing = _drop_file(root / "val2017", 12)
    with caplog.at_level(logging.WARNING, logger="dynconv"):
        data = _build_coco(root, strict=False)
    assert data.stats["missing_images"] == 1 and data.val_image_ids == [11]
    assert sorted(data.val_coco.getImgIds()) == [11]  # COCOeval's ground truth follows
    assert "left out 1 missing image file(s)" in caplog.text and str(missing) in caplog.text


def test_coco_with_every_image_missing_is_an_error_either_way(tmp_path):
    root = _coco(tmp_path / "coco")
    for image_id in (1, 2, 3):
        _drop_file(root / "train2017", image_id)
    for strict in (True, False):
        with pytest.raises(DataError) as info:
            _build_coco(root, strict=strict)
        message = str(info.value)
        assert "none of the 3 images listed in" in message and "instances_train2017.json" in message
        assert f"the images are expected in {root / 'train2017'}" in message


def _unknown_category(split, payload):
    if split == "train2017":
        payload["annotations"][1]["category_id"] = 99  # annotation 11 of image 1


def test_coco_unknown_category_strict_names_the_annotation(tmp_path):
    root = _coco(tmp_path / "coco", _unknown_category)
    with pytest.raises(DataError) as info:
        _build_coco(root, strict=True)
    message = str(info.value)
    assert message.startswith("annotation 11 (image 1) of ") and "has category_id 99" in message
    assert "not among its categories [1, 4]" in message and "data.strict=false" in message


def test_coco_unknown_category_non_strict_is_dropped_and_counted(tmp_path, caplog):
    root = _coco(tmp_path / "coco", _unknown_category)
    with caplog.at_level(logging.WARNING, logger="dynconv"):
        data = _build_coco(root, strict=False)
    assert data.stats["unknown_category_dropped"] == 1 and data.stats["train_annotations"] == 5
    assert "left out 1 annotation(s) of a category not in \"categories\"" in caplog.text
    targets = {t["image_id"]: t for _, batch, _ in data.train_loader for t in batch}
    assert targets[1]["labels"].tolist() == [1]  # only the ant of image 1 is left


def test_coco_annotation_without_a_valid_bbox(tmp_path):
    def bad_box(split, payload):
        if split == "val2017":
            payload["annotations"][0]["bbox"] = [1, 2]  # annotation 110 of image 11

    root = _coco(tmp_path / "coco", bad_box)
    with pytest.raises(DataError, match=r"annotation 110 \(image 11\) of .* has bbox \[1, 2\]; give it \[x, y"):
        _build_coco(root, strict=True)
    assert _build_coco(root, strict=False).stats["malformed_boxes_dropped"] == 1


def _zero_area(split, payload):
    if split == "train2017":
        payload["images"][1]["width"] = 0  # image 2
        payload["annotations"][0]["bbox"] = [5, 5, 0, 4]  # image 1: a zero-width box
        payload["annotations"][1]["bbox"] = [5, 5, 3, 0]  # image 1: a zero-height box


def test_coco_zero_area_image_entry_strict_names_it(tmp_path):
    root = _coco(tmp_path / "coco", _zero_area)
    with pytest.raises(DataError) as info:
        _build_coco(root, strict=True)
    message = str(info.value)
    assert message.startswith("image 2 of ") and "has width 0 and height 20 (a zero-area image" in message
    assert "data.strict=false" in message


def test_coco_zero_area_images_and_boxes_non_strict(tmp_path, caplog):
    root = _coco(tmp_path / "coco", _zero_area)
    empty = root / "val2017" / f"{12:012d}.png"
    empty.write_bytes(b"")  # a 0-byte image file: found by listing, without decoding
    with caplog.at_level(logging.WARNING, logger="dynconv"):
        data = _build_coco(root, strict=False)
    assert data.stats["zero_size_images"] == 1 and data.stats["empty_image_files"] == 1
    # Image 1's two boxes have zero area: dropped and counted, which leaves image 1 nothing to train on.
    assert data.stats["degenerate_dropped"] == 2 and data.stats["train_images_without_annotations"] == 1
    assert data.stats["train_images"] == 1 and data.val_image_ids == [11]
    assert "zero-area image entry(ies)" in caplog.text and f"image file {empty} is empty (0 bytes" in caplog.text


def test_coco_empty_image_file_strict_names_it(tmp_path):
    root = _coco(tmp_path / "coco")
    empty = root / "val2017" / f"{11:012d}.png"
    empty.write_bytes(b"")
    with pytest.raises(DataError, match=f"image file {empty} is empty \\(0 bytes"):
        _build_coco(root, strict=True)


def test_coco_zero_area_boxes_alone_do_not_stop_a_strict_run(tmp_path):
    def zero_boxes(split, payload):
        if split == "train2017":
            payload["annotations"][2]["bbox"] = [1, 1, 0, 0]

    data = _build_coco(_coco(tmp_path / "coco", zero_boxes), strict=True)
    assert data.stats["degenerate_dropped"] == 1 and data.stats["train_annotations"] == 5


# --------------------------------------------------------------------------- embedded datasets on a user's folder
def _assert_refusal(message: str, root: Path) -> None:
    assert str(root) in message and "nothing was changed" in message
    assert "new or empty folder" in message
    assert "delete" not in message.lower() and "remove" not in message.lower()


def test_digits_on_a_users_imagefolder_names_data_imagefolder_and_writes_nothing(tmp_path):
    root = _imagefolder(tmp_path / "flowers", classes=("rose", "tulip"), per_class=1)
    before = _tree(tmp_path)
    with pytest.raises(ForeignFolderError) as info:
        ensure_digits_imagefolder(root)
    message = str(info.value)
    _assert_refusal(message, root)
    assert f"pass data=imagefolder data.root={root}." in message
    assert _tree(tmp_path) == before and sorted(p.name for p in tmp_path.iterdir()) == ["flowers"]
    with pytest.raises(ForeignFolderError):  # the same answer from the config check
        DATASETS.get("digits").check({"root": str(root), "image_size": 32})


def test_digits_on_a_coco_folder_names_data_coco_and_its_tasks(tmp_path):
    root = _coco(tmp_path / "coco")
    with pytest.raises(ForeignFolderError) as info:
        ensure_digits_imagefolder(root)
    assert f"data=coco data.root={root} with task=" in str(info.value)
    assert "task=retinanet" in str(info.value) and "task=maskrcnn" in str(info.value)


def test_toy_coco_on_a_users_coco_names_data_coco(tmp_path):
    root = _coco(tmp_path / "coco")
    before = _tree(tmp_path)
    with pytest.raises(ForeignFolderError) as info:
        ensure_toy_coco(root)
    message = str(info.value)
    _assert_refusal(message, root)
    assert f"pass data=coco data.root={root}." in message and "with task=" not in message
    assert _tree(tmp_path) == before


def test_unrecognised_folder_or_file_gets_the_empty_folder_advice(tmp_path):
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("mine")
    a_file = tmp_path / "file.bin"
    a_file.write_bytes(b"x")
    for root in (notes, a_file):
        with pytest.raises(ForeignFolderError) as info:
            ensure_digits_imagefolder(root)
        _assert_refusal(str(info.value), root)
        assert "It looks like" not in str(info.value)
    assert (notes / "todo.txt").read_text() == "mine" and a_file.read_bytes() == b"x"


def test_digits_written_with_other_settings_suggests_another_root(tmp_path):
    root = ensure_digits_imagefolder(tmp_path / "digits", image_size=8)
    with pytest.raises(DataError) as info:
        ensure_digits_imagefolder(root, image_size=16)
    message = str(info.value)
    assert "different settings" in message and f"{root}-16px" in message and "delete" not in message.lower()


def test_train_py_on_a_users_imagefolder_exits_2_with_the_right_data_option(tmp_path, train_env):
    """`python train.py data.root=<my ImageFolder>` with the default data=digits: one error line, exit 2."""
    root = _imagefolder(tmp_path / "flowers", classes=("rose", "tulip"), per_class=1)
    before = _tree(root)
    completed = subprocess.run(
        train_command([f"data.root={root}", "data.num_workers=0", "log.progress_bar=false"], tmp_path),
        cwd=REPO, env=train_env({"OMP_NUM_THREADS": "1"}), capture_output=True, text=True, timeout=300)
    assert completed.returncode == 2, describe(completed)
    error_lines = [line for line in completed.stderr.splitlines() if line.startswith("error: ")]
    assert len(error_lines) == 1 and f"data=imagefolder data.root={root}" in error_lines[0], describe(completed)
    assert "Traceback" not in completed.stderr and _tree(root) == before
    assert not (tmp_path / "run").exists()  # refused at validation: no run folder either


# ----------------------------------------------------------------------------------------- CIFAR pickles
class _RunsACommand:
    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def test_a_crafted_cifar_pickle_is_refused_and_runs_nothing(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    witness = tmp_path / "pwned"
    crafted = {b"data": np.zeros((1, 3072), np.uint8), b"fine_labels": [0],
               b"filenames": [_RunsACommand(f"touch {witness}")]}
    (folder / "train").write_bytes(pickle.dumps(crafted, protocol=2))
    (folder / "test").write_bytes(pickle.dumps({b"data": np.zeros((1, 3072), np.uint8), b"fine_labels": [0]}))
    (folder / "meta").write_bytes(pickle.dumps({b"fine_label_names": [b"x"]}, protocol=2))
    with pytest.raises(DataError) as info:
        Cifar100(folder, "train")
    message = str(info.value)
    assert message.startswith(f"{folder / 'train'} asks to load posix.system") or "asks to load nt.system" in message
    assert "refusing to unpickle it" in message
    assert not witness.exists()
    assert len(Cifar100(folder, "test")) == 1  # the honest files next to it still load
