"""Evaluate a checkpoint: rebuild the model from its stored config, score it, count its cost."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf

from dynconv.build import build_backbone
from dynconv.config import ConfigError, validate_data_config, validate_model_config
from dynconv.engine.checkpoint import checkpoint_in_run, ema_weights, load_checkpoint
from dynconv.engine.eval_progress import with_progress
from dynconv.engine.distributed import init_distributed
from dynconv.profiling import count_macs, count_params, fold_for_inference


def _merge_overrides(stored: dict[str, Any], cfg: DictConfig) -> DictConfig:
    run_cfg = OmegaConf.create(stored)
    for section in ("data", "recipe", "task"):
        for key, value in (cfg.get(section) or {}).items():
            if value is None:
                continue
            if section == "task" and key not in run_cfg.task:
                # Evaluation settings of one task (segmentation's sliding windows): not a key this run's task has.
                raise ConfigError(f"task.{key}={value} does not apply to this checkpoint's task={run_cfg.task.name} "
                                  f"(it has no task.{key}); allowed values: null")
            OmegaConf.update(run_cfg, f"{section}.{key}", value, force_add=True)
    return run_cfg


def resolve_checkpoint(checkpoint: str) -> Path:
    """`checkpoint=` as a file: a checkpoint file as given, a run folder as its best checkpoint (`best.pt`, else
    `last.pt`); a folder without either is a FileNotFoundError naming it."""
    path = Path(str(checkpoint)).expanduser()
    if path.is_dir():
        found = checkpoint_in_run(path)
        if found is None:
            raise FileNotFoundError(f"checkpoint={checkpoint}: a folder without checkpoints/best.pt or "
                                    "checkpoints/last.pt (pass a run folder of train.py or a checkpoint file)")
        return found
    return path


def check_class_names(trained: list[str] | None, data: Any, path: Path) -> None:
    """The evaluated split must name the classes the checkpoint was trained on, in the same order: labels are
    indices into that list, so another folder set would score every image against a shifted label."""
    from dynconv.engine.training_run import class_names

    found = class_names(data)
    if not trained or not found or list(trained) == list(found):
        return
    missing = [name for name in trained if name not in found][:5]
    extra = [name for name in found if name not in trained][:5]
    detail = f"missing: {missing}, not trained: {extra}" if missing or extra else "the same names in another order"
    raise ConfigError(f"the evaluated data's classes differ from those {path} was trained on ({len(found)} vs "
                      f"{len(trained)} classes; {detail}); "
                      "point data.root at the dataset the run trained on")


@dataclass
class LoadedCheckpoint:
    """A checkpoint's model rebuilt from its stored config (eval.py's overrides applied), ready to evaluate."""

    payload: dict[str, Any]
    run_cfg: DictConfig
    dist: Any
    data: Any
    task: Any
    model: Any


def load_for_evaluation(cfg: DictConfig, check_run_config: Callable[[DictConfig], None] | None = None
                        ) -> LoadedCheckpoint:
    """Validate, rebuild and load the model of `cfg.checkpoint` (`cfg.weights`: model or ema) on `cfg.device`.

    `check_run_config(run_cfg)` may refuse the stored config (raising ConfigError) before anything is built."""
    from dynconv.tasks import TASKS

    if cfg.weights not in ("model", "ema"):
        raise ConfigError(f"weights={cfg.weights!r} is invalid; allowed values: model, ema")
    path = resolve_checkpoint(cfg.checkpoint)
    payload = load_checkpoint(path)
    run_cfg = _merge_overrides(payload["config"], cfg)
    validate_model_config(run_cfg)
    validate_data_config(run_cfg, evaluation=True)
    if check_run_config is not None:
        check_run_config(run_cfg)
    state = payload["model"]
    if cfg.weights == "ema":
        ema_state = ema_weights(payload)
        if ema_state is None:
            raise ConfigError(f"weights=ema but {path} holds no EMA weights (recipe.ema.enabled was false)")
        state = ema_state

    dist = init_distributed(cfg.device)
    task_class = TASKS.get(run_cfg.task.name)
    data = task_class.build_eval_data(run_cfg.data, run_cfg.recipe, rank=dist.rank, world_size=dist.world_size,
                                      seed=run_cfg.seed)
    check_class_names(payload.get("class_names"), data, path)
    built = build_backbone(run_cfg.backbone, OmegaConf.to_container(run_cfg.op, resolve=True), run_cfg.attn,
                           num_classes=data.num_classes, image_size=run_cfg.data.image_size)
    task = task_class(run_cfg.task, run_cfg.recipe, data.num_classes, data)
    model = task.build_model(built.backbone)
    model.load_state_dict(state)
    model.to(dist.device)
    return LoadedCheckpoint(payload, run_cfg, dist, data, task, model)


def evaluate_checkpoint(cfg: DictConfig) -> dict[str, Any]:
    loaded = load_for_evaluation(cfg)
    payload, run_cfg, dist, data, task, model = (loaded.payload, loaded.run_cfg, loaded.dist, loaded.data,
                                                 loaded.task, loaded.model)
    loader = with_progress(data.val_loader, dist.is_main and bool(cfg.get("progress_bar", True)))
    metrics = task.evaluate(model, loader, dist.device, contextlib.nullcontext)

    # Detection: the test scale (the model resizes every image to it); classification: the training size; video:
    # a clip of data.num_frames frames (the task says).
    input_size = task.input_size(run_cfg.data)
    folded = fold_for_inference(model)
    return {
        **{key: metrics.get(key) for key in task.result_keys()},
        "samples": metrics.get("samples"),
        "params": count_params(model),
        "params_inference": count_params(folded),
        "macs": count_macs(model, input_size).total,
        "macs_inference": count_macs(folded, input_size).total,
        "input_size": list(input_size),
        "checkpoint": str(resolve_checkpoint(cfg.checkpoint)),
        "weights": cfg.weights,
        "epoch": payload.get("epoch"),
        "world_size": dist.world_size,
    }
