"""A summary of a block's (or stage's) input, computed once per forward and read by several dynamic layers.

Some operators condition every layer of a block on the *block's* input rather than on each layer's own
input: timm's EfficientNet-CondConv computes one routing vector per block and shares it with the block's
convolutions; WeightNet's release computes one GAP + reduction per block ("block-wise GAP", WeightNet
Table 10), or one per stage. The backbone's own block code cannot be edited (it is timm's/torchvision's), so
a `SharedInput` is attached to the block module with a forward pre-hook: when the block runs, the hook
computes `summary(GAP(x))` from the block's input; the layers inside read it with `read()`; a forward hook
drops the tensor when the block returns (it holds an autograd graph, and a module holding a non-leaf tensor
cannot be deep-copied, which EMA does).

The modules live in the backbone (`Backbone.shared_inputs`, a ModuleDict), so their parameters are counted,
saved, moved and synchronised like any other; a layer keeps a plain (unregistered) reference to its
`SharedInput`, which `copy.deepcopy` maps consistently (the hooks are bound methods, copied the same way).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from dynconv.conversion.operator import Decision, LayerInfo


class SharedInput(nn.Module):
    """`summary(GAP(x))` of the input x of the module it is attached to, for the layers inside that module."""

    def __init__(self, summary: nn.Module, source: str):
        super().__init__()
        self.summary = summary
        self.source = source  # qualified name of the module whose input is summarised (for messages)
        self._value: torch.Tensor | None = None

    def attach(self, first: nn.Module, last: nn.Module) -> None:
        """Capture at the input of `first`, release when `last` returns (the same module for a block; a
        stage's first and last blocks for a stage)."""
        first.register_forward_pre_hook(self._capture)
        last.register_forward_hook(self._release)

    def _capture(self, module: nn.Module, args) -> None:
        self._value = self.summary(args[0].mean(dim=(2, 3)))

    def _release(self, module: nn.Module, args, output) -> None:
        self._value = None

    def read(self) -> torch.Tensor:
        if self._value is None:
            raise RuntimeError(
                f"the shared input summary of '{self.source}' was read outside that module's forward: a layer "
                "converted with block- or stage-level sharing must run inside its block"
            )
        return self._value

    def extra_repr(self) -> str:
        return f"source={self.source!r}"


def link_shared(layer_module: nn.Module, shared: SharedInput) -> None:
    """Give a dynamic layer a reference to its SharedInput without registering it as a submodule (it is
    registered once, in the backbone; registering it in every layer would duplicate its state_dict keys)."""
    layer_module.__dict__["shared_input"] = shared


def attach_shared_inputs(
    backbone: nn.Module,
    decisions: list[Decision],
    scope: str,
    make_summary: Callable[[str, int], nn.Module],
) -> dict[str, SharedInput]:
    """One SharedInput per block (scope "block") or per stage (scope "stage") of the converted layers.

    The summarised module is the block itself, or, for a stage, the stage's first block (its input is the
    stage's input; the summary lives until the stage's last block returns). `make_summary(source_name, in_channels)` builds the summary network; the block's input
    channels are those of its first convertible layer (in forward order), which reads the block's input.
    Returns {layer name: SharedInput} for the converted layers that belong to a block; layers outside any
    block (a head, a stage's downsampling layer) are left out, and the operator conditions them per layer.
    """
    if scope not in ("block", "stage"):
        raise ValueError(f"scope must be 'block' or 'stage', got {scope!r}")
    net = backbone.net
    converted = [d.layer for d in decisions if d.converted]
    first_layer_of_block: dict[str, LayerInfo] = {}
    first_block_of_stage: dict[int, str] = {}
    last_block_of_stage: dict[int, str] = {}
    for decision in decisions:  # all layers: a block's first layer may itself stay static
        layer = decision.layer
        if layer.block is None:
            continue
        first_layer_of_block.setdefault(layer.block, layer)
        first_block_of_stage.setdefault(layer.stage, layer.block)
        last_block_of_stage[layer.stage] = layer.block
    by_source: dict[str, SharedInput] = {}
    links: dict[str, SharedInput] = {}
    for layer in converted:
        if layer.block is None:  # stem/head/stage downsampling layers: the operator keeps them per layer
            continue
        source = layer.block if scope == "block" else first_block_of_stage[layer.stage]
        if source not in by_source:
            channels = first_layer_of_block[source].in_channels
            shared = SharedInput(make_summary(source, channels), source)
            last = source if scope == "block" else last_block_of_stage[layer.stage]
            shared.attach(net.get_submodule(source), net.get_submodule(last))
            backbone.shared_inputs[source.replace(".", "__")] = shared
            by_source[source] = shared
        links[layer.name] = by_source[source]
    return links
