"""DY-Conv (Chen et al., "Dynamic Convolution: Attention over Convolution Kernels", CVPR 2020).

Per sample x, K static kernels {W_k, b_k} are aggregated with input-dependent attentions pi_k(x) (the
paper's dynamic perceptron / dynamic convolution definition, Sec. 3; KernelWarehouse Eq. 1 for the kernels):

    W(x) = sum_k pi_k(x) W_k,    b(x) = sum_k pi_k(x) b_k,    y = W(x) * x + b(x)
    0 <= pi_k(x) <= 1,  sum_k pi_k(x) = 1,  pi(x) = softmax(z(x) / T)

(Equation numbers of the DY-Conv paper are not cited: its text is not in shared/papers to check them.)

The attention is squeeze-and-excitation-like (Sec. 3): GAP -> FC(C_in -> int(C_in * r) + 1, no
bias) -> ReLU -> FC(-> K) -> softmax(z / T), with r = 0.25 (as the public implementations use) and a
temperature T annealed linearly from 30 to 1 over the first 10 epochs (Sec. 3, "near-uniform attention
in early training"), once per iteration through `set_training_progress`. There is no BatchNorm in the
attention (the paper describes none), so batch size 1 works in train mode.

Conversion: every convolution except the stem (the default static roles), as in the paper ("dynamic
convolution for all convolution layers except the first layer"). This reproduces the KernelWarehouse paper's
parameter counts for DY-Conv (4x): ResNet18 45.47M (Tables 1, 2), ResNet50 100.88M (Table 2) and
MobileNetV2 1.0x / 0.5x 12.40M / 4.57M (Table 4): downsample shortcuts, depthwise convolutions and
MobileNetV2's last 1x1 (`conv_head`) are all dynamic. Measured: ResNet18 45,475,008; ResNet50 100,895,176;
MobileNetV2 1.0x 12,416,576 and 0.5x 4,573,536. Keeping `conv_head` static would give 11.16M / 3.95M
(10% / 14% below Table 4), so the MobileNetV2 numbers imply a dynamic `conv_head`.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from dynconv.ops.base import OPERATORS, LayerInfo, Operator, OperatorConfigError, require_positive_int
from dynconv.ops.per_sample_conv import mixture_conv2d
from dynconv.ops.temperature import LinearTemperature, TemperatureMixin


class KernelAttention(TemperatureMixin, nn.Module):
    """pi(x) = softmax(FC2(ReLU(FC1(GAP(x)))) / T), shape (B, K): the paper's softmax with temperature."""

    def __init__(self, in_channels: int, kernels: int, reduction: float = 0.25,
                 schedule: LinearTemperature = LinearTemperature()):
        super().__init__()
        hidden = int(in_channels * reduction) + 1  # "+ 1" keeps at least one unit for tiny C_in
        self.fc1 = nn.Linear(in_channels, hidden, bias=False)
        self.fc2 = nn.Linear(hidden, kernels)
        self.init_temperature(schedule)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.fc2(torch.relu(self.fc1(x.mean(dim=(2, 3)))))
        return torch.softmax(logits / self.temperature, dim=1)


class DyConv2d(nn.Module):
    """A drop-in for nn.Conv2d: K kernels aggregated per sample by softmax attention: W(x) * x + b(x)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: tuple[int, int],
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        bias: bool = False,
        kernels: int = 4,
        reduction: float = 0.25,
        schedule: LinearTemperature = LinearTemperature(),
    ):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = tuple(kernel_size)
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups
        self.kernels = kernels
        self.weight = nn.Parameter(torch.empty(kernels, out_channels, in_channels // groups, *self.kernel_size))
        self.bias = nn.Parameter(torch.empty(kernels, out_channels)) if bias else None
        self.attention = KernelAttention(in_channels, kernels, reduction, schedule)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Each kernel starts like a freshly initialised nn.Conv2d (kaiming-uniform, a=sqrt(5)), so that the
        # near-uniform early mixture has the scale of one conv. The bias is initialised too (an
        # uninitialised torch.empty bias is garbage memory: Dynamic-convolution-Pytorch#8).
        fan_in = (self.in_channels // self.groups) * math.prod(self.kernel_size)
        for k in range(self.kernels):
            nn.init.kaiming_uniform_(self.weight[k], a=math.sqrt(5))
        if self.bias is not None:
            bound = 1.0 / math.sqrt(fan_in)
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return mixture_conv2d(x, self.weight, self.attention(x), self.bias, self.stride, self.padding,
                              self.dilation, self.groups)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, groups={self.groups}, kernels={self.kernels}, bias={self.bias is not None}"
        )


def require_positive_number(cfg, key: str, op_name: str) -> float:
    """A finite number > 0 (ints accepted, bools not); OperatorConfigError naming op.<key> otherwise."""
    value = cfg.get(key)
    if (not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value)
            or value <= 0):
        raise OperatorConfigError(f"op.{key}={value!r} is invalid for op={op_name}: allowed values are numbers > 0")
    return float(value)


def require_non_negative_number(cfg, key: str, op_name: str) -> float:
    value = cfg.get(key)
    if (not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value)
            or value < 0):
        raise OperatorConfigError(f"op.{key}={value!r} is invalid for op={op_name}: allowed values are numbers >= 0")
    return float(value)


def read_temperature_schedule(cfg, op_name: str) -> LinearTemperature:
    """op.temperature_start / _end (> 0) and op.temperature_epochs (>= 0; 0 = no annealing)."""
    return LinearTemperature(
        require_positive_number(cfg, "temperature_start", op_name),
        require_positive_number(cfg, "temperature_end", op_name),
        require_non_negative_number(cfg, "temperature_epochs", op_name),
    )


@OPERATORS.register("dyconv")
class DyConvOperator(Operator):
    name = "dyconv"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.kernels = require_positive_int(self.cfg, "kernels", self.name)
        self.reduction = require_positive_number(self.cfg, "reduction", self.name)
        self.schedule = read_temperature_schedule(self.cfg, self.name)

    def build(self, layer: LayerInfo) -> nn.Module:
        conv = layer.module
        return DyConv2d(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            conv.stride,
            conv.padding,
            conv.dilation,
            conv.groups,
            bias=conv.bias is not None,
            kernels=self.kernels,
            reduction=self.reduction,
            schedule=self.schedule,
        )
