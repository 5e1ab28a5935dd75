"""A tqdm progress bar per epoch on the main process (it/s, ETA, loss, lr), counting optimizer steps (with
gradient accumulation, `recipe.accum_steps` loader batches each)."""

from __future__ import annotations

import sys

from tqdm import tqdm

from dynconv.engine.hooks.base import Hook


class ProgressHook(Hook):
    def __init__(self, every: int = 10):
        self.every = max(int(every), 1)
        self.bar = None

    def before_epoch(self, trainer):
        self.bar = tqdm(total=trainer.updates_per_epoch, initial=trainer.steps_done_in_epoch, file=sys.stderr,
                        desc=f"epoch {trainer.epoch + 1}/{trainer.epochs}", dynamic_ncols=True, leave=False)

    def after_step(self, trainer):
        self.bar.update(1)
        if trainer.global_step % self.every == 0:
            self.bar.set_postfix(loss=f"{trainer.last_loss.item():.4f}", lr=f"{trainer.current_lr():.3g}")

    def after_epoch(self, trainer):
        if self.bar is not None:
            self.bar.close()

    def close(self, trainer):
        if self.bar is not None:
            self.bar.close()
