"""The one install path every feature-attention add-on goes through: read knobs, find sites, build, install.

Everything that can fail (a bad knob, a backbone without sites) fails before the first module is installed,
so an error never leaves a half-edited backbone. The installed layers sit under the backbone's `se` slots or
under an `attn` child, which the placement rules (dynconv/backbones/*) describe with role "se": every
operator keeps them static, and `describe_layers` still describes every Conv2d/Linear.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch.nn as nn

from dynconv.attention.errors import AttentionConfigError
from dynconv.attention.sites import Site, find_sites
from dynconv.backbones import Backbone
from dynconv.knobs import Knobs


@dataclass(frozen=True)
class AddOn:
    """What differs between add-ons: their knobs, where they go ("blocks" / "stages"), the module per site."""

    name: str
    knobs: tuple[str, ...]
    read: Callable[[Knobs], dict[str, Any]]  # validated knob values (Knobs raises AttentionConfigError)
    kind: str
    make: Callable[[Site, dict[str, Any]], nn.Module]

    def check(self, cfg: Mapping[str, Any]) -> dict[str, Any]:
        """Validate the `attn` config without touching any backbone (what config validation can call)."""
        knobs = Knobs(cfg, "attn", owner=f"attn={self.name}", error=AttentionConfigError)
        knobs.reject_unknown(self.knobs)
        return self.read(knobs)

    def __call__(self, backbone: Backbone, cfg: Mapping[str, Any]) -> str:
        knobs = self.check(cfg)
        sites = find_sites(backbone, self.kind, self.name)
        todo = [site for site in sites if not site.own_se]
        reference = next(backbone.parameters())
        modules = [self.make(site, knobs).to(device=reference.device, dtype=reference.dtype) for site in todo]
        for site, module in zip(todo, modules):
            site.install(module)
        settings = ", ".join(f"{key}={value}" for key, value in knobs.items())
        where = f"on {len(todo)} blocks" if self.kind == "blocks" else f"after {', '.join(s.name for s in todo)}"
        kept = len(sites) - len(todo)
        return f"attn {self.name}({settings}) {where}" + (f" ({kept} blocks keep their own SE)" if kept else "")
