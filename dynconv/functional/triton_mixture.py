"""`mixture_conv2d`'s "triton" algorithm: an implicit-GEMM convolution that mixes the n kernels inside its tiles.

y_b = (t_b . sum_i c_bi W_i) * x_b, with W_b never written to memory: each program computes one tile of one
sample's output (BLOCK_P positions x BLOCK_O output channels of one group) as a sum over the reduction dimension
K = C/g * kh * kw, and for each BLOCK_K slice of it gathers the input tile from x (implicit im2col: no columns in
memory) and mixes the weight tile from the n kernels with the sample's coefficients, scaled by ODConv's per-tap
factors (spatial x channel), before one `tl.dot`. The filter scale and the mixed bias are applied to the
accumulator. On a GPU this replaces "fold the batch into the groups of a cuDNN grouped convolution", whose speed
is erratic across shapes, and "mix B kernels, then convolve", which writes and reads B kernels.

The backward (training) mixes the batch's kernels once, as the "kernels" algorithm does, and hands them to the
convolution's own backward with the batch folded into the groups (cuDNN on a GPU): the input's gradient and the
per-sample kernels' gradient, from which autograd of the mixing gives the coefficients', kernels', scales' and
bias's. It keeps only the inputs (no kernels, no output), so it needs no `recompute`. Writing the backward's two
convolutions as Triton kernels too is left until a GPU has measured the forward; the selector times this
algorithm, forward and backward, only on CUDA tensors, and it runs only where it wins.

Exactness is tested on the CPU through Triton's interpreter (`InterpretedFunction`, which runs the same kernel
with NumPy): an explicit `mode="triton"` on CPU tensors takes that path (slow; for tests and references), in
float64 against the per-sample reference (tests/test_triton_mixture.py). Accumulation is in float32 (float64 for
float64 inputs); float32 products are made as cuDNN makes the other algorithms' convolutions on the same GPU (TF32
where `torch.backends.cudnn.allow_tf32`, PyTorch's default, else exact), so the choice between algorithms never
changes the precision class.
"""

from __future__ import annotations

import functools

import torch

try:  # Triton ships with the CUDA builds of PyTorch; CPU builds lack it, and this algorithm then never applies
    import triton
    import triton.language as tl
except ImportError:
    triton = tl = None

from dynconv.functional import mixture_algorithms as algorithms
from dynconv.functional.per_sample import _pair, conv_output_size

# Tile sizes (`_tiles`): tl.dot needs at least 16 along each dimension; a group with fewer output channels
# (depthwise and narrow grouped convolutions) would waste most of each tile, so the selector does not offer it there.
BLOCK_K = 32
MIN_OUT_PER_GROUP = 16
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def available() -> bool:
    """Whether Triton can be imported (it ships with the CUDA builds of PyTorch)."""
    return tl is not None


def applicable(x: torch.Tensor, experts: torch.Tensor, groups: int) -> bool:
    """Whether the selector may time it for this call: CUDA, a supported dtype, output groups of at least
    `MIN_OUT_PER_GROUP` channels. (An explicit `mode="triton"` also runs on the CPU, interpreted.)"""
    return (x.is_cuda and x.dtype in DTYPES and experts.dtype == x.dtype and experts.shape[1] // groups
            >= MIN_OUT_PER_GROUP and available())


# The kernel as a plain function: `_compiled` jits it for the GPU or wraps it for the interpreter.
def _mixture_conv_kernel(
    x_ptr, experts_ptr, coefficients_ptr, bias_ptr, spatial_ptr, channel_ptr, filter_ptr, out_ptr,
    num_experts, channels, height, width, out_channels, out_height, out_width,
    x_sb, x_sc, x_sh, x_sw, out_sb, out_sc, out_sh, out_sw,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    in_per_group, out_per_group, p_blocks, o_blocks,
    KH: tl.constexpr, KW: tl.constexpr, HAS_COEFFICIENTS: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_SPATIAL: tl.constexpr, HAS_CHANNEL: tl.constexpr, HAS_FILTER: tl.constexpr, ACC: tl.constexpr,
    DOT: tl.constexpr, PRECISION: tl.constexpr,
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
    x_sample = x_ptr + b.to(tl.int64) * x_sb  # strides: NCHW or channels-last alike
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
        patch = tl.load(x_sample + in_channel[None, :] * x_sc + ih * x_sh + iw * x_sw, mask=inside, other=0.0)
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
        # Half-precision operands stay half (tensor cores, like cuDNN's), accumulated in float32.
        acc += tl.dot(patch.to(DOT), weight.to(DOT), input_precision=PRECISION, out_dtype=ACC)
    if HAS_BIAS:  # the mixed bias (B, O), before the filter scale like the kernels' own bias
        acc += tl.load(bias_ptr + b * out_channels + out_channel, mask=o_ok, other=0.0).to(ACC)[None, :]
    if HAS_FILTER:
        acc *= tl.load(filter_ptr + b * out_channels + out_channel, mask=o_ok, other=0.0).to(ACC)[None, :]
    out = (out_ptr + b.to(tl.int64) * out_sb + out_channel[None, :] * out_sc + oh[:, None] * out_sh
           + ow[:, None] * out_sw)
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=p_ok[:, None] & o_ok[None, :])


