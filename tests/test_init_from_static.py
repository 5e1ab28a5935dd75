"""init_from_static (dynconv/pretrained/, docs/pretrained.md): a dynamic model started from a static network's
weights computes the static network's function where the operator allows it exactly (float64, eval mode, BatchNorm
statistics calibrated away from 0 / 1), says where it does not and why, and refuses weights that do not fit."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import dynconv
from conftest import SMOKE, describe
from dynconv.config import ConfigError
from dynconv.pretrained import init_from_static

pytestmark = pytest.mark.usefixtures("one_thread")
TOL = dict(rtol=1e-10, atol=1e-12)


def calibrated(model: nn.Module, seed: int = 1) -> nn.Module:
    """Trained-looking BatchNorms: running statistics and affine parameters away from their initial values."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.running_mean is not None:
                module.running_mean.normal_(0.0, 0.1, generator=generator)
                module.running_var.uniform_(0.5, 1.5, generator=generator)
                module.weight.normal_(1.0, 0.1, generator=generator)
                module.bias.normal_(0.0, 0.1, generator=generator)
    return model


def static_and_dynamic(backbone: str, op: str, **knobs):
    """timm's network (random "ImageNet weights"), and the dynconv model of `op` started from it, both float64."""
    import timm

    torch.manual_seed(0)
    static = calibrated(timm.create_model(backbone, num_classes=10)).double().eval()
    dynamic = dynconv.create_model(backbone, op=op, num_classes=10, **knobs).double().eval()
    report = init_from_static(dynamic, static.state_dict())
    return static, dynamic, report


