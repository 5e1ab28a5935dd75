"""Reading an image file for any task: always RGB, and a corrupt file is named.

Real-world image collections contain grayscale/CMYK/RGBA/palette/16-bit files and the occasional truncated or
empty file. Every image is forced to RGB here, and a decode failure raises `CorruptImageError` naming the file;
a loader in non-strict mode turns it into a `CorruptSample` marker that the collate functions drop and report
(`collate.py`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

__all__ = ["CorruptImageError", "CorruptSample", "load_rgb"]


class CorruptImageError(RuntimeError):
    """An image file exists but cannot be decoded; ``.path`` is the file."""

    def __init__(self, path: str | os.PathLike, reason: str = "") -> None:
        self.path = str(path)
        self.reason = reason
        detail = f": {reason}" if reason else ""
        super().__init__(f"corrupt or unreadable image file {self.path}{detail}")

    def __reduce__(self):
        # Default exception pickling calls cls(message), which would nest the
        # message inside itself; rebuild from the real fields instead.
        return type(self), (self.path, self.reason)


@dataclass(frozen=True)
class CorruptSample:
    """Stand-in returned (non-strict mode) for an image that failed to decode.

    A marker object rather than ``None`` so the collate function can report
    *which* file was skipped.
    """

    path: str
    reason: str = ""


# 16-bit grayscale PNG/TIFF: PIL's convert('RGB') clips instead of rescaling,
# which would turn most pixels white.  Shift to 8 bits first.
_SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}


def _reason(exc: Exception) -> str:
    if isinstance(exc, UnidentifiedImageError):
        # PIL's own message repeats the path inside a file-object repr; say what it means instead.
        return "not in an image format PIL can read (an empty, cut-off or non-image file)"
    return f"{type(exc).__name__}: {exc}"


def load_rgb(path: str | os.PathLike) -> Image.Image:
    """Fully decode ``path`` and return it as an RGB image, or raise CorruptImageError."""
    try:
        with open(path, "rb") as f:
            img = Image.open(f)
            # Decoding is lazy in PIL; load() inside the try makes truncated
            # files fail here, with the path, not later inside a transform.
            img.load()
            if img.mode in _SIXTEEN_BIT_MODES:
                img = img.point(lambda v: v / 256).convert("L")
            return img.convert("RGB")
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - PIL plugins raise many unrelated types on bad input
        raise CorruptImageError(path, _reason(exc)) from exc
