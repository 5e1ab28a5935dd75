"""CondConv2d against a per-sample reference written from the paper's equations, in float64."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from dynconv.build import make_operator
from dynconv.ops import OperatorConfigError
from dynconv.ops.condconv import CondConv2d
from dynconv.functional import mixture_conv2d

from reference_checks import TOL, assert_matches_reference  # noqa: E402


def reference_condconv(x, weight, routing_weight, routing_bias, bias, stride, padding, dilation, groups):
    """The paper, one sample at a time: r = sigmoid(FC(GAP(x_b))), W_b = sum_i r_i W_i, y_b = W_b * x_b + b_b."""
    outputs = []
    for b in range(x.shape[0]):
        xb = x[b : b + 1]
        r = torch.sigmoid(xb.mean(dim=(2, 3)) @ routing_weight.t() + routing_bias)[0]  # (n,)
        wb = sum(r[i] * weight[i] for i in range(weight.shape[0]))
        bb = None if bias is None else sum(r[i] * bias[i] for i in range(bias.shape[0]))
        outputs.append(F.conv2d(xb, wb, bb, stride, padding, dilation, groups))
    return torch.cat(outputs)


def _make(in_ch, out_ch, kernel, stride, groups, bias, experts=3, dilation=1):
    torch.manual_seed(0)
    module = CondConv2d(in_ch, out_ch, (kernel, kernel), stride=stride, padding=kernel // 2 * dilation,
                        dilation=dilation, groups=groups, bias=bias, experts=experts).double()
    with torch.no_grad():  # non-trivial routing: spread the logits so coefficients differ between experts
        module.routing.weight.normal_(0, 2.0)
        module.routing.bias.normal_(0, 1.0)
    return module


GROUPINGS = {"g1": (4, 6, 1), "g2": (4, 6, 2), "depthwise": (4, 4, 4)}
CASES = list(itertools.product([1, 2], sorted(GROUPINGS), [1, 3], [1, 3], [True, False]))


def _params(module):
    names = ["weight", "routing.weight", "routing.bias"] + (["bias"] if module.bias is not None else [])
    return names, [module.get_parameter(n) for n in names]


def _forward(module, x, mode):
    if mode == "module":
        return module(x)
    return mixture_conv2d(x, module.weight, module.routing_weights(x), module.bias, module.stride, module.padding,
                          module.dilation, module.groups, mode=mode)


@pytest.mark.parametrize("size", [6, 15], ids=["6x6", "15x15"])  # 15x15 outputs exceed the bmm threshold
@pytest.mark.parametrize("mode", ["module", "auto", "kernels", "outputs"])
@pytest.mark.parametrize(("stride", "grouping", "kernel", "batch", "bias"), CASES,
                         ids=[f"s{s}-{g}-k{k}-b{b}-{'bias' if bb else 'nobias'}" for s, g, k, b, bb in CASES])
def test_matches_per_sample_reference(stride, grouping, kernel, batch, bias, mode, size):
    """Batched CondConv (forward and every gradient) equals the per-sample loop to 1e-10 in float64.

    Covers the module's own forward and every mixing mode of `mixture_conv2d` (kernels: folded / bmm /
    batch-1 paths; outputs: the grouped expert layout), so no shape-dependent algorithm choice can change
    the numbers. Gradients are checked w.r.t. the input, expert weights, routing FC and expert biases.
    """
    in_ch, out_ch, groups = GROUPINGS[grouping]
    module = _make(in_ch, out_ch, kernel, stride, groups, bias)
    x = torch.randn(batch, in_ch, size, size, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    x_ref = x.clone().requires_grad_(True)
    x = x.requires_grad_(True)
    names, params = _params(module)
    y = _forward(module, x, mode)
    y_ref = reference_condconv(x_ref, module.weight, module.routing.weight, module.routing.bias, module.bias,
                               module.stride, module.padding, module.dilation, module.groups)
    assert_matches_reference(y, y_ref, x, x_ref, names, params)


@pytest.mark.parametrize("mode", ["kernels", "outputs"])
def test_dilation_matches_reference(mode):
    """Dilated CondConv (padding = dilation * k//2) also equals the reference, in both mixing modes."""
    module = _make(4, 6, 3, 1, 2, True, dilation=2)
    x = torch.randn(3, 4, 9, 9, dtype=torch.float64)
    y = _forward(module, x, mode)
    y_ref = reference_condconv(x, module.weight, module.routing.weight, module.routing.bias, module.bias,
                               module.stride, module.padding, module.dilation, module.groups)
    torch.testing.assert_close(y, y_ref, **TOL)


def test_reference_is_sensitive_to_routing():
    """Sanity of the reference: different samples get different mixtures, so a batched implementation that
    shared one kernel across the batch would fail the tests above."""
    module = _make(4, 6, 3, 1, 1, False)
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    r = module.routing_weights(x)
    assert not torch.allclose(r[0], r[1])
    shared = F.conv2d(x, (r[0][:, None, None, None, None] * module.weight).sum(0), None, 1, 1)
    assert not torch.allclose(shared, module(x))


@pytest.mark.parametrize("bias", [True, False])
def test_single_expert_with_saturated_routing_is_a_conv2d(bias):
    """One expert and routing forced to 1 (zero FC weight, bias 50 -> sigmoid = 1.0 in float64) is exactly
    nn.Conv2d with that expert's weight: the dynamic layer reduces to the static one it replaces."""
    module = _make(4, 6, 3, 2, 1, bias, experts=1)
    with torch.no_grad():
        module.routing.weight.zero_()
        module.routing.bias.fill_(50.0)
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1, bias=bias).double()
    with torch.no_grad():
        conv.weight.copy_(module.weight[0])
        if bias:
            conv.bias.copy_(module.bias[0])
    x = torch.randn(3, 4, 11, 11, dtype=torch.float64)
    assert torch.equal(module.routing_weights(x), torch.ones(3, 1, dtype=torch.float64))
    torch.testing.assert_close(module(x), conv(x), rtol=0.0, atol=1e-12)


