"""Where KernelWarehouse goes on each backbone, and which layers share a warehouse (Appendix A.3, Tables 14-15).

A layout maps every candidate layer to an `Assignment` (its warehouse key and that warehouse's budget and cell
ratio) or to the reason it stays static. Warehouses are per stage, but stages are re-cut by kernel dimensions
(Table 15): a stage's first layers, which still read the previous stage's width, join the previous stage's
warehouse ("handover"), so that the common divisors of a warehouse are not forced down by one layer.

The layouts follow the paper's appendix and, where it is silent, the reference release (OSVAI/KernelWarehouse):
- ResNet (Table 15): one warehouse per stage; the first block's conv1 and stride-2 shortcut use the previous
  stage's. ResNet18: all convolutions but the stem. ResNet50: all but the stem and layer1.0.conv1 ("all but the
  first two layers"; that 1x1 has no previous stage to hand over to); layer1's stride-1 shortcut stays static
  too, as in the reference (its 28.05M needs it). b < 1: cells of half the common divisors.
- MobileNetV2: KW stages = timm's block groups with the last two merged; the stem has a warehouse of its own.
  b = 1: per stage one warehouse for point-wise and one for depth-wise layers; b > 1: three, for depth-wise,
  expanding and reducing point-wise layers. b = 1/2: depth-wise layers and the stem at b = 1, the point-wise
  layers of the last KW stage (and conv_head) at b = 1/2 with half-divisor cells, the classifier at b = 1/2 with
  cells of C_out x 32; the other point-wise layers stay static; attention reduction 1/32. This is Table 14 and
  the reference; the appendix's sentence says b = 1 for point-wise and 1/2 elsewhere, which contradicts both
  its own Table 14 (m = 12 -> n = 6 and 80 -> 40 for the point-wise warehouses) and the 2.65M of Table 4.
- ConvNeXt-Tiny: every convolution and MLP linear; the third stage's nine blocks are cut into three stages of
  three; per stage one warehouse for point-wise (MLP) and one for depth-wise layers; the stem and each
  downsampling layer have their own. b = 3/4: the point-wise warehouses of the last two stages at b = 1/2 with
  half-divisor cells, the rest at b = 1 (Table 14). LayerNorm in the attention, as the reference.
- DeiT (no reference code): the value part of qkv, proj, fc1 and fc2 of every block; the twelve blocks are cut
  into four stages of three (as ConvNeXt's third stage), one warehouse per stage shared by the attention and
  MLP matrices; attention reduction 1/16 (the default), LayerNorm. The query and key matrices stay static
  (Sec. 4.1). b = 3/4: whole cells, 3 of every 4 mixtures with a cell of their own. These choices give Table 11's
  1x rows to 0.1%; 4x and 3/4x differ by -2.3% / +1.9% (docs/ops/kw.md).
- Any other backbone: one warehouse per stage for depth-wise layers and one for the rest, stem and classifier
  static.

`op.layout=release` builds the release's own models where they differ from the paper's appendix: ConvNeXt-T as
OSVAI/KernelWarehouse's `models/kw_convnext.py` with `configs/convnext/kw1x_convnext_tiny.json` (the third stage's
nine blocks share one warehouse, attention reduction 1/16: its 39,370,674 parameters), so that its released
checkpoint can be imported (`scripts/import_checkpoint.py`, docs/pretrained.md). ResNet and MobileNetV2 follow the
release already (the same layout either way); the other backbones have no release and refuse it.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import Callable

from dynconv.conversion.operator import LayerInfo, OperatorConfigError
from dynconv.ops.kw.plan import Assignment

HALF = Fraction(1, 2)
MIXED_BUDGET = Fraction(3, 4)  # ConvNeXt's and DeiT's "3/4x": a mix the layout defines, not a uniform budget
Decision = Assignment | str  # an assignment, or why the layer stays static


@dataclass(frozen=True)
class Layout:
    name: str
    assign: Callable[[list[LayerInfo], Fraction], dict[str, Decision]]
    norm: str  # "batch" | "layer": the attention's normalisation
    budgets: tuple[Fraction, ...] | None = None  # budgets this layout defines (None: any 1/k or integer)
    # ResNet50 KW(1/2x) needs the non-local basis (reference config: ratio 1/16) for 17.64M.
    nonlocal_basis: Callable[[list[LayerInfo], Fraction], float] = lambda layers, b: 1.0


def _uniform(budget: Fraction, reduction: float = 0.0625, key: str = "") -> Assignment:
    return Assignment(key, budget, HALF if budget < 1 else Fraction(1), reduction=reduction)


# ----------------------------------------------------------------------------------------------- ResNet


def _is_bottleneck(layers: list[LayerInfo]) -> bool:
    return any(layer.name.endswith(".conv3") for layer in layers)


def resnet_layout(layers: list[LayerInfo], budget: Fraction) -> dict[str, Decision]:
    bottleneck = _is_bottleneck(layers)
    plan: dict[str, Decision] = {}
    for layer in layers:
        if layer.role in ("stem", "classifier", "se"):
            continue
        block_index = int(layer.name.split(".")[1])
        target = layer.stage
        if block_index == 0 and (layer.name.endswith(".conv1") or layer.role == "downsample"):
            if layer.role == "downsample" and layer.module.stride[0] == 1:
                plan[layer.name] = "KernelWarehouse keeps the first stage's stride-1 shortcut static (as the reference)"
                continue
            target = layer.stage - 1 if bottleneck else max(layer.stage - 1, 1)
            if target < 1:
                plan[layer.name] = ("KernelWarehouse keeps ResNet50's first two layers static (Appendix A.3): "
                                    "no previous stage to hand this layer over to")
                continue
        plan[layer.name] = _uniform(budget, key=f"stage{target}")
    return plan


def _resnet_basis(layers: list[LayerInfo], budget: Fraction) -> float:
    return 0.0625 if budget < 1 and _is_bottleneck(layers) else 1.0


# ------------------------------------------------------------------------------------------ MobileNetV2

# timm block group (0..6) -> KW stage: the reference's kw_stage_setting, the last two groups merged.
MOBILENETV2_STAGES = (1, 2, 3, 4, 5, 6, 6)


def _mobilenet_kinds(layers: list[LayerInfo]) -> dict[str, str]:
    """dw / pw_expand (before the block's depth-wise conv) / pw_reduce (after it) for every block layer."""
    kinds, seen_dw = {}, set()
    for layer in layers:
        if layer.block is None:
            continue
        if layer.is_depthwise:
            kinds[layer.name] = "dw"
            seen_dw.add(layer.block)
        else:
            kinds[layer.name] = "pw_reduce" if layer.block in seen_dw else "pw_expand"
    return kinds


def _mobilenet_stage(layer: LayerInfo) -> int:
    group = layer.stage - 1
    stage = MOBILENETV2_STAGES[group]
    first_of_group = layer.block is not None and layer.block.endswith(".0")
    if first_of_group and group > 0 and stage != MOBILENETV2_STAGES[group - 1]:
        return stage - 1  # handover: the group's first block reads the previous stage's width
    return stage


def mobilenetv2_layout(layers: list[LayerInfo], budget: Fraction) -> dict[str, Decision]:
    kinds = _mobilenet_kinds(layers)
    last_stage = MOBILENETV2_STAGES[-1]
    plan: dict[str, Decision] = {}
    half = budget == HALF
    reduction = 0.03125 if half else 0.0625
    one = Fraction(1)
    for layer in layers:
        if layer.role == "se":
            continue
        if layer.role == "stem":
            plan[layer.name] = Assignment("stem", one if half else budget, reduction=reduction)
            continue
        if layer.role == "classifier":
            if half:
                plan[layer.name] = Assignment("classifier", HALF, Fraction(1), Fraction(32, layer.in_channels),
                                              reduction)
            continue
        if layer.role == "head":
            stage, kind = last_stage, "pw_reduce"
        else:
            stage, kind = _mobilenet_stage(layer), kinds[layer.name]
        if half:
            if kind == "dw":
                plan[layer.name] = Assignment(f"stage{stage}_dw", one, reduction=reduction)
            elif stage == last_stage:
                plan[layer.name] = Assignment(f"stage{stage}_{kind}", HALF, HALF, reduction=reduction)
            else:
                plan[layer.name] = ("KW(1/2x) on MobileNetV2 keeps the point-wise layers of the first five stages "
                                    "static (Appendix A.3, Table 14)")
            continue
        if kind != "dw" and budget == 1:
            kind = "pw"  # b = 1: expanding and reducing point-wise layers share one warehouse
        plan[layer.name] = Assignment(f"stage{stage}_{kind}", budget)
    return plan


# --------------------------------------------------------------------------------------------- ConvNeXt


def _convnext_stage(layer: LayerInfo) -> str:
    parts = layer.name.split(".")  # stages.{i}.blocks.{j}.conv_dw | mlp.fc1 | mlp.fc2
    stage, block = int(parts[1]), int(parts[3])
    return f"s3{'abc'[block // 3]}" if stage == 2 else f"s{stage + 1}"


def _convnext_release_stage(layer: LayerInfo) -> str:
    """The release's stages: timm's four, the third not cut (`kw_convnext.py` names warehouses by stage index)."""
    return f"s{int(layer.name.split('.')[1]) + 1}"


CONVNEXT_REDUCTION = 0.03125
CONVNEXT_RELEASE_REDUCTION = 0.0625  # configs/convnext/kw1x_convnext_tiny.json of the release


def convnext_layout(layers: list[LayerInfo], budget: Fraction) -> dict[str, Decision]:
    # The module globals are read here, at call time (tests/test_parity_kw.py patches them).
    return _convnext_plan(layers, budget, _convnext_stage, CONVNEXT_REDUCTION)


def convnext_release_layout(layers: list[LayerInfo], budget: Fraction) -> dict[str, Decision]:
    return _convnext_plan(layers, budget, _convnext_release_stage, CONVNEXT_RELEASE_REDUCTION)


def _convnext_plan(layers: list[LayerInfo], budget: Fraction, stage_of: Callable[[LayerInfo], str],
                   reduction: float) -> dict[str, Decision]:
    mixed = budget == MIXED_BUDGET
    plan: dict[str, Decision] = {}
    base = Fraction(1) if mixed else budget
    for layer in layers:
        if layer.role == "classifier":
            continue
        if layer.role == "stem":
            plan[layer.name] = _uniform(base, reduction, key="stem")
        elif layer.role == "downsample":
            plan[layer.name] = _uniform(base, reduction, key=f"downsample{layer.name.split('.')[1]}")
        else:
            stage = stage_of(layer)
            kind = "dw" if layer.is_depthwise else "pw"
            if mixed and kind == "pw" and stage in ("s3c", "s4"):
                plan[layer.name] = _uniform(HALF, reduction, key=f"{stage}_pw")
            else:
                plan[layer.name] = _uniform(base, reduction, key=f"{stage}_{kind}")
    return plan


# ------------------------------------------------------------------------------------------------- DeiT

DEIT_BLOCKS_PER_STAGE = 3


def deit_layout(layers: list[LayerInfo], budget: Fraction) -> dict[str, Decision]:
    plan: dict[str, Decision] = {}
    for layer in layers:
        if layer.block is None:
            continue
        stage = int(layer.block.split(".")[1]) // DEIT_BLOCKS_PER_STAGE
        if budget == MIXED_BUDGET:
            # Whole cells, 3 of every 4 mixtures with a cell of their own: half-divisor cells (as ConvNeXt's 3/4x)
            # would multiply the attention's logits by 8 and overshoot Table 11's 19.23M by 7%.
            plan[layer.name] = Assignment(f"stage{stage + 1}", budget)
        else:
            plan[layer.name] = _uniform(budget, key=f"stage{stage + 1}")
    return plan


# ----------------------------------------------------------------------------------------------- others


def generic_layout(layers: list[LayerInfo], budget: Fraction) -> dict[str, Decision]:
    plan: dict[str, Decision] = {}
    for layer in layers:
        if layer.role in ("stem", "classifier", "se"):
            continue
        kind = "dw" if layer.is_depthwise else "conv"
        plan[layer.name] = _uniform(budget, key=f"stage{layer.stage}_{kind}")
    return plan


def _budgets(*values) -> tuple[Fraction, ...]:
    return tuple(Fraction(v) for v in values)


# By the family a backbone declares (`Backbone.family`): ResNet, ResNeXt, Wide-ResNet and Dy-ResNet share the
# ResNet layout; MobileNetV3, ShuffleNetV2, VGG and the Dy-mobile/-shuffle networks take the generic one.
LAYOUTS = {
    "resnet": Layout("resnet", resnet_layout, "batch", nonlocal_basis=_resnet_basis),
    "mobilenetv2": Layout("mobilenetv2", mobilenetv2_layout, "batch", budgets=_budgets("1/2", 1, 2, 4)),
    "convnext": Layout("convnext", convnext_layout, "layer"),
    "deit": Layout("deit", deit_layout, "layer"),
}
GENERIC = Layout("generic", generic_layout, "batch")
# `op.layout=release`: the families the release has models for. Its ConvNeXt differs from the paper's appendix; its
# ResNets and MobileNetV2s are the layouts above. The mixed budget 3/4 is the paper's (the release has only 1x).
RELEASE_LAYOUTS = {"resnet": LAYOUTS["resnet"], "mobilenetv2": LAYOUTS["mobilenetv2"],
                   "convnext": Layout("convnext_release", convnext_release_layout, "layer")}
LAYOUT_SOURCES = ("paper", "release")


def layout_for(family: str, source: str = "paper") -> Layout:
    """The layout of a backbone family: the paper's (Appendix A.3) or, with `source="release"`, the release's."""
    if source == "release":
        if family not in RELEASE_LAYOUTS:
            raise OperatorConfigError(
                f"op.layout=release is invalid for a backbone of family {family}: the KernelWarehouse release has "
                f"models of the families {', '.join(RELEASE_LAYOUTS)} only; allowed values: paper")
        return RELEASE_LAYOUTS[family]
    return LAYOUTS.get(family, GENERIC)


def check_budget(layout: Layout, budget: Fraction, backbone_name: str) -> None:
    """Budgets are integers or 1/k; 3/4 is the paper's mixed budget of ConvNeXt and DeiT."""
    uniform = budget.denominator == 1 or budget.numerator == 1
    allowed_mixed = layout.name in ("convnext", "deit")
    ok = (uniform or (budget == MIXED_BUDGET and allowed_mixed))
    if layout.budgets is not None:
        ok = ok and budget in layout.budgets
    if not ok:
        if layout.budgets is not None:
            allowed = ", ".join(str(b) for b in layout.budgets)
        else:
            allowed = "1/4, 1/2, 1, 2, 4 (any 1/k or integer)" + (", 3/4 (the paper's mixed budget)"
                                                                  if allowed_mixed else "")
        raise OperatorConfigError(f"op.b={budget} is invalid for op=kw on backbone {backbone_name}: allowed values "
                                  f"are {allowed}")
