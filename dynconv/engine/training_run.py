"""One training run, from a validated config to the final metrics (what train.py calls).

Order matters for "nothing is lost, nothing is half-written": validate everything (config, data layout,
resume compatibility) before the first byte goes to the run directory; then write config.yaml and run.json (the
run record: overrides, config hash, git commit, effective batch, ...: a run still training or one that crashed can
be collected with them), build, train, and write metrics.json (with the finished run record) and
conv_algorithms.json atomically at the end.
"""

from __future__ import annotations

import json
import logging
import random
import subprocess
import time
from datetime import datetime, timezone
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
from dynconv.engine.run_naming import config_fingerprint
from dynconv.engine.trainer import Trainer, optimizer_steps_per_epoch
from dynconv.functional import recompute, selector
from dynconv.precision import amp_dtype

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


FUSED_SGD = ("sgd", "momentum")  # timm's names for torch.optim.SGD (Nesterov / classical momentum)


def build_optimizer_and_scheduler(model, recipe, updates_per_epoch: int):
    """timm's optimizer and per-iteration lr schedule; `updates_per_epoch` counts optimizer steps (with gradient
    accumulation, fewer than the loader's batches: `optimizer_steps_per_epoch`)."""
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2

    # torch's fused SGD: one pass over each parameter, its gradient and momentum instead of one per operation. On 2
    # CPU cores the step of ResNet18 + CondConv(8x) (89.8M parameters, momentum and weight decay) took 25 ms against
    # 90 ms (static ResNet18: 4 against 10 ms); the update is the same formula.
    fused = {"fused": True} if recipe.opt.lower() in FUSED_SGD else {}
    optimizer = create_optimizer_v2(model, opt=recipe.opt, lr=recipe.lr, weight_decay=recipe.weight_decay,
                                    momentum=recipe.momentum, **fused)
    sched = recipe.sched
    if sched == "none":
        return optimizer, None
    # timm's "poly" (PolyLRScheduler) takes its power as decay_rate: linear decay is power 1, and sched=poly is the
    # segmentation papers' lr x (1 - t/T)^power with recipe.decay_rate as the power (DeepLab's 0.9, Chen et al. 2017).
    timm_sched, decay_rate = ("poly", 1.0) if sched == "linear" else (sched, recipe.decay_rate)
    scheduler, _ = create_scheduler_v2(
        optimizer,
        sched=timm_sched,
        decay_epochs=recipe.decay_epochs,
        decay_milestones=list(recipe.decay_milestones),
        decay_rate=decay_rate,
        min_lr=recipe.min_lr,
        warmup_lr=recipe.warmup_lr,
        warmup_epochs=recipe.warmup_epochs,
        step_on_epochs=False,  # per-iteration updates: smooth warmup and decay at any batch size
        updates_per_epoch=updates_per_epoch,
        **cosine_cycles(recipe),
    )
    return optimizer, scheduler


def cosine_cycles(recipe) -> dict[str, Any]:
    """The schedule's length and, for `sched=cosine`, its warm restarts (SGDR, Loshchilov & Hutter 2017; WE Fig.
    5b): timm's `num_epochs` is the first cycle's length (its t_initial) when `recipe.cycle_epochs` is set, each
    cycle `cycle_mul` times the one before, `cycle_limit` cycles, after which the lr stays at min_lr. Every restart
    returns to the peak lr (`cycle_decay=1`; timm's default 0.1 would cut each restart's peak tenfold). The keys
    are optional (recipes that predate them: one cycle over all epochs); config validation refuses them with
    another schedule."""
    if recipe.sched != "cosine":
        return {"num_epochs": recipe.epochs}
    cycle_epochs = recipe.get("cycle_epochs")
    return {"num_epochs": cycle_epochs if cycle_epochs is not None else recipe.epochs,
            "cycle_mul": float(recipe.get("cycle_mul", 1.0)), "cycle_limit": int(recipe.get("cycle_limit", 1)),
            "cycle_decay": 1.0}


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


REPO_ROOT = Path(__file__).resolve().parents[2]  # the checkout dynconv runs from (an editable install)
GIT_TIMEOUT_S = 10.0  # git on a slow network file system; the commit is then recorded as unknown


def accum_steps(recipe) -> int:
    """Micro-batches per optimizer step (`recipe.accum_steps`; recipes without the key: 1)."""
    return int(recipe.get("accum_steps", 1))


