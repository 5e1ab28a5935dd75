"""`op.weight_init`: where a dynamic operator's own parameters start (docs/initialisation.md).

- `reference` (the default): as the operator's public release initialises them, so that a paper's row trains
  from where the paper's network started. What each release does, with its file, is in docs/initialisation.md.
- `pytorch`: dynconv's behaviour before the knob existed: every kernel like a fresh `nn.Conv2d`
  (kaiming-uniform, a = sqrt(5), biases uniform in +-1/sqrt(fan_in)) and the attention layers like fresh
  `nn.Linear`s (KernelWarehouse: each layer's cells kaiming-normal for the fan-out of its static kernel).

Only the operator's own parameters are concerned (kernels, cells, attention layers); the static layers keep the
backbone library's initialisation, and the backbone's own choices (the last BN of each residual block, the
classifier) are backbone knobs (`backbone.zero_init_last`, `backbone.classifier_init`).

The helpers below draw the same distributions as `torch.nn.init` would on one kernel of the bank, with the fans
written out: torch computes a fan from a tensor's shape, and a bank (n, O, C/g, kh, kw) is not one kernel.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

WEIGHT_INITS = ("reference", "pytorch")


def read_weight_init(knobs) -> str:
    """`op.weight_init` (reference | pytorch; reference when the section does not set it)."""
    return knobs.choice("weight_init", WEIGHT_INITS, default="reference")


def kernel_fans(weight: torch.Tensor) -> tuple[int, int]:
    """(fan_in, fan_out) of ONE kernel of a bank (n, O, C/g, kh, kw), as torch counts them for a conv weight
    (O, C/g, kh, kw): C/g * kh * kw and O * kh * kw (torch does not divide the fan-out by the groups)."""
    taps = math.prod(weight.shape[3:])
    return weight.shape[2] * taps, weight.shape[1] * taps


@torch.no_grad()
def normal_(tensor: torch.Tensor, fan: int) -> torch.Tensor:
    """N(0, 2 / fan): kaiming-normal with the ReLU gain for the given fan."""
    return tensor.normal_(0.0, math.sqrt(2.0 / fan))


@torch.no_grad()
def uniform_(tensor: torch.Tensor, fan: int) -> torch.Tensor:
    """U(-sqrt(6 / fan), sqrt(6 / fan)): `nn.init.kaiming_uniform_`'s defaults (a = 0, gain sqrt(2))."""
    bound = math.sqrt(6.0 / fan)
    return tensor.uniform_(-bound, bound)


@torch.no_grad()
def kaiming_linears_(module: nn.Module) -> None:
    """Every nn.Linear inside `module`: kaiming-normal (mode fan_out = out_features, ReLU gain), zero bias. This is
    what the ODConv, DY-Conv and KernelWarehouse releases do to their attention layers (1x1 convolutions there:
    the same fan-out)."""
    for layer in module.modules():
        if isinstance(layer, nn.Linear):
            nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)
