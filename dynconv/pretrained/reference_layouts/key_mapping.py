"""One checkpoint's keys -> a dynconv model's keys, all or nothing.

A release's layout (`kernelwarehouse.py`, `odconv.py`) says where each of its keys goes (`translate`) and which of
the model's keys the release does not store (`constant`: the temperature the release evaluates at, which it keeps
as a plain attribute). `map_state` then insists on a bijection: every checkpoint key lands on a key of the model
with the same values (the same shape, or the same shape up to size-1 dimensions: a 1x1 convolution's weight for a
Linear's), and every key of the model is filled. Anything else is a `LayoutMismatch` that names the keys, so a
converted checkpoint never computes a function other than the release's without saying so.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch


class LayoutMismatch(ValueError):
    """The checkpoint's layout does not fit the model dynconv builds; the message names what differs."""


@dataclass(frozen=True)
class Target:
    """Where a checkpoint key goes: the model's key, and whether a reshape of equal size is part of the layout
    (e.g. KernelWarehouse's flat attention bias of m (n + 1) values, (m, n + 1) in dynconv)."""

    key: str
    reshape: bool = False


@dataclass
class MappedState:
    state: dict[str, torch.Tensor]  # the model's complete state dict
    mapped: int  # keys taken from the checkpoint
    constants: dict[str, float] = field(default_factory=dict)  # keys the release does not store, and their value


SHOWN = 6  # problems named per kind in a message


def _squeezed(shape: torch.Size) -> tuple[int, ...]:
    return tuple(size for size in shape if size != 1)


def map_state(model_state: Mapping[str, torch.Tensor], checkpoint: Mapping[str, torch.Tensor],
              translate: Callable[[str], Target | None], constant: Callable[[str], float | None],
              where: str) -> MappedState:
    """The model's state dict filled from `checkpoint` (see the module doc); LayoutMismatch naming every kind of
    difference (left-over keys, missing keys, shapes) otherwise. Values take the model's dtype."""
    state: dict[str, torch.Tensor] = {}
    sources: dict[str, str] = {}
    left_over, shapes = [], []
    for key, value in checkpoint.items():
        target = translate(key)
        if target is None or target.key not in model_state:
            left_over.append(key if target is None else f"{key} (dynconv's model has no {target.key})")
            continue
        if target.key in sources:
            left_over.append(f"{key} (goes to {target.key}, as {sources[target.key]} does)")
            continue
        own = model_state[target.key]
        fits = value.shape == own.shape or (value.numel() == own.numel()
                                            and (target.reshape or _squeezed(value.shape) == _squeezed(own.shape)))
        if not fits:
            shapes.append(f"{key} {tuple(value.shape)} -> {target.key} {tuple(own.shape)}")
            continue
        sources[target.key] = key
        state[target.key] = value.reshape(own.shape).to(dtype=own.dtype)
    constants = {}
    missing = []
    for key, own in model_state.items():
        if key in state:
            continue
        value = constant(key)
        if value is None:
            missing.append(key)
            continue
        constants[key] = value
        state[key] = torch.full_like(own, value)
    problems = []
    for label, items in (("left over in the checkpoint (no place in the model)", left_over),
                         ("missing from the checkpoint", missing), ("of another shape", shapes)):
        if items:
            shown = "; ".join(items[:SHOWN]) + ("; ..." if len(items) > SHOWN else "")
            problems.append(f"{len(items)} keys {label}: {shown}")
    if problems:
        raise LayoutMismatch(f"{where}: {' | '.join(problems)}")
    return MappedState({key: state[key] for key in model_state}, len(sources), constants)
