"""ODConv (Li, Zhou, Yao, "Omni-Dimensional Dynamic Convolution", ICLR 2022).

ODConv attends to a convolution's kernels along all four dimensions of the kernel space (the
paper's ODConv definition, Sec. 3; its equation number is not cited as the paper's text is not in shared/papers):

    y = (a_w1 . a_f1 . a_c1 . a_s1 . W_1 + ... + a_wn . a_fn . a_cn . a_sn . W_n) * x

with a_s in R^{k x k} (spatial, shared by all kernels), a_c in R^{C_in} (input channels), a_f in R^{C_out}
(output filters) and a_w in R^{n} (kernel-wise, softmax). Because a_c and a_f are per channel and shared
by the n kernels, they commute with the convolution, so (as the paper's implementation does) a_f scales
the output and a_c could scale the input; only a_s and a_w need the per-sample kernel:

    W_b = a_s(b) . sum_k a_w(b)_k W_k,     y_b = a_f(b) . (W_b * (a_c(b) . x_b))

Here a_c and a_f are handed to `mixture_conv2d` with a_s, which applies them where it is cheapest (on the mixed
kernel in one pass, or a_c on the im2col columns and a_f on the output) instead of separate passes over the
feature maps.

The attention (Sec. 3, as the reference implements it): GAP -> FC(C_in -> max(int(C_in * 0.0625), 16),
no bias) -> BN -> ReLU -> four heads, each divided by a temperature T (annealed linearly 30 -> 1 over 10
epochs, per iteration): channel = sigmoid, filter = sigmoid (skipped for depthwise: one filter per channel
duplicates the channel attention), spatial = sigmoid (skipped for 1 x 1), kernel = softmax over n (skipped
for n = 1).

Kernel-wise attention function (`op.attention_function`): `softmax` (the paper, above) or `caf`,
KernelWarehouse's contrasting-driven attention function (Li & Yao, ICML 2024, Eq. 4; Table 10 "Applying CAF to
other dynamic convolution methods"): a_w = tau * beta + (1 - tau) * z / sum_k |z_k| over the kernel head's
logits z. Only a_w changes: the channel, filter and spatial attentions are sigmoids over one value each, not
attentions over the n kernels, and keep their temperature T. The paper gives no more detail for ODConv; the
choices (beta one-hot on the layer's first kernel, tau 1 -> 0 over `op.tau_epochs` in place of T for a_w, + 1e-3
in the normaliser) are argued in `dynconv/layers/contrasting_attention.py`. It needs n >= 2 (n = 1 has no kernel
head).

Batch size 1 in train mode: the reference's BatchNorm raises there (ODConv#27: one value per channel has no
batch variance). `BatchSafeBatchNorm1d` normalises a batch of one with its running statistics instead (the
eval-mode computation, without updating them): the only well-defined normalisation for one sample, it keeps
the attention input-dependent (batch statistics of one sample would map every sample to beta, i.e. a
constant attention), and batches > 1 train exactly as the reference. No bias, as the paper.

Conversion, as the reference (OSVAI/ODConv `models/od_resnet.py`, `models/od_mobilenetv2.py`): the stem and
ResNet's downsample shortcut convolutions stay static; everything else becomes ODConv, depthwise convolutions
and MobileNetV2's last 1x1 (`conv_head`, role "head") included. The last point contradicts
shared/REFERENCE_NOTES.md ("MobileNetV2's ... last 1x1 stay normal convs") but is what the reference's
MobileNetV2 builds (its last layer is an ODConvBNReLU) and what the published counts require: with
`conv_head` dynamic, MobileNetV2 1.0x ODConv (4x) / (1x) has 11,512,149 / 4,940,185 parameters (KernelWarehouse
Table 4: 11.52M; REFERENCE_NOTES: 4.94M) and 0.5x (4x) 4,435,501 (Table 4: 4.44M); with it static, 10.24M /
4.90M / 3.79M (the 4x counts 11% / 15% off). ResNet18 (1x) / (4x): 11,943,944 / 44,901,640 (11.94M / 44.90M, Table 1);
ResNet50 (4x): 90,670,888 (90.67M, Table 2).

Initialisation (`op.weight_init`, docs/initialisation.md). `reference` (the default), as OSVAI/ODConv's
`modules/odconv.py`: each of the n kernels kaiming-normal, mode fan_out, ReLU gain (std sqrt(2 / (O k k)):
0.059 for a 64-channel 3x3), and every attention layer (the FC and the four heads, 1x1 convolutions there)
kaiming-normal fan_out with zero biases; the BN starts at scale 1, shift 0. `pytorch`: each kernel like a fresh
nn.Conv2d (std 0.024 for the same layer) and the attention heads nn.Linear's default, non-zero biases
(dynconv's behaviour before the knob).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from dynconv.conversion.operator import OPERATORS, LayerInfo, Operator
from dynconv.functional import kernel_capture
from dynconv.functional.mixture import mixture_conv2d
from dynconv.layers.batch_safe_norm import BatchSafeBatchNorm1d
from dynconv.layers.contrasting_attention import ContrastingAttention, LinearTau, one_hot_beta, read_attention_function
from dynconv.layers.initialisation import kaiming_linears_, kernel_fans, normal_, read_weight_init
from dynconv.layers.kernel_bank import KernelBankConv2d, conv_geometry
from dynconv.layers.temperature import LinearTemperature, TemperatureMixin, read_temperature_schedule


class OmniAttention(TemperatureMixin, nn.Module):
    """The four ODConv attentions (channel, filter, spatial, kernel); a skipped one is None. With `caf` (a
    LinearTau) the kernel attention is KernelWarehouse's CAF instead of softmax(z / T)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: tuple[int, int], groups: int,
                 kernels: int, reduction: float = 0.0625, min_hidden: int = 16,
                 schedule: LinearTemperature = LinearTemperature(), caf: LinearTau | None = None):
        super().__init__()
        hidden = max(int(in_channels * reduction), min_hidden)
        self.kernel_size = tuple(kernel_size)
        self.fc = nn.Linear(in_channels, hidden, bias=False)  # bias would be cancelled by the BN
        self.bn = BatchSafeBatchNorm1d(hidden)
        self.channel = nn.Linear(hidden, in_channels)
        depthwise = groups == in_channels == out_channels and groups > 1
        self.filter = None if depthwise else nn.Linear(hidden, out_channels)
        self.spatial = None if math.prod(self.kernel_size) == 1 else nn.Linear(hidden, math.prod(self.kernel_size))
        self.kernel = None if kernels == 1 else nn.Linear(hidden, kernels)
        self.kernel_caf = None if caf is None or self.kernel is None else ContrastingAttention(one_hot_beta(kernels),
                                                                                              caf)
        self.init_temperature(schedule)

    def forward(self, x: torch.Tensor):
        """(channel (B, C_in), filter (B, C_out) | None, spatial (B, kh, kw) | None, kernel (B, n) | None)."""
        h = torch.relu(self.bn(self.fc(x.mean(dim=(2, 3)))))
        t = self.temperature
        channel = torch.sigmoid(self.channel(h) / t)
        filt = None if self.filter is None else torch.sigmoid(self.filter(h) / t)
        spatial = None if self.spatial is None else torch.sigmoid(self.spatial(h) / t).view(-1, *self.kernel_size)
        kernel = None
        if self.kernel_caf is not None:
            kernel = self.kernel_caf(self.kernel(h))
        elif self.kernel is not None:
            kernel = torch.softmax(self.kernel(h) / t, dim=1)
        return channel, filt, spatial, kernel


