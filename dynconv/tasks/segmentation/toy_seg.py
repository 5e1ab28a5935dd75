"""Embedded segmentation default: circles, squares and triangles on textured backgrounds, in the VOC layout.

Why: segmentation needs an offline, tiny, deterministic dataset so that a fresh checkout can train and evaluate
`task=segmentation` end to end on a CPU, through the very reader that reads PASCAL VOC (JPEG images, palette PNG
masks, split lists), without downloading anything.

Each image (64-96 px per side) has a background of a random brightness with a striped texture and noise, and
1-3 non-overlapping shapes of 16-36 px whose colour is random per shape but far in brightness from the
background, so that the shape, not the colour, tells the class. The masks hold 0 (background), 1 (circle),
2 (square), 3 (triangle), and 255 on a 2-pixel band along every outline, as VOC marks its object boundaries
"void" (ignored). Every image is drawn from its own seed, so one sample can be regenerated alone.

Written once, atomically (temporary sibling directory + rename, marker written last, `dynconv.data.write_once`),
and never into a folder that holds something else.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from dynconv.data.write_once import MARKER, marker_matches, root_holds_tree, write_tree_once
from dynconv.tasks.segmentation.masks import IGNORE_INDEX
from dynconv.tasks.segmentation.voc import IMAGE_DIR, LIST_DIR, MASK_DIR, voc_palette

__all__ = ["TOY_SEG_CLASSES", "TOY_SEG_TRAIN_IMAGES", "TOY_SEG_VAL_IMAGES", "check_toy_seg_root", "ensure_toy_seg",
           "toy_seg_sample"]

TOY_SEG_CLASSES = ("background", "circle", "square", "triangle")
TOY_SEG_TRAIN_IMAGES = 240
TOY_SEG_VAL_IMAGES = 60
# Bump when the on-disk content changes so stale trees are detected, not reused.
_FORMAT_VERSION = 1
_SEED = 20240716
_SIDE = (64, 96)  # image width and height, inclusive
_SHAPE = (16, 36)  # shape side / diameter, inclusive
_GAP = 4  # pixels between two shapes' boxes: their boundary bands never touch
_BAND = 1  # the ignored band reaches this many pixels inside and outside every outline


def _expected_marker() -> dict:
    return {"format_version": _FORMAT_VERSION, "classes": list(TOY_SEG_CLASSES), "train": TOY_SEG_TRAIN_IMAGES,
            "val": TOY_SEG_VAL_IMAGES}


def _grow(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary dilation by a (2r+1)^2 square (no SciPy needed for a 3x3 structuring element)."""
    padded = np.pad(mask, radius)
    height, width = mask.shape
    out = np.zeros_like(mask)
    for dy in range(2 * radius + 1):
        for dx in range(2 * radius + 1):
            out |= padded[dy:dy + height, dx:dx + width]
    return out


def _outline_band(shape: np.ndarray) -> np.ndarray:
    """The pixels within _BAND of the shape's outline, on both sides: near the shape and near the outside."""
    return _grow(shape, _BAND) & _grow(~shape, _BAND)


