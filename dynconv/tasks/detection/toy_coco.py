"""Embedded detection default: a small COCO-format dataset of circles, squares and triangles.

Why: detection needs an offline, tiny, deterministic dataset so that a fresh checkout can train and
evaluate Mask R-CNN / RetinaNet end to end on a CPU (and tests can run the real COCO code path: JSON,
pycocotools, image files) without downloading COCO.

Each image (112-144 px per side, so both aspect groups exist) has a plain background with mild noise and
1-4 non-overlapping shapes of 20-60 px.  Shape colours are random per instance, so only the shape tells
the class, but always far in brightness from the background.  Every shape is painted from the very mask
pycocotools rasterises from its polygon, so image, mask, box and area agree exactly.  Category ids are
1, 3, 7 (not contiguous) so the label mapping is exercised.

Written once, atomically (temporary sibling directory + rename, marker written last), like digits.py, and never
into a folder that holds something else (a user's own COCO copy given without ``data=coco`` is refused before
anything is written, naming the ``data=`` that reads it).
"""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from dynconv.data.write_once import MARKER, marker_matches, read_marker, root_holds_tree, write_tree_once

__all__ = ["check_toy_coco_root", "ensure_toy_coco", "toy_coco_counts", "TOY_CATEGORIES", "TOY_TRAIN_IMAGES",
           "TOY_VAL_IMAGES"]

TOY_CATEGORIES = ((1, "circle"), (3, "square"), (7, "triangle"))
TOY_TRAIN_IMAGES = 320
TOY_VAL_IMAGES = 80
_SPLITS = (("train2017", TOY_TRAIN_IMAGES), ("val2017", TOY_VAL_IMAGES))
# Bump when the on-disk content changes so stale trees are detected, not reused.
_FORMAT_VERSION = 1
_SEED = 20240607
_SIDE = (112, 144)  # image width and height, inclusive
_SHAPE = (20, 60)  # shape side / diameter in pixels, inclusive
_GAP = 3  # minimum pixels between two shapes' boxes
_CIRCLE_POINTS = 32


def _expected_marker() -> dict:
    return {
        "format_version": _FORMAT_VERSION,
        "categories": [list(c) for c in TOY_CATEGORIES],
        "train2017_images": TOY_TRAIN_IMAGES,
        "val2017_images": TOY_VAL_IMAGES,
    }



def _polygon(kind: str, x: int, y: int, size: int, rng: np.random.Generator) -> list[float]:
    """Flat [x1, y1, x2, y2, ...] outline of a shape filling the box (x, y, size, size)."""
    if kind == "circle":
        r = size / 2.0
        angles = 2 * math.pi * np.arange(_CIRCLE_POINTS) / _CIRCLE_POINTS  # includes the 4 extreme points
        points = [(x + r + r * math.cos(a), y + r + r * math.sin(a)) for a in angles]
    elif kind == "square":
        points = [(x, y), (x + size, y), (x + size, y + size), (x, y + size)]
    else:  # triangle, pointing up, down, left or right
        s = size
        points = [
            [(x, y + s), (x + s, y + s), (x + s / 2, y)],
            [(x, y), (x + s, y), (x + s / 2, y + s)],
            [(x + s, y), (x + s, y + s), (x, y + s / 2)],
            [(x, y), (x, y + s), (x + s, y + s / 2)],
        ][int(rng.integers(4))]
    return [round(float(v), 2) for point in points for v in point]


def _place(rng: np.random.Generator, width: int, height: int, taken: list[tuple[int, int, int]]):
    """A (x, y, size) whose box keeps _GAP pixels from every taken box, or None after a few tries."""
    for _ in range(30):
        size = int(rng.integers(_SHAPE[0], _SHAPE[1] + 1))
        x = int(rng.integers(0, width - size + 1))
        y = int(rng.integers(0, height - size + 1))
        if all(x + size + _GAP <= tx or tx + ts + _GAP <= x or y + size + _GAP <= ty or ty + ts + _GAP <= y
               for tx, ty, ts in taken):
            return x, y, size
    return None


