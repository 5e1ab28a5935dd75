"""ODConv2d (Li et al., ICLR 2022) against a per-sample reference written from the paper's definition, float64."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from dynconv.build import make_operator
from dynconv.engine.hooks.operator_schedule import apply_training_progress, scheduled_modules
from dynconv.conversion import LayerInfo
from dynconv.ops.odconv import ODConv2d
from dynconv.layers.temperature import LinearTemperature

from op_checks import assert_knob_rejected, load_op_config  # noqa: E402
from reference_checks import TOL, assert_matches_reference  # noqa: E402
EPOCH = 8.5  # a mid-annealing temperature: T = 30 - 29 * 0.85 = 5.35
OP = dict(name="odconv", kernels=4, reduction=0.0625, min_hidden=16, temperature_start=30.0, temperature_end=1.0,
          temperature_epochs=10.0)


def _head(linear, h, temperature, activation):
    return None if linear is None else activation((h @ linear.weight.t() + linear.bias) / temperature)


def reference_odconv(x, module, temperature, batch_statistics=False, caf_tau=None):
    """The ODConv definition one sample at a time, all four attentions applied to the kernels (none moved to
    the feature maps):

        W_b = sum_k a_w(b)_k . a_f(b) . a_c(b) . a_s(b) . W_k,     y_b = W_b * x_b

    with the paper's attention GAP -> FC -> BN -> ReLU -> heads / T (sigmoid; softmax for a_w). The BN uses
    its running statistics, or, with `batch_statistics`, the batch's (biased variance, as training BN does).
    With `caf_tau`, a_w is KernelWarehouse's CAF (Eq. 4) on the kernel head's logits z, without T:
    tau * beta + (1 - tau) * z / (sum_k |z_k| + 1e-3), beta one-hot on the first kernel.
    """
    att = module.attention
    h = x.mean(dim=(2, 3)) @ att.fc.weight.t()
    if batch_statistics:
        mean, var = h.mean(0), h.var(0, unbiased=False)
    else:
        mean, var = att.bn.running_mean, att.bn.running_var
    h = torch.relu((h - mean) / torch.sqrt(var + att.bn.eps) * att.bn.weight + att.bn.bias)
    weight = module.weight  # (n, O, C/g, kh, kw)
    n, out_ch, in_per_group, kh, kw = weight.shape
    # Input channel seen by weight[:, o, j]: group (o // (O/g)) * C/g + j, so a_c applies to grouped kernels too.
    input_channel = (torch.arange(out_ch)[:, None] // (out_ch // module.groups)) * in_per_group + torch.arange(
        in_per_group)[None, :]
    outputs = []
    for b in range(x.shape[0]):
        a_c = _head(att.channel, h[b], temperature, torch.sigmoid)
        a_f = _head(att.filter, h[b], temperature, torch.sigmoid)
        a_s = _head(att.spatial, h[b], temperature, torch.sigmoid)
        if caf_tau is None:
            a_w = _head(att.kernel, h[b], temperature, lambda z: torch.softmax(z, dim=0))
        else:
            z = h[b] @ att.kernel.weight.t() + att.kernel.bias
            beta = torch.zeros(n, dtype=x.dtype)
            beta[0] = 1.0
            a_w = caf_tau * beta + (1 - caf_tau) * z / (z.abs().sum() + 1e-3)
        a_f = torch.ones(out_ch, dtype=x.dtype) if a_f is None else a_f  # skipped for depthwise
        a_s = torch.ones(kh * kw, dtype=x.dtype) if a_s is None else a_s  # skipped for 1 x 1
        a_w = torch.ones(1, dtype=x.dtype) if a_w is None else a_w  # skipped for n = 1
        scale = a_f[:, None, None, None] * a_c[input_channel][:, :, None, None] * a_s.view(1, 1, kh, kw)
        wb = sum(a_w[k] * scale * weight[k] for k in range(n))
        outputs.append(F.conv2d(x[b : b + 1], wb, None, module.stride, module.padding, 1, module.groups))
    return torch.cat(outputs)


def _make(in_ch, out_ch, kernel, stride, groups, kernels=3, min_hidden=4):
    torch.manual_seed(0)
    module = ODConv2d(in_ch, out_ch, (kernel, kernel), stride=stride, padding=kernel // 2, groups=groups,
                      kernels=kernels, min_hidden=min_hidden).double()
    att = module.attention
    with torch.no_grad():  # non-trivial attentions and BN statistics, different per sample
        att.fc.weight.normal_(0, 2.0)
        for head in (att.channel, att.filter, att.spatial, att.kernel):
            if head is not None:
                head.weight.normal_(0, 8.0)
                head.bias.normal_(0, 2.0)
        att.bn.running_mean.normal_(0, 0.5)
        att.bn.running_var.uniform_(0.5, 2.0)
        att.bn.weight.uniform_(0.5, 1.5)
        att.bn.bias.fill_(0.5)  # a positive shift keeps most hidden units alive through the ReLU
    att.set_training_progress(EPOCH)
    return module.eval()


def _input(batch, channels, size=7, seed=3):
    return torch.randn(batch, channels, size, size, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


GROUPINGS = {"g1": (4, 6, 1), "depthwise": (4, 4, 4)}
CASES = list(itertools.product([1, 2], sorted(GROUPINGS), [1, 3], [1, 3], [1, 3]))


def _check_against_reference(module, x, batch_statistics=False):
    x_ref = x.clone().requires_grad_(True)
    x = x.clone().requires_grad_(True)
    names = [n for n, p in module.named_parameters()]
    params = [p for n, p in module.named_parameters()]
    temperature = LinearTemperature(30.0, 1.0, 10.0)(EPOCH)
    y = module(x)
    y_ref = reference_odconv(x_ref, module, temperature, batch_statistics)
    assert_matches_reference(y, y_ref, x, x_ref, names, params)


@pytest.mark.parametrize("size", [7, 15], ids=["7x7", "15x15"])  # 15x15 outputs exceed the bmm threshold
@pytest.mark.parametrize(("stride", "grouping", "kernel", "batch", "kernels"), CASES,
                         ids=[f"s{s}-{g}-k{k}-b{b}-n{n}" for s, g, k, b, n in CASES])
def test_matches_per_sample_reference(stride, grouping, kernel, batch, kernels, size):
    """Output and the gradients of the input, kernels and every attention parameter (FC, BN affine, all heads)
    equal the ODConv definition applied per sample, to 1e-10 in float64 (BN with running statistics: eval mode)."""
    in_ch, out_ch, groups = GROUPINGS[grouping]
    module = _make(in_ch, out_ch, kernel, stride, groups, kernels)
    att = module.attention
    assert (att.filter is None) == (grouping == "depthwise")
    assert (att.spatial is None) == (kernel == 1)
    assert (att.kernel is None) == (kernels == 1)
    _check_against_reference(module, _input(batch, in_ch, size))


@pytest.mark.parametrize("grouping", sorted(GROUPINGS))
def test_train_mode_matches_reference_with_batch_statistics(grouping):
    """In train mode (batch of 3) the attention's BN uses the batch statistics, as nn.BatchNorm1d does."""
    in_ch, out_ch, groups = GROUPINGS[grouping]
    module = _make(in_ch, out_ch, 3, 1, groups, 3).train()
    running = module.attention.bn.running_mean.clone()
    _check_against_reference(module, _input(3, in_ch), batch_statistics=True)
    assert not torch.equal(module.attention.bn.running_mean, running)  # the statistics were updated


