"""onnxruntime latency of each operator's exported ONNX against the static backbone's ONNX, timed interleaved in
one process (scripts/bench_onnx.py; the table of docs/benchmarks.md).

What is timed: `session.run` on a fixed input, CPU execution provider, for each batch size; the dynamic model and
the static one alternate within every repeat (dynamic b1, static b1, dynamic b16, static b16, ...), so both see the
same machine state, and every time is the median over repeats of the mean over `steps` runs, after `warmup`
untimed runs (as `dynconv.benchmark.interleaved`, which runs the loop). Both models come from the same exporter,
so the ratio is the cost of the operator's exported formulation (docs/export.md), not of a framework.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from dynconv.exporting.onnx_file import onnx_session


def session_step(session, batch: np.ndarray) -> Callable[[], None]:
    """One inference of `batch` by `session`."""
    name = session.get_inputs()[0].name

    def step() -> None:
        session.run(None, {name: batch})

    return step


def time_against_static(dynamic: Path, static_session, input_shape: Sequence[int], batch_sizes: Sequence[int], *,
                        repeats: int, warmup: int, steps: int, threads: int | None) -> dict[int, dict[str, float]]:
    """{batch: {"ms", "static_ms", "ratio"}}: medians of `dynamic`'s and the static session's times, interleaved."""
    import torch

    from dynconv.benchmark import interleaved

    session = onnx_session(dynamic, threads)
    generator = np.random.default_rng(0)
    batches = {size: generator.standard_normal((size, *input_shape), dtype=np.float32) for size in batch_sizes}
    candidates = {name: {size: session_step(model, batch) for size, batch in batches.items()}
                  for name, model in (("dynamic", session), ("static", static_session))}
    results = interleaved(candidates, device=torch.device("cpu"), repeats=repeats, warmup=warmup, steps=steps)
    return {size: {"ms": round(results["dynamic"][size].ms, 3), "static_ms": round(results["static"][size].ms, 3),
                   "ratio": round(results["dynamic"][size].ms / results["static"][size].ms, 4)}
            for size in batch_sizes}


def markdown_table(rows: Sequence[dict], batch_sizes: Sequence[int]) -> str:
    """One row per operator: ms and ratio to static at each batch size, the ONNX file's size, the export's max abs
    difference to eager (or why it failed)."""
    head = ["op", *(f"batch {size} ms" for size in batch_sizes), *(f"batch {size} / static" for size in batch_sizes),
            "ONNX MB", "max abs diff"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        if row.get("error"):
            lines.append(f"| {row['op']} | " + " | ".join(["-"] * (len(head) - 2)) + f" | {row['error']} |")
            continue
        timed = row["batches"]
        cells = [row["op"], *(f"{timed[size]['ms']:.1f}" for size in batch_sizes),
                 *(f"{timed[size]['ratio']:.2f}x" for size in batch_sizes), f"{row['onnx_mb']:.1f}",
                 f"{row['max_abs_diff']:.1e}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
