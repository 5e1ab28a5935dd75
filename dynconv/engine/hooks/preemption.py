"""SIGINT (Ctrl-C), SIGTERM and SIGUSR1 (SLURM preemption, `scancel --signal`) stop the run cleanly at the next step
boundary: the checkpoint hook saves `last.pt`, the final JSON is printed, and the exit code is 128 + the signal.

The handler only sets a flag; the hook turns it into a stop request on every rank at the same step (so DDP ranks
never wait on each other). A second Ctrl-C does not wait for the step boundary: it raises KeyboardInterrupt at
once (nothing is saved then; the last epoch's checkpoint stays). The previous handlers are restored however
training ends, so a signal after training (or after an exception) acts as it normally would.
"""

from __future__ import annotations

import signal

from dynconv.engine.distributed import any_rank
from dynconv.engine.hooks.base import Hook


class PreemptionHook(Hook):
    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)

    def __init__(self, every: int = 10):
        # Across ranks the flag is agreed on by an all-reduce whose result the host must read (a device
        # sync on GPUs), so DDP checks every `every` steps rather than every step; one process checks each step.
        self.every = max(int(every), 1)
        self.received: int | None = None
        self._previous = {}
        self._log = None

    def _handle(self, signum, frame):
        if signum == signal.SIGINT and self.received == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: abort now
        self.received = signum
        if signum == signal.SIGINT and self._log is not None:
            self._log.warning("Ctrl-C: stopping at the next step and saving last.pt (Ctrl-C again to abort now)")

    def before_train(self, trainer):
        self._log = trainer.log
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def after_step(self, trainer):
        if trainer.dist.distributed and trainer.global_step % self.every:
            return
        if any_rank(self.received is not None, trainer.dist.device):
            name = signal.Signals(self.received).name if self.received else "a signal on another rank"
            trainer.request_stop(f"received {name}", exit_code=128 + (self.received or signal.SIGTERM))

    def close(self, trainer):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
