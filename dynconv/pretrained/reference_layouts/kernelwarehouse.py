"""OSVAI/KernelWarehouse's released checkpoints -> dynconv's `op=kw` models.

The layout, read from the release's code at revision a4ac17d (2024-06-13): `modules/kernel_warehouse.py`
(`Attention`, `KWconvNd`, `KWLinear`, `Warehouse_Manager.reserve / store / allocate`), `models/kw_resnet.py`,
`models/kw_mobilenetv2.py`, `models/kw1d2x_mobilenetv2.py`, `models/kw_convnext.py`, `configs/*/kw*.json` and
`main.py` / `engine.py` (the temperature):

- State: `warehouse_manager.weights.{i}` holds warehouse i's cells (n, c_out, c_in, 1, 1) (1 x 1 cells: spatial
  partition; (n, c_out, c_in, 1) for a Linear's warehouse), i counting warehouses in the order their names are
  first reserved. Each dynamic layer holds `attention.fc1` (with a bias only before a LayerNorm),
  `attention.norm1`, `attention.fc2` and, with the non-local basis (ResNet50 1/2x), `attention.fc3` and
  `attention.basis_bias` (m (n + 1) values); and its own `bias` where it has one (ConvNeXt). A Linear
  (`KWLinear`, MobileNetV2 1/2x's classifier) wraps a `KWConv1d` as `.conv`. The static layers keep the names of
  `module_names.py`. Not stored: the temperature tau (`Attention.temp_value`, a plain attribute, 0 from
  construction and at the end of training; `main.py --eval` never sets it: the release evaluates at tau = 0) and
  beta (`temp_bias`, rebuilt by `init_temperature`).
- Warehouses (`reserve(warehouse_name="stage{s}_layer{l}_{kind}{c}")`, names fused by the config's
  `sharing_range`): ResNet: one per stage, a stage's first conv1 and stride-2 shortcut in the previous stage's
  (`warehouse_handover`); MobileNetV2: the stem alone, then per KW stage (`kw_stage_setting` 1, 2, 3, 4, 5, 6, 6,
  a group's first block in the previous stage when the stage changes) one warehouse for depth-wise layers and one
  for point-wise ones at 1x (`sharing_range ["layer", "pwconv"]`), two (expanding, projecting) at 4x and 1/2x, plus
  the classifier's at 1/2x; ConvNeXt-T: the stem and each downsampling layer alone, per stage one for depth-wise and
  one for point-wise layers (`("layer", "pwconv")`), the third stage not cut. (The ResNet configs give
  `sharing_range` as the string "layer_conv", which `fuse_warehouse_name` iterates letter by letter, and
  `kw1d2x_mobilenetv2.py` passes `tuple("layer")`: the fused names differ from the documented ones, the sharing
  does not: still one warehouse per stage and kind. The names below are this module's labels, not the release's.)
- MobileNetV2 1x / 4x: the configs set no `reduction` and `main.py`'s `--reduction` has no default, so these runs
  were given it on the command line; an attention width of 1/16 is the one that gives the release's parameter
  counts (5,168,146 at 1x: tests/test_parity_kw.py), and the keys' shapes check it on import.
- Cells (`store`): c_out = max(int(gcd of the warehouse's output channels x cell_outplane_ratio), 1), c_in likewise
  over input channels per group; n = max(int(total mixtures x cell_num_ratio), 1). `allocate` walks the network's
  modules in registration order and hands each layer the next cells of its warehouse (`init_temperature`):
  b >= 1: b per mixture; b = 1/k < 1: one for mixture i when i mod k == (i div k) mod k, none otherwise (beta on
  the zero cell). A layer's m mixtures are ordered (spatial position, output group, input group): `KWconvNd.forward`
  reshapes alpha @ cells to (B, S, G_out, G_in, c_out, c_in, ...) and permutes it to (B, G_out, c_out, G_in, c_in,
  S, ...), as dynconv's `ops/kw/apply.py` `assemble`.

`check_allocation` recomputes that allocation from the release's rules and compares it, layer by layer, with the plan
dynconv built (cell shape, mixtures, first cell, own cells, warehouse size): warehouse i is copied onto a dynconv
warehouse only when both hold the same layers with the same cells in the same order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Mapping

import torch
import torch.nn as nn

from dynconv.config import ConfigError
from dynconv.ops.kw.layers import KWConv2d, KWLinear
from dynconv.pretrained.module_names import MOBILENETV2_BLOCKS, TO_TIMM, mobilenetv2_block
from dynconv.pretrained.reference_layouts.key_mapping import LayoutMismatch, MappedState, Target, map_state

WAREHOUSE_PREFIX = "warehouse_manager.weights."
EVALUATION_TAU = 0.0  # Attention.temp_value at construction and after training; --eval keeps it


@dataclass(frozen=True)
class Ratios:
    """A warehouse's `cell_num_ratio`, `cell_inplane_ratio` and `cell_outplane_ratio`."""

    cells: float
    inputs: float
    outputs: float


