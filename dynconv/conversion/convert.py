"""The one conversion path: backbone layers -> the configured operator.

Every operator goes through here, so every operator works on every backbone: the backbone says where a
layer sits (`Backbone.place`), the operator says whether it takes it (`Operator.refuse`) and builds the
replacement (`Operator.build`).
"""

from __future__ import annotations

from collections import Counter

import torch.nn as nn

from dynconv.backbones import Backbone
from dynconv.conversion.layer import Decision, LayerInfo
from dynconv.conversion.operator import Operator


# The layers an operator may replace: 2-D and 3-D convolutions (video backbones) and Linear layers.
CONVERTIBLE = (nn.Conv2d, nn.Conv3d, nn.Linear)


def describe_layers(backbone: Backbone) -> list[LayerInfo]:
    """Every nn.Conv2d / nn.Conv3d / nn.Linear of the backbone, in registration order, with its place."""
    layers = []
    for name, module in backbone.net.named_modules():
        if isinstance(module, CONVERTIBLE):
            place = backbone.place(name, module)
            layers.append(LayerInfo(name, module, place.role, place.stage, place.block, len(layers), place.reason))
    return layers


def _unplaced(layer: LayerInfo) -> str | None:
    """The reason a layer the backbone could not place stays static, whatever the operator."""
    if layer.role != "unplaced":
        return None
    return f"not placed: {layer.unplaced or 'the backbone gives no place for it'}"


def convert(backbone: Backbone, operator: Operator) -> list[Decision]:
    """Replace, in place, every layer the operator accepts; return one decision per layer."""
    decisions = []
    layers = describe_layers(backbone)
    # A layer of a kind the operator cannot build (a Conv3d for a 2-D operator), or one the backbone could not place
    # (role "unplaced"), is decided first and left out of its plan, so no cross-layer plan (KernelWarehouse's
    # warehouses, DyNet's widths) ever meets a 3-D kernel or a layer of unknown place.
    unsupported = {layer.name: _unplaced(layer) or operator.unsupported(layer) for layer in layers}
    operator.prepare(backbone, [layer for layer in layers if unsupported[layer.name] is None])
    for layer in layers:
        reason = unsupported[layer.name] or operator.refuse(layer)
        if reason is None:
            parent_name, _, child = layer.name.rpartition(".")
            parent = backbone.net.get_submodule(parent_name) if parent_name else backbone.net
            setattr(parent, child, operator.build(layer))
        decisions.append(Decision(layer, reason is None, reason or ""))
    operator.finalize(backbone, decisions)
    return decisions


def summarize(decisions: list[Decision]) -> str:
    """A short human-readable account: how many layers were converted, and why the others were not."""
    converted = sum(d.converted for d in decisions)
    lines = [f"converted {converted} of {len(decisions)} conv/linear layers"]
    reasons = Counter(d.reason for d in decisions if not d.converted)
    for reason, count in reasons.most_common():
        names = [d.layer.name for d in decisions if not d.converted and d.reason == reason]
        shown = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
        lines.append(f"  static ({count}): {reason} [{shown}]")
    return "\n".join(lines)
