"""DyNet Figures 2, 6 and 7 (dynconv/figures/dynet_figures.py), the streamed feature-map correlations behind them
(dynconv/analysis/feature_correlation.py) and `log.figures=true` (dynconv/engine/hooks/figure_logging.py)."""

from __future__ import annotations

import json
import statistics
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn

from conftest import SMOKE, describe
from figure_checkpoints import make_checkpoint
from op_checks import load_op_config

from dynconv.analysis.feature_correlation import (CorrelationStats, FeatureCorrelation, last_stage, layer_correlation,
                                                  off_diagonal, resolve_layer, strength_fractions, summarize)
from dynconv.build import build_backbone

pytestmark = pytest.mark.usefixtures("one_thread")
FAST_ENV = {"DYNCONV_CONV_ALGORITHM": "model", "OMP_NUM_THREADS": "1"}


@pytest.fixture(autouse=True)
def _cost_model(monkeypatch):
    monkeypatch.setenv("DYNCONV_CONV_ALGORITHM", "model")


def _backbone(name: str, op: str = "static"):
    torch.manual_seed(0)
    op_cfg = {"name": "static"} if op == "static" else load_op_config(op)
    return build_backbone({"name": name}, op_cfg, {"name": "none"}, num_classes=10, image_size=32).backbone.eval()


# ------------------------------------------------------------------------------------------ the statistics


def test_identical_maps_correlate_one_and_a_negated_copy_minus_one():
    x = torch.randn(6, 5, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x[:, 3] = 2.5 * x[:, 0] + 7.0  # the same map, scaled and shifted
    x[:, 4] = -x[:, 1]
    stats = CorrelationStats()
    stats.update(x)
    corr = stats.correlation()
    assert corr[0, 3] == pytest.approx(1.0, abs=1e-12) and corr[3, 0] == pytest.approx(1.0, abs=1e-12)
    assert corr[1, 4] == pytest.approx(-1.0, abs=1e-12)
    assert np.allclose(np.diag(corr), 1.0, atol=1e-12)


def test_independent_noise_is_uncorrelated():
    stats = CorrelationStats()
    generator = torch.Generator().manual_seed(1)
    for _ in range(4):
        stats.update(torch.randn(32, 8, 16, 16, generator=generator))  # 32,768 observations per channel
    values = off_diagonal(stats.correlation())
    assert values.size == 8 * 7 // 2
    assert np.abs(values).max() < 0.03
    assert strength_fractions(values)["N"] == 1.0


def test_streaming_equals_corrcoef_of_the_concatenated_data():
    """Batches of different sizes, far from zero mean: the float64 streamed merge is np.corrcoef to 1e-10."""
    generator = torch.Generator().manual_seed(2)
    mixing = torch.randn(6, 6, generator=generator, dtype=torch.float64)  # correlated channels
    batches = []
    for size in (3, 1, 7, 2):
        z = torch.randn(size, 6, 3, 5, generator=generator, dtype=torch.float64)
        batches.append(torch.einsum("ij,bjhw->bihw", mixing, z) * 4.0 + 100.0)
    stats = CorrelationStats()
    for batch in batches:
        stats.update(batch)
    observations = torch.cat(batches).transpose(0, 1).reshape(6, -1).numpy()  # (C, every image x position)
    assert stats.count == observations.shape[1]
    assert np.abs(stats.correlation() - np.corrcoef(observations)).max() < 1e-10
    # Token sequences (B, N, C): channels last.
    tokens = torch.randn(4, 9, 5, generator=generator, dtype=torch.float64)
    stats = CorrelationStats()
    stats.update(tokens[:2])
    stats.update(tokens[2:])
    assert np.abs(stats.correlation() - np.corrcoef(tokens.reshape(-1, 5).numpy().T)).max() < 1e-10


def test_the_hook_records_the_layer_output_only_while_active():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 6, 1)).double().eval()
    images = [torch.randn(2, 3, 5, 5, dtype=torch.float64) for _ in range(3)]
    stats = layer_correlation(model, "2", [(batch, None) for batch in images])
    with torch.no_grad():
        outputs = torch.cat([model(batch) for batch in images])  # after the recorder: not counted
    assert stats.count == 3 * 2 * 25
    expected = np.corrcoef(outputs.transpose(0, 1).reshape(6, -1).numpy())
    assert np.abs(stats.correlation() - expected).max() < 1e-10
    with pytest.raises(ValueError, match="not a module"):
        FeatureCorrelation(model, "nonexistent")


