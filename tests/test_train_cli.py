"""End-to-end `python train.py`: the JSON contract, the run directory, TensorBoard, and a multirun sweep."""

from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf

from conftest import CONDCONV2, SMOKE, describe

RESULT_KEYS = {"top1", "top5", "loss", "best_top1", "epochs", "world_size", "run_dir", "resumed_from", "status",
               "params", "train_time_s", "skipped_images"}


@pytest.fixture(scope="module")
def smoke_run(run_train, module_tmp):
    """One real 2-epoch CondConv(2x) run on 128 digits, its kernels made again in the backward (on the CPU the
    default keeps them); every test of this module inspects it."""
    tmp = module_tmp("cli")
    completed, result = run_train([*CONDCONV2, *SMOKE, "log.every=1", "conv_algorithm=measure",
                                   "kernel_memory=recompute"], tmp)
    return completed, result, tmp / "run"


def test_exit_code_and_json_contract(smoke_run):
    """Exit 0 and the last stdout line is the result JSON with every documented key and sane values."""
    completed, result, run_dir = smoke_run
    assert completed.returncode == 0, describe(completed)
    assert result is not None, describe(completed)
    assert RESULT_KEYS <= set(result), f"missing keys: {RESULT_KEYS - set(result)}"
    assert result["world_size"] == 1
    assert result["epochs"] == 2
    assert result["resumed_from"] is None
    assert result["status"] == "completed"
    assert result["skipped_images"] == 0
    assert 0.0 <= result["top1"] <= result["top5"] <= 100.0
    assert result["best_top1"] >= result["top1"]
    assert result["params"] > 11_000_000  # resnet18 with 2 experts per converted conv: more than static's 11M
    assert result["run_dir"] == str(run_dir.resolve())


def test_run_dir_config_yaml(smoke_run):
    """config.yaml is the resolved config: it re-loads with OmegaConf and records the operator and overrides."""
    completed, _, run_dir = smoke_run
    assert completed.returncode == 0, describe(completed)
    cfg = OmegaConf.load(run_dir / "config.yaml")
    assert cfg.op.name == "condconv" and cfg.op.experts == 2
    assert cfg.recipe.epochs == 2 and cfg.data.max_train_samples == 128
    assert "${" not in (run_dir / "config.yaml").read_text(), "config.yaml must be resolved"


def test_run_dir_metrics_and_log(smoke_run):
    """metrics.json agrees with the printed JSON; train.log has one line per evaluated epoch."""
    completed, result, run_dir = smoke_run
    assert completed.returncode == 0, describe(completed)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["top1"] == result["top1"]
    assert metrics["epochs"] == 2
    log = (run_dir / "train.log").read_text()
    assert "epoch 1/2" in log and "epoch 2/2" in log


def test_run_dir_records_the_conv_algorithm_policy(smoke_run):
    """The selector's policy is part of the saved config, and conv_algorithms.json beside metrics.json says which
    algorithm each dynamic layer shape ran (measured: with each candidate's milliseconds)."""
    from dynconv.functional.selector import MIXTURE_MODES, PER_SAMPLE_ALGORITHMS

    completed, _, run_dir = smoke_run
    assert completed.returncode == 0, describe(completed)
    assert OmegaConf.load(run_dir / "config.yaml").conv_algorithm == "measure"
    record = json.loads((run_dir / "conv_algorithms.json").read_text())
    assert record["policy"] == "measure" and record["choices"]
    for shape, choice in record["choices"].items():
        assert shape.split()[0] in ("mixture_conv2d", "per_sample_conv2d"), shape
        assert choice["algorithm"] in MIXTURE_MODES + PER_SAMPLE_ALGORITHMS
        assert choice["ms"] == {} or choice["algorithm"] in choice["ms"]  # {}: the only candidate of its shape
    # kernel_memory=recompute is in the saved config, and the mixtures' training calls were timed remaking their
    # kernels (keyed apart from kept ones); the per-sample convolution's own keys are not.
    assert OmegaConf.load(run_dir / "config.yaml").kernel_memory == "recompute"
    trained = [shape for shape in record["choices"] if " train" in shape]
    assert trained and all((" train-recompute " in shape) == shape.startswith("mixture_conv2d") for shape in trained)


def test_run_dir_checkpoints(smoke_run):
    """last.pt / best.pt load with weights_only=True and hold the documented keys for the final epoch."""
    completed, result, run_dir = smoke_run
    assert completed.returncode == 0, describe(completed)
    last = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    expected = {"model", "optimizer", "scheduler", "scaler", "hooks", "epoch", "batches_done", "global_step", "rng",
                "metrics", "best_metrics", "world_size", "config"}
    assert expected <= set(last)
    assert last["epoch"] == 2 and last["batches_done"] == 0
    assert last["global_step"] == 2 * (128 // 32)
    assert last["world_size"] == 1
    assert isinstance(last["config"], dict) and last["config"]["op"]["experts"] == 2
    assert any(k.endswith("layer1.0.conv1.weight") and v.dim() == 5 for k, v in last["model"].items())
    best = torch.load(run_dir / "checkpoints" / "best.pt", weights_only=True)
    assert best["metrics"]["top1"] == result["best_top1"]


def test_tensorboard_scalars(smoke_run):
    """The event file holds the training and validation scalars a user plots (log.every=1: every step)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    completed, _, run_dir = smoke_run
    assert completed.returncode == 0, describe(completed)
    events = list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1
    accumulator = EventAccumulator(str(run_dir / "tensorboard"))
    accumulator.Reload()
    tags = set(accumulator.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/throughput", "val/top1"} <= tags, tags
    assert [e.step for e in accumulator.Scalars("val/top1")] == [1, 2]
    assert len(accumulator.Scalars("train/loss")) == 8  # 4 steps per epoch x 2 epochs


def test_multirun_creates_one_job_dir_per_value(run_train, tmp_path):
    """`-m op.experts=1,2` runs two jobs under hydra.sweep.dir, each with its own config and metrics."""
    sweep = tmp_path / "sweep"
    args = ["-m", "op=condconv", "op.experts=1,2", *SMOKE, "recipe.epochs=1", f"hydra.sweep.dir={sweep}"]
    completed, result = run_train(args, None)
    assert completed.returncode == 0, describe(completed)
    metrics_files = sorted(sweep.glob("*/metrics.json"))
    assert len(metrics_files) == 2, sorted(p.name for p in sweep.iterdir())
    experts = sorted(OmegaConf.load(p.parent / "config.yaml").op.experts for p in metrics_files)
    assert experts == [1, 2]
    for path in metrics_files:
        assert json.loads(path.read_text())["epochs"] == 1
    assert result is not None and result["status"] == "completed"
    assert not (tmp_path / "run").exists()
