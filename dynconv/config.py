"""Config checks that run before anything is written, and the resolvers the YAML files use.

Every error names the key, the value and what is allowed, so a typo in a sweep fails in a second,
not after a job has queued for a day. The rule of each key is in dynconv/config_checks.py; what depends on
several keys (the model at the image size, a batch against the dataset, CUDA) is checked here. Added keys
that nothing reads are refused by dynconv/overrides.py.
"""

from __future__ import annotations

import os
import re
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from dynconv.config_checks import (  # noqa: F401 - AMP_MODES, SCHEDULES: re-exported
    AMP_MODES,
    BACKBONE_SECTION,
    DATA,
    DATA_SECTION,
    DEVICES,
    OP_SECTION,
    RECIPE,
    RUN_SECTIONS,
    SCHEDULES,
    Section,
    check_section,
)
from dynconv.knobs import Knobs
from dynconv.registry import Registry, UnknownNameError

# A forward pass at this side works for every backbone (DeiT's 16-pixel patches, ConvNeXt's and VGG's 32x
# downsampling): when the configured data.image_size fails and this one does not, the size is at fault.
REFERENCE_SIDE = 224


class ConfigError(ValueError):
    """A config that cannot run; the message names the key and the allowed values."""


def register_resolvers() -> None:
    from dynconv.engine.run_naming import register_run_folder_resolver

    register_run_folder_resolver()


def _get(cfg: DictConfig, key: str) -> Any:
    try:
        return OmegaConf.select(cfg, key, throw_on_missing=True)
    except MissingMandatoryValue:
        raise ConfigError(f"{key} is required but not set: pass {key}=...") from None


def _check_name(cfg: DictConfig, key: str, registry: Registry) -> None:
    value = _get(cfg, key)
    try:
        if not isinstance(value, str):  # a number is no name, and a list would not even be looked up
            raise UnknownNameError(f"{key}={value!r} is not a known {registry.kind}; valid values: "
                                   f"{', '.join(registry.names())} (select one with {key.split('.')[0]}=NAME)")
        registry.get(value)
    except UnknownNameError as error:
        raise ConfigError(str(error)) from None


def _plain(cfg: DictConfig, *sections: str) -> dict[str, Any]:
    """The config (or only `sections` of it) as resolved plain containers, what the value rules read. An
    interpolation that cannot be resolved (`recipe.lr=${oops}`, an unset `${oc.env:...}`) is a ConfigError
    naming its key, not an OmegaConf traceback; a mandatory value left unset stays "???" (the rules say so)."""
    try:
        if not sections:
            return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
        plain: dict[str, Any] = {}
        for section in sections:  # top-level sections
            node = cfg.get(section) if section in cfg else None
            plain[section] = OmegaConf.to_container(node, resolve=True, throw_on_missing=False) \
                if isinstance(node, DictConfig) else node
        return plain
    except OmegaConfBaseException as error:
        key = getattr(error, "full_key", None) or ""
        raw = OmegaConf.to_container(cfg, resolve=False)
        for part in filter(None, key.split(".")):
            raw = raw.get(part) if isinstance(raw, dict) else None
        reason = str(getattr(error, "msg", None) or error).splitlines()[0]
        raise ConfigError(f"{key or 'the config'}={raw!r} cannot be resolved ({reason}); allowed values: a value, "
                          "or an interpolation of an existing key or a set environment variable") from None


def _check_sections(cfg: DictConfig, *sections) -> None:
    """Apply the value rules of dynconv/config_checks.py to `sections` of `cfg`."""
    tops = {section.path.split(".")[0] for section in sections}
    plain = _plain(cfg) if "" in tops else _plain(cfg, *tops)
    for section in sections:
        try:
            check_section(plain, section, ConfigError)
        except ConfigError as error:
            raise ConfigError(_with_interpolation_source(cfg, str(error))) from None


def _with_interpolation_source(cfg: DictConfig, message: str) -> str:
    """A bad value a key takes from another one (`backbone.zero_init_last: ${oc.select:recipe.zero_init_last,true}`,
    `backbone.output_stride` from `task.output_stride`) is named where the user set it too."""
    found = re.match(r"([A-Za-z_][\w.]*)=", message)
    if not found:
        return message
    parent, _, key = found.group(1).rpartition(".")
    node = OmegaConf.select(cfg, parent, throw_on_missing=False) if parent else cfg
    if not isinstance(node, DictConfig) or key not in node or not OmegaConf.is_interpolation(node, key):
        return message
    source = re.search(r"\$\{(?:oc\.select:)?([A-Za-z_][\w.]*)", str(node._get_node(key)._value()))
    if not source:
        return message
    return f"{message} (the value of {source.group(1)}, which {found.group(1)} follows: set {source.group(1)})"


