"""A progress bar over an evaluation loader (main process only), for the task's own evaluation loop.

Why a wrapper and not a hook: each task (`Task.evaluate`) iterates the loader itself (COCO, sliding windows,
clips), so the bar wraps what it iterates. An evaluation on CPU can take minutes (the first batch of each new shape
may also time the convolution algorithms), and without a bar it looked hung.
"""

from __future__ import annotations

import sys
from typing import Any, Iterator

from tqdm import tqdm


class ProgressLoader:
    """Iterates `loader` while a tqdm bar on stderr counts its batches; everything else (`dataset`, `sampler`,
    `len`) is the loader's."""

    def __init__(self, loader, desc: str = "eval"):
        self.loader, self.desc = loader, desc

    def __iter__(self) -> Iterator[Any]:
        total = len(self.loader) if hasattr(self.loader, "__len__") else None
        with tqdm(total=total, desc=self.desc, file=sys.stderr, dynamic_ncols=True, leave=False) as bar:
            for batch in self.loader:
                yield batch
                bar.update(1)

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.loader, name)


def with_progress(loader, enabled: bool, desc: str = "eval"):
    """`loader` with a bar when `enabled` (the main process, progress bars on), else `loader` itself."""
    return ProgressLoader(loader, desc) if enabled else loader
