"""The papers' tables as data (dynconv/reproduction/tables/): every table of the four papers is there or left out
with a reason, every row's launch command composes and its model builds (meta device) or the row says why not,
and the counting columns match the paper or carry a recorded reason (what `reproduce.py check` enforces)."""

from __future__ import annotations

import json

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from dynconv.build import build_backbone
from dynconv.compose import CONFIG_DIR
from dynconv.config import register_resolvers, validate_model_config
from dynconv.reproduction.counting import counting_size
from dynconv.reproduction.launch import command, plan
from dynconv.reproduction.tables import LEFT_OUT, all_tables, check_init_from

# The inventory (shared/PAPER_TABLES.md): WeightNet 10 tables, Weight Excitation 6, KernelWarehouse 17, DyNet 6.
PAPER_TABLE_COUNTS = {"wn": 10, "we": 6, "kw": 17, "dynet": 6}


def test_every_table_of_the_four_papers_has_a_file_or_a_reason():
    ids = {table.id for table in all_tables()} | set(LEFT_OUT)
    expected = {f"{paper}_t{number}" for paper, count in PAPER_TABLE_COUNTS.items() for number in range(1, count + 1)}
    assert ids == expected, f"missing: {sorted(expected - ids)}; unexpected: {sorted(ids - expected)}"
    assert not set(LEFT_OUT) & {table.id for table in all_tables()}


def test_every_row_has_the_papers_numbers_and_init_from_names_a_row():
    assert check_init_from(all_tables()) == []
    for table in all_tables():
        assert table.rows, table.id
        for row in table.rows:
            assert row.paper, f"{table.id}/{row.id} records none of the paper's numbers"


def _launch_commands():
    """One entry per distinct launch command of every table (SLURM launcher, as `launch dry_run=true` prints it)."""
    seen, found = set(), []
    for table in all_tables():
        if not table.trains:
            for row in table.rows:
                if row.buildable and tuple(table.row_overrides(row)) not in seen:
                    seen.add(tuple(table.row_overrides(row)))
                    found.append((f"{table.id}/{row.id}", table.row_overrides(row)))
            continue
        jobs, _ = plan(table, CONFIG_DIR.parent / "results")
        for job in jobs:
            args = command(job, "slurm")
            overrides = [arg for arg in args[args.index("-m") + 1:]]
            key = tuple(arg for arg in overrides if not arg.startswith(("reproduce.", "hydra.sweep")))
            if key not in seen:
                seen.add(key)
                found.append((job.name, overrides))
    return found


def test_every_launch_command_composes_and_its_model_builds():
    """Every buildable row of every table: its `launch launcher=slurm` command composes with Hydra (launcher
    included) and its network builds on the meta device, within the paper's count or with a recorded reason
    (checked by `reproduce.py check`, tests/test_reproduce_cli.py); unbuildable rows carry a reason (schema)."""
    register_resolvers()
    failures = []
    GlobalHydra.instance().clear()
    commands = _launch_commands()
    assert len(commands) > 150
    built = set()  # rows of many tables share a network (the baselines repeat): each distinct one is built once
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
        for name, overrides in commands:
            try:
                cfg = compose(config_name="train", overrides=overrides, return_hydra_config=True)
                model = json.dumps({key: OmegaConf.to_container(cfg[key], resolve=True)
                                    for key in ("backbone", "op", "attn", "task")}, sort_keys=True)
                model += str((OmegaConf.select(cfg, "data.image_size"), OmegaConf.select(cfg, "data.num_classes")))
                if model in built:
                    continue
                built.add(model)
                validate_model_config(cfg)  # builds the network on the meta device and runs it once
            except Exception as error:  # noqa: BLE001 - collect them all, report together
                failures.append(f"{name}: {type(error).__name__}: {str(error).splitlines()[0][:200]}")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("table", [t for t in all_tables()], ids=lambda t: t.id)
def test_unbuildable_rows_say_why(table):
    for row in table.rows:
        if not row.buildable:
            assert (row.reason_not_built() or "").strip(), f"{table.id}/{row.id}"


def _shapes(compose_train, overrides: list[str]) -> dict[str, tuple]:
    cfg = compose_train(overrides)
    classes, side = counting_size(cfg)
    with torch.device("meta"):
        built = build_backbone(cfg.backbone, OmegaConf.to_container(cfg.op, resolve=True), cfg.attn,
                               num_classes=classes, image_size=side)
    return {name: tuple(tensor.shape) for name, tensor in built.backbone.state_dict().items()}


def test_a_fine_tuning_row_starts_from_a_checkpoint_of_its_own_backbone():
    """`init_from: <table>/<row>` names an ImageNet row whose network has exactly this row's backbone weights
    (names and shapes): otherwise `launch` would fine-tune from a checkpoint that cannot be loaded."""
    from dynconv.reproduction.tables import load_table

    register_resolvers()
    GlobalHydra.instance().clear()
    mismatched = []
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
        def compose_train(overrides):
            return compose(config_name="train", overrides=overrides)

        for table in all_tables():
            for row in table.rows:
                if not row.buildable or not (row.init_from or row.pretrain):
                    continue
                if row.pretrain:
                    parent_overrides = list(row.pretrain)
                else:
                    parent_table = load_table(row.init_from.split("/")[0])
                    parent_overrides = parent_table.row_overrides(parent_table.row(row.init_from.split("/")[1]))
                ours, theirs = _shapes(compose_train, table.row_overrides(row)), _shapes(compose_train, parent_overrides)
                if ours != theirs:
                    differing = sorted(set(ours.items()) ^ set(theirs.items()))[:3]
                    mismatched.append(f"{table.id}/{row.id} <- {row.init_from or 'pretrain'}: {differing}")
    assert not mismatched, "\n".join(mismatched)
