"""The embedded toy_seg dataset: written once, deterministic, in the VOC layout that the VOC reader reads."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dynconv.tasks.segmentation import build_segmentation_data
from dynconv.tasks.segmentation.toy_seg import (
    TOY_SEG_CLASSES,
    TOY_SEG_TRAIN_IMAGES,
    TOY_SEG_VAL_IMAGES,
    ensure_toy_seg,
    toy_seg_sample,
)


@pytest.fixture(scope="module")
def toy_root(module_tmp) -> Path:
    return ensure_toy_seg(module_tmp("toy") / "toy_seg")


def test_voc_layout_counts_and_masks(toy_root):
    lists = toy_root / "ImageSets" / "Segmentation"
    train, val = ((lists / f"{split}.txt").read_text().split() for split in ("train", "val"))
    assert (len(train), len(val)) == (TOY_SEG_TRAIN_IMAGES, TOY_SEG_VAL_IMAGES) == (240, 60)
    assert (lists / "trainval.txt").read_text().split() == train + val
    seen = set()
    for image_id in val:
        mask = Image.open(toy_root / "SegmentationClass" / f"{image_id}.png")
        image = Image.open(toy_root / "JPEGImages" / f"{image_id}.jpg")
        assert mask.mode == "P" and mask.size == image.size and 64 <= min(image.size) <= max(image.size) <= 96
        values = set(np.unique(np.array(mask)).tolist())
        assert 255 in values and 0 in values and values <= {0, 1, 2, 3, 255}  # every shape has its ignored band
        seen |= values
    assert seen == {0, 1, 2, 3, 255}


def test_read_back_by_the_voc_reader(toy_root):
    cfg = {"name": "toy_seg", "root": str(toy_root), "num_workers": 0, "crop_size": 64,
           "scale_range": [0.75, 1.5], "hflip": 0.5, "max_train_samples": 16, "max_val_samples": 8}
    data = build_segmentation_data(cfg, {"batch_size": 8, "eval_batch_size": 4}, rank=0, world_size=1, seed=0)
    assert (data.num_classes, data.class_names, data.ignore_index) == (4, list(TOY_SEG_CLASSES), 255)
    images, masks, skipped = next(iter(data.train_loader))
    assert images.shape == (8, 3, 64, 64) and masks.shape == (8, 64, 64) and skipped == []
    _images, masks, _ = next(iter(data.val_loader))
    assert set(torch.unique(masks).tolist()) <= {0, 1, 2, 3, 255}


def test_deterministic_and_written_once(toy_root):
    pixels, labels = toy_seg_sample(TOY_SEG_TRAIN_IMAGES + 3)
    again_pixels, again_labels = toy_seg_sample(TOY_SEG_TRAIN_IMAGES + 3)
    assert np.array_equal(pixels, again_pixels) and np.array_equal(labels, again_labels)
    stored = np.array(Image.open(toy_root / "SegmentationClass" / f"toy_{TOY_SEG_TRAIN_IMAGES + 3:06d}.png"))
    assert np.array_equal(stored, labels)
    marker = toy_root / ".complete"
    before = marker.stat().st_mtime_ns
    assert ensure_toy_seg(toy_root) == toy_root and marker.stat().st_mtime_ns == before
    assert '"format_version": 1' in marker.read_text()


def test_a_foreign_folder_is_not_overwritten(tmp_path):
    root = tmp_path / "taken"
    root.mkdir()
    (root / "notes.txt").write_text("user data")
    with pytest.raises(FileExistsError, match=str(root)):
        ensure_toy_seg(root)
    assert (root / "notes.txt").read_text() == "user data" and [p.name for p in root.iterdir()] == ["notes.txt"]
