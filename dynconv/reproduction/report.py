"""`reproduce.py show`: a table in the paper's layout, each column as paper | dynconv | delta, a status per row.

Markdown (the default) for reading, CSV for a spreadsheet, JSON for tools. Values from smoke runs are marked
"(smoke)": they prove the row runs end to end, not that it reaches the paper's accuracy.
"""

from __future__ import annotations

import csv
import io
import json
from typing import Any

from dynconv.reproduction.compare import Cell, RowReport
from dynconv.reproduction.tables import PAPERS, Table


def _format(value: Any, decimals: int) -> str:
    if value is None:
        return "-"
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    if isinstance(value, float):
        return f"{value:.{decimals}f}"
    return str(value)


def _dynconv_text(cell: Cell, decimals: int) -> str:
    text = _format(cell.dynconv, decimals)
    if cell.smoke:
        text += " (smoke)"
    if cell.note and cell.ok is None:
        text += f" [{cell.note}]"
    return text


def _delta_text(cell: Cell, decimals: int) -> str:
    if cell.delta is None:
        if cell.ok and cell.note:
            return f"= ({cell.note})"
        return "" if cell.ok is None else ("=" if cell.ok else "differs")
    if round(cell.delta, decimals) == 0:
        return "0"
    return f"{cell.delta:+.{decimals}f}"


STATUS_WIDTH = 90  # Markdown: a longer status is cut; the full reasons follow the table


def header(table: Table) -> list[str]:
    columns = ["Row"]
    for column in table.columns:
        unit = f" ({column.unit})" if column.unit and column.unit not in column.label else ""
        if column.kind == "text":  # a setting, printed once
            columns.append(column.label)
            continue
        columns += [f"{column.label}{unit} paper", "dynconv", "delta"]
    return columns + ["Status"]


def body(table: Table, reports: list[RowReport], short: bool = False) -> list[list[str]]:
    lines = []
    for report in reports:
        line = [report.row.label]
        for column in table.columns:
            cell = report.cells[column.key]
            if column.kind == "text":
                line.append(_format(cell.paper, column.decimals))
                continue
            line += [_format(cell.paper, column.decimals), _dynconv_text(cell, column.decimals),
                     _delta_text(cell, column.decimals)]
        status = report.status
        if short and len(status) > STATUS_WIDTH:
            status = status[:STATUS_WIDTH].rsplit(" ", 1)[0] + " ... (below)"
        lines.append(line + [status])
    return lines


def render_markdown(table: Table, reports: list[RowReport], summary: dict[str, Any]) -> str:
    title = f"{PAPERS[table.paper]}, Table {table.number} (`{table.id}`)"
    head = header(table)
    out = [f"## {title}", "", table.caption, ""]
    if table.source:
        out += [f"Source: {table.source}.", ""]
    out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(cell.replace("|", "/") for cell in line) + " |"
            for line in body(table, reports, short=True)]
    out += [""]
    if table.recipe_note:
        out += [f"Recipe: {table.recipe_note}", ""]
    for note in table.notes:
        out += [f"- {note}"]
    differs = [(report.row.label, column.key, report.row.differs[column.key]) for report in reports
               for column in table.columns if column.key in report.row.differs]
    if differs:
        out += ["", "Why counts differ:"] + [f"- {label}, {key}: {reason}" for label, key, reason in differs]
    out += ["", " · ".join(f"{key}: {value}" for key, value in summary.items()), ""]
    return "\n".join(out)


def render_csv(table: Table, reports: list[RowReport]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header(table))
    writer.writerows(body(table, reports))
    return buffer.getvalue()


def render_json(table: Table, reports: list[RowReport]) -> str:
    return json.dumps({"table": table.id, "rows": [report.as_json() for report in reports]})


def summarize(reports: list[RowReport]) -> dict[str, int]:
    """How many rows are matched / differ / pending / cannot be built."""
    counts = {"rows": len(reports), "matched": 0, "differs": 0, "pending run": 0, "cannot build": 0}
    for report in reports:
        for status in ("matched", "differs", "pending run", "cannot build"):
            if report.status.startswith(status):
                counts[status] += 1
    return counts
