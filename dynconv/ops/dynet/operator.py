"""DyNet (Zhang et al., "DyNet: Dynamic Convolution for Accelerating Convolutional Neural Networks", 2020).

A dynamic layer with weight [C_out x g_t, C_in, k, k] holds g_t fixed kernels per output channel; each sample's
kernel for output channel t is their coefficient-weighted sum (Sec. 3.2, Eq. 1):

    w~_t = sum_{i=1..g_t} eta_t^i w_t^i,        y = w~ * x

Coefficient prediction module (Sec. 3.2, Figure 3): GAP -> FC -> sigmoid, computed once per block from the
block's input and giving the C_out * g_t coefficients of every dynamic layer of the block ("the coefficients
for fixed convolution kernels of several dynamic convolution layers"; Sec. 3.3: "it produces the coefficients
for all three dynamic convolution layers"). For Dy-ResNet18/50 the FC is two linear layers with C_in/4 hidden
units (Sec. 3.3). The block-level module lives in `Backbone.shared_inputs` (`dynconv.layers.shared_input`); a
converted layer outside any block pools its own input with its own module.

Training fuses features (Eq. 2, the paper) or kernels (Eq. 1), whichever `dynet_conv2d` measures faster for the
layer shape; inference (eval mode or no autograd) always fuses kernels: one convolution per layer, the kernel
generation costing g_t * |w~| multiply-accumulates per image (what `count_macs` counts; `fusion.py`).

Knobs (configs/op/dynet.yaml):
- `g` (g_t, 6 in every network of the paper; Tables 5 and 6 sweep 1, 2, 4, 6);
- `reduction`: the hidden width of the coefficient module as a fraction of the block's input channels. 0 is
  one FC (Dy-mobile, Dy-shuffle), 0.25 two linear layers with C_in/4 hidden units (Dy-ResNet18/50), `auto` the
  backbone's own (`Backbone.dynet_reduction`, set by the Dy-* backbones), else 0.25;
- `fusion`: the training path, auto | features | kernels.

Assumptions (the paper's Figure 4, which would show them, is not in its text):
- The two linear layers have a ReLU between them (the paper names no activation; SE-style modules do).
- Each FC has a bias. A convolution's own bias (the backbones here have none) stays static: Eq. 1 fuses kernels.
- The fixed kernels start like a default nn.Conv2d scaled by 2/sqrt(g): with sigmoid(~0) = 0.5 coefficients the
  fused kernel then has a default convolution's spread.
- Which layers: every convolution in a block (depthwise and grouped ones included); the stem, the head (last
  1x1 before pooling), shortcut/downsampling projections, SE branches and the classifier stay static. With
  these the Dy-* networks reproduce Tables 1, 4, 5 and 6 (tests/test_parity_dynet.py): Dy-mobile's
  parameters are only matched with the head static and Dy-ResNet18's with the shortcuts static.
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch
import torch.nn as nn
from torch.nn.modules.utils import _pair

from dynconv.conversion.operator import OPERATORS, LayerInfo, Operator, OperatorConfigError
from dynconv.knobs import is_number
from dynconv.ops.dynet.fusion import FUSIONS, dynet_conv2d
from dynconv.layers.kernel_bank import conv_geometry
from dynconv.layers.shared_input import attach_shared_inputs, link_shared

# Hidden fraction of the coefficient module when the backbone states none: Dy-ResNet's two linear layers (the
# paper's choice "because the input channels of each block are large"; it also gives Dy-MobileNetV3's +3M/+9M
# FLOPs of Table 1 best, where one FC would add +5M/+17M).
DEFAULT_REDUCTION = 0.25


class CoefficientPredictor(nn.Module):
    """sigmoid(FC(GAP(x))) (Figure 3), or sigmoid(FC2(ReLU(FC1(GAP(x))))) with `hidden` units (Dy-ResNet):
    (B, C_in) pooled input -> (B, sum over the block's dynamic layers of C_out * g) coefficients in (0, 1)."""

    def __init__(self, in_channels: int, coefficients: int, hidden: int = 0):
        super().__init__()
        if hidden:
            self.fc = nn.Sequential(nn.Linear(in_channels, hidden), nn.ReLU(inplace=True),
                                    nn.Linear(hidden, coefficients))
        else:
            self.fc = nn.Linear(in_channels, coefficients)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.fc(pooled))


