"""Start a dynamic model from a trained static one: `init_from_static(model, static)` (train.py: init_from_static=).

`static` is the static network's state dict, or a file holding one: timm's or torchvision's ImageNet weights
(`torch.save(timm.create_model("resnet50", pretrained=True).state_dict(), path)`, a `.safetensors` file from the
Hugging Face hub), a dynconv `op=static` checkpoint (best.pt / last.pt), or `timm:<name>` (timm downloads the weights
of its model `<name>`: resnet50.tv_in1k, say; the network must be the backbone's timm definition).

Every converted layer starts from the static kernel it replaced by its operator's rule (`static_rules.py`, which
says which operators then compute the static network's function exactly and why); every other key (stem, norms,
shortcuts the operator kept static, classifier) is copied as it is. The classifier is skipped when its shape
differs (another class count). A static key that fits nowhere, or a key of the model that neither a rule nor the
static state dict provides, is an error naming it: a silent partial load would train from somewhere else.
torchvision's MobileNetV2 names (features.*) are mapped to timm's (`module_names.py`); other torchvision
networks whose names differ from timm's are refused by that rule.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from dynconv.pretrained.foreign_checkpoints import read_checkpoint_file, state_dict_of
from dynconv.pretrained.module_names import mobilenetv2_to_timm
from dynconv.pretrained.static_rules import SUPPORTED_OPS, LayerStart, rule_for, static_kernel_shape

TIMM_PREFIX = "timm:"
SHOWN = 6


@dataclass
class StaticInitReport:
    """What `init_from_static` did: per converted layer how it started, and the keys it copied or left alone."""

    layers: dict[str, LayerStart] = field(default_factory=dict)  # converted layer (name in `net`) -> its start
    copied: list[str] = field(default_factory=list)  # model keys copied from the static state dict as they were
    skipped: list[str] = field(default_factory=list)  # static keys not used (a classifier of another class count)
    dynamic: list[str] = field(default_factory=list)  # keys of the converted layers, shared modules and add-ons:
    # set by the layers' rules (kernels, cells) or left at their initialisation (attention, routing, SE add-ons)

    @property
    def exact(self) -> bool:
        """Whether the model computes the static network's function (every layer's rule exact, classifier kept)."""
        return all(start.exact for start in self.layers.values()) and not self.skipped

    def summary(self) -> str:
        inexact = {name: start.how for name, start in self.layers.items() if not start.exact}
        lines = [f"{len(self.layers)} dynamic layers started from the static kernels "
                 f"({len(self.layers) - len(inexact)} exactly), {len(self.copied)} keys copied"]
        if self.skipped:
            lines.append(f"  skipped (another shape): {', '.join(self.skipped[:SHOWN])}")
        for name, how in list(inexact.items())[:SHOWN]:
            lines.append(f"  not exact: {name}: {how}")
        return "\n".join(lines)


def read_static(source: str | Path | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The static state dict from a mapping, a file (any wrapping: `foreign_checkpoints.state_dict_of`) or
    `timm:<name>`."""
    if isinstance(source, Mapping):
        return state_dict_of(source, "model", "the static state dict")
    text = str(source)
    if text.startswith(TIMM_PREFIX):
        import timm

        model = timm.create_model(text.removeprefix(TIMM_PREFIX), pretrained=True)
        return dict(model.state_dict())
    return state_dict_of(read_checkpoint_file(text), "model", text)


def _timm_names(static: Mapping[str, torch.Tensor], family: str) -> dict[str, torch.Tensor]:
    """Keys relative to the backbone's timm network: a dynconv checkpoint's `net.` removed, torchvision's
    MobileNetV2 renamed."""
    if any(key.startswith("net.") for key in static):
        static = {key.removeprefix("net."): value for key, value in static.items()}
    if family == "mobilenetv2" and any(key.startswith("features.") for key in static):
        static = {mobilenetv2_to_timm(key) or key: value for key, value in static.items()}
    return dict(static)


@dataclass(frozen=True)
class _Target:
    """Where the static network sits inside the model: a dynconv backbone keeps it as `net` (keys "net.<name>"),
    a model converted by `dynconv.convert` is the network itself (keys "<name>", shared modules under
    `dynconv_shared`)."""

    net: nn.Module
    prefix: str  # of the network's keys in the model's state dict
    family: str
    name: str
    classifier: tuple[str, ...]  # state-dict prefixes of the classifier, converted or not
    shared: tuple[str, ...]  # state-dict prefixes of modules an operator shares between layers


def _target(model: nn.Module) -> _Target:
    conversion = getattr(model, "dynconv_conversion", None)
    if hasattr(model, "net") and hasattr(model, "family"):
        from dynconv.build import _classifier_prefixes

        return _Target(model.net, "net.", model.family, model.name, tuple(_classifier_prefixes(model)),
                       ("shared_inputs.", "warehouses."))
    if conversion is not None:
        from dynconv.conversion.any_model import SHARED_NAME

        classifier = tuple(f"{layer.name}." for layer in conversion.layers if layer.role == "classifier")
        return _Target(model, "", "generic", type(model).__name__, classifier, (f"{SHARED_NAME}.",))
    raise TypeError(f"init_from_static takes a dynconv backbone (dynconv.create_model) or a model converted by "
                    f"dynconv.convert, not a plain {type(model).__name__}")


