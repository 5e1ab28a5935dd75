"""Mixture convolutions: n static kernels combined per sample, W_b = t_b . sum_i c_bi W_i (CondConv, DY-Conv,
ODConv), with four exact algorithms (two in `mixture_algorithms.py`, one in `triton_mixture.py`):

- "kernels": mix the kernels, then one `per_sample_conv2d` (the papers' formulation: what MAC counting runs);
- "outputs": sum_i c_bi (W_i * x) = (sum_i c_bi W_i) * x by linearity: n static convolutions run as one and
  their outputs are mixed; never materialises B kernels (not with a spatial attention, which is per tap);
- "fused": im2col and a blocked "mix a block of kernels, multiply it at once" matmul: the kernels'
  formulation without writing B kernels to memory; wins on CPU where kernels are large (late layers).
- "triton": a Triton implicit-GEMM convolution that mixes the kernels inside its tiles (CUDA; on CPU tensors an
  explicit mode="triton" runs Triton's interpreter, for tests).

Which one runs is `dynconv.functional.selector`'s decision (measured once per layer shape class by default).
"""

from __future__ import annotations

from typing import Literal

import torch

from dynconv.functional import kernel_capture, recompute, selector, triton_mixture
from dynconv.functional import mixture_algorithms as algorithms
from dynconv.functional.per_sample import conv_output_size, per_sample_conv2d

MixtureMode = Literal["auto", "kernels", "outputs", "fused", "triton"]
MODES = ("auto",) + selector.MIXTURE_MODES
# Cost model: one element of a materialised per-sample kernel costs about as much as this many
# multiply-accumulates of a static convolution (it is written, read once per sample by a low-intensity matmul,
# and gets its own gradient). Fitted on 2 CPU cores, ResNet18 3x3 layers, n = 4 and 8: mixing outputs wins below
# roughly 8x8 outputs at batch 64, mixing kernels above 7x7 at n = 8. DyNet's fusion cost model uses it too.
KERNEL_ELEMENT_COST = 200


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
    filter: torch.Tensor | None = None,
) -> torch.Tensor:
    """y_b = (t_b . sum_i c_bi W_i) * x_b + f_b . sum_i c_bi b_i for n kernels W (n, O, C/g, kh, kw), c (B, n).

    t_b, optional, scales each sample's mixed kernel elementwise: `spatial` (B, kh, kw) per kernel position,
    `channel` (B, C) per input channel and `filter` f_b (B, O) per output channel (ODConv's spatial, channel and
    filter attentions). The channel scale equals scaling the input, x_b . channel_b, and the filter scale scaling
    the output (bias included), which an algorithm may do instead. `coefficients` None means n = 1: the one
    kernel, shared. "auto": the selector decides.
    """
    if mode not in MODES:
        raise ValueError(f"unknown mixture mode {mode!r}; allowed: {', '.join(MODES)}")
    if coefficients is None and experts.shape[0] != 1:
        raise ValueError(f"coefficients may be None only for a single kernel, got {experts.shape[0]}")
    tensors = (x, experts, coefficients, expert_bias, spatial, channel, filter)
    geometry = (stride, padding, dilation, groups)
    if kernel_capture.active():  # analysis: materialise t_b . W_b, so that per_sample_conv2d records it
        mode = "kernels"
    if mode == "auto":
        mode = selector.select(MIXTURE, tensors, geometry)
    elif mode == "outputs" and spatial is not None:
        raise ValueError("mode='outputs' cannot apply a spatial attention (it scales kernel taps, per sample)")
    elif mode == "fused" and groups != 1:
        raise ValueError("mode='fused' handles groups=1 only")
    return _run(mode, tensors, geometry)


def _run(mode: str, tensors, geometry) -> torch.Tensor:
    if mode == "kernels":
        return _by_kernels(*tensors, *geometry)
    if mode == "outputs":
        return algorithms.by_outputs(*tensors, *geometry)
    if mode == "triton":
        return triton_mixture.by_triton(*tensors, *geometry)
    x, experts = tensors[:2]
    out_size = conv_output_size(x, experts.shape[-2:], *geometry[:3])
    return algorithms.by_fused(*tensors, *geometry, out_size)


