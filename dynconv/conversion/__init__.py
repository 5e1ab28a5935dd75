"""The one conversion path: a backbone's layers, described by their place (`layer.py`), handed to the
configured operator (`operator.py`: the contract and the registry) by the conversion pass (`convert.py`)."""

from dynconv.conversion.convert import convert, describe_layers, summarize
from dynconv.conversion.layer import ROLES, Decision, LayerInfo
from dynconv.conversion.operator import OPERATORS, Operator, OperatorConfigError

__all__ = ["OPERATORS", "ROLES", "Decision", "LayerInfo", "Operator", "OperatorConfigError", "convert",
           "describe_layers", "summarize"]
