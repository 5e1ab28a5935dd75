"""torch.export with a dynamic batch dimension: one ExportedProgram, saved as a .pt2 file and also what the ONNX
writer translates (one trace for both formats)."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn

from dynconv.exporting.inputs import TRACE_BATCH, trace_input
from dynconv.functional import selector

BATCH_DIM = "batch"  # the symbol's name, also the ONNX input's dim_param


def export_program(module: nn.Module, *args: torch.Tensor) -> torch.export.ExportedProgram:
    """`module` traced with dim 0 of every argument of `TRACE_BATCH` samples free (`Dim("batch")`), inside
    `selector.exporting()`, so that every dynamic layer records its batch-independent algorithm."""
    args = tuple(trace_input(arg) if arg.dim() and arg.shape[0] < TRACE_BATCH else arg for arg in args)
    batch = torch.export.Dim(BATCH_DIM)
    dynamic = tuple({0: batch} if arg.dim() and arg.shape[0] == TRACE_BATCH else None for arg in args)
    if _takes_varargs(module):  # forward(self, *inputs): the specs are one entry, like the packed arguments
        dynamic = (dynamic,)
    with selector.exporting():
        return torch.export.export(module, args, dynamic_shapes=dynamic)


def _takes_varargs(module: nn.Module) -> bool:
    parameters = list(inspect.signature(module.forward).parameters.values())
    return len(parameters) == 1 and parameters[0].kind is inspect.Parameter.VAR_POSITIONAL


def save_program(program: torch.export.ExportedProgram, path: Path) -> None:
    torch.export.save(program, str(path))


def run_saved_program(path: Path, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The saved program, loaded back from `path`, on each input: what a user of the file gets."""
    module = torch.export.load(str(path)).module()
    with torch.no_grad():
        return [module(x) for x in inputs]
