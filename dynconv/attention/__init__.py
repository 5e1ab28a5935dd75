"""Feature-attention add-ons (`attn` config group), composable with any operator.

`attn=none | se | eca | cbam | bam`. An add-on is a callable (backbone, attn_cfg) -> one-line summary that edits
a converted Backbone in place (dynconv.build adds it after the operator converted the layers): SE, ECA and
CBAM go into every block, BAM at the end of the stride-4/8/16 stages (sites.py says where, per family).
`check_attention` validates an `attn` config against a backbone name without building anything real.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

from dynconv.backbones import Backbone
from dynconv.registry import Registry

ATTENTIONS: Registry[Callable[[Backbone, Mapping[str, Any]], str]] = Registry("attention add-on", "attn.name")


@ATTENTIONS.register("none")
def no_attention(backbone: Backbone, cfg: Mapping[str, Any]) -> str:
    return "no feature attention"


def check_attention(attn_cfg: Mapping[str, Any], backbone_name: str) -> None:
    """Raise AttentionConfigError for a bad `attn.*` knob or a backbone the add-on has no place in.

    Cheap enough for config validation (before a run writes anything): the backbone is built on the meta
    device, which allocates no memory and runs no initialisation.
    """
    import torch

    from dynconv.attention.addon import AddOn
    from dynconv.attention.sites import find_sites
    from dynconv.backbones import BACKBONES

    addon = ATTENTIONS.get(attn_cfg["name"])
    if not isinstance(addon, AddOn):
        return
    addon.check(attn_cfg)
    with torch.device("meta"):
        backbone = BACKBONES.get(backbone_name)(num_classes=10, image_size=32)
    find_sites(backbone, addon.kind, addon.name)


# The add-on modules register themselves on import; they import ATTENTIONS, hence the import at the end: every
# module of this package is imported, so a new add-on is one new file.
from dynconv.attention.errors import AttentionConfigError  # noqa: E402
from dynconv.registry import import_submodules  # noqa: E402

import_submodules(__name__)

__all__ = ["ATTENTIONS", "AttentionConfigError", "check_attention", "no_attention"]
