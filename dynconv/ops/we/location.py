"""Location-based weight excitation, LWE (Quader et al., "Weight Excitation", ECCV 2020, Sec. 3.2, Fig. 3a).

For a weight W of shape Out x In x h x w, an SE-style subnetwork shared by all Out output channels gives each of
the Out x In kernels an importance multiplier (Eq. 1):

    m_j = sigmoid(FC_2(ReLU(FC_1(Avg(W_j)))))        W_j: the In x h x w weights of output channel j
    W_LWE[j] = m_j (replicated over h x w) * W_j

Avg averages every h x w kernel to one value (w for 1D, t x h x w for 3D convolutions), FC_1: In -> hidden,
FC_2: hidden -> In, so m is an Out x In map in (0, 1). Larger m_j,i means a larger gradient through kernel
(j, i). For a grouped convolution In is the input channels per group (the weight's second dimension).

W is standardised per output channel first (end of Sec. 3.3; the operator turns that off where In = 1):
W_n[j] = (W[j] - mu_j) r_j with r_j = 1 / sqrt(var_j + eps), and W_LWE = m * W_n.

Why a hand-written backward (`_LocationExcitation`): the transform runs on every weight at every step, and
autograd's version of standardise-pool-scale walks the whole weight about twenty times per step (var_mean and its
backward, the pooling's backward, broadcast products, three gradient paths summed). Everything the full-size
work needs is carried by Out x In and Out x 1 statistics:

    forward:   P = Avg(W) (a view for 1 x 1 kernels), sum of squares, W_LWE = W (m r) - mu (m r)   (fused)
    backward:  R2 = sum_hw g, dL/dm = r sum_hw g (W - mu), then
               dL/dW = g (m r) + A + C W      A: Out x In, C: Out x 1 (chain rule in `backward`)

The MLP (FC_1, ReLU, FC_2, sigmoid) on the Out x In map is differentiated by hand too (four matmuls), so the
Function holds no graph of its own and torch.compile can trace it.
mu_j is the mean of the kernel means P and var_j = E[W^2] - mu_j^2: one fast reduction instead of a Welford pass
(a convolution's weights have |mu| << std, far from where that subtraction loses precision). On ResNet50's 53
weights (one CPU thread) this halves the transform's cost against autograd: 0.27 s instead of 0.55 s per
forward + backward, 0.09 s instead of 0.23 s per forward. tests/test_weight_excitation.py checks it with
gradcheck and against Eq. 1 written out.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from dynconv.ops.we.standardize import STANDARDIZE_EPS


def _no_autocast(device: str):
    """Autocast off: the MLP is small and its sigmoid is better in float32 (meta tensors have no autocast)."""
    return torch.autocast(device, enabled=False) if torch.amp.is_autocast_available(device) else nullcontext()


def _mlp(pooled: torch.Tensor, fc1_w, fc1_b, fc2_w, fc2_b) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden, m) with hidden = ReLU(FC_1(pooled)) and m = sigmoid(FC_2(hidden)), row by row (Out rows)."""
    with _no_autocast(pooled.device.type):
        hidden = torch.relu(F.linear(pooled, fc1_w, fc1_b))
        return hidden, torch.sigmoid(F.linear(hidden, fc2_w, fc2_b))


def _mlp_backward(grad_logits, pooled, hidden, fc1_w, fc2_w):
    """Gradients of (pooled, FC_1 weight, FC_1 bias, FC_2 weight, FC_2 bias) from dL/d(FC_2 output)."""
    grad_hidden = (grad_logits @ fc2_w).masked_fill_(hidden <= 0, 0)
    return (grad_hidden @ fc1_w, grad_hidden.t() @ pooled, grad_hidden.sum(dim=0),
            grad_logits.t() @ hidden, grad_logits.sum(dim=0))


def _statistics(w3: torch.Tensor, standardize: bool):
    """(P, mu, r) of a weight viewed as Out x In x K: kernel means, channel means and 1 / std (Out x 1)."""
    pooled = w3.mean(dim=-1) if w3.shape[-1] > 1 else w3[..., 0]
    if not standardize:
        return pooled, None, None
    count = w3.shape[1] * w3.shape[2]
    mean = pooled.mean(dim=1, keepdim=True)
    square_mean = torch.linalg.vector_norm(w3.reshape(w3.shape[0], -1), dim=1, keepdim=True).square() / count
    rstd = torch.rsqrt((square_mean - mean.square()).clamp_min(0) + STANDARDIZE_EPS)
    return pooled, mean, rstd


