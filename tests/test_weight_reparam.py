"""The weight-normalising reparameterisations of WE's Table 2 / 4 (op=weight_std, op=weight_norm, op=spectral_norm)
and Table 3's LWE+MWE (op=we op.regular=lwe_mwe): each parametrization against its formula written out in float64,
folding into plain nn.Conv2d layers with the eval-mode outputs, ResNet50's training / inference parameter counts,
which layers they take, and their knobs."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from dynconv.build import build_backbone, make_operator
from dynconv.config import validate_model_config
from dynconv.conversion import LayerInfo
from dynconv.ops.reparam.operator import DEPTHWISE_REASON, SINGLE_WEIGHT_REASON
from dynconv.ops.reparam.standardization import WeightStandardization
from dynconv.ops.reparam.torch_norms import normalize_spectrum, normalize_weight
from dynconv.ops.we.location import LocationExcitation
from dynconv.ops.we.magnitude import MagnitudeExcitation, magnitude_excitation
from dynconv.ops.we.parametrize import excite
from dynconv.profiling import count_params, fold_for_inference
from op_checks import assert_knob_rejected, calibrate_batch_norm, load_op_config  # noqa: E402

NO_ATTN = {"name": "none"}
REPARAMS = ["weight_std", "weight_norm", "spectral_norm"]


def _build(backbone: str, op: dict, num_classes: int = 10, image_size: int = 32):
    return build_backbone({"name": backbone}, op, NO_ATTN, num_classes=num_classes, image_size=image_size)


def _lwe_mwe() -> dict:
    return {**load_op_config("we"), "regular": "lwe_mwe"}


def _conv(in_ch: int = 6, out_ch: int = 4, kernel: int = 3, groups: int = 1) -> nn.Conv2d:
    torch.manual_seed(0)
    return nn.Conv2d(in_ch, out_ch, kernel, padding=kernel // 2, groups=groups, bias=True).double()


def _by_channel(weight: torch.Tensor) -> torch.Tensor:
    return weight.reshape(weight.shape[0], -1)


# ------------------------------------------------------------------------------------- the formulas, by hand

CONVS = {"regular": (6, 4, 3, 1), "grouped": (6, 4, 3, 2), "depthwise": (4, 4, 3, 4), "pointwise": (6, 4, 1, 1)}


@pytest.mark.parametrize("case", sorted(CONVS))
def test_weight_std_is_qiao_et_al_standardisation(case):
    """W^_i = (W_i - mu_i) / sqrt(mean(W_i^2) - mu_i^2 + eps) over each output channel's In/g x h x w weights
    (a depthwise 3x3: its 9 weights)."""
    conv = _conv(*CONVS[case])
    raw = conv.weight.detach().clone()
    excite(conv, WeightStandardization(eps=1e-3))
    flat = _by_channel(raw)
    mean = flat.sum(dim=1, keepdim=True) / flat.shape[1]
    sigma = torch.sqrt((flat * flat).sum(dim=1, keepdim=True) / flat.shape[1] - mean ** 2 + 1e-3)
    expected = ((flat - mean) / sigma).view_as(raw)
    torch.testing.assert_close(conv.weight, expected, rtol=1e-12, atol=1e-12)
    # With a small eps: zero mean and unit (biased) variance per channel.
    conv.parametrizations.weight[0].eps = 1e-12
    standardised = _by_channel(conv.weight)
    torch.testing.assert_close(standardised.mean(dim=1), torch.zeros(raw.shape[0], dtype=torch.float64), atol=1e-12,
                               rtol=0)
    torch.testing.assert_close(standardised.var(dim=1, correction=0), torch.ones(raw.shape[0], dtype=torch.float64))


@pytest.mark.parametrize("case", sorted(CONVS))
def test_weight_norm_is_g_v_over_norm_v_per_output_channel(case):
    """Salimans & Kingma Eq. 2, w_j = g_j v_j / ||v_j||: one trainable g per output channel, starting at ||v_j||
    (the layer computes what it did before), and the direction alone comes from v."""
    conv = _conv(*CONVS[case])
    raw = conv.weight.detach().clone()
    normalize_weight(conv)
    g, v = conv.parametrizations.weight.original0, conv.parametrizations.weight.original1
    assert g.shape == (raw.shape[0], 1, 1, 1) and g.requires_grad and v.requires_grad
    torch.testing.assert_close(conv.weight, raw, rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        g.copy_(torch.linspace(0.5, 2.0, raw.shape[0], dtype=torch.float64).view(-1, 1, 1, 1))
        v.mul_(3.0)  # the scale of v does not matter
    expected = g.view(-1, 1) * _by_channel(v) / _by_channel(v).norm(dim=1, keepdim=True)
    torch.testing.assert_close(conv.weight, expected.view_as(raw), rtol=1e-12, atol=1e-12)


def _power_iteration(matrix: torch.Tensor, u: torch.Tensor, v: torch.Tensor):
    """One step of the power method as torch orders it: u = W v / ||W v||, then v = W^T u / ||W^T u||."""
    u = matrix @ v
    u = u / u.norm()
    v = matrix.t() @ u
    return u, v / v.norm()


@pytest.mark.parametrize("case", sorted(CONVS))
def test_spectral_norm_is_w_over_u_w_v_with_one_power_iteration_per_training_forward(case):
    """Miyato et al. Eq. 8 and Algorithm 1 on the Out x (In/g h w) matrix: W / (u^T W v). A training forward first
    moves (u, v) by one power-iteration step; eval mode uses them as they are. Iterated, sigma is the largest
    singular value."""
    conv = _conv(*CONVS[case])
    raw = conv.weight.detach().clone()
    normalize_spectrum(conv, power_iterations=1)
    sn = conv.parametrizations.weight[0]
    matrix = _by_channel(raw)

    conv.train()
    u, v = _power_iteration(matrix, sn._u.clone(), sn._v.clone())
    trained = conv.weight
    torch.testing.assert_close(sn._u, u, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sn._v, v, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(trained, raw / (u @ matrix @ v), rtol=1e-12, atol=1e-12)

    conv.eval()
    before = sn._u.clone(), sn._v.clone()
    torch.testing.assert_close(conv.weight, trained, rtol=0, atol=0)  # the same u, v: the same weight
    assert torch.equal(sn._u, before[0]) and torch.equal(sn._v, before[1])

    conv.train()
    for _ in range(200):
        conv.weight
    largest = torch.linalg.matrix_norm(matrix, ord=2)
    torch.testing.assert_close(sn._u @ matrix @ sn._v, largest, rtol=1e-10, atol=0)
    torch.testing.assert_close(torch.linalg.matrix_norm(_by_channel(conv.weight), ord=2),
                               torch.ones((), dtype=torch.float64), rtol=1e-10, atol=0)


def test_spectral_norm_power_iterations_knob_runs_that_many_steps():
    conv = _conv()
    normalize_spectrum(conv, power_iterations=3)
    sn = conv.parametrizations.weight[0]
    u, v = sn._u.clone(), sn._v.clone()
    for _ in range(3):
        u, v = _power_iteration(_by_channel(conv.parametrizations.weight.original), u, v)
    conv.train().weight
    torch.testing.assert_close(sn._u, u, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------------------- LWE + MWE


def test_lwe_mwe_is_mwe_applied_to_lwes_output():
    """op=we op.regular=lwe_mwe: W -> f_A(m * W_n), value and gradient equal to composing LWE (Eq. 1 on the
    standardised weight) and MWE (Eq. 2, not standardised again) by hand."""
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 5, 3, bias=False).double()
    raw = conv.weight.detach().clone().requires_grad_(True)
    make_operator(_lwe_mwe()).build(LayerInfo("conv", conv, "conv", 1, None, 0)).double()  # LWE's FCs too
    chain = conv.parametrizations.weight
    assert [type(p) for p in chain] == [LocationExcitation, MagnitudeExcitation]
    lwe, mwe = chain
    assert lwe.standardize and not mwe.standardize and mwe.eps == 0.1

    # Eq. 1 written out: m = sigmoid(FC_2(ReLU(FC_1(Avg_hw(W_n))))), then Eq. 2: M_A atanh(w / M_A).
    flat = raw.reshape(5, -1)
    mean = flat.mean(dim=1, keepdim=True)
    normalised = ((flat - mean) / torch.sqrt(flat.var(dim=1, correction=0, keepdim=True) + 1e-5)).view_as(raw)
    m = torch.sigmoid(lwe.fc2(torch.relu(lwe.fc1(normalised.mean(dim=(2, 3))))))
    excited = m[..., None, None] * normalised
    bound = 1.1 * excited.detach().abs().max()
    expected = bound * 0.5 * torch.log((1 + excited / bound) / (1 - excited / bound))
    torch.testing.assert_close(conv.weight, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(conv.weight, magnitude_excitation(lwe(raw), 0.1), rtol=1e-12, atol=0)

    upstream = torch.randn_like(raw)
    (conv.weight * upstream).sum().backward()
    (expected * upstream).sum().backward()
    torch.testing.assert_close(chain.original.grad, raw.grad, rtol=1e-9, atol=1e-12)
    assert lwe.fc1.weight.grad.abs().sum() > 0


def test_op_we_regular_choices_and_default():
    """Default `lwe`: today's op=we (LWE where In > 1, MWE on depthwise). `lwe_mwe`: both on regular layers, MWE
    alone on depthwise ones. `mwe`: MWE everywhere, the parameters of op=mwe."""
    assert load_op_config("we")["regular"] == "lwe"
    with torch.device("meta"):
        runs = {regular: _build("mobilenetv2_050", {**load_op_config("we"), "regular": regular})
                for regular in ("lwe", "lwe_mwe", "mwe")}
        mwe_everywhere = _build("mobilenetv2_050", load_op_config("mwe"))
    expected = {"lwe": [LocationExcitation], "lwe_mwe": [LocationExcitation, MagnitudeExcitation],
                "mwe": [MagnitudeExcitation]}
    for regular, built in runs.items():
        assert all(d.converted for d in built.decisions if d.layer.is_conv)
        for decision in built.decisions:
            if decision.converted:
                chain = [type(p) for p in decision.layer.module.parametrizations.weight]
                assert chain == ([MagnitudeExcitation] if decision.layer.is_depthwise else expected[regular])
    assert count_params(runs["lwe_mwe"].backbone) == count_params(runs["lwe"].backbone)
    assert count_params(runs["mwe"].backbone) == count_params(mwe_everywhere.backbone)


# ------------------------------------------------------------------------------------------------------ folding


def _parametrize(conv: nn.Conv2d, op: str) -> nn.Conv2d:
    if op == "weight_std":
        return excite(conv, WeightStandardization(1e-5))
    if op == "weight_norm":
        return normalize_weight(conv)
    if op == "spectral_norm":
        return normalize_spectrum(conv, 1)
    return make_operator(_lwe_mwe()).build(LayerInfo("conv", conv, "conv", 1, None, 0)).double()


@pytest.mark.parametrize("op", [*REPARAMS, "lwe_mwe"])
def test_folding_gives_a_plain_conv_with_the_eval_mode_output(op):
    """fold_for_inference on a model left in train mode: a plain nn.Conv2d whose output is the parametrized layer's
    in eval mode, exactly (spectral norm: with the u, v of the last training forward, which folding does not move),
    and the original keeps working."""
    model = nn.Sequential(_parametrize(_conv(), op))
    x = torch.randn(2, 6, 7, 7, dtype=torch.float64)
    model.train()
    model(x)  # a training forward (spectral norm: one power-iteration step)
    state = copy.deepcopy(model.state_dict())
    folded = fold_for_inference(model)
    assert type(folded[0]) is nn.Conv2d and not parametrize.is_parametrized(folded[0])
    assert folded[0].weight.is_leaf and count_params(folded) == 6 * 4 * 9 + 4
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())  # u, v unmoved by folding
    with torch.no_grad():
        expected = model.eval()(x)
        torch.testing.assert_close(folded(x), expected, rtol=0, atol=1e-14)
        torch.testing.assert_close(fold_for_inference(model)(x), expected, rtol=0, atol=1e-14)


@pytest.mark.parametrize("backbone", ["resnet18", "mobilenetv2_050"])
@pytest.mark.parametrize("op", [*REPARAMS, "lwe_mwe"])
def test_folded_backbone_is_the_static_one_with_the_same_outputs(op, backbone):
    """Every convolution but the classifier (and SE branches) is reparameterised, depthwise ones included; the
    folded model has the static model's modules, state-dict shapes and parameters, and the eval-mode outputs."""
    torch.manual_seed(0)
    built = _build(backbone, _lwe_mwe() if op == "lwe_mwe" else load_op_config(op))
    model = built.backbone
    assert all(d.converted == d.layer.is_conv for d in built.decisions if d.layer.role != "se")
    x = torch.randn(4, 3, 32, 32)
    calibrate_batch_norm(model, x)
    with torch.no_grad():
        expected = model(x)
        folded = fold_for_inference(model)
        torch.testing.assert_close(folded(x), expected, rtol=1e-5, atol=1e-5)
    static = _build(backbone, {"name": "static"}).backbone
    assert {n: type(m) for n, m in folded.named_modules()} == {n: type(m) for n, m in static.named_modules()}
    assert {k: v.shape for k, v in folded.state_dict().items()} == {k: v.shape for k, v in static.state_dict().items()}
    assert count_params(folded) == count_params(static)


