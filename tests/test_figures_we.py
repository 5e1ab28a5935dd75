"""Weight Excitation Figures 1a, 2, 3b, 4 and 5 (dynconv/figures/we_figures.py) and the weight ablation behind
Figures 1 and 2 (dynconv/analysis/weight_ablation.py): every D equals the score of the zeroed network computed
directly, weights come back bit for bit, f_A is magnitude.py's, the curves are the values written to TensorBoard,
and a missing input is named."""

from __future__ import annotations

import copy
import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml
from omegaconf import OmegaConf

from conftest import REPO
from figure_checkpoints import make_checkpoint
from op_checks import load_op_config

from dynconv.analysis import weight_ablation as wa
from dynconv.figures.context import FigureContext, RunRef
from dynconv.figures.registry import FIGURES, MissingInput

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _cost_model(monkeypatch):
    monkeypatch.setenv("DYNCONV_CONV_ALGORITHM", "model")


def figures_ctx(tmp_path: Path, *overrides: str) -> FigureContext:
    cfg = OmegaConf.merge(OmegaConf.load(REPO / "configs" / "figures.yaml"),
                          OmegaConf.from_dotlist([f"out={tmp_path / 'out'}", "data.num_workers=0", "device=cpu",
                                                  *overrides]))
    return FigureContext(cfg, Path(cfg.out))


def png_written(path: str) -> bool:
    data = Path(path).read_bytes()
    return len(data) > 1000 and data[:8] == b"\x89PNG\r\n\x1a\n"


def score(model: nn.Module, images: torch.Tensor, targets: torch.Tensor) -> tuple[float, float]:
    """Top-1 (%) and mean cross-entropy, written out here independently of CachedScorer."""
    with torch.no_grad():
        logits = model(images).float()
    return (100.0 * int((logits.argmax(1) == targets).sum()) / targets.numel(),
            F.cross_entropy(logits, targets).item())


def small_net(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 5, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 4)).eval()


def data(model: nn.Module, count: int = 48, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Images and targets on which the model is right about half the time (so drops and gains both show)."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(count, 3, 6, 6, generator=generator)
    with torch.no_grad():
        predicted = model(images).argmax(1)
    random = torch.randint(0, 4, (count,), generator=generator)
    return images, torch.where(torch.arange(count) % 2 == 0, predicted, random)


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.clone() for key, value in model.state_dict().items()}


def bit_identical(model: nn.Module, before: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(value, before[key]) for key, value in model.state_dict().items())


# ------------------------------------------------------------------------------------------- the ablation


def test_magnitude_bins_partition_each_layer_and_positions_follow_the_magnitude_order():
    torch.manual_seed(0)
    weight = torch.randn(7, 5, 3, 3)
    magnitude = weight.abs().flatten()
    bins = wa.magnitude_bins(weight, 10).flatten()
    counts = torch.bincount(bins, minlength=10)
    assert counts.sum() == weight.numel() and counts.min() >= weight.numel() // 10 and counts.max() <= -(-315 // 10)
    for index in range(9):  # bin k's weights are never larger than bin k+1's
        assert magnitude[bins == index].max() <= magnitude[bins == index + 1].min()
    ordered = np.sort(magnitude.numpy())
    positions = wa.percentile_positions(weight, 100)
    for b in (1, 37, 50, 100):  # nearest rank ceil(b / 100 * n) of the ascending |w|
        assert magnitude[positions[b - 1]].item() == ordered[math.ceil(b * weight.numel() / 100) - 1]
    assert magnitude[positions[-1]] == magnitude.max()
    # Equal magnitudes: still a partition, in index order.
    ties = wa.magnitude_bins(torch.ones(10), 5)
    assert ties.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert wa.evenly_spaced(11, 5) == [0, 3, 5, 8, 10] and wa.evenly_spaced(7, 5) == [0, 2, 3, 5, 6]
    assert wa.evenly_spaced(3, 5) == [0, 1, 2] and wa.evenly_spaced(4, 1) == [0]


