"""DyNet (op=dynet and the Dy-* backbones): kernel fusion (Eq. 1) equals feature fusion (Eq. 2), the batched
layer equals a per-sample reference, one coefficient module per block shared by its layers, inference fuses
kernels, every Dy-* backbone trains, and bad knobs / widths fail at build time naming key, value and allowed."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from dynconv.build import build_backbone
from dynconv.functional import selector
from dynconv.ops import OperatorConfigError
from dynconv.ops.dynet import fusion as dynet_fusion
from dynconv.ops.dynet import CoefficientPredictor, DyNetConv2d
from dynconv.ops.dynet.fusion import dynet_conv2d
from dynconv.profiling import count_macs
from op_checks import assert_knob_rejected, load_op_config
from reference_checks import assert_matches_reference

DYNET = load_op_config("dynet")
DY_BACKBONES = ["dynet_mobile", "dynet_shuffle_x1_0", "dynet_shuffle_x1_5", "dynet_resnet18", "dynet_resnet50"]
# (in, out, kernel, stride, padding, groups, bias): dense 3x3, strided, Dy-mobile's groups of 6, depthwise, 1x1, and
# one with more kernel elements than `BROADCAST_MAX_ELEMENTS` (batch-1 kernel fusion by matmul).
GEOMETRIES = [(6, 12, 3, 1, 1, 1, False), (6, 12, 3, 2, 1, 1, True), (12, 12, 3, 1, 1, 2, False),
              (12, 12, 3, 2, 1, 12, False), (8, 6, 1, 1, 0, 1, True), (16, 8, 3, 1, 1, 1, False)]


def _op(**knobs) -> dict:
    return {**DYNET, **knobs}


def _build(backbone: str, op: dict, image_size: int = 32):
    torch.manual_seed(0)
    return build_backbone({"name": backbone}, op, {"name": "none"}, num_classes=10, image_size=image_size)


def _layer(cin, cout, k, stride, padding, groups, bias, g=3) -> DyNetConv2d:
    """A layer with its own coefficient module (no block), in float64."""
    torch.manual_seed(0)
    predictor = CoefficientPredictor(cin, cout * g, hidden=max(1, cin // 4))
    layer = DyNetConv2d(cin, cout, (k, k), stride, padding, 1, groups, bias, g=g, predictor=predictor).double()
    if bias:
        nn.init.normal_(layer.bias)
    return layer


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=lambda g: "in{}-out{}-k{}-s{}-p{}-g{}-bias{}".format(*g))
def test_kernel_fusion_equals_feature_fusion(geometry):
    """Eq. 2: sum_i eta_i (w_i * x) == (sum_i eta_i w_i) * x, outputs and gradients (input, kernels,
    coefficients, bias), float64."""
    cin, cout, k, stride, padding, groups, bias = geometry
    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(cout, 3, cin // groups, k, k, dtype=torch.float64, generator=generator, requires_grad=True)
    eta = torch.rand(4, cout, 3, dtype=torch.float64, generator=generator, requires_grad=True)
    b = torch.randn(cout, dtype=torch.float64, generator=generator, requires_grad=True) if bias else None
    x = torch.randn(4, cin, 7, 7, dtype=torch.float64, generator=generator, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    params = [weight, eta] + ([b] if bias else [])
    y = dynet_conv2d(x, weight, eta, b, stride, padding, 1, groups, fusion="kernels")
    y_ref = dynet_conv2d(x_ref, weight, eta, b, stride, padding, 1, groups, fusion="features")
    assert_matches_reference(y, y_ref, x, x_ref, ["weight", "coefficients", "bias"][: len(params)], params)


def _per_sample_reference(layer: DyNetConv2d, x: torch.Tensor) -> torch.Tensor:
    """The paper, one image at a time: eta = sigmoid(FC(GAP(x_b))), w~_t = sum_i eta_t^i w_t^i (Eq. 1), w~ * x_b."""
    outputs = []
    for sample in x.split(1):
        eta = layer.predictor(sample.mean(dim=(2, 3)))[0].view(layer.out_channels, layer.g)
        kernel = (eta[:, :, None, None, None] * layer.weight).sum(dim=1)
        outputs.append(F.conv2d(sample, kernel, layer.bias, layer.stride, layer.padding, layer.dilation, layer.groups))
    return torch.cat(outputs)


@pytest.mark.parametrize("mode", ["train-auto", "train-features", "train-kernels", "eval", "eval-batch1"])
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=lambda g: "in{}-out{}-k{}-s{}-p{}-g{}-bias{}".format(*g))
def test_batched_layer_equals_per_sample_reference(geometry, mode):
    """Train mode with each fusion, eval mode at batch 3 (per-sample kernels) and at batch 1 (the broadcast
    kernel fusion and one plain convolution), against the per-sample loop, float64, outputs and gradients."""
    layer = _layer(*geometry)
    layer.train(mode.startswith("train"))
    if mode.startswith("train-"):
        layer.fusion = mode.removeprefix("train-")
    batch = 1 if mode == "eval-batch1" else 3
    x = torch.randn(batch, geometry[0], 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(2),
                    requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    names, params = zip(*layer.named_parameters())
    assert_matches_reference(layer(x), _per_sample_reference(layer, x_ref), x, x_ref, list(names), list(params))


def test_inference_fuses_kernels(monkeypatch):
    """Eval mode never runs feature fusion; at batch 1 each layer is one plain convolution with its fused
    kernel (the Caffe deployment of Table 2)."""
    def refuse(*args):
        raise AssertionError("feature fusion ran at inference")

    monkeypatch.setitem(dynet_fusion._FUSION, "features", refuse)
    model = _build("dynet_mobile", _op()).backbone.eval()
    calls = []
    original = F.conv2d
    monkeypatch.setattr(F, "conv2d", lambda *args, **kw: calls.append(args[1].shape) or original(*args, **kw))
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
        calls.clear()
        model(torch.randn(1, 3, 32, 32))
    layers = [m for m in model.modules() if isinstance(m, DyNetConv2d)]
    # One convolution per dynamic layer, with its fused (C_out, C_in/groups, k, k) kernel, + the stem and the head.
    assert len(calls) == len(layers) + 2
    fused = [(m.out_channels, m.in_channels // m.groups, *m.kernel_size) for m in layers]
    assert [tuple(shape) for shape in calls[1:-1]] == fused


def test_training_takes_the_measured_fusion(monkeypatch):
    """In training, `auto` times both fusions once per layer shape and caches the faster (selector);
    DYNCONV_CONV_ALGORITHM=outputs forces feature fusion, =kernels kernel fusion."""
    layer = _layer(16, 32, 3, 1, 1, 1, False).float().train()
    x = torch.randn(4, 16, 32, 32)
    selector.clear_cache()
    layer(x).sum().backward()
    picked = [entry for key, entry in selector.choices().items() if key.startswith("dynet_conv2d")]
    assert len(picked) == 1 and picked[0]["algorithm"] in ("features", "kernels")
    assert set(picked[0]["ms"]) == {"features", "kernels"}
    seen = []
    for name in ("features", "kernels"):
        monkeypatch.setitem(dynet_fusion._FUSION, name, lambda *a, name=name: seen.append(name) or
                            dynet_fusion.by_kernels(*a))
    for policy in ("outputs", "kernels"):
        with selector.policy(policy):
            layer(x)
    assert seen == ["features", "kernels"]
    selector.clear_cache()


def test_one_coefficient_module_per_block_shared_by_its_layers():
    """Sec. 3.3: the block's input feeds one coefficient module that 'produces the coefficients for all three
    dynamic convolution layers': one module per block, C_out * g_t columns per layer, disjoint and covering,
    computed once per forward of the block."""
    built = _build("dynet_mobile", _op(g=4))
    model = built.backbone
    by_block: dict[str, list] = {}
    for decision in built.decisions:
        if decision.converted:
            by_block.setdefault(decision.layer.block, []).append(model.net.get_submodule(decision.layer.name))
    assert len(model.shared_inputs) == len(by_block) == 17  # MobileNetV2's 17 blocks
    for block, layers in by_block.items():
        assert len(layers) == 3
        shared = {id(layer.__dict__["shared_input"]) for layer in layers}
        assert len(shared) == 1 and all(layer.predictor is None for layer in layers)
        slices = sorted(layer.coefficient_slice for layer in layers)
        assert [stop - start for start, stop in slices] == [layer.out_channels * 4 for layer in layers]
        assert all(a[1] == b[0] for a, b in zip(slices, slices[1:])) and slices[0][0] == 0
        predictor = layers[0].__dict__["shared_input"].summary
        assert isinstance(predictor.fc, nn.Linear)  # Dy-mobile: one FC (Figure 3)
        assert predictor.fc.out_features == slices[-1][1]
        assert predictor.fc.in_features == model.net.get_submodule(block).conv[0][0].in_channels
    calls = []
    for shared in model.shared_inputs.values():
        shared.summary.register_forward_hook(lambda *args: calls.append(1))
    model(torch.randn(2, 3, 32, 32))
    assert len(calls) == 17


def test_dy_resnet_uses_two_linear_layers_with_quarter_width():
    """Sec. 3.3: Dy-ResNet's coefficient module is two linear layers, C_in -> C_in/4 -> coefficients."""
    model = _build("dynet_resnet18", _op()).backbone
    for name, shared in model.shared_inputs.items():
        first, _, last = shared.summary.fc
        block = model.net.get_submodule(name.replace("__", "."))
        assert first.in_features == block.conv1.in_channels and first.out_features == block.conv1.in_channels // 4
        assert last.out_features == 6 * (block.conv1.out_channels + block.conv2.out_channels)


