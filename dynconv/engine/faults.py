"""Injected failures for the reliability tests and `scripts/chaos.py`: `DYNCONV_FAULTS=<spec>[;<spec>...]`.

Each spec is `<what>@<when>[,<condition>...]`; nothing here runs unless the variable is set.

    nan_loss@steps=3-5        the model's output is NaN at global steps 3..5 (a forward hook on the model)
    raise@step=4              the forward pass of step 4 raises RuntimeError (an error inside a training step)
    kill@step=7               SIGKILL this process at the start of step 7
    kill@eval_batch=2         SIGKILL it at the 2nd evaluation batch (during evaluation)
    kill@checkpoint_write=1   SIGKILL it half-way through writing the 1st checkpoint (a hard kill mid-write)
    oserror@checkpoint_write=2,errno=ENOSPC   the 2nd checkpoint write fails (disk full; EROFS: read-only)

Conditions: `rank=R` (only that rank), `attempt=N` (only the N-th torchrun attempt: TORCHELASTIC_RESTART_COUNT,
0 for the first; so that a restarted job does not fail again). A self-SIGKILL is indistinguishable from a kill
by anyone else at that moment: no handler, no cleanup, no flush.
"""

from __future__ import annotations

import errno as errno_codes
import io
import os
import signal
from dataclasses import dataclass, field
from typing import Any

import torch

from dynconv.engine import checkpoint
from dynconv.engine.hooks.base import Hook

ENV_VAR = "DYNCONV_FAULTS"
KINDS = ("nan_loss", "raise", "kill", "oserror")
WHEN_KEYS = ("step", "steps", "eval_batch", "checkpoint_write")


@dataclass
class Fault:
    kind: str
    when: str  # one of WHEN_KEYS
    first: int
    last: int
    options: dict[str, str] = field(default_factory=dict)

    def due(self, count: int) -> bool:
        return self.first <= count <= self.last


def parse_faults(text: str) -> list[Fault]:
    faults = []
    for spec in filter(None, (part.strip() for part in text.split(";"))):
        kind, _, rest = spec.partition("@")
        items = dict(item.split("=", 1) for item in rest.split(",") if "=" in item)
        when = next((key for key in WHEN_KEYS if key in items), None)
        if kind not in KINDS or when is None:
            expected = f"<{'|'.join(KINDS)}>@<{'|'.join(WHEN_KEYS)}>=N"
            raise ValueError(f"{ENV_VAR}: cannot parse {spec!r}; expected {expected}")
        low, _, high = items.pop(when).partition("-")
        faults.append(Fault(kind, "step" if when == "steps" else when, int(low), int(high or low), items))
    return faults


def _applies(fault: Fault, rank: int) -> bool:
    if "rank" in fault.options and int(fault.options["rank"]) != rank:
        return False
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    return "attempt" not in fault.options or int(fault.options["attempt"]) == attempt


def _kill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _poison(output: Any) -> Any:
    if isinstance(output, torch.Tensor):
        return output * float("nan")
    if isinstance(output, dict):
        return {key: _poison(value) for key, value in output.items()}
    return output


class FaultHook(Hook):
    """Applies the step and evaluation faults through a forward hook on the model."""

    def __init__(self, faults: list[Fault]):
        self.faults = faults
        self.eval_batches = 0
        self.handle = None

    def before_train(self, trainer):
        self.trainer = trainer
        self.handle = trainer.model.register_forward_hook(self._forward_hook)

    def before_step(self, trainer):
        step = trainer.global_step + 1
        if any(f.kind == "kill" and f.when == "step" and f.due(step) for f in self.faults):
            _kill_self()

    def _forward_hook(self, module, inputs, output):
        if not module.training:
            self.eval_batches += 1
            if any(f.kind == "kill" and f.when == "eval_batch" and f.due(self.eval_batches) for f in self.faults):
                _kill_self()
            return output
        step = self.trainer.global_step + 1
        for fault in self.faults:
            if fault.when == "step" and fault.due(step):
                if fault.kind == "raise":
                    raise RuntimeError(f"injected failure in the forward pass of step {step} ({ENV_VAR})")
                if fault.kind == "nan_loss":
                    return _poison(output)
        return output

    def close(self, trainer):
        if self.handle is not None:
            self.handle.remove()


def _wrap_checkpoint_writes(faults: list[Fault]) -> None:
    """Make the n-th `checkpoint.serialize` call fail: a SIGKILL after half the bytes, or an OSError."""
    original = checkpoint.serialize
    calls = {"n": 0}

    def serialize(payload, handle):
        calls["n"] += 1
        for fault in faults:
            if not fault.due(calls["n"]):
                continue
            if fault.kind == "oserror":
                code = getattr(errno_codes, fault.options.get("errno", "ENOSPC"))
                handle.write(b"\0" * 4096)  # a partial file, as a full disk leaves it
                raise OSError(code, os.strerror(code))
            if fault.kind == "kill":
                buffer = io.BytesIO()
                original(payload, buffer)
                data = buffer.getvalue()
                handle.write(data[: len(data) // 2])
                handle.flush()
                os.fsync(handle.fileno())
                _kill_self()
        original(payload, handle)

    checkpoint.serialize = serialize


def fault_hooks(dist) -> list[Hook]:
    """The hooks (and write wrappers) for the faults in DYNCONV_FAULTS that apply to this rank and attempt."""
    text = os.environ.get(ENV_VAR, "")
    if not text:
        return []
    faults = [fault for fault in parse_faults(text) if _applies(fault, dist.rank)]
    writes = [fault for fault in faults if fault.when == "checkpoint_write"]
    if writes:
        _wrap_checkpoint_writes(writes)
    others = [fault for fault in faults if fault.when != "checkpoint_write"]
    return [FaultHook(others)] if others else []
