"""Per-sample kernels recomputed in the backward pass instead of kept for it.

A per-sample convolution's backward needs the B kernels it ran with (for the gradient of its input), and autograd
keeps them from the forward: B x O x C/g x k x k values per layer, 16 x 45 MB = 704 MB for ResNet18 at batch 16,
more than the whole static network's activations. They are cheap to make again from what produced them (n
experts and B x n coefficients, an attention's scale, a warehouse's cells), so under `recomputed` a tensor that
autograd saves and that is (a view of) one of the given kernels is stored as a recipe, and the backward builds the
kernels again from it, once per layer, when its gradient needs them. The result is the same to the last bit (the
same operations on the same inputs); the price is one more mixing per layer in the backward.

Used by every kernel-materialising algorithm (mixtures, WeightNet's generated kernels, DyNet's fused kernel,
KernelWarehouse's assembly, CGC's gated and DCD's decomposed kernels) when `enabled()`. The policy is
`DYNCONV_KERNEL_MEMORY` / `set_kernel_memory` / `train.py`'s `kernel_memory` key:

- "auto" (the default): recompute on CUDA, keep on the CPU. A GPU mixes kernels at its memory bandwidth (a
  ResNet18 layer's 151 MB of batch-16 kernels in well under a millisecond) and runs out of memory first (KW ResNet50
  at batch 128 would keep 128 x 25.6M kernel values, 13 GB); on 2 CPU cores the second mixing cost ResNet18's
  mixtures 4-14% of a training step (docs/benchmarks.md), and memory was not what limited them.
- "recompute": everywhere (ResNet18, batch 16, CPU: DY-Conv(4x)'s training peak 2.52x -> 1.80x of static);
- "keep": autograd keeps the kernels, as plain PyTorch does.

Not used (kernels kept) under another saved-tensor hook (activation checkpointing, offloading: they decide what
is kept, and a checkpoint's recomputation must see what its forward saved), under torch.compile (the compiled
graph chooses what to save itself), or where nothing needs a gradient.
"""

from __future__ import annotations

import contextlib
import os
from typing import Callable, Iterator

import torch

KERNEL_MEMORY = ("auto", "keep", "recompute")
ENV_VAR = "DYNCONV_KERNEL_MEMORY"
# Where "auto" recomputes (module docstring).
AUTO_RECOMPUTE_DEVICES = ("cuda",)


def set_kernel_memory(policy: str) -> None:
    """"auto", "recompute" (kernels rebuilt in the backward) or "keep" (autograd keeps them)."""
    global _policy
    _policy = _checked(policy, "kernel_memory")


def _checked(policy: str, name: str) -> str:
    if policy not in KERNEL_MEMORY:
        raise ValueError(f"{name}={policy!r}; allowed: {', '.join(KERNEL_MEMORY)}")
    return policy


def get_kernel_memory() -> str:
    return _policy


# A plain module global, as the selector's policy (read inside compiled code without a graph break).
_policy = _checked(os.environ.get(ENV_VAR, "auto"), ENV_VAR)


def kernel_memory(policy: str) -> contextlib.AbstractContextManager[None]:
    """Run a block under a kernel-memory policy, restoring the previous one after it (as `selector.policy`)."""
    return _restoring(get_kernel_memory, set_kernel_memory, policy)


@contextlib.contextmanager
def _restoring(get: Callable[[], str], set_: Callable[[str], None], value: str) -> Iterator[None]:
    previous = get()
    set_(value)
    try:
        yield
    finally:
        set_(previous)


def recomputes_on(device: torch.device) -> bool:
    """Whether the policy recomputes kernels on this device ("auto" resolved)."""
    return _policy == "recompute" or (_policy == "auto" and device.type in AUTO_RECOMPUTE_DEVICES)


def enabled(x: torch.Tensor, *inputs: torch.Tensor | None) -> bool:
    """Whether a call on input x and kernels made from `inputs` recomputes its kernels: the policy says so for x's
    device, some tensor needs a gradient (else nothing is saved), and no other saved-tensor hook or compiler is in
    charge of what is saved."""
    if not recomputes_on(x.device) or not torch.is_grad_enabled():
        return False
    inputs = (x, *inputs)
    if not any(t is not None and t.requires_grad for t in inputs):
        return False
    if torch.compiler.is_compiling() or not torch._C._autograd._saved_tensors_hooks_is_enabled():
        return False
    outer = torch._C._autograd._top_saved_tensors_default_hooks(True)
    return outer is None or outer[0] is _keep