def test_dy_architectures():
    """The widths and groups of Sec. 3.3: Dy-mobile's blocks have C_out (a multiple of 6) in all three layers and
    C_out/6 depthwise groups; Dy-shuffle's basic unit splits 3:1 with 2 channels per group; Dy-ResNet has half
    ResNet's channels; shortcuts, heads and the stem stay static under op=dynet."""
    built = _build("dynet_mobile", {"name": "static"})
    outs = []
    for block in built.backbone.net.features[1:-1]:
        convs = [m for m in block.modules() if isinstance(m, nn.Conv2d)]
        assert len(convs) == 3 and len({c.out_channels for c in convs}) == 1 and convs[0].out_channels % 6 == 0
        assert convs[1].groups == convs[1].out_channels // 6
        outs.append(convs[0].out_channels)
    assert sorted(set(outs)) == [18, 24, 36, 66, 96, 162, 324]
    shuffle = _build("dynet_shuffle_x1_0", {"name": "static"}).backbone.net
    unit = shuffle.stage2[1]
    assert unit.split == (90, 30) and unit.branch2[3].groups == 15  # 116 -> 120, groups of 2
    assert shuffle.stage3[0].branch2[0].out_channels == 116  # the downsampling unit is ShuffleNetV2's
    resnet = _build("dynet_resnet50", {"name": "static"}).backbone.net
    assert [layer[-1].conv3.out_channels for layer in (resnet.layer1, resnet.layer4)] == [128, 1024]
    decisions = _build("dynet_resnet18", _op()).decisions
    static = {d.layer.name for d in decisions if not d.converted}
    assert static == {"conv1", "fc", "layer1.0.downsample.0", "layer2.0.downsample.0", "layer3.0.downsample.0",
                      "layer4.0.downsample.0"}


