"""SIGTERM / SIGUSR1 (SLURM preemption, `scancel --signal`) stop the run cleanly at the next step boundary.

The handler only sets a flag; the hook turns it into a stop request on every rank at the same step
(so DDP ranks never wait on each other), and the checkpoint hook then saves before the loop exits.
"""

from __future__ import annotations

import signal

from dynconv.engine.distributed import any_rank
from dynconv.engine.hooks.base import Hook


class PreemptionHook(Hook):
    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self, every: int = 10):
        # Across ranks the flag is agreed on by an all-reduce whose result the host must read (a device
        # sync on GPUs), so DDP checks every `every` steps rather than every step; one process checks each step.
        self.every = max(int(every), 1)
        self.received: int | None = None
        self._previous = {}

    def _handle(self, signum, frame):
        self.received = signum

    def before_train(self, trainer):
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def after_step(self, trainer):
        if trainer.dist.distributed and trainer.global_step % self.every:
            return
        if any_rank(self.received is not None, trainer.dist.device):
            name = signal.Signals(self.received).name if self.received else "a signal on another rank"
            trainer.request_stop(f"received {name}", exit_code=128 + (self.received or signal.SIGTERM))

    def after_train(self, trainer):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