def _keep(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


@contextlib.contextmanager
def shielded() -> Iterator[None]:
    """Autograd keeps what is saved within the block, as without hooks, even inside `recomputed`; `enabled` still
    holds there. The selector times its candidate algorithms in it: the timed calls run on aliases of a layer's
    tensors (the kernels among them), which must not count as that layer's saved kernels, while a candidate that
    recomputes its own kernels is timed doing so."""
    with torch.autograd.graph.saved_tensors_hooks(_keep, _keep):
        yield


class _Recipe:
    """What autograd stores instead of a saved view of the kernels: which produced tensor, and the view."""

    __slots__ = ("batch", "index", "size", "stride", "offset", "dtype")

    def __init__(self, batch: "_Batch", index: int, view: torch.Tensor) -> None:
        self.batch, self.index, self.dtype = batch, index, view.dtype
        self.size, self.stride, self.offset = view.size(), view.stride(), view.storage_offset()


class _Batch:
    """The producer of one layer call's kernels, and its result while the backward uses it.

    A layer saves several views of its kernels (a per-sample loop saves B; ODConv keeps the kernels before and
    after its attention scale): they are produced once and dropped when the last saved view has been unpacked.
    """

    def __init__(self, produce: Callable[[Callable[[torch.Tensor], torch.Tensor]], object], device: str) -> None:
        self.produce = produce
        # The backward runs outside the forward's autocast region: produce again under the same precision.
        self.device = device
        self.autocast = (torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        self.packed = 0
        self.unpacked = 0
        self.tensors: list[torch.Tensor] | None = None

    def unpack(self, recipe: _Recipe) -> torch.Tensor:
        if self.tensors is None:
            tensors: list[torch.Tensor] = []
            enabled, dtype = self.autocast
            # Grad mode as the backward has it: off, or on under create_graph=True, where the kernels' own graph
            # must reach the coefficients for a second derivative (as kept kernels would).
            with torch.autocast(self.device, dtype=dtype, enabled=enabled):
                self.produce(lambda tensor: tensors.append(tensor.contiguous()) or tensors[-1])
            self.tensors = tensors
        produced = self.tensors[recipe.index]
        if produced.dtype != recipe.dtype:
            raise RuntimeError(f"recomputed kernels are {produced.dtype}, the forward's were {recipe.dtype}")
        view = produced.as_strided(recipe.size, recipe.stride, recipe.offset)
        self.unpacked += 1
        if self.unpacked >= self.packed:  # every saved view has been handed out: free the kernels
            self.tensors, self.unpacked = None, 0  # (and start over if the graph is run backward again)
        return view


@contextlib.contextmanager
def recomputed(produce: Callable[[Callable[[torch.Tensor], torch.Tensor]], object],
               device: torch.device | str = "cpu") -> Iterator[object]:
    """Run `produce(note)` and yield its result; within the block, autograd saves views of every tensor that
    `produce` passed through `note` as recipes, and the backward runs `produce` again (once per call) for them.

    `produce` must use what `note` returns (the tensor, made contiguous), note tensors whose memory it allocated
    (never a parameter, an input or a view of one) in the same order every time, and read only tensors that stay
    unchanged until the backward (parameters, attention outputs).
    """
    batch = _Batch(produce, torch.device(device).type)
    # Storage address -> (index, size). Plain numbers: the hooks live as long as the saved tensors, and holding
    # the kernels there would keep them alive, the very thing this avoids.
    storages: dict[int, tuple[int, int]] = {}
    # The noted tensors stay alive until the block ends, so that no other tensor of the block can be allocated
    # at one of their addresses and be mistaken for them.
    alive: list[torch.Tensor] = []

    def note(tensor: torch.Tensor) -> torch.Tensor:
        # Contiguous: a strided view (a permuted assembly, a transposed batched product) would be copied by the
        # convolution, and the copy is what autograd keeps; copied here, the noted tensor is the one kept.
        tensor = tensor.contiguous()
        if tensor.numel():
            storages[tensor.untyped_storage().data_ptr()] = (len(alive), tensor.untyped_storage().nbytes())
        alive.append(tensor)
        return tensor

    def pack(tensor: torch.Tensor):
        found = storages.get(tensor.untyped_storage().data_ptr()) if tensor.numel() else None
        if found is None or tensor.untyped_storage().nbytes() != found[1]:
            return tensor
        batch.packed += 1
        return _Recipe(batch, found[0], tensor)

    def unpack(packed):
        return packed.batch.unpack(packed) if isinstance(packed, _Recipe) else packed

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        try:
            yield produce(note)
        finally:
            alive.clear()


@contextlib.contextmanager
def materialised(produce: Callable[[Callable[[torch.Tensor], torch.Tensor]], object], x: torch.Tensor,
                 *inputs: torch.Tensor | None) -> Iterator[object]:
    """What kernel-materialising algorithms use: `produce(note)`'s result, recomputed in the backward (see
    `recomputed`) when `enabled` for the call's input x and the tensors the kernels are made from."""
    if not enabled(x, *inputs):
        yield produce(_unnoted)
        return
    with recomputed(produce, x.device) as kernels:
        yield kernels


def _unnoted(tensor: torch.Tensor) -> torch.Tensor:
    return tensor