def test_each_D_is_the_directly_computed_drop_and_the_weights_come_back_bit_for_bit():
    model = small_net()
    images, targets = data(model)
    before = state(model)
    layers = wa.conv_layers(model)
    assert [layer.name for layer in layers] == ["0", "2"]  # the Linear is no convolution
    scorer = wa.CachedScorer(model, images, targets, batch_size=16)  # three chunks
    baseline = scorer()
    assert (baseline.top1, baseline.loss) == pytest.approx(score(model, images, targets), abs=1e-5)

    # One bin = the whole layer: the network whose output depends on that layer scores as the zeroed one.
    rows = wa.bin_curves(scorer, layers, 1, baseline)
    for layer, row in zip(layers, rows):
        zeroed = copy.deepcopy(model)
        zeroed.get_submodule(layer.name).weight.data.zero_()
        top1, loss = score(zeroed, images, targets)
        assert row["weights"] == layer.weight.numel()
        assert row["drop_top1"] == pytest.approx(baseline.top1 - top1, abs=1e-9)
        assert row["drop_loss"] == pytest.approx(loss - baseline.loss, abs=1e-5)
    # Three bins per layer: each D is the network with exactly that bin's weights zeroed.
    rows = wa.bin_curves(scorer, layers, 3, baseline)
    for row in rows:
        weight = model.get_submodule(row["layer"]).weight.detach()
        ranks = np.empty(weight.numel(), dtype=np.int64)
        ranks[np.argsort(weight.abs().flatten().numpy(), kind="stable")] = np.arange(weight.numel())
        mask = torch.from_numpy(ranks * 3 // weight.numel() == row["bin"] - 1).view(weight.shape)
        zeroed = copy.deepcopy(model)
        zeroed.get_submodule(row["layer"]).weight.data[mask] = 0.0
        top1, loss = score(zeroed, images, targets)
        assert row["drop_top1"] == pytest.approx(baseline.top1 - top1, abs=1e-9)
        assert row["drop_loss"] == pytest.approx(loss - baseline.loss, abs=1e-5)
    assert any(row["drop_loss"] != 0 for row in rows)
    assert bit_identical(model, before)


def test_the_papers_fig1a_zeroes_the_bth_percentile_weight_of_every_layer_at_once():
    model = small_net(2)
    images, targets = data(model)
    before = state(model)
    layers = wa.conv_layers(model)
    scorer = wa.CachedScorer(model, images, targets)
    rows = wa.position_curve(scorer, layers, 4)
    assert [row["percentile"] for row in rows] == [1, 2, 3, 4] and scorer.evaluations == 5
    baseline = score(model, images, targets)
    for row in rows:
        zeroed = copy.deepcopy(model)
        for layer in layers:
            weight = zeroed.get_submodule(layer.name).weight.data
            ordered = np.sort(weight.abs().flatten().numpy())
            target = ordered[math.ceil(row["percentile"] * weight.numel() / 4) - 1]
            assert int((weight.abs() == target).sum()) == 1
            weight[weight.abs() == target] = 0.0
        top1, loss = score(zeroed, images, targets)
        assert row["drop_top1"] == pytest.approx(baseline[0] - top1, abs=1e-9)
        assert row["drop_loss"] == pytest.approx(loss - baseline[1], abs=1e-5)
    assert bit_identical(model, before)


def test_fig2_maps_zero_one_kernel_between_equidistant_channels():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(3, 11, 3, padding=1), nn.ReLU(), nn.Conv2d(11, 7, 3, padding=1),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()
    images, targets = torch.randn(24, 3, 5, 5), torch.randint(0, 7, (24,))
    before = state(model)
    layers, _ = wa.select_layers(wa.conv_layers(model), ["2"], kernel_size=(3, 3))
    rows = wa.kernel_maps(wa.CachedScorer(model, images, targets), layers, 5)
    assert sorted({row["out_channel"] for row in rows}) == [0, 2, 3, 5, 6]  # 7 outputs
    assert sorted({row["in_channel"] for row in rows}) == [0, 3, 5, 8, 10]  # 11 inputs
    assert len(rows) == 25
    baseline = score(model, images, targets)
    for row in rows[::6]:
        zeroed = copy.deepcopy(model)
        zeroed[2].weight.data[row["out_channel"], row["in_channel"]] = 0.0
        top1, loss = score(zeroed, images, targets)
        assert row["drop_top1"] == pytest.approx(baseline[0] - top1, abs=1e-9)
        assert row["drop_loss"] == pytest.approx(loss - baseline[1], abs=1e-5)
    assert bit_identical(model, before)


class _KernelBank(nn.Module):
    """Stands in for CondConv / DY-Conv: a bank of kernels, no single one."""

    def __init__(self):
        super().__init__()
        self.in_channels, self.out_channels, self.kernel_size = 3, 4, (3, 3)
        self.weight = nn.Parameter(torch.randn(2, 4, 3, 3, 3))
        self.route = nn.Conv2d(3, 2, 1)  # its own branch: part of the layer, not a layer


class _Generated(nn.Module):
    """Stands in for KernelWarehouse / WeightNet: no static kernel."""

    def __init__(self):
        super().__init__()
        self.in_channels, self.out_channels, self.kernel_size = 4, 4, (3, 3)


def test_reparameterised_weights_are_ablated_folded_and_layers_without_a_plain_kernel_are_skipped():
    from dynconv.ops.we.magnitude import MagnitudeExcitation, magnitude_excitation
    from dynconv.ops.we.parametrize import excite

    model = small_net(4)
    original = model[0].weight.detach().clone()
    excite(model[0], MagnitudeExcitation(0.1, standardize=False))
    images, targets = data(model)
    folded = wa.inference_model(model)
    assert folded is not model and torch.equal(folded[0].weight, magnitude_excitation(original, 0.1))
    assert hasattr(model[0], "parametrizations")  # the checkpoint's model is left as it was
    layer = wa.conv_layers(folded)[0]
    (row,) = wa.bin_curves(wa.CachedScorer(folded, images, targets), [layer], 1)
    plain = copy.deepcopy(folded)
    plain[0].weight.data.zero_()
    assert row["drop_loss"] == pytest.approx(score(plain, images, targets)[1] - score(model, images, targets)[1],
                                             abs=1e-5)
    assert wa.inference_model(plain) is plain  # nothing to fold: no copy

    mixed = nn.Sequential(_KernelBank(), _Generated(), nn.Conv2d(4, 4, 3))
    layers = wa.conv_layers(mixed)
    assert [layer.name for layer in layers] == ["0", "1", "2"]  # not 0.route
    assert "(2, 4, 3, 3, 3)" in layers[0].reason and "no static kernel" in layers[1].reason
    usable, skipped = wa.select_layers(layers)
    assert [layer.name for layer in usable] == ["2"] and [layer.name for layer in skipped] == ["0", "1"]
    with pytest.raises(ValueError, match="ablation.layers: 'nope'"):
        wa.select_layers(layers, ["nope"])


def test_dynconv_backbones_list_their_own_convolutions_not_attention_branches():
    attn = OmegaConf.to_container(OmegaConf.load(REPO / "configs" / "attn" / "se.yaml"))
    torch.manual_seed(0)
    from dynconv.build import build_backbone

    model = build_backbone({"name": "resnet18"}, load_op_config("lwe"), attn, num_classes=10, image_size=32).backbone
    layers = wa.conv_layers(wa.inference_model(model))
    assert len(layers) == 20 and all(layer.weight is not None for layer in layers)  # stem, 16 3x3, 3 shortcuts
    assert not any(".se." in layer.name or ".attn." in layer.name for layer in layers)
    usable, _ = wa.select_layers(layers, kernel_size=(3, 3), max_layers=4)
    assert [layer.name for layer in usable] == ["net.layer1.0.conv1", "net.layer2.0.conv2", "net.layer3.1.conv1",
                                                "net.layer4.1.conv2"]


# ------------------------------------------------------------------------------------------- the figures


def _ones_in_every_norm(model: nn.Module) -> None:
    # timm starts each block's last BN at gamma 0; trained networks do not, and their ablations all matter.
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)


