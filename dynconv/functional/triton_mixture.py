"""`mixture_conv2d`'s "triton" algorithm: an implicit-GEMM convolution that mixes the n kernels inside its tiles.

y_b = (t_b . sum_i c_bi W_i) * x_b, with W_b never written to memory: each program computes one tile of one
sample's output (BLOCK_P positions x BLOCK_O output channels of one group) as a sum over the reduction dimension
K = C/g * kh * kw, and for each BLOCK_K slice of it gathers the input tile from x (implicit im2col: no columns in
memory) and mixes the weight tile from the n kernels with the sample's coefficients, scaled by ODConv's per-tap
factors (spatial x channel), before one `tl.dot`. The filter scale and the mixed bias are applied to the
accumulator. On a GPU this replaces "fold the batch into the groups of a cuDNN grouped convolution", whose speed
is erratic across shapes, and "mix B kernels, then convolve", which writes and reads B kernels.

Inference only (no backward): in training the backward would need two more kernels (the transposed convolution
for the input's gradient and a per-sample kernel-gradient GEMM), not written because no GPU was available to
measure whether the forward alone wins. The selector offers it only where no gradient is needed, on CUDA tensors,
and only measures it: it runs where it is the timed winner of its shape.

Exactness is tested on the CPU through Triton's interpreter (`InterpretedFunction`, which runs the same kernel
with NumPy): an explicit `mode="triton"` on CPU tensors takes that path (slow; for tests and references), in
float64 against the per-sample reference (tests/test_triton_mixture.py). Accumulation is in float32 (float64 for
float64 inputs) with exact float32 products (`input_precision="ieee"`, no TF32), so it agrees with the other
algorithms to rounding.
"""

from __future__ import annotations

import functools
import importlib.util

import torch

from dynconv.functional.per_sample import _pair, conv_output_size

# Tile sizes. tl.dot needs at least 16 along each dimension; a group with fewer output channels (depthwise and
# narrow grouped convolutions) would waste most of each tile, so the selector does not offer it there.
BLOCK_P = 64
BLOCK_K = 32
MIN_OUT_PER_GROUP = 16
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def available() -> bool:
    """Whether Triton can be imported (it ships with the CUDA builds of PyTorch)."""
    return importlib.util.find_spec("triton") is not None


def applicable(x: torch.Tensor, experts: torch.Tensor, groups: int) -> bool:
    """Whether the selector may time it for this call: CUDA, a supported dtype, no gradient wanted, output groups
    of at least `MIN_OUT_PER_GROUP` channels. (An explicit `mode="triton"` also runs on the CPU, interpreted.)"""
    return (x.is_cuda and x.dtype in DTYPES and experts.dtype == x.dtype and experts.shape[1] // groups
            >= MIN_OUT_PER_GROUP and available())


