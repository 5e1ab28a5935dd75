"""Operators: each module registers itself in OPERATORS on import."""

from dynconv.ops import condconv, dyconv, dynet, kw, odconv, sk, static, weight_excitation, weightnet  # noqa: F401  (registration)
from dynconv.ops.base import OPERATORS, Decision, LayerInfo, Operator, OperatorConfigError
from dynconv.ops.per_sample_conv import per_sample_conv2d

__all__ = ["OPERATORS", "Decision", "LayerInfo", "Operator", "OperatorConfigError", "per_sample_conv2d"]