def _meta_build(cfg: DictConfig):
    """Check the model's names and knobs by building it on the meta device; returns what build_backbone built."""
    from dynconv.attention import ATTENTIONS
    from dynconv.backbones import BACKBONES
    from dynconv.build import make_operator
    from dynconv.ops import OPERATORS, OperatorConfigError
    from dynconv.tasks import TASKS

    _check_name(cfg, "backbone.name", BACKBONES)
    _check_name(cfg, "op.name", OPERATORS)
    _check_name(cfg, "attn.name", ATTENTIONS)
    _check_name(cfg, "task.name", TASKS)
    _check_sections(cfg, BACKBONE_SECTION, OP_SECTION)
    data = OmegaConf.select(cfg, "data", throw_on_missing=False)
    if data is not None and "image_size" in data:
        # The model is built at this size (a positional embedding's length), so it is checked first (null too).
        _check_sections(cfg, Section(DATA_SECTION.path, {"image_size": DATA["image_size"]}, required=()))
    op_cfg = _plain(cfg, "op")["op"]
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
    _check_clip_backbone(cfg, built.backbone, TASKS.get(cfg.task.name))
    try:
        TASKS.get(cfg.task.name).validate_config(cfg.task, built.backbone)
    except ValueError as error:
        message = str(error)
        if "task." not in message and "task=" not in message:  # about the pair (a backbone without C3-C5)
            message = f"task={cfg.task.name} does not fit backbone={cfg.backbone.name}: {message}"
        raise ConfigError(message) from None
    return built


def _check_clip_backbone(cfg: DictConfig, backbone, task_class) -> None:
    """A video backbone (R3D, TSM: clips in, docs/video.md) fits task=video only: under an image task it would
    fail at its first step (a clip shape), or have no feature maps for a detector."""
    from dynconv.tasks import TASKS

    if getattr(backbone, "takes_clips", False) and task_class.data_kind != "video":
        video_tasks = " or ".join(f"task={name}" for name, task in TASKS.items() if task.data_kind == "video")
        data_name = OmegaConf.select(cfg, "data.name")
        if OmegaConf.select(cfg, "data.num_frames") is not None:
            # A video dataset (data=toy_video picks a video backbone itself) under an image task: the task is missing.
            raise ConfigError(f"data={data_name} is a video dataset (clips, with backbone={cfg.backbone.name}) and "
                              f"needs {video_tasks}, not task={cfg.task.name}: python train.py {video_tasks.split(' or ')[0]} "
                              f"data={data_name}")
        raise ConfigError(f"backbone={cfg.backbone.name} takes video clips (batch, channels, frames, height, width) "
                          f"and fits {video_tasks} only, not task={cfg.task.name}; allowed backbones for "
                          f"task={cfg.task.name}: the image backbones (e.g. resnet18, resnet50)")


def validate_model_config(cfg: DictConfig) -> None:
    """backbone / op / attn / task names, the backbone's keys and the operator's knobs."""
    _meta_build(cfg)


def _meta_forward(model, side: int) -> str | None:
    """Why a forward pass of `model` (on the meta device) fails at side x side, or None when it runs. One image
    in eval mode: the feature-map sizes are those of training, at half the cost of train-mode BatchNorm on meta
    tensors; the cost-model policy, since nothing can be timed on the meta device."""
    import torch

    from dynconv.functional import selector

    model.eval()
    try:
        with torch.no_grad(), selector.policy("model"):
            # An image, or a clip of the backbone's usual length for a video backbone.
            example = getattr(model, "example_input", None)
            model(example(1, side, device="meta") if example else torch.empty(1, 3, side, side, device="meta"))
    except Exception as error:
        return (str(error).strip().splitlines() or [type(error).__name__])[0]
    return None


