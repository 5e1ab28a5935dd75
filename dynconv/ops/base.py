"""What an operator sees of a layer, and the contract every operator fulfils.

The conversion pass (`dynconv.convert`) walks a backbone, describes each `nn.Conv2d` / `nn.Linear` as a
`LayerInfo` (shape + place in the network), and asks the configured `Operator` whether it takes the layer.
An operator may refuse with a reason; refused layers stay static and the reason is reported.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch.nn as nn

from dynconv.registry import Registry

# Roles a backbone assigns to its layers (see dynconv/backbones/*). Operators decide by role, never by name.
ROLES = (
    "stem",  # first convolution(s) on the image
    "conv",  # a regular k x k convolution inside a block
    "pointwise",  # 1 x 1 convolution (or a Linear applied per position) inside a block
    "depthwise",  # groups == in_channels == out_channels
    "downsample",  # shortcut projection or a stage's downsampling layer
    "head",  # last feature convolution before pooling (MobileNet conv_head, ShuffleNet conv5)
    "se",  # convolutions inside a squeeze-excitation branch of the original backbone
    "attention",  # transformer projections (qkv, proj)
    "mlp",  # transformer MLP
    "classifier",  # the final Linear
)


@dataclass(frozen=True)
class LayerInfo:
    """A convertible layer: its module, its shape and its place in the backbone."""

    name: str  # qualified module name, e.g. "layer2.0.conv1"
    module: nn.Module  # the original nn.Conv2d / nn.Linear
    role: str  # one of ROLES
    stage: int  # stage index (0 = stem), as the backbone family defines stages
    block: str | None  # qualified name of the block that holds the layer (shared routing, GAP sharing)
    index: int  # position among all convertible layers, in forward order

    @property
    def is_conv(self) -> bool:
        return isinstance(self.module, nn.Conv2d)

    @property
    def is_linear(self) -> bool:
        return isinstance(self.module, nn.Linear)

    @property
    def in_channels(self) -> int:
        return self.module.in_channels if self.is_conv else self.module.in_features

    @property
    def out_channels(self) -> int:
        return self.module.out_channels if self.is_conv else self.module.out_features

    @property
    def groups(self) -> int:
        return self.module.groups if self.is_conv else 1

    @property
    def kernel_size(self) -> tuple[int, int]:
        return tuple(self.module.kernel_size) if self.is_conv else (1, 1)

    @property
    def is_depthwise(self) -> bool:
        return self.is_conv and self.groups == self.in_channels == self.out_channels and self.groups > 1

    def shape_str(self) -> str:
        if self.is_conv:
            m = self.module
            k = "x".join(map(str, m.kernel_size))
            return f"Conv2d({m.in_channels}->{m.out_channels}, k={k}, s={m.stride[0]}, g={m.groups})"
        return f"Linear({self.in_channels}->{self.out_channels})"


class OperatorConfigError(ValueError):
    """An operator knob that does not fit a layer; names the layer, its shape and the allowed values."""


@dataclass
class Decision:
    layer: LayerInfo
    converted: bool
    reason: str = ""  # why the layer stayed static


class Operator:
    """Base class: turns eligible layers into one kind of (dynamic) layer.

    Subclasses set `name`, read their knobs from the `op` config in `__init__` (validating them), and
    implement `build`. The default eligibility keeps the stem, SE branches and the classifier static and
    takes every other convolution; `supports_linear` operators may also take `nn.Linear` layers.
    """

    name = "base"
    supports_linear = False
    # Roles kept static unless an operator says otherwise (the papers keep the stem static; the
    # classifier and the backbone's own SE branches are not what a dynamic convolution replaces).
    static_roles: frozenset[str] = frozenset({"stem", "se", "classifier"})

    def __init__(self, cfg: Mapping[str, Any]):
        self.cfg = dict(cfg)
        self.keep_static = tuple(self.cfg.get("keep_static") or ())

    def refuse(self, layer: LayerInfo) -> str | None:
        """Return why `layer` stays static, or None to convert it."""
        import fnmatch

        if layer.role in self.static_roles:
            return f"role '{layer.role}' is kept static by {self.name}"
        if any(fnmatch.fnmatchcase(layer.name, pattern) for pattern in self.keep_static):
            return "matched op.keep_static"
        if layer.is_linear and not self.supports_linear:
            return f"{self.name} converts convolutions only"
        if layer.is_conv and layer.module.padding_mode != "zeros":
            return f"padding_mode={layer.module.padding_mode!r} is not supported"
        if layer.is_conv and isinstance(layer.module.padding, str):
            return f"padding={layer.module.padding!r} is not supported"
        return None

    def prepare(self, backbone: nn.Module, layers: list[LayerInfo]) -> None:
        """Called once with every layer before any is converted (cross-layer plans: shared warehouses)."""

    def build(self, layer: LayerInfo) -> nn.Module:
        raise NotImplementedError

    def finalize(self, model: nn.Module, decisions: list[Decision]) -> None:
        """Cross-layer work after every layer is built (shared routing, shared warehouses)."""

    def describe(self) -> str:
        knobs = {k: v for k, v in self.cfg.items() if k not in ("name", "keep_static")}
        return f"{self.name}({', '.join(f'{k}={v}' for k, v in knobs.items())})"


OPERATORS: Registry[type[Operator]] = Registry("operator", "op.name")


def _require_number(cfg: Mapping[str, Any], key: str, op_name: str, minimum: float, inclusive: bool) -> float:
    import math

    value = cfg.get(key)
    ok = (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
          and (value >= minimum if inclusive else value > minimum))
    if not ok:
        allowed = f"numbers {'>=' if inclusive else '>'} {minimum:g}"
        raise OperatorConfigError(f"op.{key}={value!r} is invalid for op={op_name}: allowed values are {allowed}")
    return float(value)


def require_positive_number(cfg: Mapping[str, Any], key: str, op_name: str) -> float:
    """A finite number > 0 (ints accepted, bools not); OperatorConfigError naming op.<key> otherwise."""
    return _require_number(cfg, key, op_name, 0, inclusive=False)


def require_non_negative_number(cfg: Mapping[str, Any], key: str, op_name: str) -> float:
    return _require_number(cfg, key, op_name, 0, inclusive=True)


def require_positive_int(cfg: Mapping[str, Any], key: str, op_name: str) -> int:
    value = cfg.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise OperatorConfigError(f"op.{key}={value!r} is invalid for op={op_name}: allowed values are integers >= 1")
    return value
