"""WeightNet Figures 5 and 6 (dynconv/figures/wn_kernels.py): the t-SNE points are the chosen images with their
classes, known filters give known cosine matrices, the PNGs are written, a missing checkpoint is named."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from figure_checkpoints import make_checkpoint

from dynconv.figures.wn_kernels import (KernelSketch, pick_distinct, pick_per_class, similarity_summary,
                                        tsne_perplexity)

pytestmark = pytest.mark.usefixtures("one_thread")
LAYER = "net.layer4.1.conv2"  # ResNet18's last convolution: the last one WeightNet makes dynamic


@pytest.fixture(autouse=True)
def _cost_model(monkeypatch):
    monkeypatch.setenv("DYNCONV_CONV_ALGORITHM", "model")


def _identical_filters(model) -> None:
    """WeightNet with G = 1 scales output channel o's generator slice by one positive alpha per sample; equal
    slices make every generated filter a positive multiple of one vector: cosine 1 between all of them."""
    generator = model.get_submodule(LAYER).generator  # (C_out, lambda = 1, C_in * 3 * 3)
    with torch.no_grad():
        generator.copy_(generator[:1].expand_as(generator))


def _orthogonal_filters(model) -> None:
    """512 orthonormal filters of 512 x 3 x 3: the static kernel's cosine matrix is the identity."""
    weight = model.get_submodule(LAYER).weight
    q, _ = torch.linalg.qr(torch.randn(weight[0].numel(), weight.shape[0], generator=torch.Generator().manual_seed(0)))
    with torch.no_grad():
        weight.copy_(q.t().reshape(weight.shape))


@pytest.fixture(scope="module")
def checkpoints(module_tmp, data_dir):
    root = module_tmp("wn")
    dynamic = make_checkpoint(root / "weightnet" / "checkpoints" / "best.pt", data_dir,
                              ["backbone=resnet18", "op=weightnet", "op.G=1", "recipe.eval_batch_size=8"],
                              model_edit=_identical_filters)
    static = make_checkpoint(root / "static" / "checkpoints" / "best.pt", data_dir,
                             ["backbone=resnet18", "op=static", "recipe.eval_batch_size=8"],
                             model_edit=_orthogonal_filters)
    return dynamic, static


def _cfg(compose_cfg, tmp_path, *overrides):
    return compose_cfg([f"out={tmp_path / 'figures'}", "data.num_workers=0", *overrides], config_name="figures")


def _png(path) -> bool:
    data = path.read_bytes()
    return len(data) > 5000 and data[:8] == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------------------- the pieces


