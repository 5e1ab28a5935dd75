"""Which files each segmentation dataset's splits hold, what its classes are and how its masks' values map to
them: the one place that knows the datasets apart (everything after this reads (image, mask) pairs alike).

toy_seg is written in the VOC layout, so the VOC reader reads it, with its own four classes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from dynconv.tasks.segmentation.cityscapes import (
    CITYSCAPES_CLASSES,
    IMAGE_DIR,
    cityscapes_mapping,
    cityscapes_split_pairs,
)
from dynconv.tasks.segmentation.masks import LabelMapping, identity_mapping
from dynconv.tasks.segmentation.toy_seg import TOY_SEG_CLASSES
from dynconv.tasks.segmentation.voc import VOC_CLASSES, voc_list_file, voc_split_pairs

__all__ = ["CLASS_NAMES", "SplitFiles", "split_files"]

CLASS_NAMES = {"voc": VOC_CLASSES, "cityscapes": CITYSCAPES_CLASSES, "toy_seg": TOY_SEG_CLASSES}


@dataclass
class SplitFiles:
    """The (image, mask) pairs of both splits, what they are called in messages, and the label meaning."""

    train_pairs: list[tuple[Path, Path]]
    val_pairs: list[tuple[Path, Path]]
    train_source: str
    val_source: str
    class_names: tuple[str, ...]
    mapping: LabelMapping


def _split(data_cfg: Mapping[str, Any], which: str) -> str:
    return str(data_cfg.get(f"{which}_split") or which)


def split_files(data_cfg: Mapping[str, Any], root: Path) -> SplitFiles:
    """The files of the dataset `data.name` under `root` (whose layout has been checked)."""
    name = str(data_cfg.get("name")).lower()
    names = CLASS_NAMES[name]
    if name == "cityscapes":
        train, val = _split(data_cfg, "train"), _split(data_cfg, "val")
        return SplitFiles(cityscapes_split_pairs(root, train), cityscapes_split_pairs(root, val),
                          f"the train split {root / IMAGE_DIR / train}", f"the val split {root / IMAGE_DIR / val}",
                          names, cityscapes_mapping())
    return SplitFiles(voc_split_pairs(root, data_cfg, "train"), voc_split_pairs(root, data_cfg, "val"),
                      f"the train list {voc_list_file(root, data_cfg, 'train')}",
                      f"the val list {voc_list_file(root, data_cfg, 'val')}", names, identity_mapping(len(names)))
