"""scripts/reproduce.py end to end: list, check, launch (dry run and a real smoke run), collect, show, zoo."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "reproduce.py"


def _run(*args: str, cwd: Path | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, cwd=cwd or REPO,
                          env=env, timeout=timeout)


def _last_json(result: subprocess.CompletedProcess) -> dict:
    assert result.stdout.strip(), result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_list_accounts_for_every_table(tmp_path):
    result = _run("list", f"runs={tmp_path}")
    assert result.returncode == 0, result.stderr
    listing = _last_json(result)
    assert listing["totals"]["tables"] + listing["totals"]["left_out"] == 39
    assert listing["totals"]["buildable"] <= listing["totals"]["rows"]
    assert {"kw_t1", "wn_t2", "we_t1", "dynet_t4", "kw_t14"} <= {entry["table"] for entry in listing["tables"]}


def test_bad_arguments_name_the_key_and_the_allowed_values(tmp_path):
    result = _run("show", "table=kw_t99", f"runs={tmp_path}")
    assert result.returncode == 2 and "kw_t99" in result.stderr and "kw_t1" in result.stderr
    result = _run("show", "table=kw_t1", "format=xlsx")
    assert result.returncode == 2 and "format='xlsx'" in result.stderr and "md, csv, json" in result.stderr
    result = _run("launch", "table=kw_t1", "rows=[nope]", "dry_run=true")
    assert result.returncode == 2 and "nope" in result.stderr
    result = _run("frobnicate")
    assert result.returncode == 2 and "list, show, launch" in result.stderr


def test_check_passes_on_a_table(tmp_path):
    result = _run("check", "table=kw_t1")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    outcome = _last_json(result)
    assert outcome["total"] >= 10 and outcome["matched"] + outcome["explained"] == outcome["total"]


def test_slurm_dry_run_of_a_detection_table_trains_the_backbones_first(tmp_path):
    result = _run("launch", "table=wn_t5", "dry_run=true", "launcher=slurm", f"runs={tmp_path}", "data_root=/data/coco")
    assert result.returncode == 0, result.stderr
    commands = _last_json(result)["commands"]
    fine_tunes = [line for line in commands if "task=retinanet" in line]
    pretrains = [line for line in commands if "task=retinanet" not in line]
    assert fine_tunes and pretrains
    assert commands.index(fine_tunes[0]) > commands.index(pretrains[-1])  # every backbone first
    for line in fine_tunes:
        args = shlex.split(line)
        assert "hydra/launcher=slurm" in args and "data.root=/data/coco" in args
        init = next(arg for arg in args if arg.startswith("init_from="))
        assert init.startswith(f"init_from={tmp_path}/wn_t") and init.endswith("/checkpoints/best.pt")
    assert "# wave 1" in result.stdout


@pytest.mark.slow
def test_smoke_launch_collect_show(tmp_path):
    """One row of KernelWarehouse Table 1 trained for two steps on the digits, collected, shown beside the paper."""
    runs = tmp_path / "results"
    launched = _run("launch", "table=kw_t1", "rows=[static]", "smoke=true", f"runs={runs}")
    assert launched.returncode == 0, launched.stdout[-2000:] + launched.stderr[-2000:]
    run_dir = runs / "kw_t1" / "static"
    assert (run_dir / "metrics.json").exists() and (run_dir / "checkpoints" / "best.pt").exists()
    record = json.loads((run_dir / "metrics.json").read_text())["run"]
    assert record["smoke"] is True and "op=static" in record["overrides"]
    assert record["config_hash"] and record["effective_batch"] == 16

    collected = _run("collect", f"runs={runs}")
    assert collected.returncode == 0 and _last_json(collected)["with_metrics"] == 1
    assert (runs / "results.csv").exists()

    shown = _run("show", "table=kw_t1", f"runs={runs}", "format=json")
    assert shown.returncode == 0, shown.stderr
    table = _last_json(shown)
    assert table["table"] == "kw_t1"
    rows = {row["id"]: row for row in table["rows"]}
    assert set(rows["static"]) >= {"row", "overrides", "paper", "dynconv", "status"}
    assert rows["static"]["status"] == "pending run (smoke results only)"
    assert "top1" in rows["static"]["dynconv"] and rows["static"]["smoke"] == ["top1", "top5"]
    assert rows["static"]["dynconv"]["params"] == pytest.approx(11.6895, abs=1e-4)
    assert rows["kw_1x"]["status"] == "pending run" and rows["cgc"]["status"].startswith("differs: params")
    assert (runs / "tables" / "kw_t1.json").exists()

    markdown = _run("show", "table=kw_t1", f"runs={runs}")
    assert "(smoke)" in markdown.stdout and "| ResNet18 |" in markdown.stdout

    zoo = _run("zoo", "table=kw_t1", f"runs={runs}", f"zoo_path={tmp_path / 'ZOO.md'}")
    assert zoo.returncode == 0, zoo.stderr
    assert "python train.py" in (tmp_path / "ZOO.md").read_text()
