"""Exponential moving average of the weights (timm's ModelEmaV3), updated after every optimizer step."""

from __future__ import annotations

from timm.utils import ModelEmaV3

from dynconv.engine.hooks.base import Hook


class EMAHook(Hook):
    def __init__(self, model, decay: float, warmup: bool = False):
        self.ema = ModelEmaV3(model, decay=decay, use_warmup=warmup)

    def after_step(self, trainer):
        if not trainer.step_skipped:  # a skipped (non-finite) step changed no weight
            self.ema.update(trainer.model, step=trainer.global_step)

    def state_dict(self):
        return {"ema": self.ema.module.state_dict()}

    def load_state_dict(self, state):
        if "ema" in state:
            self.ema.module.load_state_dict(state["ema"])
