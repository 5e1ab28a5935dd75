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

Attention function (`op.attention_function`): `softmax` (the paper, above) or `caf`, KernelWarehouse's
contrasting-driven attention function (Li & Yao, ICML 2024, Eq. 4; its Table 10 "Applying CAF to other dynamic
convolution methods"): pi(x) = tau * beta + (1 - tau) * z(x) / sum_k |z_k(x)|, with the same GAP -> FC -> ReLU -> FC
logits z. The paper gives no more detail for DY-Conv; the choices (beta one-hot on the layer's first kernel, tau
1 -> 0 over `op.tau_epochs` instead of T, which would cancel in the normalisation, + 1e-3 in the normaliser) are
argued in `dynconv/layers/contrasting_attention.py`. With caf the temperature knobs are read but unused.

Conversion: every convolution except the stem (the default static roles), as in the paper ("dynamic
convolution for all convolution layers except the first layer"). This reproduces the KernelWarehouse paper's
parameter counts for DY-Conv (4x): ResNet18 45.47M (Tables 1, 2), ResNet50 100.88M (Table 2) and
MobileNetV2 1.0x / 0.5x 12.40M / 4.57M (Table 4): downsample shortcuts, depthwise convolutions and
MobileNetV2's last 1x1 (`conv_head`) are all dynamic. Measured: ResNet18 45,475,008; ResNet50 100,895,176;
MobileNetV2 1.0x 12,416,576 and 0.5x 4,573,536. Keeping `conv_head` static would give 11.16M / 3.95M
(10% / 14% below Table 4), so the MobileNetV2 numbers imply a dynamic `conv_head`.

Initialisation (`op.weight_init`, docs/initialisation.md). The reference is the unofficial
kaijieshi7/Dynamic-convolution-Pytorch (`dynamic_conv.py`, `dynamic_models/dy_resnet.py`), whose attention
matches Sec. 3. `reference` (the default): each of the K kernels `kaiming_uniform_` with torch's defaults
(a = 0, fan_in: U(+-sqrt(6 / (C/g k k)))), kernel biases zero, the attention's FC1 and FC2 kaiming-normal
fan_out with a zero FC2 bias. `pytorch`: each kernel and bias like a fresh nn.Conv2d (kaiming-uniform,
a = sqrt(5)), the attention nn.Linear's default (dynconv's behaviour before the knob).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from dynconv.conversion.operator import OPERATORS, LayerInfo, Operator
from dynconv.layers.kernel_bank import KernelBankConv2d, conv_geometry
from dynconv.functional.mixture import mixture_conv2d
from dynconv.layers.initialisation import kaiming_linears_, kernel_fans, read_weight_init, uniform_
from dynconv.layers.contrasting_attention import ContrastingAttention, LinearTau, one_hot_beta, read_attention_function
from dynconv.layers.temperature import LinearTemperature, TemperatureMixin, read_temperature_schedule


class KernelAttention(TemperatureMixin, nn.Module):
    """pi(x) = softmax(FC2(ReLU(FC1(GAP(x)))) / T), shape (B, K): the paper's softmax with temperature; with
    `caf` (a LinearTau), KernelWarehouse's CAF over the same logits instead (no temperature then)."""

    def __init__(self, in_channels: int, kernels: int, reduction: float = 0.25,
                 schedule: LinearTemperature = LinearTemperature(), caf: LinearTau | None = None):
        super().__init__()
        hidden = int(in_channels * reduction) + 1  # "+ 1" keeps at least one unit for tiny C_in
        self.fc1 = nn.Linear(in_channels, hidden, bias=False)
        self.fc2 = nn.Linear(hidden, kernels)
        self.caf = None if caf is None else ContrastingAttention(one_hot_beta(kernels), caf)
        if self.caf is None:
            self.init_temperature(schedule)

    def set_training_progress(self, epoch: float) -> dict[str, float]:
        # Under CAF the schedule is tau, which `self.caf` sets itself (the hook visits it too).
        return {} if self.caf is not None else super().set_training_progress(epoch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.fc2(torch.relu(self.fc1(x.mean(dim=(2, 3)))))
        if self.caf is not None:
            return self.caf(logits)
        return torch.softmax(logits / self.temperature, dim=1)


class DyConv2d(KernelBankConv2d):
    """A drop-in for nn.Conv2d: K kernels aggregated per sample by softmax (or CAF) attention: W(x) * x + b(x).
    The knobs default to configs/op/dyconv.yaml's (4 kernels, T 30 -> 1 over 10 epochs, the reference
    initialisation)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = False, kernels: int = 4, reduction: float = 0.25,
                 schedule: LinearTemperature = LinearTemperature(), weight_init: str = "reference",
                 caf: LinearTau | None = None):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
                         kernels=kernels, bias=bias)
        self.attention = KernelAttention(in_channels, kernels, reduction, schedule, caf)
        if weight_init == "reference":
            self.reference_init()

    @torch.no_grad()
    def reference_init(self) -> None:
        """kaijieshi7/Dynamic-convolution-Pytorch `dynamic_conv.py`: `kaiming_uniform_(weight[i])` for each kernel
        (fan_in = C/g k k), `bias = zeros(K, O)`, and `attention2d._initialize_weights`: FC1 / FC2 kaiming-normal
        fan_out, FC2's bias 0 (`dy_resnet.py` re-draws them from the same distribution)."""
        uniform_(self.weight, kernel_fans(self.weight)[0])
        if self.bias is not None:
            self.bias.zero_()
        kaiming_linears_(self.attention)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return mixture_conv2d(x, self.weight, self.attention(x), self.bias, self.stride, self.padding,
                              self.dilation, self.groups)


@OPERATORS.register("dyconv")
class DyConvOperator(Operator):
    name = "dyconv"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.kernels = self.knobs.integer("kernels")
        self.reduction = self.knobs.number("reduction", 0)
        self.schedule = read_temperature_schedule(self.knobs)
        self.weight_init = read_weight_init(self.knobs)
        self.attention_function, self.tau = read_attention_function(self.knobs, self.kernels)

    def build(self, layer: LayerInfo) -> nn.Module:
        return DyConv2d(**conv_geometry(layer.module), bias=layer.module.bias is not None, kernels=self.kernels,
                        reduction=self.reduction, schedule=self.schedule, weight_init=self.weight_init,
                        caf=self.tau if self.attention_function == "caf" else None)
