"""Export the per-sample kernels a model's dynamic convolutions apply, for any per-sample operator.

WeightNet (Ma et al., ECCV 2020, Sec. 5) studies the kernels its layers generate per image: a t-SNE of one
layer's kernels over 1,000 validation images (Fig. 5) and the cosine similarity between a kernel's filters
(Fig. 6). Nothing here is WeightNet's: every per-sample operator (WeightNet, CondConv, DY-Conv, ODConv,
KernelWarehouse, DyNet, DCD, CGC) convolves through `per_sample_conv2d`, and `dynconv.functional.kernel_capture`
records the kernel there, with whatever per-channel scale the layer applies around the call folded in. The
recorded kernel W_b of sample b is exactly the one the layer applies: y_b = conv2d(x_b, W_b) + bias_b for the
layer's input x (tests/test_kernel_export.py checks this for every operator). While recording, the routines
that have a way around materialising the kernels (mixing outputs, KernelWarehouse's "cells", DyNet's feature
fusion, ODConv's 1x1 shortcut) take the materialising one; the output is the same up to rounding.

    with KernelRecorder(model, ["net.layer4.1.conv2"]) as recorder, torch.no_grad():
        model(images)                                  # any number of calls; batch 1 works too
    kernels = recorder.kernels("net.layer4.1.conv2")   # (N, O, C/g, kh, kw), N = images seen while recording
    names = dynamic_conv_layers(model, images[:1])     # the layers that apply per-sample kernels, in call order

A plain nn.Conv2d among the named layers (a static model's, or a layer its operator left static) records its
weight broadcast over the batch (`source == "static"`), so a static and a dynamic model are read alike. A named
module that applies no convolution, or more than one per-sample convolution in one call (a block), is an error.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn as nn

from dynconv.functional import kernel_capture
from dynconv.functional.kernel_capture import CapturedKernel, LayerCapture

Transform = Callable[[torch.Tensor], torch.Tensor]


def static_capture(module: nn.Conv2d, batch: int) -> CapturedKernel:
    """A plain convolution's kernel as a per-sample one: its weight (and bias) broadcast over `batch` samples."""
    weight = module.weight.detach()
    bias = None if module.bias is None else module.bias.detach().expand(batch, -1)
    padding = module.padding if isinstance(module.padding, str) else tuple(module.padding)
    return CapturedKernel(weight.expand(batch, *weight.shape), bias, tuple(module.stride), padding,
                          tuple(module.dilation), module.groups, "static")


