"""Weight standardisation, WS (Qiao et al., "Micro-Batch Training with Batch-Channel Normalization and Weight
Standardization", arXiv:1903.10520, Sec. 3), as a parametrization of a convolution weight (`op=weight_std`).

For a weight W of shape Out x In x h x w, each output channel i is standardised over its I = In h w weights:

    W^_i = (W_i - mu_i) / sigma_i,     mu_i = mean(W_i),     sigma_i = sqrt(mean(W_i^2) - mu_i^2 + eps)

WS has no parameters of its own: the scale and shift the standardisation removes are the following
normalisation layer's (BN, GN), which is why the WS repository says to use it only on convolutions followed by one.
The computation is Weight Excitation's input normalisation (`dynconv/ops/we/standardize.py`, which says why this
eps convention), so WE's "standardised W" and this operator are the same function.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from dynconv.ops.we.standardize import standardize


class WeightStandardization(nn.Module):
    """The WS parametrization (`torch.nn.utils.parametrize`): no parameters, `eps` added to the variance."""

    def __init__(self, eps: float):
        super().__init__()
        self.eps = float(eps)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return standardize(weight, self.eps)

    def extra_repr(self) -> str:
        return f"eps={self.eps}"
