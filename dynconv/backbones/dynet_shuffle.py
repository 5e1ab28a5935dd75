"""Dy-shuffle (DyNet, Zhang et al. 2020, Sec. 3.3, Figure 4(b)): torchvision's ShuffleNetV2 network definition
with a 3:1 basic unit. With op=static it is Fix-shuffle (Table 4).

The network (stem, max-pool, three stages of 4/8/4 units, conv5, classifier) is built by torchvision's
`ShuffleNetV2` with `inverted_residual=DyShuffleUnit`; the downsampling unit is torchvision's own. From the
text: "we split channels into left-branch and right-branch with ratio 3 : 1, thus we reduce the 75%
computation cost for two dynamic pointwise convolution", the right branch (1x1, depthwise 3x3, 1x1) is
dynamic with its coefficients from the right branch's input, and "we adjust the parameter groups in dynamic
depthwise convolution to keep the FLOPs unchanged": the right branch has C/4 channels instead of
ShuffleNetV2's C/2, so its 3x3 takes 2 channels per group (C/8 groups) to keep 9*C/2 MACs per position.

Assumptions (Figure 4(b) is not in the text):
- Only the basic (stride-1) unit is the dy-shuffle unit; the downsampling unit is ShuffleNetV2's (both
  branches C/2, depthwise 3x3), its right branch (branch2) dynamic with coefficients from the unit's input,
  its left branch (branch1) static (role "downsample"). A 3:1 downsampling unit gives 143M MACs for
  Fix-shuffle(1.5), far from Table 4's 171M; this one gives 177M.
- After the concatenation the channels are shuffled in 4 groups (one per quarter of the 3:1 split, so the next
  right branch reads a quarter of each), ShuffleNetV2's 2 groups after a downsampling unit.
- Stage widths are ShuffleNetV2's, rounded up to multiples of 4 * 2 so the right branch splits into groups of
  2: 1.5x keeps 176/352/704; 1.0x's 116 becomes 120 (116/4 = 29 channels cannot take groups of 2).
- Stem (24), conv5 (1024) and the classifier are ShuffleNetV2's and stay static; one FC (`dynet_reduction = 0`).

The network is held in `DyShuffleNet`, not in a `torchvision.models.ShuffleNetV2`: the feature-attention
add-ons (dynconv/attention/sites.py) treat every ShuffleNetV2 as 1:1 split (BAM would get half the channels),
so attention is refused for Dy-shuffle instead of being placed wrongly.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torchvision.models as tvm
from torchvision.models.shufflenetv2 import InvertedResidual, channel_shuffle

from dynconv.backbones.backbone import FAMILY_RULES, Backbone, PlaceRule
from dynconv.backbones.dynet_channels import dy_shuffle_widths
from dynconv.backbones.shufflenet import STAGE_REPEATS, shufflenet_features

GROUP_SIZE = 2  # channels per group of the right branch's 3x3 (C/4 channels, 9*C/2 MACs per position)
SPLIT_QUARTERS = 4  # the 3:1 split: the right branch takes one quarter


class DyShuffleUnit(InvertedResidual):
    """ShuffleNetV2's unit; at stride 1 the dy-shuffle unit: left 3C/4 identity, right C/4 through 1x1, 3x3 with
    `group_size` channels per group, 1x1; concatenated and shuffled in 4 groups."""

    def __init__(self, inp: int, oup: int, stride: int, group_size: int = GROUP_SIZE):
        super().__init__(inp, oup, stride)  # the downsampling unit stays ShuffleNetV2's
        self.split = None
        if stride == 1:
            right = oup // SPLIT_QUARTERS
            self.split = (oup - right, right)
            self.branch2 = nn.Sequential(
                nn.Conv2d(right, right, 1, bias=False), nn.BatchNorm2d(right), nn.ReLU(inplace=True),
                nn.Conv2d(right, right, 3, 1, 1, groups=right // group_size, bias=False), nn.BatchNorm2d(right),
                nn.Conv2d(right, right, 1, bias=False), nn.BatchNorm2d(right), nn.ReLU(inplace=True),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.split is None:
            return super().forward(x)
        left, right = x.split(self.split, dim=1)
        return channel_shuffle(torch.cat((left, self.branch2(right)), dim=1), SPLIT_QUARTERS)


class DyShuffleNet(nn.Module):
    """torchvision's ShuffleNetV2 modules and forward, outside the ShuffleNetV2 class (see the module doc)."""

    def __init__(self, source: tvm.ShuffleNetV2):
        super().__init__()
        for name in ("conv1", "maxpool", "stage2", "stage3", "stage4", "conv5", "fc"):
            setattr(self, name, getattr(source, name))

    forward = tvm.ShuffleNetV2._forward_impl


# A block is the unit whose dynamic layers share one coefficient module: the downsampling unit (its right
# branch reads the unit's input), or a basic unit's right branch (it reads the right quarter only).
DY_SHUFFLE_RULES = [
    PlaceRule(r"conv1\.0", "stem"),
    PlaceRule(r"(stage(\d)\.0)\.branch1\.\d", "downsample", stage="g2", stage_offset=-1, block_group=1),
    PlaceRule(r"(stage(\d)\.0)\.branch2\.\d", "auto", stage="g2", stage_offset=-1, block_group=1),
    PlaceRule(r"(stage(\d)\.\d+\.branch2)\.\d", "auto", stage="g2", stage_offset=-1, block_group=1),
    PlaceRule(r"conv5\.0", "head", stage=4),
    PlaceRule(r"fc(\.1)?", "classifier", stage=4),
]


FAMILY_RULES["dynet_shuffle"] = DY_SHUFFLE_RULES


def build_dy_shuffle(name: str, widths: list[int], num_classes: int = 1000, drop_rate: float | None = None,
                     group_size: int = GROUP_SIZE) -> Backbone:
    """`widths`: ShuffleNetV2's [stem, stage2, stage3, stage4, conv5]; the stages are rounded (module doc)."""
    stages = dy_shuffle_widths(widths[1:4], group_size)
    source = tvm.ShuffleNetV2(STAGE_REPEATS, [widths[0], *stages, widths[4]], num_classes=num_classes,
                              inverted_residual=lambda inp, oup, stride: DyShuffleUnit(inp, oup, stride, group_size))
    net = DyShuffleNet(source)
    if drop_rate:
        net.fc = nn.Sequential(nn.Dropout(drop_rate), net.fc)
    # dynet_reduction: one FC (Figure 3), what op=dynet's `reduction: auto` takes.
    return Backbone(name, net, shufflenet_features, [widths[0], stages[0], stages[1], widths[4]], [4, 8, 16, 32],
                    family="dynet_shuffle", dynet_reduction=0.0)
