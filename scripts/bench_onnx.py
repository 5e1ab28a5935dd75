"""onnxruntime latency of every operator on one backbone, each exported to ONNX with a dynamic batch
(`dynconv.export`) and timed against the static backbone's ONNX in the same run (docs/export.md).

    python scripts/bench_onnx.py backbone=resnet18 ops=all batch_sizes=[1,16] out=benchmarks/onnx_resnet18
    python scripts/bench_onnx.py ops=[condconv,kw] repeats=3 threads=2

Fresh weights (seed 0), eval mode, `resolution` px, `num_classes` classes. Each export is first compared with its
eager model at `check_batch_sizes` (the table's max abs difference), then its onnxruntime session is timed
interleaved with the static model's at each of `batch_sizes` (`dynconv.exporting.latency`). Writes <out>/table.md
and <out>/results.json; the last stdout line is one JSON object {"out", "backbone", "resolution", "batch_sizes",
"rows": [{"op", "batches": {batch: {"ms", "static_ms", "ratio"}}, "onnx_mb", "max_abs_diff"}, ...]}, the first row
the static model (at each batch the median of its times measured beside the operators). An operator that cannot be
exported gets a row with its error (the layer and why) and the script exits 1; exit 2 for a bad config.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dynconv.compose import compose_or_exit, drop_scripts_dir_from_path  # noqa: E402

drop_scripts_dir_from_path(__file__)


def config(argv: list[str]):
    """The composed config of these command-line arguments (exit 2 on a bad one); nothing runs.
    tests/test_docs_commands.py composes every documented command of this script through it."""
    return compose_or_exit("bench_onnx", argv, validate="none")


def settings(cfg) -> dict:
    """The validated settings; ConfigError naming the key and the allowed values."""
    import dynconv
    from dynconv.config import ConfigError
    from dynconv.knobs import Knobs

    knobs = Knobs(cfg, error=ConfigError)
    backbone = str(cfg.backbone.name)  # composed from the backbone group: a name Hydra has already checked
    operators = [op for op in dynconv.options("op") if op != "static"]
    ops = operators if cfg.ops == "all" else knobs.strings("ops", example="[condconv,kw]")
    unknown = [op for op in ops if op not in operators]
    if unknown or not ops:
        raise knobs.fail("ops", ops, f"all or a non-empty list of {', '.join(operators)}")
    return {"backbone": backbone, "ops": ops, "resolution": knobs.integer("resolution", low=32),
            "num_classes": knobs.integer("num_classes"),
            "batch_sizes": knobs.numbers("batch_sizes", low=1, integers=True),
            "check_batch_sizes": knobs.numbers("check_batch_sizes", low=1, integers=True),
            "repeats": knobs.integer("repeats"), "warmup": knobs.integer("warmup", low=0),
            "steps": knobs.integer("steps"), "threads": knobs.integer("threads", nullable=True),
            "out": Path(knobs.text("out"))}


def export_operator(chosen: dict, op: str, folder: Path) -> dict:
    """The op's fresh model exported to <folder>/<op>.onnx and checked: {"op", "path", "onnx_mb", "max_abs_diff"}
    or {"op", "error"}."""
    import torch

    import dynconv
    from dynconv.exporting import ExportError, export

    torch.manual_seed(0)
    model = dynconv.create_model(chosen["backbone"], op=op, num_classes=chosen["num_classes"],
                                 image_size=chosen["resolution"])
    side = chosen["resolution"]
    example = torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(0))
    path = folder / f"{op}.onnx"
    try:
        report = export(model, path, "onnx", example_input=example, batch_sizes=chosen["check_batch_sizes"])
    except ExportError as error:
        return {"op": op, "error": str(error)}
    return {"op": op, "path": path, "onnx_mb": round(path.stat().st_size / 2**20, 1),
            "max_abs_diff": report["max_abs_diff"]}


def main(argv: list[str]) -> int:
    cfg = config(argv)
    from dynconv.config import ConfigError

    try:
        chosen = settings(cfg)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    from dynconv.exporting.latency import markdown_table, time_against_static
    from dynconv.exporting.onnx_file import onnx_session

    sizes, side = chosen["batch_sizes"], chosen["resolution"]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_onnx_") as folder:
        static = export_operator(chosen, "static", Path(folder))
        if static.get("error"):
            print(f"error: the static model does not export: {static['error']}", file=sys.stderr)
            return 1
        static_session = onnx_session(static["path"], chosen["threads"])
        for op in chosen["ops"]:
            row = export_operator(chosen, op, Path(folder))
            if not row.get("error"):
                row["batches"] = time_against_static(row.pop("path"), static_session, (3, side, side), sizes,
                                                     repeats=chosen["repeats"], warmup=chosen["warmup"],
                                                     steps=chosen["steps"], threads=chosen["threads"])
                Path(folder, f"{op}.onnx").unlink()
            rows.append(row)
            print(_progress(row, sizes), flush=True)
    rows.insert(0, _static_row(static, rows, sizes))
    table = markdown_table(rows, sizes)
    result = {"out": str(chosen["out"]), "backbone": chosen["backbone"], "resolution": side,
              "num_classes": chosen["num_classes"], "batch_sizes": sizes, "threads": chosen["threads"],
              "repeats": chosen["repeats"], "warmup": chosen["warmup"], "steps": chosen["steps"], "rows": rows}
    chosen["out"].mkdir(parents=True, exist_ok=True)
    (chosen["out"] / "table.md").write_text(_title(result) + table)
    (chosen["out"] / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    print(table)
    print(json.dumps(result))
    return 1 if any(row.get("error") for row in rows) else 0


def _static_row(static: dict, rows: list[dict], sizes) -> dict:
    """The static model's row: at each batch size the median of its times measured beside every operator."""
    timed = [row["batches"] for row in rows if row.get("batches")]
    batches = {size: {"ms": round(statistics.median(t[size]["static_ms"] for t in timed), 3), "ratio": 1.0}
               for size in sizes} if timed else {size: {"ms": float("nan"), "ratio": 1.0} for size in sizes}
    return {"op": "static", "batches": batches, "onnx_mb": static["onnx_mb"], "max_abs_diff": static["max_abs_diff"]}


def _progress(row: dict, sizes) -> str:
    if row.get("error"):
        return f"{row['op']}: {row['error']}"
    return f"{row['op']}: " + ", ".join(f"batch {size} {row['batches'][size]['ms']:.1f} ms "
                                        f"({row['batches'][size]['ratio']:.2f}x static)" for size in sizes)


def _title(result: dict) -> str:
    import onnxruntime
    import torch

    return (f"onnxruntime {onnxruntime.__version__} (CPU), torch {torch.__version__}: {result['backbone']} at "
            f"{result['resolution']} px, {result['num_classes']} classes, fresh weights; median of "
            f"{result['repeats']} interleaved repeats x {result['steps']} runs; intra-op threads "
            f"{result['threads'] or 'onnxruntime default'}\n\n")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
