"""Weight Excitation (Quader et al., ECCV 2020): MWE against Eq. 2-3 on hand-made weights, LWE against Eq. 1 written
out in float64 (1D, 2D, 3D, grouped), the operators' layer choice and knobs, training through the parametrization,
and folding: one `fold_for_inference` call leaves plain nn.Conv2d layers, the baseline's parameters, MACs and
graph, and the unfolded model's outputs in eval mode, on every registered backbone."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from dynconv.backbones import BACKBONES
from dynconv.backbones.timm_any import BY_MODEL_NAME
from dynconv.backbones.video import VIDEO_BACKBONES
from dynconv.build import build_backbone, make_operator
from dynconv.config import ConfigError, validate_model_config
from dynconv.conversion.convert import summarize
from dynconv.conversion import OperatorConfigError
from dynconv.ops.we.location import LocationExcitation
from dynconv.ops.we.magnitude import MagnitudeExcitation, magnitude_excitation
from dynconv.ops.we.standardize import standardize
from dynconv.ops.we.operator import ONE_INPUT_REASON
from dynconv.profiling import count_macs, count_params, fold_for_inference
from op_checks import assert_knob_rejected, calibrate_batch_norm, load_op_config  # noqa: E402

NO_ATTN = {"name": "none"}


def _build(backbone: str, op: dict, num_classes: int = 10, image_size: int = 32):
    return build_backbone({"name": backbone}, op, NO_ATTN, num_classes=num_classes, image_size=image_size)


# --------------------------------------------------------------------------------------------- MWE, Eq. 2-3


def test_mwe_value_and_gradient_follow_eq2_and_eq3():
    """A hand-made W: max|W| = 2, so M_A = 1.1 * 2 = 2.2 for eps_A = 0.1.

    M_A is a statistic of W that Eq. 3 treats as a constant; the implementation detaches it, so Eq. 3 holds for
    every element, the largest one included (it would not if the gradient also flowed through max|W|)."""
    w = torch.tensor([[0.5, -1.0, 0.0], [0.25, 2.0, -1.5]], dtype=torch.float64, requires_grad=True)
    upstream = torch.tensor([[1.0, -2.0, 0.5], [3.0, 1.0, -1.0]], dtype=torch.float64)
    m_a = 2.2
    out = magnitude_excitation(w, 0.1)
    expected = m_a * 0.5 * torch.log((1 + w.detach() / m_a) / (1 - w.detach() / m_a))  # Eq. 2
    torch.testing.assert_close(out, expected)
    out.backward(upstream)
    gain = m_a**2 / (m_a**2 - w.detach() ** 2)  # Eq. 3
    torch.testing.assert_close(w.grad, gain * upstream)
    assert w.grad[0, 2] == upstream[0, 2]  # gain 1 at w = 0 (Sec. 3.3)


def test_mwe_largest_gain_is_5_76_for_eps_0_1():
    """Sec. 3.3: the gain M_A^2 / (M_A^2 - w^2) peaks at the largest |w|: 5.76 for eps_A = 0.1."""
    w = torch.tensor([0.3, -0.7, 1.0], requires_grad=True)
    magnitude_excitation(w, 0.1).sum().backward()
    assert w.grad[2].item() == pytest.approx(1.21 / 0.21, rel=1e-5) and round(w.grad[2].item(), 2) == 5.76


def test_mwe_is_odd_monotone_and_tends_to_identity():
    w = torch.linspace(-1, 1, 11, dtype=torch.float64)
    for eps in (1e-3, 0.1, 0.2):
        out = magnitude_excitation(w, eps)
        torch.testing.assert_close(out, -magnitude_excitation(-w, eps))
        assert (out.diff() > 0).all() and (out.abs() >= w.abs()).all()
    torch.testing.assert_close(magnitude_excitation(w, 1e4), w, rtol=1e-6, atol=1e-7)


def test_mwe_of_a_zero_weight_is_zero_not_nan():
    zero = torch.zeros(4, 3, 3, 3, requires_grad=True)
    out = MagnitudeExcitation(0.1, standardize=False)(zero)
    out.sum().backward()
    assert torch.equal(out, torch.zeros_like(out)) and torch.isfinite(zero.grad).all()


# --------------------------------------------------------------------------------------------- LWE, Eq. 1


def reference_lwe(weight: torch.Tensor, module: LocationExcitation) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 1 written out output channel by output channel (float64): standardise W_j, average every kernel,
    m_j = sigmoid(FC_2(ReLU(FC_1(.)))), replicate m_j over the kernel and multiply. Returns (W_LWE, m)."""
    rows, maps = [], []
    for w_j in weight:
        if module.standardize:
            w_j = (w_j - w_j.mean()) / torch.sqrt(w_j.var(unbiased=False) + 1e-5)
        pooled = w_j.reshape(w_j.shape[0], -1).mean(dim=1)  # Avg over (t x) h x w: one value per input channel
        hidden = torch.relu(pooled @ module.fc1.weight.t() + module.fc1.bias)
        m_j = torch.sigmoid(hidden @ module.fc2.weight.t() + module.fc2.bias)
        maps.append(m_j)
        rows.append(m_j.view(-1, *(1,) * (w_j.dim() - 1)) * w_j)
    return torch.stack(rows), torch.stack(maps)


