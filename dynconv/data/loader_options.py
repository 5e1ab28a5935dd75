"""DataLoader settings every task's loaders share: worker options and fixed subsets for smoke runs."""

from __future__ import annotations

import signal
from typing import Any, Mapping

import torch

__all__ = ["fixed_subset", "ignore_stop_signals", "worker_options"]


def ignore_stop_signals(worker_id: int) -> None:
    """Workers ignore SIGTERM/SIGUSR1: SLURM signals every process of a job step, and a worker that died
    of it would crash the main process before it could save its preemption checkpoint. The main process
    shuts its workers down itself when it exits."""
    for sig in (signal.SIGTERM, signal.SIGUSR1):
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


def worker_options(data_cfg: Mapping[str, Any], pin_memory: bool | None) -> dict[str, Any]:
    """The DataLoader's worker settings from the data config (`pin_memory=None`: the config's)."""
    num_workers = int(data_cfg.get("num_workers", 0) or 0)
    if pin_memory is None:
        pin_memory = bool(data_cfg.get("pin_memory", False))
    return dict(
        num_workers=num_workers,
        pin_memory=bool(pin_memory) and torch.cuda.is_available(),
        persistent_workers=bool(data_cfg.get("persistent_workers", False)) and num_workers > 0,
        worker_init_fn=ignore_stop_signals,
    )
