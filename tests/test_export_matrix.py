"""The exhaustive export matrix: every operator on the whole ResNet18 and MobileNetV2 (0.5x), exported once with a
free batch dimension, saved as a torch.export program and translated to ONNX, both matching eager within 1e-4 at
batch 1, 3 and 8 (about 9 minutes on 2 CPU cores: the exporters cost seconds per graph). Marked `matrix`, outside
the default run: `pytest -m matrix`. The default run covers every operator's layers and a subset of whole networks
(tests/test_export.py)."""

from __future__ import annotations

import pytest
import torch

import dynconv
from dynconv.benchmark import inference_model
from dynconv.exporting import onnx_file, program
from dynconv.exporting.inputs import check_inputs, eager_outputs, max_abs_diff
from export_checks import BATCH_SIZES, TOLERANCE, model_groups, small_model

pytest.importorskip("onnxruntime")
pytestmark = [pytest.mark.matrix, pytest.mark.usefixtures("one_thread")]


@pytest.mark.parametrize("backbone", ["resnet18", "mobilenetv2_050"])
@pytest.mark.parametrize("op", dynconv.options("op"))
def test_network_exports_with_a_dynamic_batch(op, backbone, tmp_path):
    model = small_model(backbone, op)
    example = torch.randn(2, 3, 32, 32)
    inputs = check_inputs(example, BATCH_SIZES)
    reference = eager_outputs(model, inputs)
    deployed, _ = inference_model(model)
    exported = program.export_program(deployed, example)  # one trace, both formats (as dynconv.export writes them)
    program.save_program(exported, tmp_path / "model.pt2")
    assert max_abs_diff(program.run_saved_program(tmp_path / "model.pt2", inputs), reference) <= TOLERANCE
    onnx_file.write_onnx(exported, tmp_path / "model.onnx", optimize=False)
    facts = onnx_file.graph_facts(tmp_path / "model.onnx")
    assert facts["input_shape"][0] == "batch" and set(facts["conv_groups"]) <= model_groups(model), facts
    assert max_abs_diff(onnx_file.run_onnx(tmp_path / "model.onnx", inputs), reference) <= TOLERANCE
