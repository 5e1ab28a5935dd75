"""`attn=bam`: Bottleneck Attention Module (Park, Woo, Lee, Kweon, BMVC 2018); timm has none, so it is here.

The module (BAM paper, Sec. 3; its equation numbers are not cited: the text is not in shared/papers):

    F' = F + F . M(F),          M(F) = sigmoid(Mc(F) + Ms(F))           (Mc: C x 1 x 1, Ms: 1 x H x W, broadcast)
    Mc(F) = BN(W1 ReLU(W0 AvgPool(F) + b0) + b1),                      W0: C -> C/r, W1: C/r -> C
    Ms(F) = BN(f3_1x1(f2_3x3(f1_3x3(f0_1x1(F)))))                      f0: C -> C/r, f1, f2 dilated by d, f3: -> 1

with BN + ReLU after f0, f1, f2 (the paper's spatial attention branch). r = 16, d = 4 (the paper's choices).
The convolutions followed by a BN have no bias (the BN's shift replaces it). Placed at the end of the
stride-4, -8 and -16 stages (the network's "bottlenecks", sites.py), as the paper puts three BAMs in ResNet50.

The BN of the channel branch sees one value per channel and sample: `BatchSafeBatchNorm1d` (dynconv/layers/batch_safe_norm.py)
normalises a batch of one with its running statistics, where nn.BatchNorm1d raises in train mode.

Parameter / MAC parity (1000 classes, 224): ResNet50 + BAM 25,918,126 parameters (WE Table 1: 25.9M) and
+82.1M MACs over ResNet50: 3.940 G on ResNet50 v1, the model WE Table 1's GFLOPs column counts (3.86 -> 3.94);
timm's ResNet50 is v1.5: 4.089 -> 4.171 G.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from dynconv.attention import ATTENTIONS
from dynconv.attention.addon import AddOn
from dynconv.attention.sites import squeeze_width
from dynconv.layers.batch_safe_norm import BatchSafeBatchNorm1d


class ChannelGate(nn.Module):
    """Mc(F): GAP -> FC(C -> C/r) -> ReLU -> FC(C/r -> C) -> BN, as a (B, C, 1, 1) map."""

    def __init__(self, channels: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(channels, hidden)
        self.fc2 = nn.Linear(hidden, channels)
        self.bn = BatchSafeBatchNorm1d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.bn(self.fc2(torch.relu(self.fc1(x.mean(dim=(2, 3))))))
        return gate[:, :, None, None]


def _conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int, dilation: int = 1) -> list[nn.Module]:
    padding = dilation * (kernel_size - 1) // 2  # keeps H x W, so Ms matches F
    return [nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding, dilation=dilation, bias=False),
            nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True)]


class SpatialGate(nn.Sequential):
    """Ms(F): 1x1 reduce -> two dilated 3x3 -> 1x1 to one channel -> BN, a (B, 1, H, W) map."""

    def __init__(self, channels: int, hidden: int, dilation: int):
        super().__init__(
            *_conv_bn_relu(channels, hidden, 1),
            *_conv_bn_relu(hidden, hidden, 3, dilation),
            *_conv_bn_relu(hidden, hidden, 3, dilation),
            nn.Conv2d(hidden, 1, 1, bias=False),
            nn.BatchNorm2d(1),
        )


class BAM(nn.Module):
    """F' = F + F . sigmoid(Mc(F) + Ms(F)) (the paper's attention and residual refinement)."""

    def __init__(self, channels: int, reduction: int = 16, dilation: int = 4):
        super().__init__()
        hidden = squeeze_width(channels, reduction)
        self.channel = ChannelGate(channels, hidden)
        self.spatial = SpatialGate(channels, hidden, dilation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        attention = torch.sigmoid(self.channel(x) + self.spatial(x))
        return x + x * attention


def _read(knobs):
    return {"reduction": knobs.integer("reduction"), "dilation": knobs.integer("dilation")}


BAM_ADDON = ATTENTIONS.register("bam")(AddOn(
    name="bam",
    knobs=("reduction", "dilation"),
    read=_read,
    kind="stages",
    make=lambda site, knobs: BAM(site.channels, knobs["reduction"], knobs["dilation"]),
))