def test_train_mode_batch_one_uses_running_statistics():
    """Batch 1 in train mode works (nn.BatchNorm1d raises there, ODConv#27): it normalises with the running
    statistics, i.e. computes what eval mode computes, and leaves the statistics untouched."""
    module = _make(4, 6, 3, 2, 1, 3)
    x = _input(1, 4, 9)
    with pytest.raises(ValueError):
        nn.BatchNorm1d(4).train()(torch.randn(1, 4))
    expected = module(x)
    module.train()
    stats = [module.attention.bn.running_mean.clone(), module.attention.bn.running_var.clone()]
    y = module(x)
    torch.testing.assert_close(y, expected, **TOL)
    y.sum().backward()
    assert module.weight.grad.abs().sum() > 0 and module.attention.fc.weight.grad.abs().sum() > 0
    assert torch.equal(module.attention.bn.running_mean, stats[0])
    assert torch.equal(module.attention.bn.running_var, stats[1])


def test_attention_differs_between_samples():
    """Sanity of the reference: the attentions are per sample, so a shared kernel would fail the tests above."""
    module = _make(4, 6, 3, 1, 1, 3)
    channel, filt, spatial, kernel = module.attention(_input(2, 4))
    for a in (channel, filt, spatial, kernel):
        assert not torch.allclose(a[0], a[1])


