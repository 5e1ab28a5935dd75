"""WeightNet (Ma et al., "WeightNet: Revisiting the Design Space of Weight Networks", ECCV 2020).

A weight network made only of (grouped) fully-connected layers outputs each sample's kernel directly
(Sec. 3.3, Fig. 2):

    alpha = sigmoid(FC_2(FC_1(GAP(x))))          FC_1: C -> C/r,  FC_2: C/r -> M*C_out   (no ReLU between)
    W'    = grouped FC(alpha)                    M*C_out inputs, G*C_out groups, C_out*C_in*k*k outputs
    y     = W' * x                               one kernel per sample (the batch folded into groups)

The grouped FC has lambda = M/G inputs per group and lambda times the parameters of the convolution
(Table 1, "complexity analysis"). Its two extreme cases are the methods it unifies:

- SE on the kernel (Sec. 3.2): M = G = 1, one group per output channel with one input, so W'_c = alpha_c V_c.
- CondConv (Sec. 3.1, Eq. 1): G = 1/C, M = m/C, one group with m inputs, W' = V^T alpha: m experts mixed by
  a sigmoid routing of GAP(x) (FC_2 FC_1 is one linear map: the two layers compose to CondConv's FC).

Implementation details, from the paper and the reference release (shared/REFERENCE_NOTES.md):

- FC_1 ("reduce") has max(min_hidden, C // r) outputs, r = 16, min_hidden = 16; it is shared by the layers of
  a block in the release (`op.gap=block`, the default), or per layer / per stage (`op.gap=layer|stage`: the
  GAP-sharing ablation, Table 10). With block/stage sharing it reads the block's/stage's input.
- FC_2 has bias and is followed by a sigmoid; the grouped FC has no bias.
- Depthwise convolutions use the release's depthwise variant: FC_2 gives lambda*C values and the grouped FC
  has C groups (one per channel, each lambda -> k*k): G does not apply (k*k = 9 rarely divides by G).
- Training and inference fold the batch into the groups of one convolution (Sec. 3.3), or, by linearity, run one
  static convolution with G times the groups and weight its outputs by alpha (`weightnet_apply.py`: the static
  convolution's arithmetic for lambda = 1, no per-sample kernel); the selector picks per layer shape.
- A convolution's bias (the backbones here have none) stays a static parameter: WeightNet generates weights.

Which layers: every convolution of ShuffleNetV2's branches (both branches of the downsampling unit: the
release's proj branch is WeightNet too) and of ResNet's bottlenecks; the stem, the last 1x1 (`conv5` / head),
ResNet's downsample shortcuts and the classifier stay static (Sec. 4.1: "the standard convolution kernels in
each bottleneck"). The parameter counts this gives are checked against Tables 2, 3, 4 and 8 in
tests/test_parity_weightnet.py.
"""

from __future__ import annotations

import math
from fractions import Fraction

import torch
import torch.nn as nn
from torch.nn.modules.utils import _pair

from dynconv.conversion.operator import OPERATORS, LayerInfo, Operator, OperatorConfigError
from dynconv.layers.kernel_bank import conv_geometry
from dynconv.functional import selector
from dynconv.ops.weightnet_apply import apply_weightnet_conv
from dynconv.layers.shared_input import attach_shared_inputs, link_shared

GAP_SCOPES = ("layer", "block", "stage")


