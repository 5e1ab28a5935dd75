"""TensorBoard event files in `<run_dir>/tensorboard` (main process only)."""

from __future__ import annotations

import time
from pathlib import Path

from dynconv.engine.hooks.base import Hook


class TensorBoardHook(Hook):
    def __init__(self, directory: Path, every: int = 10):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(directory))
        self.every = max(int(every), 1)
        self._window_start = None
        self._window_images = 0

    def before_epoch(self, trainer):
        self._window_start, self._window_images = time.perf_counter(), 0

    def after_step(self, trainer):
        self._window_images += trainer.last_batch_size
        if trainer.global_step % self.every:
            return
        now = time.perf_counter()
        step = trainer.global_step
        self.writer.add_scalar("train/loss", trainer.last_loss.item(), step)
        self.writer.add_scalar("train/lr", trainer.current_lr(), step)
        elapsed = now - self._window_start
        if elapsed > 0:
            # Throughput over all ranks: each rank sees 1/world_size of the images.
            self.writer.add_scalar("train/throughput", self._window_images * trainer.dist.world_size / elapsed, step)
        self.writer.add_scalar("train/nonfinite_steps", trainer.nonfinite.total, step)
        for key, value in {**trainer.scalars, **trainer.loss_terms}.items():
            self.writer.add_scalar(key, float(value), step)
        self._window_start, self._window_images = now, 0

    def after_epoch(self, trainer):
        for key, value in trainer.metrics.items():
            if isinstance(value, (int, float)):
                self.writer.add_scalar(f"val/{key}", value, trainer.epoch + 1)
        self.writer.add_scalar("train/epoch_loss", trainer.epoch_loss, trainer.epoch + 1)
        self.writer.flush()

    def close(self, trainer):
        self.writer.close()
