"""Reading a label mask: the class index of every pixel, checked against the classes, never through RGB.

Why indices and never RGB: VOC's `SegmentationClass` PNGs are palette images whose pixel values *are* the class
indices (the palette only colours them for viewing); converting to RGB would turn each index into a colour that
then has to be matched back. PIL gives the indices directly for palette ("P") and 8-bit grayscale ("L") PNGs
(SBD's `SegmentationClassAug`, Cityscapes' `*_gtFine_labelIds.png`), so only those modes are accepted.

Why a lookup table: Cityscapes stores 34 label ids of which 19 are trained (cityscapesScripts' labels.py), VOC
stores its 21 classes as they are; one 256-entry table maps any stored value to a train id or the ignore index,
and a second one says which stored values may occur at all, so a mask holding anything else (a wrong file, an
RGB mask saved as grayscale) is reported instead of silently trained on.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

__all__ = ["IGNORE_INDEX", "BadMaskError", "LabelMapping", "identity_mapping", "read_label_mask"]

IGNORE_INDEX = 255  # VOC's boundary/"void" value, and the train id of every Cityscapes class that is not trained
INDEX_MODES = ("P", "L")  # the PIL modes whose pixel values are the stored label values


class BadMaskError(RuntimeError):
    """A mask that cannot be used: undecodable, not an index image, or holding a value no class has."""

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"unusable label mask {self.path}: {reason}")

    def __reduce__(self):
        return type(self), (self.path, self.reason)


@dataclass(frozen=True)
class LabelMapping:
    """`train_ids[v]`: the train id (or IGNORE_INDEX) of the stored value v; `allowed[v]`: whether v may occur;
    `allowed_text`: the allowed values in words, for the message naming a mask that holds another one."""

    train_ids: np.ndarray  # (256,) uint8
    allowed: np.ndarray  # (256,) bool
    allowed_text: str


def identity_mapping(num_classes: int) -> LabelMapping:
    """Stored values are the train ids 0..num_classes-1, and IGNORE_INDEX is ignored (VOC, toy_seg)."""
    train_ids = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    train_ids[:num_classes] = np.arange(num_classes, dtype=np.uint8)
    allowed = np.zeros(256, dtype=bool)
    allowed[:num_classes] = True
    allowed[IGNORE_INDEX] = True
    return LabelMapping(train_ids, allowed, f"the class indices 0..{num_classes - 1} and the ignore index "
                                            f"{IGNORE_INDEX}")


def read_label_mask(path: str | os.PathLike, mapping: LabelMapping) -> np.ndarray:
    """The (H, W) uint8 train ids of the mask at `path`, or BadMaskError saying why it cannot be used."""
    try:
        with open(path, "rb") as f:
            img = Image.open(f)
            img.load()  # decoding is lazy in PIL: a truncated file must fail here, with its path
            mode = img.mode
            stored = np.array(img) if mode in INDEX_MODES else None
    except MemoryError:
        raise
    except UnidentifiedImageError:
        raise BadMaskError(path, "not in an image format PIL can read (an empty, cut-off or non-image file)") from None
    except Exception as exc:  # noqa: BLE001 - PIL plugins raise many unrelated types on bad input
        raise BadMaskError(path, f"{type(exc).__name__}: {exc}") from None
    if stored is None:
        raise BadMaskError(path, f"a label mask must be a palette (P) or 8-bit grayscale (L) image of label values, "
                                 f"this one is mode {mode} (a colour rendering of a mask is not its labels)")
    unexpected = ~mapping.allowed[stored]
    if unexpected.any():
        values = np.unique(stored[unexpected])
        shown = ", ".join(str(int(v)) for v in values[:5]) + (" ..." if len(values) > 5 else "")
        raise BadMaskError(path, f"holds the value(s) {shown}, but the allowed values are {mapping.allowed_text}")
    return mapping.train_ids[stored]
