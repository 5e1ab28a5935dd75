"""The papers' tables beside dynconv: list them, show one, launch its runs, collect the results, check the counts.

    python scripts/reproduce.py list
    python scripts/reproduce.py show table=kw_t1 [runs=results] [measure=true] [format=md|csv|json]
    python scripts/reproduce.py launch table=kw_t1 [rows=[static,kw_1x]] [launcher=local|slurm] [dry_run=true]
                                   [smoke=true] [data_root=/imagenet]
    python scripts/reproduce.py collect [runs=results]
    python scripts/reproduce.py check [table=kw_t1]
    python scripts/reproduce.py zoo

Arguments are `key=value` as in the other scripts (configs/reproduce.yaml lists them). The last stdout line is
one JSON object (for `show format=json`: the table, `{"table": id, "rows": [...]}`). docs/reproduction.md.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dynconv.compose import compose_or_exit, drop_scripts_dir_from_path  # noqa: E402

drop_scripts_dir_from_path(__file__)

COMMANDS = ("list", "show", "launch", "collect", "check", "zoo")
FORMATS = ("md", "csv", "json")
LAUNCHERS = ("local", "slurm")


def _usage_error(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def config(argv: list[str]):
    """(command, composed config) of these arguments; exit 2 with the key and the allowed values on a bad one.
    tests/test_docs_commands.py composes every documented command of this script through it."""
    from omegaconf import OmegaConf

    from dynconv.reproduction.tables import TableError, load_table

    if not argv or argv[0] not in COMMANDS:
        _usage_error(f"the first argument is the command, one of {', '.join(COMMANDS)} "
                     f"(got {argv[0] if argv else 'nothing'!r})")
    command, rest = argv[0], argv[1:]
    cfg = compose_or_exit("reproduce", rest, validate="none")
    if cfg.format not in FORMATS:
        _usage_error(f"format={cfg.format!r} is not one of {', '.join(FORMATS)}")
    if cfg.launcher not in LAUNCHERS:
        _usage_error(f"launcher={cfg.launcher!r} is not one of {', '.join(LAUNCHERS)}")
    if command in ("show", "launch") and not cfg.table:
        _usage_error(f"{command} needs table=<id> (python scripts/reproduce.py list shows them)")
    if cfg.rows is not None and command == "launch":
        rows = cfg.rows if OmegaConf.is_list(cfg.rows) else str(cfg.rows).split(",")
        cfg.rows = [str(row) for row in rows]
    try:
        if cfg.table:
            table = load_table(str(cfg.table))
            for row_id in cfg.rows or []:
                table.row(row_id)
    except (TableError, KeyError) as error:
        _usage_error(str(error).strip('"'))
    return command, cfg


def _results_root(cfg) -> Path:
    return Path(str(cfg.runs)).expanduser().resolve()


def cmd_list(cfg) -> int:
    from dynconv.reproduction.results import load_results, runs_for_table
    from dynconv.reproduction.tables import LEFT_OUT, PAPERS, all_tables

    runs = load_results(_results_root(cfg))
    entries = []
    for table in all_tables():
        with_results = len(runs_for_table(table, runs)) if runs else 0
        buildable = sum(row.buildable for row in table.rows)
        entries.append({"table": table.id, "paper": table.paper, "number": table.number, "task": table.task,
                        "rows": len(table.rows), "buildable": buildable, "with_results": with_results,
                        "caption": table.caption})
    for paper, title in PAPERS.items():
        print(f"{title}")
        for entry in (e for e in entries if e["paper"] == paper):
            print(f"  {entry['table']:9s} T{entry['number']:<3s} {entry['rows']:3d} rows, "
                  f"{entry['buildable']:3d} buildable, "
                  f"{entry['with_results']:3d} with results  {entry['caption'][:70]}")
        for table_id, reason in LEFT_OUT.items():
            if table_id.startswith(paper + "_"):
                print(f"  {table_id:9s} left out: {reason[:100]}...")
    totals = {"tables": len(entries), "left_out": len(LEFT_OUT), "rows": sum(e["rows"] for e in entries),
              "buildable": sum(e["buildable"] for e in entries),
              "with_results": sum(e["with_results"] for e in entries)}
    print(f"{totals['tables']} tables + {totals['left_out']} left out; {totals['rows']} rows, {totals['buildable']} "
          f"buildable, {totals['with_results']} with results")
    print(json.dumps({"tables": entries, "left_out": LEFT_OUT, "totals": totals}))
    return 0


def table_reports(table, runs, latencies=None, cache=None):
    from dynconv.reproduction.compare import row_report
    from dynconv.reproduction.counting import composer, count_rows
    from dynconv.reproduction.results import runs_for_table

    with composer() as compose:
        counts = count_rows(table, compose, cache)
    results = runs_for_table(table, runs)
    return [row_report(table, row, counts.get(row.id), results, latencies) for row in table.rows]


def cmd_show(cfg) -> int:
    from dynconv.reproduction.measure import measure_latency
    from dynconv.reproduction.report import render_csv, render_json, render_markdown, summarize
    from dynconv.reproduction.results import load_results
    from dynconv.reproduction.tables import load_table

    table = load_table(str(cfg.table))
    root = _results_root(cfg)
    latencies = measure_latency(table, repeats=int(cfg.latency_repeats)) if cfg.measure else None
    reports = table_reports(table, load_results(root), latencies)
    summary = summarize(reports)
    text = {"md": lambda: render_markdown(table, reports, summary), "csv": lambda: render_csv(table, reports),
            "json": lambda: render_json(table, reports)}[cfg.format]()
    output = Path(str(cfg.output)) if cfg.output else root / "tables" / f"{table.id}.{cfg.format}"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(text + ("\n" if not text.endswith("\n") else ""))
    if cfg.format == "json":
        print(f"written to {output}", file=sys.stderr)
        print(text)
    else:
        print(text)
        print(json.dumps({"table": table.id, "file": str(output), **summary}))
    return 0


def _run_local(jobs, python: str) -> list[dict]:
    from dynconv.reproduction.launch import command

    outcomes, failed = [], set()
    for job in jobs:
        if any(name in failed for name in job.needs):
            outcomes.append({"row": job.name, "status": "skipped", "why": f"{', '.join(job.needs)} failed"})
            failed.add(job.name)
            continue
        started = time.perf_counter()
        job.run_dir.mkdir(parents=True, exist_ok=True)
        log_path = job.run_dir.parent / f"{job.row.id}.log"
        with open(log_path, "w") as log:
            code = subprocess.call(command(job, "local", python), stdout=log, stderr=subprocess.STDOUT)
        status = "completed" if code == 0 else f"failed (exit {code}; see {log_path})"
        if code:
            failed.add(job.name)
        print(f"{job.name}: {status} in {time.perf_counter() - started:.0f} s", flush=True)
        outcomes.append({"row": job.name, "status": status, "run_dir": str(job.run_dir), "log": str(log_path)})
    return outcomes


def _run_slurm(jobs, python: str) -> list[dict]:
    """Each wave's rows are submitted together (one Hydra/submitit multirun each, which waits for its job); a wave
    starts when the one before it has finished, so a fine-tuning row finds its backbone's checkpoint."""
    from dynconv.reproduction.launch import command

    outcomes = []
    for wave in sorted({job.wave for job in jobs}):
        running = [(job, subprocess.Popen(command(job, "slurm", python))) for job in jobs if job.wave == wave]
        for job, process in running:
            code = process.wait()
            outcomes.append({"row": job.name, "status": "completed" if code == 0 else f"failed (exit {code})",
                             "run_dir": str(job.run_dir)})
            print(f"{job.name}: {outcomes[-1]['status']}", flush=True)
    return outcomes


