"""DyNet model sizes and MACs against the paper (Zhang et al. 2020): Tables 1, 4, 5 and 6.

The Dy-* backbones (dynconv/backbones/dynet*.py) with op=dynet (Dy-*) or op=static (Fix-*, Table 4), and
MobileNetV3-Small/Large with op=dynet (Dy-MobileNetV3, Table 1), 1000 classes, 224 x 224, counted as
scripts/profile.py counts (`count_params`, `count_macs`: inference, kernels fused, the coefficient modules and
the kernel generation included), on the meta device (no memory, no initialisation). Tolerance: 5% of the
paper's MParams and MFLOPs (multiply-adds). Rows that cannot be matched are `xfail(strict=True)` with the reason.

Measured (paper): Fix-mobile 2.19M / 130.5M (2.16 / 129); Dy-mobile g=6 7.62M / 136.4M (7.36 / 135), g=4 5.65M /
134.5M (5.47 / 133), g=2 3.68M / 132.5M (3.58 / 131), g=1 2.69M / 131.5M (2.64 / 131); Fix-shuffle(1.5) 2.58M /
177.4M (2.47 / 171); Dy-shuffle(1.5) 11.46M / 186.9M (11.0 / 180); Dy-shuffle(1.0) 98.9M (92: not matched);
Dy-ResNet18 g=6 17.29M / 594.4M (16.6 / 567), g=1 3.17M / 580.3M (3.04 / 553); Dy-ResNet50 1169.1M (1119);
Dy-MobileNetV3-Small 59.9M (59), -Large 227.3M (228).
"""

from __future__ import annotations

import functools

import pytest
import torch

from dynconv.build import build_backbone
from dynconv.profiling import count_macs, count_params
from op_checks import load_op_config

TOLERANCE = 0.05
SHUFFLE_1_0 = ("Dy-shuffle(1.0): with the right branch's 3x3 at 2 channels per group ('groups adjusted to keep the "
               "FLOPs unchanged', Sec. 3.3) stage2's 116/4 = 29 channels must be rounded up (116 -> 120), giving "
               "98.9M MACs (+7.4%); the 1.5x rows built the same way match. Leaving that 3x3 depthwise (no "
               "rounding) would give 96.1M, which contradicts the text's adjusted groups")

# (backbone, g_t or None for op=static, paper MParams or None, paper MFLOPs, reason if unmatched, table)
ROWS = [
    ("dynet_mobile", None, 2.16, 129, None, "T4-Fix-mobile"),
    ("dynet_mobile", 6, 7.36, 135, None, "T4-Dy-mobile-g6"),
    ("dynet_mobile", 4, 5.47, 133, None, "T5-Dy-mobile-g4"),
    ("dynet_mobile", 2, 3.58, 131, None, "T5-Dy-mobile-g2"),
    ("dynet_mobile", 1, 2.64, 131, None, "T6-Dy-mobile-g1"),
    ("dynet_shuffle_x1_5", None, 2.47, 171, None, "T4-Fix-shuffle-1.5"),
    ("dynet_shuffle_x1_5", 6, 11.0, 180, None, "T4-Dy-shuffle-1.5"),
    ("dynet_shuffle_x1_0", 6, None, 92, SHUFFLE_1_0, "T1-Dy-shuffle-1.0"),
    ("dynet_resnet18", 6, 16.6, 567, None, "T6-Dy-ResNet18-g6"),
    ("dynet_resnet18", 1, 3.04, 553, None, "T6-Dy-ResNet18-g1"),
    ("dynet_resnet50", 6, None, 1119, None, "T1-Dy-ResNet50"),
    ("mobilenetv3_small", 6, None, 59, None, "T1-Dy-MobileNetV3-Small"),
    ("mobilenetv3_large", 6, None, 228, None, "T1-Dy-MobileNetV3-Large"),
]


@functools.lru_cache(maxsize=None)
def _measure(backbone: str, g: int | None) -> tuple[int, int]:
    op = {"name": "static"} if g is None else {**load_op_config("dynet"), "g": g}
    with torch.device("meta"):
        model = build_backbone({"name": backbone}, op, {"name": "none"}, num_classes=1000, image_size=224).backbone
    return count_params(model), count_macs(model, (3, 224, 224)).total


def _rows(kind: str):
    for backbone, g, paper_m, paper_f, reason, table in ROWS:
        paper = paper_m if kind == "params" else paper_f
        if paper is None:
            continue
        # The unmatched Dy-shuffle(1.0) row has MFLOPs only; its reason applies to that figure.
        marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
        yield pytest.param(backbone, g, paper, marks=marks, id=table)


@pytest.mark.parametrize(("backbone", "g", "paper_m"), list(_rows("params")))
def test_params_match_the_paper(backbone, g, paper_m):
    params, _ = _measure(backbone, g)
    assert abs(params / 1e6 - paper_m) <= TOLERANCE * paper_m, f"{params:,} params vs the paper's {paper_m}M"


@pytest.mark.parametrize(("backbone", "g", "paper_flops_m"), list(_rows("macs")))
def test_macs_match_the_paper(backbone, g, paper_flops_m):
    _, macs = _measure(backbone, g)
    assert abs(macs / 1e6 - paper_flops_m) <= TOLERANCE * paper_flops_m, f"{macs / 1e6:.2f}M vs {paper_flops_m}M"


def test_g_adds_parameters_not_macs():
    """Table 5: 'The group size g_t ... does not change the computation cost of DyNet' (only the coefficient
    FC and the kernel generation grow with g_t, 1-2%), while the parameters grow linearly in g_t."""
    sizes = {g: _measure("dynet_mobile", g) for g in (1, 2, 4, 6)}
    slope = sizes[2][0] - sizes[1][0]
    assert sizes[4][0] - sizes[2][0] == 2 * slope and sizes[6][0] - sizes[4][0] == 2 * slope
    assert max(m for _, m in sizes.values()) < 1.05 * min(m for _, m in sizes.values())


def test_flops_reductions_of_table1():
    """Sec. 1 / Table 1: Dy-mobile and Dy-ResNet18 cut MobileNetV2's and ResNet18's FLOPs by 54.7% and 67.2%;
    counted here against timm's baselines (300.8M, 1814M): within 2 points."""
    mobilenet = _measure("mobilenetv2_100", None)[1]
    resnet18 = _measure("resnet18", None)[1]
    assert 1 - _measure("dynet_mobile", 6)[1] / mobilenet == pytest.approx(0.547, abs=0.02)
    assert 1 - _measure("dynet_resnet18", 6)[1] / resnet18 == pytest.approx(0.672, abs=0.02)
