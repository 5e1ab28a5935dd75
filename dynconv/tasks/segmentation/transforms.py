"""Transforms v2 for an image and its label mask: every geometric step moves both, so they stay aligned.

Training (the random scale, padded crop and flip of DeepLabV3Plus-Pytorch's VOC pipeline and of torchvision's
segmentation reference, the recipes Weight Excitation's segmentation rows cite): scale the image and mask by a
factor drawn from `data.scale_range` (image bilinear, mask nearest: a label is never interpolated), normalise with
`data.mean` / `data.std`, pad the bottom and right up to `data.crop_size` where the scaled image is smaller (image
0, which is the mean after normalisation; mask the ignore index 255, so padding is never trained on), take a
random `data.crop_size` crop, and flip horizontally with probability `data.hflip`.

Evaluation: the whole image at its own resolution (the metric is computed at the labels' resolution), only
normalised; `data.val_size` (an integer) resizes both so that the shorter side has that many pixels instead,
a cheaper approximation of the papers' protocol.

Randomness comes from the global torch RNG, which SeededDataset reseeds per sample: a resumed run sees the same
scales, crops and flips.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from dynconv.tasks.segmentation.masks import IGNORE_INDEX

__all__ = ["PadToSize", "RandomScale", "ShortSideResize", "build_segmentation_transforms", "crop_size"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def crop_size(value: int | Sequence[int]) -> tuple[int, int]:
    """`data.crop_size` as (height, width): one integer is a square."""
    if isinstance(value, int):
        return value, value
    height, width = value
    return int(height), int(width)


def _resize_pair(image: tv_tensors.Image, mask: tv_tensors.Mask, size: list[int]):
    """Image: bilinear, antialiased. Mask: nearest neighbour sampled at pixel centres ("nearest-exact"), the grid of
    the bilinear image. Not torchvision's resize of a Mask: it uses torch's legacy "nearest", which takes source
    pixel floor(i * in / out), up to half a source pixel off the image (and some torchvision releases ignore an
    interpolation asked for a Mask)."""
    image = F.resize(image, size, antialias=True)
    height, width = image.shape[-2:]
    labels = torch.nn.functional.interpolate(mask.as_subclass(torch.Tensor)[None, None], size=[height, width],
                                             mode="nearest-exact")[0, 0]
    return image, tv_tensors.wrap(labels, like=mask)


class RandomScale:
    """Resize image and mask by one factor drawn uniformly from `scale_range`."""

    def __init__(self, scale_range: Sequence[float]) -> None:
        self.low, self.high = (float(v) for v in scale_range)

    def __call__(self, image: tv_tensors.Image, mask: tv_tensors.Mask):
        factor = self.low + (self.high - self.low) * float(torch.rand(()))
        height, width = image.shape[-2:]
        size = [max(1, round(height * factor)), max(1, round(width * factor))]
        if size == [height, width]:
            return image, mask
        return _resize_pair(image, mask, size)


class PadToSize:
    """Pad the bottom and right of image and mask up to (height, width) where they are smaller: the image with
    `image_fill`, the mask with the ignore index."""

    def __init__(self, size: tuple[int, int], image_fill: float = 0.0) -> None:
        self.size = size
        self.image_fill = image_fill

    def __call__(self, image: tv_tensors.Image, mask: tv_tensors.Mask):
        height, width = image.shape[-2:]
        bottom, right = max(0, self.size[0] - height), max(0, self.size[1] - width)
        if not bottom and not right:
            return image, mask
        padding = [0, 0, right, bottom]  # left, top, right, bottom
        return F.pad(image, padding, fill=self.image_fill), F.pad(mask, padding, fill=IGNORE_INDEX)


class ShortSideResize:
    """Resize image and mask so that the shorter side is `side` pixels."""

    def __init__(self, side: int) -> None:
        self.side = int(side)

    def __call__(self, image: tv_tensors.Image, mask: tv_tensors.Mask):
        return _resize_pair(image, mask, [self.side])


class SegmentationTransform:
    """(PIL RGB image, (H, W) uint8 train ids) -> (float tensor (3, H', W'), uint8 tensor (H', W')).

    The mask stays uint8 until the batch is collated: a quarter of the memory of int64 in the workers'
    queues."""

    def __init__(self, steps: list[Any]) -> None:
        self.pipeline = v2.Compose(steps)

    def __call__(self, image: Image.Image, train_ids: np.ndarray):
        image = tv_tensors.Image(F.pil_to_tensor(image))
        mask = tv_tensors.Mask(torch.from_numpy(np.ascontiguousarray(train_ids)))
        image, mask = self.pipeline(image, mask)
        return image.as_subclass(torch.Tensor), mask.as_subclass(torch.Tensor)


def build_segmentation_transforms(data_cfg: Mapping[str, Any], train: bool) -> SegmentationTransform:
    """The training or evaluation transform the data config describes (the module docstring says what)."""
    normalise = [v2.ToDtype(torch.float32, scale=True),  # a plain dtype converts the image only, not the mask
                 v2.Normalize(mean=list(data_cfg.get("mean", IMAGENET_MEAN)), std=list(data_cfg.get("std", IMAGENET_STD)))]
    if not train:
        val_size = data_cfg.get("val_size")
        return SegmentationTransform(([ShortSideResize(val_size)] if val_size else []) + normalise)
    size = crop_size(data_cfg.get("crop_size", 512))
    steps: list[Any] = [RandomScale(data_cfg.get("scale_range", (0.5, 2.0))), *normalise, PadToSize(size),
                        v2.RandomCrop(size)]
    hflip = float(data_cfg.get("hflip", 0.5))
    if hflip > 0:
        steps.append(v2.RandomHorizontalFlip(p=hflip))
    return SegmentationTransform(steps)
