"""data=cifar100: the python-pickle release read in place, on small files written in the release's format
(b"data" uint8 N x 3072 planes R, G, B; b"fine_labels"; meta b"fine_label_names"), its loaders, its transforms,
config validation and the experiment config (WE Sec. 4.3)."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from dynconv.config import ConfigError, validate_data_config
from dynconv.tasks.classification.loaders import build_classification_data
from dynconv.tasks.classification.cifar import Cifar100, cifar_transforms, locate_cifar100

NAMES = [f"class{i:02d}" for i in range(100)]
COUNTS = {"train": 12, "test": 6}


def _write_release(folder: Path, counts=COUNTS, seed: int = 0) -> Path:
    """A miniature cifar-100-python/ (pickles as the release has them: protocol 2, bytes keys)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for split, count in counts.items():
        content = {
            b"filenames": [f"img{i}.png".encode() for i in range(count)],
            b"fine_labels": [int(i % 5) for i in range(count)],
            b"coarse_labels": [0] * count,
            b"data": rng.integers(0, 256, (count, 3072), dtype=np.uint8),
        }
        (folder / split).write_bytes(pickle.dumps(content, protocol=2))
    meta = {b"fine_label_names": [name.encode() for name in NAMES], b"coarse_label_names": [b"all"]}
    (folder / "meta").write_bytes(pickle.dumps(meta, protocol=2))
    return folder


@pytest.fixture()
def release(tmp_path) -> Path:
    """`data.root`: a directory holding cifar-100-python/."""
    _write_release(tmp_path / "cifar-100-python")
    return tmp_path


def _data_cfg(root, **overrides):
    cfg = OmegaConf.load(Path(__file__).resolve().parents[1] / "configs" / "data" / "cifar100.yaml")
    cfg.root = str(root)
    cfg.num_workers = 0
    for key, value in overrides.items():
        cfg[key] = value
    return cfg


def _recipe_cfg(batch_size=4):
    return OmegaConf.create({"batch_size": batch_size, "eval_batch_size": None, "drop_last": True,
                             "aug": {"hflip": 0.5}})


def test_pixels_and_labels_are_read_in_the_release_layout(release):
    """Row i of b"data" is 1,024 red values, then green, then blue, each a row-major 32 x 32 plane."""
    folder = locate_cifar100(release)
    raw = pickle.loads((folder / "train").read_bytes(), encoding="bytes")
    dataset = Cifar100(folder, "train")
    image, label = dataset[3]
    pixels = np.asarray(image)
    assert image.mode == "RGB" and pixels.shape == (32, 32, 3) and label == 3
    row = raw[b"data"][3]
    assert pixels[0, 1, 0] == row[1] and pixels[2, 5, 1] == row[1024 + 2 * 32 + 5]
    assert pixels[31, 31, 2] == row[3071]
    assert dataset.classes == NAMES and len(dataset) == COUNTS["train"] and len(Cifar100(folder, "test")) == 6


def test_root_may_be_the_folder_with_the_files(release):
    assert locate_cifar100(release / "cifar-100-python") == locate_cifar100(release) == release / "cifar-100-python"


def test_loaders_yield_normalised_batches(release):
    data = build_classification_data(_data_cfg(release), _recipe_cfg())
    assert data.num_classes == 100 and data.train_loader.dataset.dataset.classes == NAMES
    images, targets, skipped = next(iter(data.train_loader))
    assert images.shape == (4, 3, 32, 32) and images.dtype == torch.float32 and skipped == []
    assert targets.dtype == torch.int64 and int(targets.max()) < 5
    assert len(data.train_loader) == 3 and sum(len(batch[1]) for batch in data.val_loader) == COUNTS["test"]


def test_the_evaluation_transform_is_normalisation_only(release):
    cfg = _data_cfg(release)
    image, _ = Cifar100(locate_cifar100(release), "test")[0]
    tensor = cifar_transforms(cfg, {}, is_training=False)(image)
    raw = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 255
    expected = (raw - torch.tensor(list(cfg.mean))[:, None, None]) / torch.tensor(list(cfg.std))[:, None, None]
    torch.testing.assert_close(tensor, expected)


def test_training_crop_shifts_the_image_within_the_padding(release):
    """Pad 4 + random 32 crop: the output is the image moved by at most 4 pixels, zeros entering at the border."""
    image, _ = Cifar100(locate_cifar100(release), "train")[0]
    transform = cifar_transforms(_data_cfg(release, mean=[0, 0, 0], std=[1, 1, 1]), {"hflip": 0.0}, True)
    torch.manual_seed(3)
    out = transform(image)
    raw = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 255
    padded = torch.nn.functional.pad(raw, (4, 4, 4, 4))
    assert any(torch.equal(out, padded[:, dy:dy + 32, dx:dx + 32]) for dy in range(9) for dx in range(9))


def test_a_wrong_class_count_or_a_bad_file_is_named(release, tmp_path):
    with pytest.raises(ValueError, match=r"data.num_classes=10 but .*meta names 100 classes"):
        build_classification_data(_data_cfg(release, num_classes=10), _recipe_cfg())
    folder = release / "cifar-100-python"
    (folder / "test").write_bytes(pickle.dumps({b"data": np.zeros((2, 100), np.uint8), b"fine_labels": [0, 1]}))
    with pytest.raises(ValueError, match=r"test: b'data' is uint8 \(2, 100\), expected uint8 N x 3072"):
        Cifar100(folder, "test")
    (folder / "test").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="is not a CIFAR pickle"):
        Cifar100(folder, "test")


@pytest.mark.parametrize(("setup", "expected"), [
    ("missing-dir", ["data.root=", "dataset root not found", "cifar-100-python/{train,test,meta}"]),
    ("missing-file", ["data.root=", "CIFAR-100 files missing", "cifar-100-python/meta", "b'fine_labels'"]),
    ("unset", ["data.root is not set", "CIFAR100_DIR", "cifar-100-python/{train,test,meta}"]),
])
def test_validation_names_data_root_and_the_expected_files(compose_cfg, release, setup, expected):
    root = {"missing-dir": str(release / "nope"), "missing-file": str(release), "unset": "null"}[setup]
    if setup == "missing-file":
        (release / "cifar-100-python" / "meta").unlink()
    cfg = compose_cfg(["data=cifar100", f"data.root={root}"])
    with pytest.raises(ConfigError) as info:
        validate_data_config(cfg)
    assert all(part in str(info.value) for part in expected), str(info.value)


def test_validation_accepts_the_release(compose_cfg, release):
    validate_data_config(compose_cfg(["data=cifar100", f"data.root={release}"]))


def test_experiment_sets_the_papers_cifar_recipe(compose_cfg):
    """Sec. 4.3: batch 256, SGD momentum 0.9, decay 5e-4, lr 0.1 / 10 at epochs 81 and 122, 164 epochs."""
    cfg = compose_cfg(["experiment=resnext29_16x64d_lwe_cifar100"])
    assert (cfg.op.name, cfg.data.name, cfg.data.num_classes, cfg.data.image_size) == ("lwe", "cifar100", 100, 32)
    recipe = cfg.recipe
    assert (recipe.epochs, recipe.batch_size, recipe.opt, recipe.lr, recipe.momentum) == (164, 256, "sgd", 0.1, 0.9)
    assert recipe.weight_decay == 5e-4 and recipe.sched == "multistep" and list(recipe.decay_milestones) == [81, 122]
    assert recipe.decay_rate == 0.1 and recipe.warmup_epochs == 0
