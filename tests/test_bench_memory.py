"""scripts/bench.py bench.mode=memory: peak training and inference memory, each measured in a fresh child process
(dynconv/peak_memory.py), for a model and its static model; at tiny settings.

What is asserted is what must hold whatever the machine: the peaks are positive, a training step (activations kept
for the backward, gradients, SGD momentum) needs more than inference of the same model, and a training step's
growth includes at least the gradients and the momentum (two copies of the parameters). The real child processes
run in the first test; the script's plumbing (which measurements, at which batch, the keys, a suite's table with the
paper's values, the static model measured once) is tested with a stand-in for them, in seconds.
"""

from __future__ import annotations

import importlib.util
import json
import os

import pytest

from conftest import REPO

TINY = ["bench.batch=2", "bench.resolution=32", "bench.warmup=1", "bench.steps=1"]


def test_each_measurement_runs_in_a_fresh_process_and_training_needs_more():
    """One child per (model, train|inference), a process of its own: positive peaks, training above inference, and
    the training growth holds at least the gradients and the SGD momentum (two copies of the parameters)."""
    from dynconv.peak_memory import measure

    spec = {"backbone": {"name": "resnet18"}, "op": {"name": "static"}, "attn": {"name": "none"}, "batch": 2,
            "resolution": 64, "num_classes": 10, "device": "cpu", "warmup": 1, "steps": 1, "policy": "model"}
    train, inference = (measure({**spec, "kind": kind}, timeout=240) for kind in ("train", "inference"))
    assert "error" not in train and "error" not in inference, (train, inference)
    assert len({train["pid"], inference["pid"], os.getpid()}) == 3
    assert train["measure"] == inference["measure"] == "cpu_peak_rss_growth"
    assert train["peak_reset"] in ("clear_refs", "ru_maxrss")
    assert train["peak_bytes"] > inference["peak_bytes"] > 0, (train, inference)
    assert train["peak_bytes"] >= 1.9 * train["model_bytes"] > 0, train


def _script():
    spec = importlib.util.spec_from_file_location("dynconv_bench_script", REPO / "scripts" / "bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_single_model_memory_mode_json(monkeypatch, capsys):
    """The one-model path (no suite): four measurements, training at bench.batch and inference at
    bench.inference_batch; the timing keys stay and are null, the memory keys are the children's figures.
    The children are replaced by a stand-in here (the real ones run in the tests above)."""
    from dynconv import peak_memory

    specs = []

    def fake(spec, timeout=None):
        specs.append(spec)
        scale = 1 if spec["op"]["name"] == "static" else 2
        peak = (300 if spec["kind"] == "train" else 30) * scale * 2**20
        return {"measure": "cpu_peak_rss_growth", "peak_bytes": peak, "model_bytes": 40 * scale * 2**20,
                "peak_reset": "clear_refs", "converted_layers": 19, "inference_folded": False, "seconds": 0.1}

    monkeypatch.setattr(peak_memory, "measure", fake)
    code = _script().main(["backbone=resnet18", "op=condconv", "op.experts=2", "bench.mode=memory",
                           "bench.inference_batch=3", "kernel_memory=recompute", *TINY])
    out = capsys.readouterr().out
    assert code == 0, out
    result = json.loads(out.strip().splitlines()[-1])
    assert [(s["kind"], s["op"]["name"], s["batch"]) for s in specs] == [
        ("train", "condconv", 2), ("inference", "condconv", 3), ("train", "static", 2), ("inference", "static", 3)]
    # The kernel-memory policy reaches the children and the JSON, and is restored after the run.
    from dynconv.functional import recompute

    assert {s["kernel_memory"] for s in specs} == {"recompute"} and result["kernel_memory"] == "recompute"
    assert recompute.get_kernel_memory() == "auto"
    assert (result["train_peak_mb"], result["static_train_peak_mb"], result["train_peak_ratio"]) == (600.0, 300.0, 2.0)
    assert (result["inference_peak_mb"], result["inference_peak_ratio"], result["inference_batch"]) == (60.0, 2.0, 3)
    assert (result["model_mb"], result["static_model_mb"]) == (80.0, 40.0)
    assert result["mode"] == "memory" and result["train_step_ms"] is None and result["train_step_ratio"] is None
    assert result["memory_measure"] == "cpu_peak_rss_growth" and result["converted_layers"] == 19
    assert "train step peak (batch 2)" in out and "inference peak (batch 3)" in out

    specs.clear()
    monkeypatch.setattr(peak_memory, "measure", lambda spec, timeout=None: {"error": "exit -9 (killed by SIGKILL)"}
                        if spec["kind"] == "train" else fake(spec))
    code = _script().main(["backbone=resnet18", "op=condconv", "op.experts=2", "bench.mode=memory", *TINY])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 1 and result["train_peak_mb"] is None and result["inference_peak_mb"] == 60.0
    assert "killed by SIGKILL" in result["notes"]


def test_suite_memory_mode_measures_the_static_model_once(monkeypatch, capsys, tmp_path):
    """A memory suite (KernelWarehouse Table 16, two MobileNetV2 rows, tiny): each row's model in two children,
    their shared static model in two only; the paper's values beside the measurement in the JSON and Markdown."""
    from dynconv import peak_memory

    specs = []

    def fake(spec, timeout=None):
        specs.append((spec["op"]["name"], spec["kind"], spec["batch"]))
        scale = 1 if spec["op"]["name"] == "static" else 2
        return {"measure": "cpu_peak_rss_growth", "peak_bytes": (200 if spec["kind"] == "train" else 20) * scale * 2**20,
                "model_bytes": 10 * scale * 2**20, "peak_reset": "clear_refs", "converted_layers": 51,
                "inference_folded": False, "seconds": 0.1}

    monkeypatch.setattr(peak_memory, "measure", fake)
    out = tmp_path / "t16"
    code = _script().main(["bench.suite=kw_t16", "bench.rows=[mnv2_dy4,mnv2_kw1]", "bench.batch=2",
                           "bench.resolution=32", f"bench.out={out}"])
    stdout = capsys.readouterr().out
    assert code == 0, stdout
    assert specs == [("dyconv", "train", 2), ("static", "train", 2), ("dyconv", "inference", 2),
                     ("static", "inference", 2), ("kw", "train", 2), ("kw", "inference", 2)]
    result = json.loads(stdout.strip().splitlines()[-1])
    assert result["memory_measure"] == "cpu_peak_rss_growth" and result["errors"] == 0
    row = result["rows"][0]
    assert (row["train_peak_mb"], row["static_train_peak_mb"], row["train_peak_ratio"]) == (400.0, 200.0, 2.0)
    assert row["paper"] == {"train_peak_mb": 2924, "inference_peak_mb": 1151}
    assert row["paper_static"] == {"train_peak_mb": 2486, "inference_peak_mb": 1083}
    assert row["paper_ratio"]["train_peak_mb"] == pytest.approx(2924 / 2486, rel=1e-3)
    markdown = (tmp_path / "t16.md").read_text()
    assert "train peak MB (model / static)" in markdown and "paper train memory (MB) (model / static)" in markdown
    assert "| 400.0 / 200.0 | 2.00x |" in markdown and "2,924 / 2,486" in markdown
    assert json.loads((tmp_path / "t16.json").read_text())["rows"] == result["rows"]
