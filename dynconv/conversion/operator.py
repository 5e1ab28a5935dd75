"""The contract every operator fulfils, and the registry that finds an operator by its `op=` name.

The conversion pass asks the configured `Operator` whether it takes each layer (`refuse`), lets it plan across
layers first (`prepare`), builds the replacements (`build`) and lets it link layers afterwards (`finalize`).
An operator may refuse a layer with a reason; refused layers stay static and the reason is reported.

3-D convolutions (video backbones such as R3D) reach only the operators that set `supports_conv3d`: those whose
layer code does not depend on the number of kernel dimensions (Weight Excitation and the weight reparameterisations
keep the layer and change its weight; "Avg" over t x h x w, WE Sec. 3.2). Every other operator builds 2-D layers
(kernel banks of (kh, kw) kernels, 2-D per-sample convolutions) and gets a 3-D convolution refused before it plans
or builds anything (`unsupported`), so it never sees one.
"""

from __future__ import annotations

import fnmatch
from typing import Any, Mapping

import torch.nn as nn

from dynconv.conversion.layer import Decision, LayerInfo
from dynconv.knobs import Knobs
from dynconv.registry import Registry


class OperatorConfigError(ValueError):
    """An operator knob that does not fit a layer; names the layer, its shape and the allowed values."""


class Operator:
    """Base class: turns eligible layers into one kind of (dynamic) layer.

    Subclasses set `name`, read their knobs from the `op` config in `__init__` through `self.knobs` (which
    validates them and names op.<key> in its errors), and implement `build`. The default eligibility keeps the stem, SE branches and the classifier static and
    takes every other convolution; `supports_linear` operators may also take `nn.Linear` layers.
    """

    name = "base"
    supports_linear = False
    supports_conv3d = False  # whether build() can take an nn.Conv3d (a dimension-generic layer); see the module doc
    # Roles kept static unless an operator says otherwise (the papers keep the stem static; the
    # classifier and the backbone's own SE branches are not what a dynamic convolution replaces).
    static_roles: frozenset[str] = frozenset({"stem", "se", "classifier"})

    def __init__(self, cfg: Mapping[str, Any]):
        self.cfg = dict(cfg)
        self.keep_static = tuple(self.cfg.get("keep_static") or ())
        self.knobs = Knobs(self.cfg, "op", owner=f"op={self.name}", error=OperatorConfigError)

    def unsupported(self, layer: LayerInfo) -> str | None:
        """Why this operator cannot act on `layer` at all, whatever its place: a 3-D convolution, for an operator
        whose layers are 2-D. The conversion pass asks this first and leaves such layers out of `prepare`."""
        if layer.is_conv3d and not self.supports_conv3d:
            takers = ", ".join(name for name, cls in OPERATORS.items() if cls.supports_conv3d and name != "static")
            return (f"{self.name} builds 2-D layers ((kh, kw) kernels, a 2-D per-sample convolution): this Conv3d "
                    f"stays static (operators that act on Conv3d: {takers})")
        return None

    def refuse(self, layer: LayerInfo) -> str | None:
        """Return why `layer` stays static, or None to convert it."""
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
