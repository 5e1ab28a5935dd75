"""Weights that other code saved: a release's training checkpoint, a timm or torchvision state dict, safetensors.

Every file is read weights-only, as dynconv's own checkpoints are (`dynconv.engine.checkpoint`): a file that would
run code when unpickled is refused. One class is let through: `argparse.Namespace`, because OSVAI/KernelWarehouse's
`utils.save_model` stores its command-line arguments in every checkpoint (`"args": args`); a Namespace only holds
the plain values it was given, and unpickling it runs no code of the file's choosing.

How the weights are wrapped differs by who saved them, and `state_dict_of` unwraps them all:
- OSVAI/KernelWarehouse (`utils.save_model`): {"model": state, "model_ema": state (with --model_ema), "optimizer",
  "epoch", "scaler", "args"};
- OSVAI/ODConv (`main.py`, `save_checkpoint`): {"state_dict": state of the DataParallel / DDP model, keys
  "module."-prefixed, "epoch", "acc", "best_acc", "optimizer"};
- dynconv (`best.pt`, `last.pt`): {"model": state, "ema": state or None, "config", ...};
- timm / torchvision / `torch.save(model.state_dict())`: the state itself.
"""

from __future__ import annotations

import argparse
import pickle
from pathlib import Path
from typing import Any, Mapping

import torch

from dynconv.engine.checkpoint import CorruptCheckpointError, UntrustedCheckpointError

# Where each saver puts the weights; the first one present wins. "ema": the EMA weights instead.
MODEL_KEYS = ("model", "state_dict", "module", "net")
EMA_KEYS = ("model_ema", "ema", "state_dict_ema")
# Prefixes of wrapped models: DataParallel / DDP ("module."), torch.compile ("_orig_mod.").
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def read_checkpoint_file(path: str | Path) -> Any:
    """The unpickled content of `path` (a dict for every known saver), read weights-only; `.safetensors` files
    through safetensors. FileNotFoundError or CorruptCheckpointError (UntrustedCheckpointError for a file that
    wants to run code), each naming the path."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as error:  # safetensors raises its own error types for a damaged header
            raise CorruptCheckpointError(f"cannot read checkpoint {path}: {error}") from error
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "weights_only" in str(error) or "Weights only load failed" in str(error):
            raise UntrustedCheckpointError(
                f"refused to load {path}: it holds Python objects that a weights-only load does not run "
                f"({str(error).splitlines()[0]}); dynconv reads foreign checkpoints weights-only too") from None
        raise CorruptCheckpointError(f"cannot read checkpoint {path}: {error}") from error
    except Exception as error:  # torch raises several types for truncated or foreign files
        raise CorruptCheckpointError(f"cannot read checkpoint {path}: {error}") from error


def state_dict_of(payload: Any, weights: str = "model", where: str = "the checkpoint") -> dict[str, torch.Tensor]:
    """The tensors of a (possibly wrapped) checkpoint, wrapper prefixes removed (see the module doc).

    `weights`: "model" or "ema" (the EMA copy some releases keep beside the weights). A ValueError names what the
    payload holds when it has no weights of that kind."""
    if not isinstance(payload, Mapping):
        raise CorruptCheckpointError(f"{where} holds a {type(payload).__name__}, not a state dict")
    keys = EMA_KEYS if weights == "ema" else MODEL_KEYS
    state = next((payload[key] for key in keys if isinstance(payload.get(key), Mapping)), None)
    if state is None:
        if weights == "ema" or not _is_state(payload):
            raise ValueError(f"{where} holds no {weights} weights (it has the keys: "
                             f"{', '.join(map(str, list(payload)[:12]))}); looked for {', '.join(keys)}")
        state = payload
    tensors = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            continue  # timm's ModelEmaV2 and others may leave a non-tensor entry beside the weights
        for prefix in WRAPPER_PREFIXES:
            key = key.removeprefix(prefix)
        tensors[key] = value
    if not tensors:
        raise ValueError(f"{where} holds no tensors under its {weights} weights")
    return tensors


def _is_state(payload: Mapping) -> bool:
    """A bare state dict: tensors under (dotted) names."""
    values = list(payload.values())
    return bool(values) and sum(isinstance(value, torch.Tensor) for value in values) >= len(values) / 2
