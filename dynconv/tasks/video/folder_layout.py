"""`data=video_folder`: where the clips and their lists are, read once the same way by the config check (before a
run writes anything) and by the loaders.

    <data.root>/<data.train_list>         the training clips, one `<path>,<label>` per line (`list_file.py`)
    <data.root>/<data.val_list>           the evaluation clips
    <data.root>/<data.classes>            optional: one class name per line, in class-index order
    <data.root>/<data.clips_dir>/<path>   each listed clip: a video file or a folder of frames (clips_dir null: root)

Only the lists are read here (a Kinetics list of 240k lines takes a fraction of a second); the clips themselves are
opened when sampled, so a missing or broken one is skipped and named then (`decoding.py`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from dynconv.config import ConfigError
from dynconv.data.datasets import data_root
from dynconv.tasks.video.list_file import read_class_names, read_clip_list, resolve_labels

LAYOUT = "DIR/<data.train_list>, DIR/<data.val_list>: lines '<clip path>,<label>' (docs/video.md)"
LIST_NAMES = ("train", "val")
LIST_SUFFIXES = (".csv", ".txt")


@dataclass(frozen=True)
class ClipSplits:
    """Both splits' clip paths and class indices, and the class names."""

    train_paths: list[Path]
    train_labels: list[int]
    val_paths: list[Path]
    val_labels: list[int]
    classes: list[str]


def _file(root: Path, data_cfg: Mapping[str, Any], key: str) -> Path:
    name = data_cfg.get(key)
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"data.{key}={name!r} is invalid; allowed values: a file name under data.root")
    return root / name


def read_splits(root: Path, data_cfg: Mapping[str, Any]) -> ClipSplits:
    """Parse the lists (and the classes file) under `root`; DataError naming the file and line of a problem."""
    train = read_clip_list(_file(root, data_cfg, "train_list"), "data.train_list")
    val = read_clip_list(_file(root, data_cfg, "val_list"), "data.val_list")
    names = read_class_names(_file(root, data_cfg, "classes")) if data_cfg.get("classes") else None
    train_labels, val_labels, classes = resolve_labels(train, val, names)
    base = root / data_cfg["clips_dir"] if data_cfg.get("clips_dir") else root
    return ClipSplits([base / clip.path for clip in train], train_labels, [base / clip.path for clip in val],
                      val_labels, classes)


def check_video_folder(data_cfg: Mapping[str, Any]) -> None:
    """The layout check of `data=video_folder`: data.root set, a folder, its lists readable and consistent."""
    if data_cfg.get("root") in (None, ""):
        raise ConfigError(f"data.root is not set: pass data.root=DIR ({LAYOUT})")
    root = data_root(data_cfg)
    if not root.is_dir():
        raise ConfigError(f"data.root={str(root)!r}: no such folder ({LAYOUT})")
    read_splits(root, data_cfg)


def looks_like_video_folder(folder: Path) -> bool:
    """train.csv / train.txt and val.csv / val.txt side by side; nothing is read."""
    return all(any((folder / f"{name}{suffix}").is_file() for suffix in LIST_SUFFIXES) for name in LIST_NAMES)
