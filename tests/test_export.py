"""Export (dynconv.export, docs/export.md): every operator's layers export to ONNX and torch.export with a free
batch dimension and match eager within 1e-4 at batch 1, 3 and 8; ONNX never folds the batch into a
convolution's groups (onnx#3843); full networks through the public API; the folded plain timm model of the
reparameterisations; a layer that cannot be exported is named.

The exhaustive network matrix (every operator x ResNet18 / MobileNetV2 x both formats, ~9 minutes on 2 cores) is
tests/test_export_matrix.py, marked `matrix` (`pytest -m matrix`)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import dynconv
from dynconv.benchmark import inference_model
from dynconv.exporting import ExportError, export, onnx_file, program
from dynconv.exporting.diagnose import record_calls
from dynconv.exporting.inputs import check_inputs, max_abs_diff
from dynconv.functional import selector
from export_checks import BATCH_SIZES, TOLERANCE, model_groups, small_model

pytest.importorskip("onnxruntime")
pytestmark = pytest.mark.usefixtures("one_thread")

# Per backbone, the parts exported alone: a block with every kind of layer the operators convert (ResNet18's
# layer3.0: 3x3 stride 2, 3x3, 1x1 shortcut; MobileNetV2's blocks.2.0: pointwise, depthwise stride 2, pointwise)
# and the classifier where the operator converts it (DCD). A block carries its shared routing / GAP
# (`op.routing=block`, WeightNet's `op.gap=block`), which a layer alone would miss.
PARTS = {"resnet18": ("net.layer3.0", "net.fc"), "mobilenetv2_050": ("net.blocks.2.0", "net.classifier")}
OPS = dynconv.options("op")


class Parts(nn.Module):
    """Several modules side by side, one input each: exported as one graph (the ONNX exporter costs seconds per
    call whatever the graph's size)."""

    def __init__(self, modules):
        super().__init__()
        self.parts = nn.ModuleList(modules)

    def forward(self, *inputs):
        return tuple(part(x) for part, x in zip(self.parts, inputs))


def _operator_parts(op: str) -> tuple[Parts, list[torch.Tensor], set[int]]:
    """The parts of both backbones converted by `op`, their recorded inputs and the models' group counts."""
    modules, examples, groups = [], [], set()
    for backbone, names in PARTS.items():
        model = small_model(backbone, op)
        groups |= model_groups(model)
        calls = {call.name: call for call in record_calls(model, torch.randn(2, 3, 32, 32)).values()}
        for name in names:
            module = model.get_submodule(name)
            if type(module) is nn.Linear:  # a static classifier: nothing of the operator to export
                continue
            modules.append(module)
            examples.extend(calls[name].args)
    return Parts(modules).eval(), examples, groups


def _eager(module: nn.Module, inputs) -> tuple[torch.Tensor, ...]:
    with torch.no_grad(), selector.policy("model"):
        return module(*inputs)


def _distance(outputs, references) -> float:
    return max(max_abs_diff(list(output), list(reference)) for output, reference in zip(outputs, references))


@pytest.mark.parametrize("op", OPS)
def test_operator_layers_export_with_a_dynamic_batch(op, tmp_path):
    """The operator's parts of ResNet18 and MobileNetV2, exported with a free batch dimension (reparameterisations
    folded), match their eager selves at batch 1, 3 and 8, as a saved-and-loaded torch.export program and as ONNX
    in onnxruntime; the ONNX inputs' batch is a symbol and every Conv's group count is one the models' layers
    declare (never B x groups)."""
    parts, examples, groups = _operator_parts(op)
    batches = [[check_inputs(example, [size])[0] for example in examples] for size in BATCH_SIZES]
    references = [_eager(parts, inputs) for inputs in batches]
    assert all(reference.abs().max() > 1e-2 for outputs in references for reference in outputs)  # not silenced
    deployed, _ = inference_model(parts)  # WE, WS, WN, SN folded into plain weights, as dynconv.export does
    exported = program.export_program(deployed, *examples)
    program.save_program(exported, tmp_path / "parts.pt2")
    loaded = torch.export.load(str(tmp_path / "parts.pt2")).module()
    with torch.no_grad():
        assert _distance([loaded(*inputs) for inputs in batches], references) <= TOLERANCE
    onnx_file.write_onnx(exported, tmp_path / "parts.onnx", optimize=False)
    facts = onnx_file.graph_facts(tmp_path / "parts.onnx")
    assert facts["input_shape"][0] == "batch" and set(facts["conv_groups"]) <= groups, facts
    session = onnx_file.onnx_session(tmp_path / "parts.onnx")
    names = [entry.name for entry in session.get_inputs()]
    assert len(names) == len(examples)
    onnx_outputs = [[torch.from_numpy(array) for array in session.run(None, {name: x.numpy() for name, x in
                                                                              zip(names, inputs)})]
                    for inputs in batches]
    assert _distance(onnx_outputs, references) <= TOLERANCE


# ------------------------------------------------------------------------------ whole networks, public API

def test_mobilenetv2_condconv_exports_to_onnx(tmp_path):
    """dynconv.export on a whole MobileNetV2 whose depthwise layers are per-sample (the onnx#3843 case: folding the
    batch into groups froze it): a free batch in the written graph, only the model's own group counts, eager's
    outputs at 1, 3 and 8; the model leaves in the mode it came in (train), exported in eval."""
    model = small_model("mobilenetv2_050", "condconv").train()
    example = torch.randn(2, 3, 32, 32)
    report = export(model, tmp_path / "model.onnx", format="onnx", example_input=example, optimize=False)
    assert model.training
    assert report["format"] == "onnx" and report["mode"] == "eval" and report["batch_sizes"] == [1, 3, 8]
    assert report["input_shape"] == ["batch", 3, 32, 32] and report["opset"] >= 18
    assert report["max_abs_diff"] <= TOLERANCE and report["within_tolerance"]
    assert set(report["conv_groups"]) <= model_groups(model) and max(report["conv_groups"]) > 1  # depthwise
    assert onnx_file.graph_facts(tmp_path / "model.onnx")["input_shape"][0] == "batch"


def test_resnet18_kw_exports_with_torch_export(tmp_path):
    """dynconv.export to a .pt2 file: torch.export.load gives a module that runs at a batch size the checks never
    saw (5) and matches eager."""
    model = small_model("resnet18", "kw")
    report = export(model, tmp_path / "model.pt2", format="torch_export", example_input=torch.randn(1, 3, 32, 32))
    assert report["max_abs_diff"] <= TOLERANCE and report["opset"] is None
    loaded = torch.export.load(str(tmp_path / "model.pt2")).module()
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad(), selector.policy("model"):
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=TOLERANCE)


