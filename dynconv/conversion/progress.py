"""Driving an operator's schedules (DY-Conv's and ODConv's temperature, KernelWarehouse's tau, CAF's tau) outside
train.py, in your own training loop.

train.py's `OperatorScheduleHook` finds every module with `set_training_progress(epoch)` and calls it before each
step with the fractional epoch; a model from `dynconv.convert` or `dynconv.create_model` trained by other code
needs the same call, or its temperatures stay at their epoch-0 values (T = 30: near-uniform attention):

    for step, (images, labels) in enumerate(loader):
        dynconv.set_training_progress(model, epoch + step / len(loader))
        ...
"""

from __future__ import annotations

import torch.nn as nn


def set_training_progress(model: nn.Module, epoch: float) -> dict[str, float]:
    """Set every schedule in `model` to the fractional `epoch` (2.5 = half way through the third epoch), as the
    trainer does before each step; returns the scheduled values (mean over the layers: `temperature`, `kw_tau`,
    ...), empty when the model has none."""
    from dynconv.engine.hooks.operator_schedule import apply_training_progress, scheduled_modules

    return apply_training_progress(scheduled_modules(model), float(epoch))