LWE_SHAPES = {  # name: (conv, In of the weight)
    "conv1d-k5": (lambda: nn.Conv1d(12, 6, 5), 12),
    "conv2d-k3": (lambda: nn.Conv2d(24, 10, 3), 24),
    "conv2d-1x1": (lambda: nn.Conv2d(40, 16, 1), 40),
    "conv2d-grouped": (lambda: nn.Conv2d(32, 16, 3, groups=4), 8),
    "conv3d-k3": (lambda: nn.Conv3d(8, 4, 3), 8),
}


@pytest.mark.parametrize("standardize_input", [True, False])
@pytest.mark.parametrize("case", sorted(LWE_SHAPES))
def test_lwe_matches_eq1_and_its_map_is_out_by_in(case, standardize_input):
    torch.manual_seed(0)
    make, fan_in = LWE_SHAPES[case]
    conv = make().double()
    module = LocationExcitation(fan_in, 5, standardize_input).double()
    with torch.no_grad():  # spread the map away from sigmoid(0) so a wrong broadcast would show
        module.fc2.weight.mul_(8.0)
    expected, expected_map = reference_lwe(conv.weight, module)
    m = module.multiplier(conv.weight)
    assert m.shape == (conv.out_channels, fan_in)  # Out x In (per group for a grouped convolution)
    assert ((m > 0) & (m < 1)).all() and m.std() > 0.05
    torch.testing.assert_close(m, expected_map)
    torch.testing.assert_close(module(conv.weight), expected)


@pytest.mark.parametrize("standardize_input", [True, False])
@pytest.mark.parametrize("shape", [(6, 5, 3, 3), (4, 7, 1, 1), (3, 4, 5), (2, 3, 2, 2, 2), (5, 1, 3, 3)],
                         ids=["3x3", "1x1", "conv1d", "conv3d", "one-input"])
def test_lwe_backward_equals_autograd_through_eq1(shape, standardize_input):
    """The hand-written backward (dynconv/ops/we/location.py) against autograd through the literal Eq. 1 above,
    and against finite differences (gradcheck), for the weight and both FCs."""
    from dynconv.ops.we.location import _LocationExcitation

    torch.manual_seed(0)
    weight = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    module = LocationExcitation(shape[1], 3, standardize_input).double()
    with torch.no_grad():
        module.fc2.weight.mul_(5.0)
    params = [module.fc1.weight, module.fc1.bias, module.fc2.weight, module.fc2.bias]
    upstream = torch.randn(shape, dtype=torch.float64)
    actual = torch.autograd.grad((module(weight) * upstream).sum(), [weight, *params])
    expected = torch.autograd.grad((reference_lwe(weight, module)[0] * upstream).sum(), [weight, *params])
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e)
    assert torch.autograd.gradcheck(lambda w, *p: _LocationExcitation.apply(w, *p, standardize_input),
                                    (weight, *params))


def test_lwe_gradients_reach_the_weight_and_the_subnetwork():
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 8, 3, padding=1)
    parametrize.register_parametrization(conv, "weight", LocationExcitation(16, 8, True))
    conv(torch.randn(2, 16, 6, 6)).square().sum().backward()
    excitation = conv.parametrizations.weight[0]
    for tensor in (conv.parametrizations.weight.original, excitation.fc1.weight, excitation.fc2.bias):
        assert tensor.grad is not None and tensor.grad.abs().sum() > 0


