"""KernelWarehouse's third exact algorithm, "fused": Algorithm 1 Part B, the kernels assembled one block of output
channels at a time inside the convolution's matmul, never all B kernels at once.

"assemble" writes B per-sample kernels (B x the layer's parameters) and reads them back: on ResNet18's layer4.0.conv1
at batch 16 that is a (16 x 18) x 47 by 47 x 65,536 matmul writing 75 MB (as many multiply-accumulates as the
convolution, plus the page faults of a buffer above glibc's mmap threshold), 7.5x the static layer in training.
"cells" avoids the kernels but costs n / (k*k) convolutions (5.2 there). Here, as `mixture_algorithms.by_fused`
does for CondConv / DY-Conv / ODConv:

    for each output group go and block of its cell's output channels:
        K_b[block] = permute(alpha_b[:, go] @ e[:, block])      (Eq. 3, then Eq. 2's tiling)
        y_b[block] = K_b[block] @ cols_b                        (one batched matmul, while the block is in cache)

and the backward assembles each block again instead of saving the kernels. The multiply-accumulates are the
paper's formulation (assembly + one convolution); only the order of evaluation changes, so it equals "assemble" to
rounding (tests/test_kw.py, float64). Groups = 1.
"""

from __future__ import annotations

import torch

from dynconv.functional import selector
from dynconv.functional.im2col import im2col
from dynconv.functional.mixture_algorithms import channel_blocks
from dynconv.functional.per_sample import conv_output_size
from dynconv.ops.kw.plan import LayerCells


def _blocks(partition: LayerCells, batch: int, k: int) -> list[tuple[int, int, int]]:
    """(output group, first, last cell output channel) of each block: `channel_blocks` of the cell's outputs within
    each output group (a block never spans two: their alphas differ).

    Blocks of channels for every sample, not whole kernels of a few samples: the assembly's matmul then has
    B*S*Gi rows instead of S*Gi (its inner dimension is n, 27-56 cells), and measured on 2 CPU cores (ResNet18 KW
    1x, batch 16, training step) whole kernels of one sample at a time were 1.3-1.4x slower on the last stage."""
    blocks = channel_blocks(batch, partition.cell_out, k)
    return [(group, start, stop) for group in range(partition.out_groups) for start, stop in blocks]


def _group_alpha(alpha: torch.Tensor, partition: LayerCells, group: int) -> torch.Tensor:
    """alpha (B, m = S*Go*Gi, n) -> the mixtures of output group `group`, (B*S*Gi, n)."""
    p = partition
    batch, _, n = alpha.shape
    return alpha.reshape(batch, p.spatial_groups, p.out_groups, p.in_groups, n)[:, :, group].reshape(-1, n)


def _assemble_block(group_alpha: torch.Tensor, cells_block: torch.Tensor, partition: LayerCells,
                    channels: int) -> torch.Tensor:
    """(B*S*Gi, n) by the block's cells (n, block*ci*ckh*ckw) -> the block's kernels (B, block, C*k*k), laid out
    as im2col's rows (input group, cell input, tap)."""
    p = partition
    batch = group_alpha.shape[0] // (p.spatial_groups * p.in_groups)
    mixed = (group_alpha @ cells_block).view(batch, p.spatial_groups, p.in_groups, channels, p.cell_in,
                                             *p.cell_kernel)
    # (B, S, Gi, block, ci, ckh, ckw) -> (B, block, Gi, ci, S, ckh, ckw): as `apply.assemble` tiles the kernel.
    return mixed.permute(0, 3, 2, 4, 1, 5, 6).reshape(batch, channels, -1)


def _unassemble_block(grad_kernels: torch.Tensor, partition: LayerCells) -> torch.Tensor:
    """The inverse layout of `_assemble_block`: (B, block, C*k*k) -> (B*S*Gi, block*ci*ckh*ckw)."""
    p = partition
    batch, channels = grad_kernels.shape[:2]
    grad = grad_kernels.view(batch, channels, p.in_groups, p.cell_in, p.spatial_groups, *p.cell_kernel)
    return grad.permute(0, 4, 2, 1, 3, 5, 6).reshape(batch * p.spatial_groups * p.in_groups, -1)


