"""Cityscapes (Cordts et al., CVPR 2016) fine annotations in the official layout, trained on its 19 classes.

    leftImg8bit/{train,val}/<city>/<city>_<seq>_<frame>_leftImg8bit.png        the images (2048x1024)
    gtFine/{train,val}/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png         8-bit label ids 0..33

The label ids are mapped to the 19 training ids of cityscapesScripts' `labels.py` (its `trainId` column); every
other id (the void classes, "unlabeled", "ego vehicle", ..., and the license plate's -1, stored as 255 in an 8-bit
PNG) is ignored. The training images are 2,975, the validation images 500.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from dynconv.tasks.segmentation.masks import IGNORE_INDEX, LabelMapping

__all__ = ["CITYSCAPES_CLASSES", "CITYSCAPES_LAYOUT", "LABEL_ID_TO_TRAIN_ID", "cityscapes_mapping",
           "cityscapes_split_pairs", "looks_like_cityscapes", "validate_cityscapes_root"]

# label id -> train id, and the class names in train-id order (cityscapesScripts, helpers/labels.py).
LABEL_ID_TO_TRAIN_ID = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12,
                        26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
CITYSCAPES_CLASSES = ("road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
                      "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle",
                      "bicycle")
MAX_LABEL_ID = 33  # "bicycle"; the ids 0..6 are void classes, kept in the masks but ignored
IMAGE_DIR = "leftImg8bit"
MASK_DIR = "gtFine"
IMAGE_SUFFIX = "_leftImg8bit.png"
MASK_SUFFIX = "_gtFine_labelIds.png"
CITYSCAPES_LAYOUT = (f"the Cityscapes layout DIR/{IMAGE_DIR}/<split>/<city>/*{IMAGE_SUFFIX}, "
                     f"DIR/{MASK_DIR}/<split>/<city>/*{MASK_SUFFIX}")


def cityscapes_mapping() -> LabelMapping:
    """labelIds -> train ids: the 19 trained ids to 0..18, every other id to the ignore index."""
    train_ids = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    for label_id, train_id in LABEL_ID_TO_TRAIN_ID.items():
        train_ids[label_id] = train_id
    allowed = np.zeros(256, dtype=bool)
    allowed[:MAX_LABEL_ID + 1] = True
    allowed[255] = True  # the license plate's id -1 in an 8-bit PNG
    return LabelMapping(train_ids, allowed, f"the Cityscapes label ids 0..{MAX_LABEL_ID} and 255 (-1, license plate)")


def _cities(split_dir: Path) -> list[Path]:
    return sorted(Path(entry.path) for entry in os.scandir(split_dir) if entry.is_dir())


def cityscapes_split_pairs(root: Path, split: str) -> list[tuple[Path, Path]]:
    """(image, labelIds mask) of every image of `split`, sorted by city and name; a missing mask is the caller's
    to report (`pairs.keep_existing_pairs`)."""
    root = Path(root)
    pairs = []
    for city in _cities(root / IMAGE_DIR / split):
        for name in sorted(entry.name for entry in os.scandir(city) if entry.name.endswith(IMAGE_SUFFIX)):
            stem = name[: -len(IMAGE_SUFFIX)]
            pairs.append((city / name, root / MASK_DIR / split / city.name / f"{stem}{MASK_SUFFIX}"))
    return pairs


def looks_like_cityscapes(folder: Path) -> bool:
    """leftImg8bit/ and gtFine/; nothing is read."""
    return (folder / IMAGE_DIR).is_dir() and (folder / MASK_DIR).is_dir()


def validate_cityscapes_root(root: str | Path, splits: tuple[str, ...]) -> Path:
    """Check the folders of `splits` (no image opened); returns the root. FileNotFoundError naming what is
    missing and the expected layout."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"dataset root not found: {root} ({CITYSCAPES_LAYOUT})")
    for split in splits:
        for folder in (root / IMAGE_DIR / split, root / MASK_DIR / split):
            if not folder.is_dir():
                raise FileNotFoundError(f"no folder {folder} ({CITYSCAPES_LAYOUT})")
        if not _cities(root / IMAGE_DIR / split):
            raise FileNotFoundError(f"no city folders in {root / IMAGE_DIR / split} ({CITYSCAPES_LAYOUT})")
    return root
