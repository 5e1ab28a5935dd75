"""The per-sample kernel export (dynconv/analysis/kernel_export.py, dynconv/functional/kernel_capture.py): for every
per-sample operator the exported kernel, convolved with the layer's input, is the layer's output."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from op_checks import load_op_config

from dynconv.analysis.kernel_export import (KernelRecorder, dynamic_conv_layers, filter_cosine_similarity,
                                            off_diagonal)
from dynconv.build import build_backbone
from dynconv.functional import kernel_capture, selector
from dynconv.ops.odconv import ODConv2d

pytestmark = pytest.mark.usefixtures("one_thread")

# (id, op, overrides): every per-sample operator; ODConv with one and four kernels, KW* (its input and output
# scales folded into the kernel), DyNet trained with feature fusion.
OPS = [
    ("weightnet", "weightnet", {}),
    ("condconv", "condconv", {}),
    ("dyconv", "dyconv", {}),
    ("odconv1", "odconv", {"kernels": 1}),
    ("odconv4", "odconv", {"kernels": 4}),
    ("kw", "kw", {"tau": 0.5}),  # tau 1 (the schedule's start) is the one-hot init: one kernel for all
    ("kw_omni", "kw", {"omni": True, "tau": 0.5}),
    ("dynet", "dynet", {"fusion": "features"}),
    ("dcd", "dcd", {}),
    ("cgc", "cgc", {}),
]


@pytest.fixture(autouse=True)
def _cost_model(monkeypatch):
    monkeypatch.setenv("DYNCONV_CONV_ALGORITHM", "model")


# Only the last convolution is converted: float64 convolutions are slow on a CPU, and one layer per operator is
# checked (its block still computes what its layers share: WeightNet's GAP, DyNet's coefficients).
KEEP_STATIC = ["conv1", "layer1.*", "layer2.*", "layer3.*", "layer4.0.*", "layer4.1.conv1"]


def _model(op: str, overrides: dict) -> nn.Module:
    torch.manual_seed(0)
    op_cfg = {**load_op_config(op), "keep_static": KEEP_STATIC, **overrides}
    model = build_backbone({"name": "resnet18"}, op_cfg, {"name": "none"}, num_classes=10, image_size=32).backbone
    return model.double()


def _layer_io(model: nn.Module, name: str, x: torch.Tensor, record: bool):
    """(the layer's input, its output, the recorder or None) in one forward pass of the model. The whole model
    runs: layers that share their block's attention (WeightNet's GAP, DyNet's coefficients) read it there."""
    seen = {}
    handle = model.get_submodule(name).register_forward_hook(
        lambda module, args, output: seen.update(input=args[0], output=output))
    try:
        if record:
            with KernelRecorder(model, name) as recorder:
                model(x)
        else:
            recorder = None
            model(x)
    finally:
        handle.remove()
    return seen["input"], seen["output"], recorder


def _convolve(captured, x: torch.Tensor) -> torch.Tensor:
    """One call's exported kernels applied one sample at a time with a plain convolution."""
    assert captured.weight.shape[0] == x.shape[0]
    bias = captured.bias
    return torch.cat([F.conv2d(x[b:b + 1], captured.weight[b], None if bias is None else bias[b], captured.stride,
                               captured.padding, captured.dilation, captured.groups) for b in range(x.shape[0])])


def _apply(recorder: KernelRecorder, name: str, x: torch.Tensor) -> torch.Tensor:
    (captured,) = recorder.captures[name]
    return _convolve(captured, x)


@pytest.mark.parametrize("op, overrides", [case[1:] for case in OPS], ids=[case[0] for case in OPS])
def test_exported_kernel_is_the_kernel_the_layer_applies(op, overrides):
    """The last dynamic convolution of a ResNet18 fed 36 px (2 x 2 outputs in layer4: every tap of its 3 x 3
    kernel counts), under the policy "outputs": without a capture the routines mix outputs, cells or features;
    the capture makes them materialise the kernels, and the output stays the same. DyNet runs in training mode
    with gradients (its fusion "features" applies only there)."""
    model = _model(op, overrides).eval()
    x = torch.randn(3, 3, 36, 36, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    layers = dynamic_conv_layers(model, x[:1])
    assert layers, f"{op}: no dynamic convolution found"
    name = layers[-1]  # the last dynamic convolution (layer4's last conv): what WeightNet's Fig. 5 reads
    assert layers == ["net.layer4.1.conv2"]
    training = op == "dynet"
    model.train(training)
    with selector.policy("outputs"), torch.set_grad_enabled(training):
        torch.manual_seed(2)
        plain_in, plain_out, _ = _layer_io(model, name, x, record=False)
        torch.manual_seed(2)
        layer_in, layer_out, recorder = _layer_io(model, name, x, record=True)
    assert not kernel_capture.active()
    assert layer_out.shape[-2:] == (2, 2)
    assert torch.allclose(layer_in, plain_in, rtol=1e-9, atol=1e-10)
    assert torch.allclose(layer_out, plain_out, rtol=1e-9, atol=1e-10)  # the forced algorithm: same output
    kernels = recorder.kernels(name)
    assert kernels.shape[:2] == (3, model.get_submodule(name).out_channels) and kernels.dtype == torch.float64
    assert kernels.device.type == "cpu" and not kernels.requires_grad
    assert recorder.captures[name][0].source == "per_sample_conv2d"
    expected = _apply(recorder, name, layer_in.detach())
    assert torch.allclose(expected, layer_out.detach(), rtol=1e-9, atol=1e-10), \
        (expected - layer_out).abs().max().item()
    assert (kernels[0] - kernels[1]).abs().max() > 0  # per sample: the samples' kernels differ

    # Batch 1 (per_sample_conv2d's plain-convolution path) and two calls into one recorder, in eval mode.
    model.eval()
    seen = []
    handle = model.get_submodule(name).register_forward_hook(lambda module, args, out: seen.append((args[0], out)))
    try:
        with torch.no_grad(), KernelRecorder(model, name) as calls:
            model(x[:1])
            model(x[1:])
    finally:
        handle.remove()
    assert calls.order == [name, name] and [c.weight.shape[0] for c in calls.captures[name]] == [1, 2]
    for captured, (call_in, call_out) in zip(calls.captures[name], seen):
        assert torch.allclose(_convolve(captured, call_in), call_out, rtol=1e-9, atol=1e-10)
    if not training:  # in eval mode an image's kernel does not depend on the rest of its batch
        assert torch.allclose(calls.kernels(name), kernels, rtol=1e-9, atol=1e-12)


def test_odconv_single_kernel_1x1_shortcut_is_captured():
    """ODConv's 1x1 layer with one kernel takes a plain convolution; a capture takes the mixture instead, and its
    channel and filter attentions end up in the kernel. On a 2 x 2 map the mixture would scale the (smaller)
    input by the channel attention; a capture scales the kernel."""
    torch.manual_seed(0)
    layer = ODConv2d(8, 6, (1, 1), kernels=1).double().eval()
    model = nn.Sequential(layer)
    x = torch.randn(3, 8, 2, 2, dtype=torch.float64)
    with torch.no_grad():
        plain = model(x)
        with KernelRecorder(model, "0") as recorder:
            out = model(x)
    assert torch.allclose(out, plain, rtol=1e-9, atol=1e-12)
    assert torch.allclose(_apply(recorder, "0", x), out, rtol=1e-9, atol=1e-12)
    assert dynamic_conv_layers(model, x[:1]) == ["0"]


def test_static_convolutions_and_errors():
    torch.manual_seed(0)
    model = build_backbone({"name": "resnet18"}, {"name": "static"}, {"name": "none"}, num_classes=10,
                           image_size=32).backbone.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert dynamic_conv_layers(model, x[:1]) == []
        name = "net.layer4.1.conv2"
        layer_in, layer_out, recorder = _layer_io(model, name, x, record=True)
        (captured,) = recorder.captures[name]
        assert captured.source == "static"
        assert torch.equal(recorder.kernels(name)[1], model.get_submodule(name).weight)
        assert torch.allclose(_apply(recorder, name, layer_in), layer_out, atol=1e-5)
        with pytest.raises(RuntimeError, match="net.layer4.1 .*applied no per-sample convolution"):
            with KernelRecorder(model, "net.layer4.1"):
                model(x)
        assert not kernel_capture.active()  # the capture is gone even when the forward raised
        with pytest.raises(ValueError, match="no module named 'layer9'"):
            KernelRecorder(model, "layer9")
    weightnet = _model("weightnet", {"keep_static": KEEP_STATIC[:-1]}).eval()  # both convolutions of layer4.1
    with torch.no_grad(), pytest.raises(RuntimeError, match="more than one per-sample convolution"):
        with KernelRecorder(weightnet, "net.layer4.1"):  # a block: two dynamic convolutions in one call
            weightnet(x.double())


def test_transform_and_filter_similarity():
    model = _model("weightnet", {}).eval()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad(), KernelRecorder(model, "net.layer4.1.conv2",
                                         transform=lambda kernel: kernel.flatten(1)[:, :7]) as recorder:
        model(x)
    assert recorder.kernels().shape == (2, 7)
    # Orthogonal filters: the identity; identical filters: all ones; a zero filter: zero similarities.
    orthogonal = torch.linalg.qr(torch.randn(12, 12, dtype=torch.float64))[0][:4].reshape(4, 3, 2, 2)
    assert torch.allclose(filter_cosine_similarity(orthogonal), torch.eye(4, dtype=torch.float64), atol=1e-12)
    same = torch.randn(1, 3, 3, 3).expand(5, 3, 3, 3)
    assert torch.allclose(filter_cosine_similarity(same), torch.ones(5, 5, dtype=torch.float64), atol=1e-6)
    with_zero = torch.cat([same[:2], torch.zeros(1, 3, 3, 3)])
    similarity = filter_cosine_similarity(with_zero)
    assert similarity[2].abs().max() == 0 and off_diagonal(similarity).shape == (6,)
