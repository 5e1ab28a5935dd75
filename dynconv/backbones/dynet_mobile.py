"""Dy-mobile (DyNet, Zhang et al. 2020, Sec. 3.3, Figure 4(a)): torchvision's MobileNetV2 network definition
with its inverted residual block replaced by the dy-mobile block. With op=static it is Fix-mobile (Table 4).

The network (stem, head, classifier, block layout, strides, repeats) is torchvision's `MobileNetV2`, built
with `block=DyMobileBlock` and the block widths rounded up to multiples of 6; only the block is written here.
From the text ("we replace the original MobileNetV2 block with our dy-mobile block"):

- No expansion: all three convolutions have C_out channels: 1x1 C_in -> C_out, 3x3 C_out -> C_out with
  groups = C_out / 6, 1x1 C_out -> C_out (Eq. 3 counts C^2HW + 6CHW*3^2 + C^2HW).
- C_out is enlarged to a multiple of 6: 16, 24, 32, 64, 96, 160, 320 -> 18, 24, 36, 66, 96, 162, 324.

Assumptions (Figure 4(a) is not in the text):
- Every block is a dy-mobile block with three convolutions, the first one (MobileNetV2's t = 1 block, 32 -> 18)
  too. With it Fix-mobile is 2.18M / 130.5M MACs (Table 4: 2.16M / 129M).
- MobileNetV2's activations are kept: ReLU6 after the first two convolutions, the last one linear, and the
  residual connection where the stride is 1 and C_in == C_out.
- The stem (32 channels), the head (1x1 to 1280) and the classifier (dropout 0.2) are MobileNetV2's and stay
  static under op=dynet: the parameter slope of Tables 5/6 (0.95M per unit of g_t on a 1.69M static base)
  leaves exactly the stem, head and classifier static.
- Its coefficient module is one FC on the block's input (Figure 3): `dynet_reduction = 0`.
"""

from __future__ import annotations

import functools

import torch
import torch.nn as nn
import torchvision.models as tvm
from torchvision.ops.misc import Conv2dNormActivation

from dynconv.backbones.backbone import Backbone, PlaceRule
from dynconv.backbones.dynet_channels import dy_mobile_widths

# MobileNetV2 (1.0): (t, c, n, s) per stage; t is ignored by the dy-mobile block (no expansion).
MOBILENETV2_SETTING = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                       (6, 320, 1, 1)]
GROUP_SIZE = 6  # channels per group of the dynamic depthwise layer: groups = C_out / 6


class DyMobileBlock(nn.Module):
    """1x1 C_in->C_out, 3x3 C_out->C_out (groups C_out/group_size), 1x1 C_out->C_out (linear), + identity."""

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: float = 1, norm_layer=nn.BatchNorm2d,
                 group_size: int = GROUP_SIZE):
        super().__init__()
        self.use_res_connect = stride == 1 and inp == oup
        self.conv = nn.Sequential(
            Conv2dNormActivation(inp, oup, 1, norm_layer=norm_layer, activation_layer=nn.ReLU6),
            Conv2dNormActivation(oup, oup, 3, stride, groups=oup // group_size, norm_layer=norm_layer,
                                 activation_layer=nn.ReLU6),
            Conv2dNormActivation(oup, oup, 1, norm_layer=norm_layer, activation_layer=None),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        return x + out if self.use_res_connect else out


def _rules(setting) -> list[PlaceRule]:
    """features.0 is the stem, features.1.. the blocks (one rule per MobileNetV2 stage), then the head."""
    rules, index = [PlaceRule(r"features\.0\.0", "stem")], 1
    for stage, (_, _, repeats, _) in enumerate(setting, start=1):
        blocks = "|".join(str(i) for i in range(index, index + repeats))
        rules.append(PlaceRule(rf"(features\.(?:{blocks}))\.conv\.\d\.0", "auto", stage=stage, block_group=1))
        index += repeats
    rules += [PlaceRule(rf"features\.{index}\.0", "head", stage=len(setting) + 1),
              PlaceRule(r"classifier\.1", "classifier", stage=len(setting) + 1)]
    return rules


def _feature_indices(net: tvm.MobileNetV2) -> tuple[list[int], list[int], list[int]]:
    """The last module of `features` at each stride 4..32 (stride 32: the head), its channels and strides."""
    last, stride, channels = {}, 1, {}
    for index, module in enumerate(net.features):
        convs = [m for m in module.modules() if isinstance(m, nn.Conv2d)]
        for conv in convs:
            stride *= conv.stride[0]
        last[stride] = index
        channels[index] = convs[-1].out_channels
    strides = [s for s in (4, 8, 16, 32) if s in last]
    indices = [last[s] for s in strides]
    return indices, [channels[i] for i in indices], strides


def build_dy_mobile(name: str, num_classes: int = 1000, drop_rate: float | None = None,
                    group_size: int = GROUP_SIZE) -> Backbone:
    widths = dy_mobile_widths([c for _, c, _, _ in MOBILENETV2_SETTING], group_size)
    setting = [[t, c, n, s] for (t, _, n, s), c in zip(MOBILENETV2_SETTING, widths)]
    # round_nearest=1: the widths are already multiples of 6 (torchvision's rounding to 8 would undo that).
    net = tvm.MobileNetV2(num_classes=num_classes, inverted_residual_setting=setting, round_nearest=1,
                          block=functools.partial(DyMobileBlock, group_size=group_size),
                          dropout=0.2 if drop_rate is None else drop_rate)
    indices, channels, strides = _feature_indices(net)

    def features(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
        maps = []
        for index, module in enumerate(model.features[: indices[-1] + 1]):
            x = module(x)
            if index in indices:
                maps.append(x)
        return maps

    # dynet_reduction: one FC (Figure 3), what op=dynet's `reduction: auto` takes.
    return Backbone(name, net, features, channels, strides, family="dynet_mobile", rules=_rules(MOBILENETV2_SETTING),
                    dynet_reduction=0.0)
