"""config -> model: build the backbone once, convert its layers, add feature attention."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from dynconv.attention import ATTENTIONS
from dynconv.backbones import BACKBONES, Backbone
from dynconv.convert import convert, summarize
from dynconv.ops import OPERATORS, Decision, Operator


@dataclass
class BuiltBackbone:
    backbone: Backbone
    operator: Operator
    decisions: list[Decision]
    attention_summary: str

    def summary(self) -> str:
        return (
            f"backbone {self.backbone.name} | op {self.operator.describe()} | {self.attention_summary}\n"
            f"{summarize(self.decisions)}"
        )


def make_operator(op_cfg: Mapping[str, Any]) -> Operator:
    """Look up and instantiate the operator; its constructor validates the knobs."""
    return OPERATORS.get(op_cfg["name"])(op_cfg)


def build_backbone(
    backbone_cfg: Mapping[str, Any],
    op_cfg: Mapping[str, Any],
    attn_cfg: Mapping[str, Any],
    *,
    num_classes: int,
    image_size: int,
) -> BuiltBackbone:
    builder = BACKBONES.get(backbone_cfg["name"])
    operator = make_operator(op_cfg)
    add_attention = ATTENTIONS.get(attn_cfg["name"])
    backbone = builder(
        num_classes=num_classes,
        image_size=image_size,
        drop_rate=backbone_cfg.get("drop_rate"),
        drop_path_rate=backbone_cfg.get("drop_path_rate"),
    )
    backbone.default_resolution = int(backbone_cfg.get("default_resolution", 224))
    decisions = convert(backbone, operator)
    attention_summary = add_attention(backbone, attn_cfg)
    return BuiltBackbone(backbone, operator, decisions, attention_summary)
