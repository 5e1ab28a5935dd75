"""Backbone + FPN: the multi-scale features torchvision's RetinaNet and Mask R-CNN consume.

Any backbone x operator x attn composition works: the neck only calls `Backbone.forward_features` (C2..C5,
keyed by log2 of the stride) and sizes the FPN from `feature_channels` / `feature_strides`.

- RetinaNet (Lin et al. 2017, Sec. 4; WeightNet Sec. 4.2): C3-C5 -> P3-P5, plus P6 = 3x3/2 conv on C5 and
  P7 = 3x3/2 conv on ReLU(P6) (`extra="p6p7"`).
- Mask R-CNN (He et al. 2017, FPN variant; KernelWarehouse Appendix A.1.2): C2-C5 -> P2-P5, plus P6 = max-pool
  of P5 for the RPN only (`extra="maxpool"`).

The outputs are keyed "P2".."P7" so the RoI poolers can name the levels they read.
"""

from __future__ import annotations

import logging
from collections import OrderedDict

import torch
import torch.nn as nn
from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool, LastLevelP6P7

from dynconv.backbones import Backbone
from dynconv.backbones.trim import strip_classifier, strip_unused

log = logging.getLogger("dynconv")

EXTRA_BLOCKS = ("p6p7", "maxpool", "none")


class LastLevelP6P7FromC5(LastLevelP6P7):
    """torchvision's P6/P7 block, always fed with C5 (the RetinaNet paper's choice).

    torchvision switches to P5 whenever C5 happens to have `out_channels` channels; here the input does not
    depend on a width coincidence.
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(in_channels, out_channels)
        self.use_P5 = False


def available_levels(backbone: Backbone) -> dict[str, int]:
    """{"C2": channels, ...} of the maps `forward_features` returns."""
    return {f"C{stride.bit_length() - 1}": channels
            for stride, channels in zip(backbone.feature_strides, backbone.feature_channels)}


def require_levels(backbone: Backbone, in_levels: list[str]) -> dict[str, int]:
    """`available_levels`, or a ValueError naming the backbone, its levels and the missing ones."""
    levels = available_levels(backbone)
    missing = [level for level in in_levels if level not in levels]
    if missing:
        raise ValueError(f"backbone {backbone.name} gives feature levels {sorted(levels) or 'none'}; the "
                         f"detection neck needs {list(in_levels)} (missing {missing}): use a backbone with "
                         "multi-scale features (ResNet, MobileNet, ShuffleNet, ConvNeXt)")
    return levels


class BackboneWithFPN(nn.Module):
    """`forward(images) -> OrderedDict(P_l: map)` over consecutive backbone levels, with `out_channels`.

    Takes ownership of the backbone: its classifier and the modules feature extraction never runs are removed
    (`strip_classifier`, `strip_unused`).
    """

    def __init__(self, backbone: Backbone, in_levels: list[str], out_channels: int, extra: str = "none"):
        super().__init__()
        levels = require_levels(backbone, in_levels)
        numbers = [int(level[1:]) for level in in_levels]
        if numbers != list(range(numbers[0], numbers[0] + len(numbers))):
            raise ValueError(f"in_levels must be consecutive, got {list(in_levels)}")
        if extra not in EXTRA_BLOCKS:
            raise ValueError(f"extra={extra!r}: allowed {', '.join(EXTRA_BLOCKS)}")
        self.in_levels = list(in_levels)
        self.out_channels = out_channels  # torchvision's detectors size their heads from this
        classifier = strip_classifier(backbone)
        unused = strip_unused(backbone)
        log.info("detection neck on %s: removed the classifier %s and the modules feature extraction never "
                 "runs: %s", backbone.name, classifier or "none", unused or "none")
        self.body = backbone
        extra_block = None
        if extra == "p6p7":
            extra_block = LastLevelP6P7FromC5(levels[in_levels[-1]], out_channels)
        elif extra == "maxpool":
            extra_block = LastLevelMaxPool()
        self.fpn = FeaturePyramidNetwork([levels[level] for level in in_levels], out_channels, extra_block)
        extras = {"p6p7": 2, "maxpool": 1, "none": 0}[extra]
        self.out_levels = [f"P{n}" for n in range(numbers[0], numbers[-1] + 1 + extras)]

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        features = self.body.forward_features(x)
        pyramid = self.fpn(OrderedDict((level, features[level]) for level in self.in_levels))
        return OrderedDict(zip(self.out_levels, pyramid.values()))
