"""Backbones register themselves in BACKBONES on import."""

from dynconv.backbones import cifar, dynet, shufflenet, timm_backbones  # noqa: F401  (registration)
from dynconv.backbones.backbone import BACKBONES, Backbone, Place, PlaceRule

__all__ = ["BACKBONES", "Backbone", "Place", "PlaceRule"]
