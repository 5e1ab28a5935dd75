"""`op=kw`: KernelWarehouse (Li & Yao, ICML 2024) through the one conversion path.

`prepare` sees every layer of the backbone before any is converted: the backbone's layout (`layouts.py`) says
which layers share which warehouse, `plan.partition` cuts them into cells, and the warehouses are created and
registered once in the backbone (`backbone.warehouses`). `build` then turns each planned layer into a
`KWConv2d` / `KWLinear` (timm's fused qkv into `SplitQKV`, value from the warehouse) whose attention knows its
mixtures, the warehouse size and its binary initial attentions beta.

Knobs (configs/op/kw.yaml): b, partition, sharing, sharing_dims, attention, init, tau_epochs, tau, omni (KW*),
reduction, nonlocal_basis, layout (the paper's or the release's, `layouts.py`), weight_init, keep_static.

Initialisation (`op.weight_init`, docs/initialisation.md). The attention is the release's either way
(`KWAttention.reset_parameters`). The cells: OSVAI/KernelWarehouse's `Warehouse_Manager.allocate` draws each
layer's own cells with `kaiming_normal_(cells[start:end].view(-1, *cell_shape[1:]), mode="fan_out")`, so the
fan-out is that of the layer's slice of cells, local_cells x cell_out x cell_kh x cell_kw = b O kh kw (C / c_in)
with spatial partition, not the static kernel's O kh kw: the two agree only when b = 1 and a cell spans all of
the layer's input channels (ResNet18's layer1), and the release starts ResNet18 KW (4x) at half the std.
`reference` (the default) draws that; `pytorch` keeps dynconv's earlier rule, the static kernel's fan-out.
"""

from __future__ import annotations

import math
import warnings
from collections import defaultdict

import torch
import torch.nn as nn

from dynconv.conversion.operator import OPERATORS, LayerInfo, Operator, OperatorConfigError
from dynconv.layers.initialisation import read_weight_init
from dynconv.layers.kernel_bank import conv_geometry
from dynconv.ops.kw.attention import ATTENTION_FUNCTIONS, KWAttention
from dynconv.ops.kw.layers import KWConv2d, KWLinear, SplitQKV, Warehouse, layer_fan_out, link_warehouse
from dynconv.ops.kw.layouts import LAYOUT_SOURCES, check_budget, layout_for
from dynconv.ops.kw.plan import (INIT_STRATEGIES, Assignment, KernelShape, LayerCells, WarehouseSpec, beta_targets,
                                 parse_budget, partition)

SHARING = ("stage", "layer", "none")
SHARING_DIMS = ("all", "same")
# Attention parameters above this multiple of the kernels made dynamic get a warning at conversion. The paper's
# layouts stay at or below 1x (ResNet18/50 0.02-0.16x, MobileNetV2 0.6-1.0x); a warehouse shared by layers of
# unrelated widths (MobileNetV3, ShuffleNetV2, ResNeXt's 4-channel groups under the generic or ResNet layout)
# gets cells as small as the greatest common divisor of their channels, and each layer's attention, which scores
# m mixtures x n cells, grows with the square of the cell count: 12-83x, up to 221M parameters.
ATTENTION_WARNING_RATIO = 2.0


def is_fused_qkv(layer: LayerInfo) -> bool:
    return layer.is_linear and layer.role == "attention" and layer.out_channels == 3 * layer.in_channels


