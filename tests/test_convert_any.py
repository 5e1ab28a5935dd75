"""dynconv.convert on networks dynconv did not build (timm families the papers do not use, a torchvision classifier),
and `backbone=timm backbone.model=<name>` from the configs: placement, every operator training a step, the decisions,
the shared modules in the state_dict, schedules, and the errors."""

from __future__ import annotations

import dataclasses

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.models as tvm
from torch.nn.utils import parametrize

from dynconv.backbones.generic import generic_backbone
from dynconv.config import ConfigError
from dynconv.conversion.any_model import SHARED_NAME, convert_model
from dynconv.conversion.op_config import op_names
from dynconv.conversion.progress import set_training_progress
from dynconv.functional import selector

pytestmark = pytest.mark.usefixtures("one_thread")



def _short_mobileone() -> nn.Module:
    """MobileOne-S0 (timm's ByobNet builder, its own config) with the first two blocks of each stage (a strided 3x3
    depthwise and a 1x1, each with four branches and a scale branch): the family, at a fifth of the layers."""
    from timm.models.byobnet import ByobNet, model_cfgs

    config = model_cfgs["mobileone_s0"]
    return ByobNet(dataclasses.replace(config, blocks=tuple(tuple(stage[:2]) for stage in config.blocks)),
                   num_classes=10)


# Families the papers do not use: timm's EfficientNet, RegNet and MobileOne (timm's ByobNet builder), and
# torchvision's MobileNetV3 (no feature_info: stages from the strides of a probe forward).
FAMILIES = {
    "efficientnet_b0": lambda: timm.create_model("efficientnet_b0", num_classes=10),
    "regnetx_002": lambda: timm.create_model("regnetx_002", num_classes=10),
    "mobileone_s0_short": _short_mobileone,
    "tv_mobilenet_v3_small": lambda: tvm.mobilenet_v3_small(num_classes=10),
}
# Knobs that keep one step cheap, as tests/test_models.py's SMALL. KernelWarehouse's generic layout shares one
# warehouse per stage across every kernel shape; on EfficientNet's mixed widths that makes tiny cells and a huge
# attention (docs/convert.md), so its warehouses are shared between layers of the same shape here.
SMALL = {"condconv": {"experts": 2}, "dyconv": {"kernels": 2}, "odconv": {"kernels": 2},
         "weightnet": {"lam": 2, "G": 1}, "kw": {"tau": 0.5, "sharing_dims": "same"}, "dynet": {"g": 2}}


def _converted(family: str, op: str, **knobs) -> nn.Module:
    torch.manual_seed(0)
    return convert_model(FAMILIES[family](), op, **{**SMALL.get(op, {}), **knobs})


@pytest.mark.parametrize("op", op_names())
@pytest.mark.parametrize("family", FAMILIES)
def test_every_operator_trains_a_step(family, op):
    """Each operator converts the layers it accepts (every other one static with its reason), the model trains one
    SGD step with a finite loss, and every converted layer and shared module takes part (gets a gradient)."""
    model = _converted(family, op).train()
    conversion = model.dynconv_conversion
    assert all(reason for reason in conversion.static.values())
    if op == "static":
        assert not conversion.converted
    else:
        assert conversion.converted, conversion.summary()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    with selector.policy("model"):
        loss = F.cross_entropy(model(x), torch.tensor([1, 7]))
        assert torch.isfinite(loss)
        loss.backward()
    optimizer.step()
    for name in conversion.converted:
        module = model.get_submodule(name)
        # SK keeps its paths' nn.Conv2d inside; the reparameterisations keep the layer and parametrize its weight.
        assert not isinstance(module, (nn.Conv2d, nn.Linear)) or op == "sk" or parametrize.is_parametrized(module)
        for pname, param in module.named_parameters():
            assert param.grad is not None and torch.isfinite(param.grad).all(), f"{name}.{pname}"
    shared = getattr(model, SHARED_NAME, None)
    for pname, param in (shared.named_parameters() if shared is not None else []):
        assert param.grad is not None, pname


