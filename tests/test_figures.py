"""scripts/figures.py and the figures drawn by dynconv/figures/kw_heatmaps.py and tradeoff.py: each figure's data
equals a direct computation on a small model, the PNG is written, a missing input is an error naming it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import REPO, describe, last_json_line
from figure_checkpoints import make_checkpoint

from dynconv.compose import compose_or_exit

SCRIPT = REPO / "scripts" / "figures.py"
FAST_ENV = {"DYNCONV_CONV_ALGORITHM": "model"}


def figures_cfg(tmp_path: Path, *overrides: str):
    return compose_or_exit("figures", [f"out={tmp_path / 'figures'}", "data.num_workers=0", *overrides],
                           validate="none")


def make(tmp_path: Path, figure: str, *overrides: str) -> dict:
    from dynconv.figures import make_figures

    return make_figures(figures_cfg(tmp_path, f"figure={figure}", *overrides), [figure])


def png_written(path: str) -> bool:
    data = Path(path).read_bytes()
    return len(data) > 1000 and data[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def kw_checkpoint(module_tmp, data_dir):
    # tau < 1: the attentions are the learnt ones, not the one-hot initialisation alone.
    return make_checkpoint(module_tmp("kw") / "best.pt", data_dir, ["op=kw", "op.tau=0.5"])


def test_list_names_every_figure_and_a_bad_id_names_the_allowed_ones(tmp_path, train_env):
    from dynconv.figures import figure_ids

    completed = subprocess.run([sys.executable, str(SCRIPT), "figure=list"], cwd=REPO, env=train_env(FAST_ENV),
                               capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, describe(completed)
    listed = last_json_line(completed.stdout)["figures"]
    assert list(listed) == figure_ids() and {"kw_fig3", "wn_fig1", "dynet_fig5"} <= set(listed)
    bad = subprocess.run([sys.executable, str(SCRIPT), "figure=kw_fig33", f"out={tmp_path}"], cwd=REPO,
                         env=train_env(FAST_ENV), capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "figure=kw_fig33" in bad.stderr and "kw_fig3," in bad.stderr
    assert not (tmp_path / "kw_fig33.png").exists()


def test_kw_fig3_data_is_the_recorders_mean_attention(tmp_path, kw_checkpoint):
    from dynconv.analysis.kw_attention import AttentionRecorder
    from dynconv.engine.evaluation_run import load_for_evaluation
    from omegaconf import OmegaConf

    report = make(tmp_path, "kw_fig3", f"checkpoint={kw_checkpoint}", "kw.images=24", "recipe.eval_batch_size=8")
    assert not report["missing"] and not report["failed"], report
    files = report["figures"]["kw_fig3"]["files"]
    png = next(f for f in files if f.endswith(".png"))
    assert png_written(png)
    data = json.loads(Path(next(f for f in files if f.endswith(".json"))).read_text())
    assert data["images"] == 24

    loaded = load_for_evaluation(OmegaConf.create({"checkpoint": str(kw_checkpoint), "weights": "model",
                                                   "device": "cpu", "task": {},
                                                   "data": {"num_workers": 0}, "recipe": {"eval_batch_size": 8}}))
    model = loaded.model.eval()
    images = torch.cat([batch[0] for batch in loaded.data.val_loader])[:24]
    with AttentionRecorder(model) as recorder, torch.no_grad():
        model(images)
    expected = recorder.mean_by_warehouse()
    assert set(data["warehouses"]) == set(expected)
    for key, entry in expected.items():
        torch.testing.assert_close(torch.tensor(data["warehouses"][key]["alpha"], dtype=torch.float64),
                                   entry["alpha"], rtol=1e-5, atol=1e-6)  # float32 attentions, batches of 8 vs 24
    rows = Path(next(f for f in files if f.endswith(".csv"))).read_text().splitlines()
    assert len(rows) - 1 == sum(entry["alpha"].numel() for entry in expected.values())


def test_kw_fig3_from_an_export_and_a_missing_input_is_named(tmp_path, kw_checkpoint):
    from dynconv.analysis.kw_attention import save_attention_stats

    stats = {"w0": {"alpha": torch.tensor([[0.9, 0.1], [0.2, 0.8]], dtype=torch.float64),
                    "layers": [{"name": "a", "rows": [0, 1], "own_cells": [0, 1], "own_targets": [0],
                                "samples": 4},
                               {"name": "b", "rows": [1, 2], "own_cells": [1, 2], "own_targets": [1],
                                "samples": 4}],
                    "samples": 4}}
    export, _ = save_attention_stats(stats, tmp_path / "export")
    report = make(tmp_path, "kw_fig3", f"kw.attention={export}")
    assert report["figures"]["kw_fig3"]["diagonal_fraction"] == {"w0": 1.0}
    missing = make(tmp_path, "kw_fig3")
    assert "op=kw" in missing["missing"]["kw_fig3"]


def test_variant_figures_match_runs_to_table_rows_by_their_operator_settings(tmp_path, kw_checkpoint, data_dir):
    softmax = make_checkpoint(tmp_path / "softmax.pt", data_dir, ["op=kw", "op.attention=softmax", "op.tau=0.5"])
    report = make(tmp_path, "kw_fig7", f"checkpoint=[{kw_checkpoint},{softmax}]", "kw.images=8")
    summary = report["figures"]["kw_fig7"]
    assert summary["variants"] == ["kw_1x_caf", "kw_1x_softmax"]
    assert summary["missing_variants"] == ["kw_1x_sigmoid", "kw_1x_relu_norm"]
    assert "kw_t13" in make(tmp_path, "kw_fig9", f"checkpoint={kw_checkpoint}")["missing"]["kw_fig9"]


def _fake_run(root: Path, name: str, overrides: list[str], top1: float, table=None, row=None, smoke=False) -> Path:
    """A run folder as train.py leaves it (config.yaml, metrics.json), for the results collector."""
    from figure_checkpoints import compose_train
    from omegaconf import OmegaConf

    run_dir = root / name
    run_dir.mkdir(parents=True)
    cfg = compose_train([*overrides, f"reproduce.table={table}" if table else "reproduce.table=null",
                         f"reproduce.row={row}" if row else "reproduce.row=null", f"reproduce.smoke={smoke}"])
    (run_dir / "config.yaml").write_text(yaml.safe_dump(OmegaConf.to_container(cfg, resolve=True)))
    (run_dir / "metrics.json").write_text(json.dumps({"top1": top1, "top5": 99.0, "status": "completed",
                                                      "run": {"overrides": overrides, "smoke": smoke}}))
    return run_dir


def test_wn_fig1_puts_each_run_at_its_rows_counts_beside_the_papers_point(tmp_path):
    from dynconv.reproduction.counting import composer, count_rows
    from dynconv.reproduction.tables import load_table

    runs = tmp_path / "runs"
    table = load_table("wn_t2")
    for row_id, top1 in (("x0_5_static", 60.0), ("x0_5_wn_lam1", 62.5)):
        _fake_run(runs, row_id, list(table.row_overrides(table.row(row_id))), top1, "wn_t2", row_id)
    report = make(tmp_path, "wn_fig1", f"runs={runs}")
    assert not report["failed"], report
    data = json.loads(Path(next(f for f in report["figures"]["wn_fig1"]["files"] if f.endswith(".json"))).read_text())
    measured = {(p["table"], p["row"]): p for p in data["points"] if p.get("top1") is not None}
    assert set(measured) == {("wn_t2", "x0_5_static"), ("wn_t2", "x0_5_wn_lam1")}
    with composer() as compose:
        counts = count_rows(table, compose)
    for (_, row_id), point in measured.items():
        assert point["macs_M"] == pytest.approx(counts[row_id].values["macs"] / 1e6)
        assert point["params_M"] == pytest.approx(counts[row_id].values["params"] / 1e6)
        assert point["paper_top1"] == pytest.approx(100 - table.row(row_id).paper["top1_err"])
    assert measured[("wn_t2", "x0_5_wn_lam1")]["family"] == "WeightNet" and measured[("wn_t2", "x0_5_wn_lam1")]["top1"] == 62.5
    assert png_written(next(f for f in report["figures"]["wn_fig1"]["files"] if f.endswith(".png")))
    # Only smoke runs, and include_smoke off: the figure is skipped and says why.
    smoke = tmp_path / "smoke"
    _fake_run(smoke, "s", list(table.row_overrides(table.row("x0_5_static"))), 10.0, "wn_t2", "x0_5_static", smoke=True)
    skipped = make(tmp_path, "wn_fig1", f"runs={smoke}", "tradeoff.include_smoke=false")
    assert "smoke runs are left out" in skipped["missing"]["wn_fig1"]


def test_dynet_fig5_counts_each_mobilenetv2_run_at_224_and_1000_classes(tmp_path):
    from dynconv.build import build_backbone
    from dynconv.profiling import count_macs

    runs = tmp_path / "runs"
    _fake_run(runs, "mnv2_050_static", ["backbone=mobilenetv2_050", "op=static"], 50.0)
    _fake_run(runs, "mnv2_050_dynet", ["backbone=mobilenetv2_050", "op=dynet"], 55.0)
    _fake_run(runs, "resnet18", ["backbone=resnet18", "op=static"], 70.0)  # not MobileNetV2: left out
    report = make(tmp_path, "dynet_fig5", f"runs={runs}")
    assert not report["failed"], report
    assert report["figures"]["dynet_fig5"]["runs"] == 2
    data = json.loads(Path(next(f for f in report["figures"]["dynet_fig5"]["files"] if f.endswith(".json"))).read_text())
    static = next(p for p in data["points"] if p["family"] == "static")
    with torch.device("meta"):
        model = build_backbone({"name": "mobilenetv2_050"}, {"name": "static"}, {"name": "none"}, num_classes=1000,
                               image_size=224).backbone
    assert static["macs_M"] == pytest.approx(count_macs(model, (3, 224, 224)).total / 1e6)
    from dynconv.reproduction.tables import load_table

    table = load_table("dynet_t1")
    assert [(p["row"], p["paper_macs_M"]) for p in data["paper"]] == [
        (row_id, table.row(row_id).paper["mflops"]) for row_id in ("mnv2_1_0", "mnv2_0_75", "mnv2_0_6")]
    assert "runs=" in make(tmp_path, "dynet_fig5")["missing"]["dynet_fig5"]


def test_figure_all_writes_what_it_can_and_names_every_missing_input(tmp_path, kw_checkpoint, train_env):
    completed = subprocess.run(
        [sys.executable, str(SCRIPT), "figure=all", f"checkpoint={kw_checkpoint}", f"out={tmp_path / 'all'}",
         "kw.images=8", "data.num_workers=0", "ablation.images=8", "kernels.classes=2", "kernels.per_class=2", "correlation.images=8", "latency.resolutions=[32]",
         "latency.repeats=1", "latency.warmup=0"],
        cwd=REPO, env=train_env(FAST_ENV), capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, describe(completed)
    report = last_json_line(completed.stdout)
    assert "kw_fig3" in report["figures"] and not report["failed"], report
    from dynconv.figures import figure_ids

    assert set(report["figures"]) | set(report["missing"]) == set(figure_ids())
    for key, reason in report["missing"].items():
        assert reason and f"{key}: skipped, missing input" in completed.stderr
    for summary in report["figures"].values():
        assert all(Path(path).is_file() for path in summary["files"])


def test_a_corrupt_checkpoint_is_reported_with_its_path(tmp_path, train_env):
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"not a checkpoint")
    completed = subprocess.run([sys.executable, str(SCRIPT), "figure=kw_fig3", f"checkpoint={broken}",
                                f"out={tmp_path / 'out'}"], cwd=REPO, env=train_env(FAST_ENV), capture_output=True,
                               text=True, timeout=120)
    assert completed.returncode != 0 and str(broken) in completed.stderr + completed.stdout