def test_standardize_gives_zero_mean_unit_variance_per_output_channel():
    w = torch.randn(6, 4, 3, 3, dtype=torch.float64) * 0.05 + 0.3
    n = standardize(w)
    torch.testing.assert_close(n.mean(dim=(1, 2, 3)), torch.zeros(6, dtype=torch.float64))
    torch.testing.assert_close(n.var(dim=(1, 2, 3), unbiased=False), torch.ones(6, dtype=torch.float64),
                               rtol=1e-2, atol=0)


def test_lwe_traces_under_torch_compile():
    """The hand-written backward keeps no autograd graph of its own, so torch.compile (recipe.compile) traces it:
    same outputs and gradients as eager (aot_eager: the traced graphs, without the C++ compile)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 16, 1))
    for conv in (model[0], model[3]):
        parametrize.register_parametrization(conv, "weight", LocationExcitation(conv.weight.shape[1], 4, True))
    x = torch.randn(2, 8, 6, 6)
    expected = model(x)
    expected.square().sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    actual = torch.compile(model, backend="aot_eager")(x)
    actual.square().sum().backward()
    torch.testing.assert_close(actual, expected)
    for p, g in zip(model.parameters(), grads):
        torch.testing.assert_close(p.grad, g)


@pytest.mark.parametrize("conv", [nn.Conv1d(6, 4, 3), nn.Conv3d(6, 4, 3)], ids=["conv1d", "conv3d"])
def test_1d_and_3d_convolutions_fold_like_2d(conv):
    """The parametrization works on any convolution weight (Sec. 3.2: Avg over w, t x h x w)."""
    torch.manual_seed(0)
    x = torch.randn((2, 6) + (5,) * (conv.weight.dim() - 2))
    parametrize.register_parametrization(conv, "weight", LocationExcitation(6, 2, True))
    y = conv(x)
    parametrize.remove_parametrizations(conv, "weight", leave_parametrized=True)
    assert not parametrize.is_parametrized(conv)
    torch.testing.assert_close(conv(x), y, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------- operators and knobs


def _excitation(module: nn.Module):
    return module.parametrizations.weight[0] if parametrize.is_parametrized(module, "weight") else None


def test_lwe_excites_every_convolution_of_resnet18_but_not_the_classifier():
    with torch.device("meta"):
        built = _build("resnet18", load_op_config("lwe"))
    converted = [d.layer.name for d in built.decisions if d.converted]
    assert len(converted) == 20 and {"conv1", "layer2.0.downsample.0", "layer4.1.conv2"} <= set(converted)
    assert [d.layer.name for d in built.decisions if not d.converted] == ["fc"]
    layer = built.backbone.net.layer3[0].conv2  # Conv2d(256 -> 256, 3x3)
    excitation = _excitation(layer)
    assert isinstance(excitation, LocationExcitation) and excitation.standardize
    assert excitation.fc1.in_features == 256 and excitation.fc1.out_features == 16  # In // 16
    stem = _excitation(built.backbone.net.conv1)
    assert stem.fc1.out_features == 8  # max(3 // 16, min_hidden)


def test_lwe_leaves_depthwise_static_and_says_so_once():
    with torch.device("meta"):
        built = _build("mobilenetv2_050", load_op_config("lwe"))
    refused = [d for d in built.decisions if d.reason == ONE_INPUT_REASON]
    assert len(refused) == 17 and all(d.layer.is_depthwise for d in refused)
    assert all(not parametrize.is_parametrized(d.layer.module) for d in refused)
    summary = summarize(built.decisions)
    assert summary.count("one input channel per group") == 1 and "static (17)" in summary


def test_lwe_strict_stops_on_a_layer_it_cannot_excite(compose_cfg):
    op = {**load_op_config("lwe"), "strict": True}
    with pytest.raises(OperatorConfigError) as info, torch.device("meta"):
        _build("mobilenetv2_050", op)
    message = str(info.value)
    assert "op.strict=true" in message and "blocks.0.0.conv_dw" in message and "op=we" in message
    with torch.device("meta"):
        _build("resnet18", op)  # nothing to refuse: strict changes nothing
    with pytest.raises(ConfigError, match="op.strict=true"):
        validate_model_config(compose_cfg(["backbone=mobilenetv2_050", "op=lwe", "op.strict=true"]))


def test_we_puts_mwe_on_depthwise_and_lwe_elsewhere():
    with torch.device("meta"):
        built = _build("mobilenetv2_050", load_op_config("we"))
    assert all(d.converted for d in built.decisions if d.layer.is_conv)
    for decision in built.decisions:
        excitation = _excitation(decision.layer.module) if decision.converted else None
        if decision.layer.is_depthwise:
            assert isinstance(excitation, MagnitudeExcitation) and not excitation.standardize  # Sec. 4.1
        elif decision.converted:
            assert isinstance(excitation, LocationExcitation) and excitation.standardize


def test_mwe_excites_every_convolution_without_parameters():
    with torch.device("meta"):
        built = _build("resnet50", load_op_config("mwe"), num_classes=1000)
        static = _build("resnet50", {"name": "static"}, num_classes=1000)
    assert sum(d.converted for d in built.decisions) == 53
    assert count_params(built.backbone) == count_params(static.backbone)


BAD_KNOBS = [
    ("lwe", "reduction", 0, "integers >= 1"),
    ("lwe", "min_hidden", 2.5, "integers >= 1"),
    ("lwe", "standardize", "yes", "true, false"),
    ("lwe", "strict", None, "true, false"),
    ("mwe", "eps", 0, "numbers > 0"),
    ("mwe", "eps", -0.1, "numbers > 0"),
    ("we", "eps", "small", "numbers > 0"),
    ("we", "reduction", -1, "integers >= 1"),
]


@pytest.mark.parametrize(("op", "key", "value", "allowed"), BAD_KNOBS, ids=[f"{o}-{k}={v}" for o, k, v, _ in BAD_KNOBS])
def test_bad_knobs_name_the_key_and_the_allowed_values(op, key, value, allowed):
    assert_knob_rejected(load_op_config(op), key, value, allowed)


@pytest.mark.parametrize("op", ["lwe", "mwe", "we"])
def test_configs_compose_and_validate(compose_cfg, op):
    cfg = compose_cfg([f"op={op}", "backbone=mobilenetv2_050"])
    validate_model_config(cfg)
    assert make_operator(load_op_config(op)).name == op


# ------------------------------------------------------------------------------------------------ training


def test_training_steps_change_the_folded_weights():
    """SGD updates the raw weight and LWE's FCs; the folded model follows them."""
    torch.manual_seed(0)
    model = _build("resnet18", load_op_config("lwe")).backbone
    before = fold_for_inference(model).net.layer1[0].conv1.weight.clone()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    for _ in range(2):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    excitation = model.net.layer1[0].conv1.parametrizations.weight[0]
    assert excitation.fc1.weight.grad.abs().sum() > 0
    after = fold_for_inference(model).net.layer1[0].conv1.weight
    assert not torch.allclose(before, after)


