"""Put a weight parametrization (Weight Excitation's, or one of `dynconv/ops/reparam/`) on a convolution so that
copies of the model fold independently.

`torch.nn.utils.parametrize` gives a parametrized module a class of its own (`ParametrizedConv2d`) that holds
the `weight` property. Its default deepcopy gives the copy the same class object, and
`remove_parametrizations` deletes the property from the class: folding a deepcopy (what
`dynconv.profiling.fold_for_inference` does, for scripts/profile.py, eval.py and scripts/bench.py) would leave
the original model without a `weight` ("'ParametrizedConv2d' object has no attribute 'weight'" at its next
forward). So every copy of an excited layer gets its own copy of that class.
"""

from __future__ import annotations

import copy

import torch.nn as nn
from torch.nn.utils import parametrize


def _deepcopy_with_own_class(self, memo):
    """A plain deepcopy of the module's state, into an instance of a fresh copy of its parametrized class."""
    if id(self) in memo:
        return memo[id(self)]
    cls = type(self)
    own_class = type(cls.__name__, cls.__bases__, dict(cls.__dict__))
    replica = own_class.__new__(own_class)
    memo[id(self)] = replica
    replica.__dict__ = copy.deepcopy(self.__dict__, memo)
    return replica


def fold_independently(conv: nn.Module) -> nn.Module:
    """Give every future deepcopy of a parametrized layer its own parametrized class (see the module doc).
    For layers parametrized by torch's own helpers (`torch.nn.utils.parametrizations.weight_norm`, ...)."""
    type(conv).__deepcopy__ = _deepcopy_with_own_class  # the class parametrize made for this layer alone
    return conv


def excite(conv: nn.Module, parametrization: nn.Module) -> nn.Module:
    """Put `parametrization` on the layer's weight, in place; the layer keeps its stride, padding and bias.
    A second call appends to the chain: the weight is then second(first(original)).

    unsafe=True skips parametrize's trial evaluation (one weight generation per layer at build time): LWE, MWE
    and weight standardisation return a tensor of the weight's shape and dtype by construction."""
    parametrize.register_parametrization(conv, "weight", parametrization, unsafe=True)
    return fold_independently(conv)