@dataclass(frozen=True)
class Model:
    """One released model: its budgets (configs/*/kw*.json), each with its ratios and non-local basis ratio."""

    family: str
    budgets: Mapping[Fraction, tuple[Ratios | tuple[Ratios, ...], float]]
    op_knobs: Mapping[str, Any] | None = None  # knobs dynconv needs to build this model (besides op.b)


def _uniform(budget: str) -> Ratios:
    """configs/resnet*/kw*.json, kw1x / kw4x_mobilenetv2_*.json, kw1x_convnext_tiny.json: b, and half-divisor cells
    for b < 1."""
    b = float(Fraction(budget))
    channels = 0.5 if b < 1 else 1.0
    return Ratios(b, channels, channels)


# models/kw1d2x_mobilenetv2.py: per warehouse, in reserve order (stem, five depth-wise, then the last stage's
# expanding, depth-wise and projecting warehouses, and the classifier's: 1280 x 0.025 = 32 input channels, all 1000
# output channels).
_MOBILENETV2_HALF = tuple(Ratios(*r) for r in [(1, 1, 1)] * 6 + [(0.5, 0.5, 0.5), (1, 1, 1), (0.5, 0.5, 0.5),
                                                                   (0.5, 0.025, 1)])

RESNET_BUDGETS = {Fraction(b): (_uniform(b), 1.0) for b in ("1/4", "1/2", "1", "2", "4")}
MODELS = {
    "resnet18": Model("resnet", RESNET_BUDGETS),
    "resnet50": Model("resnet", {Fraction(1, 2): (_uniform("1/2"), 0.0625), Fraction(1): (_uniform("1"), 1.0),
                                 Fraction(4): (_uniform("4"), 1.0)}),
    "mobilenetv2_100": Model("mobilenetv2", {Fraction(1, 2): (_MOBILENETV2_HALF, 1.0),
                                             Fraction(1): (_uniform("1"), 1.0), Fraction(4): (_uniform("4"), 1.0)}),
    "convnext_tiny": Model("convnext", {Fraction(1): (_uniform("1"), 1.0)}, {"layout": "release"}),
}
MODELS["mobilenetv2_050"] = MODELS["mobilenetv2_100"]
# What a converted checkpoint computes is the release's function only with these knobs (they change no key).
REQUIRED_KNOBS = {"attention": "caf", "partition": True, "sharing": "stage", "sharing_dims": "all",
                  "init": "one_to_one", "omni": False}


# ------------------------------------------------------------------------------------- warehouse names

def _resnet_warehouse(name: str, budget: Fraction) -> str:
    """layer{s}.{b}.conv{c} / layer{s}.{b}.downsample.0 -> the stage whose warehouse it reserves."""
    parts = name.split(".")
    stage, block = int(parts[0].removeprefix("layer")) - 1, int(parts[1])
    handover = block == 0 and parts[2] in ("conv1", "downsample")
    return f"stage{max(stage - 1, 0) if handover else stage}"


_KW_STAGES = (1, 2, 3, 4, 5, 6, 6)  # kw_stage_setting: timm's block groups, the last two merged