def test_we_fig1_and_fig2_from_a_checkpoint(tmp_path, data_dir):
    from dynconv.engine.evaluation_run import load_for_evaluation
    from dynconv.figures import make_figures

    checkpoint = make_checkpoint(tmp_path / "static" / "best.pt", data_dir, ["op=static"],
                                 model_edit=_ones_in_every_norm)
    # Small layers only (sorting ResNet18's 11M weights by magnitude takes seconds on one thread); named as inside
    # the backbone, without the model's leading `net.`.
    ctx = figures_ctx(tmp_path, f"checkpoint={checkpoint}", "ablation.images=8", "ablation.percentiles=3",
                      "ablation.bins=2", "ablation.max_layers=2", "ablation.channels=2", "ablation.metric=loss",
                      "ablation.layers=[conv1,layer1.0.conv1,layer1.0.conv2,layer2.0.downsample.0]")
    report = make_figures(ctx.cfg, ["we_fig1", "we_fig2"])
    assert not report["missing"] and not report["failed"], report
    fig1, fig2 = report["figures"]["we_fig1"], report["figures"]["we_fig2"]
    assert fig1["layers"] == 4 and fig2["layers"] == 2 and fig1["images"] == 8
    for summary in (fig1, fig2):
        assert png_written(next(path for path in summary["files"] if path.endswith(".png")))
    one = json.loads((tmp_path / "out" / "we_fig1.json").read_text())
    two = json.loads((tmp_path / "out" / "we_fig2.json").read_text())
    assert one["bin_layers"] == ["net.conv1", "net.layer2.0.downsample.0"]  # 2 of 4, evenly spaced
    assert [entry["layer"] for entry in two["maps"]] == ["net.layer1.0.conv1", "net.layer1.0.conv2"]  # the 3x3 ones
    assert len(list(csv.DictReader((tmp_path / "out" / "we_fig2.csv").open()))) == 8

    loaded = load_for_evaluation(OmegaConf.create({"checkpoint": str(checkpoint), "weights": "model",
                                                   "device": "cpu", "task": {}, "data": {"num_workers": 0},
                                                   "recipe": {"eval_batch_size": 8}}))
    model = loaded.model.eval()
    images, targets = next(iter(loaded.data.val_loader))[:2]
    images, targets = images[:8], targets[:8]
    baseline = score(model, images, targets)
    assert (one["baseline"]["top1"], one["baseline"]["loss"]) == pytest.approx(baseline, abs=1e-5)
    stem = model.net.conv1.weight
    zeroed = copy.deepcopy(model)
    zeroed.net.conv1.weight.data[wa.magnitude_bins(stem, 2) == 1] = 0.0  # the larger half of the stem
    row = next(row for row in one["bin_curves"] if row["layer"] == "net.conv1" and row["bin"] == 2)
    assert row["drop_loss"] == pytest.approx(score(zeroed, images, targets)[1] - baseline[1], abs=1e-5)
    assert row["drop_loss"] != 0
    kernel = two["maps"][1]  # layer1.0.conv2 (64 x 64): channels 0 and 63
    assert kernel["out_channels"] == [0, 63] and kernel["in_channels"] == [0, 63]
    zeroed = copy.deepcopy(model)
    zeroed.net.layer1[0].conv2.weight.data[63, 0] = 0.0
    assert kernel["drop_loss"][1][0] == pytest.approx(score(zeroed, images, targets)[1] - baseline[1], abs=1e-5)


