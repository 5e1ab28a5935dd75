"""Selective-kernel convolution (Li, Wang, Hu, Yang, "Selective Kernel Networks", CVPR 2019).

An SK convolution runs M convolutions with different receptive fields on the same input and lets each
sample choose, per channel, how much of each it keeps (the paper's Sec. 3.1, Split / Fuse / Select;
equation numbers are not cited: the paper's text is not in shared/papers to check them):

    Split:   U_i = BN_i(W_i * x),                      i = 1..M, W_i the layer's k x k kernel at dilation d_i
    Fuse:    U = sum_i U_i,   s = GAP(U) in R^C,   z = ReLU(BN(W s)) in R^d,   d = max(C / r, L)
    Select:  a_i = softmax_i(A_i z) in R^C (softmax over the M paths, per channel),   V = sum_i a_i . U_i

SKNet's M = 2 is a 3x3 path and a "5x5" path that is a 3x3 with dilation 2 (same receptive field, fewer
weights); r = 16, L = 32. Here `dilations: [1, 2]` gives exactly that for a 3x3 layer, and in general one path
per entry: the replaced layer's own k x k kernel, groups and stride at dilation d_i (times the layer's own
dilation), padded so every path keeps the layer's output grid. W and A_i have no bias (the paper writes none;
the BN after W would cancel one). `reduction` is 1 / r, as ODConv's knob of the same name.

Why not timm's `SelectiveKernel`: it is SKNet's whole unit, not a drop-in for one convolution. Its paths end
with BN + ReLU (`ConvNormAct`), but the layer it would replace is linear and already followed by the
backbone's own BN (and, in ShuffleNetV2, by no ReLU at all after the depthwise convolution; in ResNet the
last conv of a block is added to the shortcut before its ReLU), so an extra ReLU inside would change the
backbone. It also splits the input channels across the paths by default (a timm modification), floors the
attention width with `make_divisible(C / 16, 8)` instead of the paper's L = 32, and its attention BN is a
`BatchNorm2d` on a 1 x 1 map, which raises for a batch of one in train mode (`SelectiveKernelAttn` is not
exported by `timm.layers` either, so it cannot be reused alone). So `SKConv2d` keeps each path's
convolution + BN (the paper's BN, which puts the paths on one scale before they are summed and compared), drops
the paths' ReLU, and normalises the attention with ODConv's `BatchSafeBatchNorm1d` (a batch of one in train
mode uses the running statistics; see dynconv/layers/batch_safe_norm.py). A bias of the replaced layer is not kept: the
paths' BN shifts take its place.

Conversion: every k x k convolution (k > 1) with role conv or depthwise: ResNet's 3x3s, the depthwise 3x3 of
both branches of ShuffleNetV2's downsampling units and of branch2 in the others (19 layers: 5 / 9 / 5 per
stage), MobileNet's and ConvNeXt's depthwise convolutions. 1 x 1 layers (a single tap is
the same convolution at every dilation), the stem, the head, downsample shortcuts, SE branches and the
classifier stay static.

Parity with WeightNet (Ma et al., ECCV 2020) Table 4 at 224 x 224, 1000 classes, defaults (M = 2, r = 16,
L = 32), measured through `build_backbone` + `count_params` / `count_macs`:
ShuffleNetV2 (0.5x) + SK 1,480,496 params / 42.4M MACs (paper 1.5M / 42M); ShuffleNetV2 (1.5x) + SK
3,910,320 / 302.3M (paper 3.9M / 306M). The static baselines are 1,366,792 / 40.5M and 3,503,624 / 295.8M
(paper 1.4M / 41M and 3.5M / 299M: the paper's FLOPs run ~1.1% above the conv/linear MACs counted here).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from dynconv.conversion.operator import OPERATORS, LayerInfo, Operator, OperatorConfigError
from dynconv.knobs import Knobs, is_int
from dynconv.layers.batch_safe_norm import BatchSafeBatchNorm1d

DILATIONS_ALLOWED = "lists of at least 2 distinct integers >= 1"


class SelectiveKernelAttention(nn.Module):
    """Fuse + Select: a = softmax over paths of A . ReLU(BN(W . GAP(U))), shape (B, M, C)."""

    def __init__(self, channels: int, paths: int, hidden: int):
        super().__init__()
        self.channels, self.paths = channels, paths
        self.reduce = nn.Linear(channels, hidden, bias=False)  # W (d x C)
        self.bn = BatchSafeBatchNorm1d(hidden)
        self.select = nn.Linear(hidden, paths * channels, bias=False)  # A_1..A_M stacked (M*C x d)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        z = torch.relu(self.bn(self.reduce(u.mean(dim=(2, 3)))))
        return torch.softmax(self.select(z).view(-1, self.paths, self.channels), dim=1)


def _pair(value) -> tuple[int, int]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


def path_padding(padding: int, dilation: int, kernel: int, path_dilation: int) -> int:
    """Padding that keeps the layer's output grid (size and centre) for its kernel at `path_dilation` times its
    dilation: the dilated kernel reaches (path_dilation - 1) * dilation * (k - 1) / 2 further on each side."""
    return padding + (path_dilation - 1) * dilation * (kernel - 1) // 2


class SKConv2d(nn.Module):
    """A drop-in for a k x k nn.Conv2d: M paths (conv + BN) at different dilations, mixed per sample and channel.
    The knobs default to configs/op/sk.yaml's (dilations 1 and 2, SKNet's r = 16 and L = 32)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = False, dilations: Sequence[int] = (1, 2), reduction: float = 1 / 16,
                 min_hidden: int = 32):
        if bias:  # nn.Conv2d's argument, taken so that the signature is nn.Conv2d's
            raise ValueError("SKConv2d has no bias: each path ends in a BatchNorm, whose shift is the bias")
        super().__init__()
        kernel_size, padding, dilation = (_pair(v) for v in (kernel_size, padding, dilation))
        self.dilations = tuple(dilations)
        self.paths = nn.ModuleList()
        for d in self.dilations:
            conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride,
                             tuple(path_padding(p, dl, k, d) for p, dl, k in zip(padding, dilation, kernel_size)),
                             tuple(dl * d for dl in dilation), groups, bias=False)
            self.paths.append(nn.Sequential(conv, nn.BatchNorm2d(out_channels)))
        hidden = max(int(out_channels * reduction), min_hidden)
        self.attention = SelectiveKernelAttention(out_channels, len(self.dilations), hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        paths = [path(x) for path in self.paths]
        a = self.attention(sum(paths))
        # A (B, C, 1, 1) weight per path broadcasts over H, W and keeps the paths' memory format (channels_last).
        return sum(a[:, i, :, None, None] * u for i, u in enumerate(paths))


def read_dilations(knobs: Knobs) -> tuple[int, ...]:
    value = knobs.get("dilations")
    ok = (isinstance(value, (list, tuple)) and all(is_int(d) and d >= 1 for d in value)
          and len(value) >= 2 and len(set(value)) == len(value))
    if not ok:
        raise knobs.fail("dilations", value, DILATIONS_ALLOWED)
    return tuple(value)


@OPERATORS.register("sk")
class SKOperator(Operator):
    name = "sk"
    # Only k x k convolutions inside blocks (roles conv, depthwise): 1x1 roles (pointwise, head, ResNet's
    # downsample shortcuts) have nothing to select between, and a stride-2 downsampling layer (ConvNeXt's 2x2)
    # or the stem is not what SKNet replaces.
    static_roles = Operator.static_roles | {"pointwise", "downsample", "head"}

    def __init__(self, cfg):
        super().__init__(cfg)
        self.dilations = read_dilations(self.knobs)
        self.reduction = self.knobs.number("reduction", 0)
        self.min_hidden = self.knobs.integer("min_hidden")

    def refuse(self, layer: LayerInfo) -> str | None:
        reason = super().refuse(layer)
        if reason is None and layer.kernel_size == (1, 1):
            return "a 1x1 kernel has one tap: every dilated path would be the same convolution"
        return reason

    def build(self, layer: LayerInfo) -> nn.Module:
        conv = layer.module
        # A path keeps the layer's grid only if its extra reach (d - 1) * dilation * (k - 1) splits evenly
        # between both sides: never the case for an even kernel at an even d (and the layer's dilation odd).
        if any((d - 1) * dl * (k - 1) % 2 for d in self.dilations for k, dl in zip(conv.kernel_size, conv.dilation)):
            raise OperatorConfigError(
                f"op.dilations={list(self.dilations)!r} does not fit layer '{layer.name}' {layer.shape_str()}: "
                f"a path at an even dilation would shift an even kernel's output grid; allowed values for this "
                f"layer are {DILATIONS_ALLOWED}, all odd (or add the layer to op.keep_static)")
        return SKConv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                        conv.dilation, conv.groups, dilations=self.dilations, reduction=self.reduction,
                        min_hidden=self.min_hidden)
