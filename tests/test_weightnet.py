"""WeightNet (Ma et al., ECCV 2020): the batched layer against the paper's equations computed sample by sample,
its two special cases (SE on the kernel, Sec. 3.2; CondConv, Sec. 3.1), GAP sharing (Table 10) and its knobs."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from dynconv.build import build_backbone, make_operator
from dynconv.conversion import OperatorConfigError
from dynconv.ops.condconv import CondConv2d
from dynconv.layers.shared_input import SharedInput
from dynconv.functional import selector
from dynconv.ops import weightnet_apply
from dynconv.ops.weightnet import WeightNetConv2d
from op_checks import load_op_config  # noqa: E402
from reference_checks import assert_matches_reference  # noqa: E402

WEIGHTNET = dict(name="weightnet", lam=1, G=2, reduction=16, min_hidden=16, gap="block", keep_static=[])


def _layer(cin, cout, k, stride, groups, *, lam, G, bias=False, hidden=5):
    """A layer-level WeightNet (own GAP + FC_1) with M*C_out = lam*G*C_out inputs and G*C_out groups."""
    torch.manual_seed(0)
    depthwise = groups == cin == cout and groups > 1
    wn_groups = cout if depthwise else G * cout
    layer = WeightNetConv2d(cin, cout, (k, k), stride, k // 2, 1, groups, bias, inputs=lam * wn_groups,
                            wn_groups=wn_groups, hidden=hidden).double()
    with torch.no_grad():  # spread the activations so samples get clearly different kernels
        layer.activation.weight.mul_(4.0)
    return layer


def reference_forward(layer: WeightNetConv2d, x: torch.Tensor) -> torch.Tensor:
    """Sec. 3.3 written out for one sample at a time: alpha = sigmoid(FC_2 FC_1 GAP(x)), then group j of the
    grouped FC sums alpha[j*lam + i] * V[j, i] over its lam inputs, and the kernel convolves that sample."""
    outputs = []
    for sample in x:
        pooled = sample.mean(dim=(1, 2))
        alpha = torch.sigmoid(layer.activation(layer.reduce.fc(pooled)))
        pieces = []
        for group in range(layer.wn_groups):
            piece = sum(alpha[group * layer.lam + i] * layer.generator[group, i] for i in range(layer.lam))
            pieces.append(piece)
        kernel = torch.cat(pieces).view(layer.kernel_shape)
        outputs.append(F.conv2d(sample[None], kernel, layer.bias, layer.stride, layer.padding, layer.dilation,
                                layer.groups))
    return torch.cat(outputs)


CASES = [  # (stride, grouping, kernel, batch, lam, G, bias)
    (1, "dense", 3, 3, 1, 2, False),
    (2, "dense", 3, 3, 2, 2, True),
    (1, "dense", 1, 3, 2, 1, False),
    (2, "dense", 1, 1, 1, 2, False),
    (1, "depthwise", 3, 3, 2, 2, False),
    (2, "depthwise", 3, 1, 1, 2, True),
    (1, "grouped", 3, 3, 1, 2, False),
    (1, "dense", 3, 1, 4, 4, False),
]


@pytest.mark.parametrize("algorithm", ["kernels", "outputs"])  # dynconv/ops/weightnet_apply.py
@pytest.mark.parametrize("size", [6, 15], ids=["6x6", "15x15"])  # 15x15 outputs exceed the bmm threshold
@pytest.mark.parametrize(("stride", "grouping", "kernel", "batch", "lam", "G", "bias"), CASES,
                         ids=[f"s{c[0]}-{c[1]}-k{c[2]}-b{c[3]}-lam{c[4]}-G{c[5]}-bias{int(c[6])}" for c in CASES])
def test_matches_per_sample_reference(stride, grouping, kernel, batch, lam, G, bias, size, algorithm, monkeypatch):
    """Both exact algorithms (the B kernels and a per-sample convolution; the partial convolutions of one static
    grouped convolution weighted by alpha), outputs and every gradient, against Sec. 3.3 sample by sample."""
    cin, cout, groups = {"dense": (4, 6, 1), "depthwise": (6, 6, 6), "grouped": (4, 6, 2)}[grouping]
    layer = _layer(cin, cout, kernel, stride, groups, lam=lam, G=G, bias=bias)
    assert weightnet_apply.parts_per_output(layer) is not None  # every case here can mix outputs
    ran = []
    for name, run in list(weightnet_apply.ALGORITHMS.items()):
        monkeypatch.setitem(weightnet_apply.ALGORITHMS, name, lambda *a, name=name, run=run: ran.append(name) or run(*a))
    x = torch.randn(batch, cin, size, size, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    x_ref = x.clone().requires_grad_(True)
    x.requires_grad_(True)
    names, params = zip(*[(n, p) for n, p in layer.named_parameters()])
    with selector.policy(algorithm):
        out = layer(x)
    assert ran == [algorithm]
    assert_matches_reference(out, reference_forward(layer, x_ref), x, x_ref, names, params)


def test_outputs_needs_whole_input_channels_per_group():
    """G = 3 on 4 input channels of a 3x3 kernel splits channels inside a group: only the kernels apply, and a
    forced "outputs" falls back to them (as every forced policy does where it does not apply)."""
    torch.manual_seed(0)
    layer = WeightNetConv2d(4, 6, 3, padding=1, G=3, hidden=5).double()
    assert weightnet_apply.parts_per_output(layer) is None
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    with selector.policy("outputs"):
        torch.testing.assert_close(layer(x), reference_forward(layer, x))


def test_samples_get_different_kernels():
    layer = _layer(4, 6, 3, 1, 1, lam=2, G=2)
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    kernels = layer.sample_kernels(layer.alpha(x))
    assert not torch.allclose(kernels[0], kernels[1])


def test_se_special_case():
    """M = G = 1 (Sec. 3.2): each output channel's kernel is V_c scaled by alpha_c, i.e. SE applied to the
    kernel, which equals SE applied to the output of the static convolution with kernel V."""
    layer = _layer(4, 6, 3, 1, 1, lam=1, G=1)
    x = torch.randn(3, 4, 7, 7, dtype=torch.float64)
    static_kernel = layer.generator.detach().reshape(6, 4, 3, 3)  # group c (1 input) -> all of W'_c
    alpha = layer.alpha(x)
    assert alpha.shape == (3, 6)
    expected = F.conv2d(x, static_kernel, None, 1, 1) * alpha[:, :, None, None]
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-12)


def test_condconv_special_case():
    """G = 1/C, M = m/C (Sec. 3.1): one group with m inputs is CondConv with m experts V_i and routing
    sigmoid(FC(GAP(x))), where FC is FC_2 composed with FC_1 (no non-linearity between them)."""
    experts = 3
    wn = WeightNetConv2d(4, 6, (3, 3), 2, 1, 1, 1, False, inputs=experts, wn_groups=1, hidden=5).double()
    cond = CondConv2d(4, 6, (3, 3), 2, 1, 1, 1, bias=False, experts=experts).double()
    with torch.no_grad():
        cond.weight.copy_(wn.generator[0].view(experts, 6, 4, 3, 3))  # expert i = row i of the grouped FC
        cond.routing.weight.copy_(wn.activation.weight @ wn.reduce.fc.weight)
        cond.routing.bias.copy_(wn.activation.weight @ wn.reduce.fc.bias + wn.activation.bias)
    x = torch.randn(3, 4, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(wn.alpha(x), cond.routing_weights(x), rtol=0, atol=1e-12)
    torch.testing.assert_close(wn(x), cond(x), rtol=0, atol=1e-12)


def _build(backbone: str, **op):
    torch.manual_seed(0)
    return build_backbone({"name": backbone}, {**WEIGHTNET, **op}, {"name": "none"}, num_classes=10,
                          image_size=32)


def test_conversion_rule_shufflenet_and_resnet():
    """Every convolution in ShuffleNetV2's branches and ResNet's blocks; stem, head, shortcuts, fc static."""
    built = _build("shufflenetv2_wn_x0_5")
    converted = {d.layer.name for d in built.decisions if d.converted}
    static = {d.layer.name for d in built.decisions if not d.converted}
    assert all(".branch" in name for name in converted)
    assert {"conv1.0", "conv5.0", "fc"} <= static
    assert {"stage2.0.branch1.0", "stage2.0.branch1.2", "stage2.1.branch2.0", "stage2.1.branch2.3"} <= converted
    resnet = _build("resnet18")
    static = {d.layer.name for d in resnet.decisions if not d.converted}
    assert {"conv1", "fc"} | {f"layer{s}.0.downsample.0" for s in (2, 3, 4)} == static


@pytest.mark.parametrize("gap", ["layer", "block", "stage"])
def test_gap_sharing_reads_the_right_input(gap):
    """gap=block: FC_1 runs on GAP of the block's input, once, shared by the block's layers; gap=stage: on the
    stage's input; gap=layer: each layer pools its own input (Table 10)."""
    built = _build("resnet18", gap=gap)
    model = built.backbone.eval().double()
    shared = list(getattr(model, "shared_inputs", {}).values()) if gap != "layer" else []
    assert len(shared) == {"layer": 0, "block": 8, "stage": 4}[gap]
    block_inputs = {}
    model.net.layer3[1].register_forward_pre_hook(lambda m, a: block_inputs.__setitem__("layer3.1", a[0]))
    model.net.layer3[0].register_forward_pre_hook(lambda m, a: block_inputs.__setitem__("layer3.0", a[0]))
    conv2 = model.net.layer3[1].conv2
    layer_inputs = {}
    conv2.register_forward_pre_hook(lambda m, a: layer_inputs.__setitem__("x", a[0]))
    alphas = {}
    conv2.register_forward_hook(lambda m, a, out: alphas.__setitem__("alpha", m.alpha(a[0])))
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    calls = []
    for module in shared:
        module.summary.register_forward_hook(lambda m, a, out: calls.append(1))
    model(x)
    if gap == "layer":
        expected_hidden = conv2.reduce(layer_inputs["x"].mean(dim=(2, 3)))
    else:
        assert len(calls) == len(shared), "each shared summary must run exactly once per forward"
        source = block_inputs["layer3.1" if gap == "block" else "layer3.0"]
        expected_hidden = conv2.shared_input.summary(source.mean(dim=(2, 3)))
    torch.testing.assert_close(alphas["alpha"], torch.sigmoid(conv2.activation(expected_hidden)))


