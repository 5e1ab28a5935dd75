"""SKConv2d (SKNet, Li et al. CVPR 2019) against references written from the paper's Split / Fuse / Select, float64;
conversion, knobs, config, torch.compile, and model size against WeightNet (ECCV 2020) Table 4."""

from __future__ import annotations

import functools
import itertools

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from omegaconf import OmegaConf

from dynconv.build import build_backbone, make_operator
from dynconv.ops import OperatorConfigError
from dynconv.conversion import LayerInfo
from dynconv.ops.sk import SKConv2d
from dynconv.profiling import count_macs, count_params

from reference_checks import TOL, assert_matches_reference  # noqa: E402
OP = dict(name="sk", dilations=[1, 2], reduction=0.0625, min_hidden=32, keep_static=[])


def _bn(t, bn, batch_statistics, dims):
    """BatchNorm written out: the batch's mean and biased variance over `dims`, or the running statistics."""
    shape = (1, -1) + (1,) * (t.dim() - 2)
    if batch_statistics:
        mean, var = t.mean(dim=dims), t.var(dim=dims, unbiased=False)
    else:
        mean, var = bn.running_mean, bn.running_var
    return (t - mean.view(shape)) / torch.sqrt(var.view(shape) + bn.eps) * bn.weight.view(shape) + bn.bias.view(shape)


def reference_sk(x, module, stride, groups, batch_statistics=False):
    """SKNet's Sec. 3.1 for a 3x3 layer with padding 1, written from the paper rather than from the module:

        U_i = BN_i(conv3x3(x; dilation d_i, padding d_i)),  U = sum_i U_i,  s = GAP(U),  z = ReLU(BN(W s)),
        a_i = softmax over i of A_i z,  V = sum_i a_i . U_i

    BNs use their running statistics, or with `batch_statistics` the batch's (the attention BN only for more
    than one sample: one sample is normalised with the running statistics by design)."""
    att = module.attention
    us = []
    for d, (conv, bn) in zip(module.dilations, module.paths):
        u = F.conv2d(x, conv.weight, None, stride, padding=d, dilation=d, groups=groups)
        us.append(_bn(u, bn, batch_statistics, (0, 2, 3)))
    s = sum(us).mean(dim=(2, 3))
    z = torch.relu(_bn(s @ att.reduce.weight.t(), att.bn, batch_statistics and x.shape[0] > 1, (0,)))
    logits = (z @ att.select.weight.t()).view(x.shape[0], len(us), -1)  # row i of A stacked: (B, M, C)
    a = torch.softmax(logits, dim=1)
    return sum(a[:, i, :, None, None] * u for i, u in enumerate(us))


def per_sample(x, module, stride, groups):
    return torch.cat([reference_sk(x[b : b + 1], module, stride, groups) for b in range(x.shape[0])])


def _make(in_ch, out_ch, stride, groups, dilations=(1, 2), min_hidden=4):
    """An SKConv2d with spread attention logits and non-trivial BN statistics (nothing cancels by symmetry)."""
    torch.manual_seed(0)
    module = SKConv2d(in_ch, out_ch, (3, 3), stride, (1, 1), (1, 1), groups, dilations=dilations,
                      min_hidden=min_hidden).double().eval()
    bns = [bn for _, bn in module.paths] + [module.attention.bn]
    with torch.no_grad():
        for bn in bns:
            bn.running_mean.normal_(0, 0.3)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_(0, 0.3)
        module.attention.reduce.weight.normal_(0, 2.0)
        module.attention.bn.bias[0] = 3.0  # hidden unit 0 survives the ReLU for every sample (no vacuous grads)
        module.attention.select.weight.normal_(0, 2.0)
    return module


def _input(batch, channels, size=7, seed=3):
    return torch.randn(batch, channels, size, size, dtype=torch.float64,
                       generator=torch.Generator().manual_seed(seed)) + 0.5


GROUPINGS = {"g1": (4, 6, 1), "g2": (4, 6, 2), "depthwise": (4, 4, 4)}
CASES = [*itertools.product([1, 2], ["g1", "depthwise"], [1, 3], [(1, 2)]), (1, "g2", 3, (1, 2, 3)),
         (2, "depthwise", 3, (1, 2, 3))]


@pytest.mark.parametrize(("stride", "grouping", "batch", "dilations"), CASES,
                         ids=[f"s{s}-{g}-b{b}-m{len(d)}" for s, g, b, d in CASES])
