"""One training run, from a validated config to the final metrics (what train.py calls).

Order matters for "nothing is lost, nothing is half-written": validate everything (config, data layout,
resume compatibility) before the first byte goes to the run directory; then build, train, and write
metrics.json and conv_algorithms.json atomically at the end.
"""

from __future__ import annotations

import json
import logging
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from dynconv.build import build_backbone
from dynconv.config import ConfigError, checkpoint_mismatch, validate_train_config
from dynconv.engine import hooks as H
from dynconv.engine.checkpoint import atomic_write, find_resumable, load_checkpoint, remove_stale_temporaries
from dynconv.engine.distributed import DistInfo, init_distributed
from dynconv.engine.trainer import Trainer
from dynconv.functional import selector

log = logging.getLogger("dynconv")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def to_channels_last(model: torch.nn.Module) -> None:
    """channels_last for every 4-D weight; `Module.to(memory_format=...)` would also try the 5-D expert
    banks of dynamic operators, which have no channels_last layout, and fail."""
    for tensor in list(model.parameters()) + list(model.buffers()):
        if tensor.dim() == 4:
            tensor.data = tensor.data.contiguous(memory_format=torch.channels_last)


def _amp_dtype(mode: str) -> torch.dtype | None:
    return {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[mode]


def load_resume_state(cfg: DictConfig, run_dir: Path) -> tuple[Path | None, dict[str, Any] | None]:
    """The checkpoint to resume from: `resume=<path>`, or with `resume=auto` the run folder's newest readable full
    state (`last.pt`, else `previous.pt`: a corrupt `last.pt` is reported and skipped). Leftover temporary files
    of a killed writer are removed first."""
    if cfg.resume == "never":
        return None, None
    if cfg.resume != "auto":
        return Path(cfg.resume), load_checkpoint(cfg.resume)
    for folder in (run_dir / "checkpoints", run_dir):
        for stale in remove_stale_temporaries(folder):
            log.warning("removed %s, left by a writer that was killed before it finished", stale)
    path, payload, problems = find_resumable(run_dir / "checkpoints")
    for problem in problems:
        log.warning("%s", problem)
    if problems and path is not None:
        log.warning("resuming from %s instead", path)
    elif problems:
        log.warning("no readable checkpoint in %s: starting from scratch", run_dir / "checkpoints")
    return path, payload


def class_names(data) -> list[str] | None:
    """The class names of a task's data (an ImageFolder's folders, CIFAR's meta, COCO's categories), for best.pt."""
    names = getattr(data, "class_names", None)
    if names:
        return list(names)
    dataset = getattr(data.val_loader, "dataset", None)
    while dataset is not None:
        if getattr(dataset, "classes", None):
            return [str(name) for name in dataset.classes]
        coco, ids = getattr(dataset, "coco", None), getattr(data, "category_ids", None)
        if coco is not None and ids:
            return [category["name"] for category in coco.loadCats(list(ids))]
        dataset = getattr(dataset, "dataset", None)
    return None


def build_optimizer_and_scheduler(model, recipe, updates_per_epoch: int):
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2

    optimizer = create_optimizer_v2(model, opt=recipe.opt, lr=recipe.lr, weight_decay=recipe.weight_decay,
                                    momentum=recipe.momentum)
    sched = recipe.sched
    if sched == "none":
        return optimizer, None
    # timm calls linear decay "poly" with power 1 (decay_rate is the power there).
    timm_sched, decay_rate = ("poly", 1.0) if sched == "linear" else (sched, recipe.decay_rate)
    scheduler, _ = create_scheduler_v2(
        optimizer,
        sched=timm_sched,
        num_epochs=recipe.epochs,
        decay_epochs=recipe.decay_epochs,
        decay_milestones=list(recipe.decay_milestones),
        decay_rate=decay_rate,
        min_lr=recipe.min_lr,
        warmup_lr=recipe.warmup_lr,
        warmup_epochs=recipe.warmup_epochs,
        step_on_epochs=False,  # per-iteration updates: smooth warmup and decay at any batch size
        updates_per_epoch=updates_per_epoch,
    )
    return optimizer, scheduler


def _silence_other_ranks(dist: DistInfo) -> None:
    """Only rank 0 writes logs: drop file handlers elsewhere and keep warnings on the console."""
    if dist.is_main:
        return
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, logging.FileHandler):
            root.removeHandler(handler)
    logging.getLogger("dynconv").setLevel(logging.WARNING)


