"""Feature-attention add-ons (`attn` config group), composable with any operator.

`attn=none` is the only entry so far; SE, ECA, CBAM and BAM register here with the operators issue.
An add-on is a function that edits a converted Backbone in place and returns a one-line summary.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

from dynconv.backbones import Backbone
from dynconv.registry import Registry

ATTENTIONS: Registry[Callable[[Backbone, Mapping[str, Any]], str]] = Registry("attention add-on", "attn.name")


@ATTENTIONS.register("none")
def no_attention(backbone: Backbone, cfg: Mapping[str, Any]) -> str:
    return "no feature attention"