def test_matches_per_sample_reference(stride, grouping, batch, dilations):
    """Output and every gradient (input, path convs + BNs, attention W, BN, A) equal the paper's equations
    applied one sample at a time, to 1e-10 in float64 (eval mode: the BNs use running statistics)."""
    in_ch, out_ch, groups = GROUPINGS[grouping]
    module = _make(in_ch, out_ch, stride, groups, dilations)
    x = _input(batch, in_ch).requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    names, params = zip(*module.named_parameters())
    assert len(names) == 3 * len(dilations) + 4
    assert_matches_reference(module(x), per_sample(x_ref, module, stride, groups), x, x_ref, names, params)


def test_two_paths_written_as_the_paper_writes_them():
    """One small tensor, M = 2 in the paper's own form: the "5x5" path is a 5x5 kernel holding the 3x3 taps
    two apart, and per channel a_c = e^{A_c z} / (e^{A_c z} + e^{B_c z}), b_c = 1 - a_c, V_c = a_c U~_c + b_c U^_c."""
    module = _make(3, 3, 1, 3)  # depthwise, as in ShuffleNetV2
    with torch.no_grad():
        module.attention.select.weight.mul_(0.1)  # keep the selection away from saturation (see the last line)
    x = _input(1, 3, 6)
    (conv3, bn3), (conv5, bn5) = module.paths
    kernel5 = torch.zeros(3, 1, 5, 5, dtype=torch.float64)
    kernel5[:, :, ::2, ::2] = conv5.weight  # dilation 2 == a sparse 5x5
    u3 = _bn(F.conv2d(x, conv3.weight, padding=1, groups=3), bn3, False, None)
    u5 = _bn(F.conv2d(x, kernel5, padding=2, groups=3), bn5, False, None)
    att = module.attention
    s = (u3 + u5).mean(dim=(2, 3))[0]
    z = torch.relu(_bn((att.reduce.weight @ s)[None], att.bn, False, None)[0])
    A, B = att.select.weight[:3], att.select.weight[3:]
    a = torch.exp(A @ z) / (torch.exp(A @ z) + torch.exp(B @ z))
    v = a[:, None, None] * u3[0] + (1 - a)[:, None, None] * u5[0]
    torch.testing.assert_close(module(x)[0], v, **TOL)
    assert 0.05 < a.min() and a.max() < 0.95  # a genuine mixture, not one path selected


def test_attention_differs_between_samples_and_channels():
    """Sanity of the references: the selection is per sample and per channel, and sums to 1 over the paths."""
    module = _make(4, 6, 1, 1)
    paths = [path(_input(2, 4)) for path in module.paths]
    a = module.attention(sum(paths))
    assert a.shape == (2, 2, 6)
    assert not torch.allclose(a[0], a[1]) and not torch.allclose(a[0, 0, 0], a[0, 0, 1])
    torch.testing.assert_close(a.sum(1), torch.ones(2, 6, dtype=torch.float64))


