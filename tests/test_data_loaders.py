"""build_classification_data end to end on the embedded digits dataset and a custom folder, and the loaders'
worker count (`data.num_workers`: auto or an integer)."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from dynconv.config import ConfigError
from dynconv.data import EpochSampler
from dynconv.data.loader_options import MAX_AUTO_WORKERS, resolve_num_workers, worker_options
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
def digits_dir(module_tmp) -> str:
    return str(module_tmp("data") / "digits")


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


# ------------------------------------------------------------------------------- num_workers: auto or an integer


@pytest.mark.parametrize(("cpus", "expected"), [(1, 1), (2, 2), (8, 8), (64, MAX_AUTO_WORKERS)])
def test_auto_workers_follow_the_usable_cpus(monkeypatch, cpus, expected):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(cpus)), raising=False)
    assert resolve_num_workers("auto") == expected
    assert worker_options({"num_workers": "auto", "persistent_workers": True}, None)["num_workers"] == expected


def test_auto_workers_without_an_affinity_mask_use_the_cpu_count(monkeypatch):
    monkeypatch.delattr("os.sched_getaffinity", raising=False)
    monkeypatch.setattr("os.cpu_count", lambda: 3)
    assert resolve_num_workers("auto") == 3


def test_explicit_worker_counts_are_used_as_given(monkeypatch):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert [resolve_num_workers(v) for v in (0, 1, 8, 16)] == [0, 1, 8, 16]
    assert resolve_num_workers(None) == 0  # unset: eval.py resolves its null ("as recorded") before this
    options = worker_options({"num_workers": 0, "persistent_workers": True}, None)
    assert options["num_workers"] == 0 and options["persistent_workers"] is False


@pytest.mark.parametrize("value", ["many", "AUTO", -1, True, 2.5, "4"])
def test_invalid_worker_counts_name_the_key_and_the_allowed_values(value):
    with pytest.raises(ConfigError) as info:
        resolve_num_workers(value)
    assert str(info.value) == f"data.num_workers={value!r} is invalid; allowed values: auto, integers >= 0"


@pytest.mark.parametrize(("overrides", "expected"), [
    (["data=imagefolder"], "auto"), (["data=imagenet"], "auto"), (["task=retinanet", "data=coco"], "auto"),
    ([], 2), (["data=cifar100"], 2), (["task=retinanet", "data=toy_coco"], 2),
])
def test_config_defaults(compose_cfg, overrides, expected):
    assert compose_cfg(overrides).data.num_workers == expected


def test_auto_on_this_machine_creates_no_oversubscription_warning(tmp_path):
    _write_folder(tmp_path)
    data = build_classification_data(
        _data_cfg(name="imagefolder", root=str(tmp_path), image_size=16, strict=False, num_workers="auto",
                  persistent_workers=False),
        _recipe_cfg(batch_size=4, drop_last=False))
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert data.train_loader.num_workers == min(MAX_AUTO_WORKERS, cpus)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        next(iter(data.train_loader))
    assert not [w for w in caught if "worker processes in total" in str(w.message)]