def _places(net: nn.Module) -> dict:
    return {name: (place.role, place.stage, place.block) for name, place in generic_backbone(net).places.items()}


def test_placement_from_timm_feature_info():
    """EfficientNet-B0: the stem before the first stage, the SE branches, the depthwise and pointwise layers of each
    block (block = the child of a stage), five stages (feature_info's strides 2..32), conv_head after the last one,
    the classifier from get_classifier()."""
    places = _places(timm.create_model("efficientnet_b0", num_classes=10))
    assert places["conv_stem"] == ("stem", 0, None)
    assert places["blocks.1.0.conv_dw"] == ("depthwise", 2, "blocks.1.0")
    assert places["blocks.1.0.conv_pwl"] == ("pointwise", 2, "blocks.1.0")
    assert places["blocks.1.0.se.conv_reduce"] == ("se", 2, "blocks.1.0")
    assert places["blocks.3.0.conv_pw"][1] == places["blocks.4.0.conv_pw"][1] == 4  # blocks.3 is no feature point
    assert places["conv_head"] == ("head", 6, None) and places["classifier"] == ("classifier", 6, None)
    regnet = _places(timm.create_model("regnetx_002", num_classes=10))
    assert regnet["stem.conv"][0] == "stem" and regnet["head.fc"][0] == "classifier"
    assert regnet["s2.b1.downsample.conv"] == ("downsample", 2, "s2.b1")
    assert regnet["s2.b1.conv2.conv"] == ("conv", 2, "s2.b1")  # a grouped 3x3
    mobileone = _places(timm.create_model("mobileone_s0", num_classes=10))
    assert {mobileone["stem.conv_kxk.0.conv"][0], mobileone["stem.conv_scale.conv"][0]} == {"stem"}
    assert mobileone["stages.3.1.conv_kxk.0.conv"] == ("pointwise", 4, "stages.3.1")


def test_placement_of_a_torchvision_classifier_from_strides():
    """torchvision's MobileNetV3 has no feature_info: stages from the strides of a probe forward, blocks from the
    module tree, SE branches from torchvision's SqueezeExcitation, the last 1x1 and the pre-logits Linear are the
    head, the last Linear the classifier."""
    places = _places(tvm.mobilenet_v3_small(num_classes=10))
    assert places["features.0.0"] == ("stem", 0, None)
    assert places["features.1.block.0.0"] == ("depthwise", 1, "features.1")  # stride 4: the first stage
    assert places["features.1.block.1.fc1"] == ("se", 1, "features.1")
    assert places["features.4.block.1.0"] == ("depthwise", 3, "features.4")  # stride 16
    assert places["features.12.0"][0] == places["classifier.0"][0] == "head"
    assert places["classifier.3"][0] == "classifier"
    resnet = _places(tvm.resnet18(num_classes=10))
    assert resnet["conv1"][0] == "stem" and resnet["fc"][0] == "classifier"
    assert resnet["layer3.0.downsample.0"] == ("downsample", 3, "layer3.0")
    assert resnet["layer3.0.conv1"] == ("conv", 3, "layer3.0")  # its block's stride (16), not its own output's


class _Odd(nn.Module):
    """Layers the generic placement cannot place: one the forward never calls, one it calls twice, and a Conv2d
    subclass whose forward changes what it computes (as timm's Conv2dSame)."""

    class Shifted(nn.Conv2d):
        def forward(self, x):
            return super().forward(x) + 1

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.twice = nn.Conv2d(8, 8, 3, padding=1)
        self.shifted = self.Shifted(8, 8, 3, padding=1)
        self.unused = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = self.shifted(self.twice(self.twice(self.stem(x))))
        return self.fc(x.mean(dim=(2, 3)))


def test_a_layer_that_cannot_be_placed_stays_static_with_the_reason():
    model = convert_model(_Odd(), "condconv")
    static = model.dynconv_conversion.static
    assert "not called by _Odd's forward" in static["unused"]
    assert "called 2 times in one forward" in static["twice"]
    assert "Shifted has a forward of its own" in static["shifted"]
    assert all(static[name].startswith("not placed: ") for name in ("unused", "twice", "shifted"))
    assert isinstance(model.unused, nn.Conv2d) and type(model.shifted) is _Odd.Shifted
    assert "static (1): not placed: called 2 times" in model.dynconv_conversion.summary()


