"""Where a feature-attention module goes in each backbone family: one small function per family and kind.

Two kinds of site, as the papers place their modules:

- "blocks": inside every residual block, on the block's last feature map before the residual add, as SE (Hu et
  al., CVPR 2018), ECA (Wang et al., CVPR 2020) and CBAM (Woo et al., ECCV 2018) integrate into a ResNet block.
- "stages": at the end of the stride-4, -8 and -16 stages, i.e. at the network's "bottlenecks" right before
  each spatial downsampling, where BAM (Park et al., BMVC 2018) goes: three BAMs in an ImageNet ResNet.

Families (the `Backbone.family` a backbone declares; anything else is refused with the list of backbones that
fit):

- timm ResNet / ResNeXt / Wide-ResNet: the `se` slot of BasicBlock / Bottleneck, which timm's forward applies
  after the last BN and before the residual add (exactly timm's `seresnet*`). Stages: layer1..layer3.
- timm EfficientNet-family (MobileNetV2, MobileNetV3): the `se` slot of InvertedResidual /
  DepthwiseSeparableConv, on the expanded (mid) channels after the depthwise conv. The squeeze width is
  computed from the block's *input* channels, timm's EfficientNet-builder convention (`se_from_exp=False`,
  as MnasNet/EfficientNet define `se_ratio`); this also gives the WE paper's MobileNetV2-SE 3.6M (Table 1).
  MobileNetV3 blocks that already have the architecture's own SE keep it, unchanged and alone (it is part of
  the searched architecture; replacing it would remove parameters, stacking a second attention behind it would
  change that design); the add-on fills only the blocks whose slot is empty (any attn, the summary line counts
  the kept ones). Stages: the `blocks.N` feature stages at strides 4, 8, 16 (timm `feature_info`).
- torchvision ShuffleNetV2: appended to the end of `branch2` of every unit, on the branch's output channels
  (the features that are concatenated and shuffled; SE placement of ShuffleNetV2+ / WeightNet's SE rows).
  Stages: stage2 and stage3 (strides 8, 16); stride 4 is only the stem there, which BAM does not take.

ConvNeXt and DeiT have no such slot: their blocks end in a layer-scaled MLP (no BN, no `se`) and the papers
above define no placement for them, so they are refused rather than given an invented one.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
from timm.models.resnet import BasicBlock, Bottleneck

from dynconv.attention.errors import AttentionConfigError
from dynconv.backbones import BACKBONES, Backbone

SLOT = "attn"  # child name for modules appended to an nn.Sequential (no `se` slot of the library's own)


@dataclass(frozen=True)
class Site:
    name: str  # qualified name (in backbone.net) of the block or stage that receives the module
    channels: int  # channels of the feature map the module reweights
    squeeze_from: int  # channels the reduction ratio r divides (hidden width = squeeze_from // r)
    install: Callable[[nn.Module], None]
    own_se: bool = False  # the block already holds the backbone's own SE module (kept)


def squeeze_width(channels: int, reduction: int) -> int:
    """C // r as SENet defines the bottleneck of its excitation MLP, with at least one unit."""
    return max(1, channels // reduction)


def _set(parent: nn.Module, attr: str) -> Callable[[nn.Module], None]:
    return lambda module: setattr(parent, attr, module)


def _append(sequential: nn.Sequential) -> Callable[[nn.Module], None]:
    return lambda module: sequential.add_module(SLOT, module)


def _batchnorms(module: nn.Module) -> list[nn.BatchNorm2d]:
    # Direct children only: BNs inside converted (dynamic) layers or existing SE modules are not the block's.
    return [child for child in module.children() if isinstance(child, nn.BatchNorm2d)]


# ---------------------------------------------------------------------------------------------- timm ResNet
def _resnet_blocks(net: nn.Module) -> list[Site]:
    sites = []
    for name, block in net.named_modules():
        if isinstance(block, (BasicBlock, Bottleneck)):
            norm = block.bn3 if isinstance(block, Bottleneck) else block.bn2
            # GroupNorm (backbone.norm_layer=groupnorm) names its width num_channels, BatchNorm num_features.
            channels = getattr(norm, "num_features", None) or norm.num_channels
            sites.append(Site(name, channels, channels, _set(block, "se"), own_se=block.se is not None))
    return sites


# ------------------------------------------------------------------------------------ timm EfficientNet-family
def _inverted_residual_blocks(net: nn.Module) -> list[Site]:
    sites = []
    channels = net.bn1.num_features  # the stem's output is the first block's input
    for stage_index, stage in enumerate(net.blocks):
        for index, block in enumerate(stage):
            norms = _batchnorms(block)
            if hasattr(block, "se"):
                children = list(block.children())
                mid = [bn for bn in norms if children.index(bn) < children.index(block.se)][-1]
                own = not isinstance(block.se, nn.Identity)
                sites.append(Site(f"blocks.{stage_index}.{index}", mid.num_features, channels, _set(block, "se"), own))
            channels = norms[-1].num_features
    return sites


def _timm_stages(net: nn.Module) -> list[Site]:
    """The last stage of blocks at strides 4, 8 and 16, from timm's own feature metadata (none for a network of
    the family that timm did not build: ResNeXt-29 uses torchvision's blocks)."""
    sites = []
    for info in getattr(net, "feature_info", []):
        stage = net.get_submodule(info["module"])
        if info["reduction"] in (4, 8, 16) and isinstance(stage, nn.Sequential):
            sites.append(Site(info["module"], info["num_chs"], info["num_chs"], _append(stage)))
    return sites


# ------------------------------------------------------------------------------------ torchvision ShuffleNetV2
def _shufflenet_blocks(net: nn.Module) -> list[Site]:
    sites = []
    for stage_name in ("stage2", "stage3", "stage4"):
        for index, unit in enumerate(getattr(net, stage_name)):
            channels = _batchnorms(unit.branch2)[-1].num_features
            sites.append(Site(f"{stage_name}.{index}.branch2", channels, channels, _append(unit.branch2)))
    return sites


def _shufflenet_stages(net: nn.Module) -> list[Site]:
    sites = []
    for stage_name in ("stage2", "stage3"):
        stage = getattr(net, stage_name)
        channels = 2 * _batchnorms(stage[-1].branch2)[-1].num_features  # both halves are concatenated
        sites.append(Site(stage_name, channels, channels, _append(stage)))
    return sites


@dataclass(frozen=True)
class FamilySites:
    blocks: Callable[[nn.Module], list[Site]]
    stages: Callable[[nn.Module], list[Site]]


# By the family a backbone declares (`Backbone.family`); a family not listed has no sites.
FAMILY_SITES = {
    "resnet": FamilySites(_resnet_blocks, _timm_stages),
    "mobilenetv2": FamilySites(_inverted_residual_blocks, _timm_stages),
    "mobilenetv3": FamilySites(_inverted_residual_blocks, _timm_stages),
    "shufflenetv2": FamilySites(_shufflenet_blocks, _shufflenet_stages),
}


def supported_backbones() -> list[str]:
    """Registered backbones that have sites (built on the meta device: no memory, no init cost)."""
    return list(_supported(tuple(BACKBONES.names())))


@functools.lru_cache(maxsize=None)
def _supported(names: tuple[str, ...]) -> tuple[str, ...]:
    from dynconv.backbones.timm_any import BY_MODEL_NAME

    supported = []
    for name in names:
        if name in BY_MODEL_NAME:  # backbone=timm: any network, of the generic family, which has no sites
            continue
        with torch.device("meta"):
            backbone = BACKBONES.get(name)(num_classes=10, image_size=32)
        family = FAMILY_SITES.get(backbone.family)
        if family is not None and family.blocks(backbone.net):
            supported.append(name)
    return tuple(supported)


def find_sites(backbone: Backbone, kind: str, attn_name: str) -> list[Site]:
    """The sites of `kind` ("blocks" or "stages"); AttentionConfigError if the backbone has none."""
    family = FAMILY_SITES.get(backbone.family)
    sites = getattr(family, kind)(backbone.net) if family is not None else []
    if not sites:
        raise AttentionConfigError(
            f"attn.name={attn_name!r} is not supported by backbone.name={backbone.name!r} "
            f"({type(backbone.net).__name__} has no block slot for feature attention); backbones that support "
            f"it: {', '.join(supported_backbones())} (or keep attn=none)"
        )
    return sites