def test_temperature_schedule_through_the_hook():
    """T = 30 at epoch 0, 15.5 at 5 (30 -> 1 over 10 epochs), 1 after; set per iteration by the schedule hook."""
    model = make_operator(OP).build(_layer(nn.Conv2d(32, 64, 3, padding=1, bias=False)))
    modules = scheduled_modules(model)
    assert modules == [model.attention]
    assert model.attention.temperature.item() == 30.0
    for epoch, expected in [(0.0, 30.0), (2.5, 22.75), (5.0, 15.5), (10.0, 1.0), (14.2, 1.0)]:
        assert apply_training_progress(modules, epoch) == {"temperature": pytest.approx(expected)}
        assert model.attention.temperature.item() == pytest.approx(expected)
    # A buffer, not a parameter, saved in the state_dict (a restored model keeps its trained temperature).
    assert all("temperature" not in name for name, _ in model.named_parameters())
    assert model.state_dict()["attention.temperature"].item() == 1.0
    model.attention.set_training_progress(0.0)
    model.load_state_dict({**model.state_dict(), "attention.temperature": torch.tensor(1.0)})
    assert model.attention.temperature.item() == 1.0


@pytest.mark.parametrize("kernel", [1, 3])
def test_single_kernel_with_saturated_attention_is_a_conv2d(kernel):
    """n = 1 and every sigmoid saturated at 1 (zero head weights, bias 50, T = 1: sigmoid = 1.0 in float64) is
    exactly nn.Conv2d with that kernel: ODConv reduces to the static convolution it replaces."""
    module = _make(4, 6, kernel, 2, 1, kernels=1)
    att = module.attention
    with torch.no_grad():
        for head in (att.channel, att.filter, att.spatial):
            if head is not None:
                head.weight.zero_()
                head.bias.fill_(50.0)
    att.set_training_progress(10.0)
    conv = nn.Conv2d(4, 6, kernel, stride=2, padding=kernel // 2, bias=False).double()
    with torch.no_grad():
        conv.weight.copy_(module.weight[0])
    x = _input(3, 4, 11)
    torch.testing.assert_close(module(x), conv(x), rtol=0.0, atol=1e-12)


def _layer(conv, role="conv", name="layer1.0.conv1"):
    return LayerInfo(name, conv, role, 1, "layer1.0", 0)


def test_conversion_rule():
    """Static: stem, ResNet downsample shortcuts (as the reference), convolutions with bias (ODConv has none).
    Converted: everything else, MobileNetV2's conv_head ("head") and depthwise convolutions included."""
    operator = make_operator(OP)
    conv = nn.Conv2d(32, 64, 1, bias=False)
    for role in ("stem", "downsample", "se", "classifier"):
        assert operator.refuse(_layer(conv, role)) is not None, role
    for role in ("conv", "pointwise", "depthwise", "head"):
        assert operator.refuse(_layer(conv, role)) is None, role
    assert "bias" in operator.refuse(_layer(nn.Conv2d(32, 64, 1, bias=True)))
    built = operator.build(_layer(nn.Conv2d(32, 32, 3, padding=1, groups=32, bias=False), "depthwise"))
    assert built.attention.filter is None and built.attention.fc.out_features == 16  # max(int(32/16), 16)


@pytest.mark.parametrize(("key", "value", "allowed"), [
    ("kernels", 0, "integers >= 1"), ("kernels", "4", "integers >= 1"), ("min_hidden", 0, "integers >= 1"),
    ("min_hidden", 1.5, "integers >= 1"), ("reduction", 0.0, "numbers > 0"), ("reduction", None, "numbers > 0"),
    ("temperature_start", -30, "numbers > 0"), ("temperature_end", 0, "numbers > 0"),
    ("temperature_epochs", -0.5, "numbers >= 0"),
])
def test_invalid_knobs_raise_operator_config_error(key, value, allowed):
    assert_knob_rejected(OP, key, value, allowed)


def test_config_file_builds_the_operator():
    """configs/op/odconv.yaml holds every knob the operator reads, with valid defaults (ODConv 1x)."""
    operator = make_operator(load_op_config("odconv"))
    assert (operator.kernels, operator.reduction, operator.min_hidden) == (1, 0.0625, 16)
    assert operator.schedule == LinearTemperature(30.0, 1.0, 10.0)


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_compiles_without_graph_breaks_or_recompiles(train):
    """torch.compile: one graph, no breaks; changing the temperature (in-place buffer) does not recompile."""
    import torch._dynamo
    from torch._dynamo.testing import CompileCounter

    module = _make(4, 6, 3, 1, 1, 3).float().train(train)
    x = torch.randn(3, 4, 8, 8)
    explanation = torch._dynamo.explain(module)(x)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    torch._dynamo.reset()
    counter = CompileCounter()
    compiled = torch.compile(module, backend=counter)
    for epoch in (0.0, 3.0, 12.0):
        module.attention.set_training_progress(epoch)
        if train:
            compiled(x)
        else:
            torch.testing.assert_close(compiled(x), module(x))
    assert counter.frame_count == 1


# ---------------------------------------------------------------------------------------------- CAF (KW Table 10)
CAF_OP = {**OP, "attention_function": "caf", "tau_epochs": 10}
TAU = 0.15  # tau at epoch 8.5 of 10: both terms of Eq. 4 take part
CAF_CASES = list(itertools.product([1, 2], sorted(GROUPINGS), [1, 3], [1, 3], [2, 3]))


def _make_caf(in_ch, out_ch, kernel, stride, groups, kernels):
    from dynconv.layers.contrasting_attention import LinearTau

    module = _make(in_ch, out_ch, kernel, stride, groups, kernels)  # softmax module: the same parameters
    caf = ODConv2d(in_ch, out_ch, (kernel, kernel), stride=stride, padding=kernel // 2, groups=groups,
                   kernels=kernels, min_hidden=4, caf=LinearTau(10.0)).double()
    caf.load_state_dict(module.state_dict(), strict=False)
    caf.attention.set_training_progress(EPOCH)
    caf.attention.kernel_caf.set_training_progress(EPOCH)
    return caf.eval()


@pytest.mark.parametrize(("stride", "grouping", "kernel", "batch", "kernels"), CAF_CASES,
                         ids=[f"s{s}-{g}-k{k}-b{b}-n{n}" for s, g, k, b, n in CAF_CASES])
def test_caf_matches_per_sample_reference(stride, grouping, kernel, batch, kernels):
    """op.attention_function=caf: a_w by Eq. 4, the other three attentions unchanged (sigmoid / T); output and
    every gradient equal the per-sample loop to 1e-10 in float64."""
    in_ch, out_ch, groups = GROUPINGS[grouping]
    module = _make_caf(in_ch, out_ch, kernel, stride, groups, kernels)
    assert module.attention.kernel_caf.tau.item() == pytest.approx(TAU, abs=1e-12)
    x = _input(batch, in_ch)
    x_ref = x.clone().requires_grad_(True)
    x = x.clone().requires_grad_(True)
    names = [n for n, p in module.named_parameters()]
    params = [p for n, p in module.named_parameters()]
    y_ref = reference_odconv(x_ref, module, LinearTemperature(30.0, 1.0, 10.0)(EPOCH), caf_tau=TAU)
    assert_matches_reference(module(x), y_ref, x, x_ref, names, params)


def test_caf_schedules_tau_beside_the_temperature():
    """Under CAF the hook sets tau (1 -> 0 over op.tau_epochs) for a_w and T (30 -> 1) for the sigmoids; both
    are checkpointed buffers."""
    model = make_operator(CAF_OP).build(_layer(nn.Conv2d(32, 64, 3, padding=1, bias=False)))
    modules = scheduled_modules(model)
    assert set(map(id, modules)) == {id(model.attention), id(model.attention.kernel_caf)}
    assert apply_training_progress(modules, 2.5) == {"temperature": pytest.approx(22.75), "caf_tau": 0.75}
    assert apply_training_progress(modules, 12.0) == {"temperature": 1.0, "caf_tau": 0.0}
    assert {"attention.temperature", "attention.kernel_caf.tau"} <= set(model.state_dict())


def test_caf_knobs():
    """softmax is the default; caf needs n >= 2 (n = 1 has no kernel head to apply it to); bad values name the key."""
    assert make_operator(OP).attention_function == "softmax"
    shipped = load_op_config("odconv")
    assert (shipped["attention_function"], shipped["tau_epochs"]) == ("softmax", 10)
    assert_knob_rejected(OP, "attention_function", "sigmoid", "softmax, caf")
    assert_knob_rejected(CAF_OP, "tau_epochs", -1, "numbers >= 0")
    assert_knob_rejected(CAF_OP, "kernels", 1, "integers >= 2 with op.attention_function=caf")
