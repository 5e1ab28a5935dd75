"""A loss or gradient that turns NaN: the step is skipped and counted; too many in a row stop the run (exit 3);
a non-finite weight is never written to last.pt or best.pt. NaNs are injected through a forward hook on the
model (DYNCONV_FAULTS=nan_loss@steps=A-B, dynconv/engine/faults.py)."""

from __future__ import annotations

import subprocess

import pytest
import torch

from conftest import REPO, SMOKE, describe, last_json_line, train_command
from dynconv.engine.failures import NonFiniteError
from dynconv.engine.nonfinite import NonFiniteGuard, check_state_finite

RUN = [*SMOKE, "op=static", "log.every=1"]


def _run(train_env, tmp_path, faults, *extra):
    completed = subprocess.run(train_command([*RUN, *extra], tmp_path), cwd=REPO,
                               env=train_env({"DYNCONV_FAULTS": faults}), capture_output=True, text=True, timeout=300)
    return completed, last_json_line(completed.stdout)


def _all_finite(path) -> bool:
    state = torch.load(path, weights_only=True)["model"]
    return all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def test_a_few_nan_steps_are_skipped_counted_and_the_run_completes(train_env, tmp_path):
    completed, result = _run(train_env, tmp_path, "nan_loss@steps=2-3", "nonfinite.max_consecutive=5")
    assert completed.returncode == 0, describe(completed)
    assert result["status"] == "completed" and result["nonfinite_steps"] == 2, result
    assert "step 2 (epoch 1): non-finite loss or gradients, step skipped" in completed.stdout + completed.stderr
    checkpoints = tmp_path / "run" / "checkpoints"
    assert _all_finite(checkpoints / "last.pt") and _all_finite(checkpoints / "best.pt")
    assert torch.load(checkpoints / "last.pt", weights_only=True)["metrics"]["nonfinite_steps"] == 2

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    counts = [event.value for event in events.Scalars("train/nonfinite_steps")]
    assert counts[0] == 0 and counts[-1] == 2


def test_a_diverged_run_stops_with_exit_3_naming_the_step_and_the_last_good_checkpoint(train_env, tmp_path):
    # Epoch 1 has steps 1-4 (128 images, batch 32); from step 6 on every step is NaN.
    completed, result = _run(train_env, tmp_path, "nan_loss@steps=6-100", "nonfinite.max_consecutive=2")
    assert completed.returncode == 3, describe(completed)
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    assert "steps 6-7 (epoch 2; 2 in a row, nonfinite.max_consecutive=2)" in completed.stderr, describe(completed)
    assert f"Last good checkpoint: {last}" in completed.stderr
    assert result["status"] == "failed" and result["exit_code"] == 3
    payload = torch.load(last, weights_only=True)
    assert payload["epoch"] == 1 and _all_finite(last)


def test_the_guard_counts_consecutive_steps_and_resets_on_a_good_one():
    guard = NonFiniteGuard(3)
    for step, finite in enumerate([False, False, True, False, False], start=1):
        guard.record(finite, step, 0, lambda: None)
    assert guard.total == 4 and guard.consecutive == 2
    with pytest.raises(NonFiniteError, match="steps 4-6 .* a rerun starts from scratch"):
        guard.record(False, 6, 0, lambda: None)


def test_a_non_finite_state_is_never_written(tmp_path):
    with pytest.raises(NonFiniteError, match="non-finite value in w: not writing"):
        check_state_finite({"w": torch.tensor([1.0, float("inf")])}, "the model", str(tmp_path / "last.pt"))