def test_train_mode_matches_reference_with_batch_statistics():
    """Train mode, batch of 3: every BN (paths and attention) uses the batch statistics and updates its running ones."""
    module = _make(4, 6, 2, 1).train()
    running = [m.running_mean.clone() for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    x = _input(3, 4)
    torch.testing.assert_close(module(x), reference_sk(x, module, 2, 1, batch_statistics=True), **TOL)
    after = [m.running_mean for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert all(not torch.equal(a, b) for a, b in zip(after, running))


def test_train_mode_batch_one():
    """Batch 1 in train mode trains (nn.BatchNorm1d raises on one sample): the paths' BN2d have H x W values
    per channel, the attention's BatchSafeBatchNorm1d normalises with its running statistics, untouched."""
    with pytest.raises(ValueError):
        nn.BatchNorm1d(4).train()(torch.randn(1, 4))
    module = _make(4, 6, 2, 1).train()
    stats = (module.attention.bn.running_mean.clone(), module.attention.bn.running_var.clone())
    x = _input(1, 4, 9)
    y = module(x)
    torch.testing.assert_close(y, reference_sk(x, module, 2, 1, batch_statistics=True), **TOL)
    y.pow(2).sum().backward()
    assert y.shape == (1, 6, 5, 5) and torch.isfinite(y).all()
    assert module.attention.select.weight.grad.abs().sum() > 0 and module.paths[1][0].weight.grad.abs().sum() > 0
    assert torch.equal(module.attention.bn.running_mean, stats[0])
    assert torch.equal(module.attention.bn.running_var, stats[1])


def test_channels_last():
    """channels_last in, channels_last out, same values and gradients as contiguous NCHW."""
    module = _make(4, 6, 2, 1).float()
    x = _input(2, 4, 9).float().requires_grad_(True)
    y = module(x)
    module_cl = _make(4, 6, 2, 1).float().to(memory_format=torch.channels_last)
    x_cl = x.detach().to(memory_format=torch.channels_last).requires_grad_(True)
    y_cl = module_cl(x_cl)
    assert y_cl.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y_cl, y)
    grad = torch.randn_like(y)
    (g,) = torch.autograd.grad(y, x, grad)
    (g_cl,) = torch.autograd.grad(y_cl, x_cl, grad)
    torch.testing.assert_close(g_cl, g)


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_compiles_fullgraph(train):
    """torch.compile(fullgraph=True): one graph, no breaks, forward and backward traced (aot_eager), same output."""
    import torch._dynamo

    module = _make(4, 6, 1, 1).float().train(train)
    x = torch.randn(3, 4, 8, 8)
    explanation = torch._dynamo.explain(module)(x)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    torch._dynamo.reset()
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    y = compiled(x)
    y.sum().backward()
    module.eval()  # compare in eval mode: train mode would move the running statistics between the two calls
    torch.testing.assert_close(compiled(x), module(x))


@pytest.mark.slow
def test_inductor_compile_runs():
    """The default (inductor) backend compiles with fullgraph=True and matches eager."""
    module = _make(4, 6, 1, 1).float()
    x = torch.randn(3, 4, 8, 8)
    torch.testing.assert_close(torch.compile(module, fullgraph=True)(x), module(x), rtol=1e-4, atol=1e-5)


def _layer(conv, role="conv", name="layer1.0.conv1"):
    return LayerInfo(name, conv, role, 1, "layer1.0", 0)


def test_conversion_rule():
    """k x k convolutions with role conv / depthwise become SK; 1x1 layers and the stem, head, downsample, SE
    and classifier roles stay static, each with a reason."""
    operator = make_operator(OP)
    conv3 = nn.Conv2d(32, 32, 3, padding=1, bias=False)
    for role in ("stem", "downsample", "head", "pointwise", "se", "classifier"):
        assert role in operator.refuse(_layer(conv3, role))
    assert "1x1" in operator.refuse(_layer(nn.Conv2d(32, 64, 1), "conv"))
    assert operator.refuse(_layer(nn.Linear(8, 8), "conv")) is not None
    assert operator.refuse(_layer(conv3, "conv")) is None
    assert operator.refuse(_layer(nn.Conv2d(32, 32, 5, padding=2, groups=32), "depthwise")) is None
    assert "keep_static" in make_operator({**OP, "keep_static": ["layer1.*"]}).refuse(_layer(conv3))
    built = operator.build(_layer(nn.Conv2d(32, 32, 3, stride=2, padding=1, groups=32, bias=False), "depthwise"))
    assert [tuple(p[0].dilation) for p in built.paths] == [(1, 1), (2, 2)]
    assert [p[0].groups for p in built.paths] == [32, 32] and built.paths[1][0].stride == (2, 2)
    assert built.attention.reduce.out_features == 32  # max(int(32 / 16), L = 32)
    assert operator.build(_layer(nn.Conv2d(1024, 1024, 3, padding=1))).attention.reduce.out_features == 64


GEOMETRIES = [  # (kernel, stride, padding, dilation, groups): the replaced layer
    (3, 1, 1, 1, 1), (3, 2, 1, 1, 4), (5, 2, 2, 1, 8), (3, 1, 0, 1, 1), (3, 2, 2, 2, 1), ((1, 3), 1, (0, 1), 1, 1),
    (7, 1, 3, 1, 8),
]


@pytest.mark.parametrize(("kernel", "stride", "padding", "dilation", "groups"), GEOMETRIES)
def test_every_path_keeps_the_layers_output_grid(kernel, stride, padding, dilation, groups):
    """The SK layer is a drop-in: same output shape as the convolution it replaces, for any padding/dilation,
    and its first path (dilation 1) is exactly that convolution (same weights -> same outputs before the BN)."""
    conv = nn.Conv2d(8, 8, kernel, stride, padding, dilation, groups, bias=False)
    module = make_operator({**OP, "dilations": [1, 2, 3]}).build(_layer(conv))
    x = torch.randn(2, 8, 13, 11)
    assert module(x).shape == conv(x).shape
    with torch.no_grad():
        module.paths[0][0].weight.copy_(conv.weight)
    torch.testing.assert_close(module.paths[0][0](x), conv(x))


def test_even_kernel_needs_odd_dilations():
    """A 2x2 layer: [1, 3] keeps its grid, [1, 2] cannot: OperatorConfigError naming the key, layer, shape, values."""
    conv = nn.Conv2d(8, 8, 2, padding=0, bias=False)
    x = torch.randn(1, 8, 9, 9)
    assert make_operator({**OP, "dilations": [1, 3]}).build(_layer(conv))(x).shape == conv(x).shape
    with pytest.raises(OperatorConfigError) as info:
        make_operator(OP).build(_layer(conv, name="blocks.2.conv_dw"))
    message = str(info.value)
    for part in ("op.dilations=[1, 2]", "blocks.2.conv_dw", "Conv2d(8->8, k=2x2, s=1, g=1)", "odd"):
        assert part in message


@pytest.mark.parametrize(("key", "value", "allowed"), [
    ("dilations", [1], "at least 2 distinct integers >= 1"), ("dilations", [2, 2], "at least 2 distinct"),
    ("dilations", [0, 1], "integers >= 1"), ("dilations", [1, 2.5], "integers >= 1"),
    ("dilations", [True, 2], "integers >= 1"), ("dilations", [[1], [2]], "integers >= 1"),
    ("dilations", "12", "lists of"), ("dilations", None, "lists of"),
    ("reduction", 0, "numbers > 0"), ("reduction", None, "numbers > 0"), ("reduction", float("inf"), "numbers > 0"),
    ("min_hidden", 0, "integers >= 1"), ("min_hidden", 1.5, "integers >= 1"),
])
def test_invalid_knobs_raise_operator_config_error(key, value, allowed):
    with pytest.raises(OperatorConfigError) as info:
        make_operator({**OP, key: value})
    message = str(info.value)
    assert f"op.{key}" in message and repr(value) in message and allowed in message


def test_config_file_builds_the_operator(compose_cfg):
    """`op=sk` composes and configs/op/sk.yaml holds every knob the operator reads, at SKNet's values."""
    cfg = compose_cfg(["op=sk"])
    operator = make_operator(OmegaConf.to_container(cfg.op, resolve=True))
    assert (operator.dilations, operator.reduction, operator.min_hidden) == ((1, 2), 0.0625, 32)
    assert operator.keep_static == ()


# WeightNet Table 4 (params in M, FLOPs in M) and this repository's static baselines (shufflenet.py docstring).
TABLE4 = [("shufflenetv2_wn_x0_5", 1.5, 42.0, 1_366_792), ("shufflenetv2_wn_x1_5", 3.9, 306.0, 3_503_624)]


@functools.lru_cache(maxsize=None)
def _imagenet_model(name):
    torch.manual_seed(0)
    return build_backbone({"name": name}, OP, {"name": "none"}, num_classes=1000, image_size=224)


@pytest.mark.parametrize(("name", "paper_params_m", "paper_macs_m", "static_params"), TABLE4,
                         ids=[row[0] for row in TABLE4])
def test_params_and_macs_match_weightnet_table4(name, paper_params_m, paper_macs_m, static_params):
    """ShuffleNetV2 + SK at 224 x 224, 1000 classes: within the paper's rounding (0.06M params) and 2% MACs.
    SK takes the 19 depthwise 3x3s (both branches of the downsampling units, branch2 elsewhere) and nothing else."""
    built = _imagenet_model(name)
    converted = [d.layer for d in built.decisions if d.converted]
    assert len(converted) == 19 and all(layer.role == "depthwise" for layer in converted)
    params = count_params(built.backbone)
    macs = count_macs(built.backbone, (3, 224, 224)).total
    assert params > static_params
    assert params == pytest.approx(paper_params_m * 1e6, abs=0.06e6), f"{name}: {params:,} params"
    assert macs == pytest.approx(paper_macs_m * 1e6, rel=0.02), f"{name}: {macs / 1e6:.1f}M MACs"


def _assert_training_steps(name):
    torch.manual_seed(0)
    built = build_backbone({"name": name}, OP, {"name": "none"}, num_classes=10, image_size=32)
    model = built.backbone.train()
    sk_layers = [n for n, m in model.named_modules() if isinstance(m, SKConv2d)]
    assert len(sk_layers) == sum(d.converted for d in built.decisions) > 0
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)), torch.tensor([1, 7])
    for _ in range(2):
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        assert torch.isfinite(loss)
        loss.backward()
        for pname, param in model.named_parameters():
            assert param.grad is not None and torch.isfinite(param.grad).all(), pname
        optimizer.step()
    for part in ("attention.select.weight", "attention.reduce.weight", "paths.1.0.weight"):
        moved = [n for n in sk_layers if not torch.equal(model.get_parameter(f"{n}.{part}"), before[f"{n}.{part}"])]
        assert moved, f"no SK layer's {part} changed"


@pytest.mark.parametrize("name", ["resnet18", "shufflenetv2_wn_x0_5"])
def test_training_steps(name):
    """Two SGD steps at 32 x 32: every parameter (every path, every attention) is in the graph with a finite
    gradient, and the paths and selections of SK layers move. Two, not one: timm's ResNet zero-initialises
    each block's last BN, so on the first step no gradient reaches any block convolution (SK or not)."""
    _assert_training_steps(name)