def _draw_shape(kind: int, x: int, y: int, size: int, width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    box = [x, y, x + size - 1, y + size - 1]
    if kind == 1:
        draw.ellipse(box, fill=1)
    elif kind == 2:
        draw.rectangle(box, fill=1)
    else:  # a triangle pointing up, down, left or right
        right, bottom, mid_x, mid_y = x + size - 1, y + size - 1, x + (size - 1) / 2, y + (size - 1) / 2
        corners = [[(x, bottom), (right, bottom), (mid_x, y)], [(x, y), (right, y), (mid_x, bottom)],
                   [(right, y), (right, bottom), (x, mid_y)], [(x, y), (x, bottom), (right, mid_y)]]
        draw.polygon(corners[int(rng.integers(4))], fill=1)
    return np.array(canvas, dtype=bool)


def _place(rng: np.random.Generator, width: int, height: int, taken: list[tuple[int, int, int]]):
    """(x, y, size) of a box keeping _GAP pixels from every taken box, or None after a few tries."""
    for _ in range(30):
        size = int(rng.integers(_SHAPE[0], _SHAPE[1] + 1))
        x, y = int(rng.integers(0, width - size + 1)), int(rng.integers(0, height - size + 1))
        if all(x + size + _GAP <= tx or tx + ts + _GAP <= x or y + size + _GAP <= ty or ty + ts + _GAP <= y
               for tx, ty, ts in taken):
            return x, y, size
    return None


def _texture(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """Two sine gratings of random direction and period (8-24 px), +-12 grey levels each."""
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    texture = np.zeros((height, width), dtype=np.float32)
    for _ in range(2):
        angle, period, phase = rng.uniform(0, np.pi), rng.uniform(8, 24), rng.uniform(0, 2 * np.pi)
        texture += 12 * np.sin(2 * np.pi * (xs * np.cos(angle) + ys * np.sin(angle)) / period + phase)
    return texture


def toy_seg_sample(index: int) -> tuple[np.ndarray, np.ndarray]:
    """Image `index` (train images first, then val): (H, W, 3) uint8 pixels and (H, W) uint8 labels."""
    rng = np.random.default_rng([_SEED, index])
    width, height = (int(v) for v in rng.integers(_SIDE[0], _SIDE[1] + 1, size=2))
    dark = bool(rng.integers(2))
    # Background and shapes on opposite halves of the brightness range: always high contrast.
    low, high = (20, 100) if dark else (155, 236)
    shape_low, shape_high = (155, 236) if dark else (20, 100)
    pixels = np.empty((height, width, 3), dtype=np.float32)
    pixels[:] = rng.integers(low, high, size=3)
    pixels += _texture(rng, width, height)[..., None]
    labels = np.zeros((height, width), dtype=np.uint8)
    ignored = np.zeros((height, width), dtype=bool)
    taken: list[tuple[int, int, int]] = []
    for _ in range(int(rng.integers(1, 4))):
        spot = _place(rng, width, height, taken)
        if spot is None:
            break
        taken.append(spot)
        kind = int(rng.integers(1, len(TOY_SEG_CLASSES)))
        shape = _draw_shape(kind, *spot, width, height, rng)
        pixels[shape] = rng.integers(shape_low, shape_high, size=3)
        labels[shape] = kind
        ignored |= _outline_band(shape)
    labels[ignored] = IGNORE_INDEX
    pixels += rng.normal(0.0, 6.0, size=pixels.shape).astype(np.float32)  # mild sensor-like noise
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8), labels


def _write_tree(target: Path) -> None:
    for folder in (IMAGE_DIR, MASK_DIR, LIST_DIR):
        (target / folder).mkdir(parents=True)
    palette = voc_palette()
    ids = {"train": [], "val": []}
    for index in range(TOY_SEG_TRAIN_IMAGES + TOY_SEG_VAL_IMAGES):
        split = "train" if index < TOY_SEG_TRAIN_IMAGES else "val"
        image_id = f"toy_{index:06d}"
        pixels, labels = toy_seg_sample(index)
        Image.fromarray(pixels).save(target / IMAGE_DIR / f"{image_id}.jpg", format="JPEG", quality=95)
        mask = Image.fromarray(labels, mode="P")  # a palette PNG like VOC's: the pixel values are the labels
        mask.putpalette(palette)
        mask.save(target / MASK_DIR / f"{image_id}.png", format="PNG")
        ids[split].append(image_id)
    ids["trainval"] = ids["train"] + ids["val"]
    for split, names in ids.items():
        (target / LIST_DIR / f"{split}.txt").write_text("".join(f"{name}\n" for name in names))
    # Last, inside the temporary tree: its presence after the rename proves the whole tree is there.
    (target / MARKER).write_text(json.dumps(_expected_marker(), sort_keys=True))


def _check_existing(root: Path) -> bool:
    """True if `root` holds a complete toy tree of this format; raise if it holds another one."""
    return marker_matches(root, "toy_seg", _expected_marker(), _FORMAT_VERSION)


def check_toy_seg_root(root: str | os.PathLike) -> None:
    """Refuse, without writing anything, a `root` that holds something other than the toy tree."""
    root_holds_tree(Path(root).expanduser().absolute(), "toy_seg", _check_existing)


def ensure_toy_seg(root: str | os.PathLike) -> Path:
    """Make sure `root` holds the toy dataset in the VOC layout; returns `root` as a Path. Cheap when it exists
    (only the marker is read); safe under concurrent callers (DDP ranks)."""
    root = Path(root).expanduser().absolute()
    return write_tree_once(root, "toy_seg", _write_tree, _check_existing)
