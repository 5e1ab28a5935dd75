"""Backbones register themselves in BACKBONES on import; every module here is imported, so a new backbone is
one new file (and a configs/backbone/<name>.yaml)."""

from dynconv.backbones.backbone import BACKBONES, FAMILY_RULES, Backbone, Place, PlaceRule
from dynconv.registry import import_submodules

import_submodules(__name__)

__all__ = ["BACKBONES", "FAMILY_RULES", "Backbone", "Place", "PlaceRule"]