@pytest.mark.parametrize("experts", [0, -1, "a", 2.5, None, True])
def test_invalid_experts_raise_operator_config_error(experts):
    """op.experts must be a positive int; the error names the key and the allowed values (it reaches the CLI)."""
    with pytest.raises(OperatorConfigError) as info:
        make_operator({"name": "condconv", "experts": experts})
    message = str(info.value)
    assert "op.experts" in message
    assert "integers >= 1" in message
    assert repr(experts) in message


def test_valid_experts_accepted():
    """The positive counterpart: a positive int builds an operator that keeps that many experts."""
    assert make_operator({"name": "condconv", "experts": 3}).experts == 3


def _resnet18_condconv(routing: str):
    from dynconv.build import build_backbone

    torch.manual_seed(0)
    op = {"name": "condconv", "experts": 3, "routing": routing, "keep_static": []}
    return build_backbone({"name": "resnet18"}, op, {"name": "none"}, num_classes=10, image_size=32).backbone


def test_block_routing_is_shared_and_reads_the_block_input():
    """op.routing=block (timm's EfficientNet-CondConv): one sigmoid(FC(GAP(block input))) per block, used by
    every CondConv layer of the block, shortcut included; layers own no routing FC."""
    model = _resnet18_condconv("block").eval().double()
    assert len(model.shared_inputs) == 8
    block = model.net.layer2[0]
    layers = [block.conv1, block.conv2, block.downsample[0]]
    assert all(layer.routing is None for layer in layers)
    assert len({id(layer.shared_input) for layer in layers}) == 1
    seen = {}
    block.register_forward_pre_hook(lambda m, a: seen.__setitem__("block", a[0]))
    block.conv2.register_forward_hook(lambda m, a, out: seen.__setitem__("routing", m.routing_weights(a[0])))
    model(torch.randn(2, 3, 32, 32, dtype=torch.float64))
    expected = torch.sigmoid(layers[0].shared_input.summary.fc(seen["block"].mean(dim=(2, 3))))
    torch.testing.assert_close(seen["routing"], expected)
    layer_model = _resnet18_condconv("layer")
    routing_params = 3 * (sum(m.in_channels for m in layer_model.modules() if isinstance(m, CondConv2d)) + 19)
    block_routing = sum(p.numel() for p in model.shared_inputs.parameters())
    assert sum(p.numel() for p in layer_model.parameters()) - routing_params + block_routing == sum(
        p.numel() for p in model.parameters())


def test_block_routing_invalid_value():
    from dynconv.build import make_operator

    with pytest.raises(OperatorConfigError, match=r"op.routing='net' is invalid.*layer, block"):
        make_operator({"name": "condconv", "experts": 2, "routing": "net"})