def test_macs_count_kernel_generation_and_coefficients():
    """count_macs of one dynamic layer at batch 1: the convolution once, the kernel generation (g_t MACs per
    kernel element) and the coefficient FC, as the paper's FLOPs (Table 5: 'g_t ... does not change the
    computation cost' beyond these)."""
    layer = DyNetConv2d(12, 24, (3, 3), 1, 1, 1, 2, False, g=6, predictor=CoefficientPredictor(12, 24 * 6))

    class Wrapper(nn.Module):  # count_macs reads the parameters' device through the module
        def __init__(self):
            super().__init__()
            self.layer = layer

        def forward(self, x):
            return self.layer(x)

    macs = count_macs(Wrapper(), (12, 8, 8)).total
    kernel = 24 * 6 * 3 * 3
    assert macs == kernel * 64 + 6 * kernel + 12 * 24 * 6


@pytest.mark.parametrize("op", ["dynet", "static"])
@pytest.mark.parametrize("backbone", DY_BACKBONES)
def test_dy_backbones_train_one_step(backbone, op):
    """Every Dy-* backbone (op=dynet: Dy-*, op=static: Fix-*) builds and takes an SGD step at 32 x 32, every
    dynamic layer and coefficient module getting a gradient; the features keep their declared strides."""
    op_cfg = _op(g=2) if op == "dynet" else {"name": "static"}
    built = _build(backbone, op_cfg)
    model = built.backbone.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = F.cross_entropy(model(torch.randn(2, 3, 32, 32)), torch.tensor([1, 7]))
    loss.backward()
    assert torch.isfinite(loss)
    optimizer.step()
    dynamic = [m for m in model.modules() if isinstance(m, DyNetConv2d)]
    assert bool(dynamic) == (op == "dynet")
    for module in dynamic:
        assert module.weight.grad is not None
    for name, param in getattr(model, "shared_inputs", nn.ModuleDict()).named_parameters():
        assert param.grad is not None, name
    with torch.no_grad():
        features = model.eval().forward_features(torch.randn(1, 3, 64, 64))
    for fmap, stride, channels in zip(features.values(), model.feature_strides, model.feature_channels):
        assert tuple(fmap.shape[1:]) == (channels, 64 // stride, 64 // stride)


def test_dynet_on_mobilenetv3_keeps_channels():
    """Dy-MobileNetV3: op=dynet on timm's MobileNetV3 keeps every width; SE branches and conv_head stay static;
    with `reduction: auto` on a backbone that states none, two linear layers (C_in/4)."""
    static = _build("mobilenetv3_small", {"name": "static"}).backbone
    built = _build("mobilenetv3_small", _op())
    for decision in built.decisions:
        module = built.backbone.net.get_submodule(decision.layer.name)
        original = static.net.get_submodule(decision.layer.name)
        if decision.converted:
            assert (module.in_channels, module.out_channels, module.groups) == (
                original.in_channels, original.out_channels, original.groups)
        else:
            assert decision.layer.role in ("stem", "se", "head", "classifier")
    assert all(isinstance(shared.summary.fc, nn.Sequential) for shared in built.backbone.shared_inputs.values())


# ------------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(("key", "value", "allowed"), [
    ("g", 0, "integers >= 1"), ("g", 1.5, "integers >= 1"), ("reduction", -0.25, "auto, 0 (one FC)"),
    ("reduction", 2, "a fraction in (0, 1]"), ("reduction", "half", "auto"), ("fusion", "outputs", "features"),
])
def test_bad_knob_is_refused(key, value, allowed):
    assert_knob_rejected(DYNET, key, value, allowed)