def test_known_similarity_matrices_and_the_helpers():
    assert similarity_summary(torch.eye(4)) == {"mean_abs_off_diagonal": 0.0, "mean_off_diagonal": 0.0}
    assert similarity_summary(torch.ones(3, 3)) == {"mean_abs_off_diagonal": 1.0, "mean_off_diagonal": 1.0}
    anti = torch.tensor([[1.0, -0.5], [-0.5, 1.0]])
    assert similarity_summary(anti) == {"mean_abs_off_diagonal": 0.5, "mean_off_diagonal": -0.5}
    # Perplexity: kept when the points allow it, lowered to (points - 1) / 3 otherwise.
    assert tsne_perplexity(30, 1000) == 30 and tsne_perplexity(30, 13) == 4.0
    # Hashing: short kernels are only flattened; long ones keep their squared norms and distances on average.
    short = torch.randn(3, 2, 2, 2)
    assert torch.equal(KernelSketch(8, 0)(short), short.flatten(1))
    long = torch.randn(6, 40000, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    hashed = KernelSketch(4096, 0)(long)
    assert hashed.shape == (6, 4096) and torch.equal(hashed, KernelSketch(4096, 0)(long))  # seeded
    ratio = torch.cdist(hashed, hashed)[~torch.eye(6, dtype=torch.bool)] / torch.cdist(long, long)[
        ~torch.eye(6, dtype=torch.bool)]
    assert (ratio - 1).abs().max() < 0.1
    # Images: the classes drawn, all images of a class when it has fewer; distinct classes first.
    targets = [0] * 5 + [1] * 2 + [2] * 4
    classes, picked = pick_per_class(targets, classes=5, per_class=3, seed=0)
    assert classes == [0, 1, 2] and [targets[i] for i in picked] == [0, 0, 0, 1, 1, 2, 2, 2]
    distinct = pick_distinct(targets, 4, seed=0)
    assert len(set(distinct)) == 4 and {targets[i] for i in distinct} == {0, 1, 2}
    assert sorted(targets[i] for i in pick_distinct(targets, 3, seed=1)) == [0, 1, 2]


# --------------------------------------------------------------------------------------------- the figures


def test_missing_checkpoints_are_named(compose_cfg, tmp_path, checkpoints):
    from dynconv.figures import make_figures

    report = make_figures(_cfg(compose_cfg, tmp_path), ["wn_fig5", "wn_fig6"])
    for key in ("wn_fig5", "wn_fig6"):
        assert "op=weightnet" in report["missing"][key] and "python train.py op=weightnet" in report["missing"][key]
    dynamic, _ = checkpoints
    report = make_figures(_cfg(compose_cfg, tmp_path, f"checkpoint={dynamic}"), ["wn_fig6"])
    reason = report["missing"]["wn_fig6"]
    assert "backbone=resnet18 trained with op=static" in reason and str(dynamic) in reason
    assert not (tmp_path / "figures" / "wn_fig6.png").exists()


def test_fig5_has_one_point_per_chosen_image_with_its_class(compose_cfg, tmp_path, data_dir, checkpoints):
    from torchvision.datasets import ImageFolder

    from dynconv.figures import make_figures

    dynamic, _ = checkpoints
    # 20 classes asked of the digits' 10: all 10 are drawn, and the JSON says so.
    cfg = _cfg(compose_cfg, tmp_path, f"checkpoint={dynamic}", "kernels.classes=20", "kernels.per_class=2")
    report = make_figures(cfg, ["wn_fig5"])
    assert not report["missing"] and not report["failed"], report
    out = tmp_path / "figures"
    assert _png(out / "wn_fig5.png")
    data = json.loads((out / "wn_fig5.json").read_text())
    assert data["layer"] == LAYER and data["op"] == "weightnet" and data["kernel_shape"] == [512, 512, 3, 3]
    assert data["hashed"] and data["dims"] == 16384  # 2.4M weights per kernel, hashed (kernels.max_dims)
    assert data["images"] == 20 and len(data["classes"]) == 10 and "10 classes" in data["notes"][0]
    assert data["perplexity"] == pytest.approx(19 / 3)
    rows = list(csv.DictReader((out / "wn_fig5.csv").open()))
    assert len(rows) == 20
    targets = ImageFolder(str(data_dir / "digits" / "val")).targets
    assert all(int(row["class"]) == targets[int(row["image"])] for row in rows)
    assert sorted(int(row["class"]) for row in rows) == sorted(list(range(10)) * 2)
    points = np.array([[float(row["x"]), float(row["y"])] for row in rows])
    assert points.shape == (20, 2) and np.isfinite(points).all()


def test_fig6_known_filters_give_known_matrices(compose_cfg, tmp_path, checkpoints):
    from dynconv.figures import make_figures

    dynamic, static = checkpoints
    cfg = _cfg(compose_cfg, tmp_path, f"checkpoint=[{static},{dynamic}]", "kernels.samples=3", "kernels.filters=16")
    report = make_figures(cfg, ["wn_fig6"])
    assert not report["missing"] and not report["failed"], report
    out = tmp_path / "figures"
    assert _png(out / "wn_fig6.png")
    data = json.loads((out / "wn_fig6.json").read_text())
    assert data["layer"] == LAYER and data["filters_shown"] == 16 and len(data["images"]) == 3
    assert len({image["class"] for image in data["images"]}) == 3  # distinct classes, as the paper's
    matrices = {key: np.asarray(value) for key, value in data["matrices"].items()}
    assert set(matrices) == {"static"} | {f"image {image['image']}" for image in data["images"]}
    assert np.allclose(matrices["static"], np.eye(16), atol=1e-4)  # orthogonal filters
    for key, matrix in matrices.items():
        if key != "static":
            assert matrix.shape == (16, 16) and np.allclose(matrix, 1.0, atol=1e-4)  # parallel filters
    assert data["summary"]["static"]["mean_abs_off_diagonal"] == pytest.approx(0.0, abs=1e-5)
    comparison = data["comparison"]
    assert comparison["dynamic_mean_abs_off_diagonal"] == pytest.approx(1.0, abs=1e-5)
    assert comparison["dynamic_images_below_static"] == 0 and comparison["dynamic_images"] == 3
    rows = list(csv.DictReader((out / "wn_fig6.csv").open()))
    assert [row["matrix"] for row in rows][0] == "static" and len(rows) == 4
