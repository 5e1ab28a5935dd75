"""A torchvision/timm network plus what dynconv needs to know about it.

`Backbone` keeps the original network untouched (`self.net`, so its state_dict keys are the library's own)
and adds: its family (declared once; placement, the attention add-ons' sites and KernelWarehouse's layouts key
on it), where each convertible layer sits (role, stage, block) for the conversion pass, `forward_features`, the
multi-scale feature maps (strides 4..32) that detection necks consume, and the modules operators share between
layers (`shared_inputs`, `warehouses`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

from dynconv.registry import Registry


@dataclass(frozen=True)
class Place:
    role: str
    stage: int
    block: str | None
    # Why the layer could not be placed (role "unplaced", the generic placement of a network dynconv did not build:
    # dynconv/backbones/generic_placement.py); every operator then leaves it static with this reason.
    reason: str = ""


@dataclass(frozen=True)
class PlaceRule:
    """`pattern` (a full-match regex over the module name) -> role, stage and block.

    `stage` is an int or the index of a regex group (as "g1") whose integer value plus `stage_offset` is the
    stage; `block` is a regex group index whose match is the block name. `role` may be "auto": pointwise
    for 1x1, depthwise for groups == channels, conv otherwise.
    """

    pattern: str
    role: str
    stage: int | str = 0
    stage_offset: int = 0
    block_group: int | None = None

    def match(self, name: str, module: nn.Module) -> Place | None:
        found = re.fullmatch(self.pattern, name)
        if not found:
            return None
        if isinstance(self.stage, str):
            stage = int(found.group(int(self.stage[1:]))) + self.stage_offset
        else:
            stage = self.stage
        block = found.group(self.block_group) if self.block_group is not None else None
        return Place(infer_role(module) if self.role == "auto" else self.role, stage, block)


def infer_role(module: nn.Module) -> str:
    """`auto` roles: depthwise for groups == channels, pointwise for a 1 x 1 (x 1) kernel, conv otherwise; the same
    for a 2-D and a 3-D convolution (R3D's 1 x 1 x 1 shortcut projections are pointwise)."""
    if isinstance(module, (nn.Conv2d, nn.Conv3d)):
        if module.groups > 1 and module.groups == module.in_channels == module.out_channels:
            return "depthwise"
        return "pointwise" if all(k == 1 for k in module.kernel_size) else "conv"
    return "pointwise"


FeatureFn = Callable[[nn.Module, torch.Tensor], list[torch.Tensor]]

# The placement rules of each backbone family, i.e. how the family's library names its layers (timm's ResNet,
# timm's EfficientNet builder, torchvision's ShuffleNetV2, ...); registered by the modules that build them.
FAMILY_RULES: dict[str, list[PlaceRule]] = {}


class Backbone(nn.Module):
    """Classification network + family + layer places + multi-scale features + shared operator modules."""

    def __init__(
        self,
        name: str,
        net: nn.Module,
        features: FeatureFn,
        feature_channels: list[int],
        feature_strides: list[int],
        *,
        family: str,
        rules: list[PlaceRule] | None = None,
        default_resolution: int = 224,
        dynet_reduction: float | None = None,
        output_stride: int = 32,
        clip_length: int | None = None,
    ):
        """`family` names the network family (FAMILY_RULES, attention sites, KernelWarehouse layouts); `rules`
        replaces the family's placement rules where the network's configuration decides them (VGG's layer
        indices, Dy-mobile's blocks). `dynet_reduction` is the coefficient-module width op=dynet takes with
        `op.reduction=auto` (the DyNet paper's networks set it)."""
        super().__init__()
        self.name = name
        self.family = family
        self.net = net
        self.rules = rules if rules is not None else FAMILY_RULES[family]
        self._features = features
        self.feature_channels = feature_channels
        self.feature_strides = feature_strides
        self.default_resolution = default_resolution
        self.dynet_reduction = dynet_reduction
        # The real stride of the last feature map: 32, or 8 / 16 when the last stages are dilated
        # (`backbone.output_stride`); `feature_strides` stay the nominal ones that name the levels.
        self.output_stride = output_stride
        # Video backbones (R3D, TSM: docs/video.md) take clips (B, C, T, H, W); this is their usual T, the clip
        # length of MACs and of the meta-device checks (the data decides T in training). None: images (B, C, H, W).
        self.clip_length = clip_length
        # Modules an operator shares between layers, registered here once (counted, saved, moved and
        # synchronised like any other; empty ModuleDicts add no state): block/stage input summaries
        # (`dynconv.layers.shared_input`) and KernelWarehouse's warehouses.
        self.shared_inputs = nn.ModuleDict()
        self.warehouses = nn.ModuleDict()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    @property
    def takes_clips(self) -> bool:
        """Whether the input is a video clip (B, C, T, H, W) rather than an image batch."""
        return self.clip_length is not None

    def example_input(self, batch: int, side: int, *, frames: int | None = None,
                      device: torch.device | str | None = None) -> torch.Tensor:
        """Zeros of this backbone's input kind: images (batch, 3, side, side), or clips (batch, 3, T, side, side)
        with T = `frames` (default: `clip_length`)."""
        shape = (batch, 3, side, side) if not self.takes_clips else (batch, 3, frames or self.clip_length, side, side)
        return torch.zeros(shape, device=device)

    def forward_features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Feature maps keyed "C2".."C5" by log2 of their stride (the FPN naming)."""
        maps = self._features(self.net, x)
        return {f"C{stride.bit_length() - 1}": fmap for stride, fmap in zip(self.feature_strides, maps)}

    def place(self, name: str, module: nn.Module) -> Place:
        """Where the layer `name` (relative to `self.net`) sits; every conv/linear must be described."""
        for rule in self.rules:
            found = rule.match(name, module)
            if found is not None:
                return found
        raise LookupError(f"backbone {self.name}: no placement rule describes layer {name!r} ({module})")


BACKBONES: Registry[Callable[..., Backbone]] = Registry("backbone", "backbone.name")
