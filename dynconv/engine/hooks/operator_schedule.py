"""Schedules that belong to an operator (temperature annealing), applied every iteration.

A module opts in by defining `set_training_progress(epoch: float) -> dict[str, float]`, where `epoch` is
the fractional number of epochs done (e.g. 2.5). It updates its own state (a temperature) and returns the
scalars worth logging. The hook finds such modules itself, so nothing in the loop or train.py names an
operator.
"""

from __future__ import annotations

from collections import defaultdict

import torch.nn as nn

from dynconv.engine.hooks.base import Hook


def scheduled_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if callable(getattr(m, "set_training_progress", None))]


def apply_training_progress(modules: list[nn.Module], epoch: float) -> dict[str, float]:
    """Set every scheduled module's progress; return the mean of each reported scalar."""
    sums: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    for module in modules:
        for key, value in (module.set_training_progress(epoch) or {}).items():
            sums[key] += float(value)
            counts[key] += 1
    return {key: sums[key] / counts[key] for key in sums}


class OperatorScheduleHook(Hook):
    def __init__(self):
        self.modules: list[nn.Module] = []

    def before_train(self, trainer):
        self.modules = scheduled_modules(trainer.model)

    def before_step(self, trainer):
        if self.modules:
            # Both count optimizer steps, so the progress is the same whatever recipe.accum_steps is.
            progress = trainer.global_step / max(trainer.updates_per_epoch, 1)
            scalars = apply_training_progress(self.modules, progress)
            trainer.scalars.update({f"schedule/{k}": v for k, v in scalars.items()})