def outputs(static, dynamic, side=32):
    x = torch.randn(2, 3, side, side, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        return static(x), dynamic(x)


EXACT = [
    ("resnet18", "odconv", {"kernels": 2}),  # channel, filter, spatial and kernel attentions
    ("mobilenetv2_050", "odconv", {}),  # depth-wise (no filter attention), 1x1 with one kernel (no spatial)
    ("mobilenetv2_050", "dyconv", {"kernels": 2}),
    ("mobilenetv2_050", "condconv", {"experts": 2}),
    ("mobilenetv2_050", "condconv", {"experts": 2, "routing": "block"}),
    ("mobilenetv2_050", "weightnet", {"lam": 2}),
    ("mobilenetv2_050", "kw", {"b": 2}),
    ("mobilenetv2_050", "kw", {"b": 1, "omni": True}),
    ("mobilenetv2_050", "we", {"standardize": False, "regular": "lwe_mwe"}),
]


@pytest.mark.parametrize("backbone,op,knobs", EXACT, ids=[f"{b}-{o}-{'-'.join(map(str, k.values()))}"
                                                        for b, o, k in EXACT])
def test_exact_operators_start_as_the_static_network(backbone, op, knobs):
    static, dynamic, report = static_and_dynamic(backbone, op, **knobs)
    assert report.layers and report.exact, report.summary()
    expected, got = outputs(static, dynamic)
    torch.testing.assert_close(got, expected, **TOL)
    if op == "condconv":  # the experts differ, so that the (zeroed) routing can learn to tell them apart
        experts = dynamic.net.blocks[1][0].conv_pw.weight
        assert not torch.equal(experts[0], experts[1])


def test_kernelwarehouse_half_budget_is_the_block_diagonal_part_of_the_kernel():
    """b = 1/2: cells of half the channels, and the mixtures off the block diagonal read the zero cell, so at tau = 1
    the layer is the static kernel's two diagonal blocks (a 2-group convolution): not exact, and reported so."""
    static, dynamic, report = static_and_dynamic("resnet18", "kw", b="1/2")
    assert not report.exact and "zero cell" in report.layers["layer1.0.conv1"].how
    layer = dynamic.net.layer1[0].conv1
    alpha, _ = layer.attention(torch.zeros(1, 64, dtype=torch.float64))  # tau = 1: alpha = beta
    kernel = layer.kernels(torch.zeros(1, 64, dtype=torch.float64))[0][0]
    assert torch.equal(alpha, layer.attention.beta[None, :, :-1].to(alpha))
    weight = static.layer1[0].conv1.weight
    torch.testing.assert_close(kernel[:32, :32], weight[:32, :32], **TOL)
    torch.testing.assert_close(kernel[32:, 32:], weight[32:, 32:], **TOL)
    assert torch.count_nonzero(kernel[:32, 32:]) == 0 and torch.count_nonzero(kernel[32:, :32]) == 0


def test_standardised_weight_excitation_is_not_exact_and_says_why():
    static, dynamic, report = static_and_dynamic("resnet18", "lwe")
    assert not report.exact and "standardises" in report.layers["layer1.0.conv1"].how
    original = dynamic.net.layer1[0].conv1.parametrizations.weight.original
    assert torch.equal(original, static.layer1[0].conv1.weight)


def test_torchvision_mobilenetv2_weights_start_timm_names():
    """torchvision's MobileNetV2 (features.*, classifier.1) is renamed to timm's: the converted model computes
    torchvision's network."""
    import torchvision

    torch.manual_seed(0)
    static = calibrated(torchvision.models.mobilenet_v2(num_classes=10)).double().eval()
    dynamic = dynconv.create_model("mobilenetv2_100", op="dyconv", kernels=2, num_classes=10).double().eval()
    report = init_from_static(dynamic, static.state_dict())
    assert report.exact
    expected, got = outputs(static, dynamic)
    torch.testing.assert_close(got, expected, **TOL)


def test_a_dynconv_static_checkpoint_and_another_class_count(tmp_path, data_dir):
    """A dynconv op=static best.pt (keys under net.) loads; its 10-class classifier into a 5-class model is skipped
    and reported, the rest copied."""
    from figure_checkpoints import make_checkpoint

    path = make_checkpoint(tmp_path / "static.pt", data_dir, ["op=static"])
    dynamic = dynconv.create_model("resnet18", op="odconv", num_classes=5)
    report = init_from_static(dynamic, str(path))
    assert sorted(report.skipped) == ["fc.bias", "fc.weight"] and not report.exact
    assert len(report.layers) == 16 and all(start.exact for start in report.layers.values())
    saved = torch.load(path, weights_only=True)["model"]
    assert torch.equal(dynamic.net.bn1.running_var, saved["net.bn1.running_var"])


def test_timm_prefix_asks_timm_for_its_pretrained_weights(monkeypatch):
    import timm

    asked = []
    real = timm.create_model

    def fake(name, pretrained=False, **kwargs):
        asked.append((name, pretrained))
        return real("resnet18", num_classes=1000)

    dynamic = dynconv.create_model("resnet18", op="dyconv", kernels=2)
    monkeypatch.setattr(timm, "create_model", fake)
    assert init_from_static(dynamic, "timm:resnet18.tv_in1k").exact
    assert asked == [("resnet18.tv_in1k", True)]


def test_weights_that_do_not_fit_are_refused_naming_the_keys_before_changing_anything():
    import timm

    dynamic = dynconv.create_model("resnet18", op="dyconv", kernels=2, num_classes=10)
    before = {key: value.clone() for key, value in dynamic.state_dict().items()}
    state = timm.create_model("resnet18", num_classes=10).state_dict()
    with pytest.raises(ValueError, match=r"layer1.0.conv1: the static kernel is \(64, 64, 1, 1\), the layer's "
                                         r"\(64, 64, 3, 3\)"):
        init_from_static(dynamic, {**state, "layer1.0.conv1.weight": torch.zeros(64, 64, 1, 1)})
    with pytest.raises(ValueError, match=r"1 keys in the static weights but not in the model \(extra.weight\)"):
        init_from_static(dynamic, {**state, "extra.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"1 keys missing from the static weights \(bn1.running_var\)"):
        init_from_static(dynamic, {k: v for k, v in state.items() if k != "bn1.running_var"})
    with pytest.raises(ValueError, match="use init_from=<checkpoint>"):
        init_from_static(dynamic, dynamic.state_dict())
    assert all(torch.equal(value, before[key]) for key, value in dynamic.state_dict().items())  # nothing changed
    with pytest.raises(ValueError, match=r"no rule for layer1.0.conv1 \(SKConv2d.*condconv, dyconv, odconv, kw"):
        init_from_static(dynconv.create_model("resnet18", op="sk", num_classes=10), state)


def test_the_config_key_is_checked_before_anything_runs(tmp_path):
    from dynconv.config_checks import init_from_static as rule
    from dynconv.knobs import Knobs

    def check(**values):
        rule(Knobs({"init_from": None, **values}, error=ConfigError), "init_from_static")

    weights = tmp_path / "w.pth"
    torch.save({}, weights)
    check(init_from_static=str(weights))
    check(init_from_static="timm:resnet18.tv_in1k")
    with pytest.raises(ConfigError, match="init_from_static='missing.pth': no such checkpoint file"):
        check(init_from_static="missing.pth")
    with pytest.raises(ConfigError, match="timm has no pretrained weights named 'nonet'"):
        check(init_from_static="timm:nonet")
    with pytest.raises(ConfigError, match="init_from_static=.* and init_from=.* are both set"):
        check(init_from_static=str(weights), init_from=str(weights))


def test_train_py_starts_from_static_weights(run_train, tmp_path, data_dir):
    """A real (short) train.py run: the static checkpoint's weights start every CondConv layer, exactly."""
    from figure_checkpoints import make_checkpoint

    path = make_checkpoint(tmp_path / "static.pt", data_dir, ["op=static"])
    completed, result = run_train(["op=condconv", "op.experts=2", f"init_from_static={path}", *SMOKE,
                                   "recipe.epochs=1", "data.max_train_samples=32", "data.max_val_samples=32"],
                                  tmp_path)
    assert completed.returncode == 0 and result["status"] == "completed", describe(completed)
    log = completed.stdout + completed.stderr
    assert f"initialised from the static weights {path}" in log, describe(completed)
    assert "19 dynamic layers started from the static kernels (19 exactly)" in log, describe(completed)