def test_shared_summary_outside_its_block_is_a_clear_error():
    model = _build("resnet18").backbone
    with pytest.raises(RuntimeError, match="read outside that module's forward"):
        model.net.layer1[0].conv1(torch.randn(1, 64, 8, 8))


def test_deepcopy_after_forward_and_state_dict_round_trip():
    """EMA deep-copies the model; the shared summaries and their hooks must follow the copy, not the original."""
    model = _build("shufflenetv2_wn_x0_5").backbone.eval()
    x = torch.randn(2, 3, 32, 32)
    y = model(x)
    twin = copy.deepcopy(model)
    torch.testing.assert_close(twin(x), y)
    layer = twin.net.stage3[1].branch2[0]
    assert layer.shared_input is twin.shared_inputs["stage3__1__branch2"]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1)
    torch.testing.assert_close(twin(x), y)  # the copy does not read the original's summaries
    fresh = _build("shufflenetv2_wn_x0_5").backbone.eval()
    fresh.load_state_dict(twin.state_dict())
    torch.testing.assert_close(fresh(x), y)


def test_train_mode_batch_one_and_channels_last():
    model = _build("shufflenetv2_wn_x0_5").backbone.train()
    # 64x64: at 32x32 the last stage is 1x1 and the backbone's own BatchNorm2d cannot train on one value.
    out = model(torch.randn(1, 3, 64, 64))
    out.sum().backward()
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    torch.testing.assert_close(model(x.to(memory_format=torch.channels_last)), model(x), rtol=1e-5, atol=1e-5)


