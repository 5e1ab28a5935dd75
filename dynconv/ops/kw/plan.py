"""Kernel partition and warehouse construction-with-sharing (KernelWarehouse, Li & Yao, ICML 2024, Sec. 3.2-3.3,
Algorithm 1 Part A).

Every layer that shares a warehouse is cut into m disjoint kernel cells of one common shape (Eq. 2): the cell's
output / input channels are the greatest common divisors of those of the warehouse's layers (times a cell ratio:
1/2 for the budgets b < 1, Appendix A.3), and with spatial partition a k x k kernel is also cut into k*k cells of
1 x 1. The warehouse holds n = b * m_t cells, m_t = the mixtures of all its layers (Sec. 3.3, "convolutional
parameter budget"). Each layer's cells are linear mixtures of the n warehouse cells (Eq. 3).

This module is pure bookkeeping: shapes, counts and the binary initial attentions beta (Sec. 3.4, Appendix
A.2). It knows nothing of modules or backbones, so bad combinations fail here, before anything is built, with
the layer names and dimensions in the message.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from fractions import Fraction

from dynconv.conversion.operator import OperatorConfigError

INIT_STRATEGIES = ("one_to_one", "all_to_one", "many_to_one", "none")


@dataclass(frozen=True)
class KernelShape:
    """What a layer contributes to a warehouse: its static kernel (out, in/groups, kh, kw)."""

    name: str
    out_channels: int
    in_per_group: int
    kernel_size: tuple[int, int]

    def describe(self) -> str:
        kh, kw = self.kernel_size
        return f"'{self.name}' ({kh}x{kw}x{self.in_per_group}x{self.out_channels})"


@dataclass(frozen=True)
class Assignment:
    """Which warehouse a layer joins and the budget/cell settings of that warehouse (from the layout)."""

    warehouse: str
    budget: Fraction
    cell_ratio: Fraction = Fraction(1)  # cell channels = ratio x the common divisor (1/2 for b < 1)
    in_cell_ratio: Fraction | None = None  # a different ratio for the input channels (MobileNetV2's classifier)
    reduction: float = 0.0625  # attention hidden width = max(int(C_in * reduction), 16)


@dataclass
class LayerCells:
    """One layer's partition: groups along spatial / output / input dims; its mixtures and own cells."""

    shape: KernelShape
    cell_out: int
    cell_in: int
    cell_kernel: tuple[int, int]
    spatial_groups: int
    out_groups: int
    in_groups: int
    start: int = 0  # index of the first warehouse cell assigned to this layer (its "local" cells)
    local_cells: int = 0
    own_targets: list = field(default_factory=list)  # per mixture: its one-to-one cell, or None (the zero cell)

    @property
    def mixtures(self) -> int:
        """m: the layer's kernel cells, each a linear mixture of the warehouse (Algorithm 1, line 8)."""
        return self.spatial_groups * self.out_groups * self.in_groups


@dataclass
class WarehouseSpec:
    key: str
    budget: Fraction
    reduction: float
    cell_shape: tuple[int, int, int, int]  # (cell_out, cell_in, kh, kw)
    layers: list[LayerCells] = field(default_factory=list)

    @property
    def total_mixtures(self) -> int:
        """m_t (Sec. 3.3)."""
        return sum(layer.mixtures for layer in self.layers)

    @property
    def cells(self) -> int:
        """n: the layers' own cells summed (b * m_t, up to rounding)."""
        return sum(layer.local_cells for layer in self.layers)


def _ratio_of(gcd: int, ratio: Fraction, what: str, shapes: list[KernelShape], key: str, budget: Fraction) -> int:
    if gcd == 1:
        return 1  # a depth-wise layer's single input channel per group cannot be halved (the reference clamps too)
    cell = gcd * ratio
    if cell.denominator != 1 or cell < 1:
        raise OperatorConfigError(
            f"KernelWarehouse warehouse '{key}': the common {what} divisor {gcd} of "
            f"{', '.join(s.describe() for s in shapes)} times the cell ratio {ratio} is not a whole number of "
            f"channels: the budget b={budget} (op.b) leaves these layers without a whole cell (use op.b >= 1 "
            f"here, or keep these layers static with op.keep_static)"
        )
    return int(cell)


