"""Parameters and multiply-accumulates, counted the way the papers count them.

MACs come from `torch.utils.flop_counter` (FLOPs / 2) over one image (a video backbone: one clip) at the backbone's
default resolution:
convolutions, matmuls and linear layers, i.e. the convolutions plus every attention or kernel-generation
branch of a dynamic operator (norms, activations and pooling are not counted, as in the papers). Dynamic
layers run under `selector.counting_macs()`, i.e. in the papers' formulation (mix the kernel, convolve once),
so the count depends neither on which algorithm a shape would select at training time nor on the policy.
"""

from __future__ import annotations

import copy
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from dynconv.functional.selector import counting_macs


def count_params(model: nn.Module) -> int:
    """Every trainable parameter, shared parameters counted once."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def fold_for_inference(model: nn.Module) -> nn.Module:
    """A copy with training-only reparameterisations folded away.

    Modules that define `fold_for_inference() -> nn.Module` are replaced by what it returns, and
    `torch.nn.utils.parametrize` parametrizations are baked into plain weights, as eval mode computes them.
    """
    from torch.nn.utils import parametrize

    folded = copy.deepcopy(model)
    for name, module in list(folded.named_modules()):
        if name and callable(getattr(module, "fold_for_inference", None)):
            parent_name, _, child = name.rpartition(".")
            parent = folded.get_submodule(parent_name) if parent_name else folded
            setattr(parent, child, module.fold_for_inference())
    for module in folded.modules():
        if parametrize.is_parametrized(module):
            # Bake in the weight eval mode uses: spectral normalisation runs a power iteration (and moves its u, v)
            # at every train-mode evaluation, so folding a model in train mode would not give its eval weights.
            module.parametrizations.eval()
            for tensor_name in list(module.parametrizations):
                # Grad on, even inside no_grad: a parametrization of several tensors (weight norm's g and v)
                # leaves an nn.Parameter only if the baked value requires grad, else a buffer.
                with torch.enable_grad():
                    parametrize.remove_parametrizations(module, tensor_name, leave_parametrized=True)
    return folded


@dataclass
class MacCount:
    total: int
    by_module: dict[str, int]  # MACs per top-level child of the model (for a readable breakdown)


def count_macs(model: nn.Module, input_size: tuple[int, ...], depth: int = 3) -> MacCount:
    """MACs for one image of `input_size` (C, H, W), or one clip of (C, T, H, W), in eval mode; broken down `depth`
    modules deep. torch's counter counts conv3d as it counts conv2d (2 x MACs each)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    counter = FlopCounterMode(display=False, depth=depth)
    try:
        with torch.no_grad(), counting_macs(), counter:
            model(torch.zeros(1, *input_size, device=device))
    finally:
        model.train(was_training)
    by_module: dict[str, int] = defaultdict(int)
    for module_name, ops in counter.get_flop_counts().items():
        if module_name.count(".") == depth - 1 and module_name != "Global":
            # "Backbone.net.layer1" -> "layer1": names as the user sees them in the state_dict.
            by_module[module_name.split(".", 2)[-1]] += sum(ops.values()) // 2
    return MacCount(counter.get_total_flops() // 2, dict(by_module))


def profile_backbone(cfg: Mapping[str, Any], *, frames: int | None = None,
                     wrap: Callable[[nn.Module], nn.Module] | None = None) -> tuple[str, dict[str, Any]]:
    """scripts/profile.py for a classification backbone x op x attn at `profile.resolution` (default: the
    backbone's own): (readable text, the JSON record). `*_inference` counts are taken after
    `fold_for_inference` (training-only reparameterisations such as Weight Excitation folded away).
    Video (`dynconv/tasks/video/task.py`): `frames` counts one clip of that many frames, and `wrap(backbone)` is
    the model the task trains (a per-frame image backbone inside the frame average)."""
    from omegaconf import OmegaConf

    from dynconv.build import build_backbone

    resolution = cfg.profile.resolution or cfg.backbone.default_resolution
    built = build_backbone(cfg.backbone, OmegaConf.to_container(cfg.op, resolve=True), cfg.attn,
                           num_classes=cfg.profile.num_classes, image_size=resolution)
    model = built.backbone if wrap is None else wrap(built.backbone)
    input_size = (3, resolution, resolution) if frames is None else (3, frames, resolution, resolution)
    params = count_params(model)
    folded = fold_for_inference(model)
    params_inference = count_params(folded)
    macs = count_macs(model, input_size)
    macs_inference = count_macs(folded, input_size).total

    lines = [built.summary()]
    if cfg.profile.layers:
        for decision in built.decisions:
            state = "converted" if decision.converted else f"static: {decision.reason}"
            lines.append(f"  {decision.layer.name:40s} {decision.layer.shape_str():45s} {state}")
    lines += [
        f"input            {input_size}",
        f"params           {params:>15,}  ({params / 1e6:.2f}M)",
        f"params_inference {params_inference:>15,}  ({params_inference / 1e6:.2f}M)",
        f"MACs             {macs.total:>15,}  ({macs.total / 1e9:.3f}G)",
        f"MACs_inference   {macs_inference:>15,}  ({macs_inference / 1e9:.3f}G)",
    ]
    for name, count in sorted(macs.by_module.items(), key=lambda item: -item[1])[:8]:
        lines.append(f"  {name:30s} {count / 1e6:10.2f}M MACs")
    record = {
        "params": params,
        "params_inference": params_inference,
        "macs": macs.total,
        "macs_inference": macs_inference,
        "input_size": list(input_size),
        "backbone": cfg.backbone.name,
        "op": built.operator.describe(),
        "attn": cfg.attn.name,
        "converted_layers": sum(d.converted for d in built.decisions),
    }
    return "\n".join(lines), record
