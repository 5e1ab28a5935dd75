"""CondConv (Yang et al., NeurIPS 2019): y = (r_1(x) W_1 + ... + r_n(x) W_n) * x.

Routing r(x) = sigmoid(FC(GAP(x))) (the paper's Eq. 2), one routing function per layer. In the paper's
formulation the experts are mixed into one per-sample kernel, so the convolution costs what a static one
does, plus the mixing ((B x n) @ (n x O*C/g*k*k)) and the routing FC: that is what MAC counting reports.
`mixture_conv2d` may compute the same result by mixing outputs when that is cheaper for the shape.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from dynconv.ops.base import OPERATORS, LayerInfo, Operator, require_positive_int
from dynconv.ops.per_sample_conv import mixture_conv2d


class CondConv2d(nn.Module):
    """A drop-in for nn.Conv2d with `experts` kernels mixed per sample by sigmoid routing."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: tuple[int, int],
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        bias: bool = False,
        experts: int = 8,
    ):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = tuple(kernel_size)
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups
        self.experts = experts
        self.weight = nn.Parameter(torch.empty(experts, out_channels, in_channels // groups, *self.kernel_size))
        self.bias = nn.Parameter(torch.empty(experts, out_channels)) if bias else None
        self.routing = nn.Linear(in_channels, experts)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Each expert starts like a freshly initialised nn.Conv2d (kaiming-uniform, a=sqrt(5)).
        fan_in = (self.in_channels // self.groups) * math.prod(self.kernel_size)
        for expert in range(self.experts):
            nn.init.kaiming_uniform_(self.weight[expert], a=math.sqrt(5))
        if self.bias is not None:
            bound = 1.0 / math.sqrt(fan_in)
            nn.init.uniform_(self.bias, -bound, bound)

    def routing_weights(self, x: torch.Tensor) -> torch.Tensor:
        """r(x) in (0, 1)^n, shape (B, n): Eq. 2 of the paper."""
        return torch.sigmoid(self.routing(x.mean(dim=(2, 3))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return mixture_conv2d(x, self.weight, self.routing_weights(x), self.bias, self.stride, self.padding,
                              self.dilation, self.groups)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, groups={self.groups}, experts={self.experts}, bias={self.bias is not None}"
        )


@OPERATORS.register("condconv")
class CondConvOperator(Operator):
    name = "condconv"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.experts = require_positive_int(self.cfg, "experts", self.name)

    def build(self, layer: LayerInfo) -> nn.Module:
        conv = layer.module
        return CondConv2d(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            conv.stride,
            conv.padding,
            conv.dilation,
            conv.groups,
            bias=conv.bias is not None,
            experts=self.experts,
        )