@functools.lru_cache(maxsize=None)
def _resnet50_counts(op: str) -> tuple[int, int]:
    cfg = {"name": "static"} if op == "static" else _lwe_mwe() if op == "lwe_mwe" else load_op_config(op)
    with torch.device("meta"):
        model = _build("resnet50", cfg, num_classes=1000, image_size=224).backbone
    return count_params(model), count_params(fold_for_inference(model))


@pytest.mark.parametrize(("op", "training"), [("weight_std", 25_557_032), ("weight_norm", 25_583_592),
                                              ("spectral_norm", 25_557_032), ("lwe_mwe", 28_063_235)])
def test_resnet50_training_and_inference_parameters(op, training):
    """WS and SN add no parameters (SN's u, v are buffers), WN one g per output channel of its 53 convolutions
    (26,560), LWE+MWE LWE's subnetworks (op=lwe's 28,063,235); every folded model is the static 25,557,032."""
    assert _resnet50_counts(op) == (training, _resnet50_counts("static")[0]) == (training, 25_557_032)


def test_spectral_norm_buffers_round_trip_through_a_checkpoint():
    """u and v are state (buffers): a rebuilt model loads them and computes the same eval-mode outputs."""
    trained = nn.Sequential(_parametrize(_conv(), "spectral_norm")).train()
    x = torch.randn(2, 6, 7, 7, dtype=torch.float64)
    trained(x)
    state = trained.state_dict()
    assert {"0.parametrizations.weight.0._u", "0.parametrizations.weight.0._v"} <= set(state)
    torch.manual_seed(1)
    rebuilt = nn.Sequential(normalize_spectrum(nn.Conv2d(6, 4, 3, padding=1).double(), 1)).eval()
    rebuilt.load_state_dict(state)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), trained.eval()(x), rtol=0, atol=0)


