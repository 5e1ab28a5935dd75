"""scripts/bench.py: the result JSON contract, per-layer mode and config rejection, at tiny settings.

Benchmarks are not tests: nothing here asserts a speed target, only that the numbers exist, are positive
and agree with each other (a ratio is the quotient of the two milliseconds it is printed next to).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import _LEAKY_ENV, REPO, describe, last_json_line

BENCH_PY = REPO / "scripts" / "bench.py"
TINY = ["backbone=resnet18", "op=condconv", "op.experts=2", "bench.batch=2", "bench.resolution=32",
        "bench.repeats=2", "bench.warmup=1", "bench.steps=1"]
RESNET18_CONVERTED = 19  # every conv of resnet18 but the stem (and the classifier, a Linear)
RATIOS = {  # ratio key -> (dynamic ms key, static ms key)
    "train_step_ratio": ("train_step_ms", "static_train_step_ms"),
    "inference_ratio": ("inference_ms", "static_inference_ms"),
    "batch1_inference_ratio": ("batch1_inference_ms", "static_batch1_inference_ms"),
}


def run_bench(args, timeout=120):
    """Run scripts/bench.py from the repository root; no data folder is needed (inputs are random)."""
    env = {k: v for k, v in os.environ.items() if k not in _LEAKY_ENV}
    env["PYTHONUNBUFFERED"] = "1"
    completed = subprocess.run([sys.executable, str(BENCH_PY), *args], cwd=REPO, env=env,
                               capture_output=True, text=True, timeout=timeout)
    return completed, last_json_line(completed.stdout)


@pytest.fixture(scope="module")
def layers_run():
    """One per-layer run serves every contract test: it also prints the whole-model table and keys."""
    return run_bench(TINY + ["bench.layers=true"])


def _check_model_result(result: dict) -> None:
    expected = {"train_step_ratio", "inference_ratio", "batch1_inference_ratio", "train_step_ms",
                "static_train_step_ms", "inference_ms", "static_inference_ms", "batch1_inference_ms",
                "static_batch1_inference_ms", "peak_memory_mb", "static_peak_memory_mb", "batch", "inference_batch",
                "resolution", "device", "backbone", "op", "repeats"}
    assert expected <= set(result), sorted(expected - set(result))
    for ratio_key, (dynamic_key, static_key) in RATIOS.items():
        assert result[ratio_key] > 0 and result[dynamic_key] > 0 and result[static_key] > 0
        assert result[ratio_key] == pytest.approx(result[dynamic_key] / result[static_key], rel=1e-3), ratio_key
    assert (result["batch"], result["inference_batch"], result["resolution"], result["repeats"]) == (2, 2, 32, 2)
    assert result["backbone"] == "resnet18" and result["op"].startswith("condconv")
    if result["device"] == "cpu":
        assert result["peak_memory_mb"] is None and result["static_peak_memory_mb"] is None
    else:
        assert result["peak_memory_mb"] > 0 and result["static_peak_memory_mb"] > 0
    # The algorithm cache's choices: shape description -> chosen algorithm and each candidate's ms.
    from dynconv.functional.selector import POLICIES

    assert result["conv_algorithm_policy"] in POLICIES
    assert result["kernel_memory"] == "auto"  # the default (train.yaml's kernel_memory)
    assert isinstance(result["conv_algorithms"], dict)
    for entry in result["conv_algorithms"].values():
        assert entry["algorithm"] in entry["ms"] or not entry["ms"]


def test_result_json_keys_and_consistent_ratios(layers_run):
    completed, result = layers_run
    assert completed.returncode == 0 and result is not None, describe(completed)
    _check_model_result(result)


def test_table_rows_printed(layers_run):
    completed, _ = layers_run
    assert completed.returncode == 0, describe(completed)
    for row in ("train step (batch 2)", "inference (batch 2)", "inference (batch 1)"):
        assert row in completed.stdout


def test_per_layer_mode_lists_every_converted_layer(layers_run):
    completed, result = layers_run
    assert completed.returncode == 0 and result is not None, describe(completed)
    _check_model_result(result)
    layers = result["layers"]
    assert len(layers) == RESNET18_CONVERTED == result["converted_layers"]
    names = [row["name"] for row in layers]
    assert len(set(names)) == len(names) and "conv1" not in names and "layer4.1.conv2" in names
    for row in layers:
        assert {"name", "shape", "ratio_train", "ratio_inference"} <= set(row)
        assert row["ratio_train"] > 0 and row["ratio_inference"] > 0
    # Input shapes come from the real forward pass: 32px -> 8x8 after the stem, 1x1 in layer4.
    by_name = {row["name"]: row for row in layers}
    assert by_name["layer1.0.conv1"]["input"] == [2, 64, 8, 8]
    assert by_name["layer4.1.conv2"]["input"] == [2, 512, 1, 1]


def test_bad_bench_value_exits_2_naming_the_key():
    completed, result = run_bench(["bench.batch=0"], timeout=60)
    assert completed.returncode == 2 and result is None, describe(completed)
    assert "bench.batch" in completed.stderr and "allowed values" in completed.stderr
    assert "Traceback" not in completed.stderr


@pytest.mark.parametrize("key, value", [("batch", 0), ("resolution", 16), ("repeats", 0), ("steps", 0),
                                        ("warmup", -1), ("device", "gpu"), ("layers", 3), ("layer", 5)])
def test_validation_names_key_and_allowed_values(key, value):
    """The same check in-process, for every knob (one subprocess per value would cost seconds each)."""
    from omegaconf import OmegaConf

    from dynconv.benchmark import validate_bench_config
    from dynconv.config import ConfigError

    bench = OmegaConf.load(REPO / "configs" / "bench.yaml").bench
    validate_bench_config(bench)  # the shipped defaults are valid
    bench[key] = value
    with pytest.raises(ConfigError, match=rf"bench\.{key}=.*allowed values"):
        validate_bench_config(bench)


def test_fp16_autocast_is_refused_on_the_cpu_naming_the_key():
    from omegaconf import OmegaConf

    from dynconv.benchmark import validate_bench_config
    from dynconv.config import ConfigError

    bench = OmegaConf.load(REPO / "configs" / "bench.yaml").bench
    bench.device, bench.amp = "cpu", "bf16"
    validate_bench_config(bench)  # bfloat16 autocast runs on the CPU
    bench.amp = "fp16"
    with pytest.raises(ConfigError, match=r"bench\.amp='fp16' runs on CUDA only.*allowed values here: none, bf16"):
        validate_bench_config(bench)
    bench.amp = "half"
    with pytest.raises(ConfigError, match=r"bench\.amp='half'.*allowed values: none, bf16, fp16"):
        validate_bench_config(bench)


def test_amp_steps_run_the_forward_in_autocast_and_keep_float32_weights():
    """bench.amp=bf16: the training step's forward (a dynamic model's included) runs in bfloat16 autocast, the SGD
    step updates float32 weights with finite values; inference runs in autocast too; without amp, float32."""
    import torch

    import dynconv
    from dynconv import benchmark as bm

    torch.manual_seed(0)
    model = dynconv.create_model("resnet18", op="dyconv", kernels=2, num_classes=10)
    seen = []
    model.get_submodule("net.fc").register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    inputs, targets = torch.randn(2, 3, 32, 32), torch.tensor([1, 7])
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    bm.training_step(model, inputs, targets, bm.make_optimizer(model), "bf16")()
    bm.inference_step(model, inputs, "bf16")()
    bm.inference_step(model, inputs, "none")()
    assert seen == [torch.bfloat16, torch.bfloat16, torch.float32]
    changed = [name for name, p in model.named_parameters() if not torch.equal(p, before[name])]
    assert changed and all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in model.parameters())


def test_amp_is_reported_in_the_result():
    completed, result = run_bench(TINY + ["bench.amp=bf16", "bench.mode=inference", "bench.repeats=1",
                                          "bench.warmup=0"], timeout=120)
    assert completed.returncode == 0 and result is not None, describe(completed)
    assert result["amp"] == "bf16" and result["inference_ratio"] > 0
    assert "autocast bf16" in completed.stdout


def test_one_set_of_amp_modes_for_training_and_benchmarks():
    """recipe.amp and bench.amp accept the same values, mapped to autocast dtypes in one place."""
    from dynconv.config_checks import AMP_MODES
    from dynconv.precision import AMP_DTYPES

    assert tuple(AMP_DTYPES) == AMP_MODES
