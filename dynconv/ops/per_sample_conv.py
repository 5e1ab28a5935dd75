"""The one per-sample convolution routine shared by every dynamic operator.

Dynamic operators give every sample its own kernel: y_b = W_b * x_b. PyTorch has no batched convolution
with per-sample weights, so this module offers several exact ways to compute it:

- "folded": the batch folded into the groups of one grouped convolution (B*O output channels, B*g groups);
  best when the output has many positions (early layers, detection resolutions) and on GPUs (cuDNN).
- "bmm": im2col (`F.unfold`) and one batched matmul; on CPU far faster than a grouped convolution when the
  output has few positions (late layers, small images), where the grouped kernels are poorly optimised.
- "loop": one convolution per sample; the plain reference, and sometimes the fastest at large resolutions.
- batch size 1 always takes a plain convolution (also what export sees); mixtures mix their kernels there.

Mixture operators (CondConv, DY-Conv, ODConv) combine n static kernels per sample, W_b = sum_i c_bi W_i
(times per-sample spatial and channel scales for ODConv); `mixture_conv2d` has three exact ways to apply
them (the last two in `mixture_algorithms.py`):

- "kernels": mix the kernels, then one per-sample convolution (the papers' formulation);
- "outputs": sum_i c_bi (W_i * x) = (sum_i c_bi W_i) * x by linearity: n static convolutions run as one and
  their outputs are mixed; never materialises B kernels (not with a spatial attention, which is per tap);
- "fused": im2col and a blocked "mix a block of kernels, multiply it at once" matmul: the kernels'
  formulation without writing B kernels to memory; wins on CPU where kernels are large (late layers).

Which algorithm runs is chosen once per layer shape by `algorithm_choice` (timed on the first call and cached
by default; the fixed cost model below under torch.compile or with DYNCONV_CONV_ALGORITHM=model).

MAC counting (`torch.utils.flop_counter`) reads the input channels per group from the weight (C/g), so the
folded path counts exactly B*O*(C/g)*k*k*H'*W'. `canonical_cost_mode()` forces the paper's formulation
(mix the kernels, then convolve once, folded), so profiles do not depend on which algorithm a shape selects.
"""

from __future__ import annotations

import contextlib
from typing import Literal

import torch
import torch.nn.functional as F

from dynconv.ops import algorithm_choice as choice
from dynconv.ops import mixture_algorithms as mixture

Algorithm = Literal["auto", "folded", "bmm", "loop"]
ALGORITHMS = ("auto",) + choice.PER_SAMPLE_ALGORITHMS
MixtureMode = Literal["auto", "kernels", "outputs", "fused"]
MODES = ("auto",) + choice.MIXTURE_MODES
# A plain module flag, not a ContextVar: torch.compile (dynamo) guards on module globals, while reading a
# ContextVar breaks the graph on some torch releases (seen on 2.11).
_canonical_depth = 0

# Cost model (policy "model", torch.compile). CPU: below this many output positions the im2col+bmm path beats a
# grouped convolution (measured on 2 cores: ResNet18 3x3 layers, batch 16-64, 1x1 to 56x56 outputs; the
# crossover sits near 14x14).
BMM_MAX_OUTPUT_POSITIONS = 196
# Cost model for mixture operators: one element of a materialised per-sample kernel costs about as much
# as this many multiply-accumulates of a static convolution (it is written, read once per sample by a
# low-intensity matmul, and gets its own gradient). Fitted on 2 CPU cores, ResNet18 3x3 layers, n = 4 and 8:
# mixing outputs wins below roughly 8x8 outputs at batch 64, mixing kernels above 7x7 at n = 8.
KERNEL_ELEMENT_COST = 200
# The per-sample loop is timed only for small batches: at batch 16 it measured 5-12x slower than the others on
# every ResNet18 layer (2 CPU cores), so timing it there would only make the first step slower.
LOOP_MAX_BATCH = 4


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
    """The cost model's per-sample algorithm (no timing)."""
    if x.device.type == "cpu" and groups == 1 and out_positions <= BMM_MAX_OUTPUT_POSITIONS:
        return "bmm"
    return "folded"


# ------------------------------------------------------------------------------------------ per sample


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
    "auto" takes the algorithm `algorithm_choice` picks for this shape (measured once and cached by default).
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
    if algorithm == "bmm" and groups != 1:
        raise ValueError("the bmm algorithm handles groups=1 only")
    if algorithm == "auto":
        algorithm = _auto_algorithm(x, weight, bias, stride, padding, dilation, groups)
    return _PER_SAMPLE[algorithm](x, weight, bias, stride, padding, dilation, groups)


