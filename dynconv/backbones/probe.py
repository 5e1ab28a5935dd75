"""One forward pass of a network dynconv did not build, watched with hooks: what ran, in which order, on what.

The generic placement (`generic_placement.py`) knows nothing of a network's code, only its module tree. What the
tree cannot say, one forward pass of a probe image in eval mode shows: the order the layers run in, each layer's
input and output shapes (the spatial stride of its output, whether its input was pooled to 1 x 1, whether it read
the image itself), the shape of each candidate block's input, and when each watched module (timm's feature
stages) returns. A layer the forward never calls (an auxiliary head that runs only in training, a projection whose
weight another module reads directly) shows up as never called.

The pass runs under `torch.no_grad()` in eval mode, so it changes nothing (no BatchNorm statistics move) and the
training flags are restored afterwards; on the meta device it costs nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn


@dataclass
class LayerCall:
    """What one convertible layer saw on its first call."""

    order: int  # position among every watched event of the pass (layer calls and module returns)
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    reads_image: bool  # its input is the probe image itself (a stem)
    calls: int = 1


@dataclass
class Trace:
    """The result of a probe pass: layer calls by name, module inputs by name, module returns by name."""

    side: int  # the probe image's side
    layers: dict[str, LayerCall] = field(default_factory=dict)
    module_inputs: dict[str, tuple[int, ...]] = field(default_factory=dict)
    module_returns: dict[str, int] = field(default_factory=dict)  # name -> order of its (last) return
    events: int = 0

    def next_order(self) -> int:
        self.events += 1
        return self.events


def _shape(value) -> tuple[int, ...]:
    if isinstance(value, torch.Tensor):
        return tuple(value.shape)
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return tuple(value[0].shape)
    return ()


def probe(net: nn.Module, layers: dict[str, nn.Module], watched: dict[str, nn.Module], image: torch.Tensor) -> Trace:
    """Run `net(image)` once in eval mode without gradients, recording every call of `layers` and the input and
    return of every module in `watched` (both {qualified name: module}). Raises what the forward raises."""
    trace = Trace(side=int(image.shape[-1]))
    handles = []

    def on_layer(name: str):
        def hook(module, args, output):
            seen = trace.layers.get(name)
            if seen is not None:
                seen.calls += 1
                return
            first = args[0] if args else None
            trace.layers[name] = LayerCall(trace.next_order(), _shape(first), _shape(output), first is image)
        return hook

    def on_input(name: str):
        def hook(module, args):
            trace.module_inputs.setdefault(name, _shape(args[0]) if args else ())
        return hook

    def on_return(name: str):
        def hook(module, args, output):
            trace.module_returns[name] = trace.next_order()
        return hook

    for name, module in layers.items():
        handles.append(module.register_forward_hook(on_layer(name)))
    for name, module in watched.items():
        handles.append(module.register_forward_pre_hook(on_input(name)))
        handles.append(module.register_forward_hook(on_return(name)))
    modes = {module: module.training for module in net.modules()}
    try:
        net.eval()
        with torch.no_grad():
            net(image)
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes.items():
            module.training = training
    return trace


def probe_image(net: nn.Module, side: int) -> torch.Tensor:
    """A (1, 3, side, side) image of zeros on the device and in the floating dtype of `net`'s parameters."""
    tensor = next((p for p in net.parameters()), None)
    if tensor is None:
        tensor = next((b for b in net.buffers() if b.is_floating_point()), None)
    device = tensor.device if tensor is not None else torch.device("cpu")
    dtype = tensor.dtype if tensor is not None and tensor.is_floating_point() else torch.float32
    return torch.zeros(1, 3, side, side, device=device, dtype=dtype)
