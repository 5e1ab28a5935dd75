"""Rerunning the same command resumes the same run (its folder is named by a hash of the config), and Ctrl-C
stops a run cleanly: checkpoint saved, final JSON printed, exit 130, no traceback; the rerun resumes it."""

from __future__ import annotations

import signal
import subprocess
import time

from conftest import REPO, SMOKE, describe, last_json_line, train_command
from dynconv.engine.run_naming import config_fingerprint

RUN = [*SMOKE, "op=static"]


def _launch(train_env, outputs, *extra, env=None):
    return subprocess.Popen(train_command([*RUN, *extra], None), cwd=REPO,
                            env=train_env({"DYNCONV_OUTPUT_DIR": str(outputs), **(env or {})}),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(process, timeout=300):
    stdout, stderr = process.communicate(timeout=timeout)
    completed = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
    return completed, last_json_line(stdout)


def test_the_same_command_finds_its_run_again_and_resume_never_starts_a_new_one(train_env, tmp_path):
    outputs = tmp_path / "outputs"
    first, result = _finish(_launch(train_env, outputs, "recipe.epochs=1"))
    assert first.returncode == 0, describe(first)
    run_dir = result["run_dir"]
    assert run_dir.startswith(str(outputs / "resnet18-static-digits")), run_dir

    again, second = _finish(_launch(train_env, outputs, "recipe.epochs=1"))
    assert again.returncode == 0, describe(again)
    assert second["run_dir"] == run_dir and second["resumed_from"] == 1
    assert second["resumed_checkpoint"] == f"{run_dir}/checkpoints/last.pt"
    assert "already complete: run" in again.stdout + again.stderr

    fresh, third = _finish(_launch(train_env, outputs, "recipe.epochs=1", "resume=never"))
    assert fresh.returncode == 0, describe(fresh)
    assert third["run_dir"] != run_dir and third["run_dir"].startswith(run_dir + "-")
    assert third["resumed_from"] is None

    changed, fourth = _finish(_launch(train_env, outputs, "recipe.epochs=1", "seed=1"))
    assert fourth["run_dir"] != run_dir and fourth["resumed_from"] is None, describe(changed)


def test_the_fingerprint_ignores_resume_logging_and_kernel_memory_only():
    base = {"seed": 0, "op": {"name": "kw"}, "resume": "auto", "log": {"every": 10}}
    assert config_fingerprint(base) == config_fingerprint({**base, "resume": "never", "log": {"every": 1}})
    # Kernels kept or remade in the backward: the same numbers, the same run (and a run of an earlier version,
    # which had no kernel_memory key, keeps its folder).
    assert config_fingerprint(base) == config_fingerprint({**base, "kernel_memory": "recompute"})
    assert config_fingerprint(base) != config_fingerprint({**base, "seed": 1})


def test_keys_added_at_their_neutral_value_keep_the_folder_of_runs_started_before_them():
    """`init_from_static: null` and KernelWarehouse's `op.layout: paper` were added after runs were named: a run
    started before them keeps its folder (and resumes); another value is another run."""
    before = {"seed": 0, "op": {"name": "kw", "b": 1}}
    after = {**before, "init_from_static": None, "op": {**before["op"], "layout": "paper"}}
    assert config_fingerprint(after) == config_fingerprint(before)
    assert after["op"]["layout"] == "paper" and "init_from_static" in after  # the caller's config is untouched
    assert config_fingerprint({**after, "op": {**after["op"], "layout": "release"}}) != config_fingerprint(before)
    assert config_fingerprint({**after, "init_from_static": "static.pt"}) != config_fingerprint(before)


def test_ctrl_c_saves_prints_the_final_json_and_the_same_command_resumes(train_env, tmp_path):
    outputs = tmp_path / "outputs"
    args = ["recipe.epochs=3", "data.max_train_samples=384", "data.num_workers=2"]
    process = _launch(train_env, outputs, *args, env={"DYNCONV_FAULTS": ""})
    checkpoints = None
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:  # interrupt once the first epoch's checkpoint exists: mid-training
        found = list(outputs.glob("*/*/checkpoints/last.pt"))
        if found:
            checkpoints = found[0].parent
            break
        time.sleep(0.2)
    assert checkpoints is not None, "no checkpoint appeared"
    process.send_signal(signal.SIGINT)
    completed, result = _finish(process)
    assert completed.returncode == 130, describe(completed)
    assert "Traceback" not in completed.stderr, describe(completed)
    assert result["status"] == "stopped" and result["stop_reason"] == "received SIGINT", result

    import torch

    saved = torch.load(checkpoints / "last.pt", weights_only=True)
    assert (saved["epoch"], saved["batches_done"]) > (1, 0) or saved["epoch"] >= 2, "Ctrl-C saved nothing new"

    resumed, final = _finish(_launch(train_env, outputs, *args))
    assert resumed.returncode == 0, describe(resumed)
    assert final["status"] == "completed" and final["epochs"] == 3
    assert final["run_dir"] == result["run_dir"] and final["resumed_checkpoint"].endswith("last.pt")
