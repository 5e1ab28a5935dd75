"""How each dynamic layer starts from the kernel W (and bias b) of the static convolution it replaced
(`init_from_static`): one rule per layer class, each returning whether the layer now computes exactly W * x + b.

Exact where the operator allows it:
- DY-Conv: every kernel W, every bias b. The softmax attention sums to 1, so sum_k pi_k W = W for every input
  (DY-Conv Sec. 3: 0 <= pi_k <= 1, sum_k pi_k = 1); with CAF only while tau = 1 (alpha = beta, one-hot).
- ODConv: the kernel-wise attention is a softmax too, but the channel, filter and spatial attentions are sigmoids
  (about 1/2 each, not 1). Their heads are set to zero, so each is exactly sigmoid(0 / T) = 1/2 whatever the input
  and the temperature, and every kernel is 2^h W for the h of them the layer has (3 for a 3x3 convolution, 2 for a
  1x1 or a depth-wise one). The kernel-wise head keeps its initialisation: with identical kernels its softmax does
  not change the output, and its gradient is zero only until the kernels differ (after the first step).
- CondConv: the routing r_i = sigmoid(FC(GAP(x))) is not normalised (Eq. 2), so no choice of experts gives W for
  every r. The routing FC is set to zero (r_i = 1/2 exactly) and expert i is 2W/n + e_i with sum_i e_i = 0: the
  mixture is sum_i (1/2)(2W/n + e_i) = W. e_i = `spread` x (the expert as the operator initialised it - the mean
  of those), so that the experts differ: with identical experts and equal routing every expert would get the
  same gradient and they would never separate.
- WeightNet: with FC_2 set to zero, alpha = sigmoid(0) = 1/2 (Sec. 3.3), and the grouped FC's lambda inputs of each
  group hold 2 W / lambda + e_l (sum_l e_l = 0, as for CondConv): W' = W.
- KernelWarehouse at tau = 1: alpha is beta (Eq. 4), so each mixture is its own cell: the cells are the tiles of the
  static kernel (the inverse of Eq. 2's partition, `tiles`). Exact for b >= 1 with the one-to-one (or many-to-one:
  each of a mixture's b cells holds tile / b) initialisation. Not exact for b < 1: the mixtures without a cell of
  their own read the zero cell, so at tau = 1 the layer is the static kernel with those tiles zeroed (a 1/2x layer
  is the block-diagonal, 2-group part of it). Cells no mixture starts on (the b - 1 others of each mixture at b > 1)
  keep their initialisation. KW* (`op.omni`): its sigmoid heads set to zero and the tiles scaled by 2^h, as ODConv.
- Weight Excitation: exact only where the weight is not standardised (depth-wise layers, `op.standardize=false`).
  MWE (Eq. 2) is inverted in closed form: with S = max|W| and M = S / atanh(1 / (1 + eps)), the original weight
  M tanh(W / M) has (1 + eps) max|.| = M, so f_A gives W back. LWE: FC_2 set to zero makes m = 1/2 and the original
  weight is 2 W. A standardised weight has zero mean and unit variance per output channel (Sec. 3.3), so no
  original weight reproduces W: there the original is W itself and the excitation keeps its initialisation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from dynconv.ops.condconv import CondConv2d
from dynconv.ops.dyconv import DyConv2d
from dynconv.ops.kw.layers import KWConv2d, KWLinear, SplitQKV
from dynconv.ops.odconv import ODConv2d
from dynconv.ops.we.location import LocationExcitation
from dynconv.ops.we.magnitude import MagnitudeExcitation
from dynconv.ops.weightnet import WeightNetConv2d


@dataclass(frozen=True)
class LayerStart:
    exact: bool
    how: str


class StaticShapeError(ValueError):
    """The static kernel does not have the shape of the layer it should start."""


def _zero(module: nn.Module | None) -> None:
    if module is not None:
        nn.init.zeros_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def _check(layer_name: str, weight: torch.Tensor, shape) -> None:
    if tuple(weight.shape) != tuple(shape):
        raise StaticShapeError(f"{layer_name}: the static kernel is {tuple(weight.shape)}, the layer's "
                               f"{tuple(shape)}")


def _zero_sum(initialised: torch.Tensor, dim: int) -> torch.Tensor:
    """The operator's own initial values minus their mean over `dim`: a perturbation that sums to zero there."""
    return initialised - initialised.mean(dim=dim, keepdim=True)


def _bank_shape(layer) -> tuple[int, ...]:
    return tuple(layer.weight.shape[1:])


def _tau_is_one(tau: torch.Tensor | None) -> bool:
    return tau is None or float(tau) == 1.0


