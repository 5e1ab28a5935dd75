"""Detection through the real CLI: train.py and eval.py on the embedded toy COCO data, one and two processes.

Tiny settings (a few images, one epoch, op=static or CondConv(2x), 64-channel FPN): what is checked is the
plumbing (task-built data, loss dict through the engine, COCOeval gathered over ranks, best.pt by box AP, the final
JSON keys, TensorBoard loss terms, eval.py on the checkpoint), not the accuracy (the README's quickstart run is).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from conftest import REPO, describe

BOX_KEYS = [f"bbox_{stat}" for stat in ("AP", "AP50", "AP75", "APs", "APm", "APl")]
MASK_KEYS = [key.replace("bbox", "segm") for key in BOX_KEYS]
TINY = [
    "data=toy_coco",
    "data.max_train_samples=8",
    "data.max_val_samples=6",
    "data.num_workers=0",
    "recipe.batch_size=2",
    "recipe.eval_batch_size=3",
    "recipe.epochs=1",
    "recipe.warmup_epochs=0",
    "recipe.eval_every=1",
    "log.progress_bar=false",
    "log.every=1",
    "task.fpn_channels=16",
    "task.representation_size=32",
    "task.mask_head_channels=16",
    "task.box_batch_size_per_image=32",
]


@pytest.fixture(scope="module")
def maskrcnn_run(run_train, module_tmp):
    """One real 1-epoch Mask R-CNN (ResNet18 + CondConv 2x) run on 8 toy images, evaluated on 6."""
    tmp = module_tmp("maskrcnn")
    completed, result = run_train(["task=maskrcnn", "op=condconv", "op.experts=2", *TINY], tmp, timeout=600)
    assert completed.returncode == 0, describe(completed)
    return tmp / "run", completed, result


def test_maskrcnn_final_json_has_box_and_mask_ap(maskrcnn_run):
    run_dir, completed, result = maskrcnn_run
    assert result is not None, describe(completed)
    for key in BOX_KEYS + MASK_KEYS:
        assert isinstance(result[key], float) and (result[key] == -1.0 or 0.0 <= result[key] <= 100.0), key
    assert result["best_bbox_AP"] == result["bbox_AP"]
    assert result["status"] == "completed" and result["epochs"] == 1
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["history_last"]["samples"] == 6
    assert (run_dir / "checkpoints" / "best.pt").is_file() and (run_dir / "checkpoints" / "last.pt").is_file()


def test_maskrcnn_logs_loss_terms_to_tensorboard(maskrcnn_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, _, _ = maskrcnn_run
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for term in ("loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg", "loss_mask"):
        assert f"train/{term}" in tags, sorted(tags)
    assert "val/bbox_AP" in tags and "val/segm_AP" in tags


def test_eval_py_scores_the_checkpoint_like_training(maskrcnn_run):
    """eval.py rebuilds the detector from the checkpoint's config and gets the AP training reported."""
    run_dir, _, result = maskrcnn_run
    completed = subprocess.run([sys.executable, "eval.py", f"checkpoint={run_dir / 'checkpoints' / 'last.pt'}",
                                "data.num_workers=0"], cwd=REPO, capture_output=True, text=True, timeout=300,
                               env={**__import__("os").environ, "DYNCONV_DATA_DIR": str(run_dir.parents[1])})
    assert completed.returncode == 0, describe(completed)
    scored = json.loads(completed.stdout.strip().splitlines()[-1])
    for key in BOX_KEYS + MASK_KEYS:
        assert scored[key] == pytest.approx(result[key], abs=1e-6), key
    assert scored["params"] == result["params"] and scored["macs"] > 0


def test_retinanet_two_processes_gather_the_evaluation(run_train, tmp_path):
    """torchrun with 2 gloo processes: each rank scores half of the val images; COCOeval sees all of them."""
    completed, result = run_train(
        ["task=retinanet", "op=static", "device=cpu", *TINY], tmp_path, env={"OMP_NUM_THREADS": "1"}, timeout=600,
        launcher=["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"])
    assert completed.returncode == 0, describe(completed)
    assert result is not None and result["world_size"] == 2
    assert set(BOX_KEYS) <= set(result) and not set(MASK_KEYS) & set(result)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["history_last"]["samples"] == 6  # 3 + 3, every image once
    payload = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    assert payload["global_step"] == 2  # 8 images over 2 ranks at batch 2


@pytest.mark.parametrize(("overrides", "expected"), [
    (["task=retinanet"], ["data=digits does not fit task=retinanet", "coco", "toy_coco"]),
    (["data=toy_coco"], ["data=toy_coco does not fit task=classification", "digits"]),
    (["task=maskrcnn", "data=coco", "data.root=null"], ["data.root is not set", "COCO_DIR"]),
    (["task=maskrcnn", "data=toy_coco", "task.fpn_channels=0"], ["task.fpn_channels=0", "integers >= 1"]),
    (["task=retinanet", "data=toy_coco", "task.frozen_stages=9"], ["task.frozen_stages=9", "-1"]),
])
def test_bad_detection_configs_stop_before_anything_is_written(run_train, tmp_path, overrides, expected):
    completed, _ = run_train([*overrides, "log.progress_bar=false"], tmp_path, timeout=120)
    assert completed.returncode == 2, describe(completed)
    assert all(part in completed.stderr for part in expected), describe(completed)
    assert not (tmp_path / "run").exists()


def test_profile_reports_the_detector_and_its_backbone():
    """scripts/profile.py task=retinanet: the detector's counts at the detection scale, and beside them the
    backbone's classification counts, which are WeightNet Table 5's columns (ShuffleNetV2 0.5x + WeightNet 4x:
    2.0M / 41M; the static backbone 1.4M / 41M), within the table's rounding."""
    def profile(*overrides: str) -> dict:
        done = subprocess.run([sys.executable, "scripts/profile.py", "task=retinanet",
                               "backbone=shufflenetv2_wn_x0_5", "profile.resolution=128", *overrides],
                              cwd=REPO, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, describe(done)
        return json.loads(done.stdout.strip().splitlines()[-1])

    weightnet, static = profile("op=weightnet", "op.lam=4", "op.G=1"), profile("op=static")
    for counts, (paper_params, paper_macs) in ((weightnet, (2.0e6, 41e6)), (static, (1.4e6, 41e6))):
        assert abs(counts["backbone_params"] - paper_params) <= 0.05e6, counts
        assert abs(counts["backbone_macs"] - paper_macs) <= 0.025 * paper_macs, counts
        assert counts["input_size"] == [3, 128, 128] and counts["num_classes"] == 80
        assert counts["params"] > counts["backbone_params"] and counts["macs"] > counts["features_macs"] > 0
    # The detector differs from the static one by exactly what WeightNet adds to the backbone (the classifier
    # is not part of either detector).
    assert weightnet["params"] - static["params"] == weightnet["backbone_params"] - static["backbone_params"]
