"""What an operator sees of a layer: its shape and its place in the backbone, and what it decided.

The conversion pass (`dynconv.conversion.convert`) describes each `nn.Conv2d` / `nn.Conv3d` / `nn.Linear` of a
backbone as a `LayerInfo` and records one `Decision` per layer (converted, or static with the reason). 3-D
convolutions come from video backbones (R3D, docs/video.md); only operators that say so act on them
(`Operator.supports_conv3d`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

# Roles a backbone assigns to its layers (see dynconv/backbones/*). Operators decide by role, never by name.
ROLES = (
    "stem",  # first convolution(s) on the image
    "conv",  # a regular k x k convolution inside a block
    "pointwise",  # 1 x 1 convolution (or a Linear applied per position) inside a block
    "depthwise",  # groups == in_channels == out_channels
    "downsample",  # shortcut projection or a stage's downsampling layer
    "head",  # last feature convolution before pooling (MobileNet conv_head, ShuffleNet conv5)
    "se",  # convolutions inside a squeeze-excitation branch of the original backbone
    "attention",  # transformer projections (qkv, proj)
    "mlp",  # transformer MLP
    "classifier",  # the final Linear
    "unplaced",  # a layer the generic placement could not place (LayerInfo.unplaced says why): always left static
)


@dataclass(frozen=True)
class LayerInfo:
    """A convertible layer: its module, its shape and its place in the backbone."""

    name: str  # qualified module name, e.g. "layer2.0.conv1"
    module: nn.Module  # the original nn.Conv2d / nn.Conv3d / nn.Linear
    role: str  # one of ROLES
    stage: int  # stage index (0 = stem), as the backbone family defines stages
    block: str | None  # qualified name of the block that holds the layer (shared routing, GAP sharing)
    index: int  # position among all convertible layers, in forward order
    unplaced: str = ""  # role "unplaced": why the backbone could not place the layer (the reason it stays static)

    @property
    def is_conv(self) -> bool:
        """A 2-D or 3-D convolution (`is_conv3d` tells them apart)."""
        return isinstance(self.module, (nn.Conv2d, nn.Conv3d))

    @property
    def is_conv3d(self) -> bool:
        """A 3-D (t x h x w) convolution of a video backbone; torchvision's Conv3DSimple is one too."""
        return isinstance(self.module, nn.Conv3d)

    @property
    def is_linear(self) -> bool:
        return isinstance(self.module, nn.Linear)

    @property
    def in_channels(self) -> int:
        return self.module.in_channels if self.is_conv else self.module.in_features

    @property
    def out_channels(self) -> int:
        return self.module.out_channels if self.is_conv else self.module.out_features

    @property
    def groups(self) -> int:
        return self.module.groups if self.is_conv else 1

    @property
    def kernel_size(self) -> tuple[int, ...]:
        """(kh, kw) of a 2-D convolution, (kt, kh, kw) of a 3-D one; (1, 1) for a Linear."""
        return tuple(self.module.kernel_size) if self.is_conv else (1, 1)

    @property
    def is_depthwise(self) -> bool:
        return self.is_conv and self.groups == self.in_channels == self.out_channels and self.groups > 1

    def shape_str(self) -> str:
        if self.is_conv:
            m = self.module
            k = "x".join(map(str, m.kernel_size))
            # One number for a uniform stride (the usual case); every axis where they differ (R3D's (1, 2, 2) stem).
            s = str(m.stride[0]) if len(set(m.stride)) == 1 else "x".join(map(str, m.stride))
            kind = "Conv3d" if self.is_conv3d else "Conv2d"
            return f"{kind}({m.in_channels}->{m.out_channels}, k={k}, s={s}, g={m.groups})"
        return f"Linear({self.in_channels}->{self.out_channels})"


@dataclass
class Decision:
    layer: LayerInfo
    converted: bool
    reason: str = ""  # why the layer stayed static
