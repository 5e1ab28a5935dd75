"""KernelWarehouse layers: a shared warehouse of cells and the convolution / linear layers that assemble from it.

Kernel assembling (Algorithm 1, Part B): alpha (B, m, n) times the warehouse's n cells gives the layer's m
cells per sample (Eq. 3), which tile the kernel (Eq. 2). Mixtures are ordered (spatial position, output
group, input group); cells are (cell_out, cell_in, ckh, ckw), 1 x 1 with spatial partition. The assembled
per-sample kernels go through the shared `per_sample_conv2d` (its measured algorithm choice; batch 1 is a
plain convolution) or one batched matmul for `nn.Linear`.

A warehouse is a module of its own, registered once in the backbone (`Backbone.warehouses`); each layer keeps
an unregistered reference to it (as `SharedInput` does), so its cells are one parameter, counted and saved
once, and receive the gradients of every layer that reads them.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.utils import _pair

from dynconv.functional import kernel_capture, selector
from dynconv.ops.kw.apply import apply_warehouse_conv, assemble
from dynconv.ops.kw.attention import KWAttention
from dynconv.ops.kw.plan import LayerCells


class Warehouse(nn.Module):
    """n kernel cells E = {e_1..e_n} of shape (cell_out, cell_in, ckh, ckw) (Sec. 3.2)."""

    def __init__(self, key: str, cells: int, cell_shape: tuple[int, int, int, int]):
        super().__init__()
        self.key = key
        self.cells = nn.Parameter(torch.empty(cells, *cell_shape))
        nn.init.kaiming_normal_(self.cells.view(-1, *cell_shape[1:]), mode="fan_out", nonlinearity="relu")

    def extra_repr(self) -> str:
        return f"key={self.key!r}, cells={tuple(self.cells.shape)}"


def link_warehouse(layer: nn.Module, warehouse: Warehouse) -> None:
    """A plain reference (not a submodule): the warehouse is registered once, in the backbone."""
    layer.__dict__["warehouse"] = warehouse


class _KWLayer(nn.Module):
    """What KWConv2d and KWLinear share: the partition, the attention, the warehouse reference."""

    warehouse: Warehouse

    def _init_kw(self, partition: LayerCells, attention: KWAttention, bias: bool, out_channels: int):
        self.partition = partition
        self.attention = attention
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None

    def kernels(self, pooled: torch.Tensor):
        alpha, scales = self.attention(pooled)
        kernel = assemble(alpha, self.warehouse.cells, self.partition, self.kernel_shape)
        return kernel, scales, alpha


class KWConv2d(_KWLayer):
    """A drop-in for nn.Conv2d whose kernel is assembled per sample from a shared warehouse.

    op=kw builds it with its `partition` and `attention` and links the stage's warehouse. Without them,
    `KWConv2d(16, 32, 3, padding=1, **knobs)` is a layer with a warehouse of its own (registered as its child
    `warehouse`), planned by op=kw for a network of this one layer with configs/op/kw.yaml's knobs (`knobs`
    override them: `b=2`, `tau=0.5`): `standalone.py`."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = False, *, partition: LayerCells | None = None,
                 attention: KWAttention | None = None, **knobs):
        super().__init__()
        kernel_size = _pair(kernel_size)
        warehouse = None
        if partition is None or attention is None:
            from dynconv.ops.kw.standalone import standalone_parts

            partition, attention, warehouse = standalone_parts(in_channels, out_channels, kernel_size, stride,
                                                               padding, dilation, groups, **knobs)
        elif knobs:
            raise TypeError(f"KWConv2d got knobs {sorted(knobs)} with a planned partition: they are op=kw's")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = tuple(kernel_size)
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups
        self.kernel_shape = (out_channels, in_channels // groups, *self.kernel_size)
        self._init_kw(partition, attention, bias, out_channels)
        if warehouse is not None:
            self.warehouse = warehouse  # its own: a child, saved and moved with the layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        alpha, scales = self.attention(x.mean(dim=(2, 3)))
        if scales is not None:  # KW*: ODConv's channel, spatial and filter attentions
            x = x * scales["channel"][:, :, None, None]
            kernel_capture.scale_input(scales["channel"])  # analysis: folded into the captured kernel
            if "spatial" in scales:
                alpha = self._scale_taps(alpha, scales["spatial"])
        out = apply_warehouse_conv(x, alpha, self.warehouse.cells, self.bias, self)
        if scales is not None and "filter" in scales:
            out = out * scales["filter"][:, :, None, None]
            kernel_capture.scale_output(scales["filter"])  # analysis: folded into the captured kernel
        return out

    def _scale_taps(self, alpha: torch.Tensor, spatial: torch.Tensor) -> torch.Tensor:
        """KW*'s spatial attention scales kernel tap s, i.e. (with spatial partition) every mixture of tap s."""
        p = self.partition
        batch = alpha.shape[0]
        if p.spatial_groups == spatial.shape[1]:
            # reshape: at batch 1 the attention's alpha is not contiguous (view() refused it)
            return (alpha.reshape(batch, p.spatial_groups, -1) * spatial.view(batch, -1, 1)).view_as(alpha)
        raise ValueError("KW* (op.omni) needs spatial partition (op.partition=true) for its spatial attention")

    def extra_repr(self) -> str:
        p = self.partition
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"groups={self.groups}, warehouse={self.warehouse.key!r}, m={p.mixtures}, "
                f"cell={p.cell_out}x{p.cell_in}x{p.cell_kernel[0]}x{p.cell_kernel[1]}")


