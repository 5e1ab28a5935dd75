"""`reproduce.py launch`: the commands that train a table's rows, in the order their checkpoints are needed.

Each row is one Hydra multirun of train.py with the table's and the row's overrides, its folder fixed to
`<results>/<table>/<row>/` (`hydra.sweep.dir` + `hydra.sweep.subdir`) and its row recorded in the config
(`reproduce.table`, `reproduce.row`), so that `collect` knows which row a run is wherever it was copied.
Rerunning the same command resumes the row (train.py resumes from the folder's last.pt).

Rows that fine-tune (`init_from: <table>/<row>`) start from the best checkpoint of the ImageNet row that trains
their backbone: that row is launched first (in an earlier wave) when its checkpoint is not there yet.
`smoke=true` swaps the data for the embedded datasets (digits for classification, toy COCO for detection,
toy_seg for segmentation, toy_video for video) and
cuts every row to a few steps, with the selector's cost model instead of measuring each convolution shape
(`conv_algorithm=model`: measuring would dominate a four-step run): it proves that each row composes, builds,
trains and is collected, on a laptop.
"""

from __future__ import annotations

import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

from dynconv.paths import CHECKOUT_DIR
from dynconv.reproduction.tables import Row, Table, load_table, merge_overrides, override_key

REPO = Path(__file__).resolve().parents[2]
SMOKE_CLASSIFICATION = ["data=digits", "data.max_train_samples=32", "data.max_val_samples=32", "data.num_workers=0",
                        "recipe.epochs=1", "recipe.batch_size=16", "recipe.eval_batch_size=64",
                        "recipe.warmup_epochs=0", "recipe.accum_steps=1", "recipe.cycle_epochs=null",
                        "recipe.cycle_limit=1", "conv_algorithm=model", "log.progress_bar=false"]
SMOKE_DETECTION = ["data=toy_coco", "data.max_train_samples=16", "data.max_val_samples=8", "data.num_workers=0",
                   "recipe.epochs=1", "recipe.warmup_epochs=0", "conv_algorithm=model", "log.progress_bar=false"]
# Whole-image evaluation: a row's sliding windows (768 px for Cityscapes) would pad every toy image to a window.
SMOKE_SEGMENTATION = ["data=toy_seg", "data.max_train_samples=16", "data.max_val_samples=8", "data.num_workers=0",
                      "recipe.epochs=1", "recipe.warmup_epochs=0", "task.eval_mode=whole", "conv_algorithm=model",
                      "log.progress_bar=false"]
SMOKE_VIDEO = ["data=toy_video", "data.max_train_samples=16", "data.max_val_samples=8", "data.num_workers=0",
               "recipe.epochs=1", "recipe.warmup_epochs=0", "conv_algorithm=model", "log.progress_bar=false"]
# The embedded dataset each task's smoke runs on; those of the dense tasks pick their own CPU-sized recipe (a
# `# @package _global_` data file), so the row's recipe override is dropped with its data.
SMOKE_BY_TASK = {"classification": SMOKE_CLASSIFICATION, "retinanet": SMOKE_DETECTION, "maskrcnn": SMOKE_DETECTION,
                 "segmentation": SMOKE_SEGMENTATION, "video": SMOKE_VIDEO}


@dataclass
class Job:
    table: Table
    row: Row
    overrides: list[str]
    wave: int  # 0: no dependency; 1: fine-tunes a wave-0 row's checkpoint
    run_dir: Path
    needs: list[str] = field(default_factory=list)  # "<table>/<row>" whose checkpoint this job starts from

    @property
    def name(self) -> str:
        return f"{self.table.id}/{self.row.id}"


def row_task(overrides: list[str]) -> str:
    for override in overrides:
        if override_key(override) == "task":
            return override.split("=", 1)[1]
    return "classification"


def smoke_overrides(overrides: list[str]) -> list[str]:
    """The row's overrides on the embedded data for a few steps: its data (and, for the dense tasks, its recipe:
    toy COCO, toy_seg and toy_video pick their CPU-sized recipes) replaced; everything that defines the model kept."""
    task = row_task(overrides)
    own_recipe = task != "classification"
    kept = [item for item in overrides if override_key(item) != "data" and not override_key(item).startswith("data.")
            and not (own_recipe and (override_key(item) == "recipe" or override_key(item).startswith("recipe.")))]
    return merge_overrides(kept, SMOKE_BY_TASK.get(task, SMOKE_CLASSIFICATION))


