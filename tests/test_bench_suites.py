"""scripts/bench.py bench.suite=<name>: every suite file plans (each row composed and built on the meta device), a
suite runs end to end at tiny settings and writes its Markdown and JSON, and bad suite settings exit 2 naming the
key before anything is built.

The tiny run proves the plumbing (rows, shared static model, settings from the command line, files, keys), not
speed: nothing here asserts a ratio's size.
"""

from __future__ import annotations

import functools
import json
import math

import pytest
from omegaconf import OmegaConf

from conftest import REPO, describe
from test_bench import run_bench

SUITES = ("resnet18", "resnet50", "mobilenetv2_100", "kw_t12", "kw_t16", "we_t1_memory", "timm_condconv")
TINY = ["bench.batch=2", "bench.resolution=32", "bench.repeats=1", "bench.steps=1", "bench.warmup=0"]
# Every suite row's JSON has these keys (null where its mode measured nothing).
ROW_KEYS = {"id", "label", "overrides", "baseline", "baseline_label", "baseline_overrides", "backbone", "op", "attn",
            "converted_layers", "inference_folded", "mode", "batch", "inference_batch", "resolution", "repeats",
            "warmup", "steps", "train_step_ratio", "inference_ratio", "batch1_inference_ratio", "train_step_ms",
            "static_train_step_ms", "inference_ms", "static_inference_ms", "batch1_inference_ms",
            "static_batch1_inference_ms", "peak_memory_mb", "static_peak_memory_mb", "train_fps", "static_train_fps",
            "inference_fps", "static_inference_fps", "batch1_fps", "static_batch1_fps", "train_peak_mb",
            "static_train_peak_mb", "train_peak_ratio", "inference_peak_mb", "static_inference_peak_mb",
            "inference_peak_ratio", "model_mb", "static_model_mb", "memory_measure", "memory_peak_reset",
            "per_repeat_ratios", "paper", "paper_static", "paper_ratio", "paper_units", "error", "seconds"}
SUITE_KEYS = {"suite", "title", "source", "table", "device", "device_name", "threads", "memory_measure",
              "command_line", "rows", "errors", "seconds", "train_step", "markdown", "json", "conv_algorithm_policy",
              "kernel_memory", "conv_algorithms"}


def _bench_defaults():
    return OmegaConf.load(REPO / "configs" / "bench.yaml").bench


@functools.lru_cache(maxsize=None)
def _plan(name: str):
    """A suite's plan at the shipped settings (composing every row takes seconds: once per suite)."""
    from dynconv.bench_suites import load_suite, plan_suite

    return plan_suite(load_suite(name), _bench_defaults(), set())


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


@pytest.mark.parametrize("name", SUITES)
def test_every_suite_plans(name):
    """Each suite file loads, and every row's config (and its static model's) composes and builds on the meta
    device, with its settings merged; table suites carry the paper's value of every row and of its static row."""
    from dynconv.bench_suites import suite_names

    assert set(SUITES) <= set(suite_names())
    plan = _plan(name)
    assert plan.rows, name
    for row in plan.rows:
        # A row is dynamic by its operator, or (a row with its own `baseline`) by its architecture.
        assert row.model.cfg.op.name != "static" or row.model.overrides != row.baseline.overrides, row.id
        assert row.baseline.cfg.op.name == "static", row.id
        assert row.baseline.cfg.backbone.name == row.model.cfg.backbone.name
        assert row.baseline.cfg.attn.name == row.model.cfg.attn.name
        if plan.suite.table:
            assert row.paper and set(row.paper) == set(row.paper_static) == set(plan.suite.paper), row.id
            assert all(_positive(v) for v in row.paper_ratio().values()), row.id
    # One static model per backbone (and attention): the rows share it.
    assert len({row.baseline.key for row in plan.rows}) == len({(r.model.cfg.backbone.name, r.model.cfg.attn.name)
                                                                   for r in plan.rows})


def test_a_row_may_name_its_own_static_baseline():
    """timm_condconv: timm's own CondConv EfficientNet (op=static, dynamic by its architecture) runs against timm's
    static efficientnet_b0, the same static model (built once) as dynconv's CondConv (4x) converted onto it."""
    plan = _plan("timm_condconv")
    rows = {row.id: row for row in plan.rows}
    timm_row, converted = rows["timm_cc_b0_4e"], rows["condconv4"]
    assert timm_row.model.cfg.backbone.model == "efficientnet_cc_b0_4e" and timm_row.model.cfg.op.name == "static"
    assert timm_row.baseline is converted.baseline
    assert timm_row.baseline.cfg.backbone.model == "efficientnet_b0" and timm_row.baseline.cfg.op.name == "static"
    assert converted.model.cfg.op.name == "condconv" and converted.model.cfg.op.experts == 4


