"""Config checks that run before anything is written, and the resolvers the YAML files use.

Every error names the key, the value and what is allowed, so a typo in a sweep fails in a second,
not after a job has queued for a day.
"""

from __future__ import annotations

import os
from datetime import datetime
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from dynconv.knobs import Knobs
from dynconv.registry import Registry, UnknownNameError

SCHEDULES = ("cosine", "step", "multistep", "linear", "none")
AMP_MODES = ("none", "bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda")


class ConfigError(ValueError):
    """A config that cannot run; the message names the key and the allowed values."""


def run_name() -> str:
    """The run folder name, identical on every rank of one launch.

    Hydra resolves `${now:}` separately in every process, so torchrun ranks would get different folders.
    torchrun shares TORCHELASTIC_RUN_ID (a fresh id with --standalone, --rdzv-id otherwise) and a SLURM
    step shares SLURM_JOB_ID; DYNCONV_RUN_NAME overrides both.
    """
    if os.environ.get("DYNCONV_RUN_NAME"):
        return os.environ["DYNCONV_RUN_NAME"]
    run_id = os.environ.get("TORCHELASTIC_RUN_ID")
    if run_id and run_id != "none":
        return f"torchrun/{run_id}"
    if os.environ.get("SLURM_JOB_ID") and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        return f"slurm/{os.environ['SLURM_JOB_ID']}"
    return datetime.now().strftime("%Y-%m-%d/%H-%M-%S")


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("dynconv_run_name"):
        OmegaConf.register_new_resolver("dynconv_run_name", run_name, use_cache=True)


def _get(cfg: DictConfig, key: str) -> Any:
    try:
        return OmegaConf.select(cfg, key, throw_on_missing=True)
    except MissingMandatoryValue:
        raise ConfigError(f"{key} is required but not set: pass {key}=...") from None


def _check_name(cfg: DictConfig, key: str, registry: Registry) -> None:
    try:
        registry.get(_get(cfg, key))
    except UnknownNameError as error:
        raise ConfigError(str(error)) from None


def _knobs(cfg: DictConfig, *keys: str) -> Knobs:
    """Top-level keys read through the one validator (errors: "<key>=<value> is invalid; allowed values: ...");
    a missing mandatory value (???) says so first."""
    return Knobs({key: _get(cfg, key) for key in keys}, error=ConfigError)


def validate_model_config(cfg: DictConfig) -> None:
    """backbone / op / attn / task names and the operator's knobs."""
    from dynconv.attention import ATTENTIONS
    from dynconv.backbones import BACKBONES
    from dynconv.build import make_operator
    from dynconv.ops import OPERATORS, OperatorConfigError
    from dynconv.tasks import TASKS

    _check_name(cfg, "backbone.name", BACKBONES)
    _check_name(cfg, "op.name", OPERATORS)
    _check_name(cfg, "attn.name", ATTENTIONS)
    _check_name(cfg, "task.name", TASKS)
    op_cfg = OmegaConf.to_container(cfg.op, resolve=True)
    try:
        make_operator(op_cfg)
        # Knobs that must fit every layer (WeightNet's G, SK's dilations) and add-ons that must fit the backbone
        # are only known once the model is built: build it on the meta device (no memory, no initialisation
        # cost: ~0.1 s for ResNet50), so such errors also stop the run before anything is written.
        import torch

        from dynconv.build import build_backbone

        with torch.device("meta"):
            built = build_backbone(cfg.backbone, op_cfg, cfg.attn, num_classes=10,
                                   image_size=int(OmegaConf.select(cfg, "data.image_size", default=224)))
    except OperatorConfigError as error:
        raise ConfigError(str(error)) from None
    try:
        TASKS.get(cfg.task.name).validate_config(cfg.task, built.backbone)
    except ValueError as error:
        raise ConfigError(str(error)) from None


def validate_data_config(cfg: DictConfig) -> None:
    """data.name names a registered dataset that fits the task, and its files are where the config says."""
    from dynconv.data import DATASETS
    from dynconv.tasks import TASKS  # importing the tasks registers their datasets

    _check_name(cfg, "data.name", DATASETS)
    spec = DATASETS.get(_get(cfg, "data.name"))
    task_name = _get(cfg, "task.name")
    if task_name in TASKS:
        fitting = TASKS.get(task_name).data_names()
        if spec.name not in fitting:
            raise ConfigError(f"data={spec.name} does not fit task={task_name}; allowed data for this task: "
                              f"{', '.join(fitting)}")
    if not spec.embedded:
        _get(cfg, "data.root")  # a mandatory value left unset (???) says so first
        spec.check(cfg.data)


def validate_recipe_config(cfg: DictConfig) -> None:
    import timm.optim

    import torch

    knobs = _knobs(cfg, "recipe.epochs", "recipe.batch_size", "recipe.sched", "recipe.opt", "recipe.amp", "device")
    knobs.integer("recipe.epochs")
    knobs.integer("recipe.batch_size")
    knobs.choice("recipe.sched", SCHEDULES)
    knobs.choice("recipe.opt", timm.optim.list_optimizers())
    amp = knobs.choice("recipe.amp", AMP_MODES)
    device = knobs.choice("device", DEVICES)

    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but no CUDA device is visible; allowed here: auto, cpu")
    on_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if amp == "fp16" and not on_cuda:
        raise ConfigError("recipe.amp=fp16 needs a CUDA device; allowed on CPU: none, bf16")
    if _get(cfg, "recipe.sync_bn") and not on_cuda and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("recipe.sync_bn=true needs CUDA (PyTorch's SyncBatchNorm runs on GPU modules only); "
                          "allowed on CPU: false")
    if OmegaConf.select(cfg, "conv_algorithm") is not None:
        from dynconv.functional.selector import POLICIES

        _knobs(cfg, "conv_algorithm").choice("conv_algorithm", POLICIES)
    resume = _get(cfg, "resume")
    if resume not in ("auto", "never") and not Path(str(resume)).is_file():
        raise ConfigError(f"resume={resume!r}: no such checkpoint file; allowed values: auto, never, a checkpoint path")


def validate_train_config(cfg: DictConfig) -> None:
    validate_model_config(cfg)
    validate_recipe_config(cfg)
    validate_data_config(cfg)


# Keys whose change makes a checkpoint unusable for resuming (the parameters would not line up).
MODEL_KEYS = ("backbone", "op", "attn", "task")


def checkpoint_mismatch(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """The model-defining keys that differ between a checkpoint's config and the current one."""
    differences = []

    def walk(prefix: str, a: Any, b: Any) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for key in sorted(set(a) | set(b)):
                walk(f"{prefix}.{key}", a.get(key), b.get(key))
        elif a != b:
            differences.append(f"{prefix}: {a!r} -> {b!r}")

    for key in MODEL_KEYS:
        walk(key, saved.get(key), current.get(key))
    return differences
