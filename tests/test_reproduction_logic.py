"""How a table row is compared with the paper, how table files are checked, how runs are collected, how sweep
folders are named: the logic under scripts/reproduce.py, on small hand-made inputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from dynconv.engine.run_naming import JOB_NAME_LIMIT, job_folder_name
from dynconv.reproduction.compare import compare_count, row_report
from dynconv.reproduction.counting import RowCounts
from dynconv.reproduction.launch import smoke_overrides
from dynconv.reproduction.results import collect, runs_for_table, write_results
from dynconv.reproduction.tables import TableError, load_table_file, merge_overrides, parse_table

TABLE = {
    "id": "xx_t1", "paper": "kw", "number": 1, "caption": "A test table.", "task": "classification",
    "overrides": ["data=imagenet", "backbone=resnet18"],
    "columns": [{"key": "params", "kind": "params", "unit": "M", "decimals": 2},
                {"key": "top1", "kind": "metric", "metric": "top1"}],
    "rows": [{"id": "static", "label": "ResNet18", "overrides": ["op=static"], "paper": {"params": 11.69, "top1": 70.0}},
             {"id": "kw", "label": "+ KW", "overrides": ["op=kw"], "paper": {"params": 11.99, "top1": 73.0},
              "differs": {"params": "the paper counts something else"}},
             {"id": "cgc", "label": "+ CGC", "cannot_build": "not implemented", "paper": {"params": 11.69}}],
}


def _table(tmp_path: Path, raw=TABLE):
    return parse_table(raw, tmp_path / f"{raw['id']}.yaml")


def test_counts_match_within_the_papers_rounding(tmp_path):
    column = _table(tmp_path).column("params")
    assert compare_count(column, 11.69, 11_694_999).ok  # 11.695 rounds to 11.69 or 11.70: within half a unit
    assert not compare_count(column, 11.69, 11_701_000).ok
    assert compare_count(column, 11.69, 11_689_512).delta == pytest.approx(-0.0005, abs=1e-4)


def test_row_status_follows_counts_reasons_and_runs(tmp_path):
    table = _table(tmp_path)
    static, kw, cgc = table.rows
    matched = RowCounts({"params": 11_689_512})
    assert row_report(table, static, matched, {}).status == "pending run"
    run = {"metrics": {"top1": 70.3}, "smoke": False, "run_dir": "r"}
    assert row_report(table, static, matched, {"static": run}).status == "matched"
    off = row_report(table, static, matched, {"static": {**run, "metrics": {"top1": 68.0}}})
    assert off.status.startswith("differs: top1 -2")
    smoke = row_report(table, static, matched, {"static": {**run, "smoke": True}})
    assert smoke.status == "pending run (smoke results only)" and smoke.cells["top1"].smoke
    unexplained = row_report(table, static, RowCounts({"params": 12_500_000}), {})
    assert unexplained.unexplained == ["params"] and "no recorded reason" in unexplained.status
    explained = row_report(table, kw, RowCounts({"params": 11_932_148}), {})
    assert explained.status == "differs: params: the paper counts something else" and not explained.unexplained
    assert row_report(table, cgc, None, {}).status == "cannot build: not implemented"
    broken = row_report(table, static, RowCounts({}, "ConfigError: op.b=9"), {})
    assert broken.status.startswith("cannot build: ConfigError") and broken.unexplained


@pytest.mark.parametrize("edit,message", [
    (lambda t: t["columns"][0].update(kind="flops"), "columns[0].kind: 'flops' is not one of"),
    (lambda t: t["rows"][0].update(typo=1), "rows[0]: unknown key(s) ['typo']"),
    (lambda t: t["rows"][0]["paper"].update(top5=1), "rows[0] (static).paper: 'top5' is not a column"),
    (lambda t: t["rows"][2].pop("cannot_build"), "says why it cannot be built"),
    (lambda t: t["rows"][1]["differs"].update(params=""), "differs.params: the reason is a sentence"),
    (lambda t: t["columns"][0].update(tolerance=0.01), "needs a tolerance_note"),
    (lambda t: t["rows"][1].update(id="static"), "duplicate row ids ['static']"),
    (lambda t: t["rows"][1].update(id="Bad Id"), "must match"),
])
def test_a_bad_table_file_names_the_file_and_the_key(tmp_path, edit, message):
    raw = json.loads(json.dumps(TABLE))
    edit(raw)
    path = tmp_path / "xx_t1.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(TableError) as error:
        load_table_file(path)
    assert str(path) in str(error.value) and message in str(error.value)


def test_a_later_override_of_the_same_key_replaces_the_earlier():
    assert merge_overrides(["backbone=resnet18", "op=kw", "op.b=1"], ["backbone=resnet50", "op.b=4"]) == [
        "backbone=resnet50", "op=kw", "op.b=4"]


def test_smoke_swaps_the_data_and_keeps_the_model():
    classification = smoke_overrides(["data=imagenet", "data.interpolation=bicubic", "recipe=deit", "backbone=deit_tiny",
                                      "op=kw", "op.b=4"])
    assert "data=digits" in classification and "recipe=deit" in classification and "op.b=4" in classification
    assert not any(item.startswith("data.interpolation") for item in classification)
    detection = smoke_overrides(["task=retinanet", "data=coco", "recipe=retinanet_weightnet", "op=weightnet"])
    assert "data=toy_coco" in detection and not any(item.startswith("recipe=") for item in detection)


def _run(folder: Path, metrics: str | None, table="xx_t1", row="static", overrides=()):
    folder.mkdir(parents=True)
    config = {"backbone": {"name": "resnet18"}, "op": {"name": "static"}, "data": {"name": "imagenet", "image_size": 224},
              "reproduce": {"table": table, "row": row, "smoke": False}, "seed": 0}
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    if metrics is not None:
        (folder / "metrics.json").write_text(metrics)
    (folder / "run.json").write_text(json.dumps({"overrides": list(overrides), "config_hash": "abc", "seed": 0}))


def test_collect_reports_missing_and_corrupt_metrics_by_path_and_goes_on(tmp_path):
    _run(tmp_path / "good", json.dumps({"top1": 71.0, "top5": 90.0, "status": "completed", "epochs": 100}))
    _run(tmp_path / "corrupt", '{"top1": 7', row="kw")
    _run(tmp_path / "running", None, row="cgc")
    collected = collect(tmp_path)
    assert len(collected.runs) == 3
    assert any(str(tmp_path / "corrupt" / "metrics.json") in problem for problem in collected.problems)
    by_dir = {Path(run["run_dir"]).name: run for run in collected.runs}
    assert by_dir["good"]["metrics"]["top1"] == 71.0 and by_dir["good"]["config_hash"] == "abc"
    assert by_dir["corrupt"]["status"] == "corrupt metrics.json"
    assert by_dir["running"]["status"].startswith("no metrics.json")
    json_path, csv_path = write_results(tmp_path, collected)
    assert json.loads(json_path.read_text())["problems"] == collected.problems
    assert "top1_err" in csv_path.read_text().splitlines()[0] and "29.0" in csv_path.read_text()


def test_a_run_of_another_table_with_the_same_overrides_fills_a_row(tmp_path):
    table = _table(tmp_path)
    _run(tmp_path / "other", json.dumps({"top1": 70.1}), table="yy_t9", row="base",
         overrides=["data=imagenet", "backbone=resnet18", "op=static", "data.root=/somewhere", "reproduce.row=base"])
    chosen = runs_for_table(table, collect(tmp_path).runs)
    assert chosen["static"]["metrics"]["top1"] == 70.1 and "kw" not in chosen


def test_sweep_folders_are_short_safe_and_unique():
    assert job_folder_name("op.lam=4") == "op.lam=4"
    assert "/" not in job_folder_name("data.root=/some/path,op.lam=4")
    long_a = job_folder_name(",".join(f"key{i}=value{i}" for i in range(20)))
    long_b = job_folder_name(",".join(f"key{i}=value{i}" for i in range(21)))
    assert len(long_a) <= JOB_NAME_LIMIT and long_a != long_b
    assert job_folder_name("") == "run"
