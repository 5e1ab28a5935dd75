"""DyConv2d (DY-Conv, Chen et al. 2020) against a per-sample reference written from the paper's equations."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from dynconv.build import make_operator
from dynconv.engine.hooks.operator_schedule import apply_training_progress, scheduled_modules
from dynconv.ops.dyconv import DyConv2d
from dynconv.functional import mixture_conv2d
from dynconv.layers.temperature import LinearTemperature

from op_checks import assert_knob_rejected, load_op_config  # noqa: E402
from reference_checks import assert_matches_reference  # noqa: E402
EPOCH = 8.5  # a mid-annealing temperature: T = 30 - 29 * 0.85 = 5.35
OP = dict(name="dyconv", kernels=4, reduction=0.25, temperature_start=30.0, temperature_end=1.0,
          temperature_epochs=10.0)


def reference_dyconv(x, weight, bias, fc1, fc2_weight, fc2_bias, temperature, stride, padding, groups):
    """The paper, one sample at a time: pi = softmax(FC2(ReLU(FC1(GAP(x_b)))) / T),
    W_b = sum_k pi_k W_k, b_b = sum_k pi_k b_k, y_b = W_b * x_b + b_b (the paper's Sec. 3 definition)."""
    outputs = []
    for b in range(x.shape[0]):
        xb = x[b : b + 1]
        z = torch.relu(xb.mean(dim=(2, 3))[0] @ fc1.t()) @ fc2_weight.t() + fc2_bias
        pi = torch.softmax(z / temperature, dim=0)
        wb = sum(pi[k] * weight[k] for k in range(weight.shape[0]))
        bb = None if bias is None else sum(pi[k] * bias[k] for k in range(bias.shape[0]))
        outputs.append(F.conv2d(xb, wb, bb, stride, padding, 1, groups))
    return torch.cat(outputs)


def _make(in_ch, out_ch, kernel, stride, groups, bias, kernels=3):
    torch.manual_seed(0)
    module = DyConv2d(in_ch, out_ch, (kernel, kernel), stride=stride, padding=kernel // 2, groups=groups,
                      bias=bias, kernels=kernels).double()
    with torch.no_grad():  # spread the logits so the attention differs between kernels and samples
        module.attention.fc1.weight.normal_(0, 2.0)
        # With the inputs' positive mean (see _input), hidden unit 0 is active for every sample (its gradient
        # is then never vacuous), the others may be cut by the ReLU.
        module.attention.fc1.weight[0].abs_()
        module.attention.fc2.weight.normal_(0, 4.0)
        module.attention.fc2.bias.normal_(0, 1.0)
    module.attention.set_training_progress(EPOCH)
    return module


GROUPINGS = {"g1": (4, 6, 1), "depthwise": (4, 4, 4)}
CASES = list(itertools.product([1, 2], sorted(GROUPINGS), [1, 3], [1, 3], [True, False]))
PARAMS = ["weight", "attention.fc1.weight", "attention.fc2.weight", "attention.fc2.bias"]


def _input(batch, channels, size=7, seed=3):
    return torch.randn(batch, channels, size, size, dtype=torch.float64,
                       generator=torch.Generator().manual_seed(seed)) + 0.5


def _forward(module, x, mode):
    if mode == "module":
        return module(x)
    return mixture_conv2d(x, module.weight, module.attention(x), module.bias, module.stride, module.padding,
                          module.dilation, module.groups, mode=mode)


@pytest.mark.parametrize("mode", ["module", "kernels", "outputs"])
@pytest.mark.parametrize(("stride", "grouping", "kernel", "batch", "bias"), CASES,
                         ids=[f"s{s}-{g}-k{k}-b{b}-{'bias' if bb else 'nobias'}" for s, g, k, b, bb in CASES])
def test_matches_per_sample_reference(stride, grouping, kernel, batch, bias, mode):
    """Output and every gradient (input, kernels, biases, attention FCs) equal the per-sample loop (1e-10, f64)."""
    in_ch, out_ch, groups = GROUPINGS[grouping]
    module = _make(in_ch, out_ch, kernel, stride, groups, bias)
    x = _input(batch, in_ch)
    x_ref = x.clone().requires_grad_(True)
    x.requires_grad_(True)
    names = PARAMS + (["bias"] if bias else [])
    params = [module.get_parameter(n) for n in names]
    temperature = LinearTemperature(30.0, 1.0, 10.0)(EPOCH)
    assert module.attention.temperature.item() == pytest.approx(temperature, abs=1e-12)
    y = _forward(module, x, mode)
    att = module.attention
    y_ref = reference_dyconv(x_ref, module.weight, module.bias, att.fc1.weight, att.fc2.weight, att.fc2.bias,
                             temperature, module.stride, module.padding, module.groups)
    assert_matches_reference(y, y_ref, x, x_ref, names, params)


def test_attention_differs_between_samples():
    """Sanity of the reference: the attention is per sample, so one shared kernel would fail the tests above."""
    module = _make(4, 6, 3, 1, 1, False)
    pi = module.attention(_input(2, 4))
    assert not torch.allclose(pi[0], pi[1])
    torch.testing.assert_close(pi.sum(1), torch.ones(2, dtype=torch.float64))


def test_train_mode_batch_one():
    """No BatchNorm in the attention: a batch of one trains (forward + backward) in train mode."""
    module = _make(4, 6, 3, 2, 1, True).train()
    y = module(_input(1, 4, 9))
    y.sum().backward()
    assert y.shape == (1, 6, 5, 5) and torch.isfinite(y).all()
    assert module.weight.grad.abs().sum() > 0 and module.attention.fc1.weight.grad.abs().sum() > 0


def test_temperature_schedule_through_the_hook():
    """T = 30 at epoch 0, 15.5 at 5 (30 -> 1 over 10 epochs), 1 after; set per iteration by the schedule hook."""
    model = make_operator(OP).build(_layer(nn.Conv2d(4, 6, 3, padding=1, bias=False)))
    modules = scheduled_modules(model)
    assert modules == [model.attention]
    assert model.attention.temperature.item() == 30.0  # before any progress: the start value
    for epoch, expected in [(0.0, 30.0), (2.5, 22.75), (5.0, 15.5), (10.0, 1.0), (14.2, 1.0)]:
        assert apply_training_progress(modules, epoch) == {"temperature": pytest.approx(expected)}
        assert model.attention.temperature.item() == pytest.approx(expected)
    _check_temperature_is_a_checkpointed_buffer(model)


def _check_temperature_is_a_checkpointed_buffer(model):
    """A buffer, not a parameter, saved in the state_dict: a model restored for evaluation gets the trained
    temperature, not the epoch-0 one (the schedule hook only runs before training steps)."""
    assert all("temperature" not in name for name, _ in model.named_parameters())
    assert model.state_dict()["attention.temperature"].item() == 1.0
    model.attention.set_training_progress(0.0)
    assert model.attention.temperature.item() == 30.0
    model.load_state_dict({**model.state_dict(), "attention.temperature": torch.tensor(1.0)})
    assert model.attention.temperature.item() == 1.0


def test_single_kernel_is_a_conv2d():
    """K = 1: softmax over one logit is exactly 1, so DY-Conv reduces to nn.Conv2d with that kernel and bias."""
    module = _make(4, 6, 3, 2, 1, True, kernels=1)
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1).double()
    with torch.no_grad():
        conv.weight.copy_(module.weight[0])
        conv.bias.copy_(module.bias[0])
    x = torch.randn(3, 4, 11, 11, dtype=torch.float64)
    assert torch.equal(module.attention(x), torch.ones(3, 1, dtype=torch.float64))
    torch.testing.assert_close(module(x), conv(x), rtol=0.0, atol=1e-12)