def task_overrides() -> list[str]:
    """The Hydra task overrides as given on the command line (`op=kw op.b=1/2`), when called inside a Hydra job
    (train.py); [] otherwise."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return []
    return [str(item) for item in OmegaConf.select(HydraConfig.get(), "overrides.task", default=None) or []]


def git_commit(repo: Path = REPO_ROOT) -> str | None:
    """`git rev-parse HEAD` of the checkout dynconv runs from, with "+dirty" when its work tree has changes
    (untracked files count, .gitignore'd ones do not: a new config file changes what a command trains). None when
    dynconv is not run from a git checkout (an installed package: the enclosing repository, if any, is someone
    else's) or git is missing or slow. Never raises: the record must not stop a run."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=True,
                              timeout=GIT_TIMEOUT_S).stdout.strip()

    try:
        top, commit = git("rev-parse", "--show-toplevel", "HEAD").splitlines()
        if Path(top).resolve() != repo.resolve():
            return None
    except (OSError, ValueError, subprocess.SubprocessError):
        return None
    try:
        dirty = bool(git("status", "--porcelain"))
    except (OSError, subprocess.SubprocessError):
        return commit
    return commit + ("+dirty" if dirty else "")


def _package_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("dynconv")
    except PackageNotFoundError:
        return None


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def run_record(cfg: DictConfig, overrides: list[str], world_size: int) -> dict[str, Any]:
    """What `scripts/reproduce.py collect` needs to place and trust a run: how it was launched (overrides, seed,
    config hash = the run folder's name), from which code (git commit, versions), at which effective batch
    (per-process batch x processes x accumulation steps: what the papers' lr is given for), and when."""
    accum = accum_steps(cfg.recipe)
    smoke = OmegaConf.select(cfg, "reproduce.smoke", default=None) or OmegaConf.select(cfg, "smoke", default=None)
    return {
        "overrides": list(overrides),
        "config_hash": config_fingerprint(cfg),
        "seed": cfg.seed,
        "git_commit": git_commit(),
        "world_size": world_size,
        "accum_steps": accum,
        "effective_batch": int(cfg.recipe.batch_size) * world_size * accum,
        "started": utc_now(),
        "finished": None,
        "dynconv_version": _package_version(),
        "torch_version": torch.__version__,
        "smoke": bool(smoke),
    }


def conv_algorithm_policy(cfg: DictConfig) -> str:
    """The selector's policy for this run: `conv_algorithm` (default: DYNCONV_CONV_ALGORITHM, else "measure").
    With `deterministic=true` "measure" becomes the cost model: like cuDNN's autotuner, a measured choice can
    differ between runs (timing noise), and so can the rounding of the results."""
    policy = str(OmegaConf.select(cfg, "conv_algorithm", default=None) or selector.get_policy())
    return "model" if cfg.deterministic and policy == "measure" else policy


def kernel_memory_policy(cfg: DictConfig) -> str:
    """Whether this run's backward remakes the per-sample kernels: `kernel_memory` (default: DYNCONV_KERNEL_MEMORY,
    else "auto")."""
    return str(OmegaConf.select(cfg, "kernel_memory", default=None) or recompute.get_kernel_memory())


def default_hooks(cfg: DictConfig, model, scheduler, dist: DistInfo, run_dir: Path,
                  names: list[str] | None = None) -> list[H.Hook]:
    """The hooks of a training run, in call order.

    The lr is set before the step; a stop request is raised before the checkpoint hook looks for it;
    evaluation runs before the checkpoint records its metrics; loggers come last.
    """
    ema = cfg.recipe.ema
    ema_hook = H.EMAHook(model, ema.decay, warmup=ema.warmup) if ema.enabled else None
    tensorboard = H.TensorBoardHook(run_dir / "tensorboard", cfg.log.every) if dist.is_main and cfg.log.tensorboard \
        else None
    figures = None
    if cfg.log.get("figures") and cfg.log.tensorboard:  # on every rank: they all record their shard and all_reduce
        from dynconv.engine.hooks.figure_logging import FigureLoggingHook

        figures = FigureLoggingHook(tensorboard.writer if tensorboard is not None else None)
    hooks = [
        figures,  # wraps trainer.evaluate: the recorders are on during the evaluation of the model only
        H.OperatorScheduleHook(),
        H.LRScheduleHook(scheduler) if scheduler is not None else None,
        ema_hook,
        H.PreemptionHook(cfg.log.every),
        H.EvalHook(cfg.recipe.eval_every, ema_hook),
        H.CheckpointHook(run_dir / "checkpoints", cfg.checkpoint.save_best, keep_last=cfg.checkpoint.keep_last,
                         on_write_error=cfg.checkpoint.on_write_error, class_names=names)
        if cfg.checkpoint.enabled else None,
        tensorboard,
        H.ProgressHook(cfg.log.every) if dist.is_main and cfg.log.progress_bar else None,
    ]
    return [hook for hook in hooks if hook is not None]


def _start_from_static(backbone, source: str, resuming_from: Path | None, is_main: bool) -> None:
    """`init_from_static`: the dynamic layers from a static network's weights (docs/pretrained.md). Only for a run's
    first start: a resumed run continues from its own checkpoint. Weights that do not fit the backbone stop the run
    as a bad config (exit 2), naming the keys."""
    if resuming_from is not None:
        if is_main:
            log.info("init_from_static=%s not applied: the run resumes from %s", source, resuming_from)
        return
    from dynconv.pretrained import init_from_static

    try:
        report = init_from_static(backbone, source)
    except (ValueError, TypeError) as error:
        raise ConfigError(f"init_from_static={source}: {error}") from None
    if is_main:
        log.info("initialised from the static weights %s:\n%s", source, report.summary())


def run_training(cfg: DictConfig, run_dir: Path, overrides: list[str] | None = None) -> tuple[dict[str, Any], int]:
    """Train as configured; return (final metrics for the JSON line, process exit code). `overrides`: the
    command line's overrides for the run record (default: Hydra's task overrides, inside a Hydra job)."""
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

    # Both restored when the run ends, however it ends.
    with selector.policy(policy), recompute.kernel_memory(kernel_memory_policy(cfg)):
        return _train(cfg, config_dict, run_dir, payload, resume_path,
                      task_overrides() if overrides is None else overrides)


def _train(cfg: DictConfig, config_dict: dict[str, Any], run_dir: Path, payload: dict[str, Any] | None,
           resume_path: Path | None, overrides: list[str]) -> tuple[dict[str, Any], int]:
    dist = init_distributed(cfg.device, cfg.dist.backend, timeout_s=cfg.dist.timeout_s)
    _silence_other_ranks(dist)
    seed_everything(cfg.seed)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    elif dist.device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    record = run_record(cfg, overrides, dist.world_size)
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(config_dict)))
        # Now, not at the end: a run still training, or one that crashed, is collected with its overrides.
        _write_json_atomic(record, run_dir / "run.json")
        log.info("effective batch %d = %d per process x %d process(es) x %d micro-batch(es) per optimizer step",
                 record["effective_batch"], cfg.recipe.batch_size, dist.world_size, record["accum_steps"])

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
    if cfg.get("init_from_static"):
        _start_from_static(built.backbone, cfg.init_from_static, resume_path if payload is not None else None,
                           dist.is_main)
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

    steps_per_epoch = optimizer_steps_per_epoch(len(data.train_loader), record["accum_steps"])
    optimizer, scheduler = build_optimizer_and_scheduler(model, cfg.recipe, steps_per_epoch)
    trainer = Trainer(
        model=model, task=task, optimizer=optimizer, scheduler=scheduler, train_loader=data.train_loader,
        train_sampler=data.train_sampler, val_loader=data.val_loader, dist=dist, epochs=cfg.recipe.epochs,
        config=config_dict, amp_dtype=amp_dtype(cfg.recipe.amp), clip_grad=cfg.recipe.clip_grad,
        channels_last=cfg.recipe.channels_last, compile_model=cfg.recipe.compile,
        max_nonfinite=cfg.nonfinite.max_consecutive, accum_steps=record["accum_steps"], log=log,
        eval_progress=dist.is_main and bool(cfg.log.progress_bar),
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
    result["run"] = {**record, "finished": utc_now()}
    if dist.is_main:
        _write_json_atomic(result["run"], run_dir / "run.json")
        _write_json_atomic({**result, "history_last": metrics, "best": trainer.best_metrics}, run_dir / "metrics.json")
        # Which algorithm each dynamic layer shape ran (this rank's choices; ranks measure for themselves).
        _write_json_atomic({"policy": selector.get_policy(), "choices": selector.choices()},
                           run_dir / "conv_algorithms.json")
    return result, trainer.exit_code
