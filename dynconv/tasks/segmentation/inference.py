"""Full-resolution inference: the whole image in one forward, or overlapping windows (sliding window).

Both papers score at the label's full resolution. Whole-image inference is what DeepLabV3Plus-Pytorch (the
Cityscapes recipe Weight Excitation cites) and torchvision's reference do: one forward of the full image
(Cityscapes 1024 x 2048, VOC up to 500 x 500). Fu et al. (2018; DyNet's dilated FCN) evaluate Cityscapes with
sliding windows of their 768 px training crop: `task.eval_mode=slide` with `task.eval_crop` / `task.eval_stride`
runs the model on overlapping crops and averages the logits where windows overlap; it also bounds the
memory a 2048 px image needs.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def whole_image_logits(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    return model(images)["out"]


def window_starts(length: int, crop: int, stride: int) -> list[int]:
    """Window offsets covering 0..length with windows of `crop` every `stride`, the last one flush with the end."""
    if length <= crop:
        return [0]
    count = math.ceil((length - crop) / stride) + 1
    return sorted({min(i * stride, length - crop) for i in range(count)})


def sliding_window_logits(model: nn.Module, images: torch.Tensor, crop: tuple[int, int], stride: tuple[int, int]
                          ) -> torch.Tensor:
    """Logits (B, K, H, W) averaged over overlapping `crop` windows; an image smaller than the crop is padded
    (zeros: the normalised mean) and the padding cropped off again."""
    batch, _, height, width = images.shape
    pad_h, pad_w = max(crop[0] - height, 0), max(crop[1] - width, 0)
    padded = F.pad(images, (0, pad_w, 0, pad_h)) if pad_h or pad_w else images
    full_h, full_w = padded.shape[-2:]
    logits = None
    counts = torch.zeros(1, 1, full_h, full_w, device=images.device)
    for top in window_starts(full_h, crop[0], stride[0]):
        for left in window_starts(full_w, crop[1], stride[1]):
            window = padded[..., top:top + crop[0], left:left + crop[1]]
            out = model(window)["out"].float()
            if logits is None:
                logits = torch.zeros(batch, out.shape[1], full_h, full_w, device=images.device)
            logits[..., top:top + crop[0], left:left + crop[1]] += out
            counts[..., top:top + crop[0], left:left + crop[1]] += 1
    return (logits / counts)[..., :height, :width]