def test_convert_keeps_the_model_and_saves_the_shared_modules():
    """The same object, class and forward; an operator that shares nothing adds no state_dict key outside the
    converted layers, one that shares (KernelWarehouse's warehouses) registers them under dynconv_shared, so a
    state_dict round trip reproduces the outputs and `.to()` moves them."""
    original = timm.create_model("regnetx_002", num_classes=10)
    keys = set(original.state_dict())
    model = convert_model(original, "odconv")
    assert model is original and type(model).__name__ == "RegNet"
    assert not any(key.startswith(SHARED_NAME) for key in model.state_dict())
    converted = tuple(f"{name}." for name in model.dynconv_conversion.converted)
    assert {key for key in keys if not key.startswith(converted)} <= set(model.state_dict())
    kw = _converted("regnetx_002", "kw").eval()
    assert any(key.startswith(f"{SHARED_NAME}.warehouses.") for key in kw.state_dict())
    copy = _converted("regnetx_002", "kw").eval()
    copy.load_state_dict(kw.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), selector.policy("model"):
        torch.testing.assert_close(copy(x), kw(x))
    kw.to(torch.float64)
    assert getattr(kw, SHARED_NAME).warehouses[next(iter(kw.dynconv_shared.warehouses))].cells.dtype == torch.float64


def test_knobs_are_validated_as_the_configs_do(capsys):
    """A wrong knob or value is a ConfigError naming the key and what is allowed; nothing is printed unless asked."""
    with pytest.raises(ConfigError, match=r"kernel=4 is not a knob of op=odconv; allowed knobs: kernels, "):
        convert_model(nn.Sequential(nn.Conv2d(3, 8, 3)), "odconv", kernel=4)
    with pytest.raises(ConfigError, match=r"op.experts=0 is invalid for op=condconv: allowed values are integers"):
        convert_model(nn.Sequential(nn.Conv2d(3, 8, 3)), "condconv", experts=0)
    with pytest.raises(ConfigError, match=r"op='odconf' is not known; allowed values: .*odconv"):
        convert_model(nn.Sequential(nn.Conv2d(3, 8, 3)), "odconf")
    model = convert_model(tvm.resnet18(num_classes=10), "condconv", experts=2)
    assert capsys.readouterr().out == ""
    with pytest.raises(ValueError, match="converted already"):
        convert_model(model, "condconv")
    convert_model(tvm.resnet18(num_classes=10), "condconv", experts=2, verbose=True)
    assert "condconv(experts=2, routing=layer, weight_init=reference): converted 19 of 21" in capsys.readouterr().out


def test_schedules_are_driven_outside_train_py():
    """set_training_progress does what train.py's schedule hook does: ODConv's temperature falls from 30 to 1 over
    10 epochs (15.5 after 5), KernelWarehouse's tau from 1 to 0."""
    model = _converted("regnetx_002", "odconv")
    layer = model.get_submodule(model.dynconv_conversion.converted[0])
    assert float(layer.attention.temperature) == 30.0
    assert set_training_progress(model, 5.0) == {"temperature": 15.5}
    assert float(layer.attention.temperature) == 15.5
    assert set_training_progress(convert_model(tvm.resnet18(num_classes=10), "kw"), 2.5)["kw_tau"] == 0.75


# --------------------------------------------------------------------------------- backbone=timm in the configs


