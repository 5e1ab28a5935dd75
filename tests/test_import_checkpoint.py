"""scripts/import_checkpoint.py and dynconv/pretrained/reference_layouts (docs/pretrained.md): checkpoints in the
reference releases' layouts, made here with random values (tests/reference_releases.py re-implements the releases'
models from their code), become dynconv models that compute the release's function (float64, against the release's
forward re-implemented there), key for key; the other models and budgets of the releases map every key (shapes only,
on the meta device); what does not fit is refused, naming it."""

from __future__ import annotations

import argparse
import importlib.util
import json
from fractions import Fraction

import pytest
import torch

import dynconv
import reference_releases as R
from conftest import REPO
from dynconv.config import ConfigError
from dynconv.pretrained.reference_layouts import RELEASES, LayoutMismatch

pytestmark = pytest.mark.usefixtures("one_thread")
TOL = dict(rtol=1e-10, atol=1e-12)
HALF_MOBILENETV2 = ((1, 1, 1, 1, 1, 1, 0.5, 1, 0.5, 0.5), (1, 1, 1, 1, 1, 1, 0.5, 1, 0.5, 0.025),
                    (1, 1, 1, 1, 1, 1, 0.5, 1, 0.5, 1))  # kw1d2x_mobilenetv2.py: cells, in, out ratios


def kw_ratios(budget: str):
    b = float(Fraction(budget))
    return (b, 0.5, 0.5) if b < 1 else (b, 1.0, 1.0)


def double(state):
    return {key: value.double() if value.is_floating_point() else value for key, value in state.items()}


def imported(source, backbone, state, num_classes=10, meta=False, **knobs):
    """dynconv's model of the release, its state dict mapped from the release's `state`."""
    release = RELEASES[source]
    if meta:
        with torch.device("meta"):
            model = dynconv.create_model(backbone, op=release.op, num_classes=num_classes, **knobs)
    else:
        model = dynconv.create_model(backbone, op=release.op, num_classes=num_classes, **knobs)
    op_cfg = model.dynconv_config["op"]
    release.check_config(backbone, op_cfg)
    mapped = release.map(model, state, backbone, op_cfg, "the test checkpoint")
    if not meta:
        model.load_state_dict(mapped.state)
    return model.double().eval(), mapped


def set_tau(model, tau):
    for name, buffer in model.named_buffers():
        if name.endswith("attention.tau"):
            buffer.fill_(tau)


def x32():
    return torch.randn(2, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(5))


# ------------------------------------------------------------------ the release's function, computed

KW_FORWARD = [  # (backbone, budget, non-local basis ratio, tau); ResNet18 1x at tau = 0: the script's test below
    ("resnet18", "1", 1.0, 1.0),  # tau = 1: alpha = beta, which checks the cell allocation
    ("resnet18", "1/2", 1.0, 1.0),  # half-divisor cells and the zero cell
    ("resnet50", "1/2", 0.0625, 0.0),  # the non-local basis
]


@pytest.mark.parametrize("backbone,budget,basis,tau", KW_FORWARD, ids=[f"{b}-{k}-tau{t:g}" for b, k, _, t in KW_FORWARD])
def test_kernelwarehouse_resnet_computes_the_release_function(backbone, budget, basis, tau):
    network = R.resnet(int(backbone[6:]), "kw", 10)
    state = double(R.kw_state(network, *kw_ratios(budget), basis_ratio=basis))
    model, mapped = imported("kernelwarehouse", backbone, state, b=budget)
    assert mapped.mapped == len(state) and set(mapped.constants.values()) == {0.0}
    set_tau(model, tau)
    expected = R.ReferenceModel(network, state, kw_ratios=kw_ratios(budget), basis_ratio=basis, tau=tau).resnet(x32())
    with torch.no_grad():
        torch.testing.assert_close(model(x32()), expected, **TOL)


def test_kernelwarehouse_mobilenetv2_half_computes_the_release_function():
    """kw1d2x_mobilenetv2.py: per-warehouse ratios, static point-wise layers, a KernelWarehouse classifier."""
    network = R.mobilenetv2(1.0, "kw", 10, "1/2")
    state = double(R.kw_state(network, *HALF_MOBILENETV2, reduction=0.03125))
    model, _ = imported("kernelwarehouse", "mobilenetv2_100", state, b="1/2")
    expected = R.ReferenceModel(network, state, kw_ratios=HALF_MOBILENETV2).mobilenetv2(x32())
    with torch.no_grad():
        torch.testing.assert_close(model(x32()), expected, **TOL)


@pytest.mark.parametrize("backbone,kernels", [("resnet18", 1), ("mobilenetv2_100", 4)])
def test_odconv_computes_the_release_function(backbone, kernels):
    family = "resnet" if backbone.startswith("resnet") else "mobilenetv2"
    network = R.resnet(18, "od", 10) if family == "resnet" else R.mobilenetv2(1.0, "od", 10)
    state = double(R.od_state(network, kernels))
    model, mapped = imported("odconv", backbone, state, kernels=kernels)
    assert set(mapped.constants.values()) == {1.0}  # the release evaluates at T = 1
    expected = getattr(R.ReferenceModel(network, state, temperature=1.0), family)(x32())
    with torch.no_grad():
        torch.testing.assert_close(model(x32()), expected, **TOL)


