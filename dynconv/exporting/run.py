"""`dynconv.export(model, path, format=...)`: write the model in one format and check the written file against
the eager model at several batch sizes. The formats (docs/export.md):

- "onnx": torch.export with a free batch dimension, translated by torch.onnx's exporter, run with onnxruntime;
- "torch_export": the same ExportedProgram, saved with `torch.export.save` (.pt2) and loaded back to run;
- "folded": the plain library network (timm / torchvision) with the training-time reparameterisations folded
  into its weights, as a state dict, loaded into a freshly built library network to run.

Every format is checked in eval mode (BatchNorm's running statistics: what is deployed); the model is put in eval
mode for the export and given back in the mode it came in. For "onnx" and "torch_export" the training-time
reparameterisations are folded first as well (`fold_for_inference`): their graph would recompute the same weights
at every call. The dynamic layers record their batch-independent algorithms (`selector.exporting()`), so the
exported graph serves any batch size; the checks run it at each of `batch_sizes`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn as nn

from dynconv.benchmark import inference_model
from dynconv.exporting import folded as folded_format
from dynconv.exporting import onnx_file, program as program_format
from dynconv.exporting.diagnose import attempt_with, locate_failure
from dynconv.exporting.errors import ExportError, exporter_reason
from dynconv.exporting.inputs import (DEFAULT_BATCH_SIZES, DEFAULT_TOLERANCE, check_inputs, default_example,
                                   eager_outputs, max_abs_diff)

EXPORT_FORMATS = ("onnx", "torch_export", "folded")


def export(model: nn.Module, path: str | Path, format: str = "onnx", *, example_input: torch.Tensor | None = None,
           batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES, tolerance: float = DEFAULT_TOLERANCE,
           opset: int | None = None, optimize: bool = True) -> dict:
    """Write `model` to `path` in `format` and compare the file's outputs with the eager model's at each batch
    size. Returns {"format", "path", "max_abs_diff", "within_tolerance", "batch_sizes", "tolerance", "mode",
    "input_shape", "folded_reparameterisations", "seconds", ...} (onnx: "opset", "conv_groups"; folded: "library",
    "constructor", "kwargs", "load"). Raises ExportError naming the layer that cannot be exported and why.

    `example_input`: one input batch (B, 3, H, W) (default: two N(0, 1) images at the model's resolution); the
    checks feed N(0, 1) batches of its shape at each of `batch_sizes`. `opset`, `optimize`: the ONNX exporter's
    opset (None: its default) and graph optimiser (off: a translation about twice as fast, same results)."""
    if format not in EXPORT_FORMATS:
        raise ValueError(f"format={format!r} is invalid; allowed values: {', '.join(EXPORT_FORMATS)}")
    sizes = [int(size) for size in batch_sizes]
    if not sizes or min(sizes) < 1:
        raise ValueError(f"batch_sizes={list(batch_sizes)!r} is invalid; allowed values: a list of integers >= 1")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    example = default_example(model) if example_input is None else example_input
    started = time.perf_counter()
    modes = {module: module.training for module in model.modules()}  # restored module by module (frozen parts)
    model.eval()
    try:
        inputs = check_inputs(example, sizes)
        writer = {"onnx": _onnx, "torch_export": _torch_export, "folded": _folded}[format]
        outputs, details = writer(model, path, example, inputs, opset=opset, optimize=optimize)
        difference = max_abs_diff(outputs, eager_outputs(model, inputs))
    finally:
        for module, training in modes.items():
            module.training = training
    return {"format": format, "path": str(path), "max_abs_diff": difference,
            "within_tolerance": difference <= tolerance, "batch_sizes": sizes, "tolerance": tolerance,
            "mode": "eval", "input_shape": ["batch", *example.shape[1:]], "opset": None, **details,
            "seconds": round(time.perf_counter() - started, 2)}


def _traced(model: nn.Module, example: torch.Tensor, format: str) -> torch.export.ExportedProgram:
    """torch.export of `model`; on failure, ExportError naming the layer to blame."""
    try:
        return program_format.export_program(model, example)
    except Exception as error:  # noqa: BLE001 - torch.export raises many types; each is reported with its layer
        raise _blame(model, example, format, error, program_format.export_program) from error


def _blame(model: nn.Module, example: torch.Tensor, format: str, error: Exception,
           export_fn: Callable[..., object]) -> ExportError:
    """The ExportError for `error`: the innermost module whose `export_fn(module, *its inputs)` fails alone
    (`diagnose.locate_failure`), or the model with the exporter's reason when no module fails alone."""
    culprit = locate_failure(model, example, attempt_with(export_fn))
    if culprit is None:
        return ExportError(format, f"{exporter_reason(error)} (no single layer fails alone)")
    return ExportError(format, culprit.reason, culprit.name, type(culprit.module).__name__)


def _onnx(model, path, example, inputs, *, opset, optimize):
    deployed, folded = inference_model(model)
    exported = _traced(deployed, example, "onnx")
    scratch = path.with_name(path.name + ".layer.onnx")  # what the per-layer diagnosis writes, then removes

    def trace_and_translate(module: nn.Module, *args: torch.Tensor) -> None:
        onnx_file.write_onnx(program_format.export_program(module, *args), scratch, opset, optimize)

    try:
        onnx_file.write_onnx(exported, path, opset, optimize)
    except Exception as error:  # noqa: BLE001 - the translation failed: translate layer by layer to name the layer
        raise _blame(deployed, example, "onnx", error, trace_and_translate) from error
    finally:
        scratch.unlink(missing_ok=True)
    facts = onnx_file.graph_facts(path)
    if isinstance(facts["input_shape"][0], int):
        raise ExportError("onnx", f"the written graph's input has a fixed batch of {facts['input_shape'][0]}")
    return onnx_file.run_onnx(path, inputs), {**facts, "folded_reparameterisations": folded}


def _torch_export(model, path, example, inputs, *, opset, optimize):
    deployed, folded = inference_model(model)
    exported = _traced(deployed, example, "torch_export")
    program_format.save_program(exported, path)
    return program_format.run_saved_program(path, inputs), {"folded_reparameterisations": folded}


def _folded(model, path, example, inputs, *, opset, optimize):
    net, library = folded_format.plain_network(model)
    torch.save(net.state_dict(), path)
    plain = library.build()
    try:
        plain.load_state_dict(torch.load(path, weights_only=True))
    except RuntimeError as error:
        raise ExportError("folded", f"the folded weights do not load into {library.library} "
                          f"{library.constructor}: {str(error).splitlines()[0]}") from None
    plain.eval()
    with torch.no_grad():
        outputs = [plain(x) for x in inputs]
    recipe = {"library": library.library, "constructor": library.constructor, "kwargs": library.kwargs,
              "load": library.load_snippet(str(path))}
    path.with_suffix(".json").write_text(json.dumps(recipe, indent=2) + "\n")
    return outputs, {**recipe, "folded_reparameterisations": True}
