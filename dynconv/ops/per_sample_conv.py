"""The one per-sample convolution routine shared by every dynamic operator.

Dynamic operators give every sample its own kernel: y_b = W_b * x_b. PyTorch has no batched convolution
with per-sample weights, so this module offers several exact ways to compute it and picks one by shape:

- "folded": the batch folded into the groups of one grouped convolution (B*O output channels, B*g groups);
  best when the output has many positions (early layers, detection resolutions) and on GPUs (cuDNN).
- "bmm": im2col (`F.unfold`) and one batched matmul; on CPU far faster than a grouped convolution when the
  output has few positions (late layers, small images), where the grouped kernels are poorly optimised.
- "loop": one convolution per sample; the plain reference, kept for tests.
- batch size 1 always takes a plain convolution (also what export sees).

Mixture operators (CondConv, DY-Conv) may instead mix the *outputs* of their n static kernels
(`mixture_conv2d`): sum_i r_i (W_i * x) equals (sum_i r_i W_i) * x by linearity, and costs n convolutions
but never materialises B per-sample kernels, which dominate the cost when kernels are large and feature maps
small (ResNet's last stage on 32x32 inputs: 64 samples x 2.4M weights per layer).

MAC counting (`torch.utils.flop_counter`) reads the input channels per group from the weight (C/g), so the
folded path counts exactly B*O*(C/g)*k*k*H'*W'. `canonical_cost_mode()` forces the paper's formulation
(mix the kernels, then convolve once), so profiles do not depend on which algorithm the shape selects.
"""

from __future__ import annotations

import contextlib
from typing import Literal

import torch
import torch.nn.functional as F

Algorithm = Literal["auto", "folded", "bmm", "loop"]
ALGORITHMS = ("auto", "folded", "bmm", "loop")
# A plain module flag, not a ContextVar: torch.compile (dynamo) guards on module globals, while reading a
# ContextVar breaks the graph on some torch releases (seen on 2.11).
_canonical_depth = 0

# CPU: below this many output positions the im2col+bmm path beats a grouped convolution (measured on
# 2 cores: ResNet18 3x3 layers, batch 16-64, 1x1 to 56x56 outputs; the crossover sits near 14x14).
BMM_MAX_OUTPUT_POSITIONS = 196
# Cost model for mixture operators: one element of a materialised per-sample kernel costs about as much
# as this many multiply-accumulates of a static convolution (it is written, read once per sample by a
# low-intensity matmul, and gets its own gradient). Fitted on 2 CPU cores, ResNet18 3x3 layers, n = 4 and 8:
# mixing outputs wins below roughly 8x8 outputs at batch 64, mixing kernels above 7x7 at n = 8.
KERNEL_ELEMENT_COST = 200


@contextlib.contextmanager
def canonical_cost_mode():
    """Within this block, dynamic layers compute in the papers' formulation (for MAC counting)."""
    global _canonical_depth
    _canonical_depth += 1
    try:
        yield
    finally:
        _canonical_depth -= 1


def _pair(value) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)


