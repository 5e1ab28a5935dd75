"""A dataset of (image file, label mask file) pairs: every dataset format of segmentation ends up as one.

Why one dataset class: VOC, Cityscapes and the embedded toy_seg differ only in where their files are and how
their stored label values map to train ids (`masks.LabelMapping`); reading, checking and transforming a pair is
the same for all of them, and so is what happens to a bad pair.

A bad pair never stops a worker: an undecodable or missing image or mask, a mask of another size than its
image, or a mask holding a value no class has becomes a `CorruptSample` naming the file at fault and why;
`dynconv.data.collate` drops and reports it, and `CheckedDataLoader` applies data.strict in the main process
(stop naming the file, or skip, count and warn).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from torch.utils.data import Dataset

from dynconv.data.errors import MissingFilesError
from dynconv.data.images import CorruptImageError, CorruptSample, load_rgb
from dynconv.tasks.segmentation.masks import BadMaskError, LabelMapping, read_label_mask

__all__ = ["SegmentationPairs", "keep_existing_pairs"]

log = logging.getLogger("dynconv")

Pair = tuple[Path, Path]


def _shown(paths: Sequence[str]) -> str:
    return ", ".join(paths[:5]) + (f" and {len(paths) - 5} more" if len(paths) > 5 else "")


def keep_existing_pairs(pairs: Sequence[Pair], *, strict: bool, source: str) -> list[Pair]:
    """The pairs whose image and mask files both exist. strict: a missing file is a MissingFilesError naming
    it; non-strict: the pair is left out, and a warning counts and names the missing files.

    Why before training (one stat per file): a list file naming absent files is a broken copy of the dataset,
    better told in a second than after the first epoch's worth of skipped samples."""
    kept, missing = [], []
    for image, mask in pairs:
        absent = [str(path) for path in (image, mask) if not os.path.isfile(path)]
        if absent:
            missing += absent
        else:
            kept.append((image, mask))
    if missing and strict:
        raise MissingFilesError(f"{len(missing)} file(s) listed by {source} are missing: {_shown(missing)}; restore "
                                "them, or set data.strict=false to leave their pairs out (counted and named in a "
                                "warning)")
    if missing:
        log.warning("left out %d image/mask pair(s) of %s whose files are missing (data.strict=false): %s",
                    len(pairs) - len(kept), source, _shown(missing))
    return kept


class SegmentationPairs(Dataset):
    """`pairs[i]` = (image path, mask path); an item is `transform(image, train_ids)`, the image a PIL RGB image
    and the train ids a (H, W) uint8 array, or a CorruptSample for a pair that cannot be used."""

    def __init__(self, pairs: Sequence[Pair], mapping: LabelMapping,
                 transform: Callable[[Any, np.ndarray], Any]) -> None:
        self.pairs = [(Path(image), Path(mask)) for image, mask in pairs]
        self.mapping = mapping
        self.transform = transform

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> Any:
        image_path, mask_path = self.pairs[index]
        try:
            image = load_rgb(image_path)
        except CorruptImageError as error:
            return CorruptSample(str(image_path), error.reason)
        try:
            train_ids = read_label_mask(mask_path, self.mapping)
        except BadMaskError as error:
            return CorruptSample(str(mask_path), error.reason)
        if train_ids.shape != (image.height, image.width):
            # A mask of another size cannot be aligned with its image: resizing it would invent labels.
            height, width = train_ids.shape
            return CorruptSample(str(mask_path), f"the mask is {width}x{height} pixels but its image {image_path} "
                                                 f"is {image.width}x{image.height}")
        return self.transform(image, train_ids)
