"""Frozen BatchNorm and frozen first stages of a (converted) backbone, for detection fine-tuning.

Detectors are trained with 2 images per GPU (WeightNet Sec. 4.2) or 2 per GPU x 8 (KernelWarehouse Appendix
A.1.2): too few for BatchNorm statistics, so the statistics and affine parameters of the classification
checkpoint are kept fixed (torchvision's detection backbones use `FrozenBatchNorm2d`; Detectron and
mmdetection do the same), and the stem and first stage(s) are not trained at all.

Scope of frozen BN (`frozen_bn=true`): every BatchNorm of the backbone, including those inside the dynamic
operators' attention branches (ODConv/KW/SK/BAM attention BN1d) and attention add-ons. Those branches see one
pooled vector per image: with 2 images per GPU their batch statistics are even noisier than the main path's,
and torchvision likewise freezes every BN of a detection backbone. LayerNorm (ConvNeXt, KW on ConvNeXt) has no
batch statistics and stays trainable. The FPN and heads have no BatchNorm.

Frozen stages (`frozen_stages=k`, mmdetection's convention): -1 freezes nothing, 0 the stem, k the stem and
stages 1..k. A parameter's stage is its module's placement (`Backbone.place`, so converted dynamic layers, which
keep their names, are placed like the convs they replaced); modules without a rule (BN, activations, a dynamic
layer's internals) take the stage of the placed modules around them (`module_stages`), else of the closest
preceding placed module in `named_modules` order. Modules outside `backbone.net` that layers share (block
routing in `shared_inputs`, KW `warehouses`) are frozen when every layer that reads them is frozen. BatchNorms
in frozen stages become frozen BN even with frozen_bn=false: a frozen stage must not change in train mode
either.
"""

from __future__ import annotations

import logging

import torch
import torch.nn as nn
from torchvision.ops import FrozenBatchNorm2d

from dynconv.backbones import Backbone

log = logging.getLogger("dynconv")


class FrozenBatchNorm1d(FrozenBatchNorm2d):
    """torchvision's FrozenBatchNorm2d for (N, C) or (N, C, L) inputs (attention branches' BN1d)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        bias = self.bias - self.running_mean * scale
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return x * scale.reshape(shape) + bias.reshape(shape)


def frozen_copy(bn: nn.modules.batchnorm._BatchNorm) -> nn.Module:
    """A frozen BN with `bn`'s statistics and affine parameters (identity affine when bn has none)."""
    frozen = (FrozenBatchNorm2d if isinstance(bn, nn.BatchNorm2d) else FrozenBatchNorm1d)(bn.num_features, bn.eps)
    with torch.no_grad():
        if bn.affine:
            frozen.weight.copy_(bn.weight)
            frozen.bias.copy_(bn.bias)
        frozen.running_mean.copy_(bn.running_mean)
        frozen.running_var.copy_(bn.running_var)
    tensors = list(bn.parameters()) + list(bn.buffers())
    return frozen.to(tensors[0].device) if tensors else frozen


def freeze_batchnorm(root: nn.Module, only=None) -> list[str]:
    """Replace BatchNorm1d/2d modules under `root` (those whose name `only(name)` accepts) by frozen copies."""
    replaced = []
    for name, module in list(root.named_modules()):
        # A BN without running statistics always normalises with the batch's: there is nothing to freeze.
        if (isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)) and module.track_running_stats
                and (only is None or only(name))):
            parent_name, _, child = name.rpartition(".")
            setattr(root.get_submodule(parent_name) if parent_name else root, child, frozen_copy(module))
            replaced.append(name)
    return replaced


