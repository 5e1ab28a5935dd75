"""Magnitude-based weight excitation, MWE (Quader et al., "Weight Excitation", ECCV 2020, Sec. 3.3).

An activation function on every weight w of a layer's weight W (Eq. 2):

    w_MWE = f_A(w) = M_A * 0.5 * ln((1 + w / M_A) / (1 - w / M_A)) = M_A * atanh(w / M_A),
    M_A   = (1 + eps_A) * max|W|

whose gradient is (Eq. 3)

    dL/dw = M_A^2 / (M_A^2 - w^2) * dL/dw_MWE

1 for w = 0, rising to (1 + eps_A)^2 / ((1 + eps_A)^2 - 1) for the largest weight (5.76 for eps_A = 0.1): larger
weights get a larger share of the gradient. Eq. 3 holds M_A constant, so M_A is computed from a detached copy
of W here: the backward pass is exactly Eq. 3 (without it, the largest |w| would also receive the gradient of
M_A through max). f_A is odd and 0 at 0, and for eps_A -> infinity it tends to the identity (Fig. 3b).

The input is W standardised per output channel (end of Sec. 3.3), except in depthwise convolutions (Sec. 4.1),
where the operator turns standardisation off.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from dynconv.ops.we.standardize import standardize as standardize_weight


def magnitude_bound(weight: torch.Tensor, eps: float) -> torch.Tensor:
    """M_A = (1 + eps_A) max|W|, detached (a constant in Eq. 3); floored so an all-zero W maps to 0, not NaN."""
    largest = weight.detach().abs().amax()
    return ((1.0 + eps) * largest).clamp_min(torch.finfo(weight.dtype).tiny)


def magnitude_excitation(weight: torch.Tensor, eps: float) -> torch.Tensor:
    """f_A(W) of Eq. 2, elementwise. atanh(x) is 0.5 ln((1 + x) / (1 - x)); |x| <= 1 / (1 + eps) < 1."""
    bound = magnitude_bound(weight, eps)
    return torch.atanh(weight / bound) * bound


class MagnitudeExcitation(nn.Module):
    """The MWE parametrization of a convolution weight (`torch.nn.utils.parametrize`): no parameters."""

    def __init__(self, eps: float, standardize: bool):
        super().__init__()
        self.eps, self.standardize = float(eps), bool(standardize)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return magnitude_excitation(standardize_weight(weight) if self.standardize else weight, self.eps)

    def extra_repr(self) -> str:
        return f"eps={self.eps}, standardize={self.standardize}"
