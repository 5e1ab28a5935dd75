"""The run record (`run` in the final JSON line and metrics.json, and run.json): what `scripts/reproduce.py collect`
reads to place a run (its overrides, config hash, seed), trust it (git commit, versions, effective batch) and date
it; run.json is written when training starts, so a run that crashed is still listed with its overrides."""

from __future__ import annotations

import json
import subprocess
from datetime import datetime, timezone
from importlib.metadata import version
from pathlib import Path

import torch

from conftest import REPO, SMOKE, describe
from dynconv.engine.training_run import git_commit, task_overrides

RECORD_KEYS = {"overrides", "config_hash", "seed", "git_commit", "world_size", "accum_steps", "effective_batch",
               "started", "finished", "dynconv_version", "torch_version", "smoke"}
ARGS = [*SMOKE, "op=static", "recipe.epochs=1", "seed=3"]


def _head() -> str | None:
    try:
        return subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def _utc(text: str) -> datetime:
    moment = datetime.fromisoformat(text)
    assert moment.utcoffset() is not None and moment.utcoffset().total_seconds() == 0, text
    return moment


def test_a_finished_run_records_how_it_was_launched(run_train, tmp_path):
    """Run in the folder named by its config hash (no hydra.run.dir): the record's hash is that name, its
    overrides are the command line's, and metrics.json, run.json and the final JSON line hold the same record."""
    before = datetime.now(timezone.utc).replace(microsecond=0)
    completed, result = run_train(ARGS, None, env={"DYNCONV_OUTPUT_DIR": str(tmp_path / "out")})
    assert completed.returncode == 0, describe(completed)
    run_dir = Path(result["run_dir"])
    record = result["run"]
    assert set(record) == RECORD_KEYS, record
    assert record["overrides"] == ARGS
    assert record["config_hash"] == run_dir.name and run_dir.parent.name == "resnet18-static-digits"
    assert (record["seed"], record["world_size"], record["accum_steps"], record["effective_batch"]) == (3, 1, 1, 32)
    head = _head()
    if head is None:  # a copy of the sources without .git
        assert record["git_commit"] is None
    else:
        assert record["git_commit"] in (head, f"{head}+dirty")
    assert record["dynconv_version"] == version("dynconv") and record["torch_version"] == torch.__version__
    assert record["smoke"] is False
    assert before <= _utc(record["started"]) <= _utc(record["finished"]) <= datetime.now(timezone.utc)
    assert json.loads((run_dir / "metrics.json").read_text())["run"] == record
    assert json.loads((run_dir / "run.json").read_text()) == record


def test_run_json_is_written_before_training_so_a_crashed_run_is_collected(run_train, tmp_path):
    """A run whose first step raises leaves run.json (overrides, not finished) and no metrics.json."""
    args = [*ARGS, "reproduce.smoke=true"]
    completed, result = run_train(args, tmp_path, env={"DYNCONV_FAULTS": "raise@step=1"})
    assert completed.returncode == 1 and result["status"] == "failed", describe(completed)
    run_dir = tmp_path / "run"
    record = json.loads((run_dir / "run.json").read_text())
    assert record["overrides"] == args  # hydra.run.dir is Hydra's own override, not the task's
    assert record["finished"] is None and record["smoke"] is True
    assert not (run_dir / "metrics.json").exists()


def test_git_commit_marks_changes_and_is_none_outside_a_checkout(tmp_path):
    def git(*args):
        return subprocess.run(["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t", *args],
                              capture_output=True, text=True, check=True).stdout.strip()

    assert git_commit(tmp_path) is None  # not a git checkout (yet)
    git("init", "-q")
    (tmp_path / "a.txt").write_text("a")
    git("add", "a.txt")
    git("commit", "-q", "-m", "a")
    head = git("rev-parse", "HEAD")
    assert git_commit(tmp_path) == head
    (tmp_path / "new.yaml").write_text("b")  # an untracked file changes what a command may train
    assert git_commit(tmp_path) == f"{head}+dirty"
    (tmp_path / "sub").mkdir()
    assert git_commit(tmp_path / "sub") is None  # inside someone else's repository: not dynconv's checkout


def test_no_overrides_outside_a_hydra_job():
    assert task_overrides() == []
