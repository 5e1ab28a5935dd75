"""Per-iteration learning-rate schedule (timm schedulers with step_on_epochs=False), one update per optimizer step
(with gradient accumulation the scheduler is built with the optimizer steps per epoch, not the loader batches)."""

from __future__ import annotations

from dynconv.engine.hooks.base import Hook


class LRScheduleHook(Hook):
    def __init__(self, scheduler):
        self.scheduler = scheduler

    def before_train(self, trainer):
        # Put the optimizer at the lr of the (possibly resumed) current update.
        self.scheduler.step_update(trainer.global_step)

    def after_step(self, trainer):
        self.scheduler.step_update(trainer.global_step)

    def after_epoch(self, trainer):
        self.scheduler.step(trainer.epoch + 1)
