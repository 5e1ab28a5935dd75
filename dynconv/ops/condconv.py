"""CondConv (Yang et al., NeurIPS 2019): y = (r_1(x) W_1 + ... + r_n(x) W_n) * x.

Routing r(x) = sigmoid(FC(GAP(x))) (the paper's Eq. 2), one routing function per layer. In the paper's
formulation the experts are mixed into one per-sample kernel, so the convolution costs what a static one
does, plus the mixing ((B x n) @ (n x O*C/g*k*k)) and the routing FC: that is what MAC counting reports.
`mixture_conv2d` may compute the same result by mixing outputs when that is cheaper for the shape.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from dynconv.ops.base import OPERATORS, LayerInfo, Operator, require_positive_int
from dynconv.ops.kernel_bank import KernelBankConv2d, conv_geometry
from dynconv.ops.per_sample_conv import mixture_conv2d


class CondConv2d(KernelBankConv2d):
    """A drop-in for nn.Conv2d with `experts` kernels mixed per sample by sigmoid routing."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = False, experts: int = 8):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
                         kernels=experts, bias=bias)
        self.routing = nn.Linear(in_channels, experts)

    @property
    def experts(self) -> int:
        return self.kernels

    def routing_weights(self, x: torch.Tensor) -> torch.Tensor:
        """r(x) in (0, 1)^n, shape (B, n): Eq. 2 of the paper."""
        return torch.sigmoid(self.routing(x.mean(dim=(2, 3))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return mixture_conv2d(x, self.weight, self.routing_weights(x), self.bias, self.stride, self.padding,
                              self.dilation, self.groups)


@OPERATORS.register("condconv")
class CondConvOperator(Operator):
    name = "condconv"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.experts = require_positive_int(self.cfg, "experts", self.name)

    def build(self, layer: LayerInfo) -> nn.Module:
        return CondConv2d(**conv_geometry(layer.module), bias=layer.module.bias is not None, experts=self.experts)
