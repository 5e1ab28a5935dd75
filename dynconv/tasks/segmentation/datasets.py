"""The segmentation datasets: `data=voc` (PASCAL VOC 2012, optionally with SBD's augmented training set),
`data=cityscapes` (the official leftImg8bit / gtFine layout) and `data=toy_seg` (embedded, in the VOC layout)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping

from dynconv.config import ConfigError
from dynconv.data.datasets import DatasetSpec, data_root, register_dataset
from dynconv.tasks.segmentation.cityscapes import (
    CITYSCAPES_LAYOUT,
    looks_like_cityscapes,
    validate_cityscapes_root,
)
from dynconv.tasks.segmentation.toy_seg import check_toy_seg_root, ensure_toy_seg
from dynconv.tasks.segmentation.voc import VOC_LAYOUT, looks_like_voc, validate_voc_root

KIND = "segmentation"


def _checked_root(data_cfg: Mapping[str, Any], hint: str, layout: str, validate: Callable[[Path], Any]) -> Path:
    """data.root, its layout checked: ConfigError naming data.root and the expected layout otherwise."""
    root = data_cfg.get("root")
    if root in (None, ""):
        raise ConfigError(f"data.root is not set: pass data.root=DIR{hint} ({layout})")
    try:
        validate(Path(str(root)).expanduser())
    except (FileNotFoundError, NotADirectoryError, ValueError) as error:
        raise ConfigError(f"data.root={root!r}: {error}") from None
    return Path(str(root)).expanduser()


def _voc_root(data_cfg: Mapping[str, Any]) -> Path:
    return _checked_root(data_cfg, " or set VOC_DIR", VOC_LAYOUT, lambda root: validate_voc_root(root, data_cfg))


def _cityscapes_root(data_cfg: Mapping[str, Any]) -> Path:
    splits = (str(data_cfg.get("train_split") or "train"), str(data_cfg.get("val_split") or "val"))
    return _checked_root(data_cfg, " or set CITYSCAPES_DIR", CITYSCAPES_LAYOUT,
                         lambda root: validate_cityscapes_root(root, splits))


register_dataset(DatasetSpec("voc", KIND, check=_voc_root, locate=_voc_root, recognise=looks_like_voc))
register_dataset(DatasetSpec("cityscapes", KIND, check=_cityscapes_root, locate=_cityscapes_root,
                             recognise=looks_like_cityscapes))
register_dataset(DatasetSpec(
    "toy_seg", KIND, embedded=True,
    # data.root must be the toy tree, absent, or an empty folder: anything else is refused, unchanged.
    check=lambda data_cfg: check_toy_seg_root(data_root(data_cfg)),
    locate=lambda data_cfg: ensure_toy_seg(data_root(data_cfg))))
