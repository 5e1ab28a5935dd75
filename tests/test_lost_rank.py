"""A rank that dies mid-epoch under `torchrun --max-restarts=1`: the job restarts from the last checkpoint (the same
run folder: it is named by the config) and ends with exactly the weights and metrics of an uninterrupted run.
gloo on the CPU; rank 1 is SIGKILLed in step 6 (epoch 2) of the first attempt only (DYNCONV_FAULTS)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import REPO, describe, last_json_line, train_command

ARGS = ["op=condconv", "op.experts=2", "data.max_train_samples=256", "data.max_val_samples=64", "data.num_workers=0",
        "recipe.batch_size=32", "recipe.epochs=3", "log.progress_bar=false", "device=cpu", "deterministic=true",
        "dist.timeout_s=300"]  # also bounds the restart's gloo connect: a loaded machine starts ranks slowly
LAUNCHER = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--max-restarts=1"]


def _torchrun(train_env, outputs: Path, faults: str = ""):
    env = train_env({"DYNCONV_OUTPUT_DIR": str(outputs), "DYNCONV_FAULTS": faults, "OMP_NUM_THREADS": "1"})
    completed = subprocess.run(train_command(ARGS, None, launcher=LAUNCHER), cwd=REPO, env=env, capture_output=True,
                               text=True, timeout=900)
    return completed, last_json_line(completed.stdout)


@pytest.mark.slow
@pytest.mark.campaign
def test_a_lost_rank_restarts_from_the_last_checkpoint_and_ends_as_an_uninterrupted_run(train_env, tmp_path):
    reference, expected = _torchrun(train_env, tmp_path / "reference")
    assert reference.returncode == 0, describe(reference)
    completed, result = _torchrun(train_env, tmp_path / "lost", "kill@step=6,rank=1,attempt=0")
    assert completed.returncode == 0, describe(completed)
    assert result["resumed_from"] == 1 and result["world_size"] == 2, result  # restarted after epoch 1

    for key in ("top1", "top5", "loss", "best_top1", "epochs"):
        assert result[key] == expected[key], (key, result[key], expected[key])
    a = torch.load(Path(expected["run_dir"]) / "checkpoints" / "last.pt", weights_only=True)["model"]
    b = torch.load(Path(result["run_dir"]) / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    metrics = json.loads((Path(result["run_dir"]) / "metrics.json").read_text())
    assert metrics["world_size"] == 2
