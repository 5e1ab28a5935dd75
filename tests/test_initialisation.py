"""Where a model built from scratch starts (docs/initialisation.md): `op.weight_init` (reference | pytorch) of
ODConv, DY-Conv, CondConv and KernelWarehouse, and the backbone knobs `zero_init_last`, `drop_path_schedule`
and `classifier_init`.

The `reference` statistics are those of the releases (OSVAI/ODConv `modules/odconv.py`, kaijieshi7/
Dynamic-convolution-Pytorch `dynamic_conv.py`, timm's `_init_weight_goog` for CondConv, OSVAI/KernelWarehouse
`Warehouse_Manager.allocate`), checked on the layers of a ResNet18 built through `build_backbone` as a run
builds it. Standard deviations are estimated from >= 10^4 draws (relative error < 1%), compared within 5%.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from dynconv.build import build_backbone
from dynconv.layers.initialisation import kernel_fans
from op_checks import assert_knob_rejected, load_op_config

STD_TOL = 0.05


def _op(name: str, **overrides) -> dict:
    cfg = {**load_op_config(name), **overrides}
    if name == "kw":
        cfg["tau_epochs"] = 10  # the shipped value interpolates the recipe's; no recipe here
    return cfg


def _build(op: dict, backbone: str = "resnet18", seed: int = 0, **backbone_cfg):
    torch.manual_seed(seed)
    return build_backbone({"name": backbone, **backbone_cfg}, op, {"name": "none"}, num_classes=10, image_size=32)


def _close(value: float, expected: float, tol: float = STD_TOL) -> bool:
    return abs(value / expected - 1.0) < tol


def _within(tensor: torch.Tensor, bound: float) -> bool:
    """Every value in [-bound, bound] (up to float32 rounding of the bound)."""
    return tensor.abs().max().item() <= bound * (1 + 1e-6)


def _linears(module: nn.Module) -> list[nn.Linear]:
    return [m for m in module.modules() if isinstance(m, nn.Linear)]


@pytest.mark.parametrize("name", ["odconv", "dyconv", "condconv", "kw"])
def test_the_knob_defaults_to_reference_and_is_checked(name):
    """The shipped configs and an op section without the key both give `reference`; anything else is refused."""
    from dynconv.build import make_operator

    cfg = _op(name)
    assert cfg["weight_init"] == "reference"
    assert make_operator({k: v for k, v in cfg.items() if k != "weight_init"}).weight_init == "reference"
    assert_knob_rejected(cfg, "weight_init", "kaiming", "reference, pytorch")


# ----------------------------------------------------------------------------------------------- ODConv


@pytest.fixture(scope="module")
def odconv_models():
    return {init: _build(_op("odconv", kernels=4, weight_init=init)).backbone for init in ("reference", "pytorch")}


def test_odconv_reference_is_the_releases(odconv_models):
    """modules/odconv.py: kaiming-normal fan_out per kernel (layer1, 64 -> 64 3x3: std sqrt(2/576) = 0.059);
    FC and heads kaiming-normal fan_out, every bias 0; BN scale 1, shift 0."""
    net = odconv_models["reference"].net
    layer = net.layer1[0].conv1
    assert _close(layer.weight.std().item(), math.sqrt(2.0 / 576))
    assert abs(layer.weight.mean().item()) < 0.02 * math.sqrt(2.0 / 576)
    for name in ("layer1.0.conv1", "layer3.1.conv2", "layer4.0.conv1"):
        module = net.get_submodule(name)
        assert _close(module.weight.std().item(), math.sqrt(2.0 / kernel_fans(module.weight)[1]))
        attention = module.attention
        assert attention.fc.bias is None
        for linear in _linears(attention):
            if linear.bias is not None:
                assert not linear.bias.any(), name
        assert _close(attention.channel.weight.std().item(), math.sqrt(2.0 / attention.channel.out_features), 0.1)
        assert torch.equal(attention.bn.weight, torch.ones_like(attention.bn.weight))
        assert not attention.bn.bias.any()


def test_odconv_pytorch_keeps_the_earlier_init(odconv_models):
    """`pytorch`: nn.Conv2d's kaiming-uniform(a=sqrt(5)) per kernel (std 1/sqrt(3 * 576) = 0.024 in layer1) and
    nn.Linear's default heads, whose biases are not zero."""
    layer = odconv_models["pytorch"].net.layer1[0].conv1
    bound = 1.0 / math.sqrt(576)
    assert _within(layer.weight, bound)
    assert _close(layer.weight.std().item(), bound / math.sqrt(3))
    assert layer.attention.channel.bias.any()
    assert _within(layer.attention.channel.bias, 1.0 / math.sqrt(layer.attention.channel.in_features))