def _auto_algorithm(x, weight, bias, stride, padding, dilation, groups) -> str:
    if _canonical_depth > 0:
        return "folded"
    out_h, out_w = conv_output_size(x, weight.shape[-2:], stride, padding, dilation)
    model = choose_algorithm(x, weight, groups, out_h * out_w)
    policy = choice.get_policy()
    if policy in choice.PER_SAMPLE_ALGORITHMS:
        return policy if policy != "bmm" or groups == 1 else model
    if policy != "measure" or torch.compiler.is_compiling() or not choice.measuring_allowed(x, weight):
        return model
    if not choice.worth_measuring(weight[0].numel() * x.shape[0] * out_h * out_w):
        return model
    names = ["folded"] + (["bmm"] if groups == 1 else []) + (["loop"] if x.shape[0] <= LOOP_MAX_BATCH else [])
    candidates = {name: _bind(_PER_SAMPLE[name], stride, padding, dilation, groups) for name in names}
    key = choice.shape_key("per_sample_conv2d", x, weight, stride, padding, dilation, groups,
                           "bias" if bias is not None else "", needs_grad=_needs_grad(x, weight, bias))
    return choice.choose(key, candidates, (x, weight, bias), model)


def _bind(fn, *geometry):
    return lambda x, weight, bias: fn(x, weight, bias, *geometry)


def _needs_grad(*tensors) -> tuple[bool, ...]:
    return tuple(t is not None and t.requires_grad for t in tensors)


def _loop(x, weight, bias, stride, padding, dilation, groups):
    return torch.cat([F.conv2d(x[b : b + 1], weight[b], None if bias is None else bias[b], stride, padding,
                               dilation, groups) for b in range(x.shape[0])])


def _bmm(x, weight, bias, stride, padding, dilation, groups):
    batch, out_channels = weight.shape[:2]
    out_h, out_w = conv_output_size(x, weight.shape[-2:], stride, padding, dilation)
    columns = F.unfold(x, weight.shape[-2:], dilation=dilation, padding=padding, stride=stride)
    out = torch.bmm(weight.reshape(batch, out_channels, -1), columns)
    if bias is not None:
        out = out + bias.unsqueeze(-1)
    return out.view(batch, out_channels, out_h, out_w)


def _folded(x, weight, bias, stride, padding, dilation, groups):
    batch, channels = x.shape[:2]
    out_channels = weight.shape[1]
    folded = F.conv2d(x.reshape(1, batch * channels, *x.shape[2:]), weight.reshape(batch * out_channels,
                      *weight.shape[2:]), None if bias is None else bias.reshape(-1), stride, padding, dilation,
                      groups * batch)
    return folded.view(batch, out_channels, *folded.shape[2:])


_PER_SAMPLE = {"folded": _folded, "bmm": _bmm, "loop": _loop}


# ------------------------------------------------------------------------------------------- mixtures


def mixture_conv2d(
    x: torch.Tensor,
    experts: torch.Tensor,
    coefficients: torch.Tensor | None,
    expert_bias: torch.Tensor | None = None,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
    mode: MixtureMode = "auto",
    *,
    spatial: torch.Tensor | None = None,
    channel: torch.Tensor | None = None,
) -> torch.Tensor:
    """y_b = (t_b . sum_i c_bi W_i) * x_b + sum_i c_bi b_i for n kernels W (n, O, C/g, kh, kw), c (B, n).

    t_b, optional, scales each sample's mixed kernel elementwise: `spatial` (B, kh, kw) per kernel position
    and `channel` (B, C) per input channel (ODConv's spatial and channel attentions; the channel one equals
    scaling the input, x_b . channel_b, which an algorithm may do instead). `coefficients` None means n = 1:
    the one kernel, shared. "kernels" mixes the kernels, then runs one per-sample convolution (the papers'
    formulation); "outputs" runs the n static convolutions as one and mixes their outputs (not with
    `spatial`); "fused" mixes the kernels block by block inside an im2col matmul (groups=1 only).
    "auto": `algorithm_choice` decides (measured once per shape by default).
    """
    if mode not in MODES:
        raise ValueError(f"unknown mixture mode {mode!r}; allowed: {', '.join(MODES)}")
    if coefficients is None and experts.shape[0] != 1:
        raise ValueError(f"coefficients may be None only for a single kernel, got {experts.shape[0]}")
    scales = (spatial, channel)
    if mode == "auto":
        mode = _auto_mode(x, experts, coefficients, expert_bias, scales, stride, padding, dilation, groups)
    elif mode == "outputs" and spatial is not None:
        raise ValueError("mode='outputs' cannot apply a spatial attention (it scales kernel taps, per sample)")
    elif mode == "fused" and groups != 1:
        raise ValueError("mode='fused' handles groups=1 only")
    return _run_mixture(mode, stride, padding, dilation, groups)(x, experts, coefficients, expert_bias, *scales)


