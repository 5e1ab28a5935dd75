"""Resuming: extending a finished run, and stopping on SIGTERM/SIGUSR1 then rerunning the same command.

The property that matters is that a resumed run is the run that would have happened without the
interruption: same weights, same metrics, and the rerun of the *same command* is all it takes.
"""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from conftest import CONDCONV2, REPO, SMOKE, describe, last_json_line, train_command


def _start(args, run_dir: Path, train_env, extra_env=None) -> subprocess.Popen:
    return subprocess.Popen(train_command([*args, f"hydra.run.dir={run_dir}"], None), cwd=REPO,
                            env=train_env(extra_env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(process: subprocess.Popen, timeout: float = 300):
    stdout, stderr = process.communicate(timeout=timeout)
    completed = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
    return completed, last_json_line(stdout)


def _run(args, run_dir, train_env, extra_env=None):
    return _finish(_start(args, run_dir, train_env, extra_env))


def _max_state_diff(path_a: Path, path_b: Path) -> float:
    a = torch.load(path_a, weights_only=True)["model"]
    b = torch.load(path_b, weights_only=True)["model"]
    assert a.keys() == b.keys()
    diff = 0.0
    for key in a:
        assert a[key].shape == b[key].shape, key
        if a[key].is_floating_point():
            diff = max(diff, (a[key].double() - b[key].double()).abs().max().item())
        else:
            assert torch.equal(a[key], b[key]), key
    return diff


# Two processes run side by side below; one thread each keeps them from fighting over the 2 cores.
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

EXTEND_CASES = [
    pytest.param(["data.num_workers=0"], id="cosine-workers0"),
    pytest.param(["recipe.sched=step", "data.num_workers=2"], id="step-workers2"),
]


@pytest.mark.parametrize("variant", EXTEND_CASES)
def test_extending_a_finished_run_equals_an_uninterrupted_run(train_env, tmp_path, variant):
    """A 1-epoch run, rerun in the same run dir with recipe.epochs=2, ends with the weights (<= 1e-6, in
    practice bitwise) and top-1 of a straight 2-epoch run, and reports resumed_from=1.

    This covers what a resume must restore: weights, optimizer momentum, lr schedule position, RNG and the
    data order of the next epoch. The step-schedule variant also uses 2 loader worker processes.
    """
    # deterministic=true: bitwise equality needs the same convolution algorithms in both runs (the measured
    # choice, like cuDNN's autotuner, may differ between runs).
    base = [*CONDCONV2, *SMOKE, "deterministic=true", *variant]
    reference = _start([*base, "recipe.epochs=2"], tmp_path / "straight", train_env, ONE_THREAD)
    first = _start([*base, "recipe.epochs=1"], tmp_path / "resumed", train_env, ONE_THREAD)
    ref_completed, ref_result = _finish(reference)
    first_completed, first_result = _finish(first)
    assert ref_completed.returncode == 0, describe(ref_completed)
    assert first_completed.returncode == 0, describe(first_completed)
    assert first_result["epochs"] == 1 and first_result["resumed_from"] is None

    completed, result = _run([*base, "recipe.epochs=2"], tmp_path / "resumed", train_env, ONE_THREAD)
    assert completed.returncode == 0, describe(completed)
    assert result["resumed_from"] == 1
    assert result["epochs"] == 2 and result["status"] == "completed"
    diff = _max_state_diff(tmp_path / "straight" / "checkpoints" / "last.pt",
                           tmp_path / "resumed" / "checkpoints" / "last.pt")
    assert diff <= 1e-6, f"resumed weights differ from the uninterrupted run by {diff}"
    assert result["top1"] == ref_result["top1"]
    assert result["loss"] == pytest.approx(ref_result["loss"], abs=1e-6)


SIGNAL_ARGS = [*CONDCONV2, *SMOKE, "data.max_train_samples=256", "recipe.batch_size=16", "recipe.epochs=3",
               "deterministic=true"]


def _wait_for(path: Path, process: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if process.poll() is not None:
            stdout, stderr = process.communicate()
            pytest.fail(f"train.py exited ({process.returncode}) before writing {path}:\n{stderr[-3000:]}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"{path} did not appear within {timeout}s")
        time.sleep(0.1)


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
def test_signal_stops_cleanly_and_rerun_resumes(train_env, tmp_path, signum):
    """SIGTERM/SIGUSR1 mid-epoch: a checkpoint at the next step boundary, a "stopped" JSON, exit 128+signum;
    rerunning the same command resumes from it and completes all 3 epochs.

    For SIGTERM an uninterrupted run of the same command runs alongside: the stop/resume run must end with the
    same weights and top-1, whatever step the signal happened to land on (mid-epoch resume skips exactly the
    batches already trained).
    """
    run_dir = tmp_path / "run"
    reference = _start(SIGNAL_ARGS, tmp_path / "straight", train_env, ONE_THREAD) if signum == signal.SIGTERM else None
    process = _start(SIGNAL_ARGS, run_dir, train_env, ONE_THREAD)
    last = run_dir / "checkpoints" / "last.pt"
    _wait_for(last, process)  # written at the end of epoch 1: training is under way, the handler installed
    process.send_signal(signum)
    completed, result = _finish(process)
    assert completed.returncode == 128 + signum, describe(completed)
    assert result is not None, describe(completed)
    assert result["status"] == "stopped"
    assert signal.Signals(signum).name in result.get("stop_reason", "")
    assert result["epochs"] < 3
    payload = torch.load(last, weights_only=True)
    assert payload["batches_done"] > 0 or payload["epoch"] > 1, "the stop did not save a mid-run checkpoint"
    stopped_at = (payload["epoch"], payload["batches_done"])

    completed, result = _run(SIGNAL_ARGS, run_dir, train_env, ONE_THREAD)
    assert completed.returncode == 0, describe(completed)
    assert isinstance(result["resumed_from"], int) and result["resumed_from"] == stopped_at[0]
    assert result["status"] == "completed" and result["epochs"] == 3
    assert f"resuming: run {run_dir}" in (run_dir / "train.log").read_text()

    if reference is not None:
        ref_completed, ref_result = _finish(reference)
        assert ref_completed.returncode == 0, describe(ref_completed)
        diff = _max_state_diff(tmp_path / "straight" / "checkpoints" / "last.pt", last)
        assert diff <= 1e-6, f"stopped at {stopped_at}: resumed weights differ by {diff}"
        assert result["top1"] == ref_result["top1"]
