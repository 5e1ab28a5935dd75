"""DCD (Li et al., "Revisiting Dynamic Convolution via Matrix Decomposition", ICLR 2021): dynamic convolution
decomposition, a static kernel plus a low-rank dynamic residual fused in a latent space of L channels.

The DCD layer (the paper's Fig. 2; its caption builds "the convolution matrix W(x) using Eq. 6"):

    W(x) = Λ(x) W_0 + P Φ(x) Q^T,        y = W(x) * x

- W_0 (C_out x C_in, k x k taps): the static kernel; Λ(x) (C_out x C_out, diagonal): dynamic channel-wise attention.
- Q^T (L x C_in) compresses the input channels into the latent space, P (C_out x L) expands back; both static.
- Φ(x) (L x L): dynamic channel fusion, a full matrix per sample (the paper bounds L by L^2 < C).
- Λ(x) and Φ(x) come from one dynamic branch on x's average-pooled summary.

L: the paper's default is floor(C / 2^floor(log2 sqrt(C))) (`op.latent=paper`: 8, 16, 16, 32 for C = 64 ... 512;
its text is not in shared/papers, so equations are cited by figure and the rule as read, not by number).
The release (liyunsheng13/dcd, `models/imagenet/resnet_dcd.py`, whose ResNet18 KernelWarehouse Table 1 counts:
14.70M) instead takes L = floor(sqrt(p^2 C_in)), the square root of the pooled summary's size (p = 2 in its
ResNet18/34, so 16, 22, 32, 45, all past the paper's L^2 < C; p = 1 in its ResNet-50):
`op.latent=release`, the default, with `op.pool`.

Where the paper leaves details open, this follows the release's ResNets:

- The dynamic branch: s = avgpool_{p x p}(x) flattened (p^2 C_in values); h = FC(s) (no bias, width
  max(p^2 C_in, L^2) // 16, at least 4); h = h ⊙ hsig(FC_se(h)) (a gate with no bias);
  Λ = diag(hsig(FC_Λ(h))), Φ = FC_Φ(h) viewed L x L. hsig(z) = ReLU6(z + 3) / 3, in [0, 2] and 1 at z = 0
  (the release's Hsigmoid, twice the usual h-sigmoid).
- The latent path: BatchNorms after Q^T and after Φ, and Φ's input added back, so that the residual applied is
  P (BN_2(Φ(x) BN_1(Q^T x)) + BN_1(Q^T x)). Within one forward a BatchNorm is a per-channel affine map
  v -> a v + c (`dynconv.layers.batch_norm_affine`: batch statistics in train mode, running ones in eval), so the
  residual is a per-sample matrix and bias:

      R(x) = P (diag(a_2) Φ(x) + I) diag(a_1) Q^T,      r(x) = P ((diag(a_2) Φ(x) + I) c_1 + c_2)

  In train mode the statistics are those of Q^T x over the batch and positions (and of Φ(x) BN_1(Q^T x)), as
  the release computes them, gradients included; a single value per channel uses the running statistics.
- k x k layers: W_0 is k x k; the residual is the release's strided 1x1 branch, i.e. R(x) sits on the kernel's
  centre tap (exact for odd kernels padded to keep the map's size: the centre tap reads the strided 1x1
  positions). Other kernels, and grouped or depthwise convolutions (no room for a dense C_out x C_in residual;
  the release keeps depthwise convolutions static), stay static with that reason.
- Λ(x) scales the static layer's whole output, bias included (the release's dynamic classifier).
- Which layers: every block convolution (the release's BasicBlock / Bottleneck convolutions), the stem and the
  downsample shortcuts static, and the classifier as a DCD layer too (the release's DYCls: L = 32, branch width 32,
  no pooling), which the Table 1 count includes (`op.classifier=false` keeps nn.Linear: 14,572,644).

Per sample, the kernel Λ(x) W_0 + centre(R(x)) and bias r(x) (+ Λ(x) b_0) are built and convolved through
`per_sample_conv2d`, so MAC counting sees the branch, the kernel's construction (P . mix . Q^T) and one
convolution. Initialisation as the release: W_0 (and the classifier's W_0, b_0) are the converted layer's own
parameters (timm's ResNets draw convolutions as the release does, kaiming-normal fan_out); Q^T and P of a
convolution N(0, 2 / fan_out) as the release's 1x1 convolutions, of the classifier nn.Linear's default; the branch's
layers nn.Linear's default; BatchNorms scale 1, shift 0.

ResNet18, 224 px, 1000 classes: 14,703,332 parameters (Table 1: 14.70M), the release's resnet18_dcd to the
parameter; ResNet-50 with op.pool=1: 29,835,056, its resnet50_dcd.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from dynconv.conversion.operator import OPERATORS, LayerInfo, Operator
from dynconv.functional import recompute, selector
from dynconv.functional.per_sample import per_sample_conv2d
from dynconv.layers.batch_norm_affine import batch_norm_affine, uses_batch_statistics

LATENT_RULES = ("release", "paper")


def paper_latent(channels: int) -> int:
    """The paper's L = floor(C / 2^floor(log2 sqrt(C))): C halved floor(log2 sqrt(C)) times (64 -> 8, 512 -> 32)."""
    return channels >> ((channels.bit_length() - 1) // 2)


def release_latent(channels: int, pool: int) -> int:
    """The release's L = floor(sqrt(p^2 C)), the square root of the pooled summary's size."""
    return math.isqrt(pool * pool * channels)


def latent_size(rule: str | int, channels: int, pool: int) -> int:
    """L of a layer with `channels` inputs under op.latent = `rule` (release | paper | an integer)."""
    if rule == "release":
        return release_latent(channels, pool)
    if rule == "paper":
        return paper_latent(channels)
    return int(rule)


def branch_width(channels: int, latent: int, pool: int, reduction: int, min_hidden: int) -> int:
    """The dynamic branch's hidden width: max(p^2 C, L^2) // reduction, at least `min_hidden` (the release's)."""
    return max(max(pool * pool * channels, latent * latent) // reduction, min_hidden)


def scaled_hard_sigmoid(z: torch.Tensor) -> torch.Tensor:
    """The release's Hsigmoid, ReLU6(z + 3) / 3: in [0, 2], 1 at z = 0."""
    return F.relu6(z + 3.0) / 3.0


class DecompositionBranch(nn.Module):
    """Λ(x) (B, C_out) and Φ(x) (B, L, L) from a pooled summary (B, F) of the input."""

    def __init__(self, features: int, hidden: int, out_channels: int, latent: int):
        super().__init__()
        self.latent = latent
        self.squeeze = nn.Linear(features, hidden, bias=False)
        self.excite = nn.Linear(hidden, hidden, bias=False)  # the release's SEModule_small: h * hsig(FC(h))
        self.scale = nn.Linear(hidden, out_channels, bias=False)
        self.fusion = nn.Linear(hidden, latent * latent, bias=False)

    def forward(self, summary: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.squeeze(summary)
        h = h * scaled_hard_sigmoid(self.excite(h))
        return scaled_hard_sigmoid(self.scale(h)), self.fusion(h).view(-1, self.latent, self.latent)


class LatentResidual(nn.Module):
    """P, Q^T and the latent BatchNorms: the per-sample residual matrix R(x) (B, C_out, C_in) and bias r(x)."""

    def __init__(self, in_channels: int, out_channels: int, latent: int, init: str):
        super().__init__()
        self.compress = nn.Parameter(torch.empty(latent, in_channels))  # Q^T
        self.expand = nn.Parameter(torch.empty(out_channels, latent))  # P
        self.compress_norm = nn.BatchNorm1d(latent)  # BN_1, after Q^T
        self.fusion_norm = nn.BatchNorm1d(latent)  # BN_2, after Φ
        with torch.no_grad():
            if init == "conv":  # the release's 1x1 convolutions: N(0, 2 / fan_out)
                self.compress.normal_(0.0, math.sqrt(2.0 / latent))
                self.expand.normal_(0.0, math.sqrt(2.0 / out_channels))
            else:  # the release's classifier: nn.Linear's default
                nn.init.kaiming_uniform_(self.compress, a=math.sqrt(5))
                nn.init.kaiming_uniform_(self.expand, a=math.sqrt(5))

    def forward(self, fusion: torch.Tensor, inputs: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """`inputs` (B, C_in, positions): the values the residual reads (needed for batch statistics only)."""
        positions = 0 if inputs is None else inputs.shape[0] * inputs.shape[2]
        if uses_batch_statistics(self.compress_norm, positions):
            latent = self.compress @ inputs  # Q^T x, (B, L, positions)
            a1, c1 = batch_norm_affine(self.compress_norm, latent)
            fused = fusion @ (a1[:, None] * latent + c1[:, None])  # Φ(x) BN_1(Q^T x)
            a2, c2 = batch_norm_affine(self.fusion_norm, fused)
        else:
            a1, c1 = batch_norm_affine(self.compress_norm)
            a2, c2 = batch_norm_affine(self.fusion_norm)
        mix = a2[:, None] * fusion + torch.eye(fusion.shape[-1], dtype=fusion.dtype, device=fusion.device)
        matrix = self.expand @ (mix * a1) @ self.compress  # P (diag(a2) Φ + I) diag(a1) Q^T
        bias = (mix @ c1 + c2) @ self.expand.t()  # P ((diag(a2) Φ + I) c1 + c2)
        return matrix, bias


def _is_centred(conv: nn.Conv2d) -> bool:
    """An odd kernel padded to keep the map's size: its centre tap reads the positions a strided 1x1 reads."""
    return all(k % 2 == 1 and p == d * (k // 2)
               for k, p, d in zip(conv.kernel_size, conv.padding, conv.dilation))


class DCDConv2d(nn.Module):
    """A drop-in for nn.Conv2d (groups = 1, centred padding): y_b = (Λ_b W_0 + centre(R_b)) * x_b + Λ_b b_0 + r_b.

    `DCDConv2d(16, 32, 3, padding=1)` takes nn.Conv2d's arguments (W_0 and b_0 initialised as nn.Conv2d's) and the
    knobs of configs/op/dcd.yaml with its defaults; `DCDConv2d.from_conv(conv, latent=L, hidden=h, pool=p)` keeps
    an existing convolution's kernel and bias parameters (W_0, b_0), what op=dcd does."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, *, latent: str | int = "release", pool: int = 2,
                 reduction: int = 16, min_hidden: int = 4):
        super().__init__()
        size = latent_size(latent, in_channels, pool)
        conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias)
        self._adopt(conv, size, branch_width(in_channels, size, pool, reduction, min_hidden), pool)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, *, latent: int, hidden: int, pool: int) -> "DCDConv2d":
        """The DCD layer of `conv`, sharing its kernel and bias parameters (W_0, b_0)."""
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer._adopt(conv, latent, hidden, pool)
        return layer

    def _adopt(self, conv: nn.Conv2d, latent: int, hidden: int, pool: int) -> None:
        if conv.groups != 1 or not _is_centred(conv):
            raise ValueError(f"DCD needs groups=1 and an odd kernel padded to keep the map's size, got {conv}")
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size = tuple(conv.kernel_size)
        self.stride, self.padding, self.dilation = conv.stride, conv.padding, conv.dilation
        self.weight, self.bias = conv.weight, conv.bias
        self.pool = pool
        self.branch = DecompositionBranch(pool * pool * conv.in_channels, hidden, conv.out_channels, latent)
        self.residual = LatentResidual(conv.in_channels, conv.out_channels, latent, init="conv")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale, fusion = self.branch(F.adaptive_avg_pool2d(x, self.pool).flatten(1))
        # The positions the residual's strided 1x1 reads (= the centre taps), for the BatchNorms' statistics.
        taps = x[:, :, ::self.stride[0], ::self.stride[1]].flatten(2) if self.training else None
        matrix, bias = self.residual(fusion, taps)
        kh, kw = self.kernel_size

        def make_kernel(note) -> torch.Tensor:
            kernel = note(scale[:, :, None, None, None] * self.weight)  # Λ(x) W_0
            # + R(x) on the centre tap, in place: the product's backward needs its inputs, not its output.
            kernel[:, :, :, kh // 2, kw // 2] += matrix
            return kernel

        if self.bias is not None:
            bias = bias + scale * self.bias
        # Under `recompute` the backward makes the kernels again.
        with recompute.materialised(make_kernel, x, scale, matrix, self.weight) as kernel:
            return per_sample_conv2d(x, kernel, bias, self.stride, self.padding, self.dilation, 1)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, latent={self.branch.latent}, pool={self.pool}")


class DCDLinear(nn.Module):
    """A drop-in for a classifier `linear` on pooled features (B, C): y_b = (Λ_b W_0 + R_b) x_b + Λ_b b_0 + r_b.

    The release's dynamic classifier (DYCls): no pooling, the branch reads x itself."""

    def __init__(self, linear: nn.Linear, *, latent: int, hidden: int):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        self.branch = DecompositionBranch(linear.in_features, hidden, linear.out_features, latent)
        self.residual = LatentResidual(linear.in_features, linear.out_features, latent, init="linear")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2:
            raise ValueError(f"DCDLinear takes pooled features (B, {self.in_features}), got {tuple(x.shape)}")
        scale, fusion = self.branch(x)
        matrix, bias = self.residual(fusion, x[:, :, None] if self.training else None)
        kernel = scale[:, :, None] * self.weight + matrix  # (B, O, C)
        if self.bias is not None:
            bias = bias + scale * self.bias
        if not selector.is_exporting() and x.shape[0] == 1:  # exported: one graph for every batch size
            return F.linear(x, kernel[0], bias[0])
        return torch.baddbmm(bias[:, :, None], kernel, x[:, :, None]).squeeze(-1)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, latent={self.branch.latent}"


@OPERATORS.register("dcd")
class DCDOperator(Operator):
    name = "dcd"
    supports_linear = True  # the classifier only (refuse)
    # The release keeps ResNet's stem and downsample shortcuts as plain convolutions.
    static_roles = frozenset({"stem", "se", "downsample"})

    def __init__(self, cfg):
        super().__init__(cfg)
        self.latent = self.knobs.integer_or("latent", LATENT_RULES, low=1)
        self.pool = self.knobs.integer("pool")
        self.reduction = self.knobs.integer("reduction")
        self.min_hidden = self.knobs.integer("min_hidden")
        self.classifier = self.knobs.flag("classifier")
        self.classifier_latent = self.knobs.integer("classifier_latent")

    def latent_size(self, in_channels: int) -> int:
        return latent_size(self.latent, in_channels, self.pool)

    def refuse(self, layer: LayerInfo) -> str | None:
        if layer.role == "classifier" and not self.classifier:
            return "op.classifier=false keeps the classifier static"
        reason = super().refuse(layer)
        if reason is not None:
            return reason
        if layer.is_linear and layer.role != "classifier":
            return "dcd converts convolutions and the classifier (the release's DYCls), not other Linear layers"
        if layer.groups > 1:
            return ("dcd's residual P Φ(x) Q^T is a dense C_out x C_in matrix, which a grouped or depthwise "
                    "convolution has no room for (the release keeps depthwise convolutions static)")
        if layer.is_conv and not _is_centred(layer.module):
            return ("dcd's residual sits on the kernel's centre tap (the release's strided 1x1 branch), which needs "
                    "an odd kernel padded to keep the map's size")
        return None

    def build(self, layer: LayerInfo) -> nn.Module:
        if layer.is_linear:  # the release's DYCls: L and the branch width both `classifier_latent`
            return DCDLinear(layer.module, latent=self.classifier_latent, hidden=self.classifier_latent)
        latent = self.latent_size(layer.in_channels)
        hidden = branch_width(layer.in_channels, latent, self.pool, self.reduction, self.min_hidden)
        return DCDConv2d.from_conv(layer.module, latent=latent, hidden=hidden, pool=self.pool)
