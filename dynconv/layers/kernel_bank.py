"""The part every kernel-mixing operator shares: a bank of n static kernels shaped like one nn.Conv2d.

CondConv, DY-Conv and ODConv all keep n kernels (n, O, C/g, kh, kw) (+ n biases) and differ only in how a
sample's attention combines them. The bank owns the convolution's geometry, the parameters and their
initialisation; subclasses add the attention and `forward`.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn


def conv_geometry(conv: nn.Conv2d) -> dict:
    """The constructor arguments that make a kernel bank a drop-in for `conv`."""
    return dict(in_channels=conv.in_channels, out_channels=conv.out_channels, kernel_size=conv.kernel_size,
                stride=conv.stride, padding=conv.padding, dilation=conv.dilation, groups=conv.groups)


class KernelBankConv2d(nn.Module):
    """n kernels `weight` (n, O, C/g, kh, kw) and optional biases `bias` (n, O) of one convolution's shape."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, *, kernels: int, bias: bool = False):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        # An int is a square kernel, as nn.Conv2d takes it.
        self.kernel_size = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups
        self.kernels = kernels
        self.weight = nn.Parameter(torch.empty(kernels, out_channels, in_channels // groups, *self.kernel_size))
        self.bias = nn.Parameter(torch.empty(kernels, out_channels)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Each kernel starts like a freshly initialised nn.Conv2d (kaiming-uniform, a=sqrt(5)), so an early,
        # near-uniform mixture has the scale of one convolution. Biases are initialised too (an uninitialised
        # torch.empty bias is garbage memory: Dynamic-convolution-Pytorch#8).
        for index in range(self.kernels):
            nn.init.kaiming_uniform_(self.weight[index], a=math.sqrt(5))
        if self.bias is not None:
            bound = 1.0 / math.sqrt((self.in_channels // self.groups) * math.prod(self.kernel_size))
            nn.init.uniform_(self.bias, -bound, bound)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, groups={self.groups}, kernels={self.kernels}, bias={self.bias is not None}"
        )
