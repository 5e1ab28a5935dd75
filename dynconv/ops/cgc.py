"""CGC (Lin, Ma, Liu, Chang, "Context-Gated Convolution", ECCV 2020): each sample's kernel gated by its global context.

A convolution's kernel W (O, C/g, kh, kw) is modulated per sample by a gate of its own shape (Sec. 3.2):

    W'_b = W ⊙ G_b,    y_b = W'_b * x_b + bias,    G_b[h, i] = sigmoid(G^c_b[i] + G^o_b[h])  in (0, 1)^{kh x kw}

G_b is decoded from two summaries of x_b's global context, one per input channel i and one per output channel h,
so the gate costs far less than a kernel's worth of parameters. The three modules of Sec. 3.2:

- Context encoding: x_b average-pooled to h' x w' = kh x kw per channel, projected by one linear layer E
  (kh kw -> d, shared by all channels) and normalised: C_b (C, d). d is the paper's k1 k2 / 2, which the release
  rounds as int(kh kw / 2 + 1) (5 for a 3x3 kernel).
- Channel interacting: a grouped linear layer I (C/n -> O/n, shared by the n groups and by the d latent
  positions) maps the C input channels to O output channels: O_b (O, d), normalised.
- Gate decoding: two linear layers D_c, D_o (d -> kh kw, shared by all channels) decode G^c_b = D_c(C_b) (C, kh kw)
  and G^o_b = D_o(O_b) (O, kh kw); the gate is their broadcast sum through a sigmoid.

The paper's equations are cited by their module: its text is not in shared/papers, so equation numbers could not
be checked. Where the paper leaves a detail open, this follows the authors' release
(XudongLinthu/context-gated-convolution, `image-classification/models/layers.py` and `imagenet/resnet.py`):

- Normalisation and activation: BatchNorm1d + ReLU after E on each branch, with a separate BatchNorm for the
  context that feeds channel interacting, and BatchNorm1d + ReLU after I; every linear layer has no bias.
- Groups of I: the release uses 16 input channels per group (n = C / 16) and one group below 16 channels (its
  "linear layer for resnet.conv1"). `op.group_channels` sets the 16; for channel counts the release's rule does not
  divide, n is the largest common divisor of C and O not above C // group_channels (C / 16 on every ResNet layer).
- Which layers: the release gates every convolution with a kernel larger than 1x1, the ResNet stem included, and
  runs plain convolutions for 1x1 kernels (so the downsample shortcuts stay static). `op.stem=false` keeps the stem
  static. The classifier and SE branches are not convolutions CGC is about.
- Grouped and depthwise convolutions (the release handles groups = 1 only): the gate takes the kernel's shape,
  G_b[h, j] pairing output channel h with the j-th input channel of h's group: the same equations.
- A convolution's bias is added unchanged (the release's gated path drops it; ResNets have none).

The static kernel is the converted layer's own (`CGCConv2d` keeps its parameters), so it keeps the backbone's
initialisation, which for timm's ResNets is the release's (kaiming-normal, mode fan_out); the gate's layers start
as PyTorch's defaults, as in the release. The gated kernel goes through `per_sample_conv2d`, so the selector picks
the exact algorithm and MAC counting sees gate, then one convolution.

ResNet18, 224 px, 1000 classes: 11,721,791 parameters (KernelWarehouse Table 1: 11.69M; docs/ops/cgc.md gives the
arithmetic of the 0.03M).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from dynconv.conversion.operator import OPERATORS, LayerInfo, Operator
from dynconv.functional import recompute
from dynconv.functional.per_sample import per_sample_conv2d


def context_size(taps: int) -> int:
    """d, the latent size of the context: the paper's k1 k2 / 2 as the release rounds it, int(kh kw / 2 + 1)."""
    return int(taps / 2 + 1)


