"""KernelWarehouse attention statistics (Sec. 4.3, Figure 3): `AttentionRecorder`, `save_attention_stats` and
`scripts/kw_attention.py` (mean alpha per warehouse over the evaluation split of a checkpoint)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf

from conftest import REPO, SMOKE, describe, last_json_line
from op_checks import load_op_config

from dynconv.build import build_backbone
from dynconv.analysis.kw_attention import (AttentionRecorder, diagonal_fraction, kw_layers, save_attention_stats,
                                       summarize)

SCRIPT = REPO / "scripts" / "kw_attention.py"
# The fixed cost model instead of timing the per-sample convolution algorithms: same results, seconds faster.
FAST_ENV = {"DYNCONV_CONV_ALGORITHM": "model"}


def _kw_resnet18(tau: float):
    op_cfg = load_op_config("kw")
    op_cfg["tau"] = tau
    torch.manual_seed(0)
    model = build_backbone({"name": "resnet18"}, op_cfg, {"name": "none"}, num_classes=10, image_size=32).backbone
    return model.eval()


def _run_script(args, train_env, timeout=300):
    completed = subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], cwd=REPO, env=train_env(FAST_ENV),
                               capture_output=True, text=True, timeout=timeout)
    return completed, last_json_line(completed.stdout)


def test_tau_one_mean_alpha_is_the_one_hot_beta():
    """tau = 1: alpha = beta (one-to-one), so every warehouse's mean matrix is the identity: each mixture's row
    has a 1 at its own cell, in forward order, and the diagonal fraction is exactly 1."""
    model = _kw_resnet18(1.0)
    with AttentionRecorder(model) as recorder, torch.no_grad():
        model(torch.randn(3, 3, 32, 32))
        model(torch.randn(2, 3, 32, 32))
    stats = recorder.mean_by_warehouse()
    assert set(stats) == {w.key for w in model.warehouses.values()}
    assert recorder.samples == 5
    for key, entry in stats.items():
        alpha = entry["alpha"]
        n = next(w for w in model.warehouses.values() if w.key == key).cells.shape[0]
        m_t = sum(layer.partition.mixtures for _, layer in kw_layers(model) if layer.warehouse.key == key)
        assert alpha.shape == (m_t, n) and alpha.dtype == torch.float64
        assert torch.equal(alpha, torch.eye(m_t, n, dtype=torch.float64)), key  # b = 1: m_t = n, own cells in order
        assert diagonal_fraction(entry) == 1.0
        assert entry["layers"][-1]["rows"][1] == m_t and entry["layers"][0]["rows"][0] == 0
        for layer in entry["layers"]:
            first, end = layer["rows"]
            start, stop = layer["own_cells"]
            assert end - first == stop - start  # b = 1: one own cell per mixture
            assert layer["samples"] == 5
            assert torch.equal(alpha[first:end, start:stop], torch.eye(end - first, dtype=torch.float64))
    assert summarize(stats)["stage1"] == {"mixtures": 56, "cells": 56, "diagonal_fraction": 1.0}
    # Rows follow forward order: stage1 holds layer1's convolutions, then layer2.0.conv1, then its downsample.
    assert [layer["name"] for layer in stats["stage1"]["layers"]][-2:] == ["net.layer2.0.conv1",
                                                                          "net.layer2.0.downsample.0"]


def test_means_match_a_manual_average_of_the_attention():
    """The recorded mean is the per-sample average of alpha over both batches (weighted by their sizes), as
    computed by calling each layer's attention directly on the pooled inputs it received."""
    model = _kw_resnet18(0.3)
    layers = kw_layers(model)
    pooled: dict[str, list[torch.Tensor]] = {name: [] for name, _ in layers}
    handles = [layer.attention.register_forward_pre_hook(
        lambda module, args, name=name: pooled[name].append(args[0].detach().clone())) for name, layer in layers]
    batches = [torch.randn(3, 3, 32, 32), torch.randn(5, 3, 32, 32)]
    with AttentionRecorder(model) as recorder, torch.no_grad():
        for images in batches:
            model(images)
    for handle in handles:
        handle.remove()
    stats = recorder.mean_by_warehouse()
    with torch.no_grad():
        for name, layer in layers:
            assert [p.shape[0] for p in pooled[name]] == [3, 5]
            alpha = torch.cat([layer.attention(p)[0] for p in pooled[name]]).double()
            expected = alpha.mean(dim=0)
            entry = stats[layer.warehouse.key]
            row = next(item for item in entry["layers"] if item["name"] == name)
            first, end = row["rows"]
            torch.testing.assert_close(entry["alpha"][first:end], expected, rtol=1e-6, atol=1e-7)
    # tau = 0.3 leaves a non-trivial mixture: the statistics are not just beta.
    assert not torch.equal(stats["stage1"]["alpha"], torch.eye(56, dtype=torch.float64))


def test_hooks_are_removed_on_exit_and_nothing_recorded_outside():
    model = _kw_resnet18(1.0)
    attentions = [layer.attention for _, layer in kw_layers(model)]
    recorder = AttentionRecorder(model)
    with recorder:
        assert all(len(a._forward_hooks) == 1 for a in attentions)
    assert all(len(a._forward_hooks) == 0 for a in attentions)
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))  # not recorded
    with pytest.raises(RuntimeError, match="no attention was recorded"):
        recorder.mean_by_warehouse()


def test_recorder_refuses_a_model_without_kw_layers():
    model = build_backbone({"name": "resnet18"}, load_op_config("static"), {"name": "none"}, num_classes=10,
                           image_size=32).backbone
    with pytest.raises(ValueError, match="no KernelWarehouse layers"):
        AttentionRecorder(model)