def _check_input_size(cfg: DictConfig, built) -> None:
    """data.image_size fits the backbone: ConvNeXt and the CIFAR VGG need 32 pixels, DeiT a multiple of its
    16-pixel patches; a size a backbone cannot take would otherwise fail in the first training step, deep
    inside torch or timm. Found by a forward pass on the meta device (a classifier's input is the image)."""
    side = int(cfg.data.image_size)
    reason = _meta_forward(built.backbone, side)
    if reason is None or side == REFERENCE_SIDE or _meta_forward(built.backbone, REFERENCE_SIDE) is not None:
        return  # it runs, or it does not run at any size: then the size is not what is wrong
    raise ConfigError(f"data.image_size={side} does not fit backbone={cfg.backbone.name}: a forward pass at "
                      f"{side}x{side} fails ({reason}); allowed values: a size this backbone takes "
                      f"(e.g. {REFERENCE_SIDE}; every backbone takes the multiples of 32)")


def validate_data_config(cfg: DictConfig, *, evaluation: bool = False) -> None:
    """data.name names a registered dataset that fits the task, every data key has an allowed value, and the
    dataset's files are where the config says (an embedded dataset: that its folder holds nothing else).
    `evaluation`: only the split an evaluation reads has to be there (the dataset's `check_eval`)."""
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
    _check_sections(cfg, DATA_SECTION)  # before the layout check: a bad value is found without a disk access
    if not spec.embedded:
        _get(cfg, "data.root")  # a mandatory value left unset (???) says so first
    check = spec.check_eval if evaluation and spec.check_eval is not None else spec.check
    check(cfg.data)


def validate_recipe_config(cfg: DictConfig) -> None:
    """The run settings (seed, device, resume, dist, log, checkpoint, ...) and the recipe, key by key, then the
    settings that depend on the machine (CUDA) and the warm restarts, which depend on the schedule."""
    import torch

    _check_sections(cfg, *RUN_SECTIONS)
    device, amp = cfg.device, cfg.recipe.amp
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but no CUDA device is visible; allowed here: auto, cpu")
    on_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if amp == "fp16" and not on_cuda:
        raise ConfigError("recipe.amp=fp16 needs a CUDA device; allowed on CPU: none, bf16")
    if cfg.recipe.sync_bn and not on_cuda and distributed:
        raise ConfigError("recipe.sync_bn=true needs CUDA (PyTorch's SyncBatchNorm runs on GPU modules only); "
                          "allowed on CPU: false")
    if cfg.dist.backend == "nccl" and not on_cuda and distributed:
        raise ConfigError("dist.backend=nccl needs CUDA devices; allowed on CPU: auto, gloo")
    _check_cycles(cfg.recipe)


# The values of the warm-restart keys that mean "one cosine over all epochs" (what every recipe but SGDR's has).
NO_CYCLES = {"cycle_epochs": None, "cycle_mul": 1.0, "cycle_limit": 1}


def _check_cycles(recipe: DictConfig) -> None:
    """Warm restarts (recipe.cycle_*) are the cosine schedule's (timm's cycles): refused with another schedule,
    which would ignore them silently. Several cycles need the first one's length, else the first cycle spans
    every epoch and no restart ever comes."""
    set_keys = [f"recipe.{key}={recipe.get(key)!r}" for key, default in NO_CYCLES.items()
                if key in recipe and recipe.get(key) != default]
    if set_keys and recipe.sched != "cosine":
        raise ConfigError(f"{', '.join(set_keys)}: warm restarts need recipe.sched=cosine, not "
                          f"recipe.sched={recipe.sched}; allowed values with sched={recipe.sched}: "
                          "recipe.cycle_epochs=null, recipe.cycle_mul=1.0, recipe.cycle_limit=1")
    if recipe.get("cycle_limit", 1) > 1 and recipe.get("cycle_epochs") is None:
        raise ConfigError(f"recipe.cycle_limit={recipe.cycle_limit} needs recipe.cycle_epochs (the first cycle's "
                          "length): with recipe.cycle_epochs=null the first cycle spans every epoch and no restart "
                          "comes; allowed values: recipe.cycle_epochs=<epochs> (e.g. 5), or recipe.cycle_limit=1")