def test_backbone_timm_composes_builds_and_trains(compose_cfg):
    """`backbone=timm backbone.model=regnetx_002` validates (meta device), builds through build_backbone with the
    generic placement, trains one step and gives timm's multi-scale features."""
    from omegaconf import OmegaConf

    from dynconv.build import build_backbone
    from dynconv.config import validate_model_config

    cfg = compose_cfg(["backbone=timm", "backbone.model=regnetx_002", "op=condconv", "op.experts=2"])
    validate_model_config(cfg)
    torch.manual_seed(0)
    built = build_backbone(cfg.backbone, OmegaConf.to_container(cfg.op, resolve=True), cfg.attn, num_classes=10,
                           image_size=32)
    assert built.backbone.family == "generic" and type(built.backbone.net).__name__ == "RegNet"
    assert sum(d.converted for d in built.decisions) == 43
    with selector.policy("model"):
        loss = F.cross_entropy(built.backbone.train()(torch.randn(2, 3, 32, 32)), torch.tensor([0, 1]))
        loss.backward()
        features = built.backbone.eval().forward_features(torch.randn(1, 3, 64, 64))
    assert torch.isfinite(loss)
    assert {key: tuple(value.shape[1:]) for key, value in features.items()} == \
           {"C2": (24, 16, 16), "C3": (56, 8, 8), "C4": (152, 4, 4), "C5": (368, 2, 2)}


def test_backbone_timm_names_a_missing_or_unknown_model(compose_cfg):
    from dynconv.config import validate_model_config

    with pytest.raises(ConfigError, match=r"backbone.model is required but not set"):
        validate_model_config(compose_cfg(["backbone=timm"]))
    with pytest.raises(ConfigError, match=r"backbone.model='efficentnet_b0' is invalid; allowed values: a timm model "
                                          r"name \(close names: efficientnet_b0"):
        validate_model_config(compose_cfg(["backbone=timm", "backbone.model=efficentnet_b0"]))


def test_a_network_without_feature_info_says_so_when_features_are_asked():
    backbone = generic_backbone(tvm.mobilenet_v3_small(num_classes=10))
    with pytest.raises(NotImplementedError, match="gives no multi-scale features"):
        backbone.forward_features(torch.randn(1, 3, 64, 64))


# Registered backbones whose hand-written rules (dynconv/backbones/*) the generic placement must reproduce, one per
# family and library: timm's ResNet, EfficientNet builder (MobileNetV2, V3), ConvNeXt; torchvision's ShuffleNetV2
# (its units' branches as blocks) and the CIFAR VGG.
ORACLES = ["resnet50", "mobilenetv2_100", "mobilenetv3_large", "convnext_tiny", "shufflenetv2_x1_0", "vgg19_cifar"]


@pytest.mark.parametrize("name", ORACLES)
def test_generic_placement_agrees_with_the_hand_written_rules(name):
    """On the networks dynconv has placement rules for, the generic placement finds the same role for every layer and
    the same block (a block of one layer, as MobileNetV3's last 1x1 in its own stage, is none: nothing to share)."""
    from dynconv.backbones import BACKBONES

    with torch.device("meta"):
        backbone = BACKBONES.get(name)(num_classes=10, image_size=224)
        generic = generic_backbone(backbone.net).places
    differences = []
    for layer, module in backbone.net.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            rule, found = backbone.place(layer, module), generic[layer]
            single = rule.block is not None and sum(n.startswith(f"{rule.block}.") for n in generic) == 1
            if (rule.role, None if single else rule.block) != (found.role, found.block):
                differences.append(f"{layer}: rules {rule.role} in {rule.block}, generic {found.role} in {found.block}")
    assert not differences, differences


def test_the_docs_example_runs_and_prints_what_it_shows(capsys):
    """docs/convert.md's first example runs and prints the summary the page shows below it."""
    import re
    from pathlib import Path

    import dynconv

    if not hasattr(dynconv, "convert"):
        pytest.skip("dynconv.convert and dynconv.set_training_progress are not exported by dynconv/__init__.py yet")
    text = (Path(__file__).resolve().parents[1] / "docs" / "convert.md").read_text()
    example = re.findall(r"```python\n(.*?)```", text, re.DOTALL)[0]
    shown = re.findall(r"```text\n(.*?)```", text, re.DOTALL)[0]
    exec(compile(example, "docs/convert.md", "exec"), {})
    assert capsys.readouterr().out == shown
