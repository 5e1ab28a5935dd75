"""The training loop: one epoch of forward/backward/step, everything else in hooks.

Hot path per optimizer step: fetch its `accum_steps` micro-batches (loader batches), then for each: move it,
forward under autocast, backward of its loss weighted by its share of the step's images; then the optimizer step
and the hooks. One host synchronisation per optimizer step: the non-finite guard reads one flag (is the loss and
the gradient norm finite, on every rank) to decide whether the optimizer may step (dynconv/engine/nonfinite.py);
loss values stay on the device otherwise (hooks that print them do so every N steps).

Gradient accumulation (`recipe.accum_steps`) lets the papers' global batches (4096, 2048, 1024) run on fewer GPUs
with the same effective batch and learning rate. Everything that counts steps counts *optimizer* steps
(`global_step`, `updates_per_epoch`: the lr schedule, operator schedules, EMA, logging, checkpoints), while
`batches_done` counts loader batches, which is what the sampler skips on a mid-epoch resume.

However training ends (finished, stopped, raised), `close` runs: the hooks release what they hold (signal
handlers, TensorBoard files) and the DataLoader workers are shut down, so that an exception never leaves the
process waiting on its workers (dynconv/engine/shutdown.py).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
from typing import Any

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from dynconv.engine.checkpoint import capture_rng_state, restore_rng_state
from dynconv.engine.distributed import DistInfo, all_reduce_sum
from dynconv.engine.eval_progress import with_progress
from dynconv.engine.hooks import Hook
from dynconv.engine.nonfinite import NonFiniteGuard, all_ranks_finite, grad_norm
from dynconv.engine.shutdown import shutdown_iterator, shutdown_loader


def optimizer_steps_per_epoch(batches: int, accum_steps: int) -> int:
    """Optimizer steps in an epoch of `batches` loader batches: the last step takes what is left (fewer
    micro-batches), so no batch is dropped and a schedule built with this count ends with the epoch."""
    return -(-batches // max(int(accum_steps), 1))


class Trainer:
    def __init__(
        self,
        *,
        model: nn.Module,
        task,
        optimizer: torch.optim.Optimizer,
        scheduler,
        train_loader,
        train_sampler,
        val_loader,
        dist: DistInfo,
        epochs: int,
        config: dict[str, Any],
        amp_dtype: torch.dtype | None = None,
        clip_grad: float | None = None,
        channels_last: bool = False,
        compile_model: bool = False,
        max_nonfinite: int = 10,
        accum_steps: int = 1,
        log: logging.Logger | None = None,
        eval_progress: bool = False,
    ):
        self.model = model
        self.eval_progress = eval_progress  # a bar over the validation batches (main process, log.progress_bar)
        self.task = task
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.train_loader = train_loader
        self.train_sampler = train_sampler
        self.val_loader = val_loader
        self.dist = dist
        self.epochs = epochs
        self.config = config
        self.amp_dtype = amp_dtype
        self.clip_grad = clip_grad
        self.channels_last = channels_last
        self.accum_steps = max(int(accum_steps), 1)  # micro-batches (loader batches) per optimizer step
        self.log = log or logging.getLogger("dynconv")
        # fp16 needs loss scaling; bf16 has fp32's range and does not.
        self.scaler = torch.amp.GradScaler(dist.device.type) if amp_dtype == torch.float16 else None

        self.train_model: nn.Module = model
        self.ddp_model: DistributedDataParallel | None = None  # kept apart: torch.compile wraps it
        if dist.distributed:
            device_ids = [dist.device.index] if dist.device.type == "cuda" else None
            self.train_model = self.ddp_model = DistributedDataParallel(
                model, device_ids=device_ids,
                find_unused_parameters=bool(getattr(task, "find_unused_parameters", False)))
        if compile_model:
            self.train_model = torch.compile(self.train_model)

        self.hooks: list[Hook] = []
        self.updates_per_epoch = optimizer_steps_per_epoch(len(train_loader), self.accum_steps)
        self.epoch = 0
        self.start_epoch = 0
        self.epochs_done = 0
        self.global_step = 0
        # Loader batches finished in the current epoch (non-zero only after a mid-epoch resume); always a whole
        # number of optimizer steps, since a stop is honoured only between steps.
        self.batches_done = 0
        self.resumed_from: int | None = None
        self.last_loss = torch.zeros(())  # the last optimizer step's mean loss over its images
        self.last_batch_size = 0  # images in the last optimizer step on this rank (all its micro-batches)
        self.epoch_loss = float("nan")
        self.metrics: dict[str, float] = {}
        self.best_metrics: dict[str, float] = {}
        self.is_best = False  # whether the last evaluation set a new best (`improves`); best.pt follows it
        self.scalars: dict[str, float] = {}  # per-step extras for the loggers (operator temperatures, ...)
        self.loss_terms: dict[str, torch.Tensor] = {}  # a task's loss components (detection), on the device
        self.skipped_images: list[str] = []
        self.stop_reason: str | None = None
        self.exit_code = 0
        self.nonfinite = NonFiniteGuard(max_nonfinite)
        self.step_skipped = False  # the last step's loss or gradients were non-finite: no update was made

    # ----------------------------------------------------------------------------------------------- hooks
    def register_hooks(self, hooks: list[Hook]) -> None:
        self.hooks.extend(h for h in hooks if h is not None)

    def _call(self, event: str) -> None:
        for hook in self.hooks:
            getattr(hook, event)(self)

    def close(self) -> None:
        """Release everything, on every path out of `train` (success, stop request, exception): hooks' `close`
        (errors there are logged, never raised over the original one) and the loaders' worker processes."""
        for hook in self.hooks:
            try:
                hook.close(self)
            except Exception as error:  # noqa: BLE001 - cleanup must not hide why training ended
                self.log.warning("closing %s failed: %s", type(hook).__name__, error)
        for loader in (self.train_loader, self.val_loader):
            shutdown_loader(loader)

    def last_good_checkpoint(self) -> str | None:
        """The newest checkpoint on disk (for error messages), or None."""
        for hook in self.hooks:
            if callable(getattr(hook, "last_good", None)):
                return hook.last_good()
        return None

    # ------------------------------------------------------------------------------------------------ loop
    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.dist.device.type, dtype=self.amp_dtype)

    def current_lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    @property
    def steps_done_in_epoch(self) -> int:
        """Optimizer steps already made in the current epoch (non-zero only after a mid-epoch resume)."""
        return optimizer_steps_per_epoch(self.batches_done, self.accum_steps)

    def request_stop(self, reason: str, exit_code: int = 0) -> None:
        self.stop_reason, self.exit_code = reason, exit_code

    def train(self) -> None:
        try:
            self._train()
        finally:
            self.close()

    def _train(self) -> None:
        self._call("before_train")
        for epoch in range(self.start_epoch, self.epochs):
            self.epoch = epoch
            self.train_sampler.set_epoch(epoch)
            # A batch-sampler loader (detection's aspect-ratio groups) has no batch_size of its own.
            batch_size = self.train_loader.batch_size or self.train_sampler.batch_size
            self.train_sampler.set_start(self.batches_done * batch_size)
            self.is_best = False  # until this epoch's evaluation (if any) says otherwise
            self._call("before_epoch")
            self._run_epoch()
            if self.stop_reason:
                break
            self._call("after_epoch")
            self.epochs_done = epoch + 1
            self.batches_done = 0
        self._call("after_train")

    def _run_epoch(self) -> None:
        self.train_model.train()
        device = self.dist.device
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        seen = torch.zeros((), dtype=torch.float64, device=device)
        skipped_before = len(self.skipped_images)
        # An explicit iterator, so that an exception can stop its workers (the traceback would keep it alive).
        iterator = iter(self.train_loader)
        try:
            self._run_steps(iterator, device, loss_sum, seen)
        except BaseException:
            shutdown_iterator(iterator)
            raise
        if self.stop_reason:
            return
        totals = all_reduce_sum(torch.stack([loss_sum, seen]))
        self.epoch_loss = (totals[0] / totals[1].clamp(min=1)).item()
        newly_skipped = self.skipped_images[skipped_before:]
        if newly_skipped:
            shown = ", ".join(newly_skipped[:10]) + (" ..." if len(newly_skipped) > 10 else "")
            self.log.warning("epoch %d: skipped %d undecodable image(s) on rank %d: %s", self.epoch + 1,
                             len(newly_skipped), self.dist.rank, shown)

    def _run_steps(self, iterator, device, loss_sum: torch.Tensor, seen: torch.Tensor) -> None:
        while True:
            batches, fetched = self._fetch_step(iterator)
            if not fetched:
                return  # the epoch is over
            if not batches:  # every batch of the step was undecodable images (one process only)
                self.batches_done += fetched
                continue
            self._call("before_step")
            finite, loss, images, loss_terms = self._accumulate_and_step(batches, device)

            self.global_step += 1
            self.batches_done += fetched
            self.step_skipped = not finite
            if not finite and self.dist.is_main:
                self.log.warning("step %d (epoch %d): non-finite loss or gradients, step skipped (%d in a row, %d in "
                                 "total)", self.global_step, self.epoch + 1, self.nonfinite.consecutive + 1,
                                 self.nonfinite.total + 1)
            self.nonfinite.record(finite, self.global_step, self.epoch, self.last_good_checkpoint)
            self.last_loss = loss
            self.last_batch_size = images
            # Loss components stay on the device; the loggers read them every `log.every` steps.
            self.loss_terms = {f"train/{key}": value for key, value in loss_terms.items()}
            if finite:  # a skipped step's loss is not part of the epoch's mean
                loss_sum += self.last_loss.double() * self.last_batch_size
                seen += self.last_batch_size
            self._call("after_step")
            if self.stop_reason:  # only here, between optimizer steps: no half-accumulated gradient is lost
                return

    def _fetch_step(self, iterator) -> tuple[list, int]:
        """The next optimizer step's micro-batches: up to `accum_steps` loader batches (fewer at the end of the
        epoch), and how many loader batches were read (undecodable ones included: `batches_done` counts what the
        sampler must skip on resume). Fetched before any forward, because each micro-batch's loss weight is
        its share of the step's images."""
        batches, fetched = [], 0
        for batch in itertools.islice(iterator, self.accum_steps):
            fetched += 1
            self.skipped_images.extend(batch[2])
            if batch[0] is None:  # the whole batch was undecodable images
                if self.dist.distributed:
                    # Skipping here would leave the other ranks waiting in their gradient all-reduce.
                    raise RuntimeError(f"rank {self.dist.rank}: every image of a batch is undecodable "
                                       f"({', '.join(batch[2][:5])} ...); clean the dataset or use one process")
                continue
            batches.append(batch)
        return batches, fetched

    def _prepare(self, batch, device):
        inputs, targets = self.task.prepare_batch(batch, device, training=True)
        # Images only: channels_last is a 4-D layout; a video clip (5-D) keeps its own and the model lays out its
        # frames (the weights of 2-D layers are channels_last already).
        if self.channels_last and isinstance(inputs, torch.Tensor) and inputs.dim() == 4:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        return inputs, targets

    def _gradient_sync(self, last: bool):
        """DDP all-reduces the gradients in every backward; when accumulating, only the step's last micro-batch
        needs it (the earlier gradients add up locally first), so the others run under `no_sync`, which must
        cover their forward too."""
        if last or self.ddp_model is None:
            return contextlib.nullcontext()
        return self.ddp_model.no_sync()

    def _accumulate_and_step(self, batches: list, device) -> tuple[bool, torch.Tensor, int, dict[str, torch.Tensor]]:
        """Forward and backward every micro-batch of one optimizer step, then the step (unless non-finite).

        Each micro-batch's mean loss is weighted by its share of the step's images, n_i / N, so the accumulated
        gradient is exactly the gradient of the mean loss over all N images, even when the epoch's last
        micro-batch is smaller. (BatchNorm still normalises each micro-batch by its own statistics.) Returns
        (finite, the step's mean loss, N, the step's mean loss terms), all on the device."""
        prepared = [self._prepare(batch, device) for batch in batches]
        sizes = [len(inputs) for inputs, _ in prepared]  # a batch tensor's first dimension, or a detector's list
        total = sum(sizes)
        self.optimizer.zero_grad(set_to_none=True)
        step_loss: torch.Tensor | None = None
        step_terms: dict[str, torch.Tensor] = {}
        for index, ((inputs, targets), size) in enumerate(zip(prepared, sizes)):
            with self._gradient_sync(last=index == len(prepared) - 1):
                with self.autocast():
                    loss, _, loss_terms = self.task.forward_loss(self.train_model, inputs, targets)
                share = size / total
                weighted = loss if size == total else loss * share
                (self.scaler.scale(weighted) if self.scaler is not None else weighted).backward()
            step_loss = weighted.detach() if step_loss is None else step_loss + weighted.detach()
            for key, value in loss_terms.items():
                part = value.detach() if size == total else value.detach() * share
                step_terms[key] = part if key not in step_terms else step_terms[key] + part
        return self._step(step_loss), step_loss, total, step_terms

    def _step(self, loss: torch.Tensor) -> bool:
        """The optimizer step on the accumulated gradients, unless the loss or the gradients are non-finite on
        some rank. Returns whether the step counted as finite (a skipped step leaves the weights and optimizer
        untouched)."""
        if self.scaler is not None:
            # fp16: GradScaler skips overflowing steps itself and lowers its scale (kept as it is); a non-finite
            # loss is only counted, so that a run that diverges for good still stops. Its scale is constant over
            # the micro-batches of a step (it only changes in `update`), so they add up correctly.
            if self.clip_grad:
                self.scaler.unscale_(self.optimizer)
                nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_grad)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            return all_ranks_finite(loss)
        if self.clip_grad:
            norm = nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_grad)
        else:
            norm = grad_norm(self.model.parameters())
        if not all_ranks_finite(loss, norm):
            self.optimizer.zero_grad(set_to_none=True)
            return False
        self.optimizer.step()
        return True

    # ---------------------------------------------------------------------------------------- evaluation
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        loader = with_progress(self.val_loader, self.eval_progress, f"eval {self.epoch + 1}/{self.epochs}")
        metrics = self.task.evaluate(model, loader, self.dist.device, self.autocast, self.channels_last)
        model.train()
        return metrics

    def improves(self, metrics: dict[str, float]) -> bool:
        """The one rule for "best": the task's primary metric strictly above the best so far, so on a tie the
        earlier epoch stays best (in metrics.json, the final JSON and best.pt alike)."""
        key = self.task.primary_metric
        return metrics.get(key, float("-inf")) > self.best_metrics.get(key, float("-inf"))

    def record_eval(self, metrics: dict[str, float]) -> None:
        self.metrics = {**metrics, "epoch": self.epoch + 1, "train_loss": self.epoch_loss,
                        "nonfinite_steps": self.nonfinite.total}
        self.is_best = self.improves(metrics)
        if self.is_best:
            self.best_metrics = dict(self.metrics)
        self.log.info("epoch %d/%d: %s", self.epoch + 1, self.epochs,
                      " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in self.metrics.items()))

    # ---------------------------------------------------------------------------------------- checkpoints
    def checkpoint_payload(self, *, epochs_done: int, batches_done: int) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "hooks": {type(h).__name__: h.state_dict() for h in self.hooks if h.state_dict()},
            "epoch": epochs_done,
            "batches_done": batches_done,
            "global_step": self.global_step,
            "rng": capture_rng_state(),
            "metrics": dict(self.metrics),
            "best_metrics": dict(self.best_metrics),
            "nonfinite": self.nonfinite.state_dict(),
            "world_size": self.dist.world_size,
            "config": self.config,
        }

    def resume(self, payload: dict[str, Any]) -> None:
        self.model.load_state_dict(payload["model"])
        self.optimizer.load_state_dict(payload["optimizer"])
        # The lr schedule is not restored: timm's schedulers are functions of the update count, which
        # LRScheduleHook re-applies from global_step, and their saved state holds the old run's length
        # (t_initial), which would silently override a changed recipe.epochs when a run is extended.
        if self.scaler is not None and payload.get("scaler") is not None:
            self.scaler.load_state_dict(payload["scaler"])
        hook_states = payload.get("hooks", {})
        for hook in self.hooks:
            if type(hook).__name__ in hook_states:
                hook.load_state_dict(hook_states[type(hook).__name__])
        self.start_epoch = self.epoch = self.epochs_done = int(payload["epoch"])
        self.batches_done = int(payload.get("batches_done", 0))
        self.global_step = int(payload["global_step"])
        self.metrics = dict(payload.get("metrics", {}))
        self.best_metrics = dict(payload.get("best_metrics", {}))
        self.nonfinite.load_state_dict(payload.get("nonfinite", {}))
        self.resumed_from = self.start_epoch
        if payload.get("world_size", 1) == self.dist.world_size:
            restore_rng_state(payload["rng"])