class _LocationExcitation(torch.autograd.Function):
    """W -> m * W_n (Eq. 1 on the standardised weight) with the fused backward described in the module doc.

    1 x 1 kernels (most of a bottleneck network's weights) take a shorter path: there P_n is W_n itself, so
    W_LWE = m P_n, and the Out x In temporaries of the backward are reused in place."""

    @staticmethod
    def forward(ctx, weight, fc1_w, fc1_b, fc2_w, fc2_b, standardize: bool):
        out_channels, in_channels = weight.shape[:2]
        w3 = weight.reshape(out_channels, in_channels, -1)
        pooled, mean, rstd = _statistics(w3, standardize)
        # P_n = (P - mu) r in one pass.
        normalised = pooled if mean is None else torch.addcmul(-mean * rstd, pooled, rstd)
        hidden, m = _mlp(normalised, fc1_w, fc1_b, fc2_w, fc2_b)
        saved = (weight, normalised, hidden, m, fc1_w, fc2_w)
        if mean is not None and w3.shape[2] == 1:
            ctx.save_for_backward(*saved, mean, rstd)
            return (normalised * m).view_as(weight)
        scale = m if rstd is None else m * rstd
        if mean is None:
            excited = w3 * scale[..., None]
        else:  # (W - mu) * r * m in one pass: W * scale - mu * scale
            excited = torch.addcmul((-mean * scale)[..., None], w3, scale[..., None])
        ctx.save_for_backward(*saved, *(() if mean is None else (mean, rstd)), scale)
        return excited.view_as(weight)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        weight, normalised, hidden, m, fc1_w, fc2_w, *stats = ctx.saved_tensors
        out_channels, in_channels = weight.shape[:2]
        w3 = weight.reshape(out_channels, in_channels, -1)
        g3 = grad_out.reshape(w3.shape)
        kernel = w3.shape[2]
        mlp = (normalised, hidden, fc1_w, fc2_w)
        if len(stats) == 2:  # standardised 1 x 1 kernels
            return _pointwise_backward(g3[..., 0], w3[..., 0], m, mlp, *stats, weight.shape)
        *stats, scale = stats
        # R2 = sum_hw g, and dL/dm = r sum_hw g (W - mu).
        r2 = g3.sum(dim=-1) if kernel > 1 else g3[..., 0]
        if not stats:
            grad_m = (g3 * w3).sum(dim=-1) if kernel > 1 else r2 * w3[..., 0]
        else:
            mean, rstd = stats
            grad_m = torch.addcmul((g3 * w3).sum(dim=-1), r2, mean, value=-1).mul_(rstd)
        grad_m_m = grad_m * m  # sigmoid' = m (1 - m)
        grad_normalised, *grad_params = _mlp_backward(torch.addcmul(grad_m_m, grad_m_m, m, value=-1), *mlp)
        if stats:
            count = in_channels * kernel
            # Through W_LWE = (W - mu) m r, P_n = (P - mu) r, mu = mean P, r = (E[W^2] - mu^2 + eps)^(-1/2):
            #   dL/dmu = -r sum_i (m R2 + dL/dP_n),   dL/dr = (1/r) sum_i (m dL/dm + P_n dL/dP_n),
            #   dL/dvar = -r^3 / 2 dL/dr,   dvar/dW = 2 (W - mu) / N,   dmu/dW = 1 / N,   dP/dW = 1 / hw.
            grad_mean = -rstd * torch.addcmul(grad_normalised, m, r2).sum(dim=1, keepdim=True)
            grad_rstd = grad_m_m.addcmul_(normalised, grad_normalised).sum(dim=1, keepdim=True) / rstd
            coefficient = -rstd.pow(3) * grad_rstd / count  # 2 dL/dvar / N
            offset = torch.addcmul(grad_mean / count - coefficient * mean, grad_normalised, rstd / kernel)
            grad_weight = torch.addcmul(offset[..., None], w3, coefficient[..., None])
        else:
            grad_weight = (grad_normalised / kernel)[..., None].expand_as(w3).clone()
        grad_weight.addcmul_(g3, scale[..., None])
        return (grad_weight.view_as(weight), *grad_params, None)


def _pointwise_backward(g, w, m, mlp, mean, rstd, shape):
    """The backward above for 1 x 1 kernels (Out x In = the whole weight), with W_LWE = m P_n:

    dL/dm = g P_n; with U = m g + dL/dP_n: dL/dmu = -r sum_i U, dL/dW = r U + (dL/dmu / N - C mu) + C W."""
    normalised = mlp[0]
    grad_m_m = g * normalised * m  # m dL/dm; sigmoid' = m (1 - m)
    grad_normalised, *grad_params = _mlp_backward(torch.addcmul(grad_m_m, grad_m_m, m, value=-1), *mlp)
    count = w.shape[1]
    grad_rstd = grad_m_m.addcmul_(normalised, grad_normalised).sum(dim=1, keepdim=True) / rstd
    coefficient = -rstd.pow(3) * grad_rstd / count
    update = grad_normalised.addcmul_(m, g)  # U, in place: dL/dP_n is not needed any more
    grad_mean = -rstd * update.sum(dim=1, keepdim=True)
    grad_weight = torch.addcmul(grad_mean / count - coefficient * mean, w, coefficient).addcmul_(update, rstd)
    return (grad_weight.view(shape), *grad_params, None)


class LocationExcitation(nn.Module):
    """The LWE parametrization of a convolution weight (`torch.nn.utils.parametrize`).

    `in_channels` is the weight's second dimension (In per group), `hidden` the width of FC_1 (the operator
    uses max(In // r, min_hidden)). FC_1 and FC_2 have biases, as SE's fully connected layers do.
    """

    def __init__(self, in_channels: int, hidden: int, standardize: bool):
        super().__init__()
        self.fc1 = nn.Linear(in_channels, hidden)
        self.fc2 = nn.Linear(hidden, in_channels)
        self.standardize = bool(standardize)

    def multiplier(self, weight: torch.Tensor) -> torch.Tensor:
        """The location-importance map m of Eq. 1: Out x In, values in (0, 1)."""
        pooled, mean, rstd = _statistics(weight.reshape(*weight.shape[:2], -1), self.standardize)
        normalised = pooled if mean is None else (pooled - mean) * rstd
        return _mlp(normalised, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias)[1]

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return _LocationExcitation.apply(weight, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias,
                                         self.standardize)

    def extra_repr(self) -> str:
        return f"standardize={self.standardize}"
