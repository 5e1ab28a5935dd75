"""Where each convertible layer of a network dynconv did not build sits: its role, stage and block, found from what
the network already says about itself instead of hand-written rules (`PlaceRule`s of a known family).

What it reads:

- **The module tree.** A layer's *block* is its shallowest ancestor that is neither a container (`nn.Sequential`,
  `nn.ModuleList`, `nn.ModuleDict` and their subclasses: a stage's list of blocks, torchvision's
  `Conv2dNormActivation`) nor a stage (a timm feature stage, below): timm's `layer2.0`, `blocks.3.1`, `s2.b1`,
  torchvision's `layer2.0`, `features.4`. A block counts when it holds two or more layers and its first layer reads
  the block's input (what block routing and block-wise GAP summarise), else its layers have no block.
- **Module types and names.** Roles by shape (`infer_role`: pointwise, depthwise, conv); convolutions inside a
  squeeze-excitation or attention-gate module (timm's `SqueezeExcite`, `SEModule`, torchvision's
  `SqueezeExcitation`, ...) are `se`, and so is any layer of a block that reads a pooled (1 x 1, or flattened)
  input; Linear layers inside an attention module are `attention`, inside an MLP `mlp`; shortcut projections
  (`downsample`, `shortcut`, `proj`, `transition`) and strided convolutions between blocks are `downsample`.
- **One probe forward** (`probe.py`): the order the layers run in, their shapes, which read the image.
- **timm's `feature_info`** (module names and reductions), where the network has one: the stages end where its
  feature maps are taken (consecutive maps of one reduction, as a ViT's blocks, form one stage). Otherwise
  (torchvision) the stages are the spatial strides of the layers' outputs, a block taking its deepest one.

The stem is what runs before the first block, reads the image, or sits in a module named `stem`; the classifier is
what the caller names (timm's `get_classifier()`), else the last layer the forward calls; the head is what runs
after the last feature stage or the last block (MobileNet's `conv_head`, a pre-logits Linear). Stages are
numbered 1.. in forward order; the stem is stage 0, the head and classifier one past the last stage.

A layer it cannot place keeps the role `unplaced` and the reason, and every operator leaves it static
(`dynconv.conversion.convert`): a layer the forward never calls, one it calls more than once (shared weights), or
a subclass of `nn.Conv2d` / `nn.Linear` with a forward of its own (timm's `Conv2dSame`, `StdConv2d`): replacing
it would drop what that forward adds.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch.nn as nn

from dynconv.backbones.backbone import Place, infer_role
from dynconv.backbones.probe import LayerCall, Trace, probe, probe_image

CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
# Module classes whose convolutions only compute a gate: squeeze-excitation and its relatives (timm, torchvision).
SE_CLASS = re.compile(r"^SE[A-Z]|^SE$|Squeeze|Excit|Eca|Cbam|GlobalContext|Gate|CoordAtt|Attn$|AttnGate")
ATTENTION_CLASS = re.compile(r"Attention|Attn")
MLP_CLASS = re.compile(r"Mlp|MLP|FeedForward|FFN")
DOWNSAMPLE_NAME = re.compile(r"downsample|shortcut|skip|proj|transition")
STEM_NAME = re.compile(r"stem")
# Probe sides, tried in order: 128 leaves a stride-32 map of 4 x 4 (a pooled 1 x 1 input stands out); networks
# with a fixed input size (a ViT's position embedding) take their own size, given by the caller.
PROBE_SIDES = (128, 224)
ROLE_UNPLACED = "unplaced"


@dataclass(frozen=True)
class FeaturePoint:
    """Where a network hands out a feature map: timm's `feature_info` entry (module name, reduction)."""

    module: str
    reduction: int


# Subclasses whose forward computes exactly their base class's (timm's Linear only adds a TorchScript cast).
SAME_FORWARD = {"timm.layers.linear.Linear"}


