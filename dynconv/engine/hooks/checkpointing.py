"""Atomic checkpoints: `checkpoints/last.pt` after every epoch and when a stop is requested, `best.pt` whenever the
epoch's evaluation set a new best of the task's primary metric (top-1, or box AP for detection; `Trainer.improves`
is the one rule).

- `keep_last=2` renames the old `last.pt` to `previous.pt` once the new one is complete, so a `last.pt` that cannot
  be read on resume (a bad disk block, a copy cut short) falls back to the state one epoch earlier.
- `best.pt` holds what evaluation needs (weights, EMA weights, config, class names, metrics): the full training
  state is kept once, in `last.pt`.
- Nothing non-finite is written (`NonFiniteError`): a bad state never replaces a good file.
- A write that fails (disk full, read-only file system) leaves the previous file intact (`atomic_write` removes
  its temporary file) and, by `on_write_error`, stops the run (`CheckpointWriteError`, exit 4) or warns and
  goes on (the next epoch tries again).
"""

from __future__ import annotations

from pathlib import Path

from dynconv.engine.checkpoint import atomic_save, ema_weights, evaluation_payload
from dynconv.engine.failures import CheckpointWriteError
from dynconv.engine.hooks.base import Hook
from dynconv.engine.nonfinite import check_state_finite


class CheckpointHook(Hook):
    def __init__(self, directory: Path, save_best: bool = True, keep_last: int = 2, on_write_error: str = "stop",
                 class_names: list[str] | None = None):
        self.directory = Path(directory)
        self.save_best = save_best
        self.keep_last = int(keep_last)
        self.on_write_error = on_write_error
        self.class_names = class_names
        self.failed_writes = 0

    @property
    def last_path(self) -> Path:
        return self.directory / "last.pt"

    @property
    def previous_path(self) -> Path:
        return self.directory / "previous.pt"

    @property
    def best_path(self) -> Path:
        return self.directory / "best.pt"

    def last_good(self) -> str | None:
        """The newest checkpoint on disk, for messages ("Last good checkpoint: ..."); None before the first."""
        for path in (self.last_path, self.previous_path):
            if path.is_file():
                return str(path)
        return None

    def _save(self, trainer, payload, path: Path, previous: Path | None = None) -> bool:
        check_state_finite(payload["model"], "the model", str(path))
        ema = ema_weights(payload)
        if ema is not None:
            check_state_finite(ema, "the EMA model", str(path))
        try:
            atomic_save(payload, path, previous=previous)
            return True
        except OSError as error:
            self.failed_writes += 1
            kept = f"the previous {path.name} is intact" if path.is_file() else f"no {path.name} was written"
            message = f"could not write checkpoint {path} ({error.strerror or error}); {kept}"
            if self.on_write_error == "stop":
                raise CheckpointWriteError(
                    f"{message}. Free space or fix permissions, then rerun the same command to resume from "
                    f"{self.last_good() or 'the start'} (checkpoint.on_write_error=continue keeps training "
                    "instead)") from error
            trainer.log.warning("%s; training goes on (checkpoint.on_write_error=continue)", message)
            return False

    def _save_last(self, trainer, payload) -> bool:
        previous = self.previous_path if self.keep_last >= 2 else None
        return self._save(trainer, payload, self.last_path, previous)

    def after_step(self, trainer):
        # A stop request (SIGINT/SIGTERM/SIGUSR1) saves mid-epoch, at this step boundary, then the loop exits.
        if trainer.stop_reason and trainer.dist.is_main:
            payload = trainer.checkpoint_payload(epochs_done=trainer.epoch, batches_done=trainer.batches_done)
            if self._save_last(trainer, payload):
                trainer.log.info("saved %s at epoch %d, batch %d (%s)", self.last_path, trainer.epoch,
                                 trainer.batches_done, trainer.stop_reason)

    def after_epoch(self, trainer):
        if not trainer.dist.is_main:
            return
        payload = trainer.checkpoint_payload(epochs_done=trainer.epoch + 1, batches_done=0)
        self._save_last(trainer, payload)
        if self.save_best and trainer.is_best:
            self._save(trainer, evaluation_payload(payload, self.class_names), self.best_path)
