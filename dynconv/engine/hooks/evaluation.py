"""Evaluate on the validation split every `every` epochs (and always after the last epoch)."""

from __future__ import annotations

from dynconv.engine.hooks.base import Hook


class EvalHook(Hook):
    def __init__(self, every: int = 1, ema_hook=None):
        self.every = max(int(every), 1)
        self.ema_hook = ema_hook

    def after_epoch(self, trainer):
        last = trainer.epoch + 1 == trainer.epochs
        if (trainer.epoch + 1) % self.every and not last:
            return
        metrics = trainer.evaluate(trainer.model)
        if self.ema_hook is not None:
            ema_metrics = trainer.evaluate(self.ema_hook.ema.module)
            metrics.update({f"ema_{k}": v for k, v in ema_metrics.items()})
        trainer.record_eval(metrics)