def test_table_suites_keep_the_papers_settings():
    """KernelWarehouse Table 12 at batch 100 (inference only), Table 16 training at 128 (ResNet50) / 32
    (MobileNetV2) and inference at 100, Weight Excitation Table 1 at 128, with the paper's printed values."""
    t12 = {row.id: row for row in _plan("kw_t12").rows}
    assert {r.settings.mode for r in t12.values()} == {"inference"}
    assert {r.settings.inference_batch for r in t12.values()} == {100}
    assert t12["r50_kw1"].paper == {"inference_fps": 265.4} and t12["r50_kw1"].paper_static == {"inference_fps": 647.0}
    assert t12["r50_kw1"].paper_ratio()["inference_fps"] == pytest.approx(647.0 / 265.4, rel=1e-3)
    t16 = {row.id: row for row in _plan("kw_t16").rows}
    assert len(t16) == 10 and {r.settings.mode for r in t16.values()} == {"memory"}
    assert (t16["r50_od4"].settings.batch, t16["r50_od4"].settings.inference_batch) == (128, 100)
    assert (t16["mnv2_kw1"].settings.batch, t16["mnv2_kw1"].settings.inference_batch) == (32, 100)
    assert t16["r50_od4"].paper == {"train_peak_mb": 31892, "inference_peak_mb": 5405}
    assert t16["r50_od4"].baseline.id == "r50_static"
    we = {row.id: row for row in _plan("we_t1_memory").rows}
    assert {r.model.cfg.op.name for r in we.values()} == {"lwe", "we"}
    assert we["r50_lwe_se"].baseline.id == "r50_se" and we["mnv2_we"].baseline.id == "mnv2"
    assert {r.settings.batch for r in we.values()} == {128}


def test_command_line_settings_apply_to_every_row():
    """bench.batch on the command line replaces every row's training and inference batch (kw_t16 sets 128/32 and
    100), unless bench.inference_batch is given too; bench.rows selects by id or fnmatch pattern."""
    from dynconv.bench_suites import load_suite, plan_suite

    bench = _bench_defaults()
    bench.batch = 2
    plan = plan_suite(load_suite("kw_t16"), bench, {"batch"}, ["mnv2_*", "r50_kw1"])
    assert [r.id for r in plan.rows] == ["r50_kw1", "mnv2_dy4", "mnv2_od4", "mnv2_kw1_2", "mnv2_kw1", "mnv2_kw4"]
    assert {(r.settings.batch, r.settings.inference_batch, r.settings.mode) for r in plan.rows} == {(2, 2, "memory")}
    bench.inference_batch = 3
    plan = plan_suite(load_suite("kw_t16"), bench, {"batch", "inference_batch"}, ["mnv2_dy4"])
    assert [(r.settings.batch, r.settings.inference_batch) for r in plan.rows] == [(2, 3)]


@pytest.fixture(scope="module")
def tiny_suite(tmp_path_factory):
    out = tmp_path_factory.mktemp("suite") / "resnet18"
    completed, result = run_bench(["bench.suite=resnet18", "bench.rows=[dyconv*,weightnet]", *TINY,
                                   f"bench.out={out}"], timeout=300)
    return completed, result, out