class ODConv2d(KernelBankConv2d):
    """A drop-in for nn.Conv2d (without bias) with omni-dimensional attention over n kernels. The knobs default to
    configs/op/odconv.yaml's (1 kernel, hidden width C_in / 16 but at least 16, T 30 -> 1 over 10 epochs, the
    reference initialisation)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = False, kernels: int = 1, reduction: float = 0.0625,
                 min_hidden: int = 16, schedule: LinearTemperature = LinearTemperature(),
                 weight_init: str = "reference", caf: LinearTau | None = None):
        if bias:  # nn.Conv2d's argument, taken so that the signature is nn.Conv2d's
            raise ValueError("ODConv2d has no bias (as the paper: a BatchNorm follows it); pass bias=False")
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
                         kernels=kernels, bias=False)
        self.attention = OmniAttention(in_channels, out_channels, self.kernel_size, groups, kernels, reduction,
                                       min_hidden, schedule, caf)
        if weight_init == "reference":
            self.reference_init()

    def reference_init(self) -> None:
        """OSVAI/ODConv `modules/odconv.py`: `kaiming_normal_(weight[i], mode="fan_out", nonlinearity="relu")`
        for each kernel (fan_out = O k k, the groups not counted), the attention's FC and heads kaiming-normal
        fan_out with zero biases (`Attention._initialize_weights`; `od_resnet.py` / `od_mobilenetv2.py`
        re-draw those convolutions from the same distribution). The BN keeps scale 1, shift 0."""
        normal_(self.weight, kernel_fans(self.weight)[1])
        kaiming_linears_(self.attention)

    def sample_kernels(self, spatial: torch.Tensor | None, kernel: torch.Tensor | None, batch: int):
        """W_b = a_s(b) . sum_k a_w(b)_k W_k, (B, O, C/g, kh, kw), materialised; None when every sample shares
        W_1. `forward` does not call this: `mixture_conv2d` applies the same kernels without always building them."""
        if kernel is None and spatial is None:
            return None
        if kernel is None:
            mixed = self.weight[0].unsqueeze(0)  # n = 1: a_w = 1, broadcast over the batch
        else:
            mixed = (kernel @ self.weight.flatten(1)).view(batch, *self.weight.shape[1:])
        if spatial is not None:
            mixed = mixed * spatial[:, None, None]
        return mixed.expand(batch, *self.weight.shape[1:])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        channel, filt, spatial, kernel = self.attention(x)
        if kernel is None and spatial is None and not kernel_capture.active():  # a capture takes the mixture
            # 1 x 1 with one kernel: the kernel is not per sample, so one static convolution is exact and
            # cheaper than materialising B copies of it.
            out = F.conv2d(x * channel[:, :, None, None], self.weight[0], None, self.stride, self.padding,
                           self.dilation, self.groups)
            return out if filt is None else out * filt[:, :, None, None]
        # W_b = a_f(b) . a_s(b) . a_c(b) . sum_k a_w(b)_k W_k, by whichever exact algorithm is fastest for the
        # shape. a_c and a_f go in as kernel scales rather than multiplied into x and y: riding along with a_s on
        # the kernels (or on the im2col columns) they cost no extra pass over a feature map, and autograd keeps no
        # unscaled output for a_f's gradient.
        return mixture_conv2d(x, self.weight, kernel, None, self.stride, self.padding, self.dilation, self.groups,
                              spatial=spatial, channel=channel, filter=filt)


@OPERATORS.register("odconv")
class ODConvOperator(Operator):
    name = "odconv"
    # The reference keeps ResNet's downsample shortcuts static (and converts MobileNetV2's conv_head: see
    # the module docstring; the published parameter counts need it).
    static_roles = Operator.static_roles | {"downsample"}

    def __init__(self, cfg):
        super().__init__(cfg)
        self.kernels = self.knobs.integer("kernels")
        self.reduction = self.knobs.number("reduction", 0)
        self.min_hidden = self.knobs.integer("min_hidden")
        self.schedule = read_temperature_schedule(self.knobs)
        self.weight_init = read_weight_init(self.knobs)
        self.attention_function, self.tau = read_attention_function(self.knobs, self.kernels)

    def refuse(self, layer: LayerInfo) -> str | None:
        reason = super().refuse(layer)
        if reason is None and layer.module.bias is not None:
            return "odconv has no bias (as the paper); a convolution with bias stays static"
        return reason

    def build(self, layer: LayerInfo) -> nn.Module:
        return ODConv2d(**conv_geometry(layer.module), kernels=self.kernels, reduction=self.reduction,
                        min_hidden=self.min_hidden, schedule=self.schedule, weight_init=self.weight_init,
                        caf=self.tau if self.attention_function == "caf" else None)
