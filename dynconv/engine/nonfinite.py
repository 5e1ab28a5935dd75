"""Non-finite losses and gradients: skip the step, count it, stop after too many in a row; never save NaN weights.

A NaN or Inf that reaches the optimizer poisons every weight it touches, and from then on the run only burns
compute. The guard decides once per step, on every rank alike (one tiny all-reduce of a 0/1 flag in DDP; one
host synchronisation per step, as detectron2's check): a step whose loss or gradient norm is non-finite is
skipped (no optimizer step, no EMA update) and counted. `nonfinite.max_consecutive` skipped steps in a row stop
the run with `NonFiniteError` (exit 3), naming the step and the last good checkpoint.

With fp16 AMP, GradScaler already skips steps whose gradients overflow and lowers its scale: that is its normal
behaviour and is left alone; only a non-finite *loss* is counted there.
"""

from __future__ import annotations

from typing import Callable, Iterable, Mapping

import torch
import torch.distributed as dist

from dynconv.engine.failures import NonFiniteError


def grad_norm(parameters: Iterable[torch.Tensor]) -> torch.Tensor:
    """The 2-norm of all gradients (non-finite if any gradient is), computed on the device without a sync."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)).float())


def all_ranks_finite(*values: torch.Tensor) -> bool:
    """True when every value is finite on every rank (a MIN all-reduce of one flag, then one host read)."""
    flag = torch.stack([torch.isfinite(v.detach().float()).all() for v in values]).all().float()
    if dist.is_available() and dist.is_initialized():
        flag = flag.reshape(1).clone()
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item() > 0)


def first_non_finite(state: Mapping[str, torch.Tensor]) -> str | None:
    """The name of the first floating-point tensor in a state dict with a NaN or Inf, or None."""
    for name, value in state.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point() and not torch.isfinite(value).all():
            return name
    return None


class NonFiniteGuard:
    """Counts skipped steps; raises once `max_consecutive` steps in a row were non-finite."""

    def __init__(self, max_consecutive: int):
        self.max_consecutive = max(int(max_consecutive), 1)
        self.consecutive = 0
        self.total = 0
        self.first_bad_step: int | None = None

    def record(self, finite: bool, step: int, epoch: int, last_good: Callable[[], str | None]) -> None:
        """Record the outcome of step `step` (1-based global step); raise NonFiniteError when the limit is hit
        (`last_good()` names the newest checkpoint on disk; asked only then)."""
        if finite:
            self.consecutive, self.first_bad_step = 0, None
            return
        self.total += 1
        self.consecutive += 1
        if self.first_bad_step is None:
            self.first_bad_step = step
        if self.consecutive >= self.max_consecutive:
            good = last_good()
            steps = f"step {step}" if self.consecutive == 1 else f"steps {self.first_bad_step}-{step}"
            rerun = ("rerun the same command to resume from that checkpoint" if good
                     else "no epoch had finished, so a rerun starts from scratch")
            raise NonFiniteError(
                f"the loss or the gradients were non-finite (NaN/Inf) at {steps} (epoch {epoch + 1}; "
                f"{self.consecutive} in a row, nonfinite.max_consecutive={self.max_consecutive}); every one was "
                f"skipped and no non-finite weight was saved. Last good checkpoint: {good or 'none'}. Lower "
                f"recipe.lr, set recipe.clip_grad, or check the data; {rerun}")

    def state_dict(self) -> dict[str, int]:
        return {"total": self.total}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self.total = int(state.get("total", 0))


def check_state_finite(state: Mapping[str, torch.Tensor], what: str, path: str) -> None:
    """Refuse to write `path` when `state` holds a non-finite tensor (the previous file stays as it is)."""
    bad = first_non_finite(state)
    if bad is not None:
        raise NonFiniteError(f"{what} has a non-finite value in {bad}: not writing {path} (the file on disk, if "
                             "any, is the last good one)")
