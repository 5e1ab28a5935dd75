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

from dynconv.registry import Registry, UnknownNameError

DATASETS = ("digits", "imagefolder", "imagenet", "cifar100", "coco", "toy_coco")
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


def _check_choice(cfg: DictConfig, key: str, allowed) -> Any:
    value = _get(cfg, key)
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is invalid; allowed values: {', '.join(map(str, allowed))}")
    return value


def _check_positive_int(cfg: DictConfig, key: str) -> int:
    value = _get(cfg, key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{key}={value!r} is invalid; allowed values: integers >= 1")
    return value


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
    from dynconv.data import validate_imagefolder_root
    from dynconv.data.cifar import CIFAR100_LAYOUT, locate_cifar100

    from dynconv.tasks import TASKS

    name = _check_choice(cfg, "data.name", DATASETS)
    task_name = _get(cfg, "task.name")
    fitting = TASKS.get(task_name).data_names if task_name in TASKS.names() else DATASETS
    if name not in fitting:
        raise ConfigError(f"data={name} does not fit task={task_name}; allowed data for this task: {', '.join(fitting)}")
    if name in ("digits", "toy_coco"):
        return  # embedded datasets, written on first use
    if name == "coco":
        from dynconv.data.coco import validate_coco_root

        root = _get(cfg, "data.root")
        if root in (None, ""):
            raise ConfigError("data.root is not set: pass data.root=DIR or set COCO_DIR "
                              "(DIR/annotations/instances_{train,val}2017.json, DIR/train2017/, DIR/val2017/)")
        try:
            validate_coco_root(root)
        except (FileNotFoundError, NotADirectoryError, ValueError) as error:
            raise ConfigError(f"data.root={root!r}: {error}") from None
        return
    root = _get(cfg, "data.root")
    if root in (None, "") and name == "cifar100":
        raise ConfigError(f"data.root is not set: pass data.root=DIR or set CIFAR100_DIR ({CIFAR100_LAYOUT})")
    if root in (None, ""):
        hint = " or set IMAGENET_DIR" if name == "imagenet" else ""
        raise ConfigError(f"data.root is not set: pass data.root=DIR{hint} (DIR/train/<class>/*, DIR/val/<class>/*)")
    try:
        if name == "cifar100":
            locate_cifar100(root)
        else:
            validate_imagefolder_root(root)
    except (FileNotFoundError, NotADirectoryError, ValueError) as error:
        raise ConfigError(f"data.root={root!r}: {error}") from None


def validate_recipe_config(cfg: DictConfig) -> None:
    import timm.optim

    _check_positive_int(cfg, "recipe.epochs")
    _check_positive_int(cfg, "recipe.batch_size")
    _check_choice(cfg, "recipe.sched", SCHEDULES)
    _check_choice(cfg, "recipe.opt", timm.optim.list_optimizers())
    amp = _check_choice(cfg, "recipe.amp", AMP_MODES)
    device = _check_choice(cfg, "device", DEVICES)
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but no CUDA device is visible; allowed here: auto, cpu")
    on_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if amp == "fp16" and not on_cuda:
        raise ConfigError("recipe.amp=fp16 needs a CUDA device; allowed on CPU: none, bf16")
    if _get(cfg, "recipe.sync_bn") and not on_cuda and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("recipe.sync_bn=true needs CUDA (PyTorch's SyncBatchNorm runs on GPU modules only); "
                          "allowed on CPU: false")
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