@pytest.mark.parametrize("op", ["weight_norm", "spectral_norm"])
def test_folding_a_copy_leaves_the_original_working(op):
    """torch's own parametrizations get the own-class deepcopy too (dynconv/ops/we/parametrize.py): folding a copy
    (fold_for_inference, an EMA copy) must not delete the `weight` property of the original's class."""
    model = nn.Sequential(_parametrize(_conv(), op)).eval()
    x = torch.randn(2, 6, 7, 7, dtype=torch.float64)
    ema = copy.deepcopy(model)
    with torch.no_grad():
        expected = model(x)
        fold_for_inference(ema), fold_for_inference(model)
        torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
        torch.testing.assert_close(ema(x), expected, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------- placement, knobs


def test_depthwise_false_keeps_depthwise_layers_static():
    for op in REPARAMS:
        with torch.device("meta"):
            built = _build("mobilenetv2_050", {**load_op_config(op), "depthwise": False})
        static = [d for d in built.decisions if d.layer.is_conv and not d.converted]
        assert len(static) == 17 and all(d.layer.is_depthwise and d.reason == DEPTHWISE_REASON for d in static)


def test_weight_std_refuses_a_layer_with_one_weight_per_output_channel():
    operator = make_operator(load_op_config("weight_std"))
    one = LayerInfo("dw1x1", nn.Conv2d(4, 4, 1, groups=4), "conv", 1, None, 0)
    three = LayerInfo("dw3x3", nn.Conv2d(4, 4, 3, groups=4), "conv", 1, None, 1)
    assert operator.refuse(one) == SINGLE_WEIGHT_REASON and operator.refuse(three) is None
    assert make_operator(load_op_config("weight_norm")).refuse(one) is None


BAD_KNOBS = [
    ("weight_std", "eps", 0, "numbers > 0"),
    ("weight_std", "eps", "small", "numbers > 0"),
    ("weight_std", "depthwise", "yes", "true, false"),
    ("weight_norm", "depthwise", None, "true, false"),
    ("spectral_norm", "power_iterations", 0, "integers >= 1"),
    ("spectral_norm", "power_iterations", 1.5, "integers >= 1"),
    ("spectral_norm", "depthwise", 1, "true, false"),
    ("we", "regular", "mwe_lwe", "lwe, lwe_mwe, mwe"),
    ("we", "regular", True, "lwe, lwe_mwe, mwe"),
]


@pytest.mark.parametrize(("op", "key", "value", "allowed"), BAD_KNOBS, ids=[f"{o}-{k}={v}" for o, k, v, _ in BAD_KNOBS])
def test_bad_knobs_name_the_key_and_the_allowed_values(op, key, value, allowed):
    assert_knob_rejected(load_op_config(op), key, value, allowed)


@pytest.mark.parametrize("overrides", [["op=weight_std"], ["op=weight_norm"], ["op=spectral_norm"],
                                       ["op=we", "op.regular=lwe_mwe"]], ids=lambda o: " ".join(o))
def test_configs_compose_and_validate(compose_cfg, overrides):
    validate_model_config(compose_cfg([*overrides, "backbone=resnet50"]))