@functools.cache
def _compiled(interpreted: bool):
    """The jitted kernel for the GPU, or the interpreted one for CPU tensors (tests)."""
    if interpreted:
        from triton.runtime.interpreter import InterpretedFunction

        return InterpretedFunction(_mixture_conv_kernel)
    return triton.jit(_mixture_conv_kernel)


def by_triton(x, experts, coefficients, expert_bias, spatial, channel, filter, stride, padding, dilation, groups):
    """`mixture_conv2d`'s signature; CUDA tensors run compiled, CPU tensors through Triton's interpreter."""
    if not available():
        raise ValueError("mode='triton' needs Triton (it ships with CUDA builds of PyTorch: pip install triton)")
    if x.dtype not in DTYPES:
        raise ValueError(f"mode='triton' supports {', '.join(str(d) for d in DTYPES)}, got {x.dtype}")
    tensors = (x, experts, coefficients, expert_bias, spatial, channel, filter)
    geometry = (_pair(stride), _pair(padding), _pair(dilation), groups)
    device = x.device.type
    if device in ("cpu", "cuda") and torch.is_autocast_enabled(device):
        # As autocast runs a convolution: every operand in its dtype (the casts recorded for autograd), then the
        # kernel with autocast off.
        dtype = torch.get_autocast_dtype(device)
        tensors = tuple(None if t is None else t.to(dtype) for t in tensors)
        with torch.autocast(device, enabled=False):
            return by_triton(*tensors, stride, padding, dilation, groups)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return TritonMixtureConv.apply(geometry, *tensors)
    return _forward(tensors, geometry)