def _mobilenetv2_warehouse(name: str, budget: Fraction) -> str:
    parts = name.split(".")
    if parts[0] == "classifier":
        return "classifier"
    index = int(parts[1])
    if index == 0:
        return "stem"
    if index == 1 + sum(MOBILENETV2_BLOCKS):
        stage, kind = _KW_STAGES[-1], "pwconv1"
    else:
        group, block = mobilenetv2_block(index)
        stage = _KW_STAGES[group]
        if block == 0 and group > 0 and stage != _KW_STAGES[group - 1]:
            stage -= 1  # handover: the group's first block joins the previous stage
        position = parts[3]  # features.k.conv.{position}...
        kinds = {"0": "dwconv0", "1": "pwconv1"} if group == 0 else {"0": "pwconv0", "1": "dwconv0", "2": "pwconv1"}
        kind = kinds[position]
    if budget == 1 and kind.startswith("pwconv"):
        kind = "pwconv"  # sharing_range ["layer", "pwconv"]: both point-wise kinds in one warehouse
    return f"stage{stage}_{kind}"


def _convnext_warehouse(name: str, budget: Fraction) -> str:
    parts = name.split(".")
    if parts[0] == "downsample_layers":
        return "stem" if parts[1] == "0" else f"downsample{parts[1]}"
    kind = "dwconv" if parts[3] == "dwconv" else "pwconv"  # pwconv1 and pwconv2 share (sharing_range "pwconv")
    return f"stage{parts[1]}_{kind}"


def _convnext_order(name: str) -> int:
    """`downsample_layers` (stem and downsampling convs) is registered before `stages`: its layers come first."""
    return 0 if name.startswith("downsample_layers") else 1


WAREHOUSE_OF = {"resnet": _resnet_warehouse, "mobilenetv2": _mobilenetv2_warehouse, "convnext": _convnext_warehouse}
MODULE_ORDER = {"convnext": _convnext_order}


# -------------------------------------------------------------------------------------- the allocation

@dataclass(frozen=True)
class ReleaseLayer:
    name: str  # the release's module name of the layer (its KWconvNd; `.conv` dropped for a KWLinear)
    target: str  # dynconv's module name (under `net.`)
    warehouse: str
    shape: tuple[int, ...]  # (out, in per group, *kernel)


@dataclass(frozen=True)
class Cells:
    """What the release gives one layer: cell shape, mixtures, cells [start, end), the attention's local cells."""

    cell: tuple[int, int]
    mixtures: int
    start: int
    end: int
    attention_local: int