# ---------------------------------------------------------------- every release's keys (shapes only)

LAYOUTS = [  # (source, backbone, op knobs, the release's state dict)
    ("kernelwarehouse", "resnet18", {"b": "1/4"}, lambda f: R.kw_state(R.resnet(18, "kw", 1000), *kw_ratios("1/4"),
                                                                      fill=f)),
    ("kernelwarehouse", "resnet18", {"b": 4}, lambda f: R.kw_state(R.resnet(18, "kw", 1000), *kw_ratios("4"), fill=f)),
    ("kernelwarehouse", "resnet50", {"b": 1}, lambda f: R.kw_state(R.resnet(50, "kw", 1000), *kw_ratios("1"), fill=f)),
    ("kernelwarehouse", "resnet50", {"b": 4}, lambda f: R.kw_state(R.resnet(50, "kw", 1000), *kw_ratios("4"), fill=f)),
    ("kernelwarehouse", "mobilenetv2_100", {"b": 4},
     lambda f: R.kw_state(R.mobilenetv2(1.0, "kw", 1000, "4"), *kw_ratios("4"), fill=f)),
    ("kernelwarehouse", "mobilenetv2_050", {"b": 1},
     lambda f: R.kw_state(R.mobilenetv2(0.5, "kw", 1000), *kw_ratios("1"), fill=f)),
    ("kernelwarehouse", "mobilenetv2_050", {"b": "1/2"},
     lambda f: R.kw_state(R.mobilenetv2(0.5, "kw", 1000, "1/2"), *HALF_MOBILENETV2, reduction=0.03125, fill=f)),
    ("kernelwarehouse", "convnext_tiny", {"b": 1, "layout": "release"},
     lambda f: R.kw_state(R.kw_convnext_tiny(1000), 1.0, 1.0, 1.0, norm="ln", fill=f)),
    ("odconv", "resnet50", {"kernels": 4}, lambda f: R.od_state(R.resnet(50, "od", 1000), 4, fill=f)),
    ("odconv", "mobilenetv2_050", {"kernels": 1}, lambda f: R.od_state(R.mobilenetv2(0.5, "od", 1000), 1, fill=f)),
]


@pytest.mark.parametrize("source,backbone,knobs,make", LAYOUTS,
                         ids=[f"{s}-{b}-{'-'.join(map(str, k.values()))}" for s, b, k, _ in LAYOUTS])
def test_every_key_of_the_release_maps(source, backbone, knobs, make):
    state = make(R.Filler(meta=True))
    model, mapped = imported(source, backbone, state, num_classes=1000, meta=True, **knobs)
    assert mapped.mapped == len(state)
    assert mapped.state.keys() == model.state_dict().keys()
    assert all(mapped.state[key].shape == value.shape for key, value in model.state_dict().items())
    statistics = ("running_mean", "running_var", "num_batches_tracked")
    release_params = sum(value.numel() for key, value in state.items() if not key.endswith(statistics))
    assert sum(p.numel() for p in model.parameters()) == release_params
    if backbone == "convnext_tiny":  # the release's README: 39.37M (the paper's layout: 32.99M)
        assert release_params == 39_370_674


# --------------------------------------------------------------------------------- what is refused

def test_a_layout_that_does_not_fit_names_what_differs():
    state = R.kw_state(R.resnet(18, "kw", 1000), *kw_ratios("1"), fill=R.Filler(meta=True))
    with pytest.raises(LayoutMismatch, match=r"1 keys left over.*: layer1.0.extra \(dynconv's model has no"):
        imported("kernelwarehouse", "resnet18", {**state, "layer1.0.extra": torch.empty(1, device="meta")},
                 num_classes=1000, meta=True, b=1)
    with pytest.raises(LayoutMismatch, match=r"1 keys missing from the checkpoint: net.layer2.0.bn1.running_var"):
        imported("kernelwarehouse", "resnet18", {k: v for k, v in state.items() if k != "layer2.0.bn1.running_var"},
                 num_classes=1000, meta=True, b=1)
    with pytest.raises(LayoutMismatch, match=r"warehouse 0 has 56 cells for 56 mixtures \(a budget of 1\), op.b=2 "
                                             r"gives 112: convert it with op.b=1"):
        imported("kernelwarehouse", "resnet18", state, num_classes=1000, meta=True, b=2)
    odconv = R.od_state(R.resnet(18, "od", 1000), 4, fill=R.Filler(meta=True))
    with pytest.raises(LayoutMismatch, match="4 kernels each, op.kernels=1: convert it with op.kernels=4"):
        imported("odconv", "resnet18", odconv, num_classes=1000, meta=True, kernels=1)