def test_we_fig3b_is_magnitude_py_f_A_and_the_gain_of_eq3(tmp_path):
    from dynconv.ops.we.magnitude import magnitude_excitation

    ctx = figures_ctx(tmp_path, "we_magnitude.eps=[0.1,0.5]")
    summary = FIGURES["we_fig3b"].make(ctx)
    assert summary["max_gain"]["0.1"] == pytest.approx(5.762, abs=1e-3)  # "maximum of 5.76 when eps_A = 0.1"
    assert png_written(str(tmp_path / "out" / "we_fig3b.png"))
    rows = list(csv.DictReader((tmp_path / "out" / "we_fig3b.csv").open()))
    assert {row["eps"] for row in rows} == {"0.1", "0.5"}
    for eps in (0.1, 0.5):
        mine = [row for row in rows if float(row["eps"]) == eps]
        w = torch.tensor([float(row["w"]) for row in mine], dtype=torch.float64)
        assert w.abs().max() == 1.0
        expected = magnitude_excitation(w, eps)
        assert torch.allclose(torch.tensor([float(row["f_A"]) for row in mine], dtype=torch.float64), expected,
                              rtol=1e-12, atol=1e-12)
        bound = 1.0 + eps
        gain = bound ** 2 / (bound ** 2 - w ** 2)
        assert torch.allclose(torch.tensor([float(row["gain"]) for row in mine], dtype=torch.float64), gain,
                              rtol=1e-9)


def write_run(root: Path, name: str, config: dict, val: list[float] | None, loss: list[float] | None = None) -> Path:
    from torch.utils.tensorboard import SummaryWriter

    run_dir = root / name
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    if val is not None:
        writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        for epoch, value in enumerate(val, start=1):
            writer.add_scalar("val/top1", value, epoch)
            writer.add_scalar("train/epoch_loss", (loss or val)[epoch - 1], epoch)
            writer.add_scalar("train/loss", 9.0, epoch * 10)  # per step: not drawn
        writer.close()
    return run_dir