def test_save_attention_stats_writes_pt_and_json_atomically(tmp_path):
    model = _kw_resnet18(1.0)
    with AttentionRecorder(model) as recorder, torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    stats = recorder.mean_by_warehouse()
    pt, js = save_attention_stats(stats, tmp_path / "out" / "stats", {"images": 2})
    assert pt == tmp_path / "out" / "stats.pt" and js == tmp_path / "out" / "stats.json"
    assert sorted(p.name for p in pt.parent.iterdir()) == ["stats.json", "stats.pt"], "temporary files left behind"
    loaded = torch.load(pt, weights_only=True)
    assert loaded["metadata"] == {"images": 2}
    for key, entry in stats.items():
        assert torch.equal(loaded["warehouses"][key]["alpha"], entry["alpha"])
        assert loaded["warehouses"][key]["layers"] == entry["layers"]
    summary = json.loads(js.read_text())
    assert summary["images"] == 2
    assert summary["warehouses"]["stage4"]["mixtures"] == 27 and summary["warehouses"]["stage4"]["cells"] == 27
    assert summary["warehouses"]["stage4"]["layers"][0]["name"] == "net.layer4.0.conv2"


# ------------------------------------------------------------------------------------------------ script
def _synthetic_checkpoint(compose_cfg, path, overrides):
    """A checkpoint as train.py writes it (model state + resolved config), without training."""
    cfg = compose_cfg(overrides)
    built = build_backbone(cfg.backbone, OmegaConf.to_container(cfg.op, resolve=True), cfg.attn, num_classes=10,
                           image_size=int(cfg.data.image_size))
    torch.save({"model": built.backbone.state_dict(), "config": OmegaConf.to_container(cfg, resolve=True),
                "epoch": 0}, path)
    return path


def test_script_refuses_a_checkpoint_without_kw_layers(compose_cfg, train_env, tmp_path):
    checkpoint = _synthetic_checkpoint(compose_cfg, tmp_path / "static.pt", ["op=static"])
    completed, result = _run_script([f"checkpoint={checkpoint}", f"out={tmp_path / 'att'}"], train_env)
    assert completed.returncode == 2, describe(completed)
    assert "op.name='static'" in completed.stderr and "op=kw" in completed.stderr
    assert result is None
    assert not (tmp_path / "att.pt").exists() and not (tmp_path / "att.json").exists()


def test_script_on_an_untrained_kw_checkpoint(compose_cfg, train_env, data_dir, tmp_path):
    """At initialisation tau = 1 (the schedule's start): every warehouse is exactly diagonal."""
    checkpoint = _synthetic_checkpoint(compose_cfg, tmp_path / "kw.pt", ["op=kw"])
    out = tmp_path / "stats" / "att"
    completed, result = _run_script([f"checkpoint={checkpoint}", f"out={out}", f"data.root={data_dir / 'digits'}",
                                     "data.max_val_samples=12", "data.num_workers=0", "recipe.eval_batch_size=8",
                                     "device=cpu"], train_env)
    assert completed.returncode == 0, describe(completed)
    assert result is not None, describe(completed)
    assert result["output"] == str(out) + ".pt" and result["images"] == 12
    assert result["warehouses"]["stage1"] == {"mixtures": 56, "cells": 56, "diagonal_fraction": 1.0}
    assert set(result["warehouses"]) == {"stage1", "stage2", "stage3", "stage4"}
    loaded = torch.load(str(out) + ".pt", weights_only=True)
    assert torch.equal(loaded["warehouses"]["stage2"]["alpha"], torch.eye(47, dtype=torch.float64))
    summary = json.loads((tmp_path / "stats" / "att.json").read_text())
    assert summary["images"] == 12 and summary["checkpoint"] == str(checkpoint)


@pytest.mark.slow
def test_script_end_to_end_after_one_epoch(run_train, train_env, tmp_path):
    """train.py op=kw for one epoch (two steps) on 64 digits, then the script on its checkpoint (~1 min, 2 CPUs)."""
    smoke = [a for a in SMOKE if a.split("=")[0] not in ("recipe.epochs", "data.max_train_samples",
                                                           "data.max_val_samples")]
    completed, trained = run_train(["op=kw", *smoke, "recipe.epochs=1", "data.max_train_samples=64",
                                    "data.max_val_samples=32", "log.tensorboard=false"], tmp_path, env=FAST_ENV)
    assert completed.returncode == 0 and trained is not None, describe(completed)
    checkpoint = tmp_path / "run" / "checkpoints" / "last.pt"
    out = tmp_path / "kw_attention"
    completed, result = _run_script([f"checkpoint={checkpoint}", f"out={out}", "data.num_workers=0"], train_env)
    assert completed.returncode == 0, describe(completed)
    assert result is not None, describe(completed)
    assert result["images"] == 32  # data.max_val_samples of the run, as recorded in the checkpoint
    assert result["top1"] == pytest.approx(trained["top1"])  # the same evaluation as train.py's
    tau = torch.load(checkpoint, weights_only=True)["model"]["net.layer1.0.conv1.attention.tau"].item()
    assert 2 / 3 < tau < 1.0  # one of op.tau_epochs=10 epochs: tau fell, but not much
    for key, entry in result["warehouses"].items():
        assert entry["mixtures"] == entry["cells"]  # b = 1
        # alpha = tau beta + (1 - tau) z / sum|z|: the own cell gets >= 2 tau - 1, any other <= 1 - tau.
        assert entry["diagonal_fraction"] == 1.0, key
    loaded = torch.load(out.with_suffix(".pt"), weights_only=True)
    alpha = loaded["warehouses"]["stage3"]["alpha"]
    assert alpha.shape == (47, 47) and not torch.equal(alpha, torch.eye(47, dtype=torch.float64))
    assert json.loads(out.with_suffix(".json").read_text())["epoch"] == 1
