"""Dy-ResNet18 / Dy-ResNet50 (DyNet, Zhang et al. 2020, Sec. 3.3, Figures 4(c), 4(d)): timm's ResNet18 / ResNet50
with half the output channels in every residual block.

"In Dy-ResNet18 and DyResNet50, we simply reduce half of the output channels for dynamic convolution layers
of each residual block": every convolution of every block (and so each block's output, which the next block
reads) has half its channels: timm's `ResNet(channels=(32, 64, 128, 256))` (BasicBlock 32..256, Bottleneck
32/128 .. 256/1024). The coefficient module is two linear layers, C_in -> C_in/4 -> coefficients
(`dynet_reduction = 0.25`).

Assumptions (Figures 4(c), 4(d) are not in the text):
- The stem keeps ResNet's 64 channels (it is not in a residual block), so layer1's first block gets a 1x1
  projection shortcut 64 -> 32 (Dy-ResNet18) as timm builds it. Halving the stem too would give 535M MACs for
  Dy-ResNet18 (Table 1: 567M); keeping it gives 594M. The paper's tool counts ResNets ~4.6% below
  `count_macs` (its ResNet18 is 1730M, ResNet50 3890M; timm's are 1814M / 4089M), which is the remaining gap.
- Shortcut projections stay static under op=dynet (role "downsample"): Table 6's Dy-ResNet18 parameters
  (3.04M at g_t = 1, 16.6M at g_t = 6) are matched that way (17.3M with dynamic shortcuts at g_t = 6: +6%).
- timm's ResNet is v1.5 (stride on the 3x3 of a bottleneck), as the paper's 3890M ResNet50 baseline implies.
"""

from __future__ import annotations

from dynconv.backbones.backbone import Backbone
from dynconv.backbones.timm_backbones import timm_backbone

HALF_CHANNELS = (32, 64, 128, 256)  # ResNet's (64, 128, 256, 512) halved


def build_dy_resnet(name: str, timm_name: str, num_classes: int = 1000, image_size: int = 224, drop_rate=None,
                    drop_path_rate=None, output_stride: int | None = None) -> Backbone:
    """`output_stride` 8 dilates layer3 and layer4 (DyNet Table 3's dilated FCN on Dy-ResNet50)."""
    # dynet_reduction: two linear layers, C_in/4 hidden (Sec. 3.3).
    return timm_backbone(name, timm_name, "resnet", num_classes=num_classes, image_size=image_size,
                         channels=HALF_CHANNELS, drop_rate=drop_rate, drop_path_rate=drop_path_rate,
                         dynet_reduction=0.25, output_stride=output_stride)