def run_config(op: str = "static", attn: str = "none", norm: str = "batchnorm", opt: str = "sgd",
               sched: str = "step") -> dict:
    return {"backbone": {"name": "resnet50", "norm_layer": norm}, "op": {"name": op}, "attn": {"name": attn},
            "recipe": {"opt": opt, "sched": sched, "epochs": 3}, "task": {"name": "classification"}}


def test_we_fig4_and_fig5_draw_the_curves_written_to_tensorboard(tmp_path):
    runs = tmp_path / "runs"
    write_run(runs, "static", run_config(), [10.5, 20.25, 30.0], [2.5, 2.0, 1.5])
    write_run(runs, "lwe", run_config("lwe"), [11.0, 22.5, 33.75], [2.25, 1.75, 1.25])
    write_run(runs, "se", run_config(attn="se"), [12.0, 21.0])
    write_run(runs, "ws", run_config("weight_std"), [9.0, 19.0])
    write_run(runs, "gn_lwe", run_config("lwe", norm="groupnorm"), [8.0, 18.5])
    write_run(runs, "adamw_lwe", run_config("lwe", opt="adamw", sched="cosine"), [5.0, 6.0, 7.0])
    write_run(runs, "no_logs", run_config(), None)

    ctx = figures_ctx(tmp_path, f"runs={runs}")
    summary = FIGURES["we_fig4"].make(ctx)
    assert summary["panels"] == {"a": ["resnet50 + lwe", "resnet50 + static"], "b": ["resnet50 + static + se"],
                                 "c": ["resnet50 + lwe", "resnet50 + static", "resnet50 + weight_std"]}
    data = json.loads((tmp_path / "out" / "we_fig4.json").read_text())
    static = next(run for run in data["panels"]["a"]["runs"] if run["op"] == "static")
    assert static["val"] == [[1, 10.5], [2, 20.25], [3, 30.0]]
    assert static["train_epoch_loss"] == [[1, 2.5], [2, 2.0], [3, 1.5]]
    assert "training accuracy" in data["note"]
    reasons = {Path(item["run_dir"]).name: item["reason"] for item in data["left_out"]}
    assert set(reasons) == {"gn_lwe", "adamw_lwe", "no_logs"} and "we_fig5" in reasons["gn_lwe"]
    rows = list(csv.DictReader((tmp_path / "out" / "we_fig4.csv").open()))
    assert {(row["epoch"], row["val"], row["train_epoch_loss"]) for row in rows
            if row["panel"] == "a" and row["label"] == "resnet50 + lwe"} == {
        ("1", "11.0", "2.25"), ("2", "22.5", "1.75"), ("3", "33.75", "1.25")}
    assert png_written(str(tmp_path / "out" / "we_fig4.png"))

    summary = FIGURES["we_fig5"].make(ctx)
    assert summary["panels"]["a"][-1] == "resnet50 (GN) + lwe" and "resnet50 + lwe" in summary["panels"]["a"]
    assert summary["panels"]["b"] == ["resnet50 + lwe"] and summary["missing"] == {}
    data = json.loads((tmp_path / "out" / "we_fig5.json").read_text())
    assert data["panels"]["b"]["runs"][0]["val"] == [[1, 5.0], [2, 6.0], [3, 7.0]]
    assert data["panels"]["b"]["paper"] == [{"label": "resnet50 + lwe", "epoch": 3, "top1": 72.0}]
    assert png_written(str(tmp_path / "out" / "we_fig5.png"))


def test_a_missing_input_is_named(tmp_path):
    with pytest.raises(MissingInput, match="runs="):
        FIGURES["we_fig4"].make(figures_ctx(tmp_path))
    runs = tmp_path / "runs"
    write_run(runs, "static", run_config(), [1.0])
    with pytest.raises(MissingInput) as missing:
        FIGURES["we_fig5"].make(figures_ctx(tmp_path, f"runs={runs}"))
    assert "backbone.norm_layer=groupnorm" in str(missing.value) and "recipe.opt=adamw" in str(missing.value)
    with pytest.raises(MissingInput, match="op=static"):
        FIGURES["we_fig1"].make(figures_ctx(tmp_path))
    ctx = figures_ctx(tmp_path)
    ctx._candidates = [RunRef(tmp_path / "kw.pt", {"op": {"name": "kw"}})]  # kernels made per sample: none to zero
    with pytest.raises(MissingInput, match=r"op=static.*kw\.pt"):
        FIGURES["we_fig2"].make(ctx)
    assert not (tmp_path / "out" / "we_fig1.png").exists()
