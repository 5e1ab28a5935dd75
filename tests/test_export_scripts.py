"""scripts/export.py (a checkpoint out to ONNX / torch.export / folded, its exit codes) and scripts/bench_onnx.py
(onnxruntime latency against the static model): end to end on small checkpoints and models."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, last_json_line
from figure_checkpoints import make_checkpoint

pytest.importorskip("onnxruntime")
pytestmark = pytest.mark.usefixtures("one_thread")


def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"dynconv_script_{name}", REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def checkpoints(module_tmp, data_dir) -> dict[str, Path]:
    """Run folders of untrained ResNet18 checkpoints (train.py's layout), one per operator."""
    root = module_tmp("export-checkpoints")
    return {op: make_checkpoint(root / op / "checkpoints" / "best.pt", data_dir, ["backbone=resnet18", f"op={op}"])
            .parents[1] for op in ("static", "condconv")}


def test_export_script_end_to_end(checkpoints, tmp_path, train_env):
    """From a run folder to a .pt2 file in a fresh process: exit 0, the file written, and the last stdout line the
    report (the difference to eager at the batch sizes asked, the tolerance, the checkpoint)."""
    out = tmp_path / "model.pt2"
    completed = subprocess.run([sys.executable, "scripts/export.py", f"checkpoint={checkpoints['static']}",
                                "format=torch_export", f"out={out}", "batch_sizes=[1,2]"], cwd=REPO,
                               env=train_env({"OMP_NUM_THREADS": "1"}), capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    report = last_json_line(completed.stdout)
    assert report["format"] == "torch_export" and report["path"] == str(out) and out.is_file()
    assert report["batch_sizes"] == [1, 2] and report["tolerance"] == 1e-4 and report["opset"] is None
    assert report["max_abs_diff"] <= 1e-4 and report["checkpoint"] == str(checkpoints["static"])


def test_export_script_exit_codes(checkpoints, tmp_path, capsys, monkeypatch):
    """2 for a bad config, a missing or corrupt checkpoint (named); 1 when the export fails (the layer in the JSON)
    or the difference to eager is above the tolerance; the default output sits beside the checkpoint."""
    script = _script("export")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint")
    for args, message in [(["checkpoint=null"], "checkpoint=null"),
                          ([f"checkpoint={tmp_path / 'missing'}"], f"checkpoint={tmp_path / 'missing'}"),
                          ([f"checkpoint={corrupt}"], str(corrupt)),
                          ([f"checkpoint={checkpoints['static']}", "format=tflite"],
                           "format='tflite' is invalid; allowed values: onnx, torch_export, folded"),
                          ([f"checkpoint={checkpoints['static']}", "tolerance=-1"], "tolerance=-1")]:
        assert script.main(args) == 2, args
        assert message in capsys.readouterr().err, args

    assert script.main([f"checkpoint={checkpoints['condconv']}", "format=folded"]) == 1
    captured = capsys.readouterr()
    failure = json.loads(captured.out.strip().splitlines()[-1])
    assert failure["layer"] == "net.layer1.0.conv1" and "CondConv2d" in captured.err
    assert failure["path"] == str(checkpoints["condconv"] / "checkpoints" / "best.folded.pt")

    exports = sys.modules["dynconv.exporting"]
    monkeypatch.setattr(exports, "export", lambda model, path, format, **kwargs: {
        "format": format, "path": str(path), "max_abs_diff": 0.5, "within_tolerance": False, "batch_sizes": [1],
        "tolerance": 1e-4, "opset": None})
    assert script.main([f"checkpoint={checkpoints['static']}", "format=onnx"]) == 1
    captured = capsys.readouterr()
    assert json.loads(captured.out.strip().splitlines()[-1])["max_abs_diff"] == 0.5
    assert "more than tolerance=0.0001" in captured.err


def test_onnx_benchmark_script(tmp_path, capsys, monkeypatch):
    """Every requested operator is exported, checked and timed against the static ONNX at each batch size; the
    table and the JSON are written and the ONNX files removed; a bad config exits 2 naming the key. (Weight
    normalisation exports folded, the static graph: the cheapest export that still runs the whole pipeline.)"""
    script = _script("bench_onnx")
    written, export_operator = [], script.export_operator
    monkeypatch.setattr(script, "export_operator", lambda *args: written.append(export_operator(*args)) or
                        dict(written[-1]))
    out = tmp_path / "bench"
    code = script.main(["ops=[weight_norm]", "resolution=32", "num_classes=10", "batch_sizes=[1,2]",
                        "check_batch_sizes=[2]", "repeats=2", "warmup=0", "steps=1", "threads=1", f"out={out}"])
    assert code == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [row["op"] for row in result["rows"]] == ["static", "weight_norm"]
    timed = result["rows"][1]["batches"]
    assert set(timed) == {"1", "2"}
    assert timed["2"]["ms"] > 0 and timed["2"]["ratio"] == pytest.approx(timed["2"]["ms"] / timed["2"]["static_ms"],
                                                                         rel=1e-2)
    assert result["rows"][1]["max_abs_diff"] <= 1e-4 and result["rows"][1]["onnx_mb"] > 1
    table = (out / "table.md").read_text()
    assert "| weight_norm |" in table and "batch 2 / static" in table and "| static |" in table
    assert json.loads((out / "results.json").read_text())["rows"][1]["op"] == "weight_norm"
    assert [entry["op"] for entry in written] == ["static", "weight_norm"]
    assert not [entry["path"] for entry in written if Path(entry["path"]).exists()]  # the ONNX files are removed
    assert script.main(["ops=[nope]"]) == 2
    assert "ops=['nope'] is invalid" in capsys.readouterr().err