@torch.no_grad()
def dyconv_start(layer: DyConv2d, name: str, weight, bias, spread: float) -> LayerStart:
    _check(name, weight, _bank_shape(layer))
    layer.weight.copy_(weight.expand_as(layer.weight))
    if layer.bias is not None and bias is not None:
        layer.bias.copy_(bias.expand_as(layer.bias))
    caf = layer.attention.caf
    if caf is not None and not _tau_is_one(caf.tau):
        return LayerStart(False, f"every kernel W; CAF at tau = {float(caf.tau):g}: its attention does not sum to 1")
    return LayerStart(True, "every kernel W: the attention sums to 1")


@torch.no_grad()
def odconv_start(layer: ODConv2d, name: str, weight, bias, spread: float) -> LayerStart:
    _check(name, weight, _bank_shape(layer))
    attention = layer.attention
    sigmoids = [head for head in (attention.channel, attention.filter, attention.spatial) if head is not None]
    for head in sigmoids:
        _zero(head)
    layer.weight.copy_((weight * 2.0 ** len(sigmoids)).expand_as(layer.weight))
    how = f"every kernel 2^{len(sigmoids)} W, channel/filter/spatial heads zero (each attention 1/2)"
    if attention.kernel_caf is not None and not _tau_is_one(attention.kernel_caf.tau):
        return LayerStart(False, f"{how}; CAF at tau = {float(attention.kernel_caf.tau):g} does not sum to 1")
    return LayerStart(True, how)


@torch.no_grad()
def condconv_start(layer: CondConv2d, name: str, weight, bias, spread: float) -> LayerStart:
    _check(name, weight, _bank_shape(layer))
    n = layer.experts
    layer.weight.copy_(2.0 / n * weight + spread * _zero_sum(layer.weight, 0))
    if layer.bias is not None and bias is not None:
        layer.bias.copy_((2.0 / n * bias).expand_as(layer.bias))
    routing = layer.routing if layer.routing is not None else layer.__dict__["shared_input"].summary.fc
    _zero(routing)  # block routing: the block's shared FC, zeroed by each of its layers alike
    return LayerStart(True, f"experts 2W/{n} + zero-sum spread, routing FC zero (every r_i = 1/2)")


@torch.no_grad()
def weightnet_start(layer: WeightNetConv2d, name: str, weight, bias, spread: float) -> LayerStart:
    _check(name, weight, layer.kernel_shape)
    groups, lam = layer.wn_groups, layer.lam
    target = (2.0 / lam * weight.reshape(groups, 1, -1)).expand_as(layer.generator)
    layer.generator.copy_(target + spread * _zero_sum(layer.generator, 1))
    _zero(layer.activation)
    if layer.bias is not None and bias is not None:
        layer.bias.copy_(bias)
    return LayerStart(True, f"grouped FC 2W/{lam} per input + zero-sum spread, FC_2 zero (alpha = 1/2)")


def tiles(kernel: torch.Tensor, partition) -> torch.Tensor:
    """The m cells (m, c_out, c_in, ckh, ckw) that tile `kernel` (O, C/g, kh, kw) or (O, C): the inverse of
    `dynconv.ops.kw.apply.assemble` for one-hot alpha (Eq. 2), mixtures ordered (spatial, output group, input
    group)."""
    p = partition
    grid = kernel.reshape(p.out_groups, p.cell_out, p.in_groups, p.cell_in, p.spatial_groups, *p.cell_kernel)
    return grid.permute(4, 0, 2, 1, 3, 5, 6).reshape(p.mixtures, p.cell_out, p.cell_in, *p.cell_kernel)


def _mixture_targets(attention) -> list[list[int]]:
    """Each mixture's cells with beta = 1 (the zero cell left out)."""
    beta = attention.beta[:, :-1]
    targets = []
    for mixture, row in enumerate(beta):
        cells = row.nonzero().flatten()
        if attention.own:  # sharing=none: beta is over the mixture's own cells
            cells = attention.own_cells[mixture][cells]
        targets.append(cells.tolist())
    return targets


