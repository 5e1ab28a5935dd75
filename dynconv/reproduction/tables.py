"""One paper table as data: its caption, its columns and one entry per printed row (docs/reproduction.md).

A table file is `dynconv/reproduction/tables/<id>.yaml`. Everything in it is checked when it is loaded, so a typo
in a file is reported with the file and the key before anything is counted or launched.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

TABLES_DIR = Path(__file__).resolve().parent / "tables"

PAPERS = {
    "wn": "WeightNet (Ma et al., ECCV 2020)",
    "we": "Weight Excitation (Quader et al., ECCV 2020)",
    "kw": "KernelWarehouse (Li & Yao, ICML 2024)",
    "dynet": "DyNet (Zhang et al., 2020)",
}

# Column kinds. Counting kinds are computed on the spot from the row's model (dynconv/reproduction/counting.py);
# metric kinds come from collected runs; cpu_latency is measured with `measure=true`; the others are shown from
# the paper only (a GPU measurement, a setting printed as text).
COUNT_KINDS = ("params", "params_inference", "macs", "macs_inference", "backbone_params", "backbone_macs",
               "kw_m", "kw_n")
METRIC_KINDS = ("metric", "error", "metric_delta")
MEASURE_KINDS = ("cpu_latency",)
OTHER_KINDS = ("gpu", "text")
KINDS = COUNT_KINDS + METRIC_KINDS + MEASURE_KINDS + OTHER_KINDS
UNITS = {"": 1, "K": 1e3, "M": 1e6, "G": 1e9, "%": 1, "ms": 1, "MB": 1, "GB": 1, "FPS": 1, "s": 1}
TASKS = ("classification", "detection", "segmentation", "video", "counting", "speed")
# The papers' tables with no file, and why (`reproduce.py list` prints them so the inventory's 39 add up).
LEFT_OUT = {
    "wn_t1": "WeightNet Table 1 is symbolic: the grouped-FC configurations (input size, groups, lambda, output) that make "
             "CondConv, SENet and WeightNet special cases of one another; no measured numbers. Its equivalences are tested "
             "(tests/test_weightnet.py::test_se_special_case, test_condconv_special_case).",
    "kw_t15": "KernelWarehouse Table 15 is structural: which ResNet18 layers are reassigned to the previous stage's "
              "warehouse and their cell dimensions. `python scripts/profile.py backbone=resnet18 op=kw profile.layers=true` "
              "prints each layer's warehouse; Table 14's m and n (kw_t14) check the outcome.",
}
ROW_ID = re.compile(r"^[a-z0-9][a-z0-9_]*$")


class TableError(ValueError):
    """A table file that does not follow the schema: names the file and the key."""


@dataclass(frozen=True)
class Column:
    key: str
    label: str
    kind: str
    unit: str = ""
    decimals: int = 2
    metric: str | None = None  # metric kinds: the key in the run's metrics (top1, top5, bbox_AP, ...)
    tolerance: float = 0.0  # counting kinds: relative tolerance on top of the paper's rounding (0: rounding only)
    tolerance_note: str | None = None  # why a tolerance beyond the rounding is fair
    note: str | None = None

    @property
    def is_count(self) -> bool:
        return self.kind in COUNT_KINDS

    @property
    def is_metric(self) -> bool:
        return self.kind in METRIC_KINDS

    def scale(self) -> float:
        return UNITS[self.unit] if self.kind in COUNT_KINDS else 1.0


@dataclass(frozen=True)
class Row:
    id: str
    label: str
    overrides: tuple[str, ...]
    paper: dict[str, Any]
    cannot_build: str | None = None
    quoted_from: str | None = None  # a network (and its numbers) quoted from another paper
    differs: dict[str, str] = field(default_factory=dict)  # column key -> why dynconv cannot match the paper there
    baseline: str | None = None  # row id that metric_delta and cpu_latency columns compare with
    init_from: str | None = None  # "<table>/<row>": the ImageNet row whose checkpoint this row fine-tunes
    pretrain: tuple[str, ...] = ()  # overrides of the ImageNet training of this row's backbone when no table has it
    note: str | None = None

    @property
    def buildable(self) -> bool:
        # A quoted network that dynconv also builds (the row has overrides) is counted and trained as any row;
        # quoted_from then only says whose numbers the paper prints.
        return self.cannot_build is None and (self.quoted_from is None or bool(self.overrides))

    def reason_not_built(self) -> str | None:
        if self.buildable:
            return None
        if self.quoted_from:
            return f"quoted from {self.quoted_from}; no such network in dynconv"
        return self.cannot_build


@dataclass(frozen=True)
class Table:
    id: str
    paper: str
    number: str
    caption: str
    task: str
    columns: tuple[Column, ...]
    rows: tuple[Row, ...]
    overrides: tuple[str, ...] = ()  # shared by every row, before the row's own
    source: str = ""  # where in the paper (section, appendix)
    recipe_note: str | None = None  # what the paper says about training these rows
    notes: tuple[str, ...] = ()
    path: Path | None = None

    def row(self, row_id: str) -> Row:
        for row in self.rows:
            if row.id == row_id:
                return row
        raise KeyError(f"{self.id} has no row {row_id!r} (rows: {', '.join(r.id for r in self.rows)})")

    def row_overrides(self, row: Row) -> list[str]:
        """The table's shared overrides, then the row's (a row's `backbone=` replaces the table's)."""
        return merge_overrides(list(self.overrides), list(row.overrides))

    def column(self, key: str) -> Column:
        for column in self.columns:
            if column.key == key:
                return column
        raise KeyError(key)

    @property
    def trains(self) -> bool:
        return any(column.is_metric for column in self.columns)


def override_key(override: str) -> str:
    """"op.b=1/2" -> "op.b"; "hydra/launcher=slurm" -> "hydra/launcher"; "+x=1" -> "x"."""
    return override.split("=", 1)[0].lstrip("+~")


def merge_overrides(*groups: list[str]) -> list[str]:
    """Override lists joined so that a later value of the same key replaces the earlier one in place (Hydra
    refuses two values for one config group), keeping the first occurrence's position."""
    merged: dict[str, str] = {}
    for group in groups:
        for override in group:
            merged[override_key(override)] = override
    return list(merged.values())


