"""The ResNets' architecture knobs (dynconv/backbones/resnet_variants.py): `norm_layer=groupnorm` (Weight
Excitation Table 4's ResNet50-GN) and `stride_in_1x1` (ResNet v1, the 3.86 GMACs of the papers' ResNet50).
Counts on the meta device; training steps at 32 px."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

from dynconv.build import build_backbone
from dynconv.config import ConfigError, validate_model_config
from dynconv.layers.batch_safe_norm import BatchSafeBatchNorm1d
from dynconv.profiling import count_macs, count_params
from test_models import OPS

pytestmark = pytest.mark.usefixtures("one_thread")


def _build(name: str, op: dict | None = None, num_classes: int = 10, image_size: int = 32, **backbone):
    torch.manual_seed(0)
    return build_backbone({"name": name, **backbone}, op or {"name": "static"}, {"name": "none"},
                          num_classes=num_classes, image_size=image_size)


def _meta(name: str, **backbone):
    with torch.device("meta"):
        return _build(name, num_classes=1000, image_size=224, **backbone).backbone


def _train_step(model: nn.Module) -> None:
    """One SGD step at batch 2: finite loss and gradients, and the weights move."""
    model.train()
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = F.cross_entropy(model(torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))),
                           torch.tensor([1, 7]))
    assert torch.isfinite(loss)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    optimizer.step()
    assert any(not torch.equal(p.detach(), b) for p, b in zip(model.parameters(), before))


# -------------------------------------------------------------------------------------------------- GroupNorm
@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_groupnorm_replaces_every_batchnorm(name):
    """Every BatchNorm2d of the backbone (stem, blocks, projection shortcuts) becomes GroupNorm(32, C): ResNet50
    is then timm's resnet50_gn, key for key; the parameter count is unchanged (both have a scale and a shift)."""
    batchnorm, groupnorm = _meta(name), _meta(name, norm_layer="groupnorm")
    bns = {n: m.num_features for n, m in batchnorm.net.named_modules() if isinstance(m, nn.BatchNorm2d)}
    gns = {n: m.num_channels for n, m in groupnorm.net.named_modules() if isinstance(m, nn.GroupNorm)}
    assert bns and gns == bns
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in groupnorm.modules())
    assert {m.num_groups for m in groupnorm.modules() if isinstance(m, nn.GroupNorm)} == {32}
    assert count_params(groupnorm) == count_params(batchnorm)
    if name == "resnet50":
        with torch.device("meta"):
            reference = timm.create_model("resnet50_gn")
        assert {k: v.shape for k, v in groupnorm.net.state_dict().items()} == \
               {k: v.shape for k, v in reference.state_dict().items()}


@pytest.mark.parametrize("op", sorted(OPS))
def test_groupnorm_trains_with_every_operator(op):
    """ResNet18-GN converts and trains one step with every operator; the BatchNorm1d inside an operator's
    attention (ODConv, SK, KW) stays the operator's."""
    built = _build("resnet18", OPS[op], norm_layer="groupnorm", norm_groups=16)
    model = built.backbone
    if op in ("odconv", "kw"):
        assert any(isinstance(m, BatchSafeBatchNorm1d) for m in model.modules())
    _train_step(model)


def test_groupnorm_with_zero_init_last_and_attention():
    """zero_init_last zeroes the last GroupNorm's scale of every block as it does BN's; attn=se finds the block
    widths through GroupNorm's num_channels."""
    net = _build("resnet50", zero_init_last=True, norm_layer="groupnorm").backbone.net
    assert all(not block.bn3.weight.any() for stage in (net.layer1, net.layer4) for block in stage)
    model = build_backbone({"name": "resnet50", "norm_layer": "groupnorm"}, {"name": "static"},
                           {"name": "se", "reduction": 16}, num_classes=10, image_size=32).backbone
    assert model.net.layer1[0].se is not None
    _train_step(model)


def test_norm_groups_must_divide_every_width():
    with pytest.raises(ValueError, match=r"backbone.norm_groups=48 is invalid with backbone.norm_layer=groupnorm: "
                                         r"a layer has 64 channels; allowed values: the divisors"):
        _meta("resnet50", norm_layer="groupnorm", norm_groups=48)