@torch.no_grad()
def kw_start(layer: KWConv2d | KWLinear, name: str, weight, bias, spread: float) -> LayerStart:
    _check(name, weight, layer.kernel_shape)
    attention = layer.attention
    heads = [head for head in (attention.omni or {}).values()]
    for head in heads:
        _zero(head)
    cells = layer.warehouse.cells
    pieces = tiles(weight * 2.0 ** len(heads), layer.partition)
    targets = _mixture_targets(attention)
    writes: dict[int, list[torch.Tensor]] = {}
    for tile, cell_indices in zip(pieces, targets):
        for cell in cell_indices:
            writes.setdefault(cell, []).append(tile / len(cell_indices))
    for cell, values in writes.items():
        cells[cell].copy_(torch.stack(values).mean(dim=0))
    if layer.bias is not None and bias is not None:
        layer.bias.copy_(bias)
    reasons = []
    if not _tau_is_one(attention.tau):
        reasons.append(f"tau = {float(attention.tau):g} (exact at tau = 1)")
    without = sum(not cell_indices for cell_indices in targets)
    if without:
        reasons.append(f"{without} of {len(targets)} mixtures start on the zero cell (b < 1): their tiles are 0")
    if any(len(values) > 1 for values in writes.values()):
        reasons.append("mixtures share a cell (op.init): it holds their tiles' mean")
    how = "cells = the static kernel's tiles" + (f" x 2^{len(heads)}, KW* heads zero" if heads else "")
    return LayerStart(not reasons, "; ".join([how, *reasons]))


@torch.no_grad()
def split_qkv_start(layer: SplitQKV, name: str, weight, bias, spread: float) -> LayerStart:
    dim = layer.query_key.in_features
    _check(name, weight, (3 * dim, dim))
    layer.query_key.weight.copy_(weight[: 2 * dim])
    if bias is not None and layer.query_key.bias is not None:
        layer.query_key.bias.copy_(bias[: 2 * dim])
    value = kw_start(layer.value, f"{name} (value)", weight[2 * dim:], None if bias is None else bias[2 * dim:],
                     spread)
    return LayerStart(value.exact, f"query/key copied; value: {value.how}")


def mwe_original(weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The weight MWE (f_A, Eq. 2) maps to `weight`: M tanh(W / M), M = max|W| / atanh(1 / (1 + eps))."""
    largest = weight.abs().amax().clamp_min(torch.finfo(weight.dtype).tiny)
    bound = largest / math.atanh(1.0 / (1.0 + eps))
    return bound * torch.tanh(weight / bound)


@torch.no_grad()
def excitation_start(layer: nn.Module, name: str, weight, bias, spread: float) -> LayerStart:
    """A convolution with Weight Excitation's parametrizations (applied first to last on `original`)."""
    chain = list(layer.parametrizations.weight)
    original = layer.parametrizations.weight.original
    _check(name, weight, original.shape)
    if layer.bias is not None and bias is not None:
        layer.bias.copy_(bias)
    if any(getattr(step, "standardize", False) for step in chain):
        original.copy_(weight)
        return LayerStart(False, "original weight W; WE standardises it per output channel (Sec. 3.3): the "
                                 "excited weight cannot be W")
    target = weight
    for step in reversed(chain):  # undo the last transform first
        if isinstance(step, MagnitudeExcitation):
            target = mwe_original(target, step.eps)
        elif isinstance(step, LocationExcitation):
            _zero(step.fc2)
            target = 2.0 * target
        else:
            raise TypeError(f"{name}: no static-weight rule for the parametrization {type(step).__name__}")
    original.copy_(target)
    return LayerStart(True, "original weight inverts the excitation (LWE: FC_2 zero, m = 1/2; MWE: closed form)")


Rule = Callable[[nn.Module, str, torch.Tensor, "torch.Tensor | None", float], LayerStart]
# Checked in this order (isinstance): a SplitQKV holds a KWLinear.
RULES: list[tuple[type, Rule]] = [
    (SplitQKV, split_qkv_start),
    (KWConv2d, kw_start),
    (KWLinear, kw_start),
    (DyConv2d, dyconv_start),
    (ODConv2d, odconv_start),
    (CondConv2d, condconv_start),
    (WeightNetConv2d, weightnet_start),
]


def _is_excited(module: nn.Module) -> bool:
    return parametrize.is_parametrized(module, "weight") and all(
        isinstance(step, (LocationExcitation, MagnitudeExcitation)) for step in module.parametrizations.weight)


def rule_for(module: nn.Module) -> Rule | None:
    if _is_excited(module):
        return excitation_start
    return next((rule for cls, rule in RULES if isinstance(module, cls)), None)


def static_kernel_shape(module: nn.Module) -> tuple[int, ...]:
    """The shape of the static kernel a rule expects for `module` (checked before any layer is changed)."""
    if _is_excited(module):
        return tuple(module.parametrizations.weight.original.shape)
    if isinstance(module, SplitQKV):
        dim = module.query_key.in_features
        return (3 * dim, dim)
    if isinstance(module, (KWConv2d, KWLinear, WeightNetConv2d)):
        return tuple(module.kernel_shape)
    return tuple(module.weight.shape[1:])  # a kernel bank (n, O, C/g, kh, kw)


SUPPORTED_OPS = ("static", "condconv", "dyconv", "odconv", "kw", "weightnet", "lwe", "mwe", "we")
