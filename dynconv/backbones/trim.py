"""Trimming a backbone to the feature extractor a dense task needs (detection necks, segmentation heads): the
classifier goes, and so does whatever `forward_features` never runs (MobileNetV2's conv_head, ConvNeXt's head
norm), so every trainable parameter left takes part in the forward and DDP needs no unused-parameter search."""

from __future__ import annotations

import torch
import torch.nn as nn

from dynconv.backbones.backbone import Backbone


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
