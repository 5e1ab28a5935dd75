"""Architecture variants of timm's ResNet family that the papers' tables count or train (docs/training.md).

- `norm_layer=groupnorm` (with `norm_groups`, 32): every BatchNorm2d of the network becomes GroupNorm(32, C)
  (Wu & He, ECCV 2018), the ResNet50-GN of Weight Excitation's Table 4. timm's ResNet takes the norm layer as an
  argument (its `resnet50_gn` is this network), so the stem, every block and the projection shortcuts change
  together. Operators are unaffected: the BatchNorm1d inside their attention branches (ODConv, SK, KW) belongs
  to the operator, not to the backbone.
- `stride_in_1x1=true`: ResNet v1 (He et al., CVPR 2016; the Caffe models), whose downsampling bottleneck
  strides its first 1x1 convolution, instead of timm's (and torchvision's) "v1.5", which strides the 3x3. The
  name is Detectron's (`MODEL.RESNETS.STRIDE_IN_1X1`) for the same switch. The 1x1 then runs on the strided map:
  ResNet50 costs 3.858 GMACs at 224 px instead of 4.089 (the 3.86 G of SENet's, CBAM's, Weight Excitation's
  and WeightNet's tables). Parameters are the same; only stride values move, so every operator converts the
  layers as it would in v1.5 and keeps each layer's stride.
"""

from __future__ import annotations

from functools import partial

import torch.nn as nn
from timm.layers import GroupNorm
from timm.models.resnet import Bottleneck

NORM_LAYERS = ("batchnorm", "groupnorm")


def _group_norm(num_channels: int, num_groups: int, **kwargs) -> nn.Module:
    if num_channels % num_groups:
        raise ValueError(f"backbone.norm_groups={num_groups} is invalid with backbone.norm_layer=groupnorm: a "
                         f"layer has {num_channels} channels; allowed values: the divisors of every normalised "
                         f"channel count (32 for the ResNets)")
    return GroupNorm(num_channels, num_groups=num_groups, **kwargs)


def norm_layer_argument(norm_layer: str, norm_groups: int) -> dict:
    """timm's `norm_layer` argument for the choice: none for batchnorm (timm's default), GroupNorm(groups, C) for
    groupnorm (timm's GroupNorm takes the channels first, as BatchNorm2d, which is how timm's ResNet calls it)."""
    if norm_layer == "batchnorm":
        return {}
    return {"norm_layer": partial(_group_norm, num_groups=norm_groups)}


def move_stride_to_1x1(net: nn.Module, backbone: str) -> int:
    """ResNet v1: in every bottleneck whose 3x3 is strided, the 1x1 before it takes the stride instead. Returns
    the number of blocks changed (3 in ResNet50/152: the first block of layer2..layer4)."""
    blocks = [block for block in net.modules() if isinstance(block, Bottleneck)]
    if not blocks:
        raise ValueError(f"backbone.stride_in_1x1=true is invalid for {backbone}: it has no bottleneck blocks (no 1x1 "
                         "convolution before the strided 3x3); allowed values: false")
    moved = 0
    for block in blocks:
        stride = block.conv2.stride
        if stride != (1, 1):
            block.conv1.stride, block.conv2.stride = stride, (1, 1)
            moved += 1
    return moved
