"""A table row beside the paper: each column as paper | dynconv | delta, and the row's status.

Statuses (`reproduce.py show`): `matched`; `differs: <reason>` (a counting column outside the paper's rounding,
with the reason the table file records, or "no recorded reason", which `reproduce.py check` fails on; or a
metric of a full run outside `METRIC_TOLERANCE`); `pending run` (the counts match, the metrics have no run yet;
"smoke results only" when only smoke runs were collected); `cannot build: <reason>`.

Counting columns match when dynconv's value, in the column's unit, is within half a unit of the paper's last
printed digit (the paper's rounding), or within the column's stated relative tolerance.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from dynconv.reproduction.tables import Column, Row, Table

METRIC_TOLERANCE = 0.5  # points: a full run within this of the paper's top-1 / AP / mIoU counts as matched


@dataclass
class Cell:
    paper: Any = None
    dynconv: Any = None
    delta: float | None = None
    ok: bool | None = None  # None: not compared
    smoke: bool = False
    note: str | None = None


@dataclass
class RowReport:
    row: Row
    overrides: list[str]
    cells: dict[str, Cell] = field(default_factory=dict)
    status: str = "pending run"
    unexplained: list[str] = field(default_factory=list)  # counting columns that differ with no reason recorded
    stale: list[str] = field(default_factory=list)  # columns with a recorded reason that now match (remove it)
    run_dirs: list[str] = field(default_factory=list)
    checkpoint: str | None = None  # the collected run's best.pt (MODEL_ZOO.md)

    def as_json(self) -> dict[str, Any]:
        return {"row": self.row.label, "id": self.row.id, "overrides": " ".join(self.overrides),
                "paper": {key: cell.paper for key, cell in self.cells.items() if cell.paper is not None},
                "dynconv": {key: cell.dynconv for key, cell in self.cells.items() if cell.dynconv is not None},
                "delta": {key: cell.delta for key, cell in self.cells.items() if cell.delta is not None},
                "smoke": sorted(key for key, cell in self.cells.items() if cell.smoke),
                "runs": self.run_dirs, "status": self.status}


def _within_rounding(dynconv: float, paper: float, column: Column) -> bool:
    half_unit = 0.5 * 10 ** (-column.decimals)
    return abs(dynconv - paper) <= half_unit + 1e-9 or abs(dynconv - paper) <= column.tolerance * abs(paper)


def compare_count(column: Column, paper: Any, raw: Any) -> Cell:
    if raw is None:
        return Cell(paper=paper)
    if isinstance(raw, list):
        if paper is None:
            return Cell(paper=paper, dynconv=raw)
        ours, theirs = [int(v) for v in raw], [int(v) for v in paper]
        if ours == theirs:
            return Cell(paper=paper, dynconv=raw, ok=True)
        # The same warehouses listed in another order (the paper lists ConvNeXt's stem and downsampling
        # warehouses first; dynconv in the order the network uses them).
        same = sorted(ours) == sorted(theirs)
        return Cell(paper=paper, dynconv=raw, ok=same, note="same warehouses, another order" if same else None)
    value = round(raw / column.scale(), max(column.decimals + 2, 4))
    if paper is None or not isinstance(paper, (int, float)):
        return Cell(paper=paper, dynconv=value)
    return Cell(paper=paper, dynconv=value, delta=round(value - paper, column.decimals + 2),
                ok=_within_rounding(value, float(paper), column))


def metric_value(column: Column, metrics: dict[str, Any] | None, baseline: dict[str, Any] | None) -> float | None:
    """A metric column's value from a run's metrics (top-1 error = 100 - top-1; a delta column: row - baseline)."""
    if not metrics or metrics.get(column.metric) is None:
        return None
    value = float(metrics[column.metric])
    if column.kind == "error":
        return 100.0 - value
    if column.kind == "metric_delta":
        if not baseline or baseline.get(column.metric) is None:
            return None
        return value - float(baseline[column.metric])
    return value


def compare_metric(column: Column, paper: Any, value: float | None, smoke: bool) -> Cell:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return Cell(paper=paper)
    value = round(value, column.decimals + 1)
    if paper is None or not isinstance(paper, (int, float)) or smoke:
        return Cell(paper=paper, dynconv=value, smoke=smoke)
    delta = round(value - float(paper), column.decimals + 1)
    return Cell(paper=paper, dynconv=value, delta=delta, ok=abs(delta) <= METRIC_TOLERANCE)


def row_report(table: Table, row: Row, counts, results: dict[str, dict[str, Any]],
               latencies: dict[str, float] | None = None) -> RowReport:
    """`counts`: the row's RowCounts (None if not buildable); `results`: row id -> its collected run record
    (metrics, smoke flag, run dir) for this table; `latencies`: row id -> measured CPU ms (measure=true)."""
    report = RowReport(row, table.row_overrides(row) if row.buildable else [])
    reason = row.reason_not_built()
    record = results.get(row.id)
    baseline = results.get(row.baseline) if row.baseline else None
    smoke = bool(record and record.get("smoke"))
    for column in table.columns:
        paper = row.paper.get(column.key)
        if column.is_count and counts is not None and not counts.error:
            cell = compare_count(column, paper, counts.values.get(column.kind))
        elif column.is_metric:
            metrics = record.get("metrics") if record else None
            cell = compare_metric(column, paper, metric_value(column, metrics, baseline and baseline.get("metrics")),
                                  smoke)
        elif column.kind == "cpu_latency" and latencies and row.id in latencies:
            ms = latencies[row.id]
            base = latencies.get(row.baseline) if row.baseline else None
            ratio = None if not base else round(ms / base, 3)
            paper_ratio = None
            if base and row.baseline and isinstance(paper, (int, float)):
                paper_base = table.row(row.baseline).paper.get(column.key)
                paper_ratio = round(paper / paper_base, 3) if paper_base else None
            cell = Cell(paper=paper, dynconv=round(ms, 2),
                        note=f"ratio {ratio} (paper {paper_ratio})" if ratio is not None else None)
        else:
            cell = Cell(paper=paper)
        if cell.ok is False and column.key in row.differs:
            cell.note = row.differs[column.key]
        report.cells[column.key] = cell
    if record:
        report.run_dirs = [record.get("run_dir", "")]
        report.checkpoint = record.get("checkpoint")

    if reason:
        report.status = f"cannot build: {reason}"
        return report
    if counts is not None and counts.error:
        report.status = f"cannot build: {counts.error}"
        report.unexplained.append("(build)")
        return report
    differing = []
    for column in table.columns:
        cell = report.cells[column.key]
        if column.is_count and cell.ok is False:
            if column.key in row.differs:
                differing.append(f"{column.key}: {row.differs[column.key]}")
            else:
                report.unexplained.append(column.key)
                differing.append(f"{column.key} {_show(cell.dynconv)} vs the paper's {_show(cell.paper)} "
                                 "(no recorded reason)")
        if column.is_count and cell.ok and column.key in row.differs:
            report.stale.append(column.key)
    metric_columns = [column for column in table.columns if column.is_metric and row.paper.get(column.key) is not None]
    for column in metric_columns:
        cell = report.cells[column.key]
        if cell.ok is False:
            differing.append(f"{column.key} {cell.delta:+g} from a full run")
    if differing:
        report.status = "differs: " + "; ".join(differing)
    elif metric_columns and all(report.cells[c.key].dynconv is None for c in metric_columns):
        report.status = "pending run"
    elif metric_columns and smoke:
        report.status = "pending run (smoke results only)"
    else:
        report.status = "matched"
    return report


def _show(value: Any) -> str:
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    return f"{value:g}" if isinstance(value, float) else str(value)