def _image(rng: np.random.Generator, image_id: int, first_ann_id: int, image_dir: Path):
    width, height = (int(v) for v in rng.integers(_SIDE[0], _SIDE[1] + 1, size=2))
    dark = bool(rng.integers(2))
    # Background and shapes on opposite halves of the brightness range: always high contrast.
    low, high = (0, 80) if dark else (175, 256)
    shape_low, shape_high = (175, 256) if dark else (0, 80)
    pixels = np.empty((height, width, 3), dtype=np.float32)
    pixels[:] = rng.integers(low, high, size=3)
    annotations, taken = [], []
    for _ in range(int(rng.integers(1, 5))):
        spot = _place(rng, width, height, taken)
        if spot is None:
            break
        taken.append(spot)
        category_id, _name = TOY_CATEGORIES[int(rng.integers(len(TOY_CATEGORIES)))]
        polygon = _polygon(_name, *spot, rng)
        rle = mask_utils.merge(mask_utils.frPyObjects([polygon], height, width))
        with warnings.catch_warnings():  # pycocotools' own NumPy 2 DeprecationWarning, once per shape
            warnings.filterwarnings("ignore", message="__array__ implementation", category=DeprecationWarning)
            mask = mask_utils.decode(rle).astype(bool)
        pixels[mask] = rng.integers(shape_low, shape_high, size=3)
        xs, ys = polygon[0::2], polygon[1::2]
        annotations.append({
            "id": first_ann_id + len(annotations),
            "image_id": image_id,
            "category_id": category_id,
            "segmentation": [polygon],
            "area": float(mask_utils.area(rle)),
            "bbox": [min(xs), min(ys), round(max(xs) - min(xs), 2), round(max(ys) - min(ys), 2)],
            "iscrowd": 0,
        })
    pixels += rng.normal(0.0, 6.0, size=pixels.shape).astype(np.float32)  # mild sensor-like noise
    file_name = f"{image_id:012d}.png"
    Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8)).save(image_dir / file_name, format="PNG")
    info = {"id": image_id, "file_name": file_name, "width": width, "height": height}
    return info, annotations


def _write_tree(target: Path) -> dict:
    rng = np.random.default_rng(_SEED)
    (target / "annotations").mkdir(parents=True)
    categories = [{"id": cid, "name": name, "supercategory": "shape"} for cid, name in TOY_CATEGORIES]
    marker = _expected_marker()
    image_id, ann_id = 1, 1
    for split, count in _SPLITS:
        (target / split).mkdir()
        images, annotations = [], []
        for _ in range(count):
            info, anns = _image(rng, image_id, ann_id, target / split)
            images.append(info)
            annotations += anns
            image_id, ann_id = image_id + 1, ann_id + len(anns)
        payload = {
            "info": {"description": "dynconv toy_coco: circles, squares and triangles",
                     "version": str(_FORMAT_VERSION)},
            "licenses": [],
            "images": images,
            "annotations": annotations,
            "categories": categories,
        }
        (target / "annotations" / f"instances_{split}.json").write_text(json.dumps(payload))
        marker[f"{split}_annotations"] = len(annotations)
    # Last, inside the temporary tree: its presence after the rename proves the whole tree is there.
    (target / MARKER).write_text(json.dumps(marker, sort_keys=True))
    return marker


def _check_existing(root: Path) -> bool:
    """True if `root` holds a complete toy tree of this format; raise if it holds another one."""
    return marker_matches(root, "toy_coco", _expected_marker(), _FORMAT_VERSION)


def check_toy_coco_root(root: str | os.PathLike) -> None:
    """Refuse, without writing anything, a ``root`` that holds something other than the toy tree."""
    root_holds_tree(Path(root).expanduser().absolute(), "toy_coco", _check_existing)


def toy_coco_counts(root: str | os.PathLike) -> dict:
    """The marker of a written tree: images and annotations per split, categories."""
    return read_marker(Path(root)) or {}


def ensure_toy_coco(root: str | os.PathLike) -> Path:
    """Make sure ``root`` holds the toy dataset in the COCO 2017 layout; returns ``root`` as a Path.

    Cheap when it exists (only the marker is read); safe under concurrent callers (DDP ranks).
    """
    root = Path(root).expanduser().absolute()
    return write_tree_once(root, "toy_coco", _write_tree, _check_existing)
