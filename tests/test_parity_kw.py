"""KernelWarehouse model sizes against the paper (Li & Yao, ICML 2024): Tables 1, 2, 4, 11 (main rows), 5-7
(ablations) and 17 (KW*), counted by `build_backbone` + `count_params` (what scripts/profile.py prints), 1000
classes, on the meta device (no memory, no initialisation).

Tolerance: 0.5% of the paper's figure unless the issue states another (ResNet18 1/4x 1.5%: the reference release
itself gives 4.03M where the paper says 4.08M; MobileNetV2 0.5 1%; ConvNeXt 1%; DeiT 1.5%). The exact counts of
the reference release (shared/REFERENCE_NOTES.md) are matched to the parameter where it has the model.

ConvNeXt-T: the paper's 32.99M (1x) and 24.53M (3/4x) need the third stage cut into three (Appendix A.3) and an
attention reduction of 1/32; the release's 39.37M is the same model without the cut at reduction 1/16
(`test_convnext_release_count`). Rows that cannot be matched are `xfail(strict=True)` with the reason.
"""

from __future__ import annotations

import functools

import pytest
import torch

from dynconv.build import build_backbone
from dynconv.profiling import count_params
from op_checks import load_op_config

DEIT_T_4X = ("DeiT has no reference code; the layout that gives DeiT-T 1x (6.385M) and DeiT-S 1x (24.358M) to "
             "0.1% gives 19.98M for DeiT-T 4x (-2.3%): the paper's 4x model is larger by 0.46M")
DEIT_S_34 = ("DeiT-S 3/4x: whole cells with 3 of 4 mixtures owning one give 19.59M (+1.9%); half-divisor cells as on "
             "ConvNeXt give 20.6M; the paper's mix for DeiT is not described")

# (backbone, op overrides, paper params M, relative tolerance, exact reference count or None, reason if unmatched)
ROWS = [
    ("resnet18", {"b": "1/4"}, 4.08, 0.015, 4_031_768, None),
    ("resnet18", {"b": "1/2"}, 7.43, 0.005, 7_431_044, None),
    ("resnet18", {"b": 1}, 11.93, 0.005, 11_932_148, None),
    ("resnet18", {"b": 2}, 23.24, 0.005, 23_242_127, None),
    ("resnet18", {"b": 4}, 45.86, 0.005, 45_862_085, None),
    ("resnet50", {"b": "1/2"}, 17.64, 0.005, 17_638_264, None),
    ("resnet50", {"b": 1}, 28.05, 0.005, 28_052_310, None),
    ("resnet50", {"b": 4}, 102.02, 0.005, 102_015_144, None),
    ("mobilenetv2_100", {"b": "1/2"}, 2.65, 0.005, 2_654_396, None),
    ("mobilenetv2_100", {"b": 1}, 5.17, 0.005, 5_168_146, None),
    ("mobilenetv2_100", {"b": 4}, 11.38, 0.005, 11_379_382, None),
    ("mobilenetv2_050", {"b": "1/2"}, 1.47, 0.01, 1_466_888, None),
    ("mobilenetv2_050", {"b": 1}, 2.85, 0.01, 2_854_522, None),
    ("mobilenetv2_050", {"b": 4}, 4.65, 0.01, 4_648_587, None),
    ("convnext_tiny", {"b": "3/4"}, 24.53, 0.01, None, None),
    ("convnext_tiny", {"b": 1}, 32.99, 0.01, None, None),
    ("deit_tiny", {"b": 1}, 6.39, 0.015, None, None),
    ("deit_tiny", {"b": 4}, 20.44, 0.015, None, DEIT_T_4X),
    ("deit_small", {"b": "3/4"}, 19.23, 0.015, None, DEIT_S_34),
    ("deit_small", {"b": 1}, 24.36, 0.015, None, None),
    # Ablations: Table 6 (sharing range in layers), Table 5 (no kernel partition), Table 7 (same-dimension
    # sharing), Table 17 (KW*).
    ("resnet18", {"sharing": "layer"}, 11.81, 0.005, None, None),
    ("resnet18", {"sharing": "none"}, 11.78, 0.005, None, None),
    ("resnet18", {"partition": False, "sharing_dims": "same"}, 11.78, 0.005, None, None),
    ("resnet50", {"sharing_dims": "same"}, 26.95, 0.005, None, None),
    ("mobilenetv2_100", {"b": 4, "omni": True}, 12.51, 0.005, None, None),
]


@functools.lru_cache(maxsize=None)
def _count(backbone: str, overrides: tuple) -> int:
    op = {**load_op_config("kw"), **dict(overrides)}
    with torch.device("meta"):
        built = build_backbone({"name": backbone}, op, {"name": "none"}, num_classes=1000, image_size=224)
    return count_params(built.backbone)


def _param(row):
    backbone, overrides, paper, tolerance, exact, reason = row
    marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
    label = "-".join(f"{k}{v}".replace("/", "_") for k, v in overrides.items())
    return pytest.param(backbone, overrides, paper, tolerance, exact, marks=marks, id=f"{backbone}-{label}")


@pytest.mark.parametrize("backbone,overrides,paper,tolerance,exact", [_param(row) for row in ROWS])
def test_params_match_the_paper(backbone, overrides, paper, tolerance, exact):
    params = _count(backbone, tuple(sorted(overrides.items())))
    assert abs(params / 1e6 - paper) <= tolerance * paper, f"{params:,} vs the paper's {paper}M"
    if exact is not None:
        assert params == exact, f"{params:,} vs the reference release's {exact:,}"


def test_convnext_release_count(monkeypatch):
    """Without cutting the third stage and at reduction 1/16 the count is the release's 39,370,674 (its README's
    39.37M), which shows where the paper's 32.99M differs."""
    from dynconv.ops.kw import layouts

    monkeypatch.setattr(layouts, "_convnext_stage", lambda layer: f"s{int(layer.name.split('.')[1]) + 1}")
    monkeypatch.setattr(layouts, "CONVNEXT_REDUCTION", 0.0625)
    _count.cache_clear()
    try:
        assert _count("convnext_tiny", (("b", 1),)) == 39_370_674
    finally:
        _count.cache_clear()


def test_warehouse_sizes_match_table_14():
    """m_t and n per warehouse (Table 14) for ResNet18 at every budget."""
    expected = {"1/4": ([224, 188, 188, 108], [56, 47, 47, 27]), "1/2": ([224, 188, 188, 108], [112, 94, 94, 54]),
                1: ([56, 47, 47, 27], [56, 47, 47, 27]), 4: ([56, 47, 47, 27], [224, 188, 188, 108])}
    from dynconv.ops.kw import KWConv2d

    for budget, (mixtures, cells) in expected.items():
        op = {**load_op_config("kw"), "b": budget}
        with torch.device("meta"):
            model = build_backbone({"name": "resnet18"}, op, {"name": "none"}, num_classes=1000,
                                   image_size=224).backbone
        totals = {}
        for module in model.modules():
            if isinstance(module, KWConv2d):
                totals[module.warehouse.key] = totals.get(module.warehouse.key, 0) + module.partition.mixtures
        keys = [f"stage{s}" for s in range(1, 5)]
        assert [totals[k] for k in keys] == mixtures, budget
        assert [model.warehouses[k].cells.shape[0] for k in keys] == cells, budget
