"""ShuffleNetV2 from torchvision's definition: torchvision's widths (`shufflenetv2_x*`) and the WeightNet
paper's widths (`shufflenetv2_wn_x*`).

WeightNet (Ma et al., ECCV 2020, Sec. 4.1) "slightly adjust[s] the number of channels for ShuffleNetV2 1x and
2x" so that channels divide by G: stage widths 48/96/192 (0.5x), 112/224/448 (1.0x), 176/352/704 (1.5x) and
248/496/992 (2.0x), last conv 1024, and dropout 0.2 before the classifier of the 2.0x model ("models with more
than 3M parameters", per the reference release). torchvision's `ShuffleNetV2` takes the widths as arguments,
so both families are the same network definition; nothing is retyped.

Measured at 224x224, 1000 classes (WeightNet Table 2 in brackets): 0.5x 1,366,792 params / 40.5M MACs
(1.4M / 41M); 1.0x 2,210,952 / 136.8M (2.2M / 138M); 1.5x 3,503,624 / 295.8M (3.5M / 299M); 2.0x 5,493,992 /
549.4M (5.5M / 557M). The paper's FLOPs run 1-1.4% above the convolution/linear MACs counted here.
"""

from __future__ import annotations

import functools

import torch
import torch.nn as nn
import torchvision.models as tvm

from dynconv.backbones.backbone import BACKBONES, FAMILY_RULES, Backbone, PlaceRule

# A block is the unit whose layers share one input (routing / GAP sharing): the whole unit for the
# downsampling unit (both branches read x), branch2 alone for a basic unit (it reads half of the channels;
# the other half passes through untouched).
SHUFFLENET_RULES = [
    PlaceRule(r"conv1\.0", "stem"),
    # stage2..stage4 are the paper's stages 1..3; branch1 is the downsampling unit's left branch.
    PlaceRule(r"(stage(\d)\.0)\.branch[12]\.\d", "auto", stage="g2", stage_offset=-1, block_group=1),
    PlaceRule(r"(stage(\d)\.\d+\.branch2)\.\d", "auto", stage="g2", stage_offset=-1, block_group=1),
    PlaceRule(r"conv5\.0", "head", stage=4),
    PlaceRule(r"fc(\.1)?", "classifier", stage=4),
    # Feature attention (dynconv/attention): appended to the end of branch2 (se, eca, cbam) or of a stage (bam).
    PlaceRule(r"(stage(\d)\.0)\.branch2\.attn\..*", "se", stage="g2", stage_offset=-1, block_group=1),
    PlaceRule(r"(stage(\d)\.\d+\.branch2)\.attn\..*", "se", stage="g2", stage_offset=-1, block_group=1),
    PlaceRule(r"(stage(\d))\.attn\..*", "se", stage="g2", stage_offset=-1, block_group=1),
]

FAMILY_RULES["shufflenetv2"] = SHUFFLENET_RULES

STAGE_REPEATS = [4, 8, 4]
WEIGHTNET_WIDTHS = {  # stem, stage2, stage3, stage4, conv5
    "x0_5": [24, 48, 96, 192, 1024],
    "x1_0": [24, 112, 224, 448, 1024],
    "x1_5": [24, 176, 352, 704, 1024],
    "x2_0": [24, 248, 496, 992, 1024],
}
WEIGHTNET_DROPOUT = {"x2_0": 0.2}


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
    return Backbone(name, net, shufflenet_features, channels, [4, 8, 16, 32], family="shufflenetv2")


def _register(name: str, factory, default_dropout: float = 0.0) -> None:
    def build(num_classes: int = 1000, image_size: int = 224, drop_rate=None, drop_path_rate=None) -> Backbone:
        net = factory(num_classes=num_classes)
        rate = default_dropout if drop_rate is None else drop_rate
        if rate:
            net.fc = nn.Sequential(nn.Dropout(rate), net.fc)
        return shufflenet_backbone(name, net)

    BACKBONES.register(name)(build)


for _width, _factory in (("x0_5", tvm.shufflenet_v2_x0_5), ("x1_0", tvm.shufflenet_v2_x1_0),
                         ("x1_5", tvm.shufflenet_v2_x1_5), ("x2_0", tvm.shufflenet_v2_x2_0)):
    _register(f"shufflenetv2_{_width}", functools.partial(_factory, weights=None))
for _width, _widths in WEIGHTNET_WIDTHS.items():
    _register(f"shufflenetv2_wn_{_width}", functools.partial(tvm.ShuffleNetV2, STAGE_REPEATS, _widths),
              WEIGHTNET_DROPOUT.get(_width, 0.0))