def cmd_launch(cfg) -> int:
    from dynconv.reproduction.launch import command, plan, shell_line
    from dynconv.reproduction.tables import load_table

    table = load_table(str(cfg.table))
    root = _results_root(cfg)
    jobs, skipped = plan(table, root, rows=list(cfg.rows) if cfg.rows else None, smoke=bool(cfg.smoke),
                         extra=[str(item) for item in cfg.overrides], data_root=cfg.data_root)
    for line in skipped:
        print(f"# skipped {line}", file=sys.stderr)
    if cfg.dry_run:
        lines = []
        for wave in sorted({job.wave for job in jobs}):
            if wave:
                print(f"# wave {wave}: after wave {wave - 1} has finished (these rows start from its checkpoints)")
            for job in (job for job in jobs if job.wave == wave):
                line = shell_line(command(job, str(cfg.launcher)))
                lines.append(line)
                print(line)
        print(json.dumps({"table": table.id, "commands": lines, "skipped": skipped}))
        return 0
    runner = _run_slurm if cfg.launcher == "slurm" else _run_local
    outcomes = runner(jobs, sys.executable)
    failed = [outcome for outcome in outcomes if outcome["status"] != "completed"]
    print(json.dumps({"table": table.id, "runs": outcomes, "skipped": skipped, "failed": len(failed)}))
    return 1 if failed else 0


