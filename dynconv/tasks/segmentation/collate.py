"""Batching (image, mask) samples of different sizes, dropping and naming the pairs that could not be used.

Why pad: evaluation runs at each image's own resolution (VOC's images differ in size), so a batch of more than
one image needs a common size. Images are padded at the bottom and right with 0 (the mean, after normalisation)
and masks with the ignore index 255, so the padding adds nothing to the confusion matrix; a model's prediction
on it is simply not scored. Training crops all have the same size and stack unchanged.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from dynconv.data.collate import split_corrupt
from dynconv.tasks.segmentation.masks import IGNORE_INDEX

__all__ = ["collate_segmentation"]


def collate_segmentation(batch: Sequence[Any]) -> tuple[torch.Tensor | None, torch.Tensor | None, list[str]]:
    """`(images float (B, 3, H, W), masks int64 (B, H, W), skipped_paths)`, H and W the largest in the batch;
    `(None, None, skipped_paths)` when every sample was skipped (the caller skips the step)."""
    good, skipped = split_corrupt(batch)
    if not good:
        return None, None, skipped
    height = max(image.shape[-2] for image, _ in good)
    width = max(image.shape[-1] for image, _ in good)
    images = torch.zeros(len(good), good[0][0].shape[0], height, width, dtype=good[0][0].dtype)
    masks = torch.full((len(good), height, width), IGNORE_INDEX, dtype=torch.int64)
    for i, (image, mask) in enumerate(good):
        images[i, :, : image.shape[-2], : image.shape[-1]] = image
        masks[i, : mask.shape[-2], : mask.shape[-1]] = mask
    return images, masks, skipped
