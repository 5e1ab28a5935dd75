"""Temperature schedules for softmax/sigmoid attentions of dynamic convolutions.

DY-Conv (Chen et al., CVPR 2020, Sec. 3: softmax with temperature) and ODConv (Li et al., ICLR 2022) divide their
attention logits by a temperature T, softmax(z / T), with T annealed linearly from 30 to 1 over the
first 10 epochs, so that early in training every kernel receives gradient (near-uniform attention).

The schedule belongs to the module (not to the training loop): a module that defines
`set_training_progress(epoch) -> dict` is driven every iteration by
`dynconv.engine.hooks.operator_schedule.OperatorScheduleHook`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LinearTemperature:
    """T(e) = start + (end - start) * min(e / epochs, 1) at fractional epoch e >= 0."""

    start: float = 30.0
    end: float = 1.0
    epochs: float = 10.0

    def __post_init__(self):
        for key in ("start", "end"):
            value = getattr(self, key)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"temperature {key}={value!r} must be a finite number > 0")
        if not (isinstance(self.epochs, (int, float)) and self.epochs >= 0):
            raise ValueError(f"temperature epochs={self.epochs!r} must be a number >= 0")

    def __call__(self, epoch: float) -> float:
        if self.epochs == 0:  # no annealing: the end value from the first step
            return float(self.end)
        fraction = min(max(float(epoch), 0.0) / self.epochs, 1.0)
        return float(self.start + (self.end - self.start) * fraction)


class TemperatureMixin:
    """Gives an nn.Module an annealed temperature `self.temperature` and `set_training_progress`.

    The temperature is a registered buffer (a 0-d tensor), updated in place with `.fill_()`: it follows
    `.to(device)` / `.double()`, it is not a Parameter (no gradient, not counted as a parameter), and a
    compiled graph reads it as an input tensor, so changing it every step neither breaks the graph nor
    triggers a recompilation (a Python float attribute would be specialised on and recompile each step).
    It is *persistent* (saved in the state_dict): the schedule hook only runs before training steps, so a
    model restored from a checkpoint for evaluation or fine-tuning (eval.py, detection) must get its trained
    temperature (e.g. 1) from the checkpoint rather than the epoch-0 value (30), which would flatten the
    attention. On resume the hook overwrites it at the first step anyway.
    """

    def init_temperature(self, schedule: LinearTemperature) -> None:
        self.temperature_schedule = schedule
        # Start at the schedule's epoch-0 value, so a module used without the hook (eval, a test) still
        # behaves as at the start of training.
        self.register_buffer("temperature", torch.tensor(schedule(0.0)))

    @torch.no_grad()
    def set_training_progress(self, epoch: float) -> dict[str, float]:
        value = self.temperature_schedule(epoch)
        self.temperature.fill_(value)
        return {"temperature": value}


def read_temperature_schedule(knobs) -> LinearTemperature:
    """op.temperature_start / _end (> 0) and op.temperature_epochs (>= 0; 0 = no annealing), from an operator's
    `Knobs`."""
    return LinearTemperature(
        knobs.number("temperature_start", 0),
        knobs.number("temperature_end", 0),
        knobs.number("temperature_epochs", 0, inclusive=True),
    )
