"""CondConv (Yang et al., NeurIPS 2019): y = (r_1(x) W_1 + ... + r_n(x) W_n) * x.

Routing r(x) = sigmoid(FC(GAP(x))) (the paper's Eq. 2): one routing function per layer (`op.routing=layer`),
or one per block computed from the block's input and shared by the block's CondConv layers
(`op.routing=block`), as timm's EfficientNet-CondConv blocks do (its `CondConv2d.forward(x, routing_weights)`
takes the block's routing); the block-level routing lives in `Backbone.shared_inputs` (see
`dynconv.layers.shared_input`). In the paper's
formulation the experts are mixed into one per-sample kernel, so the convolution costs what a static one
does, plus the mixing ((B x n) @ (n x O*C/g*k*k)) and the routing FC: that is what MAC counting reports.
`mixture_conv2d` may compute the same result by mixing outputs when that is cheaper for the shape.

Initialisation (`op.weight_init`, docs/initialisation.md). The paper's release is TensorFlow
(tensorflow/tpu, `efficientnet/condconv`); timm's port of its networks (`timm/models/_efficientnet_builder.py`,
`_init_weight_goog`, applied to every EfficientNet-CondConv) is the reference. `reference` (the default): each
expert is drawn like one convolution of those networks, N(0, 2 / fan_out) with fan_out = k k O / groups, expert
biases zero; the routing FC (`routing_fn`) U(+-1/sqrt(C_in + n)) with a zero bias. `pytorch`: each expert and
bias like a fresh nn.Conv2d (what `timm/layers/cond_conv2d.py`'s own `reset_parameters` does before a network
re-initialises it) and the routing FC nn.Linear's default (dynconv's behaviour before the knob).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from dynconv.conversion.operator import OPERATORS, LayerInfo, Operator
from dynconv.layers.kernel_bank import KernelBankConv2d, conv_geometry
from dynconv.functional.mixture import mixture_conv2d
from dynconv.layers.initialisation import read_weight_init
from dynconv.layers.shared_input import attach_shared_inputs, link_shared

ROUTING_SCOPES = ("layer", "block")


class CondConv2d(KernelBankConv2d):
    """A drop-in for nn.Conv2d with `experts` kernels mixed per sample by sigmoid routing. The knobs default to
    configs/op/condconv.yaml's (4 experts, timm's; the reference initialisation); `bias` to False, as the layer
    is followed by a BatchNorm in every network the paper converts."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = False, experts: int = 4, own_routing: bool = True,
                 weight_init: str = "reference"):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
                         kernels=experts, bias=bias)
        # Without own routing, a block-level BlockRouting (linked with `link_shared`) gives r(x).
        self.routing = nn.Linear(in_channels, experts) if own_routing else None
        if weight_init == "reference":
            self.reference_init()

    @torch.no_grad()
    def reference_init(self) -> None:
        """timm `_init_weight_goog` (the TensorFlow release's initialisers): every expert N(0, 2 / fan_out),
        fan_out = kh kw O / groups, zero expert biases; the routing FC as `routing_init_`."""
        fan_out = math.prod(self.kernel_size) * self.out_channels // self.groups
        self.weight.normal_(0.0, math.sqrt(2.0 / fan_out))
        if self.bias is not None:
            self.bias.zero_()
        if self.routing is not None:
            routing_init_(self.routing)

    @property
    def experts(self) -> int:
        return self.kernels

    def routing_weights(self, x: torch.Tensor) -> torch.Tensor:
        """r(x) in (0, 1)^n, shape (B, n): Eq. 2 of the paper (of the block's input with block routing)."""
        if self.routing is None:
            return self.__dict__["shared_input"].read()
        return torch.sigmoid(self.routing(x.mean(dim=(2, 3))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return mixture_conv2d(x, self.weight, self.routing_weights(x), self.bias, self.stride, self.padding,
                              self.dilation, self.groups)


@OPERATORS.register("condconv")
class CondConvOperator(Operator):
    name = "condconv"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.experts = self.knobs.integer("experts")
        self.routing = self.knobs.choice("routing", ROUTING_SCOPES, default="layer")
        self.weight_init = read_weight_init(self.knobs)

    def build(self, layer: LayerInfo) -> nn.Module:
        return CondConv2d(**conv_geometry(layer.module), bias=layer.module.bias is not None, experts=self.experts,
                          own_routing=self.routing == "layer" or layer.block is None, weight_init=self.weight_init)

    def finalize(self, model: nn.Module, decisions) -> None:
        if self.routing != "block":
            return
        links = attach_shared_inputs(model, decisions, "block", lambda source, channels: BlockRouting(
            channels, self.experts, self.weight_init))
        for layer_name, shared in links.items():
            link_shared(model.net.get_submodule(layer_name), shared)


class BlockRouting(nn.Module):
    """sigmoid(FC(GAP(block input))): one routing vector per block, shared by its CondConv layers."""

    def __init__(self, in_channels: int, experts: int, weight_init: str = "pytorch"):
        super().__init__()
        self.fc = nn.Linear(in_channels, experts)
        if weight_init == "reference":
            routing_init_(self.fc)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.fc(pooled))


@torch.no_grad()
def routing_init_(fc: nn.Linear) -> None:
    """timm `_init_weight_goog` for a CondConv block's `routing_fn`: U(+-1/sqrt(fan_in + fan_out)), zero bias."""
    bound = 1.0 / math.sqrt(fc.in_features + fc.out_features)
    fc.weight.uniform_(-bound, bound)
    nn.init.zeros_(fc.bias)