# ----------------------------------------------------------------------------------------------- DY-Conv


def test_dyconv_reference_is_the_releases():
    """dynamic_conv.py: kaiming_uniform_ per kernel, U(+-sqrt(6 / fan_in)); attention FC1/FC2 kaiming-normal
    fan_out, FC2 bias 0. `pytorch` keeps nn.Conv2d's bound 1/sqrt(fan_in) and a non-zero FC2 bias."""
    reference = _build(_op("dyconv", weight_init="reference")).backbone.net
    pytorch = _build(_op("dyconv", weight_init="pytorch")).backbone.net
    for name in ("layer1.0.conv1", "layer4.1.conv2", "layer3.0.downsample.0"):
        module = reference.get_submodule(name)
        fan_in = kernel_fans(module.weight)[0]
        assert _within(module.weight, math.sqrt(6.0 / fan_in))
        assert _close(module.weight.std().item(), math.sqrt(2.0 / fan_in))
        assert not module.attention.fc2.bias.any()
        fc1 = module.attention.fc1
        assert _close(fc1.weight.std().item(), math.sqrt(2.0 / fc1.out_features), 0.1)
        old = pytorch.get_submodule(name)
        assert _within(old.weight, 1.0 / math.sqrt(fan_in))
        assert old.attention.fc2.bias.any()


def test_dyconv_reference_zeroes_kernel_biases():
    from dynconv.ops.dyconv import DyConv2d

    module = DyConv2d(16, 32, (3, 3), padding=1, bias=True, kernels=4, weight_init="reference")
    assert not module.bias.any()


# ----------------------------------------------------------------------------------------------- CondConv


@pytest.mark.parametrize("routing", ["layer", "block"])
def test_condconv_reference_is_timms_goog_init(routing):
    """_init_weight_goog: every expert N(0, 2 / (k k O / groups)), biases 0; routing U(+-1/sqrt(C_in + n)),
    bias 0 (layer routing and block routing alike)."""
    built = _build(_op("condconv", experts=8, routing=routing, weight_init="reference")).backbone
    for name in ("layer1.0.conv1", "layer4.1.conv2", "layer2.0.downsample.0"):
        module = built.net.get_submodule(name)
        fan_out = math.prod(module.kernel_size) * module.out_channels // module.groups
        assert _close(module.weight.std().item(), math.sqrt(2.0 / fan_out))
        for k in range(module.kernels):
            assert _close(module.weight[k].std().item(), math.sqrt(2.0 / fan_out), 0.1)
    routings = [m for m in built.modules() if isinstance(m, nn.Linear) and m.out_features == 8]
    assert routings
    for fc in routings:
        assert not fc.bias.any()
        assert _within(fc.weight, 1.0 / math.sqrt(fc.in_features + fc.out_features))


def test_condconv_pytorch_keeps_the_earlier_init():
    module = _build(_op("condconv", experts=8, weight_init="pytorch")).backbone.net.layer1[0].conv1
    bound = 1.0 / math.sqrt(kernel_fans(module.weight)[0])
    assert _within(module.weight, bound)
    assert _close(module.weight.std().item(), bound / math.sqrt(3))
    assert module.routing.bias.any()


# --------------------------------------------------------------------------------------- KernelWarehouse


def _release_fan_out(cells: torch.Tensor) -> int:
    """The fan-out the release's `allocate` gives kaiming_normal_: a layer's cells viewed (-1, *cell_shape[1:])."""
    view = cells.reshape(-1, *cells.shape[2:])
    return nn.init._calculate_fan_in_and_fan_out(view)[1]


# (backbone, b) -> the release's std over the static kernel's, layer by layer (docs/initialisation.md)
KW_RATIOS = {("resnet18", 1): {1.0}, ("resnet18", 4): {0.5}, ("resnet50", 1): {0.5, 1.0}}


@pytest.mark.parametrize(("backbone", "budget"), sorted(KW_RATIOS))
def test_kw_cells_follow_the_release(backbone, budget):
    """reference: each layer's own cells kaiming-normal for the fan-out of its slice of cells (the release's
    `allocate`); pytorch: for the fan-out of its static kernel. ResNet18 at b = 1: the same everywhere (every
    cell spans its layer's input channels); b = 4: the release's std is half; ResNet50 at b = 1: half in the
    18 layers whose input has 4x the cell's channels."""
    stds = {}
    for init in ("reference", "pytorch"):
        built = _build(_op("kw", b=budget, weight_init=init), backbone)
        operator, model = built.operator, built.backbone
        for name, (spec, cells) in operator.plan.items():
            layer = model.net.get_submodule(name)
            own = layer.warehouse.cells[cells.start: cells.start + cells.local_cells]
            if init == "reference":
                expected = math.sqrt(2.0 / _release_fan_out(own))
            else:
                out_channels, _, kh, kw = layer.kernel_shape
                expected = math.sqrt(2.0 / (out_channels * kh * kw))
            if own.numel() >= 10_000:
                assert _close(own.std().item(), expected), (name, init)
            stds[init, name] = expected
    ratios = {round(stds["reference", name] / stds["pytorch", name], 6) for _, name in stds}
    assert ratios == KW_RATIOS[backbone, budget]


