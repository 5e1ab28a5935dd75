"""The classification datasets: `data=digits` (embedded), `data=imagefolder`, `data=imagenet`, `data=cifar100`."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping

from dynconv.config import ConfigError
from dynconv.data.datasets import DatasetSpec, data_root, register_dataset
from dynconv.tasks.classification.cifar import CIFAR100_LAYOUT, locate_cifar100
from dynconv.tasks.classification.digits import ensure_digits_imagefolder
from dynconv.tasks.classification.image_folder import validate_imagefolder_root

KIND = "classification"
IMAGEFOLDER_LAYOUT = "DIR/train/<class>/*, DIR/val/<class>/*"


def _check_root(data_cfg: Mapping[str, Any], hint: str, layout: str, validate: Callable[[Any], Any]) -> None:
    root = data_cfg.get("root")
    if root in (None, ""):
        raise ConfigError(f"data.root is not set: pass data.root=DIR{hint} ({layout})")
    try:
        validate(root)
    except (FileNotFoundError, NotADirectoryError, ValueError) as error:
        raise ConfigError(f"data.root={root!r}: {error}") from None


def _image_folder(name: str, hint: str = "") -> DatasetSpec:
    """DIR/{train,val}/<class>/*, shared by imagefolder and imagenet."""

    def locate(data_cfg: Mapping[str, Any]) -> Path:
        root = data_root(data_cfg)
        validate_imagefolder_root(root)
        return root

    return DatasetSpec(name, KIND, lambda cfg: _check_root(cfg, hint, IMAGEFOLDER_LAYOUT, validate_imagefolder_root),
                       locate)


register_dataset(DatasetSpec(
    "digits", KIND, check=lambda data_cfg: None, embedded=True,
    locate=lambda data_cfg: ensure_digits_imagefolder(data_root(data_cfg), int(data_cfg.get("image_size", 32)))))
register_dataset(_image_folder("imagefolder"))
register_dataset(_image_folder("imagenet", " or set IMAGENET_DIR"))
register_dataset(DatasetSpec(
    "cifar100", KIND,
    check=lambda data_cfg: _check_root(data_cfg, " or set CIFAR100_DIR", CIFAR100_LAYOUT, locate_cifar100),
    # The folder holding the train/test/meta pickles.
    locate=lambda data_cfg: locate_cifar100(data_root(data_cfg))))
