"""Batch collation that drops corrupt samples and says which files they were.

Why: in non-strict mode one bad JPEG in ImageNet must not kill a multi-day run,
but silently training on fewer images hides data problems.  So the batch keeps
going and carries the list of skipped paths for the trainer to log.
"""

from __future__ import annotations

from typing import Any, Sequence

from torch.utils.data import default_collate

from dynconv.data.images import CorruptSample

__all__ = ["SkippedFile", "collate_skip_corrupt", "split_corrupt"]


class SkippedFile(str):
    """The path of a skipped file (it compares, prints and logs as the plain path) that also carries the
    decoder's reason in `.reason`.

    Why a str: the batches have carried plain paths since the start, and the trainer counts and logs them as
    such; the reason rides along through worker processes and pin_memory (a str subclass survives both), so
    the main process can name it when data.strict=true stops the run."""

    reason: str

    def __new__(cls, path: str, reason: str = "") -> "SkippedFile":
        self = super().__new__(cls, path)
        self.reason = reason
        return self

    def __reduce__(self):
        return type(self), (str(self), self.reason)


def split_corrupt(batch: Sequence[Any]) -> tuple[list[Any], list[str]]:
    """(the good samples, the paths of the :class:`CorruptSample` markers among them, as SkippedFile)."""
    good = []
    skipped: list[str] = []
    for sample in batch:
        if isinstance(sample, CorruptSample):
            skipped.append(SkippedFile(sample.path, sample.reason))
        elif sample is None:
            # A plain None comes from some other dataset; no path to report.
            skipped.append(SkippedFile("<unknown>"))
        else:
            good.append(sample)
    return good, skipped


def collate_skip_corrupt(batch: Sequence[Any]) -> tuple[Any, Any, list[str]]:
    """Collate ``(image, target)`` samples, dropping :class:`CorruptSample` markers.

    Always returns a 3-tuple ``(images, targets, skipped_paths)``:

    * normal batch: ``(Tensor[B, C, H, W], Tensor[B], [])``
    * some corrupt: the good samples are collated (B shrinks) and
      ``skipped_paths`` lists the bad files.
    * all corrupt: ``(None, None, skipped_paths)``; the caller must skip the
      step (but still log the paths).
    """
    good, skipped = split_corrupt(batch)
    if not good:
        return None, None, skipped
    images, targets = default_collate(good)
    return images, targets, skipped