def test_knobs_that_change_the_function_but_no_key_are_refused():
    state = R.kw_state(R.kw_convnext_tiny(1000), 1.0, 1.0, 1.0, norm="ln", fill=R.Filler(meta=True))
    with pytest.raises(ConfigError, match=r"op.layout=paper is invalid for source=kernelwarehouse.*allowed values: "
                                          r"release"):
        imported("kernelwarehouse", "convnext_tiny", state, num_classes=1000, meta=True, b=1)
    with pytest.raises(ConfigError, match=r"op.attention=softmax is invalid .*allowed values: caf"):
        RELEASES["kernelwarehouse"].check_config("resnet18", {"b": 1, "attention": "softmax"})
    with pytest.raises(ConfigError, match=r"op.b=2 is invalid .*resnet50 at the budgets 1/2, 1, 4"):
        RELEASES["kernelwarehouse"].check_config("resnet50", {"b": 2})
    with pytest.raises(ConfigError, match=r"op.attention_function=caf is invalid for source=odconv"):
        RELEASES["odconv"].check_config("resnet18", {"attention_function": "caf"})


# ------------------------------------------------------------------ the script, eval.py and init_from

def _script():
    spec = importlib.util.spec_from_file_location("import_checkpoint_script", REPO / "scripts" / "import_checkpoint.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_script_writes_a_checkpoint_that_eval_and_init_from_load(tmp_path, data_dir, capsys):
    """A KernelWarehouse ResNet18 (1x) checkpoint as the release saves it ({"model", "args": Namespace, ...}) becomes
    a dynconv checkpoint: dynconv.load computes the release's function (at the release's evaluation tau = 0),
    eval.py's evaluation runs on it, init_from loads it into a fresh run's model."""
    from omegaconf import OmegaConf

    from dynconv.build import load_backbone_weights
    from dynconv.engine.checkpoint import load_checkpoint
    from dynconv.engine.evaluation_run import evaluate_checkpoint

    network = R.resnet(18, "kw", 10)
    state = R.kw_state(network, *kw_ratios("1"))
    release_file = tmp_path / "checkpoint-best.pth"
    torch.save({"model": state, "epoch": "best", "args": argparse.Namespace(model="kw_resnet18", drop_path=0.1)},
               release_file)
    out = tmp_path / "kw1x_resnet18.pt"
    digits = [f"data.root={data_dir / 'digits'}", "data.num_workers=0"]
    script = _script()
    args = ["source=kernelwarehouse", f"checkpoint={release_file}", f"out={out}", "backbone=resnet18", "op=kw",
            "op.b=1", *digits]
    assert script.main(args) == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["keys_mapped"] == len(state) and record["keys_set"] == {"tau=0": 19}
    assert record["out"] == str(out) and record["num_classes"] == 10

    model = dynconv.load(out).double()
    expected = R.ReferenceModel(network, double(state), kw_ratios=kw_ratios("1")).resnet(x32())
    with torch.no_grad():
        torch.testing.assert_close(model(x32()), expected, **TOL)

    eval_cfg = OmegaConf.create({"checkpoint": str(out), "weights": "model", "device": "cpu",
                                 "data": {"root": None, "num_workers": None, "max_val_samples": 16},
                                 "recipe": {"eval_batch_size": 16}, "task": {}})
    result = evaluate_checkpoint(eval_cfg)
    assert result["samples"] == 16 and result["params"] == record["params"]

    fresh = dynconv.create_model("resnet18", op="kw", b=1, tau=0, num_classes=10, image_size=32)  # a new run's
    assert load_backbone_weights(fresh, load_checkpoint(out), str(out)) == []
    assert torch.equal(fresh.warehouses["stage1"].cells, model.warehouses["stage1"].cells.float())


def test_the_script_exit_codes(tmp_path, capsys):
    script = _script()
    odconv = R.od_state(R.resnet(18, "od", 10), 1)
    release_file = tmp_path / "checkpoint.pth.tar"
    torch.save({"state_dict": {f"module.{key}": value for key, value in odconv.items()}, "epoch": 100}, release_file)
    base = [f"checkpoint={release_file}", f"out={tmp_path / 'out.pt'}", "backbone=resnet18"]
    assert script.main(["source=odconv", *base, "op=odconv", "op.kernels=4"]) == 1  # the layout does not fit
    assert "have 1 kernels each, op.kernels=4: convert it with op.kernels=1" in capsys.readouterr().err
    assert script.main(["source=odconv", *base, "op=odconv", "op.kernels=1", "data=imagenet"]) == 2
    assert "the checkpoint's classifier has 10 classes" in capsys.readouterr().err
    missing = [f"checkpoint={tmp_path / 'none.pth'}", f"out={tmp_path / 'out.pt'}", "backbone=resnet18"]
    assert script.main(["source=odconv", *missing, "op=odconv"]) == 2
    assert f"checkpoint not found: {tmp_path / 'none.pth'}" in capsys.readouterr().err
    for bad, message in ((["source=od", *base, "op=odconv"], "source='od' is invalid; allowed values: "
                                                              "kernelwarehouse, odconv"),
                         (["source=odconv", *base, "op=kw"], "op=kw is invalid for source=odconv"),
                         (["source=odconv", *base[:2], "backbone=resnet152", "op=odconv"],
                          "backbone=resnet152 is invalid for source=odconv")):
        with pytest.raises(SystemExit) as stopped:
            script.main(bad)
        assert stopped.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out.pt").exists()
