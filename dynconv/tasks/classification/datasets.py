"""The classification datasets: `data=digits` (embedded), `data=imagefolder`, `data=imagenet`, `data=cifar100`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Mapping

from dynconv.config import ConfigError
from dynconv.data.datasets import DatasetSpec, data_root, register_dataset
from dynconv.tasks.classification.cifar import CIFAR100_LAYOUT, locate_cifar100
from dynconv.tasks.classification.digits import check_digits_root, ensure_digits_imagefolder
from dynconv.tasks.classification.image_folder import validate_imagefolder_root

KIND = "classification"
IMAGEFOLDER_LAYOUT = "DIR/train/<class>/*, DIR/val/<class>/*"
VAL_ONLY_LAYOUT = "DIR/val/<class>/* (an evaluation reads the val split only)"


def _check_root(data_cfg: Mapping[str, Any], hint: str, layout: str, validate: Callable[[Any], Any]) -> None:
    root = data_cfg.get("root")
    if root in (None, ""):
        raise ConfigError(f"data.root is not set: pass data.root=DIR{hint} ({layout})")
    try:
        validate(root)
    except (FileNotFoundError, NotADirectoryError, ValueError) as error:
        raise ConfigError(f"data.root={root!r}: {error}") from None


def _strict(data_cfg: Mapping[str, Any]) -> bool:
    return bool(data_cfg.get("strict", True))


def _has_class_folders(split_dir: Path) -> bool:
    return split_dir.is_dir() and any(entry.is_dir() for entry in os.scandir(split_dir))


def looks_like_imagefolder(folder: Path) -> bool:
    """train/ and val/, each with at least one (class) folder; no image is opened."""
    return all(_has_class_folders(folder / split) for split in ("train", "val"))


def _looks_like_cifar100(folder: Path) -> bool:
    try:
        locate_cifar100(folder)
    except FileNotFoundError:
        return False
    return True


def _image_folder(name: str, hint: str = "", recognise: Callable[[Path], bool] | None = None) -> DatasetSpec:
    """DIR/{train,val}/<class>/*, shared by imagefolder and imagenet."""

    def check(data_cfg: Mapping[str, Any]) -> None:
        _check_root(data_cfg, hint, IMAGEFOLDER_LAYOUT,
                    lambda root: validate_imagefolder_root(root, strict=_strict(data_cfg)))

    def check_eval(data_cfg: Mapping[str, Any]) -> None:
        # eval.py reads only DIR/val/<class>/*: a copy of the validation split alone is enough.
        _check_root(data_cfg, hint, VAL_ONLY_LAYOUT,
                    lambda root: validate_imagefolder_root(root, splits=("val",), strict=_strict(data_cfg)))

    def locate(data_cfg: Mapping[str, Any]) -> Path:
        root = data_root(data_cfg)
        validate_imagefolder_root(root, strict=_strict(data_cfg))
        return root

    return DatasetSpec(name, KIND, check, locate, recognise=recognise, check_eval=check_eval)


def _digits_image_size(data_cfg: Mapping[str, Any]) -> int:
    return int(data_cfg.get("image_size", 32))


register_dataset(DatasetSpec(
    "digits", KIND, embedded=True,
    # data.root must be the digits tree, absent, or an empty folder: anything else is refused, unchanged.
    check=lambda data_cfg: check_digits_root(data_root(data_cfg), _digits_image_size(data_cfg)),
    locate=lambda data_cfg: ensure_digits_imagefolder(data_root(data_cfg), _digits_image_size(data_cfg))))
# imagenet is read by data=imagefolder as well, so only imagefolder is suggested for a folder of that layout.
register_dataset(_image_folder("imagefolder", recognise=looks_like_imagefolder))
register_dataset(_image_folder("imagenet", " or set IMAGENET_DIR"))
register_dataset(DatasetSpec(
    "cifar100", KIND,
    check=lambda data_cfg: _check_root(data_cfg, " or set CIFAR100_DIR", CIFAR100_LAYOUT, locate_cifar100),
    # The folder holding the train/test/meta pickles.
    locate=lambda data_cfg: locate_cifar100(data_root(data_cfg)),
    recognise=_looks_like_cifar100))