def test_initial_kernels_have_conv_scale():
    """At initialisation a generated kernel spreads like a default nn.Conv2d kernel (bound 1/sqrt(fan_in))."""
    layer = WeightNetConv2d(64, 64, (3, 3), 1, 1, 1, 1, False, inputs=4 * 2 * 64, wn_groups=2 * 64, hidden=16)
    with torch.no_grad():
        kernels = layer.sample_kernels(layer.alpha(torch.randn(4, 64, 8, 8)))
    conv_std = 1 / math.sqrt(3 * 64 * 9)
    assert 0.5 * conv_std < kernels.std().item() < 2 * conv_std


@pytest.mark.parametrize(("override", "match"), [
    ({"G": 5}, r"op.G=5 does not fit layer '.*' Conv2d\(.*allowed values here: G in \["),
    ({"G": 0}, r"op.G=0 is invalid.*numbers > 0"),
    ({"lam": 0}, r"op.lam=0 is invalid.*integers >= 1"),
    ({"lam": 1.5}, r"op.lam=1.5 is invalid.*integers >= 1"),
    ({"reduction": 0}, r"op.reduction=0 is invalid.*integers >= 1"),
    ({"reduction": -4}, r"op.reduction=-4 is invalid"),
    ({"gap": "net"}, r"op.gap='net' is invalid.*layer, block, stage"),
])
def test_bad_knobs_fail_at_build_with_layer_and_allowed_values(override, match):
    with pytest.raises(OperatorConfigError, match=match):
        _build("resnet18", **override)


def test_fractional_g_is_condconv_like_grouping():
    """G = 1/C_out is allowed where it gives integer groups (the CondConv end of the design space)."""
    op = make_operator({**WEIGHTNET, "G": 1 / 64, "lam": 4})
    from dynconv.conversion.convert import describe_layers
    from dynconv.backbones import BACKBONES

    layer = next(l for l in describe_layers(BACKBONES.get("resnet18")(num_classes=10)) if l.name == "layer1.0.conv1")
    assert op.grouping(layer) == (4, 1)


def test_config_file_builds_the_operator():
    operator = make_operator(load_op_config("weightnet"))
    assert (operator.lam, operator.G, operator.gap) == (1, 2, "block")


@pytest.mark.parametrize("gap", ["layer", "block"])
def test_compiles_without_graph_breaks(gap):
    import torch._dynamo

    model = _build("resnet18", gap=gap).backbone.eval()
    x = torch.randn(2, 3, 32, 32)
    explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    torch._dynamo.reset()


def test_a_training_step_moves_the_generators():
    model = _build("shufflenetv2_wn_x0_5").backbone.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss = F.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    optimizer.step()
    moved = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert any(n.endswith("generator") for n in moved) and any(n.startswith("shared_inputs") for n in moved)
    assert isinstance(model.shared_inputs["stage2__0"], SharedInput)
    assert isinstance(model.net.stage2[0].branch1[0], WeightNetConv2d)
    assert not isinstance(model.net.conv5[0], WeightNetConv2d) and isinstance(model.net.conv5[0], nn.Conv2d)