# -------------------------------------------------------------------------------------------------- ResNet v1
@pytest.mark.parametrize("name", ["resnet50", "resnet152", "resnext50_32x4d", "wide_resnet50_2"])
def test_stride_in_1x1_moves_the_stride_to_conv1(name):
    """v1: the first block of layer2..layer4 strides its 1x1 conv1, not its 3x3 conv2; every other stride, the
    projection shortcuts' included, is as in v1.5, and so are the parameters."""
    v15, v1 = _meta(name), _meta(name, stride_in_1x1=True)
    for stage in ("layer2", "layer3", "layer4"):
        first = getattr(v1.net, stage)[0]
        assert (first.conv1.stride, first.conv2.stride, first.downsample[0].stride) == ((2, 2), (1, 1), (2, 2))
        original = getattr(v15.net, stage)[0]
        assert (original.conv1.stride, original.conv2.stride) == ((1, 1), (2, 2))
    strided = lambda net: {n: m.stride for n, m in net.named_modules() if isinstance(m, nn.Conv2d)}  # noqa: E731
    changed = {n for n, s in strided(v1.net).items() if s != strided(v15.net)[n]}
    assert changed == {f"layer{s}.0.conv{c}" for s in (2, 3, 4) for c in (1, 2)}
    assert count_params(v1) == count_params(v15)


def test_resnet50_v1_macs():
    """ResNet50 v1 at 224 px: 3.858 GMACs (SENet's and CBAM's 3.86 / 3.858 G), 231.2M fewer than v1.5's 4.089 G:
    the three strided 1x1s run on 4x fewer positions (layer2's 256 -> 128 at 56x56: 102.8M -> 25.7M)."""
    assert count_macs(_meta("resnet50"), (3, 224, 224)).total == 4_089_184_256
    assert count_macs(_meta("resnet50", stride_in_1x1=True), (3, 224, 224)).total == 3_857_973_248
    assert count_macs(_meta("resnet152", stride_in_1x1=True), (3, 224, 224)).total == 11_282_415_616


def test_stride_in_1x1_keeps_features_and_converts():
    """The feature maps keep their strides (C2..C5 at 4..32), a converted layer keeps the moved stride, and the
    network trains (with GroupNorm too)."""
    built = _build("resnet50", OPS["dyconv"], stride_in_1x1=True, norm_layer="groupnorm")
    model = built.backbone
    assert model.net.layer2[0].conv1.stride == (2, 2) and model.net.layer2[0].conv2.stride == (1, 1)
    assert type(model.net.layer2[0].conv1).__name__ == "DyConv2d"
    with torch.no_grad():
        features = model.eval().forward_features(torch.randn(1, 3, 64, 64))
    assert [tuple(f.shape[-2:]) for f in features.values()] == [(16, 16), (8, 8), (4, 4), (2, 2)]
    _train_step(model)


def test_stride_in_1x1_needs_bottlenecks():
    with pytest.raises(ValueError, match=r"backbone.stride_in_1x1=true is invalid for resnet18: it has no bottleneck"
                                         r" blocks .*allowed values: false"):
        _meta("resnet18", stride_in_1x1=True)


# ------------------------------------------------------------------------------------------------ bad values
@pytest.mark.parametrize(("override", "message"), [
    ("backbone.norm_layer=layernorm",
     "backbone.norm_layer='layernorm' is invalid; allowed values: batchnorm, groupnorm"),
    ("backbone.norm_groups=0", "backbone.norm_groups=0 is invalid; allowed values: integers >= 1"),
    ("backbone.stride_in_1x1=1", "backbone.stride_in_1x1=1 is invalid; allowed values: true, false"),
])
def test_bad_values_name_the_key_and_what_is_allowed(compose_cfg, override, message):
    cfg = compose_cfg(["backbone=resnet50", override])
    with pytest.raises(ConfigError) as info:
        validate_model_config(cfg)
    assert message in str(info.value)


def test_the_configs_default_to_the_v15_batchnorm_network(compose_cfg):
    """Today's networks unchanged: batchnorm, 32 groups, v1.5; ResNet18 has no stride_in_1x1 (no bottlenecks)."""
    for name in ("resnet50", "resnet152", "resnext50_32x4d", "wide_resnet50_2"):
        backbone = compose_cfg([f"backbone={name}"]).backbone
        assert (backbone.norm_layer, backbone.norm_groups, backbone.stride_in_1x1) == ("batchnorm", 32, False)
    assert "stride_in_1x1" not in compose_cfg(["backbone=resnet18"]).backbone
