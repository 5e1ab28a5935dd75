"""Checkpoints on a bad day: a full or read-only disk, a corrupt last.pt, an untrusted file, and the size of best.pt."""

from __future__ import annotations

import errno
import os
import pickle
import subprocess
import sys

import pytest
import torch

from conftest import REPO, SMOKE, describe, last_json_line, train_command
from dynconv.engine import checkpoint as ckpt
from dynconv.engine.checkpoint import (CorruptCheckpointError, UntrustedCheckpointError, atomic_save,
                                       find_resumable, load_checkpoint)

RUN = [*SMOKE, "op=static"]


def _run(train_env, tmp_path, *extra, faults=None, args=RUN):
    completed = subprocess.run(train_command([*args, *extra], tmp_path), cwd=REPO,
                               env=train_env({"DYNCONV_FAULTS": faults or ""}), capture_output=True, text=True,
                               timeout=300)
    return completed, last_json_line(completed.stdout)


@pytest.mark.parametrize("code", ["ENOSPC", "EROFS"])
def test_a_failed_write_leaves_the_previous_file_intact(tmp_path, monkeypatch, code):
    path = tmp_path / "last.pt"
    atomic_save({"model": {"w": torch.ones(3)}}, path, previous=tmp_path / "previous.pt")

    def failing(payload, handle):
        handle.write(b"\0" * 1000)
        raise OSError(getattr(errno, code), os.strerror(getattr(errno, code)))

    monkeypatch.setattr(ckpt, "serialize", failing)
    with pytest.raises(OSError):
        atomic_save({"model": {"w": torch.zeros(3)}}, path, previous=tmp_path / "previous.pt")
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]  # no temporary file, no rotation


def test_a_full_disk_stops_the_run_with_exit_4_and_keeps_the_last_good_checkpoint(train_env, tmp_path):
    completed, result = _run(train_env, tmp_path, faults="oserror@checkpoint_write=3,errno=ENOSPC")
    assert completed.returncode == 4, describe(completed)
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    assert f"could not write checkpoint {last} (No space left on device); the previous last.pt is intact" \
        in completed.stderr, describe(completed)
    # Writes: last.pt and best.pt of epoch 1, then last.pt of epoch 2 fails.
    assert result["status"] == "failed" and load_checkpoint(last)["epoch"] == 1
    assert not list(last.parent.glob(".*.tmp"))


def test_on_write_error_continue_warns_and_finishes(train_env, tmp_path):
    completed, result = _run(train_env, tmp_path, "checkpoint.on_write_error=continue",
                             faults="oserror@checkpoint_write=2,errno=EROFS")
    assert completed.returncode == 0, describe(completed)
    assert "Read-only file system" in completed.stdout + completed.stderr
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["epoch"] == 2


def test_a_corrupt_last_pt_falls_back_to_previous_pt(train_env, tmp_path):
    completed, _ = _run(train_env, tmp_path)
    assert completed.returncode == 0, describe(completed)
    checkpoints = tmp_path / "run" / "checkpoints"
    assert load_checkpoint(checkpoints / "previous.pt")["epoch"] == 1
    best, last = (checkpoints / "best.pt").stat().st_size, (checkpoints / "last.pt").stat().st_size
    assert best < 0.6 * last, "best.pt should hold weights, not the optimizer state"
    assert set(load_checkpoint(checkpoints / "best.pt")) >= {"model", "ema", "config", "class_names", "metrics"}
    assert load_checkpoint(checkpoints / "best.pt")["class_names"] == [str(i) for i in range(10)]

    with open(checkpoints / "last.pt", "r+b") as handle:  # a copy cut short
        handle.truncate(1000)
    path, payload, problems = find_resumable(checkpoints)
    assert path.name == "previous.pt" and payload["epoch"] == 1 and "last.pt" in problems[0]

    completed, result = _run(train_env, tmp_path, "recipe.epochs=3")
    assert completed.returncode == 0, describe(completed)
    assert result["resumed_from"] == 1 and result["resumed_checkpoint"].endswith("previous.pt")
    assert "cannot read checkpoint" in completed.stdout + completed.stderr

    # eval.py reads the slim best.pt (weights and config only).
    evaluated = subprocess.run([sys.executable, "eval.py", f"checkpoint={checkpoints / 'best.pt'}"], cwd=REPO,
                               env=train_env(), capture_output=True, text=True, timeout=300)
    assert evaluated.returncode == 0, describe(evaluated)
    assert last_json_line(evaluated.stdout)["top1"] is not None


class _Exploit:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def _crafted(tmp_path):
    path, target = tmp_path / "crafted.pt", tmp_path / "pwned"
    torch.save({"model": {}, "payload": _Exploit(target)}, path)
    return path, target


def test_a_pickle_that_would_run_code_is_refused(tmp_path):
    path, target = _crafted(tmp_path)
    with pytest.raises(UntrustedCheckpointError, match=f"refused to load {path}: .*weights_only=True"):
        load_checkpoint(path)
    assert not target.exists()
    assert issubclass(UntrustedCheckpointError, CorruptCheckpointError)  # train.py/eval.py: exit 2
    with pytest.raises(pickle.UnpicklingError):  # torch itself, for comparison: the same file is refused
        torch.load(path, weights_only=True)


@pytest.mark.parametrize("entry", ["init_from", "resume", "eval"])
def test_every_entry_point_refuses_a_crafted_checkpoint(train_env, tmp_path, entry):
    path, target = _crafted(tmp_path)
    if entry == "eval":
        command = [sys.executable, "eval.py", f"checkpoint={path}"]
    else:
        command = train_command([*RUN, f"{entry}={path}"], tmp_path)
    completed = subprocess.run(command, cwd=REPO, env=train_env(), capture_output=True, text=True, timeout=300)
    assert completed.returncode == 2, describe(completed)
    assert f"refused to load {path}" in completed.stderr and "Traceback" not in completed.stderr
    assert not target.exists()