class MixtureRoutine(selector.Routine):
    """`mixture_conv2d` for the selector; tensors = (x, experts, coefficients, bias, spatial, channel, filter),
    params = (stride, padding, dilation, groups)."""

    name = "mixture_conv2d"
    makes_kernels = True
    algorithms = selector.MIXTURE_MODES
    canonical = "kernels"
    # A forced per-sample algorithm needs materialised kernels to run on.
    forced = {**{mode: mode for mode in selector.MIXTURE_MODES},
              **{name: "kernels" for name in selector.PER_SAMPLE_ALGORITHMS}}
    # "fused" is not: its blocks of output channels are sized by the batch (`mixture_algorithms.channel_blocks`).
    batch_free = ("outputs", "kernels")

    def applicable(self, algorithm, tensors, params):
        x, spatial = tensors[0], tensors[4]
        if algorithm == "outputs":
            return spatial is None
        if algorithm == "fused":
            return params[3] == 1
        if algorithm == "triton":  # CUDA only (the interpreter, on CPU tensors, is for tests)
            return triton_mixture.applicable(x, tensors[1], params[3])
        return True

    def cost_model(self, tensors, params):
        """Kernels at batch 1 and with a spatial attention; else the cheaper of mixing kernels and outputs."""
        x, spatial = tensors[0], tensors[4]
        if x.shape[0] == 1 or spatial is not None:
            return "kernels"
        return "kernels" if _kernels_cheaper(tensors, params) else "outputs"

    def export_choice(self, tensors, params):
        """The cost model without its batch-1 rule (an exported graph serves every batch size)."""
        return "kernels" if tensors[4] is not None or _kernels_cheaper(tensors, params) else "outputs"

    def macs(self, tensors, params):
        x, experts = tensors[:2]
        out_h, out_w = conv_output_size(x, experts.shape[-2:], *params[:3])
        return experts[0].numel() * x.shape[0] * out_h * out_w

    def shape_key(self, tensors, params):
        x, experts, _, bias, spatial, channel, filter = tensors
        flags = tuple(name for name, t in (("bias", bias), ("spatial", spatial), ("channel", channel),
                                           ("filter", filter)) if t is not None)
        return selector.conv_shape_key(x, experts.shape, *params, flags)

    def run(self, algorithm, tensors, params):
        return _run(algorithm, tensors, params)


MIXTURE = MixtureRoutine()


def _kernels_cheaper(tensors, params) -> bool:
    """Whether mixing the kernels costs at most mixing the outputs, per sample (the batch cancels): one
    convolution plus each kernel element mixed from n and written (`KERNEL_ELEMENT_COST`), against n convolutions.
    Per kernel element: n + KERNEL_ELEMENT_COST + P <= n * P, P the output positions."""
    x, experts = tensors[:2]
    out_h, out_w = conv_output_size(x, experts.shape[-2:], *params[:3])
    positions, n = out_h * out_w, experts.shape[0]
    return n + KERNEL_ELEMENT_COST + positions <= n * positions


def _by_kernels(x, experts, coefficients, expert_bias, spatial, channel, filter, stride, padding, dilation, groups):
    """The papers' formulation: W_b = t_b . sum_i c_bi W_i materialised, then `per_sample_conv2d`. Under
    `recompute.enabled` the backward mixes the kernels again instead of keeping them."""
    batch = x.shape[0]
    _, _, in_per_group, kh, kw = experts.shape
    capturing = kernel_capture.active()  # a capture records the kernel with every scale folded in
    out_h, out_w = conv_output_size(x, (kh, kw), stride, padding, dilation)
    # Each scale goes where it costs the smaller pass: on the kernels, or on the input (channel) / output (filter)
    # feature map (per output channel: C/g k k kernel elements against H' W' output positions). Folding the filter
    # scale also spares autograd the unscaled output, kept for its gradient; where the kernels are the larger
    # (ResNet's later stages), scaling them would cost more, in the backward most (kernel-sized temporaries).
    fold_filter = filter is not None and (capturing or in_per_group * kh * kw <= out_h * out_w)
    output_scale = None
    if filter is not None and not fold_filter:
        output_scale, filter = filter, None
    if (channel is not None and spatial is None and filter is None and x[0].numel() <= experts[0].numel()
            and not capturing):
        x, channel = x * channel[:, :, None, None], None
    bias = algorithms.filtered_bias(coefficients, expert_bias, filter, batch)
    scales = (spatial, channel, filter)

    def mix(note) -> torch.Tensor:
        """The batch's kernels (B, O, C/g, kh, kw); `note` sees each materialised tensor (`recompute`)."""
        kernels = note(algorithms.mix_kernels(experts, coefficients, batch))
        scaled = algorithms.scale_kernels(kernels, *scales, groups)
        return kernels if scaled is kernels else note(scaled)

    if coefficients is None:  # n = 1: one kernel (scaled per sample, or shared by broadcast), nothing recomputed
        kernels = algorithms.mix_kernels(experts, None, batch)
        kernels = algorithms.scale_kernels(kernels, *scales, groups).expand(batch, *experts.shape[1:])
        out = per_sample_conv2d(x, kernels, bias, stride, padding, dilation, groups)
    else:
        with recompute.materialised(mix, x, experts, coefficients, spatial, channel, filter) as kernels:
            out = per_sample_conv2d(x, kernels, bias, stride, padding, dilation, groups)
    return algorithms.scale_outputs(out, output_scale)
