"""ShuffleNetV2 at torchvision's widths (x0_5 .. x2_0), from torchvision's definition."""

from __future__ import annotations

import torch
import torch.nn as nn
import torchvision.models as tvm

from dynconv.backbones.backbone import BACKBONES, Backbone, PlaceRule

SHUFFLENET_RULES = [
    PlaceRule(r"conv1\.0", "stem"),
    # stage2..stage4 are the paper's stages 1..3; branch1 is the downsampling unit's left branch.
    PlaceRule(r"(stage(\d)\.\d+)\.branch[12]\.\d", "auto", stage="g2", stage_offset=-1, block_group=1),
    PlaceRule(r"conv5\.0", "head", stage=4),
    PlaceRule(r"fc(\.1)?", "classifier", stage=4),
]


def shufflenet_features(net: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Strides 4, 8, 16, 32: after the stem's max-pool, stage2, stage3 and conv5 (after stage4)."""
    c2 = net.maxpool(net.conv1(x))
    c3 = net.stage2(c2)
    c4 = net.stage3(c3)
    c5 = net.conv5(net.stage4(c4))
    return [c2, c3, c4, c5]


def shufflenet_backbone(name: str, net: tvm.ShuffleNetV2) -> Backbone:
    channels = [net.conv1[0].out_channels, net.stage2[-1].branch2[-3].out_channels * 2,
                net.stage3[-1].branch2[-3].out_channels * 2, net.conv5[0].out_channels]
    return Backbone(name, net, SHUFFLENET_RULES, shufflenet_features, channels, [4, 8, 16, 32])


def _register(name: str, factory) -> None:
    def build(num_classes: int = 1000, image_size: int = 224, drop_rate=None, drop_path_rate=None) -> Backbone:
        net = factory(weights=None, num_classes=num_classes)
        if drop_rate:
            net.fc = nn.Sequential(nn.Dropout(drop_rate), net.fc)
        return shufflenet_backbone(name, net)

    BACKBONES.register(name)(build)


_register("shufflenetv2_x0_5", tvm.shufflenet_v2_x0_5)
_register("shufflenetv2_x1_0", tvm.shufflenet_v2_x1_0)
_register("shufflenetv2_x1_5", tvm.shufflenet_v2_x1_5)
_register("shufflenetv2_x2_0", tvm.shufflenet_v2_x2_0)