class KernelRecorder:
    """Records, per named layer, the kernels every forward call applies while the recorder is active.

    `layers`: module names from `model`'s root (one name or several). `transform`: applied to each call's
    (B, O, C/g, kh, kw) kernels before they are kept (e.g. flatten and project them to save memory);
    `device`: where the kept kernels go (default: the CPU; None: where they were computed). `strict=False`
    skips a named module that applied no per-sample kernel instead of raising (how `dynamic_conv_layers` finds
    the dynamic ones). Hooks and the capture are removed on exit."""

    def __init__(self, model: nn.Module, layers: str | Sequence[str], *, transform: Transform | None = None,
                 device: str | torch.device | None = "cpu", strict: bool = True):
        names = [layers] if isinstance(layers, str) else list(layers)
        modules = dict(model.named_modules())
        unknown = [name for name in names if name not in modules]
        if unknown:
            examples = [name for name, module in modules.items() if type(module).__name__.endswith("Conv2d")][-3:]
            raise ValueError(f"no module named {', '.join(map(repr, unknown))} in the model; a layer is named from "
                             f"the model's root, e.g. {', '.join(examples) or 'net.layer4.1.conv2'}")
        self.model = model
        self.layers = {name: modules[name] for name in names}
        self.transform = transform
        self.device = None if device is None else torch.device(device)
        self.strict = strict
        self.captures: dict[str, list[CapturedKernel]] = {name: [] for name in names}
        self.order: list[str] = []  # layer names in the order their calls were recorded (one entry per call)
        self._handles: list = []
        self._stack: list[tuple[LayerCapture, LayerCapture | None]] = []
        self._outer: LayerCapture | None = None

    # ------------------------------------------------------------------------------------------ hooks

    def __enter__(self) -> "KernelRecorder":
        self._outer = kernel_capture.set_current(None)
        for name, module in self.layers.items():
            self._handles.append(module.register_forward_pre_hook(self._pre_hook(name)))
            self._handles.append(module.register_forward_hook(self._post_hook(name)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._stack.clear()  # left over only when a forward raised
        kernel_capture.set_current(self._outer)

    def _pre_hook(self, name: str):
        def hook(module, args):
            capture = LayerCapture(name)
            self._stack.append((capture, kernel_capture.set_current(capture)))

        return hook

    def _post_hook(self, name: str):
        def hook(module, args, output):
            capture, previous = self._stack.pop()
            kernel_capture.set_current(previous)
            captured = capture.result()
            if captured is None:
                if isinstance(module, nn.Conv2d):
                    captured = static_capture(module, args[0].shape[0])
                elif not self.strict:
                    return
                else:
                    raise RuntimeError(f"{name} ({type(module).__name__}) applied no per-sample convolution: name a "
                                       "convolution layer of a per-sample operator, or a plain nn.Conv2d")
            self._keep(name, captured)

        return hook

    def _keep(self, name: str, captured: CapturedKernel) -> None:
        weight = captured.weight if self.transform is None else self.transform(captured.weight)
        bias = captured.bias
        if self.device is not None:
            weight = weight.to(self.device)
            bias = None if bias is None else bias.to(self.device)
        captured.weight, captured.bias = weight, bias
        self.captures[name].append(captured)
        self.order.append(name)

    # ---------------------------------------------------------------------------------------- results

    def _name(self, name: str | None) -> str:
        if name is None:
            if len(self.layers) != 1:
                raise ValueError(f"the recorder holds {len(self.layers)} layers; name one of {', '.join(self.layers)}")
            return next(iter(self.layers))
        if name not in self.captures:
            raise KeyError(f"{name!r} is not recorded; recorded layers: {', '.join(self.layers)}")
        return name

    def kernels(self, name: str | None = None) -> torch.Tensor:
        """The layer's kernels of every recorded call, concatenated over the samples: (N, O, C/g, kh, kw)
        (or what `transform` made of them)."""
        captures = self.captures[self._name(name)]
        if not captures:
            raise RuntimeError(f"{self._name(name)} was not called while the recorder was active")
        return torch.cat([captured.weight for captured in captures])

    def biases(self, name: str | None = None) -> torch.Tensor | None:
        """(N, O) per-sample biases, or None when the layer has none."""
        captures = self.captures[self._name(name)]
        if not captures or captures[0].bias is None:
            return None
        return torch.cat([captured.bias for captured in captures])

    def clear(self) -> None:
        for captures in self.captures.values():
            captures.clear()
        self.order.clear()


@torch.no_grad()
def dynamic_conv_layers(model: nn.Module, *inputs) -> list[str]:
    """Names of the modules that applied a per-sample kernel in one forward pass of `inputs` (e.g. one image),
    in call order: every dynamic convolution of any per-sample operator (static nn.Conv2d are not listed). The
    pass runs in eval mode (a BatchNorm in training mode cannot take one image); the modes are restored."""
    names = [name for name, _ in model.named_modules() if name]
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        with KernelRecorder(model, names, transform=lambda kernel: kernel[:0], device=None,
                            strict=False) as recorder:
            model(*inputs)
    finally:
        for module, training in modes.items():
            module.training = training
    found = []
    for name in recorder.order:
        if name not in found and all(captured.source != "static" for captured in recorder.captures[name]):
            found.append(name)
    return found


def filter_cosine_similarity(kernel: torch.Tensor) -> torch.Tensor:
    """(O, O) cosine similarity between the filters of one kernel (O, C/g, kh, kw): each output channel's filter
    flattened. A filter of zeros has similarity 0 with every filter, itself included."""
    flat = kernel.detach().reshape(kernel.shape[0], -1).to(torch.float64)
    norms = flat.norm(dim=1, keepdim=True)
    unit = torch.where(norms > 0, flat / norms.clamp_min(torch.finfo(torch.float64).tiny), torch.zeros_like(flat))
    return unit @ unit.t()


def off_diagonal(matrix: torch.Tensor) -> torch.Tensor:
    """The entries of a square matrix off its diagonal, flattened."""
    size = matrix.shape[0]
    return matrix[~torch.eye(size, dtype=torch.bool, device=matrix.device)]
