"""What the export tests share: small models with non-trivial, well-conditioned eval-mode BatchNorms, and the
checks every exported graph must pass (a free batch, no batch folded into convolution groups, eager's outputs)."""

from __future__ import annotations

import torch
import torch.nn as nn

from dynconv.functional import selector
from op_checks import calibrate_batch_norm

TOLERANCE = 1e-4  # max abs difference to eager, float32 (the issue's)
BATCH_SIZES = (1, 3, 8)
SIDE = 32


def condition_batch_norm(model: nn.Module, side: int = SIDE, seed: int = 0) -> nn.Module:
    """Eval-mode BatchNorms that are not the identity and do not amplify: random affine parameters (timm's ResNets
    start every block's last BN scale at 0, which would silence the block's dynamic layers), running means and
    variances from one train-mode batch (`calibrate_batch_norm`), the variances floored at 1.

    Why the floor: a channel that the calibration batch leaves (nearly) constant, after a ReLU say, gets a running
    variance near 0, and eval mode multiplies it by 1/sqrt(eps) ~ 300; chained over a randomly initialised
    MobileNetV2 that makes a 1e-6 change of the input move the logits by 1e-3, so two exact formulations of the
    same network (float32 summation orders) could not agree to 1e-4. Trained networks have no such channels."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.affine:
                module.weight.copy_(torch.empty_like(module.weight).uniform_(0.5, 1.5, generator=generator))
                module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=generator))
    with selector.policy("model"):  # nothing to gain from timing the algorithms of one calibration batch
        calibrate_batch_norm(model, torch.randn(16, 3, side, side, generator=generator))
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.running_var is not None:
                module.running_var.clamp_(min=1.0)
    return model.eval()


def small_model(backbone: str, op: str, side: int = SIDE, **knobs) -> nn.Module:
    """`backbone` x `op` for 10 classes at `side` px, seeded, with conditioned BatchNorms, in eval mode."""
    import dynconv

    torch.manual_seed(0)
    model = dynconv.create_model(backbone, op=op, num_classes=10, image_size=side, **knobs)
    return condition_batch_norm(model, side)


def model_groups(model: nn.Module) -> set[int]:
    """Every convolution group count the model's layers declare (static and dynamic), and 1; for WeightNet layers
    also the groups of their "outputs" algorithm (G' runs of input channels per layer group: a batch-independent
    count, dynconv/ops/weightnet_apply.py)."""
    from dynconv.ops import weightnet_apply
    from dynconv.ops.weightnet import WeightNetConv2d

    groups = {1} | {int(module.groups) for module in model.modules()
                    if isinstance(getattr(module, "groups", None), int)}
    return groups | {module.groups * weightnet_apply.parts_per_output(module) for module in model.modules()
                     if isinstance(module, WeightNetConv2d) and weightnet_apply.parts_per_output(module)}