class WarehouseMatmul(torch.autograd.Function):
    """cols (B, K, P), alpha (B, m, n), cells (n, co, ci, ckh, ckw) -> (B, O, P); gradients for all three."""

    @staticmethod
    def forward(ctx, cols, alpha, cells, partition):
        dtype = selector.autocast_dtype(cols)
        if dtype is not None:  # autocast: multiply, and keep for the backward, in its dtype, as its matmuls would
            cols, alpha, cells = cols.to(dtype), alpha.to(dtype), cells.to(dtype)
        batch, k, positions = cols.shape
        n, cell_out = cells.shape[:2]
        cells_flat = cells.view(n, cell_out, -1)
        out = cols.new_empty(batch, partition.out_groups * cell_out, positions)
        for group, start, stop in _blocks(partition, batch, k):
            kernels = _assemble_block(_group_alpha(alpha, partition, group),
                                      cells_flat[:, start:stop].reshape(n, -1), partition, stop - start)
            first = group * cell_out + start
            out[:, first: first + stop - start] = torch.bmm(kernels, cols)
        ctx.save_for_backward(cols, alpha, cells)
        ctx.partition = partition
        return out

    @staticmethod
    def backward(ctx, grad):
        cols, alpha, cells = ctx.saved_tensors
        p = ctx.partition
        need_cols, need_alpha, need_cells = ctx.needs_input_grad[:3]
        batch, k, _ = cols.shape
        n, cell_out = cells.shape[:2]
        grad = grad.contiguous()
        cells_flat = cells.view(n, cell_out, -1)
        grad_cols = torch.zeros_like(cols) if need_cols else None
        grad_alpha = (alpha.new_zeros(batch, p.spatial_groups, p.out_groups, p.in_groups, n) if need_alpha
                      else None)
        grad_cells = torch.zeros_like(cells) if need_cells else None
        for group, start, stop in _blocks(p, batch, k):
            group_alpha = _group_alpha(alpha, p, group)
            cells_block = cells_flat[:, start:stop].reshape(n, -1)
            first = group * cell_out + start
            grad_block = grad[:, first: first + stop - start]  # (B, block, P)
            if need_cols:  # the block's kernels assembled again, not saved
                kernels = _assemble_block(group_alpha, cells_block, p, stop - start)
                grad_cols.baddbmm_(kernels.transpose(1, 2), grad_block)
            if need_alpha or need_cells:
                grad_kernels = torch.bmm(grad_block, cols.transpose(1, 2))  # dL/d(the block's kernels)
                grad_mixed = _unassemble_block(grad_kernels, p)  # (B*S*Gi, block*ci*ckh*ckw)
                if need_cells:
                    grad_cells.view(n, cell_out, -1)[:, start:stop].view(n, -1).addmm_(group_alpha.t(), grad_mixed)
                if need_alpha:
                    grad_alpha[:, :, group] += (grad_mixed @ cells_block.t()).view(
                        -1, p.spatial_groups, p.in_groups, n)
        if need_alpha:
            grad_alpha = grad_alpha.view_as(alpha)
        return grad_cols, grad_alpha, grad_cells, None


def by_fused(x, alpha, cells, bias, layer) -> torch.Tensor:
    """im2col + `WarehouseMatmul` (groups = 1): the layer's output without materialising B kernels."""
    batch = x.shape[0]
    out_h, out_w = conv_output_size(x, layer.kernel_size, layer.stride, layer.padding, layer.dilation)
    columns = im2col(x, layer.kernel_size, layer.dilation, layer.padding, layer.stride)
    out = WarehouseMatmul.apply(columns, alpha, cells, layer.partition)
    out = out.view(batch, layer.out_channels, out_h, out_w)
    return out if bias is None else out + bias.view(1, -1, 1, 1)
