"""Capture of the per-sample kernels a dynamic layer applies (for analysis: `dynconv.analysis.kernel_export`).

Every per-sample operator convolves through `per_sample_conv2d`, directly (WeightNet, DCD, CGC) or from a
routine that builds the kernels first (`mixture_conv2d` in its "kernels" mode: CondConv, DY-Conv, ODConv;
KernelWarehouse's "assemble"; DyNet's kernel fusion). So one hook there sees every kernel: while a capture is
active, `per_sample_conv2d` hands its (B, O, C/g, kh, kw) kernel, per-sample bias and geometry to `record`.

While capturing, the routines that have a way around materialising the kernels take the materialising one, so
the kernel exists to be recorded (each site says so where it checks `active()`):

- `mixture_conv2d` runs its "kernels" mode (not "outputs" or "fused"), and that mode folds ODConv's channel
  attention into the kernel instead of scaling the input with it;
- KernelWarehouse assembles its kernels (not "cells");
- DyNet fuses kernels (not features);
- ODConv's 1x1 single-kernel layer goes through `mixture_conv2d` instead of its plain-convolution shortcut.

All of these compute the same output (they are exact alternatives), so a captured forward gives the layer's usual
result up to rounding. A layer that scales its input channels before the convolution or its output channels
after it (KernelWarehouse's KW*, ODConv's filter attention) reports that through `scale_input` /
`scale_output`, and the capture folds the scale into the kernel (and the bias): the recorded kernel is the one
that maps the layer's input to its output, W_b with y_b = W_b * x_b + bias_b.

When nothing captures, each hook is one test of a module global (not a ContextVar: torch.compile guards a global
without a graph break, as the selector's policy). Captures are meant for single-threaded analysis: the active
capture is process-wide.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch


def _pair(value) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)


@dataclass
class CapturedKernel:
    """The kernel one call of a layer applied: y_b = conv2d(x_b, weight[b], bias[b], stride, padding, dilation,
    groups) for the layer's input x."""

    weight: torch.Tensor  # (B, O, C/groups, kh, kw)
    bias: torch.Tensor | None  # (B, O)
    stride: tuple[int, int]
    padding: tuple[int, int] | str
    dilation: tuple[int, int]
    groups: int
    source: str  # "per_sample_conv2d", or "static" for a plain nn.Conv2d (its weight broadcast over the batch)


class LayerCapture:
    """What one forward call of one layer applied: the kernel `per_sample_conv2d` recorded, with the per-sample
    channel scales the layer applied around it folded in."""

    def __init__(self, name: str = "layer"):
        self.name = name
        self.kernel: CapturedKernel | None = None
        self._input_scale: torch.Tensor | None = None

    def add_kernel(self, weight: torch.Tensor, bias: torch.Tensor | None, stride, padding, dilation,
                   groups: int, source: str = "per_sample_conv2d") -> None:
        if self.kernel is not None:
            raise RuntimeError(f"{self.name} applied more than one per-sample convolution in one forward call; "
                               "capture a single convolution layer, not a block")
        weight = weight.detach()
        bias = None if bias is None else bias.detach()
        if self._input_scale is not None:
            # x'_b = x_b . s_b (per input channel) then W_b * x'_b = (W_b . s_b) * x_b: input channel c of group
            # c // (C/g) meets the kernel's input slot c % (C/g) in that group's output channels.
            batch, out_channels, per_group = weight.shape[:3]
            scale = self._input_scale.detach().to(weight.dtype).view(batch, groups, 1, per_group, 1, 1)
            weight = (weight.reshape(batch, groups, out_channels // groups, *weight.shape[2:]) * scale).reshape(
                weight.shape)
            self._input_scale = None
        padding = padding if isinstance(padding, str) else _pair(padding)
        self.kernel = CapturedKernel(weight, bias, _pair(stride), padding, _pair(dilation), int(groups), source)

    def scale_input(self, scale: torch.Tensor) -> None:
        """The layer multiplies its input by `scale` (B, C) per channel before the convolution."""
        if self.kernel is not None:
            raise RuntimeError(f"{self.name} scaled its input after its convolution; report input scales first")
        self._input_scale = scale if self._input_scale is None else self._input_scale * scale

    def scale_output(self, scale: torch.Tensor) -> None:
        """The layer multiplies its output by `scale` (B, O) per channel after the convolution."""
        if self.kernel is None:
            raise RuntimeError(f"{self.name} scaled its output before any convolution was recorded")
        kernel = self.kernel
        scale = scale.detach().to(kernel.weight.dtype)
        kernel.weight = kernel.weight * scale[:, :, None, None, None]
        if kernel.bias is not None:
            kernel.bias = kernel.bias * scale

    def result(self) -> CapturedKernel | None:
        if self._input_scale is not None:
            raise RuntimeError(f"{self.name} scaled its input but applied no per-sample convolution")
        return self.kernel


# The active capture (None: nothing captures). A module global, see the module docstring.
_current: LayerCapture | None = None


def active() -> bool:
    """Whether a capture is running: routines then take their kernel-materialising algorithm."""
    return _current is not None


def record(weight: torch.Tensor, bias: torch.Tensor | None, stride, padding, dilation, groups: int) -> None:
    """`per_sample_conv2d`'s hook: the kernels (B, O, C/g, kh, kw) and bias (B, O) it is about to apply."""
    if _current is not None:
        _current.add_kernel(weight, bias, stride, padding, dilation, groups)


def scale_input(scale: torch.Tensor) -> None:
    """A layer's hook: it scales its input channels by `scale` (B, C) before its convolution."""
    if _current is not None:
        _current.scale_input(scale)


def scale_output(scale: torch.Tensor) -> None:
    """A layer's hook: it scales its output channels by `scale` (B, O) after its convolution."""
    if _current is not None:
        _current.scale_output(scale)


@contextlib.contextmanager
def capturing(capture: LayerCapture | None) -> Iterator[LayerCapture | None]:
    """Route the hooks to `capture` within the block (None: pause capturing), then restore the previous one."""
    global _current
    previous = _current
    _current = capture
    try:
        yield capture
    finally:
        _current = previous


def set_current(capture: LayerCapture | None) -> LayerCapture | None:
    """Make `capture` the active one and return the previous (for module hooks, which cannot hold a `with`)."""
    global _current
    previous, _current = _current, capture
    return previous
