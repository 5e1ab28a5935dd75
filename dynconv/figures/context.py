"""What a figure reads: checkpoints picked by operator, their models and validation data, collected results.

`scripts/figures.py` takes `checkpoint=` (one checkpoint or run folder, or a list of them) and `runs=` (a folder of
train.py / reproduce.py runs). Every checkpoint found there is a candidate; a figure asks for one by what it needs
(`ctx.find(ops=("weightnet", ...), need="...")`: the first candidate trained with one of those operators) and the
context loads it once (the model rebuilt from the config stored in the checkpoint, as eval.py does) however many
figures use it. When nothing fits, `MissingInput` names what to train or pass.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from omegaconf import DictConfig, OmegaConf

from dynconv.engine.checkpoint import checkpoint_in_run
from dynconv.figures.registry import MissingInput

PER_SAMPLE_OPS = ("weightnet", "condconv", "dyconv", "odconv", "kw", "dynet", "dcd", "cgc")


@dataclass
class RunRef:
    """One candidate checkpoint and the run config stored in it."""

    checkpoint: Path
    config: dict[str, Any]
    run_dir: Path | None = None  # the run folder (TensorBoard logs, metrics.json), when known

    def _get(self, dotted: str) -> Any:
        value: Any = self.config
        for part in dotted.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        return value

    @property
    def op(self) -> str:
        return self._get("op.name") or "static"

    @property
    def backbone(self) -> str:
        return self._get("backbone.name") or "?"

    @property
    def task(self) -> str:
        return self._get("task.name") or "classification"

    @property
    def table_row(self) -> tuple[str | None, str | None]:
        return self._get("reproduce.table"), self._get("reproduce.row")

    @property
    def smoke(self) -> bool:
        """A smoke run of `reproduce.py launch` (two steps): picked only when nothing trained fits."""
        return bool(self._get("reproduce.smoke"))

    @property
    def label(self) -> str:
        return f"{self.backbone} + {self.op}"


@dataclass
class LoadedRun:
    """A checkpoint's model (eval mode, on the context's device) with its validation loader and task."""

    ref: RunRef
    model: torch.nn.Module
    run_cfg: DictConfig
    data: Any
    task: Any
    device: torch.device

    @property
    def class_names(self) -> list[str]:
        dataset = getattr(self.data.val_loader, "dataset", None)
        names = getattr(self.data, "class_names", None) or getattr(dataset, "classes", None)
        return list(names) if names else [str(index) for index in range(self.data.num_classes)]


def _as_list(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)) or OmegaConf.is_list(value):
        return [str(item) for item in value]
    return [str(value)]


@dataclass
class FigureContext:
    cfg: DictConfig
    out_dir: Path
    _candidates: list[RunRef] | None = None
    _loaded: dict[Path, LoadedRun] = field(default_factory=dict)
    _results: list[dict[str, Any]] | None = None
    written: list[str] = field(default_factory=list)

    # ------------------------------------------------------------------------------------------- inputs

    def candidates(self) -> list[RunRef]:
        """Every checkpoint given (`checkpoint=`) or found under `runs=`, explicit ones first."""
        if self._candidates is None:
            from dynconv.engine.checkpoint import load_checkpoint

            refs: list[RunRef] = []
            for item in _as_list(self.cfg.checkpoint):
                path = Path(item)
                run_dir = None
                if path.is_dir():
                    run_dir, path = path, checkpoint_in_run(path)
                    if path is None:
                        raise FileNotFoundError(f"checkpoint={item}: the folder holds no checkpoints/best.pt or "
                                                "checkpoints/last.pt")
                payload = load_checkpoint(path)  # raises with the path for a missing or corrupt file
                if run_dir is None and path.parent.name == "checkpoints":
                    run_dir = path.parent.parent
                refs.append(RunRef(path, dict(payload.get("config") or {}), run_dir))
            for run_dir in self.run_dirs():
                checkpoint = checkpoint_in_run(run_dir)
                if checkpoint is None or any(ref.checkpoint == checkpoint or ref.run_dir == run_dir for ref in refs):
                    continue
                refs.append(RunRef(checkpoint, _read_config(run_dir), run_dir))
            self._candidates = refs
        return self._candidates

    def run_dirs(self) -> list[Path]:
        """Run folders (each with a config.yaml): those of the checkpoints given, then every one under `runs=`."""
        from dynconv.reproduction.results import find_runs

        found: list[Path] = []
        for item in _as_list(self.cfg.checkpoint):  # the run folders of the checkpoints given, first
            path = Path(item)
            folder = path if path.is_dir() else path.parent.parent if path.parent.name == "checkpoints" else None
            if folder is not None and (folder / "config.yaml").is_file() and folder not in found:
                found.append(folder)
        if self.cfg.runs:
            root = Path(str(self.cfg.runs))
            if not root.is_dir():
                raise FileNotFoundError(f"runs={root}: no such folder")
            found += [folder for folder in find_runs(root) if folder not in found]
        return found

    def find(self, ops: Sequence[str] | None = None, *, need: str, backbone: str | None = None,
             task: str = "classification", exclude: Sequence[RunRef] = (), prefer: Sequence[str] = ()) -> RunRef:
        """The first candidate of `task` trained with one of `ops` (any op: None), on `backbone` if given.
        `prefer`: operators tried first, in order; smoke runs last; the checkpoints given before those found under
        `runs=`. Raises MissingInput(need) when none fits."""
        matching = [ref for ref in self.candidates()
                    if ref.task == task and (ops is None or ref.op in ops)
                    and (backbone is None or ref.backbone == backbone)
                    and all(ref.checkpoint != other.checkpoint for other in exclude)]
        if not matching:
            given = ", ".join(f"{ref.label} ({ref.checkpoint})" for ref in self.candidates()) or "none"
            raise MissingInput(f"{need} (checkpoints given: {given})")
        rank = {op: index for index, op in enumerate(prefer)}
        return sorted(matching, key=lambda ref: (ref.smoke, rank.get(ref.op, len(rank))))[0]

    def load(self, ref: RunRef) -> LoadedRun:
        """The model of `ref` rebuilt and loaded (cached), in eval mode, with its validation loader."""
        if ref.checkpoint not in self._loaded:
            from dynconv.engine.evaluation_run import load_for_evaluation

            eval_cfg = OmegaConf.create({
                "checkpoint": str(ref.checkpoint), "weights": self.cfg.weights, "device": self.cfg.device,
                "data": OmegaConf.to_container(self.cfg.data), "recipe": OmegaConf.to_container(self.cfg.recipe),
                "task": {}})
            loaded = load_for_evaluation(eval_cfg)
            loaded.model.eval()
            self._loaded[ref.checkpoint] = LoadedRun(ref, loaded.model, loaded.run_cfg, loaded.data, loaded.task,
                                                     loaded.dist.device)
        return self._loaded[ref.checkpoint]

    def batches(self, run: LoadedRun, limit: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(images, targets) of the validation split on the run's device, at most `limit` images (None: all)."""
        seen = 0
        for batch in run.data.val_loader:
            images, targets = batch[0], batch[1]  # loaders may add more (the sample's index)
            if limit is not None and seen >= limit:
                break
            if limit is not None and seen + images.shape[0] > limit:
                images, targets = images[: limit - seen], targets[: limit - seen]
            seen += images.shape[0]
            yield images.to(run.device), targets.to(run.device)

    def results(self, need: str) -> list[dict[str, Any]]:
        """Every run under `runs=` as `reproduce.py collect` reads it (its results.json is not required)."""
        if self._results is None:
            if not self.cfg.runs:
                raise MissingInput(f"{need}: pass runs=<folder of runs> (python scripts/reproduce.py launch ... "
                                   "runs=<folder>, or train.py outputs)")
            from dynconv.reproduction.results import collect

            self._results = collect(Path(str(self.cfg.runs))).runs
        return self._results

    # ------------------------------------------------------------------------------------------ outputs

    def save(self, name: str, fig=None, data: Any = None, rows: Sequence[dict[str, Any]] | None = None) -> list[str]:
        """Write `<out>/<name>.png` (from `fig`), `<name>.json` (`data`) and `<name>.csv` (`rows`); returns paths."""
        from dynconv.figures.output import save_csv, save_json, save_png

        self.out_dir.mkdir(parents=True, exist_ok=True)
        paths = []
        if fig is not None:
            paths.append(save_png(fig, self.out_dir / f"{name}.png"))
        if data is not None:
            paths.append(save_json(data, self.out_dir / f"{name}.json"))
        if rows is not None:
            paths.append(save_csv(rows, self.out_dir / f"{name}.csv"))
        written = [str(path) for path in paths]
        self.written += written
        return written

    @contextlib.contextmanager
    def no_grad(self):
        with torch.no_grad():
            yield


