"""scripts/chaos.py: SIGKILL a deterministic training mid-checkpoint-write, mid-evaluation and at a random moment,
rerun the same command each time, and require the uninterrupted run's weights and metrics, bit for bit.
The full campaign (10 kills, ~5-8 minutes) is `python scripts/chaos.py`; this test runs 3 kills of a smaller run."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO, describe

# Hydra's list override: each item quoted, since the items hold '='.
SMALL = "train=[" + ",".join(f"'{item}'" for item in (
    "backbone=resnet18", "op=condconv", "op.experts=2", "data.max_train_samples=128", "data.max_val_samples=64",
    "data.num_workers=2", "recipe.batch_size=32", "recipe.epochs=3", "deterministic=true",
    "log.progress_bar=false")) + "]"


@pytest.mark.slow
@pytest.mark.campaign
def test_three_kills_survived_with_a_bitwise_equal_end(train_env, tmp_path):
    completed = subprocess.run([sys.executable, "scripts/chaos.py", "kills=3", "seed=0", f"out={tmp_path}", SMALL],
                               cwd=REPO, env=train_env(), capture_output=True, text=True, timeout=1200)
    assert completed.returncode == 0, describe(completed)
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    assert result["kills_tried"] == 3 and result["kills_survived"] == 3, result
    assert result["bitwise_equal"] and result["max_epochs_redone"] <= 1 and result["orphaned_workers"] == 0, result
    assert [kill["moment"] for kill in result["kills"]] == ["checkpoint_write", "eval", "random"]