def release_allocation(layers: list[ReleaseLayer], ratios: dict[str, Ratios]
                       ) -> tuple[dict[str, Cells], dict[str, int]]:
    """The release's cells per layer and size per warehouse (`Warehouse_Manager.store` / `allocate`), `layers`
    in the release's module order."""
    members: dict[str, list[ReleaseLayer]] = {}
    for layer in layers:
        members.setdefault(layer.warehouse, []).append(layer)
    cell_shapes, sizes = {}, {}
    for name, group in members.items():
        ratio = ratios[name]
        out_gcd = math.gcd(*[layer.shape[0] for layer in group])
        in_gcd = math.gcd(*[layer.shape[1] for layer in group])
        cell = (max(int(out_gcd * ratio.outputs), 1), max(int(in_gcd * ratio.inputs), 1))
        cell_shapes[name] = cell
        total = sum(_mixtures(layer.shape, cell) for layer in group)
        sizes[name] = max(int(total * ratio.cells), 1)
    cells, ends = {}, dict.fromkeys(members, 0)
    for layer in layers:
        cell, ratio = cell_shapes[layer.warehouse], ratios[layer.warehouse].cells
        mixtures = _mixtures(layer.shape, cell)
        start = ends[layer.warehouse]
        if ratio >= 1:
            own = mixtures * int(ratio)
        else:
            k = int(1.0 / ratio)
            own = sum(index % k == (index // k) % k for index in range(mixtures))
        ends[layer.warehouse] = start + own
        cells[layer.name] = Cells(cell, mixtures, start, start + own, int(ratio * mixtures))
    for name, end in ends.items():
        if end != sizes[name]:  # the release asserts this in `allocate`
            raise LayoutMismatch(f"warehouse {name}: the release's layers take {end} cells of its {sizes[name]}")
    return cells, sizes


def _mixtures(shape: tuple[int, ...], cell: tuple[int, int]) -> int:
    """`store`'s count: (out // c_out * in // c_in) x the kernel's spatial positions (1 x 1 cells)."""
    return int(shape[0] // cell[0] * shape[1] // cell[1]) * math.prod(shape[2:])


# ---------------------------------------------------------------------------------------- the release

class KernelWarehouseRelease:
    source = "kernelwarehouse"
    op = "kw"
    models = MODELS

    def check_config(self, backbone: str, op_cfg: Mapping[str, Any]) -> None:
        """ConfigError for a model the release does not have, or knobs that change the function (not the keys)."""
        model = self.models[backbone]
        budget = Fraction(str(op_cfg.get("b")))
        if budget not in model.budgets:
            allowed = ", ".join(str(b) for b in model.budgets)
            raise ConfigError(f"op.b={op_cfg.get('b')} is invalid for source=kernelwarehouse backbone={backbone}: "
                              f"the release has {backbone} at the budgets {allowed}; allowed values: {allowed}")
        required = {key: [value] for key, value in {**REQUIRED_KNOBS, **(model.op_knobs or {})}.items()}
        required["nonlocal_basis"] = [None, model.budgets[budget][1]]
        for key, allowed in required.items():
            if op_cfg.get(key, allowed[0]) not in allowed:
                shown = ", ".join("null" if v is None else str(v).lower() if isinstance(v, bool) else str(v)
                                  for v in allowed)
                raise ConfigError(f"op.{key}={op_cfg.get(key)} is invalid for source=kernelwarehouse: the release's "
                                  f"{backbone} computes as dynconv does with op.{key}={shown.split(', ')[-1]}; "
                                  f"allowed values: {shown}")

    def map(self, model: nn.Module, checkpoint: Mapping[str, torch.Tensor], backbone: str, op_cfg: Mapping[str, Any],
            where: str) -> MappedState:
        """`checkpoint` (the release's keys) as the state dict of `model` (dynconv's `op=kw` backbone)."""
        release = self.models[backbone]
        family = release.family
        budget = Fraction(str(op_cfg.get("b")))
        rename = TO_TIMM[family]
        warehouses, totals = self.check_allocation(model, checkpoint, backbone, budget, where)
        for index, (name, total) in enumerate(zip(warehouses, totals)):
            stored = checkpoint.get(f"{WAREHOUSE_PREFIX}{index}")
            size = model.warehouses[name].cells.shape[0]
            if stored is not None and stored.dim() > 0 and stored.shape[0] != size:
                ratio = Fraction(stored.shape[0], total).limit_denominator(8)
                raise LayoutMismatch(f"{where}: the checkpoint's warehouse {index} has {stored.shape[0]} cells for "
                                     f"{total} mixtures (a budget of {ratio}), op.b={op_cfg.get('b')} gives {size}: "
                                     f"convert it with op.b={ratio}")

        def translate(key: str) -> Target | None:
            if key.startswith(WAREHOUSE_PREFIX):
                index = key.removeprefix(WAREHOUSE_PREFIX)
                return Target(f"warehouses.{warehouses[int(index)]}.cells") if index.isdigit() and int(
                    index) < len(warehouses) else None
            timm = rename(key)
            if timm is None:
                return None
            if ".attention." in timm:
                timm = timm.replace(".attention.norm1.", ".attention.norm.")
                if timm.endswith(".attention.basis_bias"):
                    return Target(f"net.{timm.removesuffix('basis_bias')}logit_bias", reshape=True)
            return Target(f"net.{timm}")

        def constant(key: str) -> float | None:
            return EVALUATION_TAU if key.endswith(".attention.tau") else None

        return map_state(model.state_dict(), checkpoint, translate, constant, where)

    def check_allocation(self, model: nn.Module, checkpoint: Mapping[str, torch.Tensor], backbone: str,
                         budget: Fraction, where: str) -> list[str]:
        """The release's allocation against dynconv's plan (module doc); returns, for each release warehouse i, the
        name of the dynconv warehouse (in `model.warehouses`) it maps onto, and its mixtures in all."""
        release = self.models[backbone]
        family = release.family
        dynamic = {name: module for name, module in model.net.named_modules() if isinstance(module, (KWConv2d,
                                                                                                     KWLinear))}
        order = {name: index for index, name in enumerate(dynamic)}
        release_names = sorted({key.split(".attention.fc1.weight")[0] for key in checkpoint
                                if key.endswith(".attention.fc1.weight")})
        layers = []
        for name in release_names:
            layer_name = name.removesuffix(".conv") if name.startswith("classifier") else name
            target = TO_TIMM[family](layer_name)
            if target not in dynamic:
                raise LayoutMismatch(f"{where}: layer {layer_name} is a KernelWarehouse layer in the checkpoint, but "
                                     f"{target} is not one in dynconv's model (dynamic there: "
                                     f"{', '.join(list(dynamic)[:4])}, ...)")
            module = dynamic[target]
            shape = module.kernel_shape if len(module.kernel_shape) > 2 else (*module.kernel_shape, 1)
            layers.append(ReleaseLayer(layer_name, target, WAREHOUSE_OF[family](layer_name, budget), tuple(shape)))
        extra = sorted(set(dynamic) - {layer.target for layer in layers})
        if extra:
            raise LayoutMismatch(f"{where}: {len(extra)} KernelWarehouse layers of dynconv's model are static in the "
                                 f"checkpoint: {', '.join(extra[:SHOWN_LAYERS])}")
        by_module = MODULE_ORDER.get(family, lambda name: 0)
        layers.sort(key=lambda layer: (by_module(layer.name), order[layer.target]))
        names = list(dict.fromkeys(layer.warehouse for layer in layers))  # reserve order = first appearance
        ratio_setting, _ = release.budgets[budget]
        if isinstance(ratio_setting, tuple):
            if len(ratio_setting) != len(names):
                raise LayoutMismatch(f"{where}: the release's {backbone} has {len(ratio_setting)} warehouses, the "
                                     f"checkpoint's layers make {len(names)}: {', '.join(names)}")
            ratios = dict(zip(names, ratio_setting))
        else:
            ratios = dict.fromkeys(names, ratio_setting)
        cells, sizes = release_allocation(layers, ratios)
        targets = self._match_warehouses(model, dynamic, layers, names, cells, sizes, where)
        totals = [sum(cells[layer.name].mixtures for layer in layers if layer.warehouse == name) for name in names]
        return targets, totals

    @staticmethod
    def _match_warehouses(model, dynamic, layers, names, cells, sizes, where) -> list[str]:
        module_names = {id(warehouse): name for name, warehouse in model.warehouses.items()}
        targets: dict[str, str] = {}
        problems = []
        for layer in layers:
            module = dynamic[layer.target]
            ours = module.partition
            theirs = cells[layer.name]
            mine = Cells((ours.cell_out, ours.cell_in), ours.mixtures, ours.start, ours.start + ours.local_cells,
                         ours.local_cells)
            if theirs != mine or ours.cell_kernel != (1, 1):
                problems.append(f"{layer.name} -> {layer.target}: release {_describe(theirs)}, dynconv "
                                f"{_describe(mine)}")
            warehouse = module_names[id(module.warehouse)]
            if targets.setdefault(layer.warehouse, warehouse) != warehouse:
                problems.append(f"the release's warehouse {layer.warehouse} holds {layer.name}, whose dynconv "
                                f"layer {layer.target} reads warehouse {warehouse}, not {targets[layer.warehouse]}")
        if len(set(targets.values())) != len(targets):
            problems.append(f"two of the release's warehouses map onto one of dynconv's: {targets}")
        for name in names:
            if name in targets and model.warehouses[targets[name]].cells.shape[0] != sizes[name]:
                problems.append(f"warehouse {name}: {sizes[name]} cells in the release, "
                                f"{model.warehouses[targets[name]].cells.shape[0]} in dynconv's {targets[name]}")
        if problems:
            raise LayoutMismatch(f"{where}: the release allocates its cells otherwise than dynconv: "
                                 + "; ".join(problems[:SHOWN_LAYERS]))
        return [targets[name] for name in names]

    def classifier_rows(self, checkpoint: Mapping[str, torch.Tensor], backbone: str) -> int | None:
        """The class count of the release's classifier (a KW classifier stores only its bias)."""
        for key in ("fc.bias", "classifier.bias", "classifier.1.conv.bias", "head.bias"):
            if key in checkpoint:
                return int(checkpoint[key].shape[0])
        return None


SHOWN_LAYERS = 4


def _describe(cells: Cells) -> str:
    return (f"cells {cells.cell[0]}x{cells.cell[1]}, m={cells.mixtures}, own cells [{cells.start}, {cells.end}), "
            f"attention's own {cells.attention_local}")
