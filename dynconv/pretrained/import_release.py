"""A release's checkpoint -> a dynconv checkpoint (what `scripts/import_checkpoint.py` writes).

The model is the one the given train config builds (`backbone=`, `op=`, `op.*`), with the release's class count; its
state dict is the release's, key for key (`reference_layouts`), and the config stored beside it is that train config,
so `eval.py checkpoint=<out>` and `dynconv.load(<out>)` rebuild the same model, and `init_from=<out>` starts a run of
the same backbone and op from it. The release's evaluation temperature goes into the temperature buffers (the
release keeps it as a plain attribute; `reference_layouts/*.py` say which value and why).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from dynconv.config import ConfigError
from dynconv.pretrained.foreign_checkpoints import read_checkpoint_file, state_dict_of
from dynconv.pretrained.reference_layouts import RELEASES

# Backbone knobs that change what the network computes without changing a key: they must be the release's.
FUNCTION_KNOBS = {"output_stride": 32, "stride_in_1x1": False}
WEIGHTS = ("model", "ema")


def check_import_config(source: str, cfg: DictConfig) -> None:
    """ConfigError naming the key and the allowed values when the train config cannot hold the release's model."""
    if source not in RELEASES:
        raise ConfigError(f"source={source!r} is invalid; allowed values: {', '.join(RELEASES)}")
    release = RELEASES[source]
    if cfg.op.name != release.op:
        raise ConfigError(f"op={cfg.op.name} is invalid for source={source}: its checkpoints are op={release.op} "
                          f"models; allowed values: {release.op}")
    if cfg.backbone.name not in release.models:
        raise ConfigError(f"backbone={cfg.backbone.name} is invalid for source={source}: the release has no such "
                          f"model; allowed values: {', '.join(release.models)}")
    for key, value in FUNCTION_KNOBS.items():
        if cfg.backbone.get(key, value) != value:
            raise ConfigError(f"backbone.{key}={cfg.backbone.get(key)} is invalid for source={source}: the release's "
                              f"network has {key}={value}; allowed values: {str(value).lower()}")
    if cfg.attn.name != "none":
        raise ConfigError(f"attn={cfg.attn.name} is invalid for source={source}: the release's networks have no "
                          "feature attention; allowed values: none")
    if cfg.task.name != "classification":
        raise ConfigError(f"task={cfg.task.name} is invalid for source={source}: the releases' checkpoints are "
                          "ImageNet classifiers; allowed values: classification")
    release.check_config(cfg.backbone.name, OmegaConf.to_container(cfg.op, resolve=True))


def import_release(source: str, checkpoint: str | Path, cfg: DictConfig, weights: str = "model"
                   ) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the dynconv checkpoint payload, a record of what was mapped). ConfigError for a config that cannot hold the
    release's model, FileNotFoundError / CorruptCheckpointError naming the file, LayoutMismatch naming the keys or
    layers that differ."""
    from dynconv.build import build_backbone

    if weights not in WEIGHTS:
        raise ConfigError(f"weights={weights!r} is invalid; allowed values: {', '.join(WEIGHTS)}")
    check_import_config(source, cfg)
    release = RELEASES[source]
    where = str(checkpoint)
    state = state_dict_of(read_checkpoint_file(checkpoint), weights, where)
    backbone = cfg.backbone.name
    classes = release.classifier_rows(state, backbone)
    if classes is None:
        raise ConfigError(f"{where} has no classifier of the release's {backbone} (looked for fc, classifier, head): "
                          f"is it a {source} {backbone} checkpoint?")
    declared = cfg.data.get("num_classes")
    if declared is not None and declared != classes:
        raise ConfigError(f"data={cfg.data.name} has data.num_classes={declared}, but the checkpoint's classifier has "
                          f"{classes} classes; allowed values: data settings with {classes} classes (e.g. data=imagenet "
                          "for the releases' ImageNet models)")
    op_cfg = OmegaConf.to_container(cfg.op, resolve=True)
    built = build_backbone(cfg.backbone, op_cfg, cfg.attn, num_classes=classes, image_size=cfg.data.image_size)
    mapped = release.map(built.backbone, state, backbone, op_cfg, where)
    built.backbone.load_state_dict(mapped.state)  # strict: the mapping filled every key
    payload = {
        "model": built.backbone.state_dict(),
        "ema": None,
        "config": OmegaConf.to_container(cfg, resolve=True),
        "class_names": None,
        "epoch": None,
        "global_step": 0,
        "metrics": {},
        "best_metrics": {},
        "world_size": 1,
        "imported_from": {"source": source, "checkpoint": where, "weights": weights},
    }
    constants = Counter(f"{key.rsplit('.', 1)[-1]}={value:g}" for key, value in mapped.constants.items())
    record = {"source": source, "checkpoint": where, "backbone": backbone, "op": cfg.op.name,
              "keys_mapped": mapped.mapped, "keys_set": dict(constants), "num_classes": classes, "weights": weights,
              "params": sum(p.numel() for p in built.backbone.parameters())}
    return payload, record