def module_stages(backbone: Backbone) -> dict[str, int]:
    """Stage of every module of `backbone.net` (by name).

    A placed module has its placement's stage. An unplaced one (BN, activation, norm, a dynamic layer's
    internals) takes the stage of the placed modules of its closest ancestor that holds any, when they all
    agree (so ConvNeXt's norm before a stage's downsampling conv joins that stage); otherwise (the network's
    root) the stage of the closest preceding placed module in `named_modules` order (ResNet's bn1 joins the stem).
    """
    placed: dict[str, int] = {}
    for name, module in backbone.net.named_modules():
        if name:
            try:
                placed[name] = backbone.place(name, module).stage
            except LookupError:
                pass
    below: dict[str, set[int]] = {}  # module name -> stages of the placed modules inside it (itself included)
    for name, stage in placed.items():
        parts = name.split(".")
        for i in range(1, len(parts) + 1):
            below.setdefault(".".join(parts[:i]), set()).add(stage)
    stages: dict[str, int] = {}
    current = 0  # before the first placed layer: the stem
    for name, _ in backbone.net.named_modules():
        if name in placed:
            current = stages[name] = placed[name]
            continue
        parts = name.split(".") if name else []
        ancestors = (".".join(parts[:i]) for i in range(len(parts) - 1, 0, -1))
        group = next((below[a] for a in ancestors if a in below), None)
        stages[name] = next(iter(group)) if group is not None and len(group) == 1 else current
    return stages


def max_stage(backbone: Backbone) -> int:
    """The last stage that holds a feature layer (the classifier and unused head excluded)."""
    stages = module_stages(backbone)
    return max((stage for name, stage in stages.items()
                if any(p.requires_grad for p in backbone.net.get_submodule(name).parameters(recurse=False))),
               default=0)


def freeze_stages(backbone: Backbone, k: int) -> list[str]:
    """requires_grad=False for the stem and stages 1..k (k=-1: nothing); their BNs become frozen BN.

    Returns the names of the frozen parameters.
    """
    if k < 0:
        return []
    stages = module_stages(backbone)
    frozen_modules = {name for name, stage in stages.items() if stage <= k}
    freeze_batchnorm(backbone.net, only=lambda name: name in frozen_modules)
    stages = module_stages(backbone)  # the frozen BNs are new modules under the same names
    users: dict[int, list[int]] = {}  # id of a shared module referenced (unregistered) by layers -> their stages
    frozen = []
    for name, module in backbone.net.named_modules():
        for value in vars(module).values():
            if isinstance(value, nn.Module):  # registered submodules live in _modules, not in __dict__
                users.setdefault(id(value), []).append(stages[name])
        if stages[name] <= k:
            for pname, param in module.named_parameters(recurse=False):
                param.requires_grad_(False)
                frozen.append(f"net.{name}.{pname}" if name else f"net.{pname}")
    for child_name, child in backbone.named_children():
        if child is backbone.net:
            continue
        for name, module in child.named_modules():
            readers = users.get(id(module))
            if readers and max(readers) <= k:
                for pname, param in module.named_parameters():
                    param.requires_grad_(False)
                    frozen.append(f"{child_name}.{name}.{pname}" if name else f"{child_name}.{pname}")
    return frozen


def apply_freezing(backbone: Backbone, frozen_bn: bool, frozen_stages: int) -> str:
    """Both options on the backbone; returns a one-line account for the log."""
    if frozen_bn:
        # timm and torchvision ResNets zero-initialise the last BN scale of every residual branch; frozen at 0,
        # those branches never train. Harmless from a classification checkpoint, fatal from scratch.
        dead = [n for n, m in backbone.named_modules()
                if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine and not m.weight.detach().any()]
        if dead:
            log.warning("task.frozen_bn=true freezes %d BatchNorm layers whose scale is all zero (%s ...): their "
                        "branches stay off. Initialise the backbone from a trained checkpoint (init_from=...) or "
                        "set task.frozen_bn=false to train from scratch", len(dead), ", ".join(dead[:3]))
    bns = freeze_batchnorm(backbone) if frozen_bn else []
    params = freeze_stages(backbone, frozen_stages)
    names = set(params)
    count = sum(p.numel() for name, p in backbone.named_parameters() if name in names)
    stages = "nothing" if frozen_stages < 0 else "stem" if frozen_stages == 0 else f"stem + stages 1..{frozen_stages}"
    return (f"frozen BN: {len(bns)} layers{'' if frozen_bn else ' (frozen_bn=false)'}; frozen stages: {stages} "
            f"({len(params)} tensors, {count:,} parameters)")
