"""task=video through the real CLI on the embedded toy clips: train.py ends with the JSON line holding top-1, eval.py
scores the checkpoint like training (MACs of one clip), scripts/profile.py counts a clip. Tiny settings (8 clips of
4 frames, one epoch): the plumbing, not the accuracy (docs/video.md's toy run is). Bad keys are refused in-process
(tests/test_video_data.py, tests/test_video_backbones.py), through the same validation train.py runs first."""

from __future__ import annotations

import json

import pytest

from conftest import describe

TINY = [
    "task=video",
    "data=toy_video",
    "data.max_train_samples=8",
    "data.max_val_samples=8",
    "data.num_workers=0",
    "data.num_frames=4",
    "recipe.batch_size=4",
    "recipe.eval_batch_size=8",
    "recipe.epochs=1",
    "recipe.warmup_epochs=0",
    "log.progress_bar=false",
    "conv_algorithm=model",  # nothing to time in a 2-step run
]


@pytest.fixture(scope="module")
def video_run(run_train, module_tmp):
    """One real 1-epoch TSM-ResNet18 + CondConv (2 experts) run on 8 toy clips, evaluated on 8."""
    tmp = module_tmp("video")
    completed, result = run_train([*TINY, "op.experts=2"], tmp, timeout=600)
    assert completed.returncode == 0, describe(completed)
    return tmp / "run", completed, result


def test_train_py_ends_with_the_json_line_holding_top1(video_run):
    run_dir, completed, result = video_run
    assert result is not None, describe(completed)
    assert 0.0 <= result["top1"] <= 100.0 and result["top5"] == 100.0  # 4 classes: top-5 holds every one
    assert result["best_top1"] == result["top1"] and result["status"] == "completed" and result["epochs"] == 1
    assert result["skipped_images"] == 0
    assert "backbone tsm_resnet18 | op condconv" in completed.stderr + completed.stdout
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["history_last"]["samples"] == 8
    assert (run_dir / "checkpoints" / "best.pt").is_file()


def test_eval_py_scores_the_checkpoint_and_counts_a_clip(video_run, compose_cfg):
    """eval.py's evaluation (in-process: no second interpreter start) rebuilds the model from the checkpoint's
    config, gets training's top-1, and counts MACs on one clip of data.num_frames frames."""
    from dynconv.engine.distributed import cleanup_distributed
    from dynconv.engine.evaluation_run import evaluate_checkpoint
    from dynconv.functional import selector

    run_dir, _, result = video_run
    cfg = compose_cfg([f"checkpoint={run_dir / 'checkpoints' / 'best.pt'}", "data.num_workers=0"], config_name="eval")
    try:
        with selector.policy("model"):  # as the run trained (conv_algorithm=model): nothing to time
            scored = evaluate_checkpoint(cfg)
    finally:
        cleanup_distributed()
    assert scored["top1"] == pytest.approx(result["top1"]) and scored["samples"] == 8
    assert scored["input_size"] == [3, 4, 32, 32] and scored["macs"] == scored["macs_inference"] > 0


def test_profile_counts_one_clip(compose_cfg):
    """scripts/profile.py task=video: the model the task trains on one clip of the backbone's length (TSM: 8).
    Weight Excitation folds away, and the shift costs nothing: TSM-ResNet18 + LWE folded has the MACs of resnet18
    on the same 8 frames (TSN's frame average, an image backbone under task=video)."""
    from dynconv.tasks import TASKS

    def profile(*overrides: str) -> dict:
        cfg = compose_cfg(["task=video", "profile.resolution=32", *overrides], config_name="profile")
        return TASKS.get("video").profile(cfg)[1]

    lwe, frames = profile("backbone=tsm_resnet18", "op=lwe"), profile("backbone=resnet18", "op=static")
    assert lwe["input_size"] == frames["input_size"] == [3, 8, 32, 32] and lwe["converted_layers"] == 20
    assert lwe["macs_inference"] == frames["macs"] < lwe["macs"]
    assert lwe["params_inference"] == frames["params"] < lwe["params"]