def test_bias_and_kernels_initialised():
    """Biases are initialised (uniform within the nn.Conv2d bound 1/sqrt(fan_in)); each kernel like nn.Conv2d (the
    `pytorch` initialisation; the default, the release's, zeroes the biases: tests/test_initialisation.py)."""
    module = DyConv2d(16, 32, (3, 3), padding=1, bias=True, kernels=4, weight_init="pytorch")
    bound = 1.0 / math.sqrt(16 * 9)
    assert torch.isfinite(module.bias).all()
    assert module.bias.std() > 0.1 * bound and module.bias.abs().max() <= bound
    for k in range(4):  # kaiming-uniform(a=sqrt(5)) has the same bound as the bias
        assert module.weight[k].abs().max() <= bound and module.weight[k].std() > 0.3 * bound
    assert not torch.equal(module.weight[0], module.weight[1])


def _layer(conv, role="conv"):
    from dynconv.conversion import LayerInfo

    return LayerInfo("layer1.0.conv1", conv, role, 1, "layer1.0", 0)


def test_operator_builds_from_a_conv_with_bias():
    conv = nn.Conv2d(8, 12, 3, stride=2, padding=1, groups=2, bias=True)
    module = make_operator(OP).build(_layer(conv))
    assert module.weight.shape == (4, 12, 4, 3, 3) and module.bias.shape == (4, 12)
    assert module.attention.fc1.out_features == int(8 * 0.25) + 1
    assert module(torch.randn(2, 8, 9, 9)).shape == conv(torch.randn(2, 8, 9, 9)).shape