def test_hidden_width_that_rounds_to_zero_fails_at_build_time():
    """r * C_in < 1 hidden units cannot be rounded to a coefficient module: the error names op.reduction, its
    value, the block, its input channels and the values allowed there (Dy-mobile's first block reads 32)."""
    with pytest.raises(OperatorConfigError) as info:
        _build("dynet_mobile", _op(reduction=0.01))
    message = str(info.value)
    for part in ("op.reduction=0.01", "features.1", "32 input channels", "[0.03125, 1]", "0 (one FC)"):
        assert part in message, message


def test_dy_widths_that_cannot_be_rounded_fail_with_the_numbers():
    """The Dy-* rounding (multiples of the depthwise group size) takes positive integers only: anything else
    fails before a layer is built, naming the key, the value and the allowed values."""
    from dynconv.backbones.dynet_channels import dy_mobile_widths, dy_shuffle_widths

    assert dy_mobile_widths([16, 32, 320], 6) == [18, 36, 324]
    assert dy_shuffle_widths([116, 176], 2) == [120, 176]
    with pytest.raises(ValueError, match=r"dynet_shuffle: group_size=0 .* allowed values are integers >= 1"):
        dy_shuffle_widths([116], 0)
    with pytest.raises(ValueError, match=r"dynet_mobile: block width #1=2\.5 .* integers >= 1"):
        dy_mobile_widths([16, 2.5], 6)


