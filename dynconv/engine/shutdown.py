"""Ending a process with DataLoader workers, on every path: no run that raised may wait forever.

The workers ignore SIGTERM/SIGINT on purpose (dynconv/data/loader_options.py: a preemption signal must reach only
the main process, which saves first). Python's multiprocessing, at exit, sends SIGTERM to every daemonic child and
then joins it *without a timeout*: a worker that ignores SIGTERM keeps the process alive forever. That happens
whenever the workers were not shut down before exit, e.g. when an exception left the loader's iterator alive in
its traceback. Two layers prevent it:

- `shutdown_loader` stops a loader's workers politely (the loader's own shutdown: a done event, then join);
  the trainer calls it for its loaders when training ends, however it ends;
- `reap_children`, registered with atexit *after* multiprocessing's own exit hook (atexit runs last-in
  first-out, so ours runs first), joins what is left for a short grace period and SIGKILLs the rest.
"""

from __future__ import annotations

import atexit
import logging
import multiprocessing
from typing import Any

log = logging.getLogger("dynconv")

GRACE_S = 5.0  # a worker told to stop exits in milliseconds; one that has not after this will not


def shutdown_loader(loader: Any) -> None:
    """Stop the worker processes of a DataLoader's live iterator (persistent workers included), if any."""
    iterator = getattr(loader, "_iterator", None)
    if iterator is not None and hasattr(iterator, "_shutdown_workers"):
        iterator._shutdown_workers()
        loader._iterator = None


def shutdown_iterator(iterator: Any) -> None:
    """Stop the workers of one DataLoader iterator (a non-persistent loader's epoch iterator)."""
    if hasattr(iterator, "_shutdown_workers"):
        iterator._shutdown_workers()


def reap_children(grace_s: float = GRACE_S) -> list[int]:
    """Join every child process for up to `grace_s` seconds in total, SIGKILL those still alive; return their pids."""
    import time

    deadline = time.monotonic() + grace_s
    killed = []
    for child in multiprocessing.active_children():
        child.join(max(0.0, deadline - time.monotonic()))
        if child.is_alive():
            killed.append(child.pid)
            child.kill()
            child.join(1.0)
    if killed:
        log.warning("killed %d child process(es) that did not stop: %s", len(killed), killed)
    return killed


_installed = False


def install_exit_reaper() -> None:
    """Register `reap_children` to run at interpreter exit, before multiprocessing's unbounded join."""
    global _installed
    if not _installed:
        import multiprocessing.util  # noqa: F401  (its exit hook must be registered first, so it runs after ours)

        atexit.register(reap_children)
        _installed = True
