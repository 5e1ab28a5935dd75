"""Reading the frames of one clip: a folder of frame images, or a video file decoded with PyAV (FFmpeg).

- A folder (the Jester and Something-Something layout, TSN's extracted frames): its image files in natural order
  (`2.jpg` before `10.jpg`, `img_00002.jpg` before `img_00010.jpg`); only the frames the sampling picks are read,
  each with `dynconv.data.images.load_rgb` (RGB whatever the file's mode; a corrupt frame is named).
- A video file (.mp4, .avi, .webm, .mkv, ...): every frame of its first video stream is decoded once, scaled by
  FFmpeg's scaler to the frame size the transform starts from (short side `data.resize`), so a 10-second clip costs
  a few MB, not a few hundred; the sampling then picks among them. Why PyAV: it installs from PyPI with FFmpeg
  inside its wheel, and torchvision's `read_video` is gone from the torchvision this project uses.

Whatever cannot give the frames raises `UndecodableClip(path, reason)`: a missing file or folder, an empty folder, a
corrupt frame, a file FFmpeg cannot open or decode, a file without a video stream, and a clip with fewer frames than
the sampling needs. The dataset turns it into a `CorruptSample`, which the loader skips, counts and names (or stops
on, naming the path, under data.strict=true), as images are.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from dynconv.data.images import CorruptImageError, load_rgb
from dynconv.tasks.video.sampling import ClipTooShort

VIDEO_EXTENSIONS = (".mp4", ".avi", ".webm", ".mkv", ".mov", ".m4v", ".mpg", ".mpeg", ".ogv", ".flv")
FRAME_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")

PickFrames = Callable[[int], list[int]]  # frame count -> the indices to read, in time order


class UndecodableClip(RuntimeError):
    """A clip that cannot give the frames asked for; `.path` and `.reason` say which and why."""

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"undecodable video clip {self.path}: {reason}")

    def __reduce__(self):
        return type(self), (self.path, self.reason)  # rebuilt from its fields in another process


def _natural_key(name: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def frame_files(folder: Path) -> list[Path]:
    """The frame images of a folder, in natural order."""
    names = [entry.name for entry in os.scandir(folder)
             if entry.is_file() and entry.name.lower().endswith(FRAME_EXTENSIONS)]
    return [folder / name for name in sorted(names, key=_natural_key)]


def scaled_size(width: int, height: int, short_side: int) -> tuple[int, int]:
    """(width, height) with the short side at `short_side` and the aspect kept (Kinetics' 4:3 -> 171 x 128 at 128)."""
    scale = short_side / min(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def _pick(path: Path, pick: PickFrames, count: int) -> list[int]:
    try:
        return pick(count)
    except ClipTooShort as short:
        raise UndecodableClip(path, str(short)) from None


def _read_frame_folder(folder: Path, pick: PickFrames, short_side: int) -> np.ndarray:
    files = frame_files(folder)
    if not files:
        raise UndecodableClip(folder, f"the folder holds no frame image ({', '.join(FRAME_EXTENSIONS)})")
    frames, size = [], None
    for index in _pick(folder, pick, len(files)):
        try:
            image = load_rgb(files[index])
        except CorruptImageError as error:
            raise UndecodableClip(folder, f"frame {files[index].name}: {error.reason}") from None
        size = size or scaled_size(*image.size, short_side)  # the first frame's: every frame gets the same size
        frames.append(np.asarray(image.resize(size, Image.BILINEAR)))
    return np.stack(frames)


def _decode_video(path: Path, pick: PickFrames, short_side: int) -> np.ndarray:
    import av

    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise UndecodableClip(path, "the file has no video stream")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"  # FFmpeg's frame/slice threads: several times faster on long clips
            frames, size = [], None
            for frame in container.decode(stream):
                size = size or scaled_size(frame.width, frame.height, short_side)
                frames.append(frame.to_ndarray(format="rgb24", width=size[0], height=size[1]))
    except UndecodableClip:
        raise
    except MemoryError:
        raise
    except Exception as error:  # noqa: BLE001 - FFmpeg reports bad input through many error types
        raise UndecodableClip(path, f"FFmpeg cannot decode it ({type(error).__name__}: {error})") from None
    if not frames:
        raise UndecodableClip(path, "no frame could be decoded")
    return np.stack([frames[index] for index in _pick(path, pick, len(frames))])


def read_clip(path: Path, pick: PickFrames, short_side: int) -> torch.Tensor:
    """The frames `pick(frame count)` chooses, as a uint8 tensor (T, H, W, 3) whose short side is `short_side`."""
    if path.is_dir():
        frames = _read_frame_folder(path, pick, short_side)
    elif path.is_file():
        if path.suffix.lower() not in VIDEO_EXTENSIONS:
            raise UndecodableClip(path, f"not a video file ({', '.join(VIDEO_EXTENSIONS)}) or a folder of frames")
        frames = _decode_video(path, pick, short_side)
    else:
        raise UndecodableClip(path, "no such video file or frame folder")
    return torch.from_numpy(frames)
