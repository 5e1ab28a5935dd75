"""Segmentation through the real CLI: train.py, eval.py and scripts/profile.py on the embedded toy_seg data.

Tiny settings (a few images, one epoch, ResNet18 + CondConv(2x) at output stride 8 with the auxiliary head):
what is checked is the plumbing (task-built data, the two-head loss through the engine, the confusion matrix,
best.pt by mean IoU, the final JSON keys, TensorBoard loss terms, eval.py and sliding windows on the checkpoint),
not the accuracy (docs/segmentation.md's quickstart run is).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO, describe

TINY = ["task=segmentation", "data=toy_seg", "data.max_train_samples=16", "data.max_val_samples=6",
        "data.num_workers=0", "recipe.batch_size=4", "recipe.eval_batch_size=3", "recipe.epochs=1",
        "recipe.warmup_epochs=0", "log.progress_bar=false", "log.every=1", "op=condconv", "op.experts=2",
        "task.aux_loss=true", "conv_algorithm=model"]


@pytest.fixture(scope="module")
def segmentation_run(run_train, module_tmp):
    tmp = module_tmp("segmentation")
    completed, result = run_train(TINY, tmp, timeout=600)
    assert completed.returncode == 0, describe(completed)
    return tmp / "run", completed, result


def test_final_json_has_miou_and_pixel_accuracy(segmentation_run):
    run_dir, completed, result = segmentation_run
    assert result is not None, describe(completed)
    for key in ("mIoU", "pixel_acc", "mean_acc"):
        assert isinstance(result[key], float) and 0.0 <= result[key] <= 100.0, key
    assert result["best_mIoU"] == result["mIoU"] and result["status"] == "completed"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["history_last"]["samples"] == 6
    assert (run_dir / "checkpoints" / "best.pt").is_file()
    events = list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert events, "no TensorBoard event file"


def test_eval_py_scores_the_checkpoint_like_training_and_slides(segmentation_run, train_env):
    run_dir, _, result = segmentation_run
    checkpoint = run_dir / "checkpoints" / "best.pt"
    for extra in ([], ["task.eval_mode=slide", "task.eval_crop=[32,32]", "task.eval_stride=[16,16]"]):
        completed = subprocess.run([sys.executable, "eval.py", f"checkpoint={checkpoint}", "data.num_workers=0",
                                    *extra], cwd=REPO, env=train_env(None), capture_output=True, text=True,
                                   timeout=300)
        assert completed.returncode == 0, describe(completed)
        scored = json.loads(completed.stdout.strip().splitlines()[-1])
        if not extra:
            assert scored["mIoU"] == pytest.approx(result["mIoU"])
        assert 0.0 <= scored["mIoU"] <= 100.0 and scored["samples"] == 6


@pytest.mark.parametrize(("overrides", "expected"), [
    (["backbone=shufflenetv2_x0_5"], "backbone.output_stride"),
    (["task.head=pspnet"], "task.head"),
    (["data=digits"], "data=digits does not fit task=segmentation"),
])
def test_bad_segmentation_configs_are_refused_by_name(compose_cfg, overrides, expected):
    """What train.py's validation (before anything is written) says about a task the model or data does not fit;
    tests/test_bad_input.py checks that such a refusal exits 2 with nothing written."""
    from dynconv.config import ConfigError, validate_train_config

    with pytest.raises(ConfigError, match=expected.replace(".", r"\.")):
        validate_train_config(compose_cfg([*TINY, *overrides]))


def test_profile_counts_the_dilated_fcn_of_dynet_table_3(compose_cfg):
    """DyNet Table 3's ResNet50 dilated FCN: 311.3 G MACs at 768 x 768 against the printed 310.8 (scripts/profile.py's
    report, counted on the meta device)."""
    import torch

    from dynconv.tasks import TASKS

    cfg = compose_cfg(["task=segmentation", "task.head=fcn", "backbone=resnet50", "op=static",
                       "profile.num_classes=19"], config_name="profile")
    with torch.device("meta"):
        text, record = TASKS.get("segmentation").profile(cfg)
    assert record["macs"] == pytest.approx(310.8e9, rel=0.005) and record["input_size"] == [3, 768, 768]
    assert record["output_stride"] == 8 and record["backbone_macs"] == 4_089_184_256
    assert "311.3G" in text
