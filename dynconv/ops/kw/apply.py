"""Three exact ways to apply a KernelWarehouse convolution, chosen per layer shape like every per-sample conv.

"assemble" is Algorithm 1 Part B as written: alpha (B, m, n) times the n cells gives every sample's kernel
(B x the layer's parameters, written to memory), then `per_sample_conv2d`. Its cost is a skinny matmul
B*m x n x cell, bound by writing (and, in training, reading back twice) B kernels: on ResNet18's last stage at
batch 16 that is 150 MB per layer, several times the convolution itself.

"cells" never builds a kernel. With spatial partition, tap s of the kernel is W_b[s] = sum_j alpha_b[s, j] e_j
(per output/input cell group), so by linearity

    y_b = sum_s W_b[s] P_b[s] = sum_j e_j (sum_s alpha_b[s, j] P_b[s]) = sum_j e_j Z_b[j]

where P_b[s] are the im2col rows of tap s. Z (B, L, n, C_in) is a small batched matmul over the taps, and the
rest is ONE dense GEMM of (B*L) x (n*C_in) by the warehouse (n*C_in x C_out), shared by the whole batch. It
costs n / (k*k) convolutions instead of the memory traffic of B kernels: the better choice where the output has
few positions (late stages), the worse where it has many (there a kernel is cheap next to the feature map).
"fused" (`fused.py`) is "assemble" one block of output channels at a time inside the convolution's matmul, the
backward assembling each block again: the paper's arithmetic without writing B kernels. It wins where one kernel is
large next to the feature map but the warehouse has many cells, as long as fresh pages are costly: with glibc as it
is, ResNet18's layer4.0.conv1 (256 -> 512 channels from the 47 cells of the third stage) took 172 ms against 223 ms
("assemble") and 239 ms ("cells") for a training step at batch 16 on 2 CPU cores, 48 ms against 82-86 ms at
inference; once the allocator keeps its buffers (`DYNCONV_MALLOC=retain`, train.py's default) "assemble" took 130
ms there and won on every ResNet18 and ResNet50 layer, so it is timed only without that. All three give the same
result up to rounding (tests/test_kw.py).
"""

from __future__ import annotations

import torch

from dynconv import allocator
from dynconv.functional import kernel_capture, recompute, selector
from dynconv.functional.im2col import im2col
from dynconv.functional.per_sample import conv_output_size, per_sample_conv2d
from dynconv.ops.kw.fused import by_fused
from dynconv.ops.kw.plan import LayerCells

# Cost model (policy "model", torch.compile, batch 1): "cells" below this many output positions. Measured on
# 2 CPU cores, ResNet18 at batch 16: "cells" wins at 7x7 (2.4x faster in training), loses at 14x14.
CELLS_MAX_OUTPUT_POSITIONS = 64
# Above this many output positions "cells" lost by 4-20x on every ResNet18 layer: not worth timing (the first
# training step times every candidate, forward and backward).
CELLS_MEASURE_MAX_POSITIONS = 256


def assemble(alpha: torch.Tensor, cells: torch.Tensor, partition: LayerCells, kernel_shape) -> torch.Tensor:
    """Per-sample kernels (B, *kernel_shape) from alpha (B, m, n) and cells (n, co, ci, ckh, ckw) (Eq. 3, 2)."""
    batch = alpha.shape[0]
    p = partition
    mixed = alpha.reshape(batch * p.mixtures, -1) @ cells.reshape(cells.shape[0], -1)
    mixed = mixed.view(batch, p.spatial_groups, p.out_groups, p.in_groups, p.cell_out, p.cell_in, *p.cell_kernel)
    # (B, S, Go, Gi, co, ci, ckh, ckw) -> (B, Go, co, Gi, ci, S, ckh, ckw): with S > 1 the cells are 1 x 1 and S
    # runs over the kernel taps; with S = 1 the cell is the whole k x k. A pure view when Go = Gi = S = 1.
    return mixed.permute(0, 2, 4, 3, 5, 1, 6, 7).reshape(batch, *kernel_shape)


def by_assembling(x, alpha, cells, bias, layer) -> torch.Tensor:
    """Assembled kernels, then `per_sample_conv2d`; under `recompute` the backward assembles them again."""
    bias = None if bias is None else bias.expand(x.shape[0], -1)
    with recompute.materialised(lambda note: note(assemble(alpha, cells, layer.partition, layer.kernel_shape)),
                                x, alpha, cells) as kernel:
        return per_sample_conv2d(x, kernel, bias, layer.stride, layer.padding, layer.dilation, layer.groups)


