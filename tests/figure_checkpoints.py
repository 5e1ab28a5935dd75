"""Checkpoints for the figure tests without training: a composed train config, its model built and saved as
train.py's best.pt would be (weights, config, class names), so `load_for_evaluation` rebuilds the same model."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from omegaconf import OmegaConf

from conftest import CONFIG_DIR

DIGIT_CLASSES = [str(digit) for digit in range(10)]


def compose_train(overrides: Sequence[str]):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from dynconv.config import register_resolvers

    register_resolvers()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
            return compose("train", overrides=list(overrides))
    finally:
        GlobalHydra.instance().clear()


def make_checkpoint(path: Path, data_dir: Path, overrides: Sequence[str] = (), seed: int = 0,
                    model_edit=None) -> Path:
    """Save an untrained model of `overrides` (on the digits at 32 px) as a dynconv checkpoint at `path`.
    `model_edit(model)` may change the weights first (a known kernel, a zeroed layer)."""
    from dynconv.build import build_backbone

    cfg = compose_train([f"data.root={data_dir / 'digits'}", "data.num_workers=0", *overrides])
    config = OmegaConf.to_container(cfg, resolve=True)
    torch.manual_seed(seed)
    built = build_backbone(cfg.backbone, OmegaConf.to_container(cfg.op, resolve=True), cfg.attn, num_classes=10,
                           image_size=cfg.data.image_size)
    model = built.backbone
    if model_edit is not None:
        model_edit(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model.state_dict(), "ema": None, "config": config, "class_names": DIGIT_CLASSES,
                "epoch": 0, "global_step": 0, "metrics": {}, "best_metrics": {}, "world_size": 1}, path)
    return path
