"""A BatchNorm as the per-channel affine map it applies in this forward, so that it can be folded into a kernel.

An operator that builds one kernel per sample cannot run a BatchNorm on features it never computes; but within
one forward a BatchNorm is an affine map per channel, norm(v) = scale * v + shift, whose statistics are either the
running ones (eval mode) or those of the batch (train mode). `batch_norm_affine` returns that map, so the operator
folds it into its kernel and bias (DCD's latent BatchNorms, `dynconv/ops/dcd.py`) and the result equals running
the BatchNorm on the features, gradients through the batch statistics included.

A single value per channel (a batch of one pooled sample) has no batch variance: as `BatchSafeBatchNorm1d`, the
running statistics are used then, and left untouched.
"""

from __future__ import annotations

import torch
import torch.nn as nn


def uses_batch_statistics(norm: nn.Module, values_per_channel: int) -> bool:
    """Whether `norm` normalises this forward with the batch's statistics (train mode, more than one value).
    A frozen BatchNorm (torchvision's FrozenBatchNorm2d and dynconv's 1-d one, which detection fine-tuning puts in
    place of every BatchNorm) never does: it is its running statistics and affine parameters, fixed."""
    if not isinstance(norm, nn.modules.batchnorm._BatchNorm):
        return False
    return (norm.training or not norm.track_running_stats) and values_per_channel > 1


def batch_norm_affine(norm: nn.Module, values: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift), each (C,), such that `norm(values) == scale * values + shift` (channels on dim 1).

    `values` are what the BatchNorm would normalise; they are read only when it uses batch statistics (then the
    running statistics are updated as nn.BatchNorm does: momentum, unbiased variance) and may be None otherwise.
    """
    count = 0 if values is None else values.numel() // values.shape[1]
    if uses_batch_statistics(norm, count):
        dims = [d for d in range(values.dim()) if d != 1]
        mean = values.mean(dim=dims)
        var = values.var(dim=dims, unbiased=False)  # what BatchNorm normalises with
        if norm.training and norm.track_running_stats:
            _update_running_statistics(norm, mean.detach(), var.detach() * count / (count - 1))
    else:
        mean, var = norm.running_mean, norm.running_var
    affine = getattr(norm, "affine", True)  # a frozen BatchNorm always has its weight and bias
    scale = torch.rsqrt(var + norm.eps)
    if affine:
        scale = norm.weight * scale
    shift = -mean * scale
    if affine:
        shift = shift + norm.bias
    return scale, shift


@torch.no_grad()
def _update_running_statistics(norm, mean: torch.Tensor, unbiased_var: torch.Tensor) -> None:
    norm.num_batches_tracked.add_(1)
    momentum = norm.momentum if norm.momentum is not None else 1.0 / float(norm.num_batches_tracked)
    norm.running_mean.lerp_(mean, momentum)
    norm.running_var.lerp_(unbiased_var, momentum)
