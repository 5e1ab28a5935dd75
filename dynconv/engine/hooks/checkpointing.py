"""Atomic checkpoints: `checkpoints/last.pt` after every epoch and on preemption, `best.pt` whenever the epoch's
evaluation set a new best of the task's primary metric (top-1, or box AP for detection; `Trainer.improves` is
the one rule)."""

from __future__ import annotations

from pathlib import Path

from dynconv.engine.checkpoint import atomic_save
from dynconv.engine.hooks.base import Hook


class CheckpointHook(Hook):
    def __init__(self, directory: Path, save_best: bool = True):
        self.directory = Path(directory)
        self.save_best = save_best

    @property
    def last_path(self) -> Path:
        return self.directory / "last.pt"

    def after_step(self, trainer):
        # A stop request (SIGTERM/SIGUSR1) saves mid-epoch, at this step boundary, then the loop exits.
        if trainer.stop_reason and trainer.dist.is_main:
            atomic_save(trainer.checkpoint_payload(epochs_done=trainer.epoch, batches_done=trainer.batches_done),
                        self.last_path)
            trainer.log.info("saved %s at epoch %d, batch %d (%s)", self.last_path, trainer.epoch,
                             trainer.batches_done, trainer.stop_reason)

    def after_epoch(self, trainer):
        if not trainer.dist.is_main:
            return
        payload = trainer.checkpoint_payload(epochs_done=trainer.epoch + 1, batches_done=0)
        atomic_save(payload, self.last_path)
        if self.save_best and trainer.is_best:
            atomic_save(payload, self.directory / "best.pt")
