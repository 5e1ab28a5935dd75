"""Write an embedded dataset's directory tree once, atomically, safe under concurrent callers.

Why: the embedded datasets (digits, toy COCO) are generated on first use, possibly by several processes at once
(DDP ranks on one machine). Each writer fills a temporary sibling directory, whose last file is a marker, and
`os.rename`s it into place: a reader sees either no tree or a whole one, and the loser of a race discards its
copy. The marker's content says what was written, so a tree written with other settings is detected.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Callable

MARKER = ".complete"


def read_marker(root: Path) -> dict | None:
    """The marker of a complete tree under `root`, or None if there is none (or it is unreadable)."""
    try:
        return json.loads((Path(root) / MARKER).read_text())
    except (OSError, ValueError):
        return None


def write_tree_once(root: Path, name: str, write: Callable[[Path], object],
                    is_complete: Callable[[Path], bool]) -> Path:
    """Make `root` hold the tree `write(target)` produces (it must write MARKER last); returns `root`.

    `is_complete(root)` says whether a finished tree is already there (and raises if it holds another one).
    """
    if is_complete(root):
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
                raise FileExistsError(
                    f"Cannot write the {name} dataset to {root}: the directory exists, is not empty and has no "
                    f"{MARKER} marker. Delete it or choose another root."
                ) from None
            raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return root
