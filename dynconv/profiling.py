"""Parameters and multiply-accumulates, counted the way the papers count them.

MACs come from `torch.utils.flop_counter` (FLOPs / 2) over one image at the backbone's default resolution:
convolutions, matmuls and linear layers, i.e. the convolutions plus every attention or kernel-generation
branch of a dynamic operator (norms, activations and pooling are not counted, as in the papers). Dynamic
layers run in `canonical_cost_mode`, the papers' formulation (mix the kernel, convolve once), so the count
does not depend on which algorithm a shape would select at training time.
"""

from __future__ import annotations

import copy
from collections import defaultdict
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from dynconv.ops.per_sample_conv import canonical_cost_mode


def count_params(model: nn.Module) -> int:
    """Every trainable parameter, shared parameters counted once."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def fold_for_inference(model: nn.Module) -> nn.Module:
    """A copy with training-only reparameterisations folded away.

    Modules that define `fold_for_inference() -> nn.Module` are replaced by what it returns, and
    `torch.nn.utils.parametrize` parametrizations are baked into plain weights.
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
            for tensor_name in list(module.parametrizations):
                parametrize.remove_parametrizations(module, tensor_name, leave_parametrized=True)
    return folded


@dataclass
class MacCount:
    total: int
    by_module: dict[str, int]  # MACs per top-level child of the model (for a readable breakdown)


def count_macs(model: nn.Module, input_size: tuple[int, int, int], depth: int = 3) -> MacCount:
    """MACs for one image of `input_size` (C, H, W), in eval mode; broken down `depth` modules deep."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    counter = FlopCounterMode(display=False, depth=depth)
    try:
        with torch.no_grad(), canonical_cost_mode(), counter:
            model(torch.zeros(1, *input_size, device=device))
    finally:
        model.train(was_training)
    by_module: dict[str, int] = defaultdict(int)
    for module_name, ops in counter.get_flop_counts().items():
        if module_name.count(".") == depth - 1 and module_name != "Global":
            # "Backbone.net.layer1" -> "layer1": names as the user sees them in the state_dict.
            by_module[module_name.split(".", 2)[-1]] += sum(ops.values()) // 2
    return MacCount(counter.get_total_flops() // 2, dict(by_module))