def interacting_groups(in_channels: int, out_channels: int, group_channels: int) -> int:
    """n, the groups of the channel-interacting layer: the largest common divisor of C and O not above
    C // group_channels (at least 1). The release's C / 16 wherever 16 divides C and C / 16 divides O."""
    limit = max(1, in_channels // group_channels)
    common = math.gcd(in_channels, out_channels)
    return max(n for n in range(1, limit + 1) if common % n == 0)


class ContextGate(nn.Module):
    """G (B, O, C/g, kh, kw) in (0, 1) from x (B, C, H, W): context encoding, channel interacting and gate
    decoding (Sec. 3.2)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: tuple[int, int], groups: int = 1,
                 group_channels: int = 16):
        super().__init__()
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size = tuple(kernel_size)
        taps, latent = math.prod(self.kernel_size), context_size(math.prod(self.kernel_size))
        self.encode = nn.Linear(taps, latent, bias=False)  # E: kh kw pooled values -> d, shared by the channels
        self.context_norm = nn.BatchNorm1d(in_channels)  # C_b for the input-channel gate
        self.interact_norm = nn.BatchNorm1d(in_channels)  # C_b for channel interacting (the release's own BN)
        self.interact_groups = interacting_groups(in_channels, out_channels, group_channels)
        n = self.interact_groups
        self.interact = nn.Linear(in_channels // n, out_channels // n, bias=False)  # I, shared by groups and d
        self.output_norm = nn.BatchNorm1d(out_channels)
        self.decode_in = nn.Linear(latent, taps, bias=False)  # D_c
        self.decode_out = nn.Linear(latent, taps, bias=False)  # D_o

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, n, g = x.shape[0], self.interact_groups, self.groups
        context = self.encode(F.adaptive_avg_pool2d(x, self.kernel_size).flatten(2))  # (B, C, d)
        gate_in = self.decode_in(F.relu(self.context_norm(context)))  # G^c (B, C, kh kw)
        # Channel interacting: consecutive channels form a group; I maps a group's C/n values at each of the d
        # latent positions to O/n values, and the groups' outputs are concatenated (output channel = group, j).
        grouped = F.relu(self.interact_norm(context)).view(batch, n, self.in_channels // n, -1)
        interacted = self.interact(grouped.transpose(2, 3)).transpose(2, 3).reshape(batch, self.out_channels, -1)
        gate_out = self.decode_out(F.relu(self.output_norm(interacted)))  # G^o (B, O, kh kw)
        taps = gate_in.shape[-1]
        gate = torch.sigmoid(gate_out.view(batch, g, self.out_channels // g, 1, taps)
                             + gate_in.view(batch, g, 1, self.in_channels // g, taps))
        return gate.view(batch, self.out_channels, self.in_channels // g, *self.kernel_size)


class CGCConv2d(nn.Module):
    """A drop-in for nn.Conv2d whose kernel is gated per sample: y_b = (W ⊙ G_b) * x_b + bias.

    `CGCConv2d(16, 32, 3, padding=1)` takes nn.Conv2d's arguments (its kernel and bias initialised as
    nn.Conv2d's; `group_channels` defaults to configs/op/cgc.yaml's 16); `CGCConv2d.from_conv(conv)` keeps an
    existing convolution's kernel and bias parameters, so they start where the backbone initialised them (what
    op=cgc does)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, *, group_channels: int = 16):
        super().__init__()
        self._adopt(nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias),
                    group_channels)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, *, group_channels: int = 16) -> "CGCConv2d":
        """The gated layer of `conv`, sharing its kernel and bias parameters."""
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer._adopt(conv, group_channels)
        return layer

    def _adopt(self, conv: nn.Conv2d, group_channels: int) -> None:
        if math.prod(conv.kernel_size) == 1:
            # One tap: a one-position context, which the gate's BatchNorms cannot normalise in a batch of one.
            raise ValueError("CGC gates k x k kernels; a 1x1 convolution stays a plain one (as the release, and "
                             "op=cgc, keep it)")
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size = tuple(conv.kernel_size)
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups
        self.weight, self.bias = conv.weight, conv.bias
        self.gate = ContextGate(conv.in_channels, conv.out_channels, self.kernel_size, conv.groups, group_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.gate(x)
        bias = None if self.bias is None else self.bias.expand(x.shape[0], -1)
        # W'_b = W ⊙ G_b, (B, O, C/g, kh, kw); under `recompute` made again in the backward.
        with recompute.materialised(lambda note: note(self.weight * gate), x, self.weight, gate) as kernel:
            return per_sample_conv2d(x, kernel, bias, self.stride, self.padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, "
                f"bias={self.bias is not None}")


@OPERATORS.register("cgc")
class CGCOperator(Operator):
    name = "cgc"
    # The release gates ResNet's stem too (op.stem decides); classifier and SE branches are not its convolutions.
    static_roles = frozenset({"se", "classifier"})

    def __init__(self, cfg):
        super().__init__(cfg)
        self.group_channels = self.knobs.integer("group_channels")
        self.stem = self.knobs.flag("stem")

    def refuse(self, layer: LayerInfo) -> str | None:
        if layer.role == "stem" and not self.stem:
            return "op.stem=false keeps the stem static"
        reason = super().refuse(layer)
        if reason is None and math.prod(layer.kernel_size) == 1:
            return "cgc leaves 1x1 convolutions static (the release runs a plain convolution there)"
        return reason

    def build(self, layer: LayerInfo) -> nn.Module:
        return CGCConv2d.from_conv(layer.module, group_channels=self.group_channels)
