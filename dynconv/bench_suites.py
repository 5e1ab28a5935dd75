"""Benchmark suites: a whole table of operator measurements in one command, `scripts/bench.py bench.suite=<name>`.

A suite is one YAML file in `configs/bench_suites/`, shipped with the other configs. Either it lists its rows,
each a model given as overrides of the training config after the suite's shared ones (`overrides:
[backbone=resnet18]`, then a row's `[op=condconv, op.experts=8]`), or it names a paper table of
`dynconv/reproduction/tables/` (`table: kw_t12`) and takes that table's model rows and printed values from there,
so the paper's numbers have one source. Every row runs against the static model of its backbone, built once and
shared by every row that has it: for listed rows, the row's config with `op=static` (op knobs dropped), or the
suite's overrides followed by the row's `baseline: [...]` (a model that is dynamic by its own architecture, timm's
CondConv EfficientNet, against its static counterpart: the `timm_condconv` suite); for a
table, the table's own op=static row with the same backbone and attention (KernelWarehouse Table 12's
"ResNet50" for its ResNet50 rows, Weight Excitation Table 1's "ResNet50-SE" for "ResNet50-LWE-SE").

A row's settings (`SETTINGS`) come from, the last one winning: configs/bench.yaml, the suite's `bench`, the row's
`bench` (listed rows) or the first `row_bench` pattern its id matches (table rows), and the command line. A
`bench.<key>=` given on the command line applies to every row, so `bench.batch=2 bench.resolution=32` runs any
suite tiny; `bench.batch` there also sets the inference batch unless `bench.inference_batch` is given too.

Everything is checked when a suite is planned, before any model is built: the file's keys, every row's config
(composed and built on the meta device, as a training config is), the merged settings, `bench.rows`. A mistake
names the file or the key, and the allowed values.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from dynconv.config import ConfigError
from dynconv.paths import CONFIG_DIR

SUITES_DIR = CONFIG_DIR / "bench_suites"
# What a row's measurement is run with; each also a key of configs/bench.yaml.
SETTINGS = ("batch", "inference_batch", "resolution", "mode", "repeats", "warmup", "steps")
# Measured values a table suite may show the paper's printed value beside. How the paper's ratio to its static
# row is formed so it reads like the measured ratio next to it (model / static of milliseconds or megabytes):
# a throughput ratio is inverted (static FPS / model FPS is the time ratio).
PAPER_MEASURES = {
    "inference_fps": ("inference_ratio", "inverse"),
    "train_fps": ("train_step_ratio", "inverse"),
    "train_peak_mb": ("train_peak_ratio", "direct"),
    "inference_peak_mb": ("inference_peak_ratio", "direct"),
}
_ROW_ID = re.compile(r"^[a-z0-9][a-z0-9_]*$")
_TOP_KEYS = {"title", "source", "table", "overrides", "bench", "rows", "row_bench", "paper"}
_ROW_KEYS = {"id", "label", "overrides", "bench", "baseline"}


def suite_names() -> list[str]:
    """The suites `bench.suite` accepts: the files of configs/bench_suites/."""
    return sorted(path.stem for path in SUITES_DIR.glob("*.yaml"))


@dataclass(frozen=True)
class SuiteRow:
    id: str
    label: str
    overrides: tuple[str, ...]
    bench: dict[str, Any] = field(default_factory=dict)
    # Another static model to run against, as overrides after the suite's (op=static implied): a network that is
    # dynamic by its own architecture, such as timm's CondConv EfficientNet, against its static counterpart.
    baseline: tuple[str, ...] = ()


@dataclass(frozen=True)
class Suite:
    name: str
    title: str
    path: Path
    source: str = ""
    table: str | None = None  # a reproduction table whose rows (and printed values) the suite runs
    overrides: tuple[str, ...] = ()  # every row's, before its own (after a table row's)
    bench: dict[str, Any] = field(default_factory=dict)
    rows: tuple[SuiteRow, ...] = ()  # listed rows (no table)
    row_bench: dict[str, dict[str, Any]] = field(default_factory=dict)  # id pattern -> settings (first match)
    paper: dict[str, str] = field(default_factory=dict)  # measured key -> the table's column shown beside it


def _fail(path: Path, where: str, message: str) -> ConfigError:
    return ConfigError(f"{path}: {where}: {message}")


def _strings(value: Any, path: Path, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(item, str) and item for item in value):
        raise _fail(path, where, f"a list of Hydra overrides (strings), got {value!r}")
    return tuple(value)


def _settings(value: Any, path: Path, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _fail(path, where, f"a mapping of settings ({', '.join(SETTINGS)}), got {value!r}")
    unknown = sorted(set(value) - set(SETTINGS))
    if unknown:
        raise _fail(path, where, f"unknown setting(s) {unknown}; allowed: {', '.join(SETTINGS)}")
    return dict(value)


def load_suite(name: str) -> Suite:
    """The suite `configs/bench_suites/<name>.yaml`, its keys checked (ConfigError naming the file and key)."""
    path = SUITES_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"bench.suite={name!r} is invalid; allowed values: null (one model against op=static) or "
                          f"a suite: {', '.join(suite_names())}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from None
    if not isinstance(raw, dict):
        raise _fail(path, "top level", "a suite file is a mapping")
    unknown = sorted(set(raw) - _TOP_KEYS)
    if unknown:
        raise _fail(path, "top level", f"unknown key(s) {unknown}; allowed: {sorted(_TOP_KEYS)}")
    title = raw.get("title")
    if not isinstance(title, str) or not title.strip():
        raise _fail(path, "title", "a one-line title (the Markdown table's heading)")
    table = raw.get("table")
    rows_raw = raw.get("rows")
    if (table is None) == (rows_raw is None):
        raise _fail(path, "top level", "either `rows` (the suite's own list) or `table` (a reproduction table id)")
    rows = []
    for index, item in enumerate(rows_raw or []):
        where = f"rows[{index}]"
        if not isinstance(item, dict):
            raise _fail(path, where, "a row is a mapping with id, label, overrides (and bench)")
        extra = sorted(set(item) - _ROW_KEYS)
        if extra:
            raise _fail(path, where, f"unknown key(s) {extra}; allowed: {sorted(_ROW_KEYS)}")
        row_id = item.get("id")
        if not isinstance(row_id, str) or not _ROW_ID.match(row_id):
            raise _fail(path, f"{where}.id", f"{row_id!r} must match {_ROW_ID.pattern} (bench.rows selects by it)")
        overrides = _strings(item.get("overrides"), path, f"{where}.overrides")
        if not overrides:
            raise _fail(path, f"{where}.overrides", "the row's model, e.g. [op=condconv, op.experts=8]")
        rows.append(SuiteRow(row_id, str(item.get("label", row_id)), overrides,
                             _settings(item.get("bench"), path, f"{where}.bench"),
                             _strings(item.get("baseline"), path, f"{where}.baseline")))
    ids = [row.id for row in rows]
    if len(set(ids)) != len(ids):
        raise _fail(path, "rows", f"duplicate row ids {sorted({i for i in ids if ids.count(i) > 1})}")
    row_bench = raw.get("row_bench") or {}
    if not isinstance(row_bench, dict):
        raise _fail(path, "row_bench", "a mapping of row id pattern -> settings")
    paper = raw.get("paper") or {}
    if paper and table is None:
        raise _fail(path, "paper", "the paper's values come from a table: set `table`")
    if not isinstance(paper, dict) or not all(key in PAPER_MEASURES and isinstance(column, str)
                                              for key, column in paper.items()):
        raise _fail(path, "paper", f"a mapping of measured key ({', '.join(PAPER_MEASURES)}) -> the table's column")
    if table is not None:
        from dynconv.reproduction.tables import TableError, load_table

        try:
            columns = {column.key for column in load_table(str(table)).columns}
        except TableError as error:
            raise _fail(path, "table", str(error)) from None
        for key, column in paper.items():
            if column not in columns:
                raise _fail(path, f"paper.{key}", f"{column!r} is not a column of {table} ({', '.join(sorted(columns))})")
    return Suite(name=name, title=" ".join(title.split()), path=path, source=" ".join(str(raw.get("source", "")).split()),
                 table=table, overrides=_strings(raw.get("overrides"), path, "overrides"),
                 bench=_settings(raw.get("bench"), path, "bench"), rows=tuple(rows),
                 row_bench={str(pattern): _settings(value, path, f"row_bench.{pattern}")
                            for pattern, value in row_bench.items()},
                 paper=dict(paper))


# ------------------------------------------------------------------------------------------------ planning


@dataclass(frozen=True)
class Settings:
    """What one row is measured with (resolved: the inference batch is a number)."""

    batch: int
    inference_batch: int
    resolution: int
    mode: str
    repeats: int
    warmup: int
    steps: int

    @classmethod
    def of(cls, values: Mapping[str, Any]) -> Settings:
        return cls(batch=int(values["batch"]), inference_batch=int(values.get("inference_batch") or values["batch"]),
                   resolution=int(values["resolution"]), mode=str(values.get("mode", "full")),
                   repeats=int(values["repeats"]), warmup=int(values["warmup"]), steps=int(values["steps"]))


@dataclass
class Model:
    """One network of a suite, a row's or a static baseline's: its overrides and composed training config."""

    key: str  # rows with the same baseline key share one static model
    id: str
    label: str
    overrides: list[str]
    cfg: Any  # DictConfig (train.yaml composed with `overrides`)

    def parts(self) -> tuple[dict, dict, dict]:
        """(backbone, op, attn) sections as plain resolved dicts: what build_backbone and a child process take."""
        from omegaconf import OmegaConf

        return tuple(OmegaConf.to_container(self.cfg[section], resolve=True)  # type: ignore[return-value]
                     for section in ("backbone", "op", "attn"))


@dataclass
class PlannedRow:
    id: str
    label: str
    model: Model
    baseline: Model
    settings: Settings
    paper: dict[str, Any] = field(default_factory=dict)  # measured key -> the paper's value for this row
    paper_static: dict[str, Any] = field(default_factory=dict)  # ... for its static row
    paper_units: dict[str, str] = field(default_factory=dict)

    def paper_ratio(self) -> dict[str, float | None]:
        """The paper's ratio to its static row, formed as the measured ratio beside it (PAPER_MEASURES)."""
        ratios = {}
        for key, value in self.paper.items():
            static = self.paper_static.get(key)
            if value is None or static is None or not value or not static:
                ratios[key] = None
            else:
                ratios[key] = round(static / value if PAPER_MEASURES[key][1] == "inverse" else value / static, 4)
        return ratios