def _kernel_source():
    """The kernel, defined only when Triton is imported (it is optional: CPU builds of PyTorch lack it)."""
    import triton.language as tl

    def mixture_conv_kernel(
        x_ptr, experts_ptr, coefficients_ptr, bias_ptr, spatial_ptr, channel_ptr, filter_ptr, out_ptr,
        num_experts, channels, height, width, out_channels, out_height, out_width,
        stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
        in_per_group, out_per_group, p_blocks, o_blocks,
        KH: tl.constexpr, KW: tl.constexpr, HAS_COEFFICIENTS: tl.constexpr, HAS_BIAS: tl.constexpr,
        HAS_SPATIAL: tl.constexpr, HAS_CHANNEL: tl.constexpr, HAS_FILTER: tl.constexpr, ACC: tl.constexpr,
        BLOCK_P: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        # One flat grid (a depthwise layer at batch 100 has more sample-groups than a grid axis allows).
        pid = tl.program_id(0)
        o_block = pid % o_blocks
        p_block = (pid // o_blocks) % p_blocks
        sample_group = pid // (o_blocks * p_blocks)
        groups = channels // in_per_group
        b = sample_group // groups
        g = sample_group % groups
        reduction = in_per_group * KH * KW
        positions = out_height * out_width

        p = p_block * BLOCK_P + tl.arange(0, BLOCK_P)
        o = o_block * BLOCK_O + tl.arange(0, BLOCK_O)
        p_ok = p < positions
        o_ok = o < out_per_group
        oh = p // out_width
        ow = p % out_width
        out_channel = g * out_per_group + o
        x_sample = x_ptr + b.to(tl.int64) * channels * height * width
        acc = tl.full((BLOCK_P, BLOCK_O), 0.0, dtype=ACC)
        for k0 in range(0, reduction, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            k_ok = k < reduction
            c = k // (KH * KW)  # k = c kh kw + i kw + j, the layout of a kernel (O, C/g, kh, kw)
            tap = k % (KH * KW)
            i = tap // KW
            j = tap % KW
            ih = oh[:, None] * stride_h - pad_h + i[None, :] * dil_h
            iw = ow[:, None] * stride_w - pad_w + j[None, :] * dil_w
            inside = (ih >= 0) & (ih < height) & (iw >= 0) & (iw < width) & p_ok[:, None] & k_ok[None, :]
            in_channel = g * in_per_group + c
            patch = tl.load(x_sample + (in_channel[None, :] * height + ih) * width + iw, mask=inside, other=0.0)
            # The sample's weight tile (BLOCK_K, BLOCK_O): sum_i c_bi W_i, mixed here, never stored.
            w_ok = k_ok[:, None] & o_ok[None, :]
            w_offsets = out_channel[None, :] * reduction + k[:, None]
            if HAS_COEFFICIENTS:
                weight = tl.full((BLOCK_K, BLOCK_O), 0.0, dtype=ACC)
                for n in range(0, num_experts):
                    coefficient = tl.load(coefficients_ptr + b * num_experts + n).to(ACC)
                    expert = tl.load(experts_ptr + n * out_channels * reduction + w_offsets, mask=w_ok, other=0.0)
                    weight += coefficient * expert.to(ACC)
            else:
                weight = tl.load(experts_ptr + w_offsets, mask=w_ok, other=0.0).to(ACC)
            if HAS_SPATIAL:  # ODConv's per-tap scales, on the K rows of the tile
                weight *= tl.load(spatial_ptr + b * KH * KW + tap, mask=k_ok, other=0.0).to(ACC)[:, None]
            if HAS_CHANNEL:
                weight *= tl.load(channel_ptr + b * channels + in_channel, mask=k_ok, other=0.0).to(ACC)[:, None]
            acc += tl.dot(patch.to(ACC), weight, input_precision="ieee", out_dtype=ACC)
        if HAS_BIAS:  # the mixed bias (B, O), before the filter scale like the kernels' own bias
            acc += tl.load(bias_ptr + b * out_channels + out_channel, mask=o_ok, other=0.0).to(ACC)[None, :]
        if HAS_FILTER:
            acc *= tl.load(filter_ptr + b * out_channels + out_channel, mask=o_ok, other=0.0).to(ACC)[None, :]
        out = out_ptr + (b.to(tl.int64) * out_channels + out_channel[None, :]) * positions + p[:, None]
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=p_ok[:, None] & o_ok[None, :])

    return mixture_conv_kernel


@functools.cache
def _compiled(interpreted: bool):
    """The jitted kernel for the GPU, or the interpreted one for CPU tensors (tests)."""
    import triton

    source = _kernel_source()
    if interpreted:
        from triton.runtime.interpreter import InterpretedFunction

        return InterpretedFunction(source)
    return triton.jit(source)


def by_triton(x, experts, coefficients, expert_bias, spatial, channel, filter, stride, padding, dilation, groups):
    """`mixture_conv2d`'s signature; CUDA tensors run compiled, CPU tensors through Triton's interpreter."""
    if not available():
        raise ValueError("mode='triton' needs Triton (it ships with CUDA builds of PyTorch: pip install triton)")
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                       for t in (x, experts, coefficients, expert_bias, spatial, channel, filter)):
        raise ValueError("mode='triton' is inference-only (no backward): run it under torch.no_grad() or "
                         "torch.inference_mode(), or use another mode for training")
    if x.dtype not in DTYPES:
        raise ValueError(f"mode='triton' supports {', '.join(str(d) for d in DTYPES)}, got {x.dtype}")
    import triton.language as tl

    batch, channels, height, width = x.shape
    num_experts, out_channels, in_per_group, kh, kw = experts.shape
    out_h, out_w = conv_output_size(x, (kh, kw), stride, padding, dilation)
    (sh, sw), (ph, pw), (dh, dw) = _pair(stride), _pair(padding), _pair(dilation)
    out_per_group = out_channels // groups
    bias = None
    if expert_bias is not None:
        bias = expert_bias[0].expand(batch, -1) if coefficients is None else coefficients @ expert_bias
        bias = bias.to(x.dtype).contiguous()
    x, experts = x.contiguous(), experts.to(x.dtype).contiguous()
    optional = [None if t is None else t.to(x.dtype).contiguous() for t in (coefficients, spatial, channel, filter)]
    coefficients, spatial, channel, filter = optional
    out = x.new_empty(batch, out_channels, out_h, out_w)
    block_o = min(64, max(16, 1 << (out_per_group - 1).bit_length()))
    p_blocks = -(-out_h * out_w // BLOCK_P)
    o_blocks = -(-out_per_group // block_o)
    placeholder = experts  # a valid pointer for the absent optional tensors (their loads are compiled out)
    _compiled(not x.is_cuda)[(batch * groups * p_blocks * o_blocks,)](
        x, experts, *(placeholder if t is None else t for t in (coefficients, bias, spatial, channel, filter)), out,
        num_experts, channels, height, width, out_channels, out_h, out_w, sh, sw, ph, pw, dh, dw,
        in_per_group, out_per_group, p_blocks, o_blocks,
        KH=kh, KW=kw, HAS_COEFFICIENTS=coefficients is not None, HAS_BIAS=bias is not None,
        HAS_SPATIAL=spatial is not None, HAS_CHANNEL=channel is not None, HAS_FILTER=filter is not None,
        ACC=tl.float64 if x.dtype == torch.float64 else tl.float32, BLOCK_P=BLOCK_P, BLOCK_O=block_o,
        BLOCK_K=BLOCK_K)
    return out
