"""A benchmark suite's result as Markdown (the table docs/benchmarks.md shows) and as JSON, written side by side.

One row per suite row. Each measured cell reads "model / static" with the ratio in the next column, so the
numbers behind every ratio are in the table; FPS is images per second at the batch the time was taken at
(KernelWarehouse's Table 12 metric). A table suite adds the paper's value beside the measurement, again "model /
static", and the paper's ratio formed the same way as the measured one: model / static of time or memory, so a
throughput ratio is static FPS / model FPS.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dynconv.bench_suites import PAPER_MEASURES

# (label, model key, static key, ratio key, decimals) per measurement, in table order; a column group is shown
# when any row has a value for it.
COLUMNS = {
    "train": [("train step ms", "train_step_ms", "static_train_step_ms", "train_step_ratio", 1),
              ("train img/s", "train_fps", "static_train_fps", None, 1)],
    "inference": [("inference ms", "inference_ms", "static_inference_ms", "inference_ratio", 1),
                  ("inference img/s", "inference_fps", "static_inference_fps", None, 1)],
    "batch1": [("batch-1 ms", "batch1_inference_ms", "static_batch1_inference_ms", "batch1_inference_ratio", 2)],
    "memory": [("train peak MB", "train_peak_mb", "static_train_peak_mb", "train_peak_ratio", 1),
               ("inference peak MB", "inference_peak_mb", "static_inference_peak_mb", "inference_peak_ratio", 1)],
}
PAPER_LABELS = {"inference_fps": "inference", "train_fps": "train", "train_peak_mb": "train memory",
                "inference_peak_mb": "inference memory"}  # the table's unit follows: "paper inference (FPS)"
PAPER_DECIMALS = {"FPS": 1, "MB": 0, "GB": 2}  # as the papers print them (Weight Excitation: 5.29 GB)


def _number(value: Any, decimals: int) -> str:
    if value is None:
        return "-"
    return f"{value:,.{decimals}f}"


def _pair(model: Any, static: Any, decimals: int) -> str:
    if model is None and static is None:
        return "-"
    return f"{_number(model, decimals)} / {_number(static, decimals)}"


def _ratio(value: Any) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _batch(row: dict) -> str:
    """The batch a row ran at: "16", or "128 / 100" where training and inference differ."""
    if row["mode"] == "latency":
        return "1"
    if row["mode"] == "inference" or row["batch"] == row["inference_batch"]:
        return str(row["inference_batch"])
    return f"{row['batch']} / {row['inference_batch']}"


def markdown(result: dict) -> str:
    """The suite's Markdown: a heading, what was measured, the table, then each row's error if any."""
    rows = result["rows"]
    groups = [g for g, cols in COLUMNS.items() if any(row.get(c[1]) is not None for row in rows for c in cols)]
    paper_keys = [key for key in PAPER_MEASURES if any(key in row.get("paper", {}) for row in rows)]
    header = ["row", "batch (train / inference)"]
    for group in groups:
        for label, _, _, ratio_key, _ in COLUMNS[group]:
            header.append(f"{label} (model / static)")
            if ratio_key:
                header.append("ratio")
    for key in paper_keys:
        units = {row.get("paper_units", {}).get(key) for row in rows} - {None, ""}
        unit = f" ({units.pop()})" if len(units) == 1 else ""
        header += [f"paper {PAPER_LABELS[key]}{unit} (model / static)", "paper ratio"]
    lines = [f"### {result['title']}", ""]
    if result.get("source"):
        lines += [result["source"], ""]
    lines += [_settings_line(result), ""]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [f"{row['label']} (`{row['id']}`)", _batch(row)]
        for group in groups:
            for _, model_key, static_key, ratio_key, decimals in COLUMNS[group]:
                cells.append(_pair(row.get(model_key), row.get(static_key), decimals))
                if ratio_key:
                    cells.append(_ratio(row.get(ratio_key)))
        for key in paper_keys:
            decimals = PAPER_DECIMALS.get(row.get("paper_units", {}).get(key), 2)
            cells.append(_pair(row.get("paper", {}).get(key), row.get("paper_static", {}).get(key), decimals))
            cells.append(_ratio(row.get("paper_ratio", {}).get(key)))
        lines.append("| " + " | ".join(cells) + " |")
    errors = [row for row in rows if row.get("error")]
    if errors:
        lines += [""] + [f"- `{row['id']}`: {row['error']}" for row in errors]
    return "\n".join(lines) + "\n"


def _settings_line(result: dict) -> str:
    parts = [f"{result['device_name']}", f"resolution {', '.join(sorted({str(r['resolution']) for r in result['rows']}))}"]
    timing = [r for r in result["rows"] if r["mode"] != "memory"]
    if timing:
        r = timing[0]
        parts.append(f"{r['warmup']} warmup + {r['repeats']} repeats x {r['steps']} steps, interleaved with the static "
                     "model, medians")
    if result.get("amp") not in (None, "none"):
        parts.append(f"autocast {result['amp']} (bench.amp)")
    if result.get("memory_measure"):
        parts.append(f"memory: {result['memory_measure']}")
    if result.get("command_line"):
        parts.append("command line: " + " ".join(f"bench.{k}={v}" for k, v in result["command_line"].items()))
    return "; ".join(parts) + "."


def write(result: dict, prefix: Path) -> tuple[Path, Path]:
    """`<prefix>.md` and `<prefix>.json` (folders created); the two paths."""
    prefix.parent.mkdir(parents=True, exist_ok=True)
    md_path, json_path = prefix.with_name(prefix.name + ".md"), prefix.with_name(prefix.name + ".json")
    md_path.write_text(markdown(result))
    json_path.write_text(json.dumps(result, indent=1) + "\n")
    return md_path, json_path
