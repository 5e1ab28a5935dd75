"""Embedded video default (`data=toy_video`): short clips of one shape moving left, right, up or down.

Why: the video task needs an offline, tiny, deterministic dataset so that a fresh checkout trains and evaluates
`task=video` end to end on a CPU, through the real `data=video_folder` reader (list files, frame folders, PNG
decoding, sampling), without downloading Kinetics or Jester.

The class is the direction of motion, as in Jester's "Swiping Left / Right / Up / Down": a single frame does not
tell it (the start position is random, so a shape on the left may be leaving or arriving), only the order of the
frames does. So a per-frame network with averaged scores (TSN, a plain 2-D backbone under task=video) stays near
chance (25%), a temporal model (TSM's shift, R3D's 3-D kernels) learns it, and a horizontal flip would turn "left"
into "right": the data config keeps data.hflip at 0, the Jester situation.

Each clip: 12 frames of 40 x 40 px, a dark or light noisy background, one filled square, disc or diamond of 8-12 px
in a colour far from the background, moving 2-2.5 px per frame (with a little sideways drift) along a path that
stays inside the frame. 320 training and 80 validation clips (balanced classes), written once, atomically (like
the digits and toy COCO: `dynconv/data/write_once.py`), in the video_folder layout:

    <root>/classes.txt                      left, right, up, down (one per line: class 0..3)
    <root>/train.csv, <root>/val.csv        `frames/<split>/<clip>,<class name>` per line
    <root>/frames/<split>/<clip>/00001.png  the frames
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from PIL import Image

from dynconv.data.write_once import MARKER, marker_matches, root_holds_tree, write_tree_once

__all__ = ["TOY_CLASSES", "TOY_FRAMES", "TOY_SIDE", "TOY_TRAIN_CLIPS", "TOY_VAL_CLIPS", "check_toy_video_root",
           "ensure_toy_video"]

TOY_CLASSES = ("left", "right", "up", "down")
_DIRECTIONS = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}  # (dx, dy)
TOY_TRAIN_CLIPS = 320
TOY_VAL_CLIPS = 80
TOY_FRAMES = 12
TOY_SIDE = 40
_SPLITS = (("train", TOY_TRAIN_CLIPS), ("val", TOY_VAL_CLIPS))
_FORMAT_VERSION = 1  # bump when the content changes, so a stale tree is detected rather than reused
_SEED = 20240916
_SIZE = (8, 12)  # shape side in pixels, inclusive
_SPEED = (2.0, 2.5)  # pixels per frame along the direction
_DRIFT = 0.3  # at most this many pixels per frame sideways


def _expected_marker() -> dict:
    return {"format_version": _FORMAT_VERSION, "classes": list(TOY_CLASSES), "frames": TOY_FRAMES, "side": TOY_SIDE,
            "train_clips": TOY_TRAIN_CLIPS, "val_clips": TOY_VAL_CLIPS}


def _shape_mask(kind: int, size: int) -> np.ndarray:
    """A size x size boolean mask: a square, a disc or a diamond."""
    centre = (size - 1) / 2
    y, x = np.mgrid[:size, :size] - centre
    if kind == 0:
        return np.ones((size, size), dtype=bool)
    if kind == 1:
        return x**2 + y**2 <= (size / 2) ** 2
    return np.abs(x) + np.abs(y) <= size / 2


def _clip(rng: np.random.Generator, direction: str) -> list[np.ndarray]:
    """The frames of one clip (uint8 H x W x 3) of a shape moving in `direction`."""
    size = int(rng.integers(_SIZE[0], _SIZE[1] + 1))
    speed = rng.uniform(*_SPEED)
    dx, dy = _DIRECTIONS[direction]
    drift = rng.uniform(-_DRIFT, _DRIFT)
    vx, vy = dx * speed + dy * drift, dy * speed + dx * drift  # drift is across the direction of motion
    travel_x, travel_y = vx * (TOY_FRAMES - 1), vy * (TOY_FRAMES - 1)
    # A start such that every frame's shape lies inside the frame.
    low_x, high_x = max(0.0, -travel_x), TOY_SIDE - size - max(0.0, travel_x)
    low_y, high_y = max(0.0, -travel_y), TOY_SIDE - size - max(0.0, travel_y)
    x0, y0 = rng.uniform(low_x, high_x), rng.uniform(low_y, high_y)
    dark = bool(rng.integers(2))
    background = rng.integers(0, 90, size=3) if dark else rng.integers(165, 256, size=3)
    colour = rng.integers(165, 256, size=3) if dark else rng.integers(0, 90, size=3)
    mask = _shape_mask(int(rng.integers(3)), size)
    frames = []
    for t in range(TOY_FRAMES):
        pixels = np.empty((TOY_SIDE, TOY_SIDE, 3), dtype=np.float32)
        pixels[:] = background
        x, y = int(round(x0 + vx * t)), int(round(y0 + vy * t))
        pixels[y:y + size, x:x + size][mask] = colour
        pixels += rng.normal(0.0, 8.0, size=pixels.shape).astype(np.float32)  # fresh noise every frame
        frames.append(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))
    return frames


def _write_tree(target: Path) -> dict:
    rng = np.random.default_rng(_SEED)
    (target / "classes.txt").write_text("".join(f"{name}\n" for name in TOY_CLASSES))
    for split, count in _SPLITS:
        lines = []
        for index in range(count):
            direction = TOY_CLASSES[index % len(TOY_CLASSES)]  # balanced classes, interleaved
            relative = f"frames/{split}/{index + 1:05d}"
            folder = target / relative
            folder.mkdir(parents=True)
            for t, frame in enumerate(_clip(rng, direction), start=1):
                Image.fromarray(frame).save(folder / f"{t:05d}.png", format="PNG")
            lines.append(f"{relative},{direction}\n")
        (target / f"{split}.csv").write_text("".join(lines))
    marker = _expected_marker()
    # Last, inside the temporary tree: its presence after the rename proves the whole tree is there.
    (target / MARKER).write_text(json.dumps(marker, sort_keys=True))
    return marker


def _check_existing(root: Path) -> bool:
    """True if `root` holds a complete toy tree of this format; raise if it holds another one."""
    return marker_matches(root, "toy_video", _expected_marker(), _FORMAT_VERSION)


def check_toy_video_root(root: str | os.PathLike) -> None:
    """Refuse, without writing anything, a `root` that holds something other than the toy tree."""
    root_holds_tree(Path(root).expanduser().absolute(), "toy_video", _check_existing)


def ensure_toy_video(root: str | os.PathLike) -> Path:
    """Make sure `root` holds the toy clips in the video_folder layout; returns `root` as a Path. Cheap when it
    exists (only the marker is read); safe under concurrent callers (DDP ranks)."""
    root = Path(root).expanduser().absolute()
    return write_tree_once(root, "toy_video", _write_tree, _check_existing)