def test_config_validation_reports_dynet_errors(compose_cfg):
    """Through train.py's validation (meta-device build): a ConfigError with the numbers, before any run."""
    from dynconv.config import ConfigError, validate_model_config

    cfg = compose_cfg(["backbone=dynet_mobile", "op=dynet", "op.reduction=0.01"])
    with pytest.raises(ConfigError, match=r"op\.reduction=0\.01 .* allowed values here"):
        validate_model_config(cfg)
    validate_model_config(compose_cfg(["backbone=dynet_shuffle_x1_0", "op=dynet"]))


# ------------------------------------------------------------------------------------ latency mode (Table 2)
def test_bench_latency_mode_against_another_backbone():
    """scripts/bench.py bench.mode=latency bench.baseline=<backbone>: batch-1 eval inference of the model against
    another backbone with op=static (Table 2: Dy-mobile vs MobileNetV2); the other measurements are null."""
    from test_bench import run_bench

    completed, result = run_bench(["backbone=dynet_mobile", "op=dynet", "op.g=2", "bench.mode=latency",
                                   "bench.baseline=mobilenetv2_100", "bench.resolution=32", "bench.repeats=2",
                                   "bench.warmup=1", "bench.steps=1"])
    assert completed.returncode == 0 and result is not None, completed.stderr[-2000:]
    assert (result["mode"], result["baseline"], result["backbone"]) == ("latency", "mobilenetv2_100", "dynet_mobile")
    assert result["batch1_inference_ratio"] == pytest.approx(
        result["batch1_inference_ms"] / result["static_batch1_inference_ms"], rel=1e-3)
    for key in ("train_step_ratio", "inference_ratio", "train_step_ms", "static_train_step_ms", "inference_ms",
                "static_inference_ms"):
        assert result[key] is None, key
    assert list(result["per_repeat_ratios"]) == ["batch1_inference"]
    assert "inference (batch 1)" in completed.stdout and "train step" not in completed.stdout


@pytest.mark.parametrize(("overrides", "message"), [
    ({"mode": "fast"}, r"bench\.mode='fast' is invalid; allowed values: full, latency"),
    ({"baseline": "resnet19"}, r"bench\.baseline='resnet19' is invalid; allowed values: null .*resnet18"),
    ({"baseline": "resnet18", "layers": True}, r"bench\.baseline='resnet18' cannot be combined .* allowed values"),
])
def test_bench_latency_knobs_are_validated(overrides, message):
    from omegaconf import OmegaConf

    from conftest import REPO
    from dynconv.benchmark import validate_bench_config
    from dynconv.config import ConfigError

    bench = OmegaConf.load(REPO / "configs" / "bench.yaml").bench
    validate_bench_config(bench)
    for key, value in overrides.items():
        bench[key] = value
    with pytest.raises(ConfigError, match=message):
        validate_bench_config(bench)
