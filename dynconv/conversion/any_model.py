"""`dynconv.convert(model, op=..., **knobs)`: turn the layers of a network dynconv did not build (any timm model,
a torchvision classifier) into an operator's layers, in place, through the one conversion pass.

    model = timm.create_model("efficientnet_b0", num_classes=10)
    dynconv.convert(model, op="odconv", kernels=4)       # the same model object, its layers ODConv layers
    print(model.dynconv_conversion)                      # converted n of m layers; the static ones and why

The layers are placed generically (`dynconv.backbones.generic`), the knobs are the operator's YAML file's
(`configs/op/<op>.yaml`, validated as the configs are), and the pass is `dynconv.conversion.convert`, the one
`train.py` runs. The model keeps its class and its forward. Modules an operator shares between layers (block
routing and block-wise GAP: `shared_inputs`; KernelWarehouse's `warehouses`) are registered in the model under
`dynconv_shared`, so they are saved in its state_dict, moved by `.to()` and optimised with `model.parameters()`;
an operator that shares nothing leaves the model's state_dict keys those of the converted layers only.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from dynconv.conversion.layer import Decision

SHARED_NAME = "dynconv_shared"  # the child of the model that holds the operator's shared modules


@dataclass(frozen=True)
class LayerDecision:
    """What the conversion decided for one layer: its place and whether it was converted (else why not)."""

    name: str
    shape: str  # the original layer, e.g. "Conv2d(16->32, k=3x3, s=1, g=1)"
    role: str
    stage: int
    block: str | None
    converted: bool
    reason: str  # why it stayed static ("" when converted)


@dataclass(frozen=True)
class Conversion:
    """The decisions of one `convert` call, kept on the model as `model.dynconv_conversion` (plain strings: a
    deep copy, EMA's, copies no layer)."""

    op: str  # the operator and its knobs, e.g. "odconv(kernels=4, reduction=0.0625, ...)"
    layers: tuple[LayerDecision, ...]

    @property
    def converted(self) -> list[str]:
        """The names of the converted layers."""
        return [layer.name for layer in self.layers if layer.converted]

    @property
    def static(self) -> dict[str, str]:
        """{name: reason} of the layers left static."""
        return {layer.name: layer.reason for layer in self.layers if not layer.converted}

    def summary(self) -> str:
        """How many layers were converted, and why the others were not (`convert.summarize`'s account)."""
        lines = [f"{self.op}: converted {len(self.converted)} of {len(self.layers)} conv/linear layers"]
        reasons = Counter(layer.reason for layer in self.layers if not layer.converted)
        for reason, count in reasons.most_common():
            names = [layer.name for layer in self.layers if not layer.converted and layer.reason == reason]
            shown = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
            lines.append(f"  static ({count}): {reason} [{shown}]")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


class SharedModules(nn.Module):
    """The modules an operator shares between layers, registered once in the converted model."""

    def __init__(self, shared_inputs: nn.ModuleDict, warehouses: nn.ModuleDict):
        super().__init__()
        self.shared_inputs = shared_inputs
        self.warehouses = warehouses


def _record(decision: Decision) -> LayerDecision:
    layer = decision.layer
    return LayerDecision(layer.name, layer.shape_str(), layer.role, layer.stage, layer.block, decision.converted,
                         decision.reason)


def _device_and_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    floating = [p for p in model.parameters() if p.is_floating_point()]
    if not floating:
        return torch.device("cpu"), torch.get_default_dtype()
    return floating[0].device, floating[0].dtype


def convert_model(model: nn.Module, op: str = "static", *, image_size: int | None = None, verbose: bool = False,
                  **knobs: Any) -> nn.Module:
    """Convert, in place, the layers of `model` that operator `op` accepts; return `model`.

    `knobs` are the operator's (`configs/op/<op>.yaml`: `kernels=4`, `experts=8`, `keep_static=["head.*"]`); a
    wrong one is a ConfigError naming the key and the allowed values. `image_size`: the input side the model
    takes when it does not take 128 x 128 (a ViT's fixed size), for the one probe forward that places its layers.
    The decisions are kept as `model.dynconv_conversion` (`Conversion`: `converted`, `static`, `summary()`);
    `verbose=True` prints the summary. The new layers are created on the model's device and in its dtype.

    Operator schedules (temperatures) are driven by `dynconv.set_training_progress(model, epoch)` each step when
    you train the model yourself (train.py does it for you)."""
    from dynconv.backbones import Backbone
    from dynconv.backbones.generic import generic_backbone
    from dynconv.build import make_operator
    from dynconv.config import ConfigError
    from dynconv.conversion.convert import convert
    from dynconv.conversion.op_config import op_config
    from dynconv.conversion.operator import OperatorConfigError

    if not isinstance(model, nn.Module):
        raise TypeError(f"dynconv.convert takes an nn.Module, got {type(model).__name__}")
    if getattr(model, "dynconv_conversion", None) is not None:
        raise ValueError(f"this {type(model).__name__} was converted already ({model.dynconv_conversion.op}); "
                         "convert a fresh model")
    if isinstance(model, Backbone):
        raise ValueError("this model was built by dynconv: build it with its operator instead "
                         "(dynconv.create_model(name, op=..., ...))")
    operator = make_operator(op_config(op, **knobs))
    device, dtype = _device_and_dtype(model)
    backbone = generic_backbone(model, side=image_size)
    try:
        with torch.device(device):
            decisions = convert(backbone, operator)
    except OperatorConfigError as error:  # a knob that does not fit a layer (WeightNet's G): named with the layer
        raise ConfigError(str(error)) from None
    if len(backbone.shared_inputs) or len(backbone.warehouses):
        if isinstance(model, (nn.Sequential, nn.ModuleList, nn.ModuleDict)):
            raise TypeError(f"op={op} shares modules between layers, which must be registered in the model, and a "
                            f"top-level {type(model).__name__} would run them as layers: wrap it in an nn.Module")
        model.add_module(SHARED_NAME, SharedModules(backbone.shared_inputs, backbone.warehouses))
    if dtype != torch.get_default_dtype():
        model.to(dtype)
    model.dynconv_conversion = Conversion(operator.describe(), tuple(_record(d) for d in decisions))
    if verbose:
        print(model.dynconv_conversion.summary())
    return model