@pytest.mark.parametrize(("key", "value", "allowed"), [
    ("kernels", 0, "integers >= 1"), ("kernels", 2.5, "integers >= 1"), ("kernels", True, "integers >= 1"),
    ("kernels", None, "integers >= 1"), ("reduction", 0, "numbers > 0"), ("reduction", "a", "numbers > 0"),
    ("temperature_start", 0.0, "numbers > 0"), ("temperature_end", -1.0, "numbers > 0"),
    ("temperature_start", float("nan"), "numbers > 0"), ("temperature_epochs", -1, "numbers >= 0"),
])
def test_invalid_knobs_raise_operator_config_error(key, value, allowed):
    assert_knob_rejected(OP, key, value, allowed)


def test_config_file_builds_the_operator():
    """configs/op/dyconv.yaml holds every knob the operator reads, with valid defaults."""
    operator = make_operator(load_op_config("dyconv"))
    assert (operator.kernels, operator.schedule) == (4, LinearTemperature(30.0, 1.0, 10.0))


def test_compiles_without_graph_breaks_or_recompiles():
    """torch.compile: one graph, no breaks, and changing the temperature (in-place buffer) does not recompile."""
    import torch._dynamo
    from torch._dynamo.testing import CompileCounter

    module = _make(4, 6, 3, 1, 1, True).float()
    x = torch.randn(3, 4, 8, 8)
    explanation = torch._dynamo.explain(module)(x)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    torch._dynamo.reset()
    counter = CompileCounter()
    compiled = torch.compile(module, backend=counter)
    for epoch in (0.0, 3.0, 12.0):
        module.attention.set_training_progress(epoch)
        torch.testing.assert_close(compiled(x), module(x))
    assert counter.frame_count == 1


