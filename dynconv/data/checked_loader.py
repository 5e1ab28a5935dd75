"""A DataLoader that applies `data.strict` to undecodable images in the main process, and refuses a pass in
which nothing at all could be read.

Why in the main process: an exception raised inside a worker reaches the main process rebuilt from its type
with the worker's whole traceback as its message, which is no message for a user. So the datasets always mark
an undecodable file (a CorruptSample, dropped and named by the collate functions), and this loader decides:
strict stops with one UnreadableImageError naming the file and the decoder's reason; non-strict lets the
batch through with the skipped paths (the trainer counts and logs the training ones; the evaluation ones are
logged here, since nothing else reports them).

Why refuse a pass with no readable image: skipping must not turn a split of broken files (a bad copy, a
half-finished download) into a run that "completes" with top-1 0 on zero samples.
"""

from __future__ import annotations

import logging
from typing import Any, Iterator

from torch.utils.data import DataLoader

from dynconv.data.errors import DataError, UnreadableImageError

__all__ = ["CheckedDataLoader"]

log = logging.getLogger("dynconv")


def _reason(path: str) -> str:
    reason = getattr(path, "reason", "")
    return f": {reason}" if reason else ""


class _CheckedIterator:
    """Iterates a DataLoader iterator, applying the checks; every other attribute is the wrapped iterator's
    (`_shutdown_workers` included, so code that stops a loader iterator's workers works on this one too)."""

    def __init__(self, loader: "CheckedDataLoader", inner: Iterator[Any]) -> None:
        self._loader = loader
        self._inner = inner
        self._skipped: list[str] = []
        self._readable = 0
        self._ended = False

    def __iter__(self) -> "_CheckedIterator":
        return self

    def __len__(self) -> int:
        return len(self._inner)  # type: ignore[arg-type]

    def __getattr__(self, name: str) -> Any:
        if name == "_inner":  # not set yet: no recursion
            raise AttributeError(name)
        return getattr(self._inner, name)

    def __next__(self) -> Any:
        loader = self._loader
        try:
            batch = next(self._inner)
        except StopIteration:
            if not self._ended:
                self._ended = True
                self._end_of_pass()
            raise
        paths = batch[2]
        if paths and loader.strict:
            raise UnreadableImageError(
                f"corrupt or unreadable {loader.item} {paths[0]}{_reason(paths[0])} (in {loader.source}); replace "
                f"the file, or set data.strict=false to skip undecodable {loader.noun}s (they are counted and named "
                "in a warning)")
        self._skipped += paths
        self._readable += 0 if batch[0] is None else len(batch[0])
        return batch

    def _end_of_pass(self) -> None:
        loader, skipped = self._loader, self._skipped
        loader.last_skipped = skipped
        if skipped and self._readable == 0:
            raise DataError(
                f"every {loader.noun} read from {loader.source} was undecodable ({len(skipped)} file(s), e.g. "
                f"{skipped[0]}{_reason(skipped[0])}): nothing is left to use; replace those files "
                "(data.strict=false skips single bad files, not a whole split)")
        if skipped and loader.warn_skipped:
            shown = ", ".join(skipped[:10]) + (" ..." if len(skipped) > 10 else "")
            log.warning("skipped %d undecodable %s(s) of %s (data.strict=false): %s", len(skipped), loader.noun,
                        loader.source, shown)


class CheckedDataLoader(DataLoader):
    """A DataLoader over batches `(inputs, targets, skipped_paths)` (inputs None: every sample was skipped).

    `strict`: stop at the first skipped path. `source`: what the loader reads, for the messages ("the val
    split /data/val"). `warn_skipped`: log the skipped paths after each complete pass. `last_skipped`: the
    paths skipped in the last complete pass. `noun`: what one sample is, for the messages ("image", "video clip");
    `item`: what one skipped path is (default "<noun> file").
    """

    def __init__(self, dataset: Any, *, strict: bool, source: str, warn_skipped: bool, noun: str = "image",
                 item: str | None = None, **kwargs: Any) -> None:
        self.strict = bool(strict)
        self.source = source
        self.noun = noun
        self.item = item or f"{noun} file"
        self.warn_skipped = bool(warn_skipped)
        self.last_skipped: list[str] = []
        super().__init__(dataset, **kwargs)

    def __iter__(self) -> _CheckedIterator:  # type: ignore[override]
        return _CheckedIterator(self, super().__iter__())