def _forward(tensors, geometry) -> torch.Tensor:
    """Launch the kernel: y (B, O, H', W') in x's memory format (NCHW or channels-last)."""
    x, experts, coefficients, expert_bias, spatial, channel, filter = tensors
    (sh, sw), (ph, pw), (dh, dw), groups = geometry
    batch, channels, height, width = x.shape
    num_experts, out_channels, in_per_group, kh, kw = experts.shape
    out_h, out_w = conv_output_size(x, (kh, kw), *geometry[:3])
    out_per_group = out_channels // groups
    bias = algorithms.mixed_bias(coefficients, expert_bias, batch)
    experts = experts.to(x.dtype).contiguous()
    small = [None if t is None else t.to(x.dtype).contiguous() for t in (coefficients, bias, spatial, channel, filter)]
    layout = torch.channels_last if _channels_last(x) else torch.contiguous_format
    out = torch.empty(batch, out_channels, out_h, out_w, dtype=x.dtype, device=x.device, memory_format=layout)
    block_p, block_o, warps = _tiles(out_h * out_w, out_per_group)
    p_blocks = -(-out_h * out_w // block_p)
    o_blocks = -(-out_per_group // block_o)
    placeholder = experts  # a valid pointer for the absent optional tensors (their loads are compiled out)
    coefficients, bias, spatial, channel, filter = small
    try:
        _compiled(not x.is_cuda)[(batch * groups * p_blocks * o_blocks,)](
            x, experts, *(placeholder if t is None else t for t in small), out,
            num_experts, channels, height, width, out_channels, out_h, out_w, *x.stride(), *out.stride(),
            sh, sw, ph, pw, dh, dw, in_per_group, out_per_group, p_blocks, o_blocks,
            KH=kh, KW=kw, HAS_COEFFICIENTS=coefficients is not None, HAS_BIAS=bias is not None,
            HAS_SPATIAL=spatial is not None, HAS_CHANNEL=channel is not None, HAS_FILTER=filter is not None,
            ACC=tl.float64 if x.dtype == torch.float64 else tl.float32, DOT=_dot_type(x), PRECISION=_precision(x),
            BLOCK_P=block_p, BLOCK_O=block_o, BLOCK_K=BLOCK_K, **({"num_warps": warps} if x.is_cuda else {}))
    except RuntimeError:
        raise
    except Exception as error:  # Triton's compilation errors are not RuntimeErrors
        # As a RuntimeError, a kernel that cannot compile on this GPU or Triton is a candidate the selector's timing
        # drops (like one out of memory), instead of an exception that ends the training run.
        raise RuntimeError(f"the Triton mixture kernel failed: {type(error).__name__}: {error}") from error
    return out


def _tiles(positions: int, out_per_group: int) -> tuple[int, int, int]:
    """(BLOCK_P, BLOCK_O, warps) for one call: the output tile as large as the layer fills (up to 128 x 128, a
    float32 accumulator of 64 registers per thread at 8 warps), smaller where it would be mostly padding (7x7 maps,
    narrow groups). A fixed rule, not autotuned: the selector times the algorithm as a whole against cuDNN's, and
    autotuning each shape would add compilations to that first measurement. Not yet tuned on a GPU."""
    block_p = 128 if positions >= 4096 else 64 if positions > 32 else 32
    block_o = min(128, max(16, 1 << (out_per_group - 1).bit_length()))
    return block_p, block_o, 8 if block_p * block_o >= 128 * 128 else 4


def _dot_type(x: torch.Tensor):
    """The `tl.dot` operands' type: the input's. Except bfloat16 in the interpreter, whose dot multiplies bfloat16's
    raw bits (NumPy has no bfloat16; Triton 3.8 gave 1e10 for a product of unit-size values): there the operands go
    to float32, where products of bfloat16 values are exact, which is what the GPU's bfloat16 dot computes."""
    if x.dtype == torch.bfloat16 and not x.is_cuda:
        return tl.float32
    return {torch.float32: tl.float32, torch.float64: tl.float64, torch.float16: tl.float16,
            torch.bfloat16: tl.bfloat16}[x.dtype]


def _precision(x: torch.Tensor) -> str:
    """float32 products as cuDNN's convolutions make them (the other algorithms' path on a GPU): TF32 tensor cores
    where `torch.backends.cudnn.allow_tf32` (PyTorch's default) allows it, else exact; exact in the interpreter."""
    tf32 = x.is_cuda and x.dtype == torch.float32 and torch.backends.cudnn.allow_tf32
    return "tf32" if tf32 else "ieee"


def _channels_last(x: torch.Tensor) -> bool:
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


class TritonMixtureConv(torch.autograd.Function):
    """The kernel's forward; a backward through the mixed kernels (module docstring). Keeps the inputs only."""

    @staticmethod
    def forward(ctx, geometry, *tensors):
        ctx.geometry = geometry
        ctx.save_for_backward(*tensors)
        return _forward(tensors, geometry)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        x, experts, coefficients, expert_bias, spatial, channel, filter = ctx.saved_tensors
        (stride, padding, dilation, groups), wanted = ctx.geometry, ctx.needs_input_grad[1:]
        batch, channels = x.shape[:2]
        out_channels = experts.shape[1]
        # Leaves for the small mixing graph: everything but x, whose gradient the convolution's backward gives.
        leaves = [None if t is None else t.detach().requires_grad_(need)
                  for t, need in zip((experts, coefficients, expert_bias, spatial, channel, filter), wanted[1:])]
        experts_, coefficients_, bias_, spatial_, channel_, filter_ = leaves
        with torch.enable_grad():  # the "kernels" algorithm's mixing, as a small graph for the leaves' gradients
            kernels = algorithms.scale_kernels(algorithms.mix_kernels(experts_, coefficients_, batch), spatial_,
                                               channel_, filter_, groups)
            bias = algorithms.filtered_bias(coefficients_, bias_, filter_, batch)
        grad = grad.contiguous()
        # The batch folded into the groups: one convolution backward for every sample's own kernels.
        grad_x, grad_kernels, _ = torch.ops.aten.convolution_backward(
            grad.view(1, batch * out_channels, *grad.shape[2:]), x.reshape(1, batch * channels, *x.shape[2:]),
            kernels.detach().reshape(batch * out_channels, *kernels.shape[2:]), None, list(stride), list(padding),
            list(dilation), False, [0, 0], batch * groups, [wanted[0], kernels.requires_grad, False])
        outputs, grads = [], []
        if kernels.requires_grad:
            outputs.append(kernels)
            grads.append(grad_kernels.view(kernels.shape))
        if bias is not None and bias.requires_grad:
            outputs.append(bias)
            grads.append(grad.sum(dim=(2, 3)))
        needed = [t for t in leaves if t is not None and t.requires_grad]
        found = iter(torch.autograd.grad(outputs, needed, grads, allow_unused=True) if needed else ())
        grad_leaves = [next(found) if t is not None and t.requires_grad else None for t in leaves]
        grad_x = None if grad_x is None else grad_x.view(x.shape)
        return (None, grad_x, *grad_leaves)
