"""Two of `mixture_conv2d`'s exact algorithms, "outputs" and "fused" (the third, "kernels", is in
mixture.py: it mixes the kernels and hands them to `per_sample_conv2d`).

All compute y_b = (W_b . t_b) * x_b (+ bias) with W_b = sum_i c_bi W_i and t_b an optional per-sample scale of
the kernel taps: ODConv's spatial attention (per kernel position) times its channel attention (per input
channel), which the papers write on the kernel.

"fused": im2col, then y_b = (sum_i c_bi W_i) @ cols_b without materialising B kernels. Mixing the kernels
first writes B per-sample kernels (B x O x C*k*k elements) and reads them back in the convolution; for
ResNet's last stage at batch 16 that is 151 MB per layer, several times the cost of the convolution itself on a
CPU (memory bandwidth, and page faults: buffers above glibc's 32 MB mmap threshold are returned to the OS on
free and faulted in again on every call). Here the kernels are mixed one block of output channels at a time,
each block (about 16 MB) used by one batched matmul while it is still in cache, and the backward mixes them
again instead of saving them. The per-tap scale t_b multiplies the columns (C*k*k*P values per sample) rather
than the kernels (O*C*k*k). The arithmetic is the papers' formulation; only the order of evaluation changes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from dynconv.functional import selector
from dynconv.functional.im2col import im2col

# Elements of one block of mixed kernels (B x block x K): 4M float32 = 16 MB, half of a 32 MB L3 and below the
# mmap threshold. Measured on 2 CPU cores (ResNet18 layer3/layer4, batch 16): 4M beats 1M by ~1.4x (bigger
# matmuls) and 8M by ~1.5x (the block no longer stays in cache).
BLOCK_ELEMENTS = 1 << 22


def channel_blocks(batch: int, out_channels: int, k: int) -> list[tuple[int, int]]:
    """(start, stop) of equal blocks of output channels, each at most BLOCK_ELEMENTS mixed-kernel elements."""
    count = math.ceil(out_channels / max(1, min(out_channels, BLOCK_ELEMENTS // max(1, batch * k))))
    size = math.ceil(out_channels / count)
    return [(start, min(out_channels, start + size)) for start in range(0, out_channels, size)]


class MixtureMatmul(torch.autograd.Function):
    """cols (B, K, P), experts (n, O, K), coefficients (B, n) -> (B, O, P); gradients for all three."""

    @staticmethod
    def forward(ctx, cols: torch.Tensor, experts: torch.Tensor, coefficients: torch.Tensor) -> torch.Tensor:
        dtype = selector.autocast_dtype(cols)
        if dtype is not None:  # autocast: multiply, and keep for the backward, in its dtype, as its matmuls would
            cols, experts, coefficients = cols.to(dtype), experts.to(dtype), coefficients.to(dtype)
        batch, k, _ = cols.shape
        n, out_channels, _ = experts.shape
        outs = []
        for start, stop in channel_blocks(batch, out_channels, k):
            mixed = torch.mm(coefficients, experts[:, start:stop].reshape(n, -1)).view(batch, stop - start, k)
            # A fresh, contiguous result: bmm into a strided slice (out=) falls back to one matmul per sample,
            # i.e. B thread-pool rounds instead of one, which is slow on a busy machine.
            outs.append(torch.bmm(mixed, cols))
        ctx.save_for_backward(cols, experts, coefficients)
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        cols, experts, coefficients = ctx.saved_tensors
        need_cols, need_experts, need_coefficients = ctx.needs_input_grad
        batch, k, _ = cols.shape
        n = experts.shape[0]
        grad = grad.contiguous()
        grad_cols = torch.zeros_like(cols) if need_cols else None
        grad_experts = torch.empty_like(experts) if need_experts else None
        grad_coefficients = coefficients.new_zeros(coefficients.shape) if need_coefficients else None
        cols_t = cols.transpose(1, 2)
        for start, stop in channel_blocks(batch, experts.shape[1], k):
            block = experts[:, start:stop].reshape(n, -1)  # (n, block*K), a view
            grad_block = grad[:, start:stop]  # (B, block, P)
            if need_cols:
                mixed = torch.mm(coefficients, block).view(batch, stop - start, k)  # recomputed, not saved
                grad_cols.baddbmm_(mixed.transpose(1, 2), grad_block)
            if need_experts or need_coefficients:
                grad_mixed = torch.bmm(grad_block, cols_t).view(batch, -1)  # dL/d(mixed kernel block)
                if need_experts:
                    grad_experts[:, start:stop] = torch.mm(coefficients.t(), grad_mixed).view(n, stop - start, k)
                if need_coefficients:
                    grad_coefficients.addmm_(grad_mixed, block.t())
        return grad_cols, grad_experts, grad_coefficients


def mixture_matmul(cols: torch.Tensor, experts: torch.Tensor, coefficients: torch.Tensor | None) -> torch.Tensor:
    """y_b = (sum_i c_bi E_i) @ cols_b for cols (B, K, P), experts (n, O, K), c (B, n); c None: n = 1, one
    shared kernel (a plain broadcast matmul)."""
    if coefficients is None:
        return torch.matmul(experts[0], cols)
    return MixtureMatmul.apply(cols, experts, coefficients)


def mix_kernels(experts: torch.Tensor, coefficients: torch.Tensor | None, batch: int) -> torch.Tensor:
    """sum_i c_bi W_i, (B, O, C/g, kh, kw); the one kernel broadcast over the batch when coefficients is None."""
    if coefficients is None:
        return experts[:1].expand(batch, *experts.shape[1:])
    return (coefficients @ experts.flatten(1)).view(batch, *experts.shape[1:])


def filtered_bias(coefficients, expert_bias, filter, batch: int):
    """The mixed bias scaled by the filter scale f_b (B, O) where that scale is folded into the kernels (the
    kernel's output, bias included, is what it scales); None without a bias."""
    bias = mixed_bias(coefficients, expert_bias, batch)
    return bias * filter if bias is not None and filter is not None else bias


def mixed_bias(coefficients, expert_bias, batch: int):
    """sum_i c_bi b_i, (B, O); the one bias when coefficients is None."""
    if expert_bias is None:
        return None
    return expert_bias[0].expand(batch, -1) if coefficients is None else coefficients @ expert_bias


def tap_scale(spatial, channel, groups: int, in_per_group: int, kh: int, kw: int):
    """The per-sample scale of kernel taps, (B, groups, 1, C/g, kh, kw), or None: channel (B, C) scales the
    input channel a tap reads, spatial (B, kh, kw) its position. Broadcasts against kernels viewed as
    (B, groups, O/g, C/g, kh, kw)."""
    scale = None
    if channel is not None:
        scale = channel.view(channel.shape[0], groups, 1, in_per_group, 1, 1)
    if spatial is not None:
        position = spatial.view(spatial.shape[0], 1, 1, 1, kh, kw)
        scale = position if scale is None else scale * position
    return scale


class ScaleKernels(torch.autograd.Function):
    """kernels . taps . filters for kernels (B, g, O/g, C/g, kh, kw) and two per-sample scales that broadcast
    against them (`tap_scale`'s (B, g, 1, C/g, kh, kw) and the filter's (B, g, O/g, 1, 1, 1)). Autograd's own two
    multiplications would keep the kernel-sized intermediate kernels . taps for the filter's gradient; this keeps
    only the kernels (which `recompute` may store as a recipe) and the two small scales, and remakes the products
    it needs."""

    @staticmethod
    def forward(ctx, kernels: torch.Tensor, taps: torch.Tensor, filters: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(kernels, taps, filters)
        return (kernels * taps).mul_(filters)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        kernels, taps, filters = ctx.saved_tensors
        need_kernels, need_taps, need_filters = ctx.needs_input_grad
        grad_taps = grad_filters = None
        if need_taps or need_filters:  # one kernel-sized product for both (the kernels can be large)
            product = grad * kernels
            if need_taps:
                grad_taps = _sum_to(product * filters, taps.shape)
            if need_filters:
                grad_filters = _sum_to(product.mul_(taps) if not torch.is_grad_enabled() else product * taps,
                                       filters.shape)
            del product
        grad_kernels = (grad * taps).mul_(filters) if need_kernels else None
        return grad_kernels, grad_taps, grad_filters


def _sum_to(tensor: torch.Tensor, shape) -> torch.Tensor:
    """Sum a broadcast product back to one factor's shape (dimensions where that factor has size 1)."""
    dims = tuple(i for i, (big, small) in enumerate(zip(tensor.shape, shape)) if small == 1 and big != 1)
    return tensor.sum(dim=dims, keepdim=True) if dims else tensor


def scale_kernels(kernels: torch.Tensor, spatial, channel, filter, groups: int) -> torch.Tensor:
    """kernels (B, O, C/g, kh, kw) scaled per sample by `tap_scale`'s factors; the kernels unchanged (the same
    tensor) when there are none."""
    batch, out_channels, in_per_group, kh, kw = kernels.shape
    view = kernels.view(batch, groups, out_channels // groups, in_per_group, kh, kw)
    taps = tap_scale(spatial, channel, groups, in_per_group, kh, kw)
    outputs = None if filter is None else filter.view(filter.shape[0], groups, -1, 1, 1, 1)
    if taps is None and outputs is None:
        return kernels
    if taps is None or outputs is None:
        scaled = view * (taps if outputs is None else outputs)
    else:
        scaled = ScaleKernels.apply(view, taps, outputs)
    return scaled.view(batch, out_channels, in_per_group, kh, kw)


def scale_outputs(out: torch.Tensor, filter: torch.Tensor | None) -> torch.Tensor:
    """y_b . filter_b per output channel (B, O), for the algorithms that do not fold it into a kernel; in the
    output's dtype, as the scale folded into a kernel would be (under autocast: bfloat16 / float16)."""
    return out if filter is None else out * filter[:, :, None, None].to(out.dtype)


def by_outputs(x, experts, coefficients, expert_bias, spatial, channel, filter, stride, padding, dilation, groups):
    """sum_i c_bi (W_i * x_b): the n static convolutions as one grouped convolution, outputs mixed (and scaled by
    `filter`)."""
    if spatial is not None:
        raise ValueError("mode='outputs' cannot apply a spatial attention (it scales kernel taps, per sample)")
    if channel is not None:
        x = x * channel[:, :, None, None]
    batch = x.shape[0]
    num_experts, out_channels = experts.shape[:2]
    bias = mixed_bias(coefficients, expert_bias, batch)
    if coefficients is None:  # n = 1: the static convolution itself
        return scale_outputs(F.conv2d(x, experts[0], None if expert_bias is None else expert_bias[0], stride,
                                      padding, dilation, groups), filter)
    # Lay the n experts out group by group so one grouped convolution computes all of them.
    per_group = out_channels // groups
    stacked = experts.view(num_experts, groups, per_group, *experts.shape[2:]).transpose(0, 1)
    outputs = F.conv2d(x, stacked.reshape(groups * num_experts * per_group, *experts.shape[2:]), None, stride,
                       padding, dilation, groups)
    outputs = outputs.view(batch, groups, num_experts, per_group, *outputs.shape[2:])
    mixed = torch.einsum("bn,bgnohw->bgohw", coefficients, outputs).reshape(batch, out_channels, *outputs.shape[-2:])
    if bias is not None:
        mixed = mixed + bias[:, :, None, None]
    return scale_outputs(mixed, filter)


def by_fused(x, experts, coefficients, expert_bias, spatial, channel, filter, stride, padding, dilation, groups,
             out_size):
    """im2col + `mixture_matmul` (groups=1 only), then the `filter` scale on the output; `out_size` (H', W') is
    the convolution's output size."""
    if groups != 1:
        raise ValueError("mode='fused' handles groups=1 only")
    batch, channels = x.shape[:2]
    num_experts, out_channels, _, kh, kw = experts.shape
    if channel is not None and spatial is None:
        x = x * channel[:, :, None, None]  # the input is k*k times smaller than its columns
        channel = None
    pointwise = (kh, kw) == (1, 1) and stride in (1, (1, 1)) and padding in (0, (0, 0))
    if pointwise:
        columns = x.reshape(batch, channels, -1)  # a 1x1 convolution needs no im2col
    else:
        columns = im2col(x, (kh, kw), dilation, padding, stride)
    scale = tap_scale(spatial, channel, 1, channels, kh, kw)
    if scale is not None:
        positions = columns.shape[-1]
        columns = (columns.view(batch, channels, kh * kw, positions) * scale.view(batch, -1, kh * kw, 1)).view(
            batch, channels * kh * kw, positions)
    out = mixture_matmul(columns, experts.reshape(num_experts, out_channels, -1), coefficients)
    bias = mixed_bias(coefficients, expert_bias, batch)
    if bias is not None:
        out = out + bias[:, :, None]
    return scale_outputs(out.view(batch, out_channels, *out_size), filter)
