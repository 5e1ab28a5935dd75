"""`backbone=timm backbone.model=<name>`: any timm model, placed generically (`generic.py`).

The registered timm backbones (`timm_backbones.py`) carry hand-written placement rules per family and the papers'
knobs; this one takes whatever timm builds under `backbone.model` (EfficientNet, RegNet, MobileOne, GhostNet, ...)
and places its layers from timm's own description of it. A missing or unknown name is a ConfigError naming
`backbone.model` before anything is built, with timm's close names for a typo.
"""

from __future__ import annotations

import difflib

import timm

from dynconv.backbones.backbone import BACKBONES
from dynconv.backbones.generic import GenericBackbone, generic_backbone
from dynconv.config import ConfigError

# Backbones that build whatever network `backbone.model` names: they cannot be built from their name alone (tests
# and tools that build every registered backbone give them a model or leave them out).
BY_MODEL_NAME = frozenset({"timm"})


def timm_model_name(model) -> str:
    """`model` when timm knows it (a pretrained tag such as `resnet18.a1_in1k` included), else a ConfigError naming
    backbone.model, with timm's closest names."""
    if model is None or model == "???" or (isinstance(model, str) and not model.strip()):
        raise ConfigError("backbone.model is required but not set: pass backbone.model=<a timm model name> with "
                          "backbone=timm (e.g. efficientnet_b0, regnetx_002, mobileone_s0; timm.list_models() lists "
                          "them all)")
    if not isinstance(model, str) or not timm.is_model(model):
        close = difflib.get_close_matches(str(model), timm.list_models(), n=5, cutoff=0.6)
        hint = f"close names: {', '.join(close)}" if close else "timm.list_models() lists them"
        raise ConfigError(f"backbone.model={model!r} is invalid; allowed values: a timm model name ({hint})")
    return model


@BACKBONES.register("timm")
def build_any_timm(num_classes: int = 1000, image_size: int = 224, drop_rate=None, drop_path_rate=None,
                   model: str | None = None) -> GenericBackbone:
    """timm.create_model(backbone.model) with `num_classes` outputs, its layers placed generically. Dropout and drop
    path are passed only when set (non-zero): not every timm network takes them."""
    name = timm_model_name(model)
    regularisation = {key: value for key, value in (("drop_rate", drop_rate), ("drop_path_rate", drop_path_rate))
                      if value}
    try:
        net = timm.create_model(name, pretrained=False, num_classes=num_classes, **regularisation)
    except TypeError as error:
        keys = ", ".join(f"backbone.{key}" for key in regularisation) or "its arguments"
        raise ConfigError(f"backbone.model={name}: timm's {name} does not take {keys} ({error}); set them to 0 "
                          "for this network") from None
    return generic_backbone(net, f"timm:{name}", side=int(image_size))
