"""`reproduce.py collect`: every run under a folder, read into one results file that `show` and MODEL_ZOO.md use.

A run folder is one with a `config.yaml` (what train.py writes first). What each run recorded is read from:
`metrics.json` (written at the end: final and best metrics, and the `run` record: overrides, config hash, seed,
git commit, world size, effective batch, dates) and `run.json` (the same record, written at the start, so a run
still training or one that crashed is listed with its overrides). A run's paper-table row comes from the
`reproduce.table` / `reproduce.row` keys that `reproduce.py launch` sets. A missing or corrupt file is reported with
its path and the other runs are still collected.

The results are written as `<runs>/results.json` (every field) and `<runs>/results.csv` (one line per run, in the
style of timm's results files: model, top1, top1_err, top5, top5_err, param_count, img_size, ...).
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

RESULTS_JSON = "results.json"
RESULTS_CSV = "results.csv"
CSV_FIELDS = ("table", "row", "model", "op", "data", "status", "smoke", "top1", "top1_err", "top5", "top5_err",
              "bbox_AP", "segm_AP", "param_count", "img_size", "epochs", "effective_batch", "world_size", "seed",
              "git_commit", "config_hash", "finished", "run_dir")


@dataclass
class Collected:
    runs: list[dict[str, Any]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # "<path>: what is wrong"


def _read_json(path: Path, problems: list[str]) -> dict[str, Any] | None:
    if not path.exists():
        return None
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        problems.append(f"{path}: unreadable ({type(error).__name__}: {error}); run listed without it")
        return None
    if not isinstance(value, dict):
        problems.append(f"{path}: expected a JSON object; run listed without it")
        return None
    return value


def _read_config(path: Path, problems: list[str]) -> dict[str, Any]:
    try:
        value = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        problems.append(f"{path}: unreadable ({type(error).__name__}); run listed without its config")
        return {}
    return value if isinstance(value, dict) else {}


def _get(mapping: dict[str, Any], dotted: str) -> Any:
    value: Any = mapping
    for part in dotted.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


def read_run(run_dir: Path, problems: list[str]) -> dict[str, Any]:
    """One run's record: where it is, which table row it is, what it trained, how it ended, its metrics."""
    config = _read_config(run_dir / "config.yaml", problems)
    metrics = _read_json(run_dir / "metrics.json", problems)
    record = (metrics or {}).get("run") or _read_json(run_dir / "run.json", problems) or {}
    reproduce = config.get("reproduce") or {}
    if metrics is None:
        status = "no metrics.json (running, or stopped before the end)"
        if (run_dir / "metrics.json").exists():
            status = "corrupt metrics.json"
    else:
        status = str(metrics.get("status", "completed"))
    final = {key: value for key, value in (metrics or {}).items()
             if isinstance(value, (int, float)) and not isinstance(value, bool)}
    return {
        "run_dir": str(run_dir),
        "table": reproduce.get("table"),
        "row": reproduce.get("row"),
        "smoke": bool(reproduce.get("smoke") or record.get("smoke")),
        "status": status,
        "backbone": _get(config, "backbone.name"),
        "op": _get(config, "op.name"),
        "attn": _get(config, "attn.name"),
        "task": _get(config, "task.name"),
        "data": _get(config, "data.name"),
        "img_size": _get(config, "data.image_size"),
        "recipe_epochs": _get(config, "recipe.epochs"),
        "metrics": final,
        "best": (metrics or {}).get("best") or {},
        "overrides": list(record.get("overrides") or []),
        "config_hash": record.get("config_hash"),
        "seed": record.get("seed", config.get("seed")),
        "git_commit": record.get("git_commit"),
        "world_size": record.get("world_size", (metrics or {}).get("world_size")),
        "effective_batch": record.get("effective_batch"),
        "started": record.get("started"),
        "finished": record.get("finished"),
        "checkpoint": _checkpoint(run_dir),
    }


def _checkpoint(run_dir: Path) -> str | None:
    for name in ("best.pt", "last.pt"):
        path = run_dir / "checkpoints" / name
        if path.exists():
            return str(path)
    return None


