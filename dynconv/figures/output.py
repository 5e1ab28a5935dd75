"""Writing a figure: the PNG (matplotlib's Agg backend, no display needed) and its data beside it, atomically."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any, Iterable

import matplotlib

matplotlib.use("Agg")  # before pyplot: headless servers and CI have no display
import matplotlib.pyplot as plt  # noqa: E402

from dynconv.engine.checkpoint import atomic_write  # noqa: E402


def new_figure(ncols: int = 1, nrows: int = 1, size: tuple[float, float] = (5.0, 4.0), **kwargs):
    """A (figure, axes) pair of `nrows` x `ncols` panels, each `size` inches."""
    fig, axes = plt.subplots(nrows, ncols, figsize=(size[0] * ncols, size[1] * nrows), squeeze=False, **kwargs)
    return fig, axes


def save_png(fig, path: Path) -> Path:
    """Write `fig` to `path` (a temporary file renamed over it) and close it."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    atomic_write(path, lambda handle: handle.write(buffer.getvalue()))
    return path


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN; a missing or undefined value
    if isinstance(value, dict):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    if hasattr(value, "tolist"):  # numpy arrays and tensors
        return _jsonable(value.tolist())
    return value


def save_json(data: Any, path: Path) -> Path:
    text = json.dumps(_jsonable(data), indent=1)
    atomic_write(path, lambda handle: handle.write(text), binary=False)
    return path


def save_csv(rows: Iterable[dict[str, Any]], path: Path) -> Path:
    """One line per dict; the columns are the union of the keys, in first-seen order."""
    rows = [dict(row) for row in rows]
    fields: list[str] = []
    for row in rows:
        fields += [key for key in row if key not in fields]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: _jsonable(value) for key, value in row.items()})
    atomic_write(path, lambda handle: handle.write(buffer.getvalue()), binary=False)
    return path
