"""Backbone + FPN: the multi-scale features torchvision's RetinaNet and Mask R-CNN consume.

Any backbone x operator x attn composition works: the neck only calls `Backbone.forward_features` (C2..C5,
keyed by log2 of the stride) and sizes the FPN from `feature_channels` / `feature_strides`.

- RetinaNet (Lin et al. 2017, Sec. 4; WeightNet Sec. 4.2): C3-C5 -> P3-P5, plus P6 = 3x3/2 conv on C5 and
  P7 = 3x3/2 conv on ReLU(P6) (`extra="p6p7"`).
- Mask R-CNN (He et al. 2017, FPN variant; KernelWarehouse Appendix A.1.2): C2-C5 -> P2-P5, plus P6 = max-pool
  of P5 for the RPN only (`extra="maxpool"`).

The outputs are keyed "P2".."P7" so the RoI poolers can name the levels they read.
"""

from __future__ import annotations

import logging
from collections import OrderedDict

import torch
import torch.nn as nn
from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool, LastLevelP6P7

from dynconv.backbones import Backbone

log = logging.getLogger("dynconv")

EXTRA_BLOCKS = ("p6p7", "maxpool", "none")


class LastLevelP6P7FromC5(LastLevelP6P7):
    """torchvision's P6/P7 block, always fed with C5 (the RetinaNet paper's choice).

    torchvision switches to P5 whenever C5 happens to have `out_channels` channels; here the input does not
    depend on a width coincidence.
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(in_channels, out_channels)
        self.use_P5 = False


def available_levels(backbone: Backbone) -> dict[str, int]:
    """{"C2": channels, ...} of the maps `forward_features` returns."""
    return {f"C{stride.bit_length() - 1}": channels
            for stride, channels in zip(backbone.feature_strides, backbone.feature_channels)}


def require_levels(backbone: Backbone, in_levels: list[str]) -> dict[str, int]:
    """`available_levels`, or a ValueError naming the backbone, its levels and the missing ones."""
    levels = available_levels(backbone)
    missing = [level for level in in_levels if level not in levels]
    if missing:
        raise ValueError(f"backbone {backbone.name} gives feature levels {sorted(levels) or 'none'}; the "
                         f"detection neck needs {list(in_levels)} (missing {missing}): use a backbone with "
                         "multi-scale features (ResNet, MobileNet, ShuffleNet, ConvNeXt)")
    return levels


def strip_classifier(backbone: Backbone) -> list[str]:
    """Replace the classifier (the modules the backbone's rules place with role "classifier") by nn.Identity.

    A detector never runs it; removing it keeps its parameters out of the optimizer, the parameter count
    and DDP's gradient reduction. Returns the replaced module names.
    """
    replaced = []
    for name, module in list(backbone.net.named_modules()):
        if not name or any(name.startswith(f"{done}.") for done in replaced):
            continue
        if any(rule.role == "classifier" and rule.match(name, module) for rule in backbone.rules):
            _replace(backbone.net, name, nn.Identity())
            replaced.append(name)
    return replaced


def strip_unused(backbone: Backbone, size: int = 32) -> list[str]:
    """Replace by nn.Identity what `forward_features` never runs (MobileNetV2's conv_head + bn2, ConvNeXt's
    head norm, ...): the outermost modules of `backbone.net` that hold parameters and of which neither
    themselves, nor a module inside, nor a module around them runs during a probe forward. Modules outside
    `net` (KW warehouses, block routing) are read by the layers and stay. Afterwards every trainable backbone
    parameter takes part in the forward, so DDP needs no `find_unused_parameters`. Returns the replaced names.

    The probe runs as training does (train mode, autograd on: weight-excitation parametrisations, for
    instance, skip their networks at eval) on two `size` px images; BatchNorm statistics and the RNG are
    restored afterwards, and no backward runs.
    """
    ran: set[str] = set()
    handles = [module.register_forward_pre_hook(lambda m, args, name=name: ran.add(name))
               for name, module in backbone.net.named_modules() if name]
    was_training = backbone.training
    buffers = {name: b.detach().clone() for name, b in backbone.named_buffers()}
    try:
        with torch.random.fork_rng(devices=[]):
            backbone.train()
            device = next(backbone.parameters()).device
            probe = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
            backbone.forward_features(probe.to(device))
    finally:
        for handle in handles:
            handle.remove()
        backbone.train(was_training)
        with torch.no_grad():
            for name, b in backbone.named_buffers():
                b.copy_(buffers[name])
    replaced = []
    for name, module in list(backbone.net.named_modules()):
        if not name or any(name.startswith(f"{done}.") for done in replaced):
            continue
        parts = name.split(".")
        # An ancestor that ran may use this module's parameters without calling it (LWE's parametrisation
        # reads its fc layers' weights functionally): only modules with no running ancestor, descendant or
        # self are unused.
        related = [".".join(parts[:i]) for i in range(1, len(parts))]
        related += [name] + [f"{name}.{sub}" for sub, _ in module.named_modules() if sub]
        if not any(n in ran for n in related) and any(True for _ in module.parameters()):
            _replace(backbone.net, name, nn.Identity())
            replaced.append(name)
    return replaced


def _replace(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, new)


class BackboneWithFPN(nn.Module):
    """`forward(images) -> OrderedDict(P_l: map)` over consecutive backbone levels, with `out_channels`.

    Takes ownership of the backbone: its classifier and the modules feature extraction never runs are removed
    (`strip_classifier`, `strip_unused`).
    """

    def __init__(self, backbone: Backbone, in_levels: list[str], out_channels: int, extra: str = "none"):
        super().__init__()
        levels = require_levels(backbone, in_levels)
        numbers = [int(level[1:]) for level in in_levels]
        if numbers != list(range(numbers[0], numbers[0] + len(numbers))):
            raise ValueError(f"in_levels must be consecutive, got {list(in_levels)}")
        if extra not in EXTRA_BLOCKS:
            raise ValueError(f"extra={extra!r}: allowed {', '.join(EXTRA_BLOCKS)}")
        self.in_levels = list(in_levels)
        self.out_channels = out_channels  # torchvision's detectors size their heads from this
        classifier = strip_classifier(backbone)
        unused = strip_unused(backbone)
        log.info("detection neck on %s: removed the classifier %s and the modules feature extraction never "
                 "runs: %s", backbone.name, classifier or "none", unused or "none")
        self.body = backbone
        extra_block = None
        if extra == "p6p7":
            extra_block = LastLevelP6P7FromC5(levels[in_levels[-1]], out_channels)
        elif extra == "maxpool":
            extra_block = LastLevelMaxPool()
        self.fpn = FeaturePyramidNetwork([levels[level] for level in in_levels], out_channels, extra_block)
        extras = {"p6p7": 2, "maxpool": 1, "none": 0}[extra]
        self.out_levels = [f"P{n}" for n in range(numbers[0], numbers[-1] + 1 + extras)]

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        features = self.body.forward_features(x)
        pyramid = self.fpn(OrderedDict((level, features[level]) for level in self.in_levels))
        return OrderedDict(zip(self.out_levels, pyramid.values()))
