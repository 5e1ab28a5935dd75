"""DataLoader settings every task's loaders share: worker options and fixed subsets for smoke runs."""

from __future__ import annotations

import os
import signal
from typing import Any, Mapping

import torch

from dynconv.config import ConfigError
from dynconv.knobs import is_int

__all__ = ["MAX_AUTO_WORKERS", "fixed_subset", "ignore_stop_signals", "resolve_num_workers", "usable_cpus",
           "worker_options"]

# `num_workers: auto` never asks for more: past ~8 decoding processes per training process, ImageNet-style
# pipelines stop getting faster, and each worker costs memory (a copy of the dataset's index, prefetched batches).
MAX_AUTO_WORKERS = 8


def ignore_stop_signals(worker_id: int) -> None:
    """Workers ignore SIGINT/SIGTERM/SIGUSR1: SLURM signals every process of a job step and a terminal's Ctrl-C
    reaches the whole foreground process group; a worker that died of it would crash the main process before it
    could save its checkpoint. The main process shuts its workers down itself (dynconv/engine/shutdown.py: also
    on an exception, with a SIGKILL at exit for any worker left)."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)


def fixed_subset(size: int, max_samples) -> list[int] | None:
    """Sorted indices of a fixed random subset of at most `max_samples` of `size` items (for smoke tests and
    debugging runs), or None when everything is kept.

    The subset depends only on the size, not on the run's seed, so runs that differ in seed still see the
    same images.
    """
    if max_samples is None or int(max_samples) >= size:
        return None
    chosen = torch.randperm(size, generator=torch.Generator().manual_seed(0))[: int(max_samples)]
    return sorted(chosen.tolist())


def usable_cpus() -> int:
    """The CPUs this process may run on: its affinity mask where the OS has one (a SLURM or container CPU
    limit shows there, not in os.cpu_count()), else the machine's count."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def resolve_num_workers(value: Any) -> int:
    """`data.num_workers` as a count: `auto` is min(MAX_AUTO_WORKERS, usable CPUs), so a small machine does not
    get more workers than cores (torch warns about that for every loader); an integer >= 0 is used as given.
    None (an unset value) means no workers."""
    if value is None:
        return 0
    if value == "auto":
        return min(MAX_AUTO_WORKERS, usable_cpus())
    if not is_int(value) or value < 0:
        raise ConfigError(f"data.num_workers={value!r} is invalid; allowed values: auto, integers >= 0")
    return int(value)


def worker_options(data_cfg: Mapping[str, Any], pin_memory: bool | None) -> dict[str, Any]:
    """The DataLoader's worker settings from the data config (`pin_memory=None`: the config's)."""
    num_workers = resolve_num_workers(data_cfg.get("num_workers", 0))
    if num_workers > 0:
        from dynconv.engine.shutdown import install_exit_reaper

        install_exit_reaper()  # workers ignore SIGTERM: no exit path may wait on them forever
    if pin_memory is None:
        pin_memory = bool(data_cfg.get("pin_memory", False))
    return dict(
        num_workers=num_workers,
        pin_memory=bool(pin_memory) and torch.cuda.is_available(),
        persistent_workers=bool(data_cfg.get("persistent_workers", False)) and num_workers > 0,
        worker_init_fn=ignore_stop_signals,
    )
