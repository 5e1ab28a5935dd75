"""Transforms v2 for detection samples: the image, its boxes and its masks move together.

Why so little: resizing belongs to the model (its GeneralizedRCNNTransform samples the training scale per
image and maps predictions back to the original pixels), and so does normalisation.  The data pipeline
only flips (training) and turns the PIL image into a float tensor in [0, 1].
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torchvision.transforms import v2

__all__ = ["build_detection_transforms"]


def build_detection_transforms(data_cfg: Mapping[str, Any], train: bool) -> v2.Compose:
    """Training: horizontal flip with p=``data.hflip`` on image+boxes+masks, to float, sanitize boxes.

    Evaluation: to float only.  The flip draws from the global torch RNG, which SeededDataset reseeds per
    sample, so a resumed run sees the same flips.
    """
    to_float = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True)]  # a plain dtype converts images only
    if not train:
        return v2.Compose(to_float)
    hflip = float(data_cfg.get("hflip", 0.5))
    if not 0.0 <= hflip <= 1.0:
        raise ValueError(f"data.hflip must be a probability in [0, 1], got {hflip}")
    steps: list = [v2.RandomHorizontalFlip(p=hflip)] if hflip > 0 else []
    # The default labels_getter finds target["labels"]; Mask entries are filtered with the same
    # keep-mask as the boxes, so masks stay aligned with boxes and labels.
    return v2.Compose(steps + to_float + [v2.SanitizeBoundingBoxes()])