def test_checkpoint_round_trip_rebuilds_the_same_model():
    """eval.py's path: rebuild from the config, load the state dict (parametrized keys), evaluate, count."""
    torch.manual_seed(0)
    trained = _build("mobilenetv2_050", load_op_config("we")).backbone.eval()
    state = trained.state_dict()
    assert "net.conv_stem.parametrizations.weight.original" in state
    torch.manual_seed(1)
    rebuilt = _build("mobilenetv2_050", load_op_config("we")).backbone.eval()
    rebuilt.load_state_dict(state)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), trained(x))
    static = _build("mobilenetv2_050", {"name": "static"}).backbone
    assert count_params(fold_for_inference(rebuilt)) == count_params(static) < count_params(rebuilt)


def test_bench_times_inference_on_the_folded_model():
    from dynconv.benchmark import inference_model

    with torch.device("meta"):
        excited = _build("resnet18", load_op_config("lwe")).backbone
        static = _build("resnet18", {"name": "static"}).backbone
    folded, was_folded = inference_model(excited)
    assert was_folded and not any(parametrize.is_parametrized(m) for m in folded.modules())
    assert parametrize.is_parametrized(excited.net.conv1)  # the training model is left alone
    excited(torch.zeros(2, 3, 32, 32, device="meta"))  # and still runs
    same, was_folded = inference_model(static)
    assert same is static and not was_folded


# ------------------------------------------------------------------------------------------------- folding