@dataclass
class Plan:
    suite: Suite
    rows: list[PlannedRow]
    command_line: dict[str, Any]  # the settings the command line sets in every row (inference_batch null: its batch)


def cli_setting_keys(argv: Sequence[str]) -> set[str]:
    """The SETTINGS given as `bench.<key>=` on the command line."""
    from dynconv.reproduction.tables import override_key

    keys = {override_key(arg) for arg in argv if "=" in arg}
    return {key for key in SETTINGS if f"bench.{key}" in keys}


def _static_overrides(overrides: Sequence[str]) -> list[str]:
    """The same model with op=static: the op group and its knobs replaced."""
    from dynconv.reproduction.tables import override_key

    return [o for o in overrides if override_key(o) != "op" and not override_key(o).startswith("op.")] + ["op=static"]


def _compose(compose, overrides: list[str], where: str):
    """The training config of a row (built on the meta device); ConfigError naming the row on a bad one."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from dynconv.config import validate_model_config
    from dynconv.overrides import reject_added_keys

    try:
        cfg = compose(overrides)
        reject_added_keys(overrides, "train")
        validate_model_config(cfg)
    except (ConfigError, HydraException, OmegaConfBaseException) as error:
        raise ConfigError(f"{where} ({' '.join(overrides)}): {error}") from None
    return cfg


def _select(ids: list[str], patterns: Sequence[str] | None, suite: str) -> list[str]:
    if patterns is None:
        return ids
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(row_id, pattern) for row_id in ids):
            raise ConfigError(f"bench.rows={list(patterns)!r}: {pattern!r} matches no row of bench.suite={suite}; "
                              f"allowed values: row ids or fnmatch patterns over {', '.join(ids)}")
    return [row_id for row_id in ids if any(fnmatch.fnmatchcase(row_id, p) for p in patterns)]


def plan_suite(suite: Suite, bench: Mapping[str, Any], cli_keys: set[str],
               patterns: Sequence[str] | None = None) -> Plan:
    """Every selected row of `suite`, composed, with its static baseline, settings and the paper's values.

    `bench`: the composed bench section (configs/bench.yaml with the command line); `cli_keys`: which SETTINGS the
    command line gave (`cli_setting_keys`)."""
    from dynconv.benchmark import check_run_settings
    from dynconv.reproduction.counting import composer

    defaults = {key: bench.get(key) for key in SETTINGS}
    command_line = {key: bench.get(key) for key in sorted(cli_keys)}
    if "batch" in cli_keys and "inference_batch" not in cli_keys:
        command_line["inference_batch"] = None  # the command line's batch is the inference batch too

    def settings(row_id: str, own: Mapping[str, Any]) -> Settings:
        merged = {**defaults, **suite.bench, **own, **command_line}
        check_run_settings(merged, context=f" (bench.suite={suite.name}, row {row_id})")
        return Settings.of(merged)

    planned: list[PlannedRow] = []
    with composer() as compose:
        if suite.table is None:
            chosen = _select([row.id for row in suite.rows], patterns, suite.name)
            baselines: dict[str, Model] = {}
            for row in suite.rows:
                if row.id not in chosen:
                    continue
                overrides = _merge(list(suite.overrides), list(row.overrides))
                cfg = _compose(compose, overrides, f"bench.suite={suite.name} row {row.id}")
                static_overrides = _static_overrides(_merge(list(suite.overrides), list(row.baseline))
                                                     if row.baseline else overrides)
                key = " ".join(static_overrides)
                if key not in baselines:
                    static_cfg = _compose(compose, static_overrides, f"bench.suite={suite.name} static of row {row.id}")
                    name = static_cfg.backbone.name
                    baselines[key] = Model(key, f"{name}_static", f"{name} (op=static)", static_overrides, static_cfg)
                planned.append(PlannedRow(row.id, row.label, Model(row.id, row.id, row.label, overrides, cfg),
                                          baselines[key], settings(row.id, row.bench)))
        else:
            planned = _plan_table(suite, compose, patterns, settings)
    return Plan(suite, planned, command_line)


def _merge(*groups: list[str]) -> list[str]:
    from dynconv.reproduction.tables import merge_overrides

    return merge_overrides(*groups)


def _plan_table(suite: Suite, compose, patterns, settings) -> list[PlannedRow]:
    """A table suite's rows: the table's non-static rows, each against its op=static row of the same backbone and
    attention. Which rows are static is read from their `op=` override (every table row names its op), so only the
    selected rows and the static rows they need are composed."""
    from dynconv.reproduction.tables import load_table, override_key

    table = load_table(suite.table)
    overrides = {row.id: _merge(table.row_overrides(row), list(suite.overrides)) for row in table.rows if row.buildable}

    def op_of(row_id: str) -> str | None:
        ops = [o.split("=", 1)[1] for o in overrides[row_id] if override_key(o) == "op"]
        return ops[-1] if ops else None

    configs: dict[str, Any] = {}

    def cfg_of(row_id: str):
        if row_id not in configs:
            configs[row_id] = _compose(compose, overrides[row_id], f"bench.suite={suite.name} ({table.id}) row {row_id}")
        return configs[row_id]

    static = [row for row in table.rows if row.id in overrides and op_of(row.id) == "static"]
    model_rows = [row for row in table.rows if row.id in overrides and op_of(row.id) != "static"]
    chosen = _select([row.id for row in model_rows], patterns, suite.name)
    columns = {key: table.column(column) for key, column in suite.paper.items()}
    planned = []
    for row in model_rows:
        if row.id not in chosen:
            continue
        cfg = cfg_of(row.id)
        base = next((s for s in static if (cfg_of(s.id).backbone.name, cfg_of(s.id).attn.name)
                     == (cfg.backbone.name, cfg.attn.name)), None)
        if base is None:
            raise ConfigError(f"{suite.path}: table {table.id} has no op=static row with backbone "
                              f"{cfg.backbone.name} and attn {cfg.attn.name} for row {row.id} to run against")
        baseline = Model(base.id, base.id, base.label, overrides[base.id], cfg_of(base.id))
        own = next((values for pattern, values in suite.row_bench.items() if fnmatch.fnmatchcase(row.id, pattern)), {})
        # "+ DY-Conv (4×)" under "ResNet50" in the paper: "ResNet50 + DY-Conv (4×)" in a table of both backbones.
        label = f"{base.label} {row.label}" if row.label.startswith("+") else row.label
        planned.append(PlannedRow(
            row.id, label, Model(row.id, row.id, label, overrides[row.id], cfg), baseline, settings(row.id, own),
            paper={key: row.paper.get(column.key) for key, column in columns.items()},
            paper_static={key: base.paper.get(column.key) for key, column in columns.items()},
            paper_units={key: column.unit for key, column in columns.items()}))
    return planned
