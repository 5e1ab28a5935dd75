"""The Python API: dynconv from a notebook or another codebase, without train.py (docs/api.md).

    import dynconv
    model = dynconv.create_model("resnet18", op="kw", b=1, num_classes=1000)
    dynconv.count_macs(model, (3, 224, 224))           # the papers' count: dynamic layers included
    dynconv.profile(model)                             # params and MACs, as trained and folded for inference
    model = dynconv.load("outputs/<run>/checkpoints/best.pt")   # ready for inference; model.class_names

Names are the configs' (`backbone=`, `op=`, `attn=`), knobs are keyword arguments, and defaults come from the same
YAML files as the configs (`configs/op/<name>.yaml`, ...): one source, validated by the same code, so a wrong
knob fails here exactly as on the command line, naming the key and the allowed values.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from omegaconf import DictConfig, OmegaConf

from dynconv.config import ConfigError


def options(group: str) -> list[str]:
    """The names a config group offers (`options("op")`: static, condconv, ...)."""
    from dynconv.compose import CONFIG_DIR

    folder = CONFIG_DIR / group
    if not folder.is_dir():
        raise ConfigError(f"no config group {group!r}; groups: backbone, op, attn, task, data, recipe")
    return sorted(path.stem for path in folder.glob("*.yaml"))


def _check_name(group: str, name: str) -> None:
    allowed = options(group)
    if name not in allowed:
        raise ConfigError(f"{group}={name!r} is not known; allowed values: {', '.join(allowed)}")


def model_config(backbone: str, op: str = "static", attn: str = "none", **knobs: Any) -> DictConfig:
    """The composed train config of `backbone` x `op` x `attn` with `knobs` applied, validated as train.py does.

    A knob goes to the operator when its config has that key (`experts`, `b`, `lam`), else to the backbone
    (`drop_path_rate`, `output_stride`), else to the attention (`reduction` of attn=se when the op has none)."""
    from dynconv.config import register_resolvers, validate_model_config
    from dynconv.reproduction.counting import composer

    for group, name in (("backbone", backbone), ("op", op), ("attn", attn)):
        _check_name(group, name)
    register_resolvers()
    with composer() as compose:
        cfg = compose([f"backbone={backbone}", f"op={op}", f"attn={attn}"])
    for key, value in knobs.items():
        section = next((section for section in ("op", "backbone", "attn") if key in cfg[section] and key != "name"),
                       None)
        if section is None:
            raise ConfigError(
                f"{key}={value!r} is not a knob of op={op} ({', '.join(k for k in cfg.op if k != 'name')}), "
                f"backbone={backbone} ({', '.join(k for k in cfg.backbone if k != 'name')}) or attn={attn} "
                f"({', '.join(k for k in cfg.attn if k != 'name') or 'no knobs'})")
        OmegaConf.update(cfg, f"{section}.{key}", value, merge=False)
    validate_model_config(cfg)
    return cfg


def create_model(name: str, op: str = "static", *, num_classes: int = 1000, image_size: int | None = None,
                 attn: str = "none", **knobs: Any) -> nn.Module:
    """A classification network `name` whose layers `op` converts, as `python train.py backbone=<name> op=<op>`
    builds it: a plain `nn.Module` mapping (B, 3, H, W) images to (B, num_classes) logits.

    `image_size`: the input side the model is built for (null: the backbone's default resolution; it matters for
    the few layers sized by it, e.g. DeiT's position embedding). The build settings are kept in
    `model.dynconv_config` (backbone, op, attn) for `dynconv.load` and export."""
    from dynconv.build import build_backbone

    cfg = model_config(name, op, attn, **knobs)
    side = int(image_size or cfg.backbone.get("default_resolution", 224))
    op_cfg = OmegaConf.to_container(cfg.op, resolve=True)
    built = build_backbone(cfg.backbone, op_cfg, cfg.attn, num_classes=int(num_classes), image_size=side)
    model = built.backbone
    model.dynconv_config = {"backbone": OmegaConf.to_container(cfg.backbone, resolve=True), "op": op_cfg,
                            "attn": OmegaConf.to_container(cfg.attn, resolve=True), "num_classes": int(num_classes),
                            "image_size": side}
    return model


def _input_size(model: nn.Module, input_size) -> tuple[int, ...]:
    if input_size is not None:
        return tuple(int(v) for v in input_size)
    side = int(getattr(model, "default_resolution", 224))
    return (3, side, side)


def count_macs(model: nn.Module, input_size: tuple[int, ...] | None = None) -> int:
    """Multiply-accumulates of one image of `input_size` (C, H, W; default the model's resolution), counted as the
    papers count: every convolution and matmul, the dynamic layers' attention and kernel-generation branches
    included, in the papers' formulation (mix the kernel, convolve once). Functional convolutions are counted (thop
    and ptflops count them as zero); norms, activations and pooling are not, as in the papers."""
    from dynconv.profiling import count_macs as count

    return count(model, _input_size(model, input_size)).total


def profile(model: nn.Module, input_size: tuple[int, ...] | None = None) -> dict[str, Any]:
    """{"params", "params_inference", "macs", "macs_inference", "input_size", "macs_by_module"}: what
    `scripts/profile.py` prints, for any model. `*_inference`: after folding training-only reparameterisations
    (Weight Excitation, WS / WN / SN) into plain convolutions."""
    from dynconv.profiling import count_macs as count
    from dynconv.profiling import count_params, fold_for_inference

    size = _input_size(model, input_size)
    macs = count(model, size)
    folded = fold_for_inference(model)
    return {"params": count_params(model), "params_inference": count_params(folded), "macs": macs.total,
            "macs_inference": count(folded, size).total, "input_size": list(size), "macs_by_module": macs.by_module}


def load(checkpoint: str | Path, *, weights: str = "model", device: str | torch.device = "cpu") -> nn.Module:
    """The model of a dynconv classification checkpoint (`best.pt` or `last.pt`, or a run folder: its best.pt),
    rebuilt from the config stored in it, its weights loaded, in eval mode on `device`; `model.class_names` holds the
    class names the run trained on (None when the checkpoint predates them). No dataset is read.

    `weights="ema"` takes the EMA weights of a run that kept them."""
    from dynconv.build import build_backbone
    from dynconv.engine.checkpoint import checkpoint_in_run, ema_weights, load_checkpoint

    path = Path(checkpoint)
    if path.is_dir():
        found = checkpoint_in_run(path)
        if found is None:
            raise FileNotFoundError(f"{path}: a folder without checkpoints/best.pt or checkpoints/last.pt")
        path = found
    payload = load_checkpoint(path)
    config = payload.get("config") or {}
    task = (config.get("task") or {}).get("name", "classification")
    if task != "classification":
        raise ConfigError(f"{path} is a task={task} checkpoint; dynconv.load returns classification models "
                          "(evaluate it with: python eval.py checkpoint=...)")
    if weights not in ("model", "ema"):
        raise ConfigError(f"weights={weights!r} is invalid; allowed values: model, ema")
    state = payload["model"] if weights == "model" else ema_weights(payload)
    if state is None:
        raise ConfigError(f"weights=ema but {path} holds no EMA weights (recipe.ema.enabled was false)")
    class_names = payload.get("class_names")
    num_classes = (len(class_names) if class_names else None) or (config.get("data") or {}).get("num_classes") \
        or _classifier_size(state)
    if not num_classes:
        raise ConfigError(f"{path}: cannot tell the number of classes (no class names, no classifier weight)")
    cfg = OmegaConf.create(config)
    side = int(OmegaConf.select(cfg, "data.image_size", default=None) or cfg.backbone.get("default_resolution", 224))
    built = build_backbone(cfg.backbone, OmegaConf.to_container(cfg.op, resolve=True), cfg.attn,
                           num_classes=int(num_classes), image_size=side)
    model = built.backbone
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        raise ConfigError(f"{path}: its weights do not fit the model its config builds: "
                          f"{str(error).splitlines()[0]}") from None
    model.class_names = list(class_names) if class_names else None
    model.dynconv_config = {"backbone": OmegaConf.to_container(cfg.backbone, resolve=True),
                            "op": OmegaConf.to_container(cfg.op, resolve=True),
                            "attn": OmegaConf.to_container(cfg.attn, resolve=True), "num_classes": int(num_classes),
                            "image_size": side}
    return model.to(device).eval()


def _classifier_size(state: dict[str, torch.Tensor]) -> int | None:
    """Rows of the last 2-D weight in the state dict: the classifier of every dynconv classification backbone."""
    matrices = [value for key, value in state.items() if key.endswith("weight") and value.dim() == 2]
    return int(matrices[-1].shape[0]) if matrices else None


def init_from_static(model: nn.Module, static, *, spread: float = 0.1):
    """Start `model`'s dynamic layers from a static network's weights: a state dict, a file (a timm / torchvision
    state dict, a dynconv `op=static` checkpoint) or "timm:<name>" (timm's pretrained weights). Each operator's rule
    (docs/pretrained.md): exact at initialisation for DY-Conv, ODConv, CondConv, WeightNet, KernelWarehouse b >= 1
    and unstandardised LWE / MWE; the returned report says which layers are exact and why not elsewhere."""
    from dynconv.pretrained import init_from_static as initialise

    return initialise(model, static, spread=spread)


def convert(model: nn.Module, op: str = "static", *, image_size: int | None = None, verbose: bool = False,
            **knobs: Any) -> nn.Module:
    """Convert, in place, a network dynconv did not build (any timm model, torchvision's classification models)
    to operator `op` with `knobs` (validated as `op.<knob>=` on the command line); returns the same model, its
    decisions in `model.dynconv_conversion` (docs/convert.md). Placement comes from what the library knows: timm's
    `feature_info` stages, module types for roles, the stem and the classifier; a layer it cannot place stays
    static with the reason shown."""
    from dynconv.conversion.any_model import convert_model

    return convert_model(model, op, image_size=image_size, verbose=verbose, **knobs)


def set_training_progress(model: nn.Module, epoch: float) -> dict[str, float]:
    """Drive the operators' schedules (DY-Conv / ODConv temperature, KernelWarehouse's tau) at `epoch` (fractional:
    epoch + step / steps) in a training loop of your own, as train.py does; returns the values set."""
    from dynconv.conversion.progress import set_training_progress as set_progress

    return set_progress(model, epoch)


def export(model: nn.Module, path: str | Path, format: str = "onnx", *, example_input: torch.Tensor | None = None,
           **options: Any) -> dict[str, Any]:
    """Write `model` as ONNX or a `torch.export` program with a dynamic batch dimension, or as the folded plain
    network of the reparameterisations (`format="folded"`), and check the file against the eager model at batch 1,
    3 and 8; returns the report ({"max_abs_diff", "batch_sizes", ...}). docs/export.md. `options`: `batch_sizes`,
    `tolerance`, `opset`, `optimize` of `dynconv.exporting.run.export`."""
    from dynconv.exporting import export as write

    return write(model, path, format, example_input=example_input, **options)