def kernel_shape_of(layer: LayerInfo) -> KernelShape:
    """The static kernel a layer brings to its warehouse (for a fused qkv, its value part)."""
    out_channels = layer.in_channels if is_fused_qkv(layer) else layer.out_channels
    return KernelShape(layer.name, out_channels, layer.in_channels // layer.groups, layer.kernel_size)


@OPERATORS.register("kw")
class KernelWarehouseOperator(Operator):
    name = "kw"
    supports_linear = True
    static_roles = frozenset({"se"})  # stem, head and classifier: the backbone's layout decides

    def __init__(self, cfg):
        super().__init__(cfg)
        self.budget = parse_budget(self.cfg.get("b"))
        knobs = self.knobs
        self.spatial_partition = knobs.flag("partition")
        self.sharing = knobs.choice("sharing", SHARING)
        self.sharing_dims = knobs.choice("sharing_dims", SHARING_DIMS)
        self.function = knobs.choice("attention", ATTENTION_FUNCTIONS)
        self.init = knobs.choice("init", INIT_STRATEGIES)
        self.omni = knobs.flag("omni")
        if self.omni and not self.spatial_partition:
            raise OperatorConfigError("op.omni=true (KW*) is invalid with op.partition=false: its spatial attention "
                                      "scales kernel taps, which needs spatial cells; allowed: op.partition=true")
        tau_epochs = knobs.number("tau_epochs", 0, inclusive=True, note="0: tau = 0 from the first step")
        self.schedule = _ShiftedSchedule(tau_epochs)
        self.fixed_tau = knobs.number_in("tau", 0, 1, nullable=True)
        if self.init == "none":
            self.fixed_tau = 0.0  # no beta: tau would only scale the attentions down (Table 9's "without")
        self.reduction = knobs.number_in("reduction", 0, 1, low_open=True, nullable=True)
        self.nonlocal_basis = knobs.number_in("nonlocal_basis", 0, 1, low_open=True, nullable=True)
        self.weight_init = read_weight_init(knobs)
        self.layout_source = knobs.choice("layout", LAYOUT_SOURCES, default="paper")
        if self.sharing == "none" and (self.budget < 1 or self.budget.denominator != 1):
            raise OperatorConfigError(f"op.sharing=none needs a whole budget (every mixture owns b cells): op.b="
                                      f"{self.budget} is invalid with it; allowed values are 1, 2, 4")
        self.plan: dict[str, tuple[WarehouseSpec, LayerCells]] = {}
        self.sizes: dict[str, list[int]] = defaultdict(lambda: [0, 0])  # warehouse -> [attention, kernel] params
        self.static_reasons: dict[str, str] = {}
        self.warehouses: dict[str, Warehouse] = {}

    # ------------------------------------------------------------------------------------------- planning

    def prepare(self, backbone: nn.Module, layers: list[LayerInfo]) -> None:
        layout = layout_for(backbone.family, self.layout_source)
        check_budget(layout, self.budget, backbone.name)
        self.layout_name, self.backbone_name = layout.name, backbone.name
        self.norm = layout.norm
        candidates = [layer for layer in layers if Operator.refuse(self, layer) is None]
        decided = layout.assign(candidates, self.budget)
        basis = self.nonlocal_basis if self.nonlocal_basis is not None else layout.nonlocal_basis(layers,
                                                                                                   self.budget)
        self.basis_ratio = basis
        groups: dict[str, list[tuple[LayerInfo, Assignment]]] = defaultdict(list)
        for layer in candidates:
            decision = decided.get(layer.name, f"the {layout.name} layout of KernelWarehouse does not place it")
            if isinstance(decision, str):
                self.static_reasons[layer.name] = decision
                continue
            if self.reduction is not None:
                decision = Assignment(decision.warehouse, decision.budget, decision.cell_ratio,
                                      decision.in_cell_ratio, self.reduction)
            groups[self._warehouse_key(layer, decision)].append((layer, decision))
        for key, members in groups.items():
            spec = partition(key, [kernel_shape_of(layer) for layer, _ in members], members[0][1],
                             self.spatial_partition)
            warehouse = Warehouse(key, spec.cells, spec.cell_shape)
            backbone.warehouses[_module_key(key)] = warehouse
            self.warehouses[key] = warehouse
            for (layer, _), cells in zip(members, spec.layers):
                self.plan[layer.name] = (spec, cells)

    def _warehouse_key(self, layer: LayerInfo, assignment: Assignment) -> str:
        """Table 6 (sharing range in layers), Table 7 (in kernel dimensions), Table 5 (no partition)."""
        key = assignment.warehouse
        if self.sharing == "layer":
            key = layer.name
        elif self.sharing == "none":
            key = layer.name  # and each mixture attends to its own cells only (KWAttention's own_cells)
        shape = kernel_shape_of(layer)
        if self.sharing_dims == "same":
            kh, kw = shape.kernel_size
            key = f"{key}|{kh}x{kw}x{shape.in_per_group}x{shape.out_channels}"
        return key

    # -------------------------------------------------------------------------------------- conversion

    def refuse(self, layer: LayerInfo) -> str | None:
        reason = super().refuse(layer)
        if reason is None and layer.name not in self.plan:
            reason = self.static_reasons.get(layer.name, "not placed by the KernelWarehouse layout")
        return reason

    def build(self, layer: LayerInfo) -> nn.Module:
        spec, cells = self.plan[layer.name]
        warehouse = self.warehouses[spec.key]
        shape = kernel_shape_of(layer)
        attention = self._attention(layer, spec, cells, shape)
        module = layer.module
        if layer.is_conv:
            built = KWConv2d(**conv_geometry(module), bias=module.bias is not None, partition=cells,
                             attention=attention)
        else:
            bias = module.bias is not None
            built = KWLinear(shape.in_per_group, shape.out_channels, bias=bias, partition=cells, attention=attention)
        link_warehouse(built, warehouse)
        self._init_cells(warehouse, cells, built.kernel_shape, self.weight_init)
        sizes = self.sizes[spec.key]
        sizes[0] += sum(p.numel() for p in attention.parameters())
        sizes[1] += shape.out_channels * shape.in_per_group * math.prod(shape.kernel_size)
        return SplitQKV(module, built) if is_fused_qkv(layer) else built

    def finalize(self, model: nn.Module, decisions) -> None:
        """Warn when the attentions dwarf the kernels they make dynamic (`ATTENTION_WARNING_RATIO`), naming the
        warehouse that costs most, its cells, and the knobs that keep cells large."""
        attention = sum(a for a, _ in self.sizes.values())
        kernels = sum(k for _, k in self.sizes.values())
        if not kernels or attention <= ATTENTION_WARNING_RATIO * kernels:
            return
        key, (worst, _) = max(self.sizes.items(), key=lambda item: item[1][0])
        spec = self.plan_specs()[key]
        cell = "x".join(str(d) for d in spec.cell_shape)
        layout = f"The {self.layout_name} layout shares warehouses across layers"
        if self.layout_name == "generic":
            layout = "No paper layout covers this backbone, so the generic one shares a warehouse per stage"
        warnings.warn(
            f"op=kw on {self.backbone_name}: the attentions hold {attention / 1e6:.1f}M parameters, "
            f"{attention / kernels:.0f}x the {kernels / 1e6:.2f}M of the kernels they make dynamic. {layout}, and "
            f"cells are as small as the greatest common divisor of the sharing layers' channels: warehouse '{key}' "
            f"has {spec.cells} cells of {cell} and {worst / 1e6:.1f}M attention parameters. op.sharing=layer (or "
            f"op.sharing_dims=same, op.keep_static=[...]) keeps cells large", stacklevel=2)

    def plan_specs(self) -> dict[str, WarehouseSpec]:
        """Each warehouse's spec, by key."""
        return {spec.key: spec for spec, _ in self.plan.values()}

    def _attention(self, layer: LayerInfo, spec: WarehouseSpec, cells: LayerCells, shape: KernelShape) -> KWAttention:
        beta = torch.zeros(cells.mixtures, spec.cells + 1)
        for mixture, targets in enumerate(beta_targets(cells, spec.budget, self.init, spec.cells)):
            beta[mixture, targets if targets else [spec.cells]] = 1.0  # no cell: the zero cell e_z
        if self.init == "none":
            beta.zero_()
        own = None
        if self.sharing == "none":
            step = int(spec.budget)
            own = torch.tensor([[cells.start + i * step + j for j in range(step)] for i in range(cells.mixtures)])
        omni = None
        if self.omni:
            taps = math.prod(shape.kernel_size)
            omni = (layer.in_channels, shape.out_channels, taps)
        return KWAttention(layer.in_channels, cells.mixtures, spec.cells, start=cells.start,
                           local_cells=cells.local_cells, reduction=spec.reduction, norm=self.norm,
                           function=self.function, beta=beta, schedule=self.schedule, fixed_tau=self.fixed_tau,
                           nonlocal_basis_ratio=self.basis_ratio, omni=omni, own_cells=own)

    @staticmethod
    @torch.no_grad()
    def _init_cells(warehouse: Warehouse, cells: LayerCells, kernel_shape, weight_init: str = "reference") -> None:
        """The layer's own cells, kaiming-normal (ReLU gain) with mode fan_out.

        reference: the fan-out of the layer's slice of cells viewed as one convolution weight
        (local_cells * cell_out, cell_in, ckh, ckw), as the release's `Warehouse_Manager.allocate` computes it;
        pytorch: the fan-out of the layer's static kernel (O kh kw), dynconv's earlier rule, under which the
        layer at tau = 1, b = 1 starts like timm's static convolution."""
        if cells.local_cells < 1:
            return
        if weight_init == "reference":
            fan_out = cells.local_cells * cells.cell_out * math.prod(cells.cell_kernel)
        else:
            fan_out = layer_fan_out(kernel_shape)
        warehouse.cells[cells.start: cells.start + cells.local_cells].normal_(0.0, math.sqrt(2.0 / fan_out))


def _module_key(key: str) -> str:
    return key.replace(".", "__").replace("|", "__")


class _ShiftedSchedule:
    """tau(e) = max(0, 1 - e / epochs): 1 -> 0 linearly, per iteration (Sec. 3.4, Appendix A.1.1)."""

    def __init__(self, epochs: float):
        self.epochs = epochs

    def __call__(self, epoch: float) -> float:
        if self.epochs == 0:
            return 0.0
        return max(0.0, 1.0 - max(float(epoch), 0.0) / self.epochs)