def by_cells(x, alpha, cells, bias, layer) -> torch.Tensor:
    """sum_j e_j Z_b[j] (module docstring); groups == 1."""
    p = layer.partition
    batch = x.shape[0]
    n = cells.shape[0]
    taps_per_cell = p.cell_kernel[0] * p.cell_kernel[1]
    out_h, out_w = conv_output_size(x, layer.kernel_size, layer.stride, layer.padding, layer.dilation)
    positions = out_h * out_w
    columns = im2col(x, layer.kernel_size, layer.dilation, layer.padding, layer.stride)
    # (B, C*k*k, L), channel-major -> (B, L, S*Gi, ci*T): the taps S and input groups Gi are what alpha mixes.
    columns = columns.view(batch, p.in_groups, p.cell_in, p.spatial_groups, taps_per_cell, positions)
    columns = columns.permute(0, 5, 3, 1, 2, 4).reshape(batch, positions, p.spatial_groups * p.in_groups,
                                                        p.cell_in * taps_per_cell)
    # alpha (B, m = S*Go*Gi, n) -> (B, 1, Go*n, S*Gi), broadcast over the positions.
    mixing = alpha.view(batch, p.spatial_groups, p.out_groups, p.in_groups, n).permute(0, 2, 4, 1, 3)
    mixing = mixing.reshape(batch, 1, p.out_groups * n, p.spatial_groups * p.in_groups)
    mixed_inputs = torch.matmul(mixing, columns)  # (B, L, Go*n, ci*T)
    warehouse = cells.reshape(n, p.cell_out, -1).transpose(0, 1).reshape(p.cell_out, -1)  # (co, n*ci*T)
    out = mixed_inputs.reshape(batch * positions * p.out_groups, -1) @ warehouse.t()  # (B*L*Go, co)
    out = out.view(batch, positions, layer.out_channels).transpose(1, 2).reshape(batch, -1, out_h, out_w)
    return out if bias is None else out + bias.view(1, -1, 1, 1)


ALGORITHMS = {"assemble": by_assembling, "cells": by_cells, "fused": by_fused}


def apply_warehouse_conv(x, alpha, cells, bias, layer) -> torch.Tensor:
    """The layer's output by the algorithm the selector picks for this shape (measured once by default)."""
    if kernel_capture.active():  # analysis: assemble the kernels, so that per_sample_conv2d records them
        return by_assembling(x, alpha, cells, bias, layer)
    algorithm = selector.select(WAREHOUSE_CONV, (x, alpha, cells, bias), layer)
    return ALGORITHMS[algorithm](x, alpha, cells, bias, layer)


class WarehouseRoutine(selector.Routine):
    """A KernelWarehouse convolution for the selector; tensors = (x, alpha, cells, bias), params = the layer
    (its geometry and partition). "assemble" is the paper's Algorithm 1 (what MAC counting runs); a forced
    per-sample algorithm needs assembled kernels to run on."""

    name = "kw_conv2d"
    makes_kernels = True
    algorithms = selector.WAREHOUSE_ALGORITHMS
    canonical = "assemble"
    forced = {**{name: name for name in selector.WAREHOUSE_ALGORITHMS},
              **{name: "assemble" for name in selector.PER_SAMPLE_ALGORITHMS}}
    batch_free = ("cells", "assemble")  # "assemble" through per_sample_conv2d's batch-independent algorithm

    def applicable(self, algorithm, tensors, layer):
        if algorithm == "fused":
            return layer.groups == 1
        return algorithm == "assemble" or layer.groups == 1

    def cost_model(self, tensors, layer):
        return "assemble" if tensors[0].shape[0] == 1 else self.export_choice(tensors, layer)

    def export_choice(self, tensors, layer):
        """The cost model without its batch-1 rule: "cells" for an ungrouped layer with few output positions."""
        out_h, out_w = conv_output_size(tensors[0], layer.kernel_size, layer.stride, layer.padding, layer.dilation)
        few_positions = out_h * out_w <= CELLS_MAX_OUTPUT_POSITIONS
        return "cells" if layer.groups == 1 and few_positions else "assemble"

    def macs(self, tensors, layer):
        x = tensors[0]
        out_h, out_w = conv_output_size(x, layer.kernel_size, layer.stride, layer.padding, layer.dilation)
        kh, kw = layer.kernel_size
        return x.shape[0] * out_h * out_w * layer.in_channels * layer.out_channels * kh * kw

    def timed(self, tensors, layer):
        out_h, out_w = conv_output_size(tensors[0], layer.kernel_size, layer.stride, layer.padding, layer.dilation)
        if layer.groups == 1 and out_h * out_w <= CELLS_MEASURE_MAX_POSITIONS:
            # "fused" saves the page faults of B freshly mapped kernels; where the allocator keeps its buffers
            # (train.py's DYNCONV_MALLOC=retain) "assemble" measured faster on every ResNet18 and ResNet50 layer.
            return ["assemble", "cells"] + ([] if allocator.retaining() else ["fused"])
        return ["assemble"]

    def shape_key(self, tensors, layer):
        x, alpha, cells, bias = tensors
        flags = (f"m{alpha.shape[1]}",) + (("bias",) if bias is not None else ())
        return selector.conv_shape_key(x, cells.shape, layer.stride, layer.padding, layer.dilation, layer.groups,
                                       flags)

    def run(self, algorithm, tensors, layer):
        return ALGORITHMS[algorithm](*tensors, layer)


WAREHOUSE_CONV = WarehouseRoutine()