def _dynamic_keys(static: Mapping[str, torch.Tensor]) -> list[str]:
    return [key for key in static if ".attention." in key or key.startswith(("warehouses.", "shared_inputs."))
            or ".parametrizations." in key]


def init_from_static(model: nn.Module, static: str | Path | Mapping[str, torch.Tensor], *, spread: float = 0.1
                     ) -> StaticInitReport:
    """Load a static network's weights into `model`, a dynconv backbone (`dynconv.create_model`, `build_backbone`)
    of the same architecture whose layers an operator converted; returns what was done (`StaticInitReport`).

    `spread`: the size of the zero-sum perturbation that keeps CondConv's experts and WeightNet's inputs apart
    (a fraction of their own initial values; the output stays exact for any value, `static_rules.py`)."""
    target = _target(model)
    static = _timm_names(read_static(static), target.family)
    dynamic = _dynamic_keys(static)
    if dynamic:
        raise ValueError(f"init_from_static takes a static network's weights, and these hold a dynamic operator's "
                         f"({', '.join(dynamic[:3])}, ...): use init_from=<checkpoint> for a checkpoint of the same op")
    report = StaticInitReport()
    starts, owned = _plan_layers(target, static, report)
    used = {key for name in owned for key in (f"{name}.weight", f"{name}.bias") if key in static}
    update = _copy_the_rest(model, target, static, used, tuple(f"{target.prefix}{name}." for name in owned), report)
    # Everything fits (the checks above raise before any weight changes): now change them.
    for name, (module, rule, weight, bias) in starts.items():
        dtype = next(module.parameters()).dtype
        report.layers[name] = rule(module, name, weight.to(dtype), None if bias is None else bias.to(dtype), spread)
    model.load_state_dict(update, strict=False)
    report.copied = sorted(update)
    return report


def _plan_layers(target: _Target, static, report):
    """The converted layers (name -> (module, rule, static weight, static bias)) and every module whose keys are not
    the static network's (converted layers, attn= add-ons); ValueError for a layer without a rule or a kernel."""
    starts, owned, unsupported = {}, [], []
    for name, module in target.net.named_modules():
        if not name or any(name.startswith(f"{other}.") for other in owned):
            continue
        rule = rule_for(module)
        if rule is None:
            origin = type(module).__module__
            if origin.startswith("dynconv.attention"):
                owned.append(name)  # an attn= add-on: not part of the static network, left at its initialisation
            elif origin.startswith("dynconv.ops") or parametrize.is_parametrized(module):
                unsupported.append(f"{name} ({type(module).__name__})")
            continue
        owned.append(name)
        weight, bias = static.get(f"{name}.weight"), static.get(f"{name}.bias")
        if weight is None:
            raise ValueError(f"init_from_static: the static weights have no {name}.weight for the dynamic layer "
                             f"{name} (are they the weights of this network, {target.name}?)")
        expected = static_kernel_shape(module)
        if tuple(weight.shape) == expected:
            starts[name] = (module, rule, weight, bias)
        elif f"{target.prefix}{name}.".startswith(target.classifier):  # a classifier of another class count
            report.skipped.extend(key for key in (f"{name}.weight", f"{name}.bias") if key in static)
        else:
            raise ValueError(f"init_from_static: {name}: the static kernel is {tuple(weight.shape)}, the layer's "
                             f"{expected}")
    if unsupported:
        raise ValueError(f"init_from_static has no rule for {', '.join(unsupported[:3])}: the operators it starts "
                         f"from static weights are {', '.join(SUPPORTED_OPS)}")
    return starts, owned


def _copy_the_rest(model, target: _Target, static, used, owned, report) -> dict[str, torch.Tensor]:
    """The model's keys outside the converted layers, from the static state dict as they are (see the module doc);
    ValueError naming the keys that are missing, of another shape, or left over."""
    update, missing, shapes = {}, [], []
    for key, value in model.state_dict().items():
        if key.startswith(owned) or key.startswith(target.shared) or not key.startswith(target.prefix):
            report.dynamic.append(key)  # a converted layer's, an add-on's, or shared between layers
            continue
        name = key.removeprefix(target.prefix)
        source = static.get(name)
        if source is None:
            missing.append(name)
        elif source.shape != value.shape:
            if not key.startswith(target.classifier):
                shapes.append(f"{name}: {tuple(source.shape)} vs {tuple(value.shape)}")
                continue
            report.skipped.append(name)  # another class count: the classifier keeps its initialisation
            used.add(name)
        else:
            update[key] = source.to(value.dtype)
            used.add(name)
    unexpected = [key for key in static if key not in used]
    problems = []
    for label, items in (("missing from the static weights", missing), ("of another shape", shapes),
                         ("in the static weights but not in the model", unexpected)):
        if items:
            shown = ", ".join(items[:SHOWN]) + (", ..." if len(items) > SHOWN else "")
            problems.append(f"{len(items)} keys {label} ({shown})")
    if problems:
        raise ValueError(f"init_from_static: the static weights do not fit {target.name}: "
                         f"{'; '.join(problems)}")
    return update
