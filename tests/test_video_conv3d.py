"""3-D convolutions in the one conversion pass (docs/video.md): Weight Excitation on R3D-18's Conv3d layers follows
Eq. 1 / Eq. 2 and folds exactly, every operator that builds 2-D layers refuses a Conv3d with its reason instead of
crashing, and a 3-D model's MACs and layer descriptions are right.

Most checks build on the meta device (no memory, no initialisation); the numerical ones use one tiny clip."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from dynconv.backbones.backbone import infer_role
from dynconv.build import build_backbone
from dynconv.conversion.layer import LayerInfo
from dynconv.ops import OPERATORS
from dynconv.profiling import count_macs, count_params, fold_for_inference
from op_checks import calibrate_batch_norm, load_op_config

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: small models, shared cores

NONE = {"name": "none"}
# The operators whose layer code is dimension-generic (they reparameterise the backbone's own weight).
CONV3D_OPERATORS = {"static", "lwe", "mwe", "we", "weight_std", "weight_norm", "spectral_norm"}


def _build(op: str, *, meta: bool = False, num_classes: int = 5, **knobs):
    torch.manual_seed(0)
    op_cfg = {**load_op_config(op), **knobs}
    if meta:
        with torch.device("meta"):
            return build_backbone({"name": "r3d_18"}, op_cfg, NONE, num_classes=num_classes, image_size=112)
    return build_backbone({"name": "r3d_18"}, op_cfg, NONE, num_classes=num_classes, image_size=32)


# ------------------------------------------------------------------------------------------ the layer view
def test_layer_info_describes_a_conv3d():
    stem = nn.Conv3d(3, 64, (3, 7, 7), stride=(1, 2, 2), padding=(1, 3, 3), bias=False)
    info = LayerInfo("stem.0", stem, "stem", 0, None, 0)
    assert info.is_conv and info.is_conv3d and not info.is_linear and not info.is_depthwise
    assert info.kernel_size == (3, 7, 7) and (info.in_channels, info.out_channels, info.groups) == (3, 64, 1)
    assert info.shape_str() == "Conv3d(3->64, k=3x7x7, s=1x2x2, g=1)"
    depthwise = LayerInfo("dw", nn.Conv3d(8, 8, 3, groups=8), "depthwise", 1, None, 1)
    assert depthwise.is_depthwise and depthwise.shape_str() == "Conv3d(8->8, k=3x3x3, s=1, g=8)"
    plain = LayerInfo("conv", nn.Conv2d(8, 4, 3), "conv", 1, None, 2)
    assert plain.is_conv and not plain.is_conv3d and plain.shape_str() == "Conv2d(8->4, k=3x3, s=1, g=1)"
    assert infer_role(nn.Conv3d(8, 16, 1)) == "pointwise" and infer_role(nn.Conv3d(8, 16, 3)) == "conv"
    assert infer_role(nn.Conv3d(8, 8, 3, groups=8)) == "depthwise"


def test_r3d_18_layers_are_placed_like_a_resnet18():
    """stem, 16 block convolutions in stages 1-4, 3 shortcut projections (1x1x1), the classifier."""
    built = _build("static", meta=True)
    layers = [decision.layer for decision in built.decisions]
    roles = [layer.role for layer in layers]
    assert len(layers) == 21 and sum(layer.is_conv3d for layer in layers) == 20
    assert roles.count("stem") == 1 and roles.count("conv") == 16 and roles.count("downsample") == 3
    assert layers[-1].role == "classifier" and layers[-1].name == "fc"
    assert {layer.stage for layer in layers if layer.role == "conv"} == {1, 2, 3, 4}
    block = next(layer for layer in layers if layer.name == "layer2.0.conv1.0")
    assert block.block == "layer2.0" and block.kernel_size == (3, 3, 3)


# ------------------------------------------------------------------------------ refusing or taking a Conv3d
@pytest.mark.parametrize("op", sorted(OPERATORS.names()))
def test_every_operator_takes_or_refuses_r3d_18s_convolutions(op):
    """No operator crashes on a 3-D network: those that act on Conv3d convert all 20 of them; every other one keeps
    each static with the reason (naming the operators that do act on Conv3d), and it shows in the summary."""
    built = _build(op, meta=True)
    convs = [decision for decision in built.decisions if decision.layer.is_conv3d]
    assert len(convs) == 20
    if op == "static":
        assert not any(decision.converted for decision in built.decisions)
    elif op in CONV3D_OPERATORS:
        assert all(decision.converted for decision in convs), [d.reason for d in convs if not d.converted]
    else:
        assert not any(decision.converted for decision in convs)
        reasons = {decision.reason for decision in convs}
        assert len(reasons) == 1, reasons
        reason = reasons.pop()
        assert f"{op} builds 2-D layers" in reason and "Conv3d stays static" in reason and "lwe, mwe, we" in reason
        assert reason in built.summary()
        for decision in convs:  # still the backbone's own, plain Conv3d
            module = built.backbone.net.get_submodule(decision.layer.name)
            assert isinstance(module, nn.Conv3d) and not parametrize.is_parametrized(module)
    assert CONV3D_OPERATORS <= {name for name, cls in OPERATORS.items() if cls.supports_conv3d}


# ------------------------------------------------------------------------------------ WE on a Conv3d, Eq. 1-2
def _standardised(weight: torch.Tensor) -> torch.Tensor:
    """W_n: each output channel over its In x t x h x w weights at zero mean, unit (biased) variance."""
    flat = weight.reshape(weight.shape[0], -1)
    mean = flat.mean(dim=1).view(-1, 1, 1, 1, 1)
    var = flat.var(dim=1, unbiased=False).view(-1, 1, 1, 1, 1)
    return (weight - mean) / torch.sqrt(var + 1e-5)


def _eq1(weight: torch.Tensor, excitation) -> torch.Tensor:
    """LWE, Eq. 1, for a 3-D kernel: m = sigmoid(FC_2(ReLU(FC_1(Avg_{t x h x w}(W_n))))), W_LWE = m * W_n."""
    normalised = _standardised(weight)
    pooled = normalised.mean(dim=(2, 3, 4))  # Out x In
    m = torch.sigmoid(torch.relu(pooled @ excitation.fc1.weight.t() + excitation.fc1.bias)
                      @ excitation.fc2.weight.t() + excitation.fc2.bias)
    return m[..., None, None, None] * normalised


def _eq2(weight: torch.Tensor, eps: float) -> torch.Tensor:
    """MWE, Eq. 2: M_A atanh(w / M_A) on W_n, M_A = (1 + eps_A) max |W_n|."""
    normalised = _standardised(weight)
    bound = (1 + eps) * normalised.abs().max()
    return bound * 0.5 * torch.log((1 + normalised / bound) / (1 - normalised / bound))


@pytest.mark.parametrize("op", ["lwe", "mwe"])
def test_excited_conv3d_weights_follow_the_equations(op):
    """On R3D-18's converted layers (the stem's 3x7x7, a block's 3x3x3, a 1x1x1 shortcut), the weight the
    convolution uses is Eq. 1 (LWE) / Eq. 2 (MWE) of its trainable weight, in float64."""
    built = _build(op)
    net = built.backbone.net.double()
    for name in ("stem.0", "layer2.0.conv1.0", "layer2.0.downsample.0"):
        conv = net.get_submodule(name)
        assert isinstance(conv, nn.Conv3d) and parametrize.is_parametrized(conv, "weight")
        original = conv.parametrizations.weight.original
        if op == "lwe":
            excitation = conv.parametrizations.weight[0]
            with torch.no_grad():  # spread m away from sigmoid(0) so a wrong broadcast would show
                excitation.fc2.weight.mul_(8.0)
            expected = _eq1(original, excitation)
        else:
            expected = _eq2(original, built.operator.eps)
        torch.testing.assert_close(conv.weight, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("op", ["lwe", "mwe", "weight_std", "spectral_norm"])
def test_folding_r3d_18_gives_the_static_network_with_the_same_outputs(op):
    """fold_for_inference bakes the excited (or normalised) weights into plain Conv3d layers: the eval-mode output
    of the trained-form model, the static R3D-18's structure, parameters and MACs. (op=we is op=lwe on R3D, which
    has no depthwise layer; op=weight_norm is torch's parametrization like spectral_norm's.)"""
    model = _build(op).backbone
    clip = torch.randn(2, 3, 4, 32, 32, generator=torch.Generator().manual_seed(1))
    calibrate_batch_norm(model, clip)
    with torch.no_grad():
        expected = model(clip)
    folded = fold_for_inference(model)
    with torch.no_grad():
        actual = folded(clip)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    static = _build("static").backbone
    assert not any(parametrize.is_parametrized(module) for module in folded.modules())
    assert {k: v.shape for k, v in folded.state_dict().items()} == {k: v.shape for k, v in static.state_dict().items()}
    assert count_params(folded) == count_params(static)
    assert count_macs(folded, (3, 4, 32, 32)).total == count_macs(static, (3, 4, 32, 32)).total


# ------------------------------------------------------------------------------------------------ MACs
def test_r3d_18_macs_of_a_16_frame_112_px_clip():
    """torch's counter counts conv3d: 40.70 G MACs for the static R3D-18 at 16 x 112 x 112 with 400 classes
    (torchvision's table lists 40.70 "GFLOPS" for r3d_18, i.e. multiply-accumulates); LWE adds only its FCs
    (counted in training, gone after folding). On the meta device: shapes only."""
    static = _build("static", meta=True, num_classes=400).backbone
    macs = count_macs(static, (3, 16, 112, 112)).total
    assert round(macs / 1e9, 2) == 40.70, macs
    assert count_params(static) == 33_371_472  # torchvision: 33.4M
    lwe = _build("lwe", meta=True, num_classes=400).backbone
    assert macs < count_macs(lwe, (3, 16, 112, 112)).total < macs * 1.01
    assert count_macs(fold_for_inference(lwe), (3, 16, 112, 112)).total == macs