def _read_config(run_dir: Path) -> dict[str, Any]:
    import yaml

    try:
        value = yaml.safe_load((run_dir / "config.yaml").read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return {}
    return value if isinstance(value, dict) else {}


def _same_value(stored: Any, wanted: str) -> bool:
    """A config value against an override's text (`1/2` and `0.5`, `true` and True, `4` and 4.0 agree)."""
    if isinstance(stored, bool) or wanted.lower() in ("true", "false"):
        return str(stored).lower() == wanted.lower()
    try:
        from fractions import Fraction

        return float(Fraction(str(stored))) == float(Fraction(wanted))
    except (ValueError, ZeroDivisionError):
        return str(stored) == wanted


def matches_row(ref: RunRef, table_id: str, row_id: str) -> bool:
    """`ref` trained that paper-table row: launched for it (`reproduce.table/row`), or a run whose backbone and
    operator settings equal the row's `backbone=`, `op=` and `op.*` overrides (a run started by hand)."""
    from dynconv.reproduction.tables import load_table

    if ref.table_row == (table_id, row_id):
        return True
    table = load_table(table_id)
    for override in table.row_overrides(table.row(row_id)):
        key, _, value = override.partition("=")
        key = key.lstrip("+~")
        if key == "op":
            key = "op.name"
        elif key == "backbone":
            key = "backbone.name"
        elif not key.startswith("op."):
            continue  # recipe and regularisation overrides do not change what the figure shows
        if not _same_value(ref._get(key), value):
            return False
    return True