def checkpoint_of(results: Path, reference: str) -> Path:
    table_id, _, row_id = reference.partition("/")
    return results / table_id / row_id / "checkpoints" / "best.pt"


def plan(table: Table, results: Path, *, rows: list[str] | None = None, smoke: bool = False,
         extra: list[str] | None = None, data_root: str | None = None) -> tuple[list[Job], list[str]]:
    """The jobs that train `table`'s rows (and the rows their fine-tuning starts from), and the rows skipped with
    why (not buildable; nothing to train)."""
    skipped: list[str] = []
    wanted = [table.row(row_id) for row_id in rows] if rows else list(table.rows)
    jobs: dict[str, Job] = {}

    def add(source: Table, row: Row, wave: int) -> Job | None:
        key = f"{source.id}/{row.id}"
        if key in jobs:
            jobs[key].wave = min(jobs[key].wave, wave)
            return jobs[key]
        if not row.buildable:
            skipped.append(f"{key}: cannot build: {row.reason_not_built()}")
            return None
        overrides = source.row_overrides(row)
        needs = []
        if row.pretrain:
            # The backbone's own ImageNet training, `<results>/<table>/<row>_pretrain/`, in the wave before.
            pretrain_row = Row(id=f"{row.id}_pretrain", label=f"{row.label} (ImageNet pretraining)",
                               overrides=row.pretrain, paper={})
            parent = add(Table(id=source.id, paper=source.paper, number=source.number, caption=source.caption,
                               task="classification", columns=(), rows=(pretrain_row,)), pretrain_row, wave)
            needs.append(parent.name)
            reference = f"{source.id}/{pretrain_row.id}"
            overrides = merge_overrides(overrides, [f"init_from={checkpoint_of(results, reference)}"])
            wave = parent.wave + 1
        elif row.init_from:
            parent_table = load_table(row.init_from.partition("/")[0])
            parent = add(parent_table, parent_table.row(row.init_from.partition("/")[2]), wave)
            if parent is None:
                skipped.append(f"{key}: its backbone row {row.init_from} cannot be built")
                return None
            needs.append(parent.name)
            overrides = merge_overrides(overrides, [f"init_from={checkpoint_of(results, row.init_from)}"])
            wave = parent.wave + 1
        if smoke:
            overrides = smoke_overrides(overrides)
        elif data_root:
            overrides = merge_overrides(overrides, [f"data.root={data_root}"])
        overrides = merge_overrides(overrides, list(extra or []),
                                    [f"reproduce.table={source.id}", f"reproduce.row={row.id}",
                                     f"reproduce.smoke={str(smoke).lower()}"])
        job = Job(source, row, overrides, wave, results / source.id / row.id, needs)
        jobs[key] = job
        return job

    if not table.trains:
        skipped.append(f"{table.id}: nothing to train (its columns are counted: reproduce.py show table={table.id})")
        return [], skipped
    for row in wanted:
        add(table, row, 0)
    ordered = sorted(jobs.values(), key=lambda job: job.wave)
    # A pretraining row whose checkpoint is already there need not run again (its folder would resume anyway).
    needed = {name for job in ordered for name in job.needs}
    ordered = [job for job in ordered if not (job.name in needed and job.table.id != table.id
                                              and (job.run_dir / "checkpoints" / "best.pt").exists())]
    return ordered, skipped


def command(job: Job, launcher: str, python: str = "python") -> list[str]:
    """`python train.py -m <overrides> hydra.sweep.dir=<results>/<table> hydra.sweep.subdir=<row>` (one job)."""
    if CHECKOUT_DIR is None:  # an installed dynconv: no train.py, the module is the same entry point
        args = [python, "-m", "dynconv.train", "-m"]
    else:
        args = [python, str(REPO / "train.py") if python == sys.executable else "train.py", "-m"]
    if launcher == "slurm":
        args.append("hydra/launcher=slurm")
    args += job.overrides
    args += [f"hydra.sweep.dir={job.run_dir.parent}", f"hydra.sweep.subdir={job.row.id}"]
    return args


def shell_line(args: list[str]) -> str:
    return shlex.join(args)
