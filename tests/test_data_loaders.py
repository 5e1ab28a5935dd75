"""build_classification_data end to end on the embedded digits dataset and a custom folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from dynconv.data import EpochSampler
from dynconv.tasks.classification.loaders import ClassificationData, build_classification_data


def _data_cfg(**overrides):
    cfg = dict(
        name="digits",
        root=None,
        image_size=32,
        num_classes=None,
        strict=True,
        num_workers=0,
        pin_memory=True,
        persistent_workers=True,
        mean=[0.5, 0.5, 0.5],
        std=[0.5, 0.5, 0.5],
        crop_pct=1.0,
        interpolation="bilinear",
    )
    cfg.update(overrides)
    return OmegaConf.create(cfg)


def _recipe_cfg(**overrides):
    cfg = dict(
        batch_size=64,
        eval_batch_size=None,
        drop_last=True,
        aug=dict(
            scale=[0.5, 1.0],
            ratio=[0.75, 1.333],
            hflip=0.0,
            vflip=0.0,
            color_jitter=0.0,
            auto_augment="rand-m9-mstd0.5-inc1",
            re_prob=0.25,
            re_mode="pixel",
            re_count=1,
        ),
    )
    cfg.update(overrides)
    return OmegaConf.create(cfg)


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("data") / "digits")


def test_digits_end_to_end(digits_dir):
    data = build_classification_data(_data_cfg(root=digits_dir), _recipe_cfg(), seed=0)
    assert isinstance(data, ClassificationData)
    assert isinstance(data.train_sampler, EpochSampler)
    assert data.num_classes == 10
    assert data.train_loader.dataset.dataset.classes == [str(i) for i in range(10)]
    assert len(data.train_loader) == 1437 // 64
    images, targets, skipped = next(iter(data.train_loader))
    assert images.shape == (64, 3, 32, 32) and images.dtype == torch.float32
    assert targets.dtype == torch.int64 and skipped == []
    val_count = sum(len(t) for _, t, _ in data.val_loader)
    assert val_count == 360
    assert data.val_loader.batch_size == 128  # eval_batch_size defaults to 2 * batch_size


def test_val_sharding_counts_each_sample_once(digits_dir):
    seen = []
    for rank in range(2):
        data = build_classification_data(_data_cfg(root=digits_dir), _recipe_cfg(), rank=rank, world_size=2)
        seen += list(data.val_loader.sampler.epoch_indices())
        assert len(data.train_loader) == (1437 + 1) // 2 // 64
    assert sorted(seen) == list(range(360))


def test_num_classes_mismatch_is_an_error(digits_dir):
    with pytest.raises(ValueError, match="num_classes=100"):
        build_classification_data(_data_cfg(root=digits_dir, num_classes=100), _recipe_cfg())
    assert build_classification_data(_data_cfg(root=digits_dir, num_classes=10), _recipe_cfg()).num_classes == 10


def test_unknown_dataset_lists_valid_names(tmp_path):
    with pytest.raises(ValueError, match="digits, imagefolder, imagenet"):
        build_classification_data(_data_cfg(name="cifar", root=str(tmp_path)), _recipe_cfg())


def test_too_small_for_one_batch(digits_dir):
    with pytest.raises(ValueError, match="batch_size=4096"):
        build_classification_data(_data_cfg(root=digits_dir), _recipe_cfg(batch_size=4096))


def _write_folder(root: Path) -> None:
    rng = np.random.default_rng(0)
    for split, count in (("train", 6), ("val", 2)):
        for cls in ("cat", "dog", "eel"):
            (root / split / cls).mkdir(parents=True)
            for i in range(count):
                array = rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)
                Image.fromarray(array).save(root / split / cls / f"{i}.jpg")
    (root / "train" / "dog" / "broken.jpg").write_bytes(b"\xff\xd8 not really")


@pytest.mark.parametrize("name", ["imagefolder", "imagenet"])
def test_custom_folder_non_strict_reports_corrupt(tmp_path, name):
    _write_folder(tmp_path)
    data = build_classification_data(
        _data_cfg(name=name, root=str(tmp_path), image_size=16, strict=False),
        _recipe_cfg(batch_size=4, drop_last=False),
    )
    assert data.train_loader.dataset.dataset.classes == ["cat", "dog", "eel"] and data.num_classes == 3
    skipped, good = [], 0
    for images, targets, bad in data.train_loader:
        skipped += bad
        good += 0 if images is None else len(images)
    assert good == 18
    assert skipped == [str(tmp_path / "train" / "dog" / "broken.jpg")]


def test_missing_split_fails_before_loading(tmp_path):
    _write_folder(tmp_path)
    for path in sorted((tmp_path / "val").rglob("*"), reverse=True):
        path.unlink() if path.is_file() else path.rmdir()
    (tmp_path / "val").rmdir()
    with pytest.raises(FileNotFoundError, match="DIR/train/<class>"):
        build_classification_data(_data_cfg(name="imagefolder", root=str(tmp_path)), _recipe_cfg())