def _run_mixture(mode: str, stride, padding, dilation, groups):
    """Mode `mode` as a function of the tensors alone, fn(x, experts, coefficients, bias, spatial, channel)."""
    if mode == "kernels":
        return lambda *tensors: _by_kernels(*tensors, stride, padding, dilation, groups)
    if mode == "outputs":
        return lambda *tensors: mixture.by_outputs(*tensors, stride, padding, dilation, groups)

    def fused(x, experts, *rest):
        out_size = conv_output_size(x, experts.shape[-2:], stride, padding, dilation)
        return mixture.by_fused(x, experts, *rest, stride, padding, dilation, groups, out_size)

    return fused


def _auto_mode(x, experts, coefficients, expert_bias, scales, stride, padding, dilation, groups) -> str:
    if _canonical_depth > 0:
        return "kernels"
    spatial, channel = scales
    model = _model_mode(x, experts, spatial, stride, padding, dilation)
    applicable = [m for m in choice.MIXTURE_MODES if _applicable(m, x, spatial, groups)]
    policy = choice.get_policy()
    if policy in choice.PER_SAMPLE_ALGORITHMS:
        return "kernels"  # so that the forced per-sample algorithm is what runs
    if policy in choice.MIXTURE_MODES:
        return policy if policy in applicable else model
    if policy != "measure" or torch.compiler.is_compiling() or not choice.measuring_allowed(x, experts):
        return model
    if x.shape[0] == 1:
        # Batch 1 is memory-bound (reading the n kernels dominates) and takes the plain-convolution fast path:
        # timing repeated calls there measures warm caches, not the network's cold ones (measured, it picked
        # "fused" for ResNet18's last stage, which was slower inside the whole network on 2 CPU cores).
        return model
    out_h, out_w = conv_output_size(x, experts.shape[-2:], stride, padding, dilation)
    if not choice.worth_measuring(experts[0].numel() * x.shape[0] * out_h * out_w):
        return model
    candidates = {m: _run_mixture(m, stride, padding, dilation, groups) for m in applicable}
    flags = [name for name, t in (("bias", expert_bias), ("spatial", spatial), ("channel", channel)) if t is not None]
    key = choice.shape_key("mixture_conv2d", x, experts, stride, padding, dilation, groups, *flags,
                           needs_grad=_needs_grad(x, experts, coefficients, expert_bias, spatial, channel))
    return choice.choose(key, candidates, (x, experts, coefficients, expert_bias, spatial, channel), model)


def _applicable(mode: str, x: torch.Tensor, spatial, groups: int) -> bool:
    if mode == "outputs":
        return spatial is None
    if mode == "fused":
        # Under autocast the custom autograd function would see mixed dtypes in its backward: leave it out.
        device = x.device.type
        return groups == 1 and not (device in ("cpu", "cuda") and torch.is_autocast_enabled(device))
    return True


def _model_mode(x, experts, spatial, stride, padding, dilation) -> str:
    """The cost model's mixing mode (no timing): kernels at batch 1 and with a spatial attention."""
    if x.shape[0] == 1 or spatial is not None:
        return "kernels"
    return _cheaper_mixture(x, experts, x.shape[0], stride, padding, dilation)


def _by_kernels(x, experts, coefficients, expert_bias, spatial, channel, stride, padding, dilation, groups):
    """The papers' formulation: W_b = t_b . sum_i c_bi W_i materialised, then `per_sample_conv2d`."""
    batch = x.shape[0]
    _, out_channels, in_per_group, kh, kw = experts.shape
    if coefficients is None:
        kernels = experts[:1]  # n = 1: every sample shares it (broadcast below)
    else:
        kernels = (coefficients @ experts.flatten(1)).view(batch, *experts.shape[1:])
    if channel is not None and spatial is None and x[0].numel() <= kernels[0].numel():
        # Scaling the input costs a pass over x, scaling the kernels a pass over them: take the smaller. With
        # a spatial scale the kernels are scaled anyway, and the channel scale rides along for free.
        x, channel = x * channel[:, :, None, None], None
    scale = mixture.tap_scale(spatial, channel, groups, in_per_group, kh, kw)
    if scale is not None:
        kernels = kernels.view(-1, groups, out_channels // groups, in_per_group, kh, kw) * scale
    kernels = kernels.reshape(-1, *experts.shape[1:]).expand(batch, *experts.shape[1:])
    return per_sample_conv2d(x, kernels, mixture.mixed_bias(coefficients, expert_bias, batch), stride, padding,
                             dilation, groups)


def _cheaper_mixture(x, experts, batch, stride, padding, dilation) -> str:
    out_h, out_w = conv_output_size(x, experts.shape[-2:], stride, padding, dilation)
    kernel_elements = experts[0].numel()  # O * C/g * kh * kw
    conv_macs = batch * kernel_elements * out_h * out_w
    num_experts = experts.shape[0]
    mix_kernels = batch * kernel_elements * (num_experts + KERNEL_ELEMENT_COST) + conv_macs
    mix_outputs = num_experts * conv_macs
    return "kernels" if mix_kernels <= mix_outputs else "outputs"
