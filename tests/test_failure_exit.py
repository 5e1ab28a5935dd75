"""A run that fails must end: non-zero exit, a final JSON line, no worker process left behind, never a hang.

The bug this guards against: an exception in a training step with DataLoader workers left the process waiting
forever, because multiprocessing's exit hook joins its daemonic children without a timeout after sending them
SIGTERM, which dynconv's workers ignore (so that a preemption signal reaches only the main process).
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from conftest import REPO, SMOKE, describe, last_json_line, train_command
from dynconv.engine.shutdown import reap_children

WITH_WORKERS = [arg for arg in SMOKE if not arg.startswith("data.num_workers")] + [
    "op=static", "data.num_workers=2", "data.persistent_workers=true"]


def _processes_with_marker(marker: str) -> list[int]:
    """Pids of live processes whose environment holds `marker` (the run and any worker it forked)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if marker.encode() in Path(f"/proc/{pid}/environ").read_bytes():
                found.append(int(pid))
        except OSError:
            continue
    return found


def test_an_exception_in_a_training_step_with_workers_exits_non_zero_without_leftovers(train_env, tmp_path):
    marker = f"DYNCONV_TEST_MARKER={uuid.uuid4().hex}"
    key, value = marker.split("=")
    env = train_env({"DYNCONV_FAULTS": "raise@step=2", key: value})
    started = time.monotonic()
    completed = subprocess.run(train_command(WITH_WORKERS, tmp_path), cwd=REPO, env=env, capture_output=True,
                               text=True, timeout=180)
    elapsed = time.monotonic() - started
    assert completed.returncode == 1, describe(completed)
    assert "injected failure in the forward pass of step 2" in completed.stderr, describe(completed)
    result = last_json_line(completed.stdout)
    assert result and result["status"] == "failed" and result["exit_code"] == 1, describe(completed)
    assert elapsed < 120, f"took {elapsed:.0f} s to exit"
    time.sleep(0.5)
    assert _processes_with_marker(marker) == [], "a worker process outlived the failed run"


def _ignore_sigterm_and_sleep():
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    time.sleep(600)


def test_reap_children_kills_a_child_that_ignores_sigterm():
    """The exit hook's last resort: a daemonic child that ignores SIGTERM is SIGKILLed after the grace period."""
    child = multiprocessing.get_context("fork").Process(target=_ignore_sigterm_and_sleep, daemon=True)
    child.start()
    time.sleep(0.2)
    started = time.monotonic()
    killed = reap_children(grace_s=0.5)
    assert child.pid in killed and not child.is_alive()
    assert time.monotonic() - started < 5


@pytest.mark.slow
def test_a_rank_that_raises_stops_every_rank(train_env, tmp_path):
    """Under torchrun, an exception on rank 1 ends the job with a non-zero exit (rank 0 sees the peer's connection
    close in its next collective, or is stopped by torchrun), well within dist.timeout_s."""
    args = [*[a for a in SMOKE if a != "recipe.epochs=2"], "op=static", "recipe.epochs=1", "device=cpu",
            "dist.timeout_s=60"]
    env = train_env({"DYNCONV_FAULTS": "raise@step=2,rank=1", "OMP_NUM_THREADS": "1"})
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--max-restarts=0"]
    started = time.monotonic()
    completed = subprocess.run(train_command(args, tmp_path, launcher=launcher), cwd=REPO, env=env,
                               capture_output=True, text=True, timeout=300)
    assert completed.returncode != 0, describe(completed)
    assert "injected failure" in completed.stdout + completed.stderr, describe(completed)
    assert time.monotonic() - started < 240
