"""Weight Excitation model sizes against the paper's Table 1 (Quader et al., ECCV 2020): training parameters (the
backbone with LWE's subnetworks) and inference parameters (after `fold_for_inference`, what scripts/profile.py
reports as `params_inference`), 1000 classes, counted on the meta device with `build_backbone` + `count_params`.

Tolerance: the paper's rounding to 0.1M, with the convention of tests/test_parity_weightnet.py and the WE rows
of tests/test_attention.py (0.06M). Every row is within 0.05M except ResNet18-LWE: 11.849M against 11.9 (0.051M;
the paper's 11.8 -> 11.9 step needs 0.0007M more, see dynconv/ops/we/operator.py on FC_1's width) and the
inference count of ResNeXt50-LWE-SE, which is the ResNeXt50-SE baseline's 27.56M against 27.5 (0.06M, the same
as in tests/test_attention.py). Folded models are also checked to equal the static baselines exactly.
"""

from __future__ import annotations

import functools

import pytest
import torch

from dynconv.build import build_backbone
from dynconv.profiling import count_macs, count_params, fold_for_inference
from op_checks import load_op_config  # noqa: E402

TOLERANCE = 0.06  # millions: the paper's last digit, as in tests/test_parity_weightnet.py
SE = {"name": "se", "reduction": 16}
ATTN = {"none": {"name": "none"}, "se": SE, "cbam": {"name": "cbam", "reduction": 16, "spatial_kernel_size": 7},
        "bam": {"name": "bam", "reduction": 16, "dilation": 4}}

# (paper row, backbone, op, attn, training params M, inference params M)
ROWS = [
    ("MobileNetV2-LWE", "mobilenetv2_100", "lwe", "none", 4.1, 3.5),
    ("MobileNetV2-WE", "mobilenetv2_100", "we", "none", 4.1, 3.5),
    ("MobileNetV2-WE-SE", "mobilenetv2_100", "we", "se", 4.2, 3.6),
    ("ResNet18-LWE", "resnet18", "lwe", "none", 11.9, 11.7),
    ("ResNet18-LWE-SE", "resnet18", "lwe", "se", 11.9, 11.8),
    ("ResNet50-LWE", "resnet50", "lwe", "none", 28.1, 25.6),
    ("ResNet50-LWE-SE", "resnet50", "lwe", "se", 30.6, 28.1),
    ("ResNet50-LWE-BAM", "resnet50", "lwe", "bam", 28.4, 25.9),
    ("ResNet50-LWE-CBAM", "resnet50", "lwe", "cbam", 30.6, 28.1),
    ("ResNet50-MWE", "resnet50", "mwe", "none", 25.6, 25.6),
    ("ResNeXt50-LWE", "resnext50_32x4d", "lwe", "none", 27.9, 25.0),
    ("ResNeXt50-LWE-SE", "resnext50_32x4d", "lwe", "se", 30.4, 27.5),
    ("WideResNet50-2-LWE", "wide_resnet50_2", "lwe", "none", 72.3, 68.9),
    ("WideResNet50-2-LWE-SE", "wide_resnet50_2", "lwe", "se", 74.9, 71.4),
    ("ResNet152-LWE", "resnet152", "lwe", "none", 67.3, 60.2),
    ("ResNet152-LWE-SE", "resnet152", "lwe", "se", 73.9, 66.8),
]


def _meta_build(backbone: str, op: str, attn: str):
    op_cfg = {"name": "static"} if op == "static" else load_op_config(op)
    with torch.device("meta"):
        return build_backbone({"name": backbone}, op_cfg, ATTN[attn], num_classes=1000, image_size=224).backbone


@functools.lru_cache(maxsize=None)
def _count(backbone: str, op: str, attn: str) -> tuple[int, int]:
    """(training, inference) parameters."""
    model = _meta_build(backbone, op, attn)
    return count_params(model), count_params(fold_for_inference(model))


@pytest.mark.parametrize(("row", "backbone", "op", "attn", "train_m", "inference_m"), ROWS, ids=[r[0] for r in ROWS])
def test_training_and_inference_params_match_table1(row, backbone, op, attn, train_m, inference_m):
    train, inference = _count(backbone, op, attn)
    assert abs(train / 1e6 - train_m) <= TOLERANCE, f"{row}: {train:,} training params vs the paper's {train_m}M"
    assert abs(inference / 1e6 - inference_m) <= TOLERANCE, f"{row}: {inference:,} vs the paper's {inference_m}M"
    assert inference == _count(backbone, "static", attn)[0]  # folding leaves exactly the baseline


def test_exact_counts():
    """The numbers the README and the operator's docstring quote (a change to the layer choice shows here)."""
    assert _count("mobilenetv2_100", "lwe", "none") == (4_112_643, 3_504_872)
    assert _count("resnet18", "lwe", "none") == (11_849_323, 11_689_512)
    assert _count("resnet50", "lwe", "none") == (28_063_235, 25_557_032)
    assert _count("resnet50", "lwe", "se") == (30_594_227, 28_088_024)
    assert _count("resnet50", "mwe", "none") == (25_557_032, 25_557_032)
    assert _count("resnext50_32x4d", "lwe", "none") == (27_850_519, 25_028_904)
    assert _count("wide_resnet50_2", "lwe", "none") == (72_337_475, 68_883_240)
    assert _count("resnet152", "lwe", "none") == (67_322_371, 60_192_808)


def test_folded_resnet50_lwe_has_the_baseline_macs():
    """Table 1's GFLOPs column: ResNet50-LWE costs what ResNet50 costs at inference (3.86 G in ResNet v1 terms;
    timm's v1.5 here). The unfolded model also counts LWE's weight generation, a training-only cost."""
    folded = fold_for_inference(_meta_build("resnet50", "lwe", "none"))
    assert count_macs(folded, (3, 224, 224)).total == count_macs(_meta_build("resnet50", "static", "none"),
                                                                 (3, 224, 224)).total
