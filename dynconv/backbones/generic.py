"""A `Backbone` around a network dynconv did not build: any timm model, torchvision's classification models.

Its layers are placed once, when it is wrapped (`generic_placement.place_layers`: timm's `feature_info` for the
stages, module types for the roles, the stem and classifier found generically), so the one conversion pass and
every operator work on it as on the registered families. Its family is `generic`: KernelWarehouse takes its
generic layout (one warehouse per stage for depth-wise layers, one for the rest), and the feature-attention
add-ons (`attn=`), whose sites are written per family, are refused.

Multi-scale features (`forward_features`, what detection and segmentation read) come from timm's
`forward_intermediates` at the last feature point of each reduction, as for the registered timm backbones; a
network without them (torchvision's) raises when they are asked for.
"""

from __future__ import annotations

import re

import torch
import torch.nn as nn

from dynconv.backbones.backbone import FAMILY_RULES, Backbone, Place, PlaceRule
from dynconv.backbones.generic_placement import PROBE_SIDES, ROLE_UNPLACED, FeaturePoint, place_layers

FAMILY = "generic"
FAMILY_RULES[FAMILY] = []  # placed per network (GenericBackbone.place), not by a family's name patterns


class GenericBackbone(Backbone):
    """A Backbone whose layer places were found from the network itself (`places`, {name: Place})."""

    def __init__(self, name: str, net: nn.Module, places: dict[str, Place], features, feature_channels: list[int],
                 feature_strides: list[int]):
        # The classifier as a rule too: what build.load_backbone_weights reads to skip a classifier of another size.
        classifier = [PlaceRule(re.escape(layer), "classifier", stage=place.stage)
                      for layer, place in places.items() if place.role == "classifier"]
        super().__init__(name, net, features, feature_channels, feature_strides, family=FAMILY, rules=classifier)
        self.places = places

    def place(self, name: str, module: nn.Module) -> Place:
        found = self.places.get(name)
        if found is not None:
            return found
        # A layer that was not in the network when it was placed (one inside an operator's layer after conversion).
        return Place(ROLE_UNPLACED, 0, None, "added to the network after its layers were placed")


def timm_feature_points(net: nn.Module) -> list[FeaturePoint]:
    """timm's feature points (module name, reduction); none for a network without `feature_info`."""
    info = getattr(net, "feature_info", None)
    if not isinstance(info, (list, tuple)):
        return []
    return [FeaturePoint(str(entry["module"]), int(entry["reduction"])) for entry in info
            if isinstance(entry, dict) and "module" in entry and "reduction" in entry]


def timm_classifier_layers(net: nn.Module) -> set[str] | None:
    """The qualified names of the layers inside timm's `get_classifier()` (empty for a model built without one,
    num_classes=0); None for a network without `get_classifier` (the placement then finds it generically)."""
    get = getattr(net, "get_classifier", None)
    if not callable(get):
        return None
    try:
        head = get()
    except Exception:  # a network whose get_classifier needs arguments or state: found generically instead
        return None
    if not isinstance(head, nn.Module):
        return None
    inside = {id(module) for module in head.modules()}
    return {name for name, module in net.named_modules()
            if id(module) in inside and isinstance(module, (nn.Conv2d, nn.Linear))}


def _timm_features(net: nn.Module, points: list[FeaturePoint]):
    """(features function, channels, strides) from `forward_intermediates`; an error function without it."""
    if not points or not callable(getattr(net, "forward_intermediates", None)):
        return None
    from dynconv.backbones.timm_backbones import _feature_indices

    try:
        indices = _feature_indices(net)
    except (KeyError, TypeError):
        return None
    info = net.feature_info

    def features(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
        return model.forward_intermediates(x, indices=indices, intermediates_only=True)

    return features, [info[i]["num_chs"] for i in indices], [info[i]["reduction"] for i in indices]


def _no_features(name: str, net: nn.Module):
    def features(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
        raise NotImplementedError(
            f"backbone {name}: {type(net).__name__} gives no multi-scale features (they come from timm's "
            "feature_info and forward_intermediates, which this network does not have): it converts and trains as "
            "a classifier only")
    return features


def generic_backbone(net: nn.Module, name: str | None = None, *, side: int | None = None) -> GenericBackbone:
    """Wrap `net` (any timm model, a torchvision classifier, ...) as a Backbone with every layer placed.

    The probe image is 128 x 128 where the network takes it, else `side` (the input side it is built for), the
    side timm states for it, or 224. The network is not changed (the probe runs in eval mode without gradients
    and restores the training flags)."""
    points = timm_feature_points(net)
    own = (getattr(net, "pretrained_cfg", None) or {}).get("input_size") or ()
    sides = (PROBE_SIDES[0], *([int(side)] if side else []), *([int(own[-1])] if len(own) == 3 else []),
             *PROBE_SIDES[1:])
    places = place_layers(net, points=points, classifier=timm_classifier_layers(net), sides=sides)
    label = name or type(net).__name__
    timm_features = _timm_features(net, points)
    if timm_features is None:
        return GenericBackbone(label, net, places, _no_features(label, net), [], [])
    features, channels, strides = timm_features
    return GenericBackbone(label, net, places, features, channels, strides)
