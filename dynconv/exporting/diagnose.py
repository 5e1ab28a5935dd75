"""Which layer stops an export: after the whole model fails, each submodule is exported alone with the inputs
it received in an eager forward, top down: the first child (in forward order) that fails alone is entered, and
the innermost failing module is named, with its own error.

Best effort: a module that reads state its parent prepares (a block's shared routing, `dynconv.layers.
shared_input`) cannot run alone, and a failure that needs two modules together has no single culprit; then the
model itself is named with the exporter's error.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
import torch.nn as nn

from dynconv.exporting.errors import exporter_reason
from dynconv.functional import selector

# attempt(module, args) -> None when the module exports, else the reason it does not.
Attempt = Callable[[nn.Module, tuple], "str | None"]


class Call(NamedTuple):
    order: int  # position in the forward
    name: str  # as in model.named_modules()
    args: tuple  # the tensors it was called with (detached copies)


class Culprit(NamedTuple):
    name: str
    module: nn.Module
    reason: str


def record_calls(model: nn.Module, example: torch.Tensor) -> dict[nn.Module, Call]:
    """The first call of every submodule in one eager forward of `example`, when its arguments are tensors only
    (those are the calls that can be replayed alone)."""
    names = {module: name for name, module in model.named_modules()}
    calls: dict[nn.Module, Call] = {}

    def remember(module, args, kwargs) -> None:  # returns None: a pre-hook's result would replace the arguments
        if module not in calls and args and not kwargs and all(isinstance(arg, torch.Tensor) for arg in args):
            calls[module] = Call(len(calls), names[module], tuple(arg.detach().clone() for arg in args))

    handles = [module.register_forward_pre_hook(remember, with_kwargs=True)
               for module in model.modules() if module is not model]
    try:
        with torch.no_grad(), selector.policy("model"):
            model(example)
    finally:
        for handle in handles:
            handle.remove()
    return calls


def locate_failure(model: nn.Module, example: torch.Tensor, attempt: Attempt) -> Culprit | None:
    """The innermost submodule whose export fails alone (descending into the first failing child at each level),
    or None when no submodule fails alone."""
    calls = record_calls(model, example)
    culprit, parent = None, model
    while True:
        children = sorted((calls[child], child) for child in parent.children() if child in calls)
        for call, child in children:
            reason = attempt(child, call.args)
            if reason is not None:
                culprit, parent = Culprit(call.name, child, reason), child
                break
        else:
            return culprit


def attempt_with(export_fn: Callable[..., object]) -> Attempt:
    """An `Attempt` that runs `export_fn(module, *args)` and turns its exception into a reason."""
    def attempt(module: nn.Module, args: tuple) -> str | None:
        try:
            export_fn(module, *args)
        except Exception as error:  # noqa: BLE001 - any exporter failure is what is being looked for
            return exporter_reason(error)
        return None

    return attempt