def partition(key: str, shapes: list[KernelShape], assignment: Assignment, spatial_partition: bool) -> WarehouseSpec:
    """Cells and mixtures of the layers that share warehouse `key` (Algorithm 1, lines 2-9)."""
    out_gcd = math.gcd(*[s.out_channels for s in shapes])
    in_gcd = math.gcd(*[s.in_per_group for s in shapes])
    cell_out = _ratio_of(out_gcd, assignment.cell_ratio, "output-channel", shapes, key, assignment.budget)
    cell_in = _ratio_of(in_gcd, assignment.in_cell_ratio or assignment.cell_ratio, "input-channel", shapes, key,
                       assignment.budget)
    if spatial_partition:
        cell_kernel = (1, 1)
    else:
        kernels = {(s.kernel_size, s.in_per_group, s.out_channels) for s in shapes}
        if len(kernels) != 1:
            raise OperatorConfigError(
                f"KernelWarehouse warehouse '{key}' without kernel partition (op.partition=false) has whole kernels "
                f"as cells, so its layers need one kernel shape, but they have {len(kernels)}: "
                f"{', '.join(s.describe() for s in shapes)}; no common cell exists: use op.sharing_dims=same "
                f"(Table 5) or op.sharing=layer with op.partition=false"
            )
        cell_kernel = shapes[0].kernel_size
    spec = WarehouseSpec(key, assignment.budget, assignment.reduction, (cell_out, cell_in, *cell_kernel))
    for shape in shapes:
        kh, kw = shape.kernel_size
        if shape.out_channels % cell_out or shape.in_per_group % cell_in:
            raise OperatorConfigError(
                f"KernelWarehouse warehouse '{key}': cells of {cell_out}x{cell_in} do not tile layer "
                f"{shape.describe()}")
        layer = LayerCells(shape, cell_out, cell_in, cell_kernel, (kh // cell_kernel[0]) * (kw // cell_kernel[1]),
                           shape.out_channels // cell_out, shape.in_per_group // cell_in)
        spec.layers.append(layer)
    _assign_own_cells(spec)
    return spec


def _assign_own_cells(spec: WarehouseSpec) -> None:
    """Give every mixture its own cell (or none, for b < 1), in layer order, without repetition (Sec. 3.4)."""
    budget, cell = spec.budget, 0
    spread = budget < 1 and budget.numerator != 1
    if spread:  # evenly over the whole warehouse, so that layers with m < 1/b still share the n cells
        flags = _spread(spec.total_mixtures, budget)
    for layer in spec.layers:
        layer.start = cell
        if budget >= 1:
            layer.own_targets = [cell + i * int(budget) for i in range(layer.mixtures)]
            cell += layer.mixtures * int(budget)
        else:
            takes = [flags.pop(0) for _ in range(layer.mixtures)] if spread else _diagonal(layer.mixtures, budget)
            layer.own_targets = []
            for take in takes:
                layer.own_targets.append(cell if take else None)
                cell += bool(take)
        layer.local_cells = cell - layer.start
        if layer.local_cells < 1 and not spread:
            shape, (co, ci, kh, kw) = layer.shape, spec.cell_shape
            raise OperatorConfigError(
                f"KernelWarehouse budget b={budget} leaves layer {shape.describe()} in warehouse '{spec.key}' "
                f"without a whole cell: it has m={layer.mixtures} cells of {co}x{ci}x{kh}x{kw} and gets none of "
                f"its own; raise op.b or keep the layer static (op.keep_static)")
    if cell < 1:
        raise OperatorConfigError(
            f"KernelWarehouse budget b={budget} leaves warehouse '{spec.key}' without a cell: its layers "
            f"{', '.join(layer.shape.describe() for layer in spec.layers)} have m_t={spec.total_mixtures} mixtures")


def _diagonal(mixtures: int, budget: Fraction) -> list[bool]:
    """b = 1/k: mixture i gets a cell when i mod k == (i div k) mod k. Mixtures are ordered (spatial, output
    group, input group), input fastest, so with k output and input groups the cells land on the block diagonal:
    at tau = 1 the layer is a k-group convolution (Appendix A.2, Fig. 6a; the reference's rule)."""
    k = budget.denominator
    return [index % k == (index // k) % k for index in range(mixtures)]


def _spread(mixtures: int, budget: Fraction) -> list[bool]:
    """Other b < 1 (DeiT's 3/4 with whole cells): mixture i gets one when floor((i + 1) b) > floor(i b)."""
    return [math.floor((i + 1) * budget) > math.floor(i * budget) for i in range(mixtures)]


def beta_targets(layer: LayerCells, budget: Fraction, strategy: str, warehouse_cells: int) -> list[list[int]]:
    """For each of the layer's mixtures, the warehouse cells with beta = 1 (Sec. 3.4, Appendix A.2, Table 13).

    one_to_one: a cell of its own per mixture, in order, without repetition; for b < 1 the leftover mixtures
      get the zero cell (an empty list here) (Fig. 4, 5a, 6a).
    many_to_one: b >= 1: b cells per mixture without repetition (Fig. 5b); b < 1: one cell shared by 1/b
      consecutive mixtures (Fig. 6b).
    all_to_one: every cell to every mixture (beta = 1 everywhere).
    none: no beta (the operator then fixes tau = 0).
    """
    m = layer.mixtures
    if strategy == "none":
        return [[] for _ in range(m)]
    if strategy == "all_to_one":
        return [list(range(warehouse_cells)) for _ in range(m)]
    if strategy == "one_to_one":
        return [[] if target is None else [target] for target in layer.own_targets]
    if budget >= 1:
        step = int(budget)
        return [[layer.start + i * step + j for j in range(step)] for i in range(m)]
    k = math.ceil(1 / budget)
    return [[min(layer.start + i // k, layer.start + layer.local_cells - 1)] for i in range(m)]


def parse_budget(value, key: str = "op.b") -> Fraction:
    """A budget as an exact fraction: 1, 4, 0.5, "1/2", "3/4"."""
    try:
        budget = Fraction(str(value)) if not isinstance(value, bool) else None
    except (ValueError, ZeroDivisionError):
        budget = None
    if budget is None or budget <= 0:
        raise OperatorConfigError(
            f"{key}={value!r} is invalid for op=kw: allowed values are 1/4, 1/2, 3/4, 1, 2, 4 (a positive number "
            f"or fraction such as 1/2)")
    return budget