def test_bad_arguments_are_refused(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten())
    with pytest.raises(ValueError, match="format='tflite' is invalid; allowed values: onnx, torch_export, folded"):
        export(model, tmp_path / "m", format="tflite")
    with pytest.raises(ValueError, match="batch_sizes"):
        export(model, tmp_path / "m", format="torch_export", example_input=torch.randn(2, 3, 8, 8), batch_sizes=[0])


# ------------------------------------------------------------------------------------------------- folded

FOLDABLE = ["we", "lwe", "mwe", "weight_std", "weight_norm", "spectral_norm"]


@pytest.mark.parametrize("op", FOLDABLE)
def test_reparameterisations_fold_to_the_plain_timm_resnet18(op, tmp_path):
    """The folded file is a state dict of timm's own resnet18: it loads strictly into
    timm.create_model("resnet18", num_classes=10) and gives the dynconv model's eval outputs."""
    import timm

    model = small_model("resnet18", op)
    report = export(model, tmp_path / "plain.pt", format="folded")
    assert (report["library"], report["constructor"], report["kwargs"]) == ("timm", "resnet18", {"num_classes": 10})
    assert report["max_abs_diff"] <= TOLERANCE
    plain = timm.create_model("resnet18", num_classes=10).eval()
    plain.load_state_dict(torch.load(tmp_path / "plain.pt", weights_only=True))
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(plain(x), model(x), rtol=0, atol=TOLERANCE)


