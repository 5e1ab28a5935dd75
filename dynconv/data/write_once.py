"""Write an embedded dataset's directory tree once, atomically, safe under concurrent callers, and never into a
folder that holds something else.

Why: the embedded datasets (digits, toy COCO) are generated on first use, possibly by several processes at once
(DDP ranks on one machine). Each writer fills a temporary sibling directory, whose last file is a marker, and
`os.rename`s it into place: a reader sees either no tree or a whole one, and the loser of a race discards its
copy. The marker's content says what was written, so a tree written with other settings is detected.

Why the foreign-folder check comes first: `data.root` is often a user's own dataset given without the matching
`data=` (`python train.py data.root=~/flowers` keeps the default `data=digits`). Such a folder is refused
before anything is written (not even the temporary sibling), and the error says which `data=` reads it.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Callable

from dynconv.data.datasets import DATASETS, datasets_recognising
from dynconv.data.errors import DataError, ForeignFolderError

MARKER = ".complete"


def read_marker(root: Path) -> dict | None:
    """The marker of a complete tree under `root`, or None if there is none (or it is unreadable)."""
    try:
        return json.loads((Path(root) / MARKER).read_text())
    except (OSError, ValueError):
        return None


def _tasks_for(kind: str) -> str:
    from dynconv.tasks import TASKS  # imported here: tasks import this module's package

    return " or ".join(f"task={name}" for name, task in TASKS.items() if task.data_kind == kind)


def foreign_folder_message(root: Path, name: str) -> str:
    """Why `root` cannot take the embedded dataset `name`, which `data=` probably reads it, and what to do."""
    kind = DATASETS.get(name).kind if name in DATASETS else ""
    what = "is a file" if root.exists() and not root.is_dir() else \
        f"already holds files that are not the {name} dataset"
    message = f"data.root={root} {what}, so the embedded {name} dataset was not written there (nothing was changed)."
    uses = []
    for spec in datasets_recognising(root):
        if spec.embedded:
            continue
        task = f" with {_tasks_for(spec.kind)}" if spec.kind != kind else ""
        uses.append(f"data={spec.name} data.root={root}{task}")
    if uses:
        message += f" It looks like a dataset of its own; to train on it, pass {'; or '.join(uses)}."
    return (message + f" To use the embedded {name} dataset, choose a new or empty folder (data.root=NEW_DIR) "
            f"or leave data.root at its default ($DYNCONV_DATA_DIR/{name}).")


def root_holds_tree(root: Path, name: str, is_complete: Callable[[Path], bool]) -> bool:
    """True if `root` holds the complete tree already; False if there is nothing there yet (absent or an empty
    folder, e.g. pre-created by a launcher); ForeignFolderError if it holds anything else."""
    if is_complete(root):
        return True
    if not root.exists() or (root.is_dir() and not any(root.iterdir())):
        return False
    raise ForeignFolderError(foreign_folder_message(root, name))


def write_tree_once(root: Path, name: str, write: Callable[[Path], object],
                    is_complete: Callable[[Path], bool]) -> Path:
    """Make `root` hold the tree `write(target)` produces (it must write MARKER last); returns `root`.

    `is_complete(root)` says whether a finished tree is already there (and raises if it holds another one).
    A `root` that holds anything else is refused before anything is written (ForeignFolderError).
    """
    if root_holds_tree(root, name, is_complete):
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    # Sibling of root => same filesystem, so os.rename is atomic. Not tempfile.mkdtemp: that makes the directory
    # private (0700), and the renamed tree should have the permissions of any directory the user creates.
    tmp = root.parent / f".{root.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        write(tmp)
        try:
            # Succeeds if root is absent or an empty directory (e.g. pre-created by a launcher); fails if another
            # process already renamed its tree.
            os.rename(tmp, root)
        except OSError:
            if is_complete(root):
                return root  # another process won the race; ours is discarded below
            if root.exists():
                # Something else appeared there while we were writing: leave it alone.
                raise ForeignFolderError(foreign_folder_message(root, name)) from None
            raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return root


def marker_matches(root: Path, name: str, expected: dict, format_version: int) -> bool:
    """Whether `root` holds a complete tree of the embedded dataset `name` written with the `expected` settings:
    False when it holds none; a DataError when it holds one written with other settings (nothing is changed
    there; the message says how to write the current one)."""
    marker = read_marker(root)
    if marker is None:
        return False
    if {key: marker.get(key) for key in expected} != expected:
        raise DataError(
            f"{root} already holds a dataset tree written with other settings ({marker}; data={name} needs "
            f"{expected}); nothing was changed there. Pass data.root=NEW_DIR, a new or empty folder (e.g. "
            f"{root}-v{format_version}), to write the current {name}.")
    return True

