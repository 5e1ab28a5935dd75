"""The operators, one module or package per `op=` name (as in configs/op/); each registers itself in
OPERATORS when imported, and every module here is imported below, so a new operator is one new file.

The contract they fulfil is `dynconv.conversion.Operator`; the per-sample convolution they end in is
`dynconv.functional`; the parts several of them share (kernel banks, shared block inputs, temperatures) are in
`dynconv.layers`.
"""

from dynconv.conversion import OPERATORS, Decision, LayerInfo, Operator, OperatorConfigError
from dynconv.registry import import_submodules

import_submodules(__name__)

__all__ = ["OPERATORS", "Decision", "LayerInfo", "Operator", "OperatorConfigError"]