def conv_output_size(x: torch.Tensor, kernel_size, stride, padding, dilation) -> tuple[int, int]:
    kh, kw = _pair(kernel_size)
    (sh, sw), (ph, pw), (dh, dw) = _pair(stride), _pair(padding), _pair(dilation)
    height = (x.shape[-2] + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    width = (x.shape[-1] + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    return height, width


def choose_algorithm(x: torch.Tensor, weight: torch.Tensor, groups: int, out_positions: int) -> str:
    if x.device.type == "cpu" and groups == 1 and out_positions <= BMM_MAX_OUTPUT_POSITIONS:
        return "bmm"
    return "folded"


def per_sample_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
    groups: int = 1,
    algorithm: Algorithm = "auto",
) -> torch.Tensor:
    """Convolve sample b of x (B, C, H, W) with its own kernel weight[b] (B, O, C/groups, kh, kw).

    bias, if given, is per sample: (B, O). Any stride, padding, dilation and groups (depthwise included).
    """
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {algorithm!r}; allowed: {', '.join(ALGORITHMS)}")
    batch, channels = x.shape[:2]
    if weight.dim() != 5 or weight.shape[0] != batch:
        raise ValueError(f"per-sample weight must be (B={batch}, O, C/g, kh, kw), got {tuple(weight.shape)}")
    if weight.shape[2] * groups != channels:
        raise ValueError(
            f"weight expects {weight.shape[2] * groups} input channels (groups={groups}), input has {channels}"
        )
    if batch == 1:
        # No folding needed: a plain convolution, which also exports with a free batch dimension.
        return F.conv2d(x, weight[0], None if bias is None else bias[0], stride, padding, dilation, groups)
    out_h, out_w = conv_output_size(x, weight.shape[-2:], stride, padding, dilation)
    if algorithm == "auto":
        algorithm = "folded" if _canonical_depth > 0 else choose_algorithm(x, weight, groups, out_h * out_w)
    if algorithm == "loop":
        return torch.cat(
            [
                F.conv2d(x[b : b + 1], weight[b], None if bias is None else bias[b], stride, padding, dilation, groups)
                for b in range(batch)
            ]
        )
    out_channels = weight.shape[1]
    if algorithm == "bmm":
        if groups != 1:
            raise ValueError("the bmm algorithm handles groups=1 only")
        columns = F.unfold(x, weight.shape[-2:], dilation=dilation, padding=padding, stride=stride)
        out = torch.bmm(weight.reshape(batch, out_channels, -1), columns)
        if bias is not None:
            out = out + bias.unsqueeze(-1)
        return out.view(batch, out_channels, out_h, out_w)
    folded = F.conv2d(
        x.reshape(1, batch * channels, *x.shape[2:]),
        weight.reshape(batch * out_channels, *weight.shape[2:]),
        None if bias is None else bias.reshape(-1),
        stride,
        padding,
        dilation,
        groups * batch,
    )
    return folded.view(batch, out_channels, out_h, out_w)


def mixture_conv2d(
    x: torch.Tensor,
    experts: torch.Tensor,
    coefficients: torch.Tensor,
    expert_bias: torch.Tensor | None = None,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
    mode: Literal["auto", "kernels", "outputs"] = "auto",
) -> torch.Tensor:
    """y_b = (sum_i c_bi W_i) * x_b + sum_i c_bi b_i for n expert kernels W (n, O, C/g, kh, kw), c (B, n).

    "kernels" mixes the kernels, then runs one per-sample convolution (the papers' formulation);
    "outputs" runs the n static convolutions as one and mixes their outputs. "auto" picks the cheaper.
    """
    batch, num_experts = coefficients.shape
    out_channels = experts.shape[1]
    if mode == "auto":
        mode = "kernels" if _canonical_depth > 0 or batch == 1 else _cheaper_mixture(x, experts, batch, stride, padding,
                                                                                 dilation)
    bias = coefficients @ expert_bias if expert_bias is not None else None
    if mode == "kernels":
        kernels = (coefficients @ experts.flatten(1)).view(batch, *experts.shape[1:])
        return per_sample_conv2d(x, kernels, bias, stride, padding, dilation, groups)
    # Lay the n experts out group by group so one grouped convolution computes all of them.
    per_group = out_channels // groups
    stacked = experts.view(num_experts, groups, per_group, *experts.shape[2:]).transpose(0, 1)
    outputs = F.conv2d(x, stacked.reshape(groups * num_experts * per_group, *experts.shape[2:]), None, stride,
                       padding, dilation, groups)
    outputs = outputs.view(batch, groups, num_experts, per_group, *outputs.shape[2:])
    mixed = torch.einsum("bn,bgnohw->bgohw", coefficients, outputs).reshape(batch, out_channels, *outputs.shape[-2:])
    if bias is not None:
        mixed = mixed + bias[:, :, None, None]
    return mixed


def _cheaper_mixture(x, experts, batch, stride, padding, dilation) -> str:
    out_h, out_w = conv_output_size(x, experts.shape[-2:], stride, padding, dilation)
    kernel_elements = experts[0].numel()  # O * C/g * kh * kw
    conv_macs = batch * kernel_elements * out_h * out_w
    num_experts = experts.shape[0]
    mix_kernels = batch * kernel_elements * (num_experts + KERNEL_ELEMENT_COST) + conv_macs
    mix_outputs = num_experts * conv_macs
    return "kernels" if mix_kernels <= mix_outputs else "outputs"
