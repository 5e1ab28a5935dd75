"""Checks every operator's tests share: its YAML config as the operator reads it, a rejected knob, BN statistics."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn as nn
from omegaconf import OmegaConf

from dynconv.build import make_operator
from dynconv.ops import OperatorConfigError

OP_CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "op"


def load_op_config(name: str) -> dict:
    """configs/op/<name>.yaml as a plain dict (what build_backbone receives as `op`), its interpolations resolved
    as in a composed config with the default recipe (kw.yaml's tau_epochs follows recipe.kw_tau_epochs)."""
    root = OmegaConf.create({"recipe": OmegaConf.load(OP_CONFIG_DIR.parent / "recipe" / "digits.yaml"),
                             "op": OmegaConf.load(OP_CONFIG_DIR / f"{name}.yaml")})
    return OmegaConf.to_container(root, resolve=True)["op"]


def assert_knob_rejected(op_cfg: dict, key: str, value, allowed: str) -> None:
    """Setting op.<key>=value fails at make_operator with a message naming the key, the value and `allowed`."""
    with pytest.raises(OperatorConfigError) as info:
        make_operator({**op_cfg, key: value})
    message = str(info.value)
    assert f"op.{key}" in message and repr(value) in message and allowed in message


def calibrate_batch_norm(model: nn.Module, x: torch.Tensor) -> None:
    """Running statistics of one train-mode batch, so that eval-mode activations stay on a sane scale
    (standardised weights give fresh BNs, which normalise nothing in eval mode, outputs of 1e10 and more)."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.momentum = 1.0
    model.train()
    with torch.no_grad():
        model(x)
    model.eval()