def _fail(path: Path, where: str, message: str) -> TableError:
    return TableError(f"{path}: {where}: {message}")


def _require(mapping: dict, key: str, kinds, path: Path, where: str):
    if key not in mapping:
        raise _fail(path, where, f"missing key {key!r}")
    value = mapping[key]
    if not isinstance(value, kinds):
        raise _fail(path, f"{where}.{key}", f"expected {kinds}, got {value!r}")
    return value


def _allowed(mapping: dict, allowed: set[str], path: Path, where: str) -> None:
    unknown = sorted(set(mapping) - allowed)
    if unknown:
        raise _fail(path, where, f"unknown key(s) {unknown}; allowed: {sorted(allowed)}")


def _column(raw: Any, path: Path, index: int) -> Column:
    where = f"columns[{index}]"
    if not isinstance(raw, dict):
        raise _fail(path, where, "a column is a mapping")
    _allowed(raw, {"key", "label", "kind", "unit", "decimals", "metric", "tolerance", "tolerance_note", "note"},
             path, where)
    kind = _require(raw, "kind", str, path, where)
    if kind not in KINDS:
        raise _fail(path, f"{where}.kind", f"{kind!r} is not one of {list(KINDS)}")
    unit = str(raw.get("unit", ""))
    if unit not in UNITS:
        raise _fail(path, f"{where}.unit", f"{unit!r} is not one of {list(UNITS)}")
    if kind in METRIC_KINDS and not raw.get("metric"):
        raise _fail(path, where, f"a {kind} column names the run metric it shows (metric: top1)")
    tolerance = float(raw.get("tolerance", 0.0))
    if tolerance and not raw.get("tolerance_note"):
        raise _fail(path, where, "a tolerance beyond the paper's rounding needs a tolerance_note saying why")
    return Column(key=_require(raw, "key", str, path, where), label=str(raw.get("label", raw["key"])), kind=kind,
                  unit=unit, decimals=int(raw.get("decimals", 2)), metric=raw.get("metric"), tolerance=tolerance,
                  tolerance_note=raw.get("tolerance_note"), note=raw.get("note"))


