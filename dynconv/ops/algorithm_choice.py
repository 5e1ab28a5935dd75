"""Which algorithm a per-sample convolution uses: measured once per layer shape and cached.

`per_sample_conv2d` and `mixture_conv2d` each have several exact algorithms whose speed depends on the
shape, the device and whether a backward pass follows. Rather than trusting a fixed cost model, the first
call for a shape times every applicable candidate on that call's own tensors and remembers the fastest;
every later call with the same key looks the choice up in a dict.

Policies (`set_policy`, or the environment variable DYNCONV_CONV_ALGORITHM read at import):

- "measure" (default): time the candidates on the first call of each key, then reuse the choice.
- "model": the fixed cost model of `per_sample_conv.py`, no timing (deterministic; what torch.compile and
  tracing always use, since timing inside a traced graph is meaningless, and what "measure" falls back to
  under `torch.use_deterministic_algorithms(True)`: measured choices can differ from process to process, e.g.
  between a run and its resumption, which changes results at the rounding level).
- an algorithm name ("folded", "bmm", "loop" for per-sample kernels; "kernels", "outputs", "fused" for
  mixtures; "assemble", "cells" for KernelWarehouse layers): forced wherever it applies; elsewhere the cost
  model decides. A per-sample algorithm also makes
  mixtures mix their kernels, so the forced algorithm is the one that runs.

`canonical_cost_mode()` (MAC counting) overrides every policy with the papers' formulation.

How candidates are timed: one warm call each, then up to `MEASURE_REPEATS` rounds of one timed call per
candidate, alternating (the minimum counts: noise only ever adds time; a candidate `DROP_FACTOR` times slower
than the best leaves the rounds early), with a device synchronisation around each on CUDA. The candidates run
on detached aliases of the call's tensors, so nothing is recorded into the caller's autograd graph and no
`.grad` is touched. When the call needs gradients the timed call is forward *and* backward
(`torch.autograd.grad` on those detached leaves): the backward is two thirds of a training step and the
algorithms differ most there (a grouped convolution's weight gradient is slow on CPU; the fused mixture
recomputes its kernels), so timing the forward alone would pick the wrong algorithm for training. Without
gradients only the forward is timed. Not measured (the cost model decides): convolutions below
`MEASURE_MIN_MACS`, and mixtures at batch 1 (see `per_sample_conv.py`). Measuring makes the first step of a
ResNet18 at 224px, batch 16, cost about seven ordinary steps on 2 CPU cores.
Every candidate computes the same result (tests/test_per_sample_conv.py), so the choice changes speed only.

The cache is per process (each DDP rank measures for itself; ranks may differ, which is harmless as the
results agree to rounding) and not locked: two threads measuring the same key at once both store a valid
choice.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch

PER_SAMPLE_ALGORITHMS = ("folded", "bmm", "loop")
MIXTURE_MODES = ("kernels", "outputs", "fused")
WAREHOUSE_ALGORITHMS = ("assemble", "cells")  # KernelWarehouse layers (dynconv/ops/kw/apply.py)
POLICIES = ("measure", "model") + PER_SAMPLE_ALGORITHMS + MIXTURE_MODES + WAREHOUSE_ALGORITHMS
ENV_VAR = "DYNCONV_CONV_ALGORITHM"
MEASURE_REPEATS = 3
# After each round, candidates more than this many times slower than the best so far stop being timed: on 2 CPU
# cores "outputs" and early-layer "fused" lose by 4x or more, and timing them three times only costs.
DROP_FACTOR = 2.5
# Below this many multiply-accumulates a convolution takes well under a millisecond: measuring it costs more
# than any choice could save, and the timings are mostly scheduler noise. The cost model decides there.
MEASURE_MIN_MACS = 1 << 23

# time.perf_counter, looked up through the module so tests can count (or fake) the timing calls.
timer = time.perf_counter


@dataclass
class Choice:
    """What the measurement found for one key: the winner and each candidate's best milliseconds."""

    algorithm: str
    ms: dict[str, float]


_cache: dict[tuple, Choice] = {}


def _read_env() -> str:
    value = os.environ.get(ENV_VAR, "measure").strip() or "measure"
    if value not in POLICIES:
        raise ValueError(f"{ENV_VAR}={value!r} is invalid; allowed values: {', '.join(POLICIES)}")
    return value


# A plain module global (not a ContextVar): torch.compile guards on module globals without a graph break.
_policy = _read_env()


def set_policy(policy: str) -> None:
    """Set the process-wide policy ("measure", "model" or an algorithm name; see the module docstring)."""
    global _policy
    if policy not in POLICIES:
        raise ValueError(f"unknown convolution algorithm policy {policy!r}; allowed: {', '.join(POLICIES)}")
    _policy = policy


def get_policy() -> str:
    return _policy


@contextlib.contextmanager
def policy(name: str) -> Iterator[None]:
    """Use policy `name` within the block (tests, benchmarks of one algorithm), then restore the previous one."""
    previous = _policy
    set_policy(name)
    try:
        yield
    finally:
        set_policy(previous)


def clear_cache() -> None:
    """Forget every measured choice (the next call of each shape measures again)."""
    _cache.clear()


def choices() -> dict[str, dict]:
    """The measured choices, keyed by a readable description of the shape (for benchmark reports)."""
    return {describe(key): {"algorithm": choice.algorithm, "ms": choice.ms} for key, choice in _cache.items()}


def describe(key: tuple) -> str:
    return " ".join(str(part) for part in key)


