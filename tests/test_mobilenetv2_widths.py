"""MobileNetV2 at widths 0.75 and 0.6 (DyNet Table 1's "MobileNet v2 (0.75)" and "(0.6)"): timm's network, the
MobileNetV2 width rule, the counts. Training steps with every operator are in tests/test_models.py's matrix."""

from __future__ import annotations

import pytest
import timm
import torch

from dynconv.build import build_backbone
from dynconv.profiling import count_macs, count_params


def _meta(name: str, op: dict | None = None):
    with torch.device("meta"):
        return build_backbone({"name": name}, op or {"name": "static"}, {"name": "none"}, num_classes=1000,
                              image_size=224).backbone


def _divisible(value: float, divisor: int = 8) -> int:
    """The MobileNetV2 reference's `_make_divisible`: the nearest multiple of 8, never 10% below the value."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


# Sandler et al.'s channels (stem, the seven stages' outputs) and the last 1x1's max(1280, 1280 x width).
CHANNELS = (32, 16, 24, 32, 64, 96, 160, 320)


@pytest.mark.parametrize("name,width", [("mobilenetv2_075", 0.75), ("mobilenetv2_060", 0.6)])
def test_widths_follow_the_mobilenetv2_rule(name, width):
    net = _meta(name).net
    stages = [net.conv_stem.out_channels] + [stage[-1].conv_pwl.out_channels if hasattr(stage[-1], "conv_pwl")
                                             else stage[-1].conv_pw.out_channels for stage in net.blocks]
    assert stages == [_divisible(c * width) for c in CHANNELS]
    assert net.conv_head.out_channels == 1280


def test_075_is_timms_mobilenetv2_075():
    with torch.device("meta"):
        reference = timm.create_model("mobilenetv2_075")
    assert {k: v.shape for k, v in _meta("mobilenetv2_075").net.state_dict().items()} == \
           {k: v.shape for k, v in reference.state_dict().items()}


@pytest.mark.parametrize("name,params,macs", [
    # Sandler et al.'s released 0.75 / 224: 209M MACs, 2.61M parameters (TF-slim's count).
    ("mobilenetv2_075", 2_636_424, 209_069_792),
    ("mobilenetv2_060", 2_217_000, 150_958_928),
])
def test_counts(name, params, macs):
    backbone = _meta(name)
    assert (count_params(backbone), count_macs(backbone, (3, 224, 224)).total) == (params, macs)


@pytest.mark.parametrize("name", ["mobilenetv2_075", "mobilenetv2_060"])
def test_dynet_converts_the_blocks(name):
    """op=dynet (Dy-MobileNetV2 of DyNet's Fig. 5: every convolution of every block dynamic, the stem and the
    head static) builds at these widths, with the block-level coefficient modules."""
    op = {"name": "dynet", "g": 6, "reduction": "auto", "fusion": "auto", "keep_static": []}
    backbone = _meta(name, op)
    kinds = {type(module).__name__ for module in backbone.net.blocks.modules()}
    assert "DyNetConv2d" in kinds and type(backbone.net.conv_head).__name__ == "Conv2d"
    assert len(backbone.shared_inputs) == sum(len(stage) for stage in backbone.net.blocks)
