"""Every backbone x operator trains one step; multi-scale features; what the conversion pass decides."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from op_checks import load_op_config
from torch.nn.utils import parametrize

from dynconv.backbones import BACKBONES, Backbone
from dynconv.backbones.timm_any import BY_MODEL_NAME
from dynconv.backbones.video import VIDEO_BACKBONES
from dynconv.build import build_backbone
from dynconv.ops import OPERATORS
from dynconv.ops.condconv import CondConv2d

# Every registered operator (configs/op/<name>.yaml), at small settings where a knob multiplies the work, plus
# the variants that take another code path (block routing, per-layer GAP).
SMALL = {"condconv": {"experts": 2}, "dyconv": {"kernels": 2}, "odconv": {"kernels": 2},
         "weightnet": {"lam": 2, "G": 1}, "kw": {"tau": 0.5}, "dynet": {"g": 2}}
VARIANTS = {"condconv_block": ("condconv", {"experts": 2, "routing": "block"}),
            "weightnet_layer": ("weightnet", {"lam": 1, "G": 1, "gap": "layer"})}


def _op_config(op: str) -> dict:
    name, overrides = VARIANTS.get(op, (op, SMALL.get(op, {})))
    return {**load_op_config(name), **overrides}


OPS = {op: _op_config(op) for op in [*OPERATORS.names(), *VARIANTS]}
ATTN = {"name": "none"}


def _build(name: str, op: str, image_size: int = 32, num_classes: int = 10):
    torch.manual_seed(0)
    return build_backbone({"name": name}, OPS[op], ATTN, num_classes=num_classes, image_size=image_size)


# ResNeXt-29 16x64d (68M parameters, 10.7 GMACs at 32 px) has ResNeXt50's bottlenecks, which every operator is
# trained through here already; its conversions are checked in tests/test_cifar_backbones.py.
HEAVY = {"resnext29_16x64d"}
# ResNet152 and WideResNet50-2 have ResNet50's bottlenecks (deeper, wider: 3-4 s a step each, over a minute per
# backbone for the whole matrix, which CI's 30 minutes cannot afford): they train with the operators whose layout
# depends on the network (KernelWarehouse's warehouses per stage) and one kernel mixture and one reparameterisation.
# ResNet152's blocks are ResNet50's (KernelWarehouse on bottlenecks: wide_resnet50_2 and resnet50 take the step).
DEEP_OPS = {"resnet152": {"static", "condconv", "lwe"}, "wide_resnet50_2": {"static", "kw", "condconv", "lwe"}}


# Backbones that take video clips, not images: tests/test_video_backbones.py trains and converts them. backbone=timm
# builds the network backbone.model names: tests/test_convert_any.py trains it with every operator.
IMAGE_BACKBONES = [name for name in BACKBONES.names() if name not in VIDEO_BACKBONES and name not in BY_MODEL_NAME]


def _matrix() -> list:
    return [pytest.param(name, op) for name in IMAGE_BACKBONES if name not in HEAVY for op in sorted(OPS)
            if op in DEEP_OPS.get(name, OPS)]


def test_the_papers_operators_are_registered():
    """The matrix below reads the registry; the operators of the papers must all be in it (discovered on import)."""
    papers = {"static", "condconv", "dyconv", "odconv", "weightnet", "kw", "dynet", "lwe", "mwe", "we", "sk",
              "weight_std", "weight_norm", "spectral_norm", "cgc", "dcd"}
    assert papers <= set(OPERATORS.names()) and set(OPERATORS.names()) <= set(OPS)


@pytest.mark.parametrize(("name", "op"), _matrix())
def test_one_training_step(name, op):
    """Forward, backward and an SGD step work for every registered backbone with every operator.

    The loss must be finite, every parameter that took part must get a finite gradient, and the step must
    change the weights. Every converted layer must be in the autograd graph: each of its parameters gets a
    gradient (a bypassed or detached dynamic layer gets none), and so does every shared summary
    (`shared_inputs`: block routing, block-wise GAP). At least one converted layer must actually move
    (ResNets zero-init the last BN of each block, so block convs get exactly zero gradient on the very first
    step; then a second step must move them). Train mode at batch 2, 32x32.
    """
    torch.manual_seed(0)
    built = build_backbone({"name": name}, OPS[op], ATTN, num_classes=10, image_size=32)
    model = built.backbone.train()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([1, 7])
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    logits = model(x)
    assert logits.shape == (2, 10)
    loss = F.cross_entropy(logits, y)
    assert torch.isfinite(loss)
    optimizer.zero_grad()
    loss.backward()
    for pname, param in model.named_parameters():
        if param.grad is not None:
            assert torch.isfinite(param.grad).all(), pname
    optimizer.step()
    changed = [k for k, v in model.named_parameters() if not torch.equal(v.detach(), before[k])]
    assert changed, "the SGD step changed no parameter"
    converted = [d.layer.name for d in built.decisions if d.converted]
    if op == "static":
        assert not converted
        return
    for layer_name in converted:
        module = model.net.get_submodule(layer_name)
        # SK keeps its paths' nn.Conv2d inside; Weight Excitation parametrizes the layer's own weight.
        replaced = not isinstance(module, (nn.Conv2d, nn.Linear)) or op == "sk" or parametrize.is_parametrized(module)
        assert replaced, f"{layer_name} was not replaced"
        for pname, param in module.named_parameters():
            assert param.grad is not None, f"{layer_name}.{pname} got no gradient"
    for pname, param in getattr(model, "shared_inputs", nn.ModuleDict()).named_parameters():
        assert param.grad is not None, f"shared_inputs.{pname} got no gradient"
    if converted:
        moved = [n for n in converted if any(k.startswith(f"net.{n}.") for k in changed)]
        if not moved:  # ResNet block convs behind a zero-initialised BN: the second step reaches them
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
            moved = [n for n in converted
                     if any(not torch.equal(p.detach(), before[f"net.{n}.{k}"])
                            for k, p in model.net.get_submodule(n).named_parameters())]
        assert moved, "no converted layer's parameters changed"


@pytest.mark.parametrize("name", IMAGE_BACKBONES)
def test_forward_features_channels_and_strides(name):
    """forward_features returns C2..C5 (DeiT: one map) whose channels and strides match what the backbone declares.

    Detection necks size themselves from `feature_channels` / `feature_strides`; a mismatch breaks them.
    At a 64x64 input a map of stride s must be (64/s) x (64/s).
    """
    built = _build(name, "static", image_size=64)
    backbone = built.backbone.eval()
    with torch.no_grad():
        features = backbone.forward_features(torch.randn(2, 3, 64, 64))
    strides, channels = backbone.feature_strides, backbone.feature_channels
    assert len(strides) == len(channels) == len(features)
    if name.startswith("deit"):
        assert len(features) == 1
    elif name == "resnext29_16x64d":  # a CIFAR network: 3 stages at strides 1, 2, 4
        assert list(features) == ["C0", "C1", "C2"] and strides == [1, 2, 4]
    else:
        assert list(features) == ["C2", "C3", "C4", "C5"]
        assert strides == [4, 8, 16, 32]
    for (key, fmap), stride, chans in zip(features.items(), strides, channels):
        assert key == f"C{stride.bit_length() - 1}"
        assert fmap.dim() == 4 and fmap.shape[0] == 2
        assert fmap.shape[1] == chans, f"{key}: {fmap.shape[1]} channels, declared {chans}"
        assert tuple(fmap.shape[-2:]) == (64 // stride, 64 // stride), f"{key} at stride {stride}"


def test_resnet18_condconv_conversion_decisions():
    """ResNet18 + CondConv: the stem and the classifier stay static with a stated reason; every other conv
    (block convs and shortcut projections) becomes CondConv2d with the original geometry."""
    original = _build("resnet18", "static").backbone
    built = _build("resnet18", "condconv")
    decisions = {d.layer.name: d for d in built.decisions}
    assert not decisions["conv1"].converted and "stem" in decisions["conv1"].reason
    assert not decisions["fc"].converted and "classifier" in decisions["fc"].reason
    net = built.backbone.net
    assert type(net.conv1) is nn.Conv2d and type(net.fc) is nn.Linear
    original_convs = {n: m for n, m in original.net.named_modules() if isinstance(m, nn.Conv2d)}
    assert len(original_convs) == 20
    for layer_name, conv in original_convs.items():
        module = net.get_submodule(layer_name)
        if layer_name == "conv1":
            continue
        assert decisions[layer_name].converted and decisions[layer_name].reason == ""
        assert isinstance(module, CondConv2d), layer_name
        assert module.experts == 2
        assert (module.in_channels, module.out_channels, module.groups) == (conv.in_channels, conv.out_channels, conv.groups)
        assert module.kernel_size == tuple(conv.kernel_size) and module.stride == conv.stride
    assert "layer2.0.downsample.0" in decisions and decisions["layer2.0.downsample.0"].converted
    assert "converted 19 of 21" in built.summary()


def test_unknown_layer_raises_lookup_error():
    """A layer no placement rule describes is an error naming the layer (never a silent default role)."""
    from dynconv.backbones.timm_backbones import RESNET_RULES
    from dynconv.conversion.convert import convert
    from dynconv.ops import OPERATORS

    full = _build("resnet18", "static").backbone
    rules = [r for r in RESNET_RULES if "downsample" not in r.pattern]
    partial = Backbone("resnet18-partial", full.net, full._features, full.feature_channels, full.feature_strides,
                       family="resnet", rules=rules)
    operator = OPERATORS.get("condconv")({"name": "condconv", "experts": 2})
    with pytest.raises(LookupError, match=r"layer2\.0\.downsample\.0"):
        convert(partial, operator)