def find_runs(root: Path) -> list[Path]:
    """Run folders under `root` (a folder with config.yaml), in path order; checkpoints and TensorBoard are skipped."""
    return sorted(path.parent for path in root.rglob("config.yaml")
                  if not any(part in ("checkpoints", "tensorboard", ".hydra") for part in path.parent.parts[-1:]))


def collect(root: Path) -> Collected:
    collected = Collected()
    if not root.is_dir():
        collected.problems.append(f"{root}: no such folder")
        return collected
    for run_dir in find_runs(root):
        collected.runs.append(read_run(run_dir, collected.problems))
    return collected


def csv_row(run: dict[str, Any]) -> dict[str, Any]:
    metrics = run["metrics"]
    top1, top5 = metrics.get("top1"), metrics.get("top5")
    return {
        "table": run["table"], "row": run["row"], "model": run["backbone"], "op": run["op"], "data": run["data"],
        "status": run["status"], "smoke": run["smoke"], "top1": top1,
        "top1_err": None if top1 is None else round(100 - top1, 3), "top5": top5,
        "top5_err": None if top5 is None else round(100 - top5, 3), "bbox_AP": metrics.get("bbox_AP"),
        "segm_AP": metrics.get("segm_AP"), "param_count": metrics.get("params"), "img_size": run["img_size"],
        "epochs": metrics.get("epochs"), "effective_batch": run["effective_batch"], "world_size": run["world_size"],
        "seed": run["seed"], "git_commit": run["git_commit"], "config_hash": run["config_hash"],
        "finished": run["finished"], "run_dir": run["run_dir"],
    }


def write_results(root: Path, collected: Collected) -> tuple[Path, Path]:
    """results.json and results.csv in `root`, each written whole (a reader never sees half a file)."""
    from dynconv.engine.checkpoint import atomic_write

    json_path, csv_path = root / RESULTS_JSON, root / RESULTS_CSV
    payload = {"runs": collected.runs, "problems": collected.problems}
    atomic_write(json_path, lambda handle: handle.write(json.dumps(payload, indent=2) + "\n"), binary=False)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_FIELDS)
    writer.writeheader()
    for run in collected.runs:
        writer.writerow(csv_row(run))
    atomic_write(csv_path, lambda handle: handle.write(buffer.getvalue()), binary=False)
    return json_path, csv_path


def load_results(root: Path) -> list[dict[str, Any]]:
    """The runs of `<root>/results.json` (what `collect` wrote), or collected on the spot when there is none."""
    path = root / RESULTS_JSON
    if path.exists():
        try:
            return list(json.loads(path.read_text())["runs"])
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as error:
            raise ValueError(f"{path}: unreadable results file ({error}); run `reproduce.py collect runs={root}` "
                             "again") from None
    return collect(root).runs if root.is_dir() else []


IGNORED_OVERRIDE_PREFIXES = ("data.root", "hydra", "reproduce.", "resume", "log.", "checkpoint.", "device",
                             "dist.", "data.num_workers")


def _model_overrides(overrides: list[str]) -> frozenset[str]:
    """The overrides that decide what is trained (paths, logging and launcher settings removed)."""
    return frozenset(item for item in overrides if not item.lstrip("+~").startswith(IGNORED_OVERRIDE_PREFIXES))


def runs_for_table(table, runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """row id -> the run that gives its metrics: a run launched for this table row, else a completed run of
    another table whose overrides are the row's (the same baseline appears in several tables). Full runs are
    preferred over smoke runs, completed over others, then the newest."""
    chosen: dict[str, dict[str, Any]] = {}

    def rank(run: dict[str, Any]) -> tuple:
        return (not run["smoke"], run["status"] == "completed", bool(run["metrics"]), run.get("finished") or "")

    for row in table.rows:
        if not row.buildable:
            continue
        wanted = _model_overrides(table.row_overrides(row))
        candidates = [run for run in runs if (run["table"], run["row"]) == (table.id, row.id)]
        candidates += [run for run in runs if run["overrides"] and (run["table"], run["row"]) != (table.id, row.id)
                       and not run["smoke"] and _model_overrides(run["overrides"]) == wanted]
        candidates = [run for run in candidates if run["metrics"]]
        if candidates:
            chosen[row.id] = max(candidates, key=rank)
    return chosen
