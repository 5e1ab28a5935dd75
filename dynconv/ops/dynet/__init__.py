"""DyNet (Zhang et al. 2020), `op=dynet`: the operator and its layer (`operator.py`) and the two exact ways to
fuse its kernels (`fusion.py`)."""

from dynconv.ops.dynet.fusion import dynet_conv2d, fuse_kernels
from dynconv.ops.dynet.operator import CoefficientPredictor, DyNetConv2d, DyNetOperator

__all__ = ["CoefficientPredictor", "DyNetConv2d", "DyNetOperator", "dynet_conv2d", "fuse_kernels"]
