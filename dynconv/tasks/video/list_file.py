"""The clip lists of `data=video_folder`: one clip per line, a path and a label, and the class names.

Accepted line formats (blank lines and lines starting with `#` are skipped):

    <path>,<label>            CSV (a first line `path,label` / `video,label` is a header and skipped)
    <path>;<label>            Jester's official lists (`34870;Drumming Fingers`)
    <path>\t<label>           tab-separated
    <path> <label>            whitespace-separated (the label is then one word or an integer)
    <path> <frames> <label>   TSM's and TSN's prepared lists (the frame count is not used: frames are counted on disk)

With a comma, semicolon or tab in the line, the line splits at the first of them, so a class name may hold spaces
and commas (Something-Something's and Jester's do). `<path>` is a video file (.mp4, .avi, .webm, .mkv, ...) or a
folder of frames, relative to `data.root` / `data.clips_dir` (an absolute path is used as it is). `<label>` is an
integer class index or a class name. The classes:

- `data.classes` (a file, one class name per line, line i = class i: Jester's `jester-v1-labels.csv`): names are
  looked up there, integers must be below its length;
- else, names: the sorted names of the training list; integers: 0 .. the largest index in either list.

A label that cannot be placed (a name the classes do not have, an index outside them, a mix of names and indices)
stops with the file and line, before anything is written: a list is the user's own file and is fixed there.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from dynconv.data.errors import DataError, MissingFilesError

SEPARATORS = re.compile(r"[,;\t]")
HEADER_LABELS = {"label", "labels", "class", "class_name", "category"}


@dataclass(frozen=True)
class ListedClip:
    """One line of a list: the clip's path as written, its label as written, and where it came from."""

    path: str
    label: str
    where: str  # "<list file>:<line number>" for messages


def _split(line: str) -> tuple[str, str] | None:
    if SEPARATORS.search(line):
        path, label = SEPARATORS.split(line, maxsplit=1)
        return path.strip(), label.strip()
    fields = line.split()
    if len(fields) == 2:
        return fields[0], fields[1]
    if len(fields) == 3 and fields[1].isdigit():  # TSM / TSN: path num_frames label
        return fields[0], fields[2]
    return None


def read_clip_list(path: Path, key: str = "data.train_list") -> list[ListedClip]:
    """Every clip line of the list file `path`, which the config key `key` names (DataError naming the file and
    line of a malformed one)."""
    if not path.is_file():
        raise MissingFilesError(f"{key}={path.name}: the clip list {path} does not exist; allowed values: a list "
                                "file under data.root (docs/video.md)")
    clips = []
    for number, raw in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        fields = _split(line)
        if fields is None or not all(fields):
            raise DataError(f"{path}:{number}: {raw!r} is not a clip line; expected '<path>,<label>', '<path>;<label>', "
                            "'<path> <label>' or '<path> <frames> <label>' (docs/video.md)")
        if not clips and fields[1].lower() in HEADER_LABELS:
            continue  # a CSV header
        clips.append(ListedClip(fields[0], fields[1], f"{path}:{number}"))
    if not clips:
        raise DataError(f"clip list {path} lists no clip")
    return clips


def read_class_names(path: Path) -> list[str]:
    """A classes file: one name per non-blank line, in class-index order."""
    if not path.is_file():
        raise MissingFilesError(f"data.classes={path.name}: the classes file {path} does not exist; allowed values: "
                                "a file under data.root, or null to take the class names from the training list")
    names = [line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines() if line.strip()]
    if len(names) < 2 or len(set(names)) != len(names):
        raise DataError(f"classes file {path} must name at least 2 distinct classes, one per line")
    return names


def _is_index(label: str) -> bool:
    return label.isdigit()


def resolve_labels(train: list[ListedClip], val: list[ListedClip], class_names: list[str] | None
                   ) -> tuple[list[int], list[int], list[str]]:
    """(train labels, val labels, class names) as class indices; see the module doc for the rules."""
    everything = train + val
    indices = [_is_index(clip.label) for clip in everything]
    if class_names is None and any(indices) and not all(indices):
        clip = everything[indices.index(not indices[0])]
        raise DataError(f"{clip.where}: label {clip.label!r} mixes class names and class indices in the clip lists; "
                        "use one kind, or give data.classes (a file of class names) to look names up")
    if class_names is None:
        if all(indices):
            count = max(int(clip.label) for clip in everything) + 1
            class_names = [str(index) for index in range(count)]
        else:
            class_names = sorted({clip.label for clip in train})
    lookup = {name: index for index, name in enumerate(class_names)}

    def label_of(clip: ListedClip) -> int:
        if _is_index(clip.label) and clip.label not in lookup:
            index = int(clip.label)
            if index < len(class_names):
                return index
            raise DataError(f"{clip.where}: class index {index} is outside the {len(class_names)} classes")
        if clip.label not in lookup:
            raise DataError(f"{clip.where}: class {clip.label!r} is not one of the {len(class_names)} classes "
                            f"(e.g. {', '.join(class_names[:3])}); a validation class must appear in the training "
                            "list, or be named in data.classes")
        return lookup[clip.label]

    return [label_of(clip) for clip in train], [label_of(clip) for clip in val], class_names