@pytest.mark.slow
def test_inductor_compile_runs():
    """The default (inductor) backend compiles and matches eager."""
    module = _make(4, 6, 3, 1, 1, True).float()
    x = torch.randn(3, 4, 8, 8)
    torch.testing.assert_close(torch.compile(module)(x), module(x), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------- CAF (KW Table 10)
CAF_OP = {**OP, "attention_function": "caf", "tau_epochs": 10}
TAU = 0.15  # tau at epoch 8.5 of 10: both terms of Eq. 4 take part


def reference_caf_dyconv(x, module, tau):
    """KernelWarehouse Eq. 4 in place of the softmax, one sample at a time: z = FC2(ReLU(FC1(GAP(x_b)))),
    pi = tau * beta + (1 - tau) * z / (sum_k |z_k| + 1e-3), beta one-hot on the first kernel;
    W_b = sum_k pi_k W_k, b_b = sum_k pi_k b_k, y_b = W_b * x_b + b_b."""
    att, outputs = module.attention, []
    beta = torch.zeros(module.kernels, dtype=x.dtype)
    beta[0] = 1.0
    for b in range(x.shape[0]):
        xb = x[b : b + 1]
        z = torch.relu(xb.mean(dim=(2, 3))[0] @ att.fc1.weight.t()) @ att.fc2.weight.t() + att.fc2.bias
        pi = tau * beta + (1 - tau) * z / (z.abs().sum() + 1e-3)
        wb = sum(pi[k] * module.weight[k] for k in range(module.kernels))
        bb = None if module.bias is None else sum(pi[k] * module.bias[k] for k in range(module.kernels))
        outputs.append(F.conv2d(xb, wb, bb, module.stride, module.padding, 1, module.groups))
    return torch.cat(outputs)


def _make_caf(in_ch, out_ch, kernel, stride, groups, bias, kernels=3):
    from dynconv.layers.contrasting_attention import LinearTau

    torch.manual_seed(0)
    module = DyConv2d(in_ch, out_ch, (kernel, kernel), stride=stride, padding=kernel // 2, groups=groups,
                      bias=bias, kernels=kernels, caf=LinearTau(10.0)).double()
    with torch.no_grad():
        module.attention.fc1.weight.normal_(0, 2.0)
        module.attention.fc1.weight[0].abs_()
        module.attention.fc2.weight.normal_(0, 4.0)
        module.attention.fc2.bias.normal_(0, 1.0)
    module.attention.caf.set_training_progress(EPOCH)
    return module


@pytest.mark.parametrize("mode", ["module", "kernels", "outputs"])
@pytest.mark.parametrize(("stride", "grouping", "kernel", "batch", "bias"), CASES,
                         ids=[f"s{s}-{g}-k{k}-b{b}-{'bias' if bb else 'nobias'}" for s, g, k, b, bb in CASES])
def test_caf_matches_per_sample_reference(stride, grouping, kernel, batch, bias, mode):
    """op.attention_function=caf: output and every gradient equal Eq. 4's per-sample loop (1e-10, float64)."""
    in_ch, out_ch, groups = GROUPINGS[grouping]
    module = _make_caf(in_ch, out_ch, kernel, stride, groups, bias)
    assert module.attention.caf.tau.item() == pytest.approx(TAU, abs=1e-12)
    x = _input(batch, in_ch)
    x_ref = x.clone().requires_grad_(True)
    x.requires_grad_(True)
    names = PARAMS + (["bias"] if bias else [])
    params = [module.get_parameter(n) for n in names]
    y = _forward(module, x, mode)
    assert_matches_reference(y, reference_caf_dyconv(x_ref, module, TAU), x, x_ref, names, params)


def test_caf_attentions_contrast_and_start_as_one_kernel():
    """CAF's attentions can be negative and do not sum to 1 (the "contrasting" term); at tau = 1 (epoch 0) they
    are beta, so the layer is nn.Conv2d with its first kernel and bias (KW Fig. 4's "standard convolutions")."""
    module = _make_caf(4, 6, 3, 2, 1, True)
    module.attention.caf.set_training_progress(20.0)  # tau = 0: the normalised logits alone
    pi = module.attention(_input(4, 4))
    assert (pi < 0).any() and not torch.allclose(pi.sum(1), torch.ones(4, dtype=torch.float64))
    assert torch.all(pi.abs().sum(1) < 1)  # |z| / (sum |z| + 1e-3)
    module.attention.caf.set_training_progress(0.0)
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1).double()
    with torch.no_grad():
        conv.weight.copy_(module.weight[0])
        conv.bias.copy_(module.bias[0])
    x = _input(3, 4, 11)
    torch.testing.assert_close(module(x), conv(x), rtol=0.0, atol=1e-12)


def test_caf_tau_schedule_replaces_the_temperature():
    """Under CAF the hook sets tau (1 -> 0 over op.tau_epochs, per iteration), a checkpointed buffer; the softmax
    temperature is gone (it would cancel in z / sum |z|)."""
    model = make_operator(CAF_OP).build(_layer(nn.Conv2d(4, 6, 3, padding=1, bias=False)))
    modules = scheduled_modules(model)
    assert not hasattr(model.attention, "temperature") and model.attention.caf in modules
    for epoch, expected in [(0.0, 1.0), (2.5, 0.75), (10.0, 0.0), (14.2, 0.0)]:
        assert apply_training_progress(modules, epoch) == {"caf_tau": pytest.approx(expected)}
    assert model.state_dict()["attention.caf.tau"].item() == 0.0


def test_caf_knobs():
    """softmax is the default (a config without the key builds the paper's DY-Conv); caf follows the recipe's
    kw_tau_epochs in configs/op/dyconv.yaml; bad values name the key and what is allowed."""
    assert make_operator(OP).attention_function == "softmax"
    shipped = load_op_config("dyconv")
    assert (shipped["attention_function"], shipped["tau_epochs"]) == ("softmax", 10)
    assert_knob_rejected(OP, "attention_function", "sigmoid", "softmax, caf")
    assert_knob_rejected(CAF_OP, "tau_epochs", -1, "numbers >= 0")
    assert_knob_rejected(CAF_OP, "kernels", 1, "integers >= 2 with op.attention_function=caf")
