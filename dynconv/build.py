"""config -> model: build the backbone once, convert its layers, add feature attention."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from dynconv.attention import ATTENTIONS
from dynconv.backbones import BACKBONES, Backbone
from dynconv.conversion.convert import convert, summarize
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


# Knobs of some backbone families: initialisation choices (docs/initialisation.md), architecture variants
# (docs/training.md: GroupNorm, ResNet v1), dilation (docs/segmentation.md: output_stride) and the network
# backbone=timm builds (docs/convert.md: model). Passed to the builder only where the backbone's config has them,
# so builders and configs without them keep working.
BACKBONE_FAMILY_KNOBS = ("zero_init_last", "drop_path_schedule", "classifier_init", "norm_layer", "norm_groups",
                         "stride_in_1x1", "output_stride", "shift_div", "model")


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
        **{key: backbone_cfg[key] for key in BACKBONE_FAMILY_KNOBS if backbone_cfg.get(key) is not None},
    )
    backbone.default_resolution = int(backbone_cfg.get("default_resolution", 224))
    decisions = convert(backbone, operator)
    attention_summary = add_attention(backbone, attn_cfg)
    return BuiltBackbone(backbone, operator, decisions, attention_summary)


def _classifier_prefixes(backbone: Backbone) -> list[str]:
    """State-dict prefixes of the classifier (its layer and, once converted, the modules inside it)."""
    from dynconv.conversion.convert import describe_layers

    names = []
    for name, module in backbone.net.named_modules():
        if name and any(rule.role == "classifier" and rule.match(name, module) for rule in backbone.rules):
            names.append(f"net.{name}.")
    return names or [f"net.{layer.name}." for layer in describe_layers(backbone) if layer.role == "classifier"]


def load_backbone_weights(backbone: Backbone, payload: Mapping[str, Any], path: str) -> list[str]:
    """Load a classification checkpoint (`payload["model"]`) into a backbone built with the same backbone and op.

    The classifier is skipped when its shape differs (another class count, or a detection model without one);
    every other key must match, else a ValueError names the checkpoint and the first mismatching keys.
    Returns the skipped keys.
    """
    state = payload.get("model", payload)
    state = {key.removeprefix("module.").removeprefix("_orig_mod."): value for key, value in state.items()}
    own = backbone.state_dict()
    classifier = tuple(_classifier_prefixes(backbone))
    skipped = [key for key in own if key.startswith(classifier)
               and (key not in state or state[key].shape != own[key].shape)]
    problems = [f"missing {key}" for key in own if key not in state and key not in skipped]
    problems += [f"unexpected {key}" for key in state if key not in own and not key.startswith(classifier)]
    problems += [f"{key}: {tuple(state[key].shape)} vs {tuple(own[key].shape)}" for key in own
                 if key in state and key not in skipped and state[key].shape != own[key].shape]
    if problems:
        raise ValueError(f"init_from={path}: the checkpoint does not fit backbone {backbone.name} built with this op "
                         f"({len(problems)} mismatches: {'; '.join(problems[:5])}); build it with the checkpoint's "
                         "backbone and op settings")
    backbone.load_state_dict({key: value for key, value in state.items() if key in own and key not in skipped},
                             strict=False)
    return skipped