def _own_forward(module: nn.Module) -> str | None:
    """Why `module` cannot be replaced by an operator layer: a Conv2d / Linear subclass with its own forward."""
    kind = type(module)
    if f"{kind.__module__}.{kind.__qualname__}" in SAME_FORWARD:
        return None
    for base in (nn.Conv2d, nn.Conv3d, nn.Linear):
        if isinstance(module, base) and kind.forward is not base.forward:
            return (f"{type(module).__name__} has a forward of its own (not {base.__name__}'s): an operator layer "
                    "in its place would drop what that forward adds")
    return None


def _ancestors(name: str) -> list[str]:
    """Qualified names of every proper ancestor below the root, shallowest first."""
    parts = name.split(".")
    return [".".join(parts[:depth]) for depth in range(1, len(parts))]


class _Placement:
    """The placement of one network: built once, read as {layer name: Place}."""

    def __init__(self, net: nn.Module, points: list[FeaturePoint], classifier: set[str] | None,
                 sides: tuple[int, ...]):
        from dynconv.conversion.convert import CONVERTIBLE  # not at import: conversion imports the backbones

        self.net = net
        self.modules = dict(net.named_modules())
        self.layers = {name: m for name, m in self.modules.items() if name and isinstance(m, CONVERTIBLE)}
        self.points = [p for p in points if p.module in self.modules]
        reductions = [p.reduction for p in self.points]
        # A feature point is a stage unless its neighbours share its reduction (a ViT's blocks all give stride 16).
        self.stage_modules = {p.module for p in self.points if reductions.count(p.reduction) == 1}
        self.candidate = {name: self._candidate_block(name) for name in self.layers}
        # Every ancestor's input is watched: a block whose own input does not fit its first layer may hold a branch
        # whose input does (ShuffleNet's units split their channels and run a branch on half of them).
        watched = {a: self.modules[a] for name in self.layers for a in _ancestors(name)}
        watched.update({p.module: self.modules[p.module] for p in self.points})
        self.trace = self._probe(watched, sides)
        self.classifier = classifier if classifier is not None else self._last_called()
        self.places: dict[str, Place] = {}
        self._place()

    # ------------------------------------------------------------------------------------------- the pass

    def _probe(self, watched: dict[str, nn.Module], sides: tuple[int, ...]) -> Trace:
        errors = []
        for side in dict.fromkeys(sides):
            try:
                return probe(self.net, self.layers, watched, probe_image(self.net, side))
            except Exception as error:  # the next size may fit (a fixed-size ViT); all failing is reported
                errors.append(f"{side}x{side}: {(str(error).strip().splitlines() or [type(error).__name__])[0]}")
        raise ValueError(f"dynconv could not run {type(self.net).__name__} on a probe image (1, 3, S, S) to place its "
                         f"layers ({'; '.join(errors)}); pass the input side it takes (side=...)")

    def _candidate_block(self, name: str) -> str | None:
        for ancestor in _ancestors(name):
            module = self.modules[ancestor]
            if isinstance(module, CONTAINERS) or ancestor in self.stage_modules:
                continue
            return ancestor
        return None

    def _last_called(self) -> set[str]:
        """The last layer the forward calls, when it maps to one value per class (a headless network, timm's
        features_only, ends in a map: it has no classifier)."""
        called = self.trace.layers
        if not called:
            return set()
        last = max(called, key=lambda n: called[n].order)
        return {last} if _positions(called[last].output_shape) <= 1 else set()

    # ------------------------------------------------------------------------------------------ placement

    def _place(self) -> None:
        calls = self.trace.layers
        placeable = []
        for name, module in self.layers.items():
            reason = _own_forward(module)
            if reason is None and name not in calls:
                reason = (f"not called by {type(self.net).__name__}'s forward on a probe image: dynconv cannot tell "
                          "where it sits (a training-only branch, or a weight read by another module)")
            if reason is None and calls[name].calls > 1:
                reason = f"called {calls[name].calls} times in one forward (shared weights): left as it is"
            if reason is not None:
                self.places[name] = Place(ROLE_UNPLACED, 0, None, reason)
            else:
                placeable.append(name)
        structural, blocks = self._blocks(placeable)
        in_block = [calls[n].order for n in placeable if n in structural]
        stem = {n for n in placeable if self._is_stem(n, calls[n], min(in_block, default=None))}
        head_from = self._head_start()
        # Without timm's feature points, what runs after the last block and outside any is the head too
        # (torchvision's MobileNetV3 features.12, ShuffleNetV2's conv5).
        after_blocks = max(in_block, default=math.inf) if not self.points else math.inf
        head = {n for n in placeable if n not in stem and n not in self.classifier and n not in structural
                and (calls[n].order > head_from or calls[n].order > after_blocks)}
        edges = stem | head | self.classifier
        stages = self._stage_numbers([n for n in placeable if n not in edges], structural)
        last = max(stages.values(), default=0) + 1
        for name in placeable:
            if name in self.classifier:
                self.places[name] = Place("classifier", last, None)
            elif name in stem:
                self.places[name] = Place("stem", 0, None)
            elif name in head:
                self.places[name] = Place("head", last, None)
            else:
                self.places[name] = Place(self._role(name, calls[name], structural.get(name)), stages[name],
                                          blocks.get(name))

    def _blocks(self, placeable: list[str]) -> tuple[dict[str, str], dict[str, str]]:
        """({layer: block} of every block of two or more layers, the same for the blocks whose first layer reads
        the block's input): the first give the network's structure (stem, head, strides), the second the blocks
        that block routing and block-wise GAP may summarise (a DenseNet layer reads a list of maps, a ShuffleNet
        unit half its channels: no summary of their input fits their first layer)."""
        members: dict[str, list[str]] = {}
        for name in placeable:  # registration order, as the shared-input modules take a block's first layer
            block = self.candidate[name]
            if block is not None and name not in self.classifier:
                members.setdefault(block, []).append(name)
        structural, shared = {}, {}
        for block, names in members.items():
            if len(names) < 2:
                continue
            structural.update({name: block for name in names})
            if self._summarisable(block, names):
                shared.update({name: block for name in names})
                continue
            # A branch inside the block that reads an input of its own (the shallowest that fits).
            for name in names:
                inner = [a for a in _ancestors(name) if a.startswith(f"{block}.")]
                for branch in inner:
                    inside = [n for n in names if n.startswith(f"{branch}.")]
                    if len(inside) >= 2 and self._summarisable(branch, inside):
                        shared[name] = branch
                        break
        return structural, shared

    def _summarisable(self, block: str, names: list[str]) -> bool:
        """Whether the block's input is a (B, C, H, W) map whose channels its first layer reads."""
        shape = self.trace.module_inputs.get(block, ())
        first = self.layers[names[0]]
        channels = first.in_channels if isinstance(first, (nn.Conv2d, nn.Conv3d)) else first.in_features
        return len(shape) == 4 and shape[1] == channels

    def _is_stem(self, name: str, call: LayerCall, first_block_order: int | None) -> bool:
        if name in self.classifier:
            return False
        named_stem = any(STEM_NAME.search(part) for part in name.split("."))
        before_blocks = first_block_order is not None and call.order < first_block_order
        return call.reads_image or named_stem or before_blocks

    def _head_start(self) -> float:
        """The call order after which a layer is part of the head: the return of the last feature stage (timm), or
        else the last layer that reads more than one position (a map or tokens: VGG's and torchvision's ViT's
        classifier MLPs follow it)."""
        returns = [self.trace.module_returns[p.module] for p in self.points if p.module in self.trace.module_returns]
        if returns:
            return max(returns)
        positions = [c.order for c in self.trace.layers.values() if _positions(c.input_shape) > 1]
        return max(positions) if positions else math.inf

    def _role(self, name: str, call: LayerCall, block: str | None) -> str:
        module = self.layers[name]
        classes = [type(self.modules[a]).__name__ for a in _ancestors(name)]
        is_conv = isinstance(module, (nn.Conv2d, nn.Conv3d))
        pooled = (is_conv and len(call.input_shape) == 4 and math.prod(call.input_shape[2:]) == 1) or \
                 (not is_conv and len(call.input_shape) == 2 and block is not None)
        if pooled or (is_conv and any(SE_CLASS.search(c) for c in classes)):
            return "se"
        if not is_conv:
            if len(call.input_shape) == 4:  # a Linear on a channels-last map (ConvNeXt's MLP): a 1x1 convolution
                return "pointwise"
            if any(ATTENTION_CLASS.search(c) for c in classes):
                return "attention"
            return "mlp" if any(MLP_CLASS.search(c) for c in classes) else "pointwise"
        if any(DOWNSAMPLE_NAME.search(part) for part in name.split(".")):
            return "downsample"
        if block is None and max(module.stride) > 1:
            return "downsample"
        return infer_role(module)

    # ---------------------------------------------------------------------------------------------- stages

    def _stage_numbers(self, names: list[str], blocks: dict[str, str]) -> dict[str, int]:
        """{layer: stage 1..} for the layers between the stem and the head."""
        keys = self._feature_keys(names) if self.trace.module_returns and self.points else None
        if keys is None:
            keys = self._stride_keys(names, blocks)
        ordered = sorted(set(keys.values()))
        return {name: ordered.index(keys[name]) + 1 for name in names}

    def _feature_keys(self, names: list[str]) -> dict[str, int] | None:
        """The feature stage each layer runs in: the first stage (consecutive feature points of one reduction
        merged) that returns after it."""
        ends: list[tuple[int, int]] = []  # (return order, reduction)
        for point in sorted((p for p in self.points if p.module in self.trace.module_returns),
                            key=lambda p: self.trace.module_returns[p.module]):
            order = self.trace.module_returns[point.module]
            if ends and ends[-1][1] == point.reduction:
                ends[-1] = (order, point.reduction)
            else:
                ends.append((order, point.reduction))
        keys = {}
        for name in names:
            order = self.trace.layers[name].order
            keys[name] = next((index for index, (end, _) in enumerate(ends) if order < end), len(ends))
        return keys

    def _stride_keys(self, names: list[str], blocks: dict[str, str]) -> dict[str, int]:
        """The stride of each layer's output (its block's deepest, for a block member); a layer without a spatial
        output (a Linear, an SE convolution) takes the stride of the layer that ran before it."""
        own = {}
        for name in names:
            call = self.trace.layers[name]
            if isinstance(self.layers[name], (nn.Conv2d, nn.Conv3d)) and _spatial(call.output_shape):
                own[name] = 2 ** round(math.log2(self.trace.side / call.output_shape[-1]))
        deepest: dict[str, int] = {}
        for name, stride in own.items():
            if blocks.get(name):
                deepest[blocks[name]] = max(deepest.get(blocks[name], 0), stride)
        keys, previous = {}, 1
        for name in sorted(names, key=lambda n: self.trace.layers[n].order):
            stride = deepest.get(blocks.get(name, ""), own.get(name))
            previous = stride if stride is not None else previous
            keys[name] = previous
        return keys


def _spatial(shape: tuple[int, ...]) -> bool:
    """A (B, C, H, W) map larger than one pixel."""
    return len(shape) == 4 and shape[2] * shape[3] > 1


def _positions(shape: tuple[int, ...]) -> int:
    """How many positions an input holds: pixels of a map (B, C, H, W), tokens (B, N, C), 1 for pooled (B, C)."""
    if len(shape) == 4:
        return shape[2] * shape[3]
    return shape[1] if len(shape) == 3 else 1


def place_layers(net: nn.Module, *, points: list[FeaturePoint] | None = None, classifier: set[str] | None = None,
                 sides: tuple[int, ...] = PROBE_SIDES) -> dict[str, Place]:
    """{qualified name: Place} of every nn.Conv2d / nn.Conv3d / nn.Linear of `net`.

    `points`: timm's feature points (module, reduction), when the network has them; `classifier`: the names of
    the classifier's layers (an empty set: none, as a timm model built with num_classes=0; None: the last layer the
    forward calls, when it gives one value per class); `sides`: the probe image sides to try."""
    return _Placement(net, list(points or []), None if classifier is None else set(classifier), tuple(sides)).places
