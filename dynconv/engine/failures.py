"""Why a run stopped on its own, and the exit code each reason gets.

train.py turns a `RunFailure` into `error: <message>` on stderr, a final JSON line with `"status": "failed"`,
and the failure's exit code (a cluster scheduler, torchrun and a sweep see a non-zero exit, never a hang):

    2  the config or an input file is wrong (ConfigError, CorruptCheckpointError): nothing was trained
    3  the loss or the gradients stayed non-finite for `nonfinite.max_consecutive` steps (NonFiniteError)
    4  a checkpoint could not be written and `checkpoint.on_write_error=stop` (CheckpointWriteError)
    1  any other exception (a bug, a lost rank, an out-of-memory error): the traceback is printed
    128 + signal  stopped by SIGINT (130), SIGTERM (143) or SIGUSR1 (138) after saving `last.pt`
"""

from __future__ import annotations


class RunFailure(RuntimeError):
    """A run that cannot go on; the message says what happened and what is safe on disk."""

    exit_code = 1


class NonFiniteError(RunFailure):
    exit_code = 3


class CheckpointWriteError(RunFailure):
    exit_code = 4