def reduction_width(in_channels: int, reduction: int, min_hidden: int) -> int:
    """Width of FC_1: max(min_hidden, C // r) (the release's max(16, C // 16))."""
    return max(min_hidden, in_channels // reduction)


def grouping(in_channels: int, out_channels: int, groups: int, kernel_size: tuple[int, ...], lam: int,
             G: Fraction | float) -> tuple[int, int] | None:
    """(M*C_out inputs, G*C_out groups) of the grouped FC of a layer of this shape (depthwise: lambda*C and C);
    None when G does not fit it (G*C_out not an integer, or not dividing the kernel's elements)."""
    if groups > 1 and groups == in_channels == out_channels:
        return lam * out_channels, out_channels
    per_output = (in_channels // groups) * math.prod(kernel_size)
    wn_groups = Fraction(G).limit_denominator(4096) * out_channels
    # G*C_out groups, each lambda inputs -> C_out*per_output/(G*C_out) kernel elements.
    if wn_groups.denominator != 1 or (out_channels * per_output) % wn_groups.numerator:
        return None
    return lam * int(wn_groups), int(wn_groups)


class ReduceGAP(nn.Module):
    """FC_1 on the pooled input: (B, C) -> (B, C/r). Used per layer or shared by a block / stage."""

    def __init__(self, in_channels: int, hidden: int):
        super().__init__()
        self.fc = nn.Linear(in_channels, hidden)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.fc(pooled)


class WeightNetConv2d(nn.Module):
    """A drop-in for nn.Conv2d whose kernel is generated per sample by a WeightNet.

    `inputs` = M*C_out values of alpha, `wn_groups` = G*C_out groups of the grouped FC (depthwise: lambda*C
    and C). `hidden` is the width of FC_1. With `shared` False the layer owns FC_1 and pools its own input;
    otherwise a SharedInput of its block/stage gives FC_1(GAP(block input)) (see `link_shared`).
    Left out, `inputs`, `wn_groups` and `hidden` follow from the knobs `lam`, `G`, `reduction` and `min_hidden`,
    whose defaults are configs/op/weightnet.yaml's (the release's).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = False, *, inputs: int | None = None, wn_groups: int | None = None,
                 hidden: int | None = None, shared: bool = False, lam: int = 1, G: float = 2, reduction: int = 16,
                 min_hidden: int = 16):
        super().__init__()
        kernel_size = _pair(kernel_size)
        if inputs is None or wn_groups is None:
            found = grouping(in_channels, out_channels, groups, kernel_size, lam, G)
            if found is None:
                raise ValueError(f"G={G} does not fit a {in_channels}->{out_channels} {kernel_size} convolution with "
                                 f"groups={groups}: G*C_out must be an integer dividing the kernel's elements")
            inputs, wn_groups = found
        hidden = reduction_width(in_channels, reduction, min_hidden) if hidden is None else hidden
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = tuple(kernel_size)
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups
        kernel_shape = (out_channels, in_channels // groups, *self.kernel_size)
        self.kernel_shape = kernel_shape
        numel = math.prod(kernel_shape)
        if inputs % wn_groups or numel % wn_groups:
            raise ValueError(f"{wn_groups} groups must divide both the {inputs} inputs and the {numel} outputs")
        self.inputs, self.wn_groups = inputs, wn_groups
        self.lam = inputs // wn_groups
        self.reduce = None if shared else ReduceGAP(in_channels, hidden)
        self.activation = nn.Linear(hidden, inputs)  # FC_2, followed by a sigmoid
        # The grouped FC: group j maps alpha[j*lam:(j+1)*lam] to kernel elements [j*K/g:(j+1)*K/g].
        self.generator = nn.Parameter(torch.empty(wn_groups, self.lam, numel // wn_groups))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # W' = sum over lam inputs of alpha_i V_i with alpha ~ sigmoid(~0) = 0.5 at initialisation: scale V so
        # that W' starts with the spread of a default nn.Conv2d init (uniform, bound 1/sqrt(fan_in)):
        # std(W') = 0.5 sqrt(lam) std(V).
        fan_in = self.kernel_shape[1] * math.prod(self.kernel_size)
        bound = 2.0 / math.sqrt(self.lam) / math.sqrt(fan_in)
        nn.init.uniform_(self.generator, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -1.0 / math.sqrt(fan_in), 1.0 / math.sqrt(fan_in))

    def alpha(self, x: torch.Tensor) -> torch.Tensor:
        """The activation vector, (B, M*C_out): sigmoid(FC_2(FC_1(GAP(x)))) (Sec. 3.3)."""
        if self.reduce is not None:
            hidden = self.reduce(x.mean(dim=(2, 3)))
        else:
            hidden = self.__dict__["shared_input"].read()
        return torch.sigmoid(self.activation(hidden))

    def sample_kernels(self, alpha: torch.Tensor, generator: torch.Tensor | None = None) -> torch.Tensor:
        """The grouped FC: (B, M*C_out) -> per-sample kernels (B, C_out, C_in/g, k, k); `generator` in place of the
        layer's own (the selector times the algorithms on detached aliases of the parameters)."""
        generator = self.generator if generator is None else generator
        batch = alpha.shape[0]
        grouped = alpha.view(batch, self.wn_groups, self.lam)
        if self.lam == 1 and not selector.is_counting_macs():
            # One input per group: a broadcast product (SE on the kernel), cheaper than a batched matmul with
            # an inner dimension of 1. MAC counting takes the matmul, which FlopCounterMode sees (it does not
            # count elementwise products): the kernel generation costs B * lambda * |W| MACs (Sec. 3.3).
            kernels = grouped * generator.squeeze(1)
        else:
            # (g, B, lam) @ (g, lam, K/g): one matmul per group (einsum may lower a size-1 contraction to a
            # product, which the MAC counter would miss).
            kernels = torch.bmm(grouped.transpose(0, 1), generator).transpose(0, 1)
        return kernels.reshape(batch, *self.kernel_shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The kernels and the convolution, or the partial convolutions' outputs weighted (weightnet_apply.py).
        return apply_weightnet_conv(x, self.alpha(x), self)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"groups={self.groups}, inputs={self.inputs}, wn_groups={self.wn_groups}, lam={self.lam}, "
                f"shared_gap={self.reduce is None}")


@OPERATORS.register("weightnet")
class WeightNetOperator(Operator):
    """Knobs: op.lam (lambda = M/G, a positive integer), op.G (> 0; G*C_out must be an integer and G must
    divide C_in/g*k*k), op.reduction (r), op.min_hidden, op.gap (layer | block | stage)."""

    name = "weightnet"
    static_roles = Operator.static_roles | {"downsample", "head"}

    def __init__(self, cfg):
        super().__init__(cfg)
        self.lam = self.knobs.integer("lam")
        # Fractional G (down to 1/C_out, the CondConv end) is kept exact for the per-layer integrality check.
        self.G = Fraction(self.knobs.number("G", 0)).limit_denominator(4096)
        self.reduction = self.knobs.integer("reduction")
        self.min_hidden = self.knobs.integer("min_hidden")
        self.gap = self.knobs.choice("gap", GAP_SCOPES)

    def grouping(self, layer: LayerInfo) -> tuple[int, int]:
        """(M*C_out, G*C_out) for the layer; OperatorConfigError naming the layer when G does not fit it."""
        found = grouping(layer.in_channels, layer.out_channels, layer.groups, layer.kernel_size, self.lam, self.G)
        if found is None:
            per_output = (layer.in_channels // layer.groups) * math.prod(layer.kernel_size)
            raise OperatorConfigError(self._bad_g_message(layer, per_output))
        return found

    def _bad_g_message(self, layer: LayerInfo, per_output: int) -> str:
        integer_choices = [g for g in range(1, 17) if per_output % g == 0]
        return (
            f"op.G={float(self.G):g} does not fit layer '{layer.name}' {layer.shape_str()}: G*C_out must be an "
            f"integer (C_out={layer.out_channels}) and the C_in/g*k*k={per_output} kernel elements of each output "
            f"channel must split into G equal parts; allowed values here: G in {integer_choices} "
            f"or j/{layer.out_channels} with j dividing {layer.out_channels * per_output}"
        )

    def build(self, layer: LayerInfo) -> nn.Module:
        inputs, groups = self.grouping(layer)
        # The module is built in `finalize`: with block/stage sharing FC_1's width depends on the block's input.
        return _Pending(inputs, groups, reduction_width(layer.in_channels, self.reduction, self.min_hidden))

    def finalize(self, model: nn.Module, decisions) -> None:
        """Replace the pending layers: with block/stage sharing FC_1 is sized by the block's input."""
        links, widths = {}, {}
        if self.gap != "layer":
            def make_summary(source: str, channels: int) -> nn.Module:
                widths[source] = reduction_width(channels, self.reduction, self.min_hidden)
                return ReduceGAP(channels, widths[source])

            links = attach_shared_inputs(model, decisions, self.gap, make_summary)
        for decision in decisions:
            if not decision.converted:
                continue
            layer = decision.layer
            parent_name, _, child = layer.name.rpartition(".")
            parent = model.net.get_submodule(parent_name) if parent_name else model.net
            pending = getattr(parent, child)
            shared = links.get(layer.name)
            hidden = pending.hidden if shared is None else widths[shared.source]
            module = WeightNetConv2d(**conv_geometry(layer.module), bias=layer.module.bias is not None,
                                     inputs=pending.inputs, wn_groups=pending.groups, hidden=hidden,
                                     shared=shared is not None)
            if shared is not None:
                link_shared(module, shared)
            setattr(parent, child, module)


class _Pending(nn.Module):
    """Placeholder between build and finalize (FC_1's width depends on the block, known after the pass)."""

    def __init__(self, inputs: int, groups: int, hidden: int):
        super().__init__()
        self.inputs, self.groups, self.hidden = inputs, groups, hidden

    def forward(self, x):  # pragma: no cover - replaced before any forward
        raise RuntimeError("WeightNet layer used before the conversion finished")