class DyNetConv2d(nn.Module):
    """A drop-in for nn.Conv2d: g fixed kernels per output channel, weight (C_out, g, C_in/groups, kh, kw).

    Its coefficients are columns [start, stop) of its block's coefficient module (`shared=True`: linked later
    with `link_shared`), or of its own module on its own input: `predictor`, else one of C_in * `reduction` hidden
    units (0: one FC). The knobs default to configs/op/dynet.yaml's (g = 6, the fusion measured; its `auto`
    reduction is 1/4 outside a network that states its own).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = False, *, g: int = 6, fusion: str = "auto",
                 predictor: CoefficientPredictor | None = None, shared: bool = False,
                 reduction: float = DEFAULT_REDUCTION):
        super().__init__()
        if predictor is None and not shared:
            predictor = CoefficientPredictor(in_channels, out_channels * g, int(in_channels * reduction))
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = _pair(kernel_size)
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups
        self.g, self.fusion = g, fusion
        self.weight = nn.Parameter(torch.empty(out_channels, g, in_channels // groups, *self.kernel_size))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        self.predictor = predictor
        self.coefficient_slice = (0, out_channels * g)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        fan_in = (self.in_channels // self.groups) * math.prod(self.kernel_size)
        bound = 1.0 / math.sqrt(fan_in)  # nn.Conv2d's default (kaiming-uniform, a = sqrt(5))
        nn.init.uniform_(self.weight, -2.0 * bound / math.sqrt(self.g), 2.0 * bound / math.sqrt(self.g))
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

    def coefficients(self, x: torch.Tensor) -> torch.Tensor:
        """eta, (B, C_out, g): this layer's columns of the block's (or its own) coefficient module."""
        if self.predictor is not None:
            values = self.predictor(x.mean(dim=(2, 3)))
        else:
            values = self.__dict__["shared_input"].read()
        start, stop = self.coefficient_slice
        return values[:, start:stop].reshape(values.shape[0], self.out_channels, self.g)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Inference fuses kernels (one convolution per layer); training takes the configured fusion.
        fusion = self.fusion if self.training and torch.is_grad_enabled() else "kernels"
        return dynet_conv2d(x, self.weight, self.coefficients(x), self.bias, self.stride, self.padding,
                            self.dilation, self.groups, fusion)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"groups={self.groups}, g={self.g}, fusion={self.fusion}, coefficients={self.coefficient_slice}, "
                f"shared={self.predictor is None}")


@OPERATORS.register("dynet")
class DyNetOperator(Operator):
    """Knobs: op.g (g_t >= 1), op.reduction (auto | 0 | a fraction in (0, 1]), op.fusion (auto | features |
    kernels)."""

    name = "dynet"
    static_roles = Operator.static_roles | {"downsample", "head"}

    def __init__(self, cfg):
        super().__init__(cfg)
        self.g = self.knobs.integer("g")
        self.reduction = self.knobs.get("reduction", "auto")
        if not (self.reduction == "auto" or (is_number(self.reduction) and 0 <= self.reduction <= 1)):
            raise self.knobs.fail("reduction", self.reduction, "auto, 0 (one FC) or a fraction in (0, 1] (two "
                                  "linear layers, C_in * r hidden)")
        self.fusion = self.knobs.choice("fusion", FUSIONS, default="auto")
        self._reduction = DEFAULT_REDUCTION if self.reduction == "auto" else float(self.reduction)

    def prepare(self, backbone: nn.Module, layers: list[LayerInfo]) -> None:
        if self.reduction == "auto" and backbone.dynet_reduction is not None:
            self._reduction = float(backbone.dynet_reduction)

    def hidden_width(self, in_channels: int, where: str) -> int:
        """C_in * r hidden units (rounded down); 0 with r = 0 (one FC). OperatorConfigError if it rounds to 0."""
        if self._reduction == 0:
            return 0
        hidden = int(in_channels * self._reduction)
        if hidden < 1:
            raise OperatorConfigError(
                f"op.reduction={self.reduction!r} (r = {self._reduction:g}) gives {in_channels} * r < 1 hidden units "
                f"for the coefficient module of {where} ({in_channels} input channels): allowed values here are 0 "
                f"(one FC) or r in [{1 / in_channels:.4g}, 1]")
        return hidden

    def build(self, layer: LayerInfo) -> nn.Module:
        predictor = None
        if layer.block is None:  # no block to share with: the layer predicts from its own input
            predictor = CoefficientPredictor(layer.in_channels, layer.out_channels * self.g,
                                             self.hidden_width(layer.in_channels, f"layer '{layer.name}'"))
        return DyNetConv2d(**conv_geometry(layer.module), bias=layer.module.bias is not None, g=self.g,
                           fusion=self.fusion, predictor=predictor, shared=predictor is None)

    def finalize(self, model: nn.Module, decisions) -> None:
        """One coefficient module per block, sized by all the block's dynamic layers; each layer gets its columns."""
        in_block = [d.layer for d in decisions if d.converted and d.layer.block is not None]
        widths: dict[str, int] = defaultdict(int)
        slices: dict[str, tuple[int, int]] = {}
        for layer in in_block:
            start = widths[layer.block]
            widths[layer.block] += layer.out_channels * self.g
            slices[layer.name] = (start, widths[layer.block])

        def make_summary(source: str, channels: int) -> nn.Module:
            return CoefficientPredictor(channels, widths[source], self.hidden_width(channels, f"block '{source}'"))

        links = attach_shared_inputs(model, decisions, "block", make_summary)
        for name, shared in links.items():
            module = model.net.get_submodule(name)
            link_shared(module, shared)
            module.coefficient_slice = slices[name]