def _row(raw: Any, path: Path, index: int, columns: dict[str, Column]) -> Row:
    where = f"rows[{index}]"
    if not isinstance(raw, dict):
        raise _fail(path, where, "a row is a mapping")
    _allowed(raw, {"id", "label", "overrides", "paper", "cannot_build", "quoted_from", "differs", "baseline",
                   "init_from", "pretrain", "note"}, path, where)
    row_id = _require(raw, "id", str, path, where)
    where = f"rows[{index}] ({row_id})"
    if not ROW_ID.match(row_id):
        raise _fail(path, where, f"row id {row_id!r} must match {ROW_ID.pattern} (it names a run folder)")
    paper = raw.get("paper") or {}
    if not isinstance(paper, dict):
        raise _fail(path, f"{where}.paper", "a mapping of column key -> the paper's value")
    for key in paper:
        if key not in columns:
            raise _fail(path, f"{where}.paper", f"{key!r} is not a column of this table ({sorted(columns)})")
    differs = raw.get("differs") or {}
    for key, reason in differs.items():
        if key not in columns:
            raise _fail(path, f"{where}.differs", f"{key!r} is not a column of this table")
        if not isinstance(reason, str) or not reason.strip():
            raise _fail(path, f"{where}.differs.{key}", "the reason is a sentence")
    overrides = raw.get("overrides") or []
    if not isinstance(overrides, list) or not all(isinstance(item, str) for item in overrides):
        raise _fail(path, f"{where}.overrides", "a list of Hydra overrides (strings)")
    cannot_build, quoted = raw.get("cannot_build"), raw.get("quoted_from")
    if not overrides and not cannot_build and not quoted:
        raise _fail(path, where, "a row has overrides, or says why it cannot be built (cannot_build / quoted_from)")
    pretrain = raw.get("pretrain") or []
    if not isinstance(pretrain, list) or not all(isinstance(item, str) for item in pretrain):
        raise _fail(path, f"{where}.pretrain", "a list of Hydra overrides (strings)")
    if pretrain and raw.get("init_from"):
        raise _fail(path, where, "init_from (another table's row) or pretrain (its own ImageNet run), not both")
    return Row(id=row_id, label=str(raw.get("label", row_id)), overrides=tuple(overrides), paper=dict(paper),
               cannot_build=cannot_build, quoted_from=quoted, differs=dict(differs), baseline=raw.get("baseline"),
               init_from=raw.get("init_from"), pretrain=tuple(pretrain), note=raw.get("note"))


def parse_table(raw: Any, path: Path) -> Table:
    if not isinstance(raw, dict):
        raise _fail(path, "top level", "a table file is a mapping")
    _allowed(raw, {"id", "paper", "number", "caption", "task", "source", "overrides", "columns", "rows",
                   "recipe_note", "notes"}, path, "top level")
    table_id = _require(raw, "id", str, path, "top level")
    if table_id != path.stem:
        raise _fail(path, "id", f"{table_id!r} differs from the file name {path.stem!r}")
    paper = _require(raw, "paper", str, path, "top level")
    if paper not in PAPERS:
        raise _fail(path, "paper", f"{paper!r} is not one of {list(PAPERS)}")
    task = _require(raw, "task", str, path, "top level")
    if task not in TASKS:
        raise _fail(path, "task", f"{task!r} is not one of {list(TASKS)}")
    columns = tuple(_column(item, path, i) for i, item in enumerate(_require(raw, "columns", list, path, "top level")))
    by_key = {column.key: column for column in columns}
    if len(by_key) != len(columns):
        raise _fail(path, "columns", "duplicate column keys")
    rows = tuple(_row(item, path, i, by_key) for i, item in enumerate(_require(raw, "rows", list, path, "top level")))
    ids = [row.id for row in rows]
    duplicates = sorted({row_id for row_id in ids if ids.count(row_id) > 1})
    if duplicates:
        raise _fail(path, "rows", f"duplicate row ids {duplicates}")
    for row in rows:
        if row.baseline is not None and row.baseline not in ids:
            raise _fail(path, f"rows ({row.id}).baseline", f"{row.baseline!r} is not a row of this table")
    overrides = raw.get("overrides") or []
    return Table(id=table_id, paper=paper, number=str(_require(raw, "number", (int, str), path, "top level")),
                 caption=" ".join(str(_require(raw, "caption", str, path, "top level")).split()), task=task,
                 columns=columns, rows=rows, overrides=tuple(overrides), source=str(raw.get("source", "")),
                 recipe_note=raw.get("recipe_note"), notes=tuple(raw.get("notes") or ()), path=path)


def load_table_file(path: Path) -> Table:
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise TableError(f"{path}: not valid YAML: {error}") from None
    return parse_table(raw, path)


@lru_cache(maxsize=None)
def all_tables() -> tuple[Table, ...]:
    """Every table file, in paper then table-number order."""
    order = list(PAPERS)
    tables = [load_table_file(path) for path in sorted(TABLES_DIR.glob("*.yaml"))]

    def number(table: Table) -> tuple[int, str]:
        digits = re.match(r"\d+", table.number)
        return (int(digits.group()) if digits else 0, table.number)

    return tuple(sorted(tables, key=lambda t: (order.index(t.paper), number(t))))


def load_table(table_id: str) -> Table:
    for table in all_tables():
        if table.id == table_id:
            return table
    known = ", ".join(t.id for t in all_tables())
    raise TableError(f"table={table_id!r} is not a table; known: {known}")


def check_init_from(tables: tuple[Table, ...]) -> list[str]:
    """`init_from` references that do not name an existing row (reported by `reproduce.py check`)."""
    by_id = {t.id: t for t in tables}
    problems = []
    for table in tables:
        for row in table.rows:
            if row.init_from is None:
                continue
            table_id, _, row_id = row.init_from.partition("/")
            if table_id not in by_id or row_id not in {r.id for r in by_id[table_id].rows}:
                problems.append(f"{table.id}/{row.id}: init_from {row.init_from!r} names no row")
    return problems
