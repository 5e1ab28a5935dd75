"""KernelWarehouse (Li & Yao, ICML 2024): kernel partition, cross-layer warehouses, contrasting-driven attention."""

from dynconv.ops.kw import operator  # noqa: F401  (registers op=kw)
from dynconv.ops.kw.layers import KWConv2d, KWLinear, SplitQKV, Warehouse

__all__ = ["KWConv2d", "KWLinear", "SplitQKV", "Warehouse"]