def test_suite_runs_end_to_end_and_writes_markdown_and_json(tiny_suite):
    completed, result, out = tiny_suite
    assert completed.returncode == 0 and result is not None, describe(completed)
    assert SUITE_KEYS <= set(result), sorted(SUITE_KEYS - set(result))
    assert result["suite"] == "resnet18" and result["errors"] == 0
    assert result["command_line"] == {"batch": 2, "repeats": 1, "resolution": 32, "steps": 1, "warmup": 0}
    written = json.loads((out.parent / "resnet18.json").read_text())
    assert written["rows"] == result["rows"] and result["json"] == str(out.parent / "resnet18.json")
    rows = result["rows"]
    assert [row["id"] for row in rows] == ["dyconv4", "weightnet"]
    for row in rows:
        assert set(row) == ROW_KEYS, sorted(set(row) ^ ROW_KEYS)
        assert (row["mode"], row["batch"], row["inference_batch"], row["resolution"], row["repeats"]) == \
            ("full", 2, 2, 32, 1)
        assert row["baseline"] == "resnet18_static" and row["baseline_overrides"] == ["backbone=resnet18", "op=static"]
        assert row["converted_layers"] > 0 and row["error"] is None
        for prefix, batch in (("train_step", 2), ("inference", 2), ("batch1_inference", 1)):
            model_ms, static_ms, ratio = row[f"{prefix}_ms"], row[f"static_{prefix}_ms"], row[f"{prefix}_ratio"]
            assert _positive(model_ms) and _positive(static_ms) and _positive(ratio), (row["id"], prefix)
            assert ratio == pytest.approx(model_ms / static_ms, rel=1e-3)
            fps = prefix.replace("_step", "").replace("_inference", "")
            assert row[f"{fps}_fps"] == pytest.approx(1000 * batch / model_ms, rel=1e-3, abs=1e-3)
            assert row[f"static_{fps}_fps"] == pytest.approx(1000 * batch / static_ms, rel=1e-3, abs=1e-3)
        assert row["train_peak_mb"] is None and row["memory_measure"] is None  # memory only in bench.mode=memory
    markdown = (out.parent / "resnet18.md").read_text()
    assert markdown in completed.stdout
    assert "| DY-Conv (4x) (`dyconv4`) | 2 |" in markdown and "(`weightnet`)" in markdown
    assert "train img/s (model / static)" in markdown and "batch-1 ms (model / static)" in markdown


def test_unknown_suite_exits_2_naming_the_key_and_the_suites():
    completed, result = run_bench(["bench.suite=resnet19"], timeout=60)
    assert completed.returncode == 2 and result is None, describe(completed)
    assert "bench.suite='resnet19'" in completed.stderr and "allowed values" in completed.stderr
    assert all(name in completed.stderr for name in SUITES)
    assert "Traceback" not in completed.stderr


def _config_exit(argv, capsys) -> str:
    """scripts/bench.py's config(argv) in this process: its exit-2 message."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("dynconv_bench_script", REPO / "scripts" / "bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with pytest.raises(SystemExit) as raised:
        module.config(argv)
    assert raised.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("argv, expected", [
    (["bench.suite=resnet18", "bench.rows=[nosuchrow]"], "bench.rows=['nosuchrow']: 'nosuchrow' matches no row"),
    (["bench.suite=resnet18", "backbone=resnet50"], "remove backbone=resnet50"),
    (["bench.suite=resnet18", "bench.layers=true"], "bench.suite='resnet18' cannot be combined"),
    (["bench.rows=[kw1]"], "bench.rows=['kw1'] is invalid; allowed values: null (bench.rows is read only with"),
    (["bench.suite=resnet18", "bench.mode=fast"], "bench.mode='fast' is invalid; allowed values: full, latency, "
                                                  "inference, memory"),
    (["bench.mode=memory", "bench.layers=true"], "bench.layers/bench.layer time layers"),
    (["bench.suite=kw_t16", "bench.batch=0"], "bench.batch=0 is invalid"),
])
def test_bad_suite_settings_exit_2_naming_the_key(argv, expected, capsys):
    err = _config_exit(argv, capsys)
    assert expected in err and "allowed values" in err, err


def test_a_bad_suite_file_names_the_file_and_key(tmp_path, monkeypatch):
    from dynconv import bench_suites
    from dynconv.config import ConfigError

    monkeypatch.setattr(bench_suites, "SUITES_DIR", tmp_path)
    (tmp_path / "bad.yaml").write_text("title: t\nrows:\n  - {id: a, overrides: [op=condconv], bench: {batchh: 2}}\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: rows\[0\]\.bench: unknown setting\(s\) \['batchh'\]"):
        bench_suites.load_suite("bad")
    (tmp_path / "bad.yaml").write_text("title: t\ntable: kw_t12\npaper: {inference_fps: speed}\n")
    with pytest.raises(ConfigError, match=r"paper\.inference_fps: 'speed' is not a column of kw_t12"):
        bench_suites.load_suite("bad")
    (tmp_path / "bad.yaml").write_text("title: t\nrows:\n  - {id: a, overrides: [op=static], baseline: op=static}\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: rows\[0\]\.baseline: a list of Hydra overrides"):
        bench_suites.load_suite("bad")
    (tmp_path / "bad.yaml").write_text("rows: []\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: title"):
        bench_suites.load_suite("bad")