class KWLinear(_KWLayer):
    """A drop-in for nn.Linear (any leading dims: tokens, pixels) assembling its matrix per sample.

    The attention pools every position of a sample: tokens for a transformer (B, N, C), pixels for ConvNeXt's
    channels-last MLP (B, H, W, C), nothing for a pooled (B, C) input.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, partition: LayerCells,
                 attention: KWAttention):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.kernel_shape = (out_features, in_features)
        self._init_kw(partition, attention, bias, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch = x.shape[0]
        tokens = x.reshape(batch, -1, self.in_features)
        kernel, scales, _ = self.kernels(tokens.mean(dim=1))
        if scales is not None:
            tokens = tokens * scales["channel"][:, None, :]
        if not selector.is_exporting() and batch == 1:  # exported: one graph for every batch size, no branch
            out = F.linear(tokens, kernel[0], self.bias)
        elif self.bias is None:
            out = torch.bmm(tokens, kernel.transpose(1, 2))
        else:
            out = torch.baddbmm(self.bias.view(1, 1, -1), tokens, kernel.transpose(1, 2))
        if scales is not None and "filter" in scales:
            out = out * scales["filter"][:, None, :]
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        p = self.partition
        return (f"{self.in_features}, {self.out_features}, warehouse={self.warehouse.key!r}, m={p.mixtures}, "
                f"cell={p.cell_out}x{p.cell_in}")


class SplitQKV(nn.Module):
    """timm's fused qkv Linear split so that only the value matrix comes from a warehouse (Sec. 4.1, DeiT:
    "except the query and key matrices"). Output = cat(q, k, v), the layout timm's Attention unpacks."""

    def __init__(self, qkv: nn.Linear, value: nn.Module):
        super().__init__()
        dim = qkv.in_features
        self.query_key = nn.Linear(dim, 2 * dim, bias=qkv.bias is not None, device=qkv.weight.device,
                                   dtype=qkv.weight.dtype)
        with torch.no_grad():
            self.query_key.weight.copy_(qkv.weight[: 2 * dim])
            if qkv.bias is not None:
                self.query_key.bias.copy_(qkv.bias[: 2 * dim])
        self.value = value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.query_key(x), self.value(x)], dim=-1)


def layer_fan_out(kernel_shape) -> int:
    """fan_out of the layer's static kernel (O x kh x kw for a convolution, O for a linear), as torch counts it."""
    return kernel_shape[0] * math.prod(kernel_shape[2:])