def test_folded_file_loads_with_timm_alone(tmp_path):
    """The recipe written beside the weights runs in a Python that imports timm and torch, never dynconv."""
    import json
    import subprocess
    import sys

    model = small_model("resnet18", "weight_std")
    report = export(model, tmp_path / "plain.pt", format="folded", batch_sizes=[2])
    recipe = json.loads((tmp_path / "plain.json").read_text())
    assert recipe["load"] == report["load"]
    x = torch.randn(2, 3, 32, 32)
    torch.save(x, tmp_path / "x.pt")
    with torch.no_grad():
        torch.save(model(x), tmp_path / "expected.pt")
    code = (f"import sys, timm, torch\nmodel = {recipe['load'].split('.load_state_dict')[0]}\n"
            f"model.load_state_dict(torch.load({str(tmp_path / 'plain.pt')!r}, weights_only=True))\n"
            f"y = model.eval()(torch.load({str(tmp_path / 'x.pt')!r}))\n"
            f"assert (y - torch.load({str(tmp_path / 'expected.pt')!r})).abs().max() <= {TOLERANCE}\n"
            "assert not [name for name in sys.modules if name.startswith('dynconv')]\nprint('ok')\n")
    completed = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0 and completed.stdout.strip() == "ok", completed.stderr[-2000:]


def test_dynamic_layers_do_not_fold(tmp_path):
    """A dynamic operator has no static twin: the folded format names the first dynamic layer and says why."""
    model = small_model("resnet18", "condconv")
    with pytest.raises(ExportError) as info:
        export(model, tmp_path / "plain.pt", format="folded")
    error = info.value
    assert (error.layer, error.layer_type) == ("net.layer1.0.conv1", "CondConv2d")
    assert "computed from each input" in str(error) and "format=onnx" in str(error)
    assert not (tmp_path / "plain.pt").exists()


# ---------------------------------------------------------------------------- a layer that cannot export

class SignGate(nn.Module):
    """Branches in Python on the data: no graph can hold that."""

    def forward(self, x):
        return x if x.mean() > 0 else -x


@torch.library.custom_op("dynconv_tests::double", mutates_args=())
def double(x: torch.Tensor) -> torch.Tensor:
    return 2 * x


@double.register_fake
def _double_shape(x):
    return torch.empty_like(x)


class Double(nn.Module):
    """A custom operator torch.export records but no ONNX translation exists for."""

    def forward(self, x):
        return double(x)


def test_a_layer_that_cannot_be_traced_is_named(tmp_path):
    """torch.export fails on a data-dependent branch deep inside a ResNet18; the error names that module (by its
    name in the model) and the exporter's reason, not only the model."""
    model = small_model("resnet18", "static")
    model.net.layer2[0].conv2 = nn.Sequential(model.net.layer2[0].conv2, SignGate())
    with pytest.raises(ExportError) as info:
        export(model, tmp_path / "model.pt2", format="torch_export")
    error = info.value
    assert (error.layer, error.layer_type, error.format) == ("net.layer2.0.conv2.1", "SignGate", "torch_export")
    assert "data-dependent" in error.reason.lower(), error.reason
    assert "layer 'net.layer2.0.conv2.1' (SignGate)" in str(error)


def test_a_layer_without_an_onnx_translation_is_named(tmp_path):
    """torch.export succeeds but the ONNX translation fails (an operator without a translation): the layer using
    it is named, with the missing operator; the scratch files of the diagnosis are gone."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), Double(), nn.Flatten())
    with pytest.raises(ExportError) as info:
        export(model, tmp_path / "model.onnx", format="onnx", example_input=torch.randn(2, 3, 8, 8), optimize=False)
    assert (info.value.layer, info.value.layer_type) == ("1", "Double")
    assert "dynconv_tests" in info.value.reason or "double" in info.value.reason, info.value.reason
    assert sorted(path.name for path in tmp_path.iterdir()) in ([], ["model.onnx"])