def test_constant_channels_are_left_out_and_the_fractions_sum_to_one():
    x = torch.randn(4, 5, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    x[:, 2] = 0.0  # a dead ReLU channel
    stats = CorrelationStats()
    stats.update(x)
    summary = summarize(stats, bins=10)
    assert summary["constant_channels"] == 1
    assert summary["pairs"] == 4 * 3 // 2 and sum(summary["histogram"]["counts"]) == summary["pairs"]
    assert np.isnan(stats.correlation()[2]).all()
    assert sum(summary["fractions"].values()) == pytest.approx(1.0)
    fractions = strength_fractions(np.array([0.0, 0.19, -0.2, 0.39, 0.4, -0.59, 0.6, -0.95, 1.0, 0.1]))
    assert fractions == pytest.approx({"S": 0.3, "M": 0.2, "W": 0.2, "N": 0.3})
    assert sum(fractions.values()) == pytest.approx(1.0)


def test_layers_the_paper_names_and_the_last_stages():
    """MobileNetV2's 7th stage (160 x width maps) is timm's blocks.5; other backbones: their last stage."""
    mobilenet = _backbone("mobilenetv2_050")
    assert resolve_layer(mobilenet, None) == "net.blocks.5"
    assert mobilenet.get_submodule("net.blocks.5")[-1].conv_pwl.out_channels == 80  # 160 at width 0.5
    assert resolve_layer(mobilenet, "blocks.3") == "net.blocks.3" == resolve_layer(mobilenet, "net.blocks.3")
    with pytest.raises(ValueError, match="correlation.layer='blocks.99'"):
        resolve_layer(mobilenet, "blocks.99")
    assert last_stage(_backbone("resnet18")) == ("net.layer4", 512)
    dy_mobile = _backbone("dynet_mobile", "dynet")  # no timm feature_info: found by a probe of forward_features
    name, channels = last_stage(dy_mobile)
    assert name.startswith("net.features.") and channels == dy_mobile.feature_channels[-1]
    assert resolve_layer(dy_mobile, None) == name


# --------------------------------------------------------------------------------------------- the figures


def _figures_cfg(compose_cfg, tmp_path, *overrides):
    return compose_cfg([f"out={tmp_path / 'figures'}", "data.num_workers=0", *overrides], config_name="figures")


def _checkpoint(tmp_path, data_dir, backbone: str, op: str):
    """An untrained digits checkpoint (16 validation images in batches of 8), as train.py saves it."""
    return make_checkpoint(tmp_path / f"{backbone}-{op}" / "checkpoints" / "best.pt", data_dir,
                           [f"backbone={backbone}", f"op={op}", "data.max_val_samples=16", "recipe.eval_batch_size=8"])


def test_missing_checkpoints_are_named(compose_cfg, tmp_path, data_dir):
    from dynconv.figures import make_figures

    report = make_figures(_figures_cfg(compose_cfg, tmp_path), ["dynet_fig2", "dynet_fig6"])
    assert "op=static" in report["missing"]["dynet_fig2"]
    assert "op=dynet" in report["missing"]["dynet_fig6"] and "mobilenetv2_100" in report["missing"]["dynet_fig6"]
    dynamic = _checkpoint(tmp_path, data_dir, "mobilenetv2_050", "dynet")
    report = make_figures(_figures_cfg(compose_cfg, tmp_path, f"checkpoint={dynamic}"), ["dynet_fig6"])
    reason = report["missing"]["dynet_fig6"]
    assert "backbone=mobilenetv2_050 trained with op=static" in reason and str(dynamic) in reason


def test_fig2_and_fig6_from_checkpoints(compose_cfg, tmp_path, data_dir):
    from dynconv.figures import make_figures

    static = _checkpoint(tmp_path, data_dir, "mobilenetv2_050", "static")
    dynamic = _checkpoint(tmp_path, data_dir, "mobilenetv2_050", "dynet")
    cfg = _figures_cfg(compose_cfg, tmp_path, f"checkpoint=[{dynamic},{static}]", "correlation.images=12",
                       "correlation.bins=20")
    report = make_figures(cfg, ["dynet_fig2", "dynet_fig6"])
    assert not report["missing"] and not report["failed"], report
    out = tmp_path / "figures"
    for name in ("dynet_fig2", "dynet_fig6"):
        assert (out / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert (out / f"{name}.png").stat().st_size > 5000 and (out / f"{name}.csv").stat().st_size > 0
    fig2 = json.loads((out / "dynet_fig2.json").read_text())
    assert [entry["op"] for entry in fig2["networks"]] == ["static"]  # static checkpoints only
    fig6 = json.loads((out / "dynet_fig6.json").read_text())
    for name, op in (("static", "static"), ("dynamic", "dynet")):
        entry = fig6[name]
        assert entry["op"] == op and entry["layer"] == "net.blocks.5" and entry["channels"] == 80
        assert entry["images"] == 12 and entry["observations"] == 12  # 32 px: 1 x 1 at stride 32
        assert sum(entry["fractions"].values()) == pytest.approx(1.0)
        assert sum(entry["histogram"]["counts"]) == entry["pairs"] and len(entry["histogram"]["counts"]) == 20


def test_fig7_latency_records_the_medians_and_the_reduced_ratio(compose_cfg, tmp_path):
    from dynconv.figures import make_figures

    cfg = _figures_cfg(compose_cfg, tmp_path, "latency.resolutions=[32,48]", "latency.repeats=3",
                       "latency.warmup=1", "latency.threads=1")
    report = make_figures(cfg, ["dynet_fig7"])
    assert not report["failed"] and "dynet_fig7" in report["figures"], report
    out = tmp_path / "figures"
    png = (out / "dynet_fig7.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    data = json.loads((out / "dynet_fig7.json").read_text())
    assert [row["resolution"] for row in data["rows"]] == [32, 48]
    assert data["models"] == {"dynamic": {"backbone": "dynet_mobile", "op": "dynet"},
                              "static": {"backbone": "mobilenetv2_100", "op": "static"}}
    for row in data["rows"]:
        assert len(row["dynamic_samples_ms"]) == len(row["static_samples_ms"]) == 3
        assert row["dynamic_ms"] == statistics.median(row["dynamic_samples_ms"])
        assert row["static_ms"] == statistics.median(row["static_samples_ms"])
        assert row["reduced_ratio_pct"] == pytest.approx(100.0 * (1.0 - row["dynamic_ms"] / row["static_ms"]))
    paper = data["paper"]
    assert (paper["dynamic_ms"], paper["static_ms"]) == (58.3, 109.1)
    assert paper["reduced_ratio_pct"] == pytest.approx(100.0 * (1 - 58.3 / 109.1))
    assert data["threads"] == 1 and torch.get_num_threads() == 1  # restored (one_thread's setting)
    assert (out / "dynet_fig7.csv").read_text().splitlines()[0].startswith("resolution,dynamic_ms,static_ms")


# ------------------------------------------------------------------------------------------ log.figures


class _Writer:
    def __init__(self):
        self.calls = []

    def add_histogram(self, tag, values, step, bins=None):
        self.calls.append((tag, step, np.asarray(values)))

    def add_figure(self, tag, fig, step):
        self.calls.append((tag, step, fig))

    def flush(self):
        pass


def test_the_hook_records_the_model_evaluation_only():
    """Only `trainer.evaluate(trainer.model)` is recorded (not the EMA copy), logged at epoch + 1; close() restores."""
    from dynconv.engine.hooks.figure_logging import FigureLoggingHook

    model, ema = _backbone("resnet18"), _backbone("resnet18")
    images = torch.randn(4, 3, 32, 32)

    class Trainer:
        def __init__(self):
            self.model, self.epoch, self.dist = model, 2, SimpleNamespace(device=torch.device("cpu"))

        def evaluate(self, which):
            with torch.no_grad():
                which.eval()(images)
            return {"top1": 0.0}

    trainer, writer = Trainer(), _Writer()
    hook = FigureLoggingHook(writer)
    hook.before_train(trainer)
    assert trainer.evaluate(ema) == {"top1": 0.0} and writer.calls == []
    trainer.evaluate(trainer.model)
    [(tag, step, values)] = writer.calls
    assert tag == "figures/feature_correlation" and step == 3
    stats = layer_correlation(model, "net.layer4", [images])  # the same 4 images at 1 x 1: 4 observations
    assert np.allclose(np.sort(values), np.sort(off_diagonal(stats.correlation())), atol=1e-12)
    hook.close(trainer)
    assert "evaluate" not in vars(trainer)


def test_training_with_log_figures_writes_both_tags(run_train, tmp_path):
    """One epoch of op=kw on 16 digits with log.figures=true: the event file holds the attention heatmap (an image)
    and the correlation histogram at step 1."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    smoke = [a for a in SMOKE if a.split("=")[0] not in ("recipe.epochs", "data.max_train_samples",
                                                           "data.max_val_samples", "recipe.batch_size")]
    completed, result = run_train(["op=kw", *smoke, "recipe.epochs=1", "data.max_train_samples=16",
                                   "data.max_val_samples=16", "recipe.batch_size=16", "checkpoint.enabled=false",
                                   "log.figures=true"], tmp_path, env=FAST_ENV)
    assert completed.returncode == 0 and result is not None, describe(completed)
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"), size_guidance={"images": 0, "histograms": 0})
    events.Reload()
    assert "figures/kw_attention" in events.Tags()["images"]
    assert "figures/feature_correlation" in events.Tags()["histograms"]
    [image] = events.Images("figures/kw_attention")
    [histogram] = events.Histograms("figures/feature_correlation")
    assert image.step == histogram.step == 1 and image.width > 100
    value = histogram.histogram_value
    assert value.num > 0 and -1.0 <= value.min <= value.max <= 1.0
