"""ONNX: an ExportedProgram translated by torch.onnx's dynamo-based exporter (the TorchScript one traced the
per-sample im2col's kernel size as a tensor and failed on these models), run with onnxruntime, and the facts of the
written graph that say its batch is free."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path
from typing import Sequence

import torch

from dynconv.exporting.program import BATCH_DIM


def write_onnx(program: torch.export.ExportedProgram, path: Path, opset: int | None = None,
               optimize: bool = True) -> None:
    """Translate `program` to ONNX at `path` (opset None: the exporter's default). `optimize` runs the exporter's
    graph optimiser (constant folding, dead code), which makes the translation about twice as long."""
    # The exporter prints its progress to stdout, where the scripts keep their one JSON line.
    with contextlib.redirect_stdout(io.StringIO()):
        onnx_program = torch.onnx.export(program, dynamo=True, opset_version=opset, optimize=optimize,
                                         verbose=False)
    _name_batch_dimension(onnx_program.model)
    onnx_program.save(str(path))


def _name_batch_dimension(model) -> None:
    """Call the input's first dimension "batch" wherever its symbol appears (the exporter keeps torch's internal
    name, e.g. "s77", and derived sizes such as "2*s77")."""
    import onnx_ir as ir  # torch.onnx's graph library: imported only when ONNX is written
    first = model.graph.inputs[0].shape[0]
    symbol = getattr(first, "value", None)
    if not isinstance(symbol, str):
        return
    pattern = re.compile(rf"\b{re.escape(symbol)}\b")
    values = [*model.graph.inputs, *model.graph.outputs, *(value for node in model.graph for value in node.outputs)]
    for value in values:
        if value.shape is None:
            continue
        dims = [ir.SymbolicDim(pattern.sub(BATCH_DIM, dim.value)) if isinstance(getattr(dim, "value", None), str)
                else dim for dim in value.shape]
        value.shape = ir.Shape(dims)


def graph_facts(path: Path) -> dict:
    """{"opset", "input_shape" (a name where a dimension is symbolic), "conv_groups" (every Conv's group count)}."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    dims = model.graph.input[0].type.tensor_type.shape.dim
    nodes = list(model.graph.node) + [node for function in model.functions for node in function.node]
    groups = {next((attribute.i for attribute in node.attribute if attribute.name == "group"), 1)
              for node in nodes if node.op_type == "Conv"}
    opset = next(entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx"))
    return {"opset": int(opset), "input_shape": [dim.dim_param or int(dim.dim_value) for dim in dims],
            "conv_groups": sorted(groups)}


def onnx_session(path: Path, threads: int | None = None):
    """An onnxruntime CPU session of the file; `threads` intra-op threads (None: onnxruntime's default)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # errors only: it warns about every CastLike it cannot constant-fold
    if threads is not None:
        options.intra_op_num_threads = threads
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_onnx(path: Path, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The file's output for each input, with onnxruntime on the CPU."""
    session = onnx_session(path)
    name = session.get_inputs()[0].name
    return [torch.from_numpy(session.run(None, {name: x.detach().cpu().numpy()})[0]) for x in inputs]
