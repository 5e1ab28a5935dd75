"""eval.py reads only the split it evaluates and takes a run folder for its checkpoint (issue 17): a copy of the
validation split alone is enough, and a folder whose classes differ from the trained ones is refused (their labels
would be shifted) before any image is scored."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from conftest import REPO, describe, last_json_line
from figure_checkpoints import make_checkpoint

from dynconv.config import ConfigError


@pytest.fixture(scope="module")
def imagefolder_run(module_tmp, data_dir):
    """A run folder with a best.pt trained (here: saved untrained) on data=imagefolder over the digits tree, and a
    folder holding a copy of that tree's val/ split only."""
    root = module_tmp("eval-splits")
    run_dir = root / "run"
    make_checkpoint(run_dir / "checkpoints" / "best.pt", data_dir,
                    ["backbone=resnet18", "op=static", "data=imagefolder", f"data.root={data_dir / 'digits'}",
                     "data.image_size=32"])
    val_only = root / "val-only"
    shutil.copytree(data_dir / "digits" / "val", val_only / "val")
    return run_dir, val_only


def _eval_cfg(checkpoint, root):
    return OmegaConf.create({"checkpoint": str(checkpoint), "weights": "model", "device": "cpu",
                             "data": {"root": str(root), "num_workers": 0, "max_val_samples": 40},
                             "recipe": {"eval_batch_size": 20}, "task": {}})


def test_eval_py_takes_a_run_folder_and_a_folder_with_only_the_val_split(imagefolder_run, train_env):
    run_dir, val_only = imagefolder_run
    completed = subprocess.run([sys.executable, "eval.py", f"checkpoint={run_dir}", f"data.root={val_only}",
                                "data.num_workers=0", "data.max_val_samples=40"],
                               cwd=REPO, env=train_env(), capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, describe(completed)
    result = last_json_line(completed.stdout)
    assert result["samples"] == 40 and 0 <= result["top1"] <= 100
    assert result["checkpoint"] == str(run_dir / "checkpoints" / "best.pt")  # the run folder's best checkpoint


def test_a_folder_without_checkpoints_or_val_split_is_named(imagefolder_run, tmp_path):
    from dynconv.engine.evaluation_run import load_for_evaluation

    run_dir, val_only = imagefolder_run
    with pytest.raises(FileNotFoundError, match=rf"checkpoint={tmp_path}: a folder without checkpoints/best.pt"):
        load_for_evaluation(_eval_cfg(tmp_path, val_only))
    (tmp_path / "train" / "0").mkdir(parents=True)  # train/ alone: the evaluated split is missing
    with pytest.raises(ConfigError, match=r"data.root=.*val.*an evaluation reads the val split only"):
        load_for_evaluation(_eval_cfg(run_dir, tmp_path))


def test_classes_other_than_the_trained_ones_are_refused_before_scoring(imagefolder_run, tmp_path):
    from dynconv.engine.evaluation_run import load_for_evaluation

    run_dir, val_only = imagefolder_run
    shutil.copytree(val_only / "val", tmp_path / "val")
    shutil.rmtree(tmp_path / "val" / "3")  # 9 classes: every label above 3 would shift by one
    with pytest.raises(ConfigError, match=r"classes differ from those .*best.pt was trained on \(9 vs 10 classes; "
                                          r"missing: \['3'\]"):
        load_for_evaluation(_eval_cfg(run_dir, tmp_path))