# Every backbone takes under a second here on an idle 2-core machine except these. HEAVY (20-60 s each in the full
# suite) are left out, to keep CI under its 30 minutes: their layer kinds are resnet50's and resnext50_32x4d's,
# which stay. convnext_tiny (2-3 s) is `slow`.
HEAVY = {"resnet152", "wide_resnet50_2", "resnext29_16x64d"}
SLOW = {"convnext_tiny"}
VIDEO = set(VIDEO_BACKBONES)  # clips, not images: tests/test_video_conv3d.py folds R3D-18 and TSM-ResNet18
# backbone=timm needs backbone.model (tests/test_convert_any.py trains op=we on four such networks).
NAMED = set(BY_MODEL_NAME)


def _structure(model: nn.Module) -> dict[str, tuple]:
    return {name: type(module) for name, module in model.named_modules()}


@pytest.mark.parametrize("backbone", [pytest.param(name, marks=[pytest.mark.slow] if name in SLOW else [])
                                      for name in BACKBONES.names() if name not in HEAVY | VIDEO | NAMED])
def test_folding_gives_the_baseline_model_with_the_same_outputs(backbone):
    """op=we (LWE on regular convolutions, MWE on depthwise ones): after one fold_for_inference call the model
    is the static baseline (plain nn.Conv2d, same state-dict keys and shapes, parameters, MACs and module
    graph) and reproduces the unfolded model's eval-mode outputs to 1e-5."""
    torch.manual_seed(0)
    built = _build(backbone, load_op_config("we"))
    model = built.backbone
    assert sum(d.converted for d in built.decisions) > 0
    x = torch.randn(4, 3, 32, 32)
    calibrate_batch_norm(model, x)
    with torch.no_grad():
        expected = model(x)
    folded = fold_for_inference(model)
    with torch.no_grad():
        actual = folded(x)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    assert math.isfinite(expected.abs().max().item())

    static = _build(backbone, {"name": "static"}).backbone
    assert _structure(folded) == _structure(static)
    assert {k: v.shape for k, v in folded.state_dict().items()} == {k: v.shape for k, v in static.state_dict().items()}
    assert count_params(folded) == count_params(static) < count_params(model)  # LWE's FCs are gone
    assert count_macs(folded, (3, 32, 32)).total == count_macs(static, (3, 32, 32)).total


def test_folding_a_copy_leaves_the_original_and_other_copies_working():
    """parametrize's deepcopy shares the parametrized class, whose `weight` property removal deletes: without
    `we_parametrize`'s own-class deepcopy, folding a copy (fold_for_inference, an EMA copy) breaks the original."""
    torch.manual_seed(0)
    model = _build("resnet18", load_op_config("lwe")).backbone
    x = torch.randn(2, 3, 32, 32)
    calibrate_batch_norm(model, x)
    ema = copy.deepcopy(model)
    with torch.no_grad():
        expected = model(x)
        first, second = fold_for_inference(model), fold_for_inference(ema)
        for candidate in (model, ema, first, second, fold_for_inference(first)):
            torch.testing.assert_close(candidate(x), expected, rtol=1e-5, atol=1e-5)
    assert type(first.net.conv1) is nn.Conv2d and parametrize.is_parametrized(model.net.conv1)


def test_mwe_folds_too():
    torch.manual_seed(0)
    model = _build("resnet18", load_op_config("mwe")).backbone
    x = torch.randn(4, 3, 32, 32)
    calibrate_batch_norm(model, x)
    with torch.no_grad():
        torch.testing.assert_close(fold_for_inference(model)(x), model(x), rtol=1e-5, atol=1e-5)


def test_profile_script_reports_folded_macs():
    """scripts/profile.py: `macs_inference` (folded) is the static network's MACs, `macs` includes LWE's MLP."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "profile.py"

    def profile(op: str) -> dict:
        done = subprocess.run([sys.executable, str(script), "backbone=resnet18", f"op={op}", "profile.resolution=32"],
                              capture_output=True, text=True, check=True)
        return json.loads(done.stdout.strip().splitlines()[-1])

    lwe, static = profile("lwe"), profile("static")
    assert lwe["macs_inference"] == static["macs"] == static["macs_inference"]
    assert lwe["macs"] > lwe["macs_inference"]
    assert lwe["params_inference"] == static["params"]