def _check_training_transforms(cfg: DictConfig) -> None:
    """The ImageNet-style transforms are built from data.* and recipe.aug.* together: build them once, so a
    combination the single-key rules let through fails here, not in a loader worker (CIFAR builds its own)."""
    if _get(cfg, "task.name") != "classification" or cfg.data.name == "cifar100":
        return
    from dynconv.tasks.classification.transforms import build_transforms

    plain = _plain(cfg, "data", "recipe")
    aug = plain["recipe"].get("aug") or {}
    for training in (True, False):
        try:
            build_transforms(plain["data"], aug, training)
        except Exception as error:
            keys = "recipe.aug.* and data.*" if training else "data.*"
            raise ConfigError(f"the {'training' if training else 'evaluation'} transform cannot be built from "
                              f"{keys} ({type(error).__name__}: {error}); allowed values: see the rules of "
                              "those keys in dynconv/config_checks.py") from None


def _check_batches(cfg: DictConfig) -> None:
    """A training set smaller than one batch per process, with drop_last, gives epochs without a step (the
    loaders refuse it only after the run folder exists). Checked where the size is known without reading the
    dataset: a fixed subset (data.max_train_samples) or an embedded dataset."""
    from dynconv.tasks.classification.digits import DIGITS_TRAIN_COUNT
    from dynconv.tasks.video.toy_video import TOY_TRAIN_CLIPS

    if _get(cfg, "task.name") not in ("classification", "video") or not cfg.recipe.drop_last:
        return
    known = {"digits": DIGITS_TRAIN_COUNT, "toy_video": TOY_TRAIN_CLIPS}.get(cfg.data.name)
    subset = cfg.data.get("max_train_samples")
    sizes = [size for size in (known, subset) if size is not None]
    if not sizes:
        return
    world_size = max(1, int(os.environ.get("WORLD_SIZE", "1")))
    per_process = -(-min(sizes) // world_size)
    batch_size = cfg.recipe.batch_size
    if batch_size > per_process:
        samples = "clips" if _get(cfg, "task.name") == "video" else "images"
        limited = subset is not None and (known is None or subset < known)
        source = f"data.max_train_samples={subset}" if limited else f"data={cfg.data.name} has {known} training {samples}"
        raise ConfigError(
            f"recipe.batch_size={batch_size} is larger than the {per_process} training {samples} per process "
            f"({source}, {world_size} process(es)) with recipe.drop_last=true: no training step would run; "
            f"allowed values: recipe.batch_size <= {per_process}, a larger data.max_train_samples, or "
            "recipe.drop_last=false")


def validate_train_config(cfg: DictConfig) -> None:
    """Every key of a composed train config, before anything is written: the model (built and run on the meta
    device), the run settings and recipe, the data, and what depends on several of them."""
    _plain(cfg)  # an interpolation that cannot be resolved is named first, wherever it is
    built = _meta_build(cfg)
    validate_recipe_config(cfg)
    validate_data_config(cfg)
    if _get(cfg, "task.name") in ("classification", "video"):  # the backbone's input is the image (a clip's frames)
        _check_input_size(cfg, built)
    _check_training_transforms(cfg)
    _check_batches(cfg)


def validate_eval_config(cfg: DictConfig) -> None:
    """eval.py's own keys (configs/eval.yaml), before the checkpoint is read: the overrides of the stored data
    and recipe settings are checked here, since they replace values that were checked when the run trained."""
    plain = _plain(cfg)
    knobs = Knobs(plain, error=ConfigError)
    if plain.get("checkpoint") in (None, "???", ""):
        raise ConfigError("checkpoint is required but not set: pass checkpoint=PATH (a last.pt or best.pt)")
    if not isinstance(plain["checkpoint"], str):
        raise knobs.fail("checkpoint", plain["checkpoint"], "a path to a checkpoint file")
    knobs.choice("weights", ("model", "ema"))
    knobs.choice("device", DEVICES)
    overrides = (Section("data", {key: DATA[key] for key in ("num_workers", "max_val_samples")}, required=()),
                 Section("recipe", {"eval_batch_size": RECIPE["eval_batch_size"]}, required=()))
    for section in overrides:
        node = plain.get(section.path) or {}
        set_only = {key: value for key, value in node.items() if value is not None}  # null: as recorded
        check_section({section.path: set_only}, section, ConfigError)
    root = (plain.get("data") or {}).get("root")
    if root is not None and (not isinstance(root, str) or not root.strip()):
        raise Knobs(plain["data"], "data", error=ConfigError).fail("root", root, "null (as recorded) or a directory")


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