def cmd_collect(cfg) -> int:
    from dynconv.reproduction.results import collect, write_results

    root = _results_root(cfg)
    collected = collect(root)
    for problem in collected.problems:
        print(f"warning: {problem}", file=sys.stderr)
    files = list(map(str, write_results(root, collected))) if root.is_dir() else []
    with_metrics = sum(bool(run["metrics"]) for run in collected.runs)
    print(f"{len(collected.runs)} runs under {root}, {with_metrics} with metrics; {len(collected.problems)} problems")
    print(json.dumps({"runs": len(collected.runs), "with_metrics": with_metrics, "problems": collected.problems,
                      "files": files}))
    return 0 if root.is_dir() else 1


def cmd_check(cfg) -> int:
    from dynconv.reproduction.check import check_tables
    from dynconv.reproduction.tables import all_tables, load_table

    tables = [load_table(str(cfg.table))] if cfg.table else list(all_tables())
    outcome = check_tables(tables)
    for failure in outcome.failures:
        print(f"FAIL {failure}")
    differing = [f"{table_id}/{report.row.id}: {report.status}" for table_id, reports in outcome.reports.items()
                 for report in reports if report.status.startswith("differs")]
    for line in differing:
        print(f"differs (reason recorded) {line}")
    print(f"matched {outcome.matched}/{outcome.total} counting cells; {outcome.explained} differ with a recorded "
          f"reason; {len(outcome.failures)} failures")
    print(json.dumps({"matched": outcome.matched, "total": outcome.total, "explained": outcome.explained,
                      "failures": outcome.failures, "differs": differing}))
    return 1 if outcome.failures else 0


def cmd_zoo(cfg) -> int:
    from dynconv.reproduction.results import load_results
    from dynconv.reproduction.tables import all_tables, load_table
    from dynconv.reproduction.zoo import render_zoo

    tables = [load_table(str(cfg.table))] if cfg.table else list(all_tables())
    runs = load_results(_results_root(cfg))
    cache: dict = {}
    reports = {table.id: table_reports(table, runs, cache=cache) for table in tables}
    path = Path(str(cfg.zoo_path))
    path.write_text(render_zoo(tables, reports))
    print(f"wrote {path}")
    print(json.dumps({"file": str(path), "tables": len(tables)}))
    return 0


def main(argv: list[str]) -> int:
    command, cfg = config(argv)
    return {"list": cmd_list, "show": cmd_show, "launch": cmd_launch, "collect": cmd_collect, "check": cmd_check,
            "zoo": cmd_zoo}[command](cfg)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
