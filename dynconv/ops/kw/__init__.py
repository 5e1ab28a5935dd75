"""KernelWarehouse (Li & Yao, ICML 2024), `op=kw`: kernel partition (`plan.py`), per-backbone layouts
(`layouts.py`), warehouses and layers (`layers.py`), the contrasting-driven attention (`attention.py`), the two
exact algorithms (`apply.py`) and the operator (`operator.py`)."""

from dynconv.ops.kw import operator  # noqa: F401  (registers op=kw)
from dynconv.ops.kw.layers import KWConv2d, KWLinear, SplitQKV, Warehouse

__all__ = ["KWConv2d", "KWLinear", "SplitQKV", "Warehouse"]
