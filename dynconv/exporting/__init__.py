"""Models out (docs/export.md): ONNX and torch.export with a dynamic batch dimension, and the folded plain model of
the training-time reparameterisations, each checked against the eager model at several batch sizes.

    report = dynconv.export(model, "model.onnx", format="onnx", example_input=x)

Modules: `run` (the `export` entry point), `program` (torch.export), `onnx_file` (ONNX and onnxruntime), `folded`
(the plain library network), `diagnose` (which layer stops an export), `inputs` (trace and check inputs),
`errors`, `latency` (onnxruntime timing against the static model, scripts/bench_onnx.py).
"""

from dynconv.exporting.errors import ExportError
from dynconv.exporting.run import EXPORT_FORMATS, export

__all__ = ["EXPORT_FORMATS", "ExportError", "export"]