def _write_json_atomic(payload: dict[str, Any], path: Path) -> None:
    atomic_write(path, lambda handle: handle.write(json.dumps(payload, indent=2) + "\n"), binary=False)


def conv_algorithm_policy(cfg: DictConfig) -> str:
    """The selector's policy for this run: `conv_algorithm` (default: DYNCONV_CONV_ALGORITHM, else "measure").
    With `deterministic=true` "measure" becomes the cost model: like cuDNN's autotuner, a measured choice can
    differ between runs (timing noise), and so can the rounding of the results."""
    policy = str(OmegaConf.select(cfg, "conv_algorithm", default=None) or selector.get_policy())
    return "model" if cfg.deterministic and policy == "measure" else policy


def default_hooks(cfg: DictConfig, model, scheduler, dist: DistInfo, run_dir: Path,
                  names: list[str] | None = None) -> list[H.Hook]:
    """The hooks of a training run, in call order.

    The lr is set before the step; a stop request is raised before the checkpoint hook looks for it;
    evaluation runs before the checkpoint records its metrics; loggers come last.
    """
    ema = cfg.recipe.ema
    ema_hook = H.EMAHook(model, ema.decay, warmup=ema.warmup) if ema.enabled else None
    hooks = [
        H.OperatorScheduleHook(),
        H.LRScheduleHook(scheduler) if scheduler is not None else None,
        ema_hook,
        H.PreemptionHook(cfg.log.every),
        H.EvalHook(cfg.recipe.eval_every, ema_hook),
        H.CheckpointHook(run_dir / "checkpoints", cfg.checkpoint.save_best, keep_last=cfg.checkpoint.keep_last,
                         on_write_error=cfg.checkpoint.on_write_error, class_names=names)
        if cfg.checkpoint.enabled else None,
        H.TensorBoardHook(run_dir / "tensorboard", cfg.log.every) if dist.is_main and cfg.log.tensorboard else None,
        H.ProgressHook(cfg.log.every) if dist.is_main and cfg.log.progress_bar else None,
    ]
    return [hook for hook in hooks if hook is not None]


def run_training(cfg: DictConfig, run_dir: Path) -> tuple[dict[str, Any], int]:
    """Train as configured; return (final metrics for the JSON line, process exit code)."""
    validate_train_config(cfg)
    policy = conv_algorithm_policy(cfg)
    config_dict = OmegaConf.to_container(cfg, resolve=True)
    config_dict["conv_algorithm"] = policy  # the saved config records the policy in force
    resume_path, payload = load_resume_state(cfg, run_dir)
    if payload is not None:
        mismatch = checkpoint_mismatch(payload.get("config", {}), config_dict)
        if mismatch:
            raise ConfigError(
                f"{resume_path} was trained with a different model ({'; '.join(mismatch)}); "
                "use another hydra.run.dir, or resume=never to start over"
            )

    with selector.policy(policy):  # restored when the run ends, however it ends
        return _train(cfg, config_dict, run_dir, payload, resume_path)


