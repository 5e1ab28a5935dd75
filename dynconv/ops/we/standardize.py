"""Per-output-channel weight standardisation, the input normalisation of Weight Excitation.

WE (Quader et al., ECCV 2020), end of Sec. 3.3: "before feeding W as input for LWE or MWE, we can normalize W
... by standardizing W across each j-th output channel similar to [28]" (Weight Standardization), and Sec. 4.1:
normalised weights are used "except when WE methods are used on depthwise convolutions".

    W_n[j] = (W[j] - mean(W[j])) / sqrt(var(W[j]) + eps)        over the In x (t x) h x w weights of channel j

Works for 1D, 2D and 3D convolution weights (Out x In x [t x] [h x] w). `op=weight_std`
(dynconv/ops/reparam/standardization.py) is this function alone.

The eps convention is the WS paper's equation (Qiao et al., Sec. 3): sigma_j = sqrt(mean(W_j^2) - mu_j^2 + eps),
the biased variance with eps inside the root. The layers in the WS repository's README add 1e-5 to the standard
deviation instead, the population one in TensorFlow and `torch.std_mean`'s unbiased (N - 1) one in PyTorch. For
N = In h w weights per channel, N - 1 is a per-channel factor sqrt(N / (N - 1)) (1.0009 at N = 576) that the
following BN / GN absorbs, and where eps sits only matters for a channel whose weights are (nearly) all equal
(std ~ 0.05 at He initialisation: sqrt(var + 1e-5) and std + 1e-5 differ by 0.2%).
"""

from __future__ import annotations

import torch

# Added to the variance: keeps a channel whose weights are all equal finite (WS's choice of order of magnitude).
STANDARDIZE_EPS = 1e-5


def channel_statistics(weight: torch.Tensor, eps: float = STANDARDIZE_EPS) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, 1 / std) of each output channel, shaped Out x 1 x ... (broadcast against the weight).

    One fused pass over the weight (`var_mean`); the biased variance, as a normalisation (not an estimate)."""
    dims = tuple(range(1, weight.dim()))
    var, mean = torch.var_mean(weight, dim=dims, keepdim=True, correction=0)
    return mean, torch.rsqrt(var + eps)


def standardize(weight: torch.Tensor, eps: float = STANDARDIZE_EPS) -> torch.Tensor:
    """W_n: every output channel of the weight at zero mean and unit variance."""
    mean, rstd = channel_statistics(weight, eps)
    return (weight - mean) * rstd
