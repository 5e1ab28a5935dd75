"""Embedded default dataset: scikit-learn's 8x8 digits as an ImageFolder tree.

Why: the framework needs a dataset that is available offline, tiny and
deterministic so that a fresh checkout can train end to end (and tests can
exercise the real ImageFolder code path) without downloading anything.

The tree is written once and then reused.  Writing is atomic: everything goes
into a temporary sibling directory that is ``os.rename``-d into place, so a
reader never sees a half-written tree and several processes (e.g. DDP ranks on
one machine) may call :func:`ensure_digits_imagefolder` at the same time. A ``root`` that holds anything
else (a user's own dataset given without ``data=imagefolder``) is refused before anything is written, naming
the ``data=`` that reads it (:mod:`dynconv.data.write_once`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from PIL import Image

from dynconv.data.errors import DataError
from dynconv.data.write_once import MARKER, read_marker, root_holds_tree, write_tree_once

__all__ = ["check_digits_root", "ensure_digits_imagefolder", "DIGITS_TRAIN_COUNT", "DIGITS_VAL_COUNT"]

DIGITS_TRAIN_COUNT = 1437
DIGITS_VAL_COUNT = 360
# Bump when the on-disk format changes so stale trees are detected, not reused.
_FORMAT_VERSION = 1


def _expected_marker(image_size: int) -> dict:
    return {
        "format_version": _FORMAT_VERSION,
        "image_size": image_size,
        "num_classes": 10,
        "train": DIGITS_TRAIN_COUNT,
        "val": DIGITS_VAL_COUNT,
    }



def _to_rgb_image(pixels: np.ndarray, image_size: int) -> Image.Image:
    # sklearn digits are float 0..16; map to the full 8-bit range first so the
    # resize interpolates in the same space the model will see.
    gray = np.clip(np.rint(pixels * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    img = Image.fromarray(gray)  # 2-D uint8 -> mode "L"
    if image_size != gray.shape[0]:
        img = img.resize((image_size, image_size), Image.Resampling.BICUBIC)
    # RGB so the default pipeline (3-channel models, ImageNet mean/std) applies unchanged.
    return img.convert("RGB")


def _write_tree(target: Path, image_size: int) -> None:
    # Imported lazily: scikit-learn is only needed the first time.
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    indices = np.arange(len(digits.target))
    train_idx, val_idx = train_test_split(
        indices, test_size=0.2, stratify=digits.target, random_state=0
    )
    for split, split_idx in (("train", train_idx), ("val", val_idx)):
        for cls in range(10):
            (target / split / str(cls)).mkdir(parents=True, exist_ok=True)
        for idx in split_idx:
            cls = int(digits.target[idx])
            img = _to_rgb_image(digits.images[idx], image_size)
            img.save(target / split / str(cls) / f"{int(idx)}.png", format="PNG")
    # The marker is written last, inside the temporary tree, so its presence
    # after the rename proves the whole tree is there.
    (target / MARKER).write_text(json.dumps(_expected_marker(image_size), sort_keys=True))


def _check_existing(root: Path, image_size: int) -> bool:
    """True if ``root`` holds a complete tree of this size; raise if it holds something else."""
    marker = read_marker(root)
    if marker is None:
        return False
    if marker != _expected_marker(image_size):
        raise DataError(
            f"{root} already holds a dataset tree written with different settings ({marker}; data=digits with "
            f"data.image_size={image_size} needs {_expected_marker(image_size)}); nothing was changed there. "
            f"Pass data.root=NEW_DIR, a new or empty folder (e.g. {root}-{image_size}px), to write this one, or "
            f"the data.image_size it was written with."
        )
    return True


def check_digits_root(root: str | os.PathLike, image_size: int = 32) -> None:
    """Refuse, without writing anything, a ``root`` that holds something other than this digits tree."""
    root = Path(root).expanduser().absolute()
    root_holds_tree(root, "digits", lambda path: _check_existing(path, int(image_size)))


def ensure_digits_imagefolder(root: str | os.PathLike, image_size: int = 32) -> Path:
    """Make sure ``root`` holds the digits dataset as ``train/<cls>/*.png`` and ``val/<cls>/*.png``.

    Returns ``root`` as a :class:`~pathlib.Path`.  Cheap when the tree already
    exists (only the marker file is read).  Safe under concurrent callers.
    """
    image_size = int(image_size)
    if image_size < 1:
        raise ValueError(f"image_size must be positive, got {image_size}")
    root = Path(root).expanduser().absolute()
    return write_tree_once(root, "digits", lambda target: _write_tree(target, image_size),
                           lambda path: _check_existing(path, image_size))