def test_kw_attention_is_the_releases_either_way():
    """Attention FCs kaiming-normal fan_out with zero biases (Attention._initialize_weights), whatever
    op.weight_init."""
    for init in ("reference", "pytorch"):
        layer = _build(_op("kw", weight_init=init)).backbone.net.layer2[1].conv1
        for linear in _linears(layer.attention):
            if linear.bias is not None:
                assert not linear.bias.any()
        fc2 = layer.attention.fc2
        assert _close(fc2.weight.std().item(), math.sqrt(2.0 / fc2.out_features), 0.1)


# ----------------------------------------------------------------------------------------------- backbones


def _last_bns(net: nn.Module) -> list[nn.BatchNorm2d]:
    """The last BN of every residual block: bn3 of a Bottleneck, bn2 of a BasicBlock."""
    blocks = [block for name, block in net.named_modules() if name.count(".") == 1 and name.startswith("layer")]
    return [block.bn3 if hasattr(block, "bn3") else block.bn2 for block in blocks]


@pytest.mark.parametrize("backbone", ["resnet18", "resnet50"])
def test_zero_init_last(backbone, compose_cfg):
    """The backbone takes the recipe's value: the quickstart's recipe keeps timm's true, the papers' recipes (built
    on imagenet_traditional) say false as their releases, and a command-line value wins; built: false gives every
    block's last BN scale 1, true (and no key: timm's default) 0."""
    for overrides, expected in (([], True), (["recipe=imagenet_traditional"], False), (["recipe=we_90ep"], False),
                                (["recipe=dynet_imagenet"], True),
                                (["recipe=imagenet_advanced", "backbone.zero_init_last=true"], True)):
        cfg = compose_cfg([f"backbone={backbone}", *overrides])
        assert cfg.backbone.zero_init_last is expected, overrides
    static = {"name": "static"}
    for cfg, scale in (({}, 0.0), ({"zero_init_last": False}, 1.0), ({"zero_init_last": True}, 0.0)):
        net = _build(static, backbone, **cfg).backbone.net
        bns = _last_bns(net)
        assert len(bns) == (8 if backbone == "resnet18" else 16)
        assert all(torch.equal(bn.weight, torch.full_like(bn.weight, scale)) for bn in bns), cfg


def test_drop_path_schedule():
    """linear: timm's rule (0 at the first block, the rate at the last); constant: the rate in every block."""
    rates = {}
    for schedule in ("linear", "constant"):
        net = _build({"name": "static"}, drop_path_rate=0.1, drop_path_schedule=schedule).backbone.net
        rates[schedule] = [getattr(block.drop_path, "drop_prob", 0.0) for block in
                           (m for n, m in net.named_modules() if n.count(".") == 1 and n.startswith("layer"))]
    assert rates["linear"][0] == 0.0 and math.isclose(rates["linear"][-1], 0.1)
    assert rates["constant"] == [0.1] * 8


@pytest.mark.parametrize("backbone", ["resnet50", "mobilenetv2_100"])
def test_classifier_init(backbone):
    """normal: N(0, 0.01) weights and a zero bias (the torchvision-style networks of the releases); library:
    timm's."""
    torch.manual_seed(0)
    normal = _build({"name": "static"}, backbone, classifier_init="normal").backbone.net.get_classifier()
    assert _close(normal.weight.std().item(), 0.01) and not normal.bias.any()
    library = _build({"name": "static"}, backbone).backbone.net.get_classifier()
    assert not _close(library.weight.std().item(), 0.01, 0.2)


def test_backbone_knob_values_are_checked():
    with pytest.raises(ValueError, match="backbone.drop_path_schedule='cosine' is invalid"):
        _build({"name": "static"}, drop_path_schedule="cosine")
    with pytest.raises(ValueError, match="backbone.zero_init_last='no' is invalid"):
        _build({"name": "static"}, zero_init_last="no")
    with pytest.raises(TypeError, match="backbone.zero_init_last"):
        _build({"name": "static"}, "mobilenetv2_100", zero_init_last=False)