def measuring_allowed(*tensors: torch.Tensor) -> bool:
    """False where timing would be wrong, visible or unwanted: tracing/compiling, meta/fake tensors, an active
    dispatch mode (FlopCounterMode would count every candidate), CUDA graph capture, and
    `torch.use_deterministic_algorithms(True)` (the `deterministic` training option): timings differ between
    processes, so a measured choice could differ between a run and its resumption, changing the rounding."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.are_deterministic_algorithms_enabled():
        return False
    if any(t.device.type not in ("cpu", "cuda") for t in tensors):
        return False
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    if _get_current_dispatch_mode() is not None:
        return False
    return not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


def worth_measuring(macs: int) -> bool:
    """Whether a convolution of `macs` multiply-accumulates is large enough for timing to mean something."""
    return macs >= MEASURE_MIN_MACS


def shape_key(routine: str, x: torch.Tensor, weight: torch.Tensor, stride, padding, dilation, groups: int, *extra,
              needs_grad: Sequence[bool]) -> tuple:
    """The cache key: everything an algorithm's speed depends on (device, dtype, autocast, whether a backward
    follows and for which inputs, the shapes and the convolution's geometry; `extra` for flags)."""
    device = x.device.type
    autocast = torch.is_autocast_enabled(device) if device in ("cpu", "cuda") else False
    mode = "train" if torch.is_grad_enabled() and any(needs_grad) else "infer"
    grads = "grad:" + "".join("1" if g else "0" for g in needs_grad)
    geometry = [f"{name}{_pair_str(value)}" for name, value in (("s", stride), ("p", padding), ("d", dilation))]
    return (routine, device, str(x.dtype).removeprefix("torch."), *(["autocast"] if autocast else []), mode, grads,
            input_shape_class(x.shape), "w" + "x".join(map(str, weight.shape)), *geometry, f"g{groups}",
            *(flag for flag in extra if flag))


def input_shape_class(shape: Sequence[int]) -> str:
    """Batch and channels exactly, the spatial size as its pixel count rounded to a power of sqrt(2).

    Why a class and not the exact size: detection feeds every batch at another padded size (multi-scale
    training, per-image aspect ratios), and measuring each new size anew would cost more than any choice saves
    (on 2 CPU cores the toy Mask R-CNN ran 3-10x slower). The algorithms' relative speed changes smoothly with
    the pixel count, so sizes within a factor of ~1.2 share a choice. A classification run, whose sizes are
    fixed, measures each of them as before.
    """
    if len(shape) < 3:
        return "x" + "x".join(map(str, shape))
    pixels = math.prod(shape[2:])
    bucket = round(2 * math.log2(pixels)) / 2 if pixels > 0 else 0
    return f"x{shape[0]}x{shape[1]}xpx2^{bucket:g}"


def _pair_str(value) -> str:
    return f"{value}x{value}" if isinstance(value, int) else "x".join(map(str, value))


def choose(key: tuple, candidates: dict[str, Callable[..., torch.Tensor]], inputs: Sequence[torch.Tensor | None],
           fallback: str) -> str:
    """The cached choice for `key`, measuring every candidate on `inputs` the first time.

    `candidates` maps name -> function(*inputs) returning the result tensor. `fallback` is returned when no
    candidate could run (each failure, e.g. an out-of-memory on the GPU, only removes that candidate).
    """
    cached = _cache.get(key)
    if cached is not None:
        return cached.algorithm
    if len(candidates) == 1:
        name = next(iter(candidates))
        _cache[key] = Choice(name, {})
        return name
    timed = _time_candidates(candidates, inputs)
    algorithm = min(timed, key=timed.get) if timed else fallback
    _cache[key] = Choice(algorithm, {name: round(value, 4) for name, value in timed.items()})
    return algorithm


def _time_candidates(candidates: dict[str, Callable[..., torch.Tensor]],
                     inputs: Sequence[torch.Tensor | None]) -> dict[str, float]:
    """Best milliseconds of each candidate over `MEASURE_REPEATS` calls after one warm call each.

    The candidates alternate (A, B, A, B, ...) so that a burst of load from another process hits all of
    them rather than whichever happened to run then; the minimum is kept, as noise only ever adds time.
    A candidate that fails (e.g. out of memory on the GPU) is dropped.
    """
    train = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs)
    # detach(): a new leaf sharing storage; the caller's graph and parameters' .grad are never reached.
    leaves = [None if t is None else t.detach().requires_grad_(train and t.requires_grad) for t in inputs]
    wanted = [t for t in leaves if t is not None and t.requires_grad]
    device = next(t for t in inputs if t is not None).device

    def call(fn) -> None:
        if train:
            out = fn(*leaves)
            torch.autograd.grad(out, wanted, torch.ones_like(out))
        else:
            with torch.no_grad():
                fn(*leaves)

    best: dict[str, float] = {}
    for name, fn in candidates.items():
        try:
            call(fn)  # warm: lazy initialisation, allocator, and any nested routine's own measurement
        except (RuntimeError, MemoryError):  # e.g. CUDA out of memory: this candidate cannot win
            continue
        best[name] = float("inf")
    running = list(best)
    for _ in range(MEASURE_REPEATS):
        for name in running:
            _synchronize(device)
            start = timer()
            call(candidates[name])
            _synchronize(device)
            best[name] = min(best[name], 1000.0 * (timer() - start))
        # A candidate already DROP_FACTOR times slower than the best cannot win: stop timing it (on 2 CPU cores
        # this halves the first step of a ResNet18 at 224px, where "outputs" and early-layer "fused" lose by 4x+).
        fastest = min(best[name] for name in running)
        running = [name for name in running if best[name] <= DROP_FACTOR * fastest]
    return best


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