def _train(cfg: DictConfig, config_dict: dict[str, Any], run_dir: Path, payload: dict[str, Any] | None,
           resume_path: Path | None) -> tuple[dict[str, Any], int]:
    dist = init_distributed(cfg.device, cfg.dist.backend, timeout_s=cfg.dist.timeout_s)
    _silence_other_ranks(dist)
    seed_everything(cfg.seed)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    elif dist.device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(config_dict)))

    from dynconv.tasks import TASKS

    task_class = TASKS.get(cfg.task.name)
    data = task_class.build_data(cfg.data, cfg.recipe, rank=dist.rank, world_size=dist.world_size, seed=cfg.seed)
    built = build_backbone(cfg.backbone, config_dict["op"], cfg.attn, num_classes=data.num_classes,
                           image_size=cfg.data.image_size)
    if cfg.get("init_from"):
        from dynconv.build import load_backbone_weights

        skipped = load_backbone_weights(built.backbone, load_checkpoint(cfg.init_from), str(cfg.init_from))
        if dist.is_main:
            log.info("initialised from %s (skipped: %s)", cfg.init_from, ", ".join(skipped) or "nothing")
    task = task_class(cfg.task, cfg.recipe, data.num_classes, data)
    model = task.build_model(built.backbone)
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if dist.is_main:
        log.info("%s\nparameters: %s", built.summary(), f"{params:,}")
    if cfg.recipe.sync_bn and dist.distributed:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(dist.device)
    if cfg.recipe.channels_last:
        to_channels_last(model)

    optimizer, scheduler = build_optimizer_and_scheduler(model, cfg.recipe, len(data.train_loader))
    trainer = Trainer(
        model=model, task=task, optimizer=optimizer, scheduler=scheduler, train_loader=data.train_loader,
        train_sampler=data.train_sampler, val_loader=data.val_loader, dist=dist, epochs=cfg.recipe.epochs,
        config=config_dict, amp_dtype=_amp_dtype(cfg.recipe.amp), clip_grad=cfg.recipe.clip_grad,
        channels_last=cfg.recipe.channels_last, compile_model=cfg.recipe.compile,
        max_nonfinite=cfg.nonfinite.max_consecutive, log=log,
    )
    trainer.register_hooks(default_hooks(cfg, model, scheduler, dist, run_dir, class_names(data)))
    from dynconv.engine.faults import fault_hooks

    trainer.register_hooks(fault_hooks(dist))  # DYNCONV_FAULTS only: the reliability tests' injected failures
    if payload is not None:
        trainer.resume(payload)
        state = "already complete" if trainer.start_epoch >= cfg.recipe.epochs else "resuming"
        log.info("%s: run %s from %s (epoch %d of %d, batch %d)", state, run_dir, resume_path, trainer.start_epoch,
                 cfg.recipe.epochs, trainer.batches_done)
        del payload

    started = time.perf_counter()
    trainer.train()
    elapsed = time.perf_counter() - started

    metrics = trainer.metrics
    result = {key: metrics.get(key) for key in task.result_keys()}
    result.update({
        f"best_{task.primary_metric}": trainer.best_metrics.get(task.primary_metric),
        "epochs": trainer.epochs_done,
        "world_size": dist.world_size,
        "run_dir": str(run_dir.resolve()),
        "resumed_from": trainer.resumed_from,
        "resumed_checkpoint": str(resume_path) if trainer.resumed_from is not None else None,
        "status": "stopped" if trainer.stop_reason else "completed",
        "params": params,
        "train_time_s": round(elapsed, 2),
        "skipped_images": len(trainer.skipped_images),
        "nonfinite_steps": trainer.nonfinite.total,
    })
    for key in task.result_keys():
        if f"ema_{key}" in metrics:
            result[f"ema_{key}"] = metrics[f"ema_{key}"]
    if trainer.stop_reason:
        result["stop_reason"] = trainer.stop_reason
    if dist.is_main:
        _write_json_atomic({**result, "history_last": metrics, "best": trainer.best_metrics}, run_dir / "metrics.json")
        # Which algorithm each dynamic layer shape ran (this rank's choices; ranks measure for themselves).
        _write_json_atomic({"policy": selector.get_policy(), "choices": selector.choices()},
                           run_dir / "conv_algorithms.json")
    return result, trainer.exit_code
