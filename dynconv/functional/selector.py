"""The one algorithm selector: which exact algorithm computes a dynamic layer's convolution.

Every routine with several exact ways to compute the same result describes itself once as a `Routine`
(`per_sample_conv2d`, `mixture_conv2d`, DyNet's kernel/feature fusion, KernelWarehouse's assemble/cells, and
any future one) and asks `select(routine, tensors, params)` which algorithm to run. One precedence, first match
wins:

1. **counting** (`counting_macs()`, what `dynconv.profiling.count_macs` runs under): the routine's papers'
   formulation (`Routine.canonical`), whatever the policy, so a MAC count never depends on it;
2. **exporting** (`exporting()`, what `dynconv.export` enters; also under `torch.export`, which the ONNX exporter
   runs, and while `torch.jit` traces): the routine's batch-independent algorithm (`Routine.export_choice`), whatever
   the policy: the graph being recorded must serve every batch size, so no algorithm that folds the batch into
   convolution groups (ONNX's Conv takes its group count as a constant, onnx#3843), loops over the samples or
   branches on the batch size may run, and the choice itself reads no batch size;
3. **a forced policy** (DYNCONV_CONV_ALGORITHM=<algorithm>, or `policy(...)`): the algorithm it forces in this
   routine (`Routine.forced`), where it applies to the call;
4. **no timing**: policy "model", a forced policy that does not apply here, torch.compile (timing inside a graph
   is meaningless), `torch.use_deterministic_algorithms(True)`, a dispatch mode (FlopCounterMode
   would count every candidate), meta/fake tensors: the routine's cost model;
5. **batch 1**: the cost model (every routine's model gives its batch-1 algorithm; timing repeated calls at
   batch 1 measures warm caches, not the network's cold ones);
6. **the measured cache**: the choice made earlier for this call's key (one key per layer shape class, looked up
   before any candidate is built; a tuple of plain values, formatted only for reports by `describe`), then the
   choice stored by an earlier run on this machine (`algorithm_store`: same CPU or GPU, thread count and torch).
   Only shapes worth timing are ever measured: below `MEASURE_MIN_MACS` the cost model decides, without a key;
7. a shape seen for the first time: every candidate is timed on this call's tensors and the fastest is cached,
   and stored for later runs when the measurement was clean. The cost model's own pick stays unless another
   candidate beats it by more than `MODEL_MARGIN`; once this process has spent `MEASURE_BUDGET_S` seconds
   measuring, new shapes take the cost model (kept for this process, never stored: a later run may measure them).

Policies: "measure" (the default), "model", or an algorithm name: "folded", "bmm", "bmm_t", "loop" (per-sample kernels),
"kernels", "outputs", "fused", "triton" (mixtures), "assemble", "cells" (KernelWarehouse). A forced per-sample
algorithm also makes mixtures, DyNet and KernelWarehouse materialise their kernels, so the forced algorithm is the
one that runs. The policy comes from DYNCONV_CONV_ALGORITHM at import, `set_policy`, or the `policy` context
manager (train.py applies the config's `conv_algorithm` that way and restores the previous policy after the run).

How candidates are timed: one warm call each, then at least `MEASURE_REPEATS` rounds of one timed call per
candidate, alternating (the minimum counts: noise only ever adds time; a candidate `DROP_FACTOR` times slower
than the best leaves the rounds early), with a device synchronisation around each on CUDA. A busy machine (another
process on a core, data-loader workers) makes single timings wrong by whole scheduler slices, and a one-shot
choice then locked in losing algorithms: so rounds go on, up to `MEASURE_MAX_ROUNDS`, until the same candidate
leads two rounds in a row and its two best timings agree within `STABLE_SPREAD`; a measurement that ends without
that is used by this process but not stored for later runs. The candidates run
on detached aliases of the call's tensors, so nothing is recorded into the caller's autograd graph and no
`.grad` is touched. When the call needs gradients the timed call is forward *and* backward: the backward is two
thirds of a training step and the algorithms differ most there. Measuring makes the first step of a ResNet18 at
224px, batch 16, cost about seven ordinary steps on 2 CPU cores. Every candidate computes the same result
(tests/test_per_sample_conv.py), so the choice changes speed only.

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
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

from dynconv.functional import algorithm_store, recompute

PER_SAMPLE_ALGORITHMS = ("folded", "bmm", "bmm_t", "loop")
MIXTURE_MODES = ("kernels", "outputs", "fused", "triton")
WAREHOUSE_ALGORITHMS = ("assemble", "cells", "fused")
# "fused" names both a mixture mode and a KernelWarehouse algorithm (the same idea: kernels mixed inside the matmul).
POLICIES = tuple(dict.fromkeys(("measure", "model") + PER_SAMPLE_ALGORITHMS + MIXTURE_MODES + WAREHOUSE_ALGORITHMS))
ENV_VAR = "DYNCONV_CONV_ALGORITHM"
MEASURE_REPEATS = 3  # the fewest timed rounds
MEASURE_MAX_ROUNDS = 8  # the most, while the leader changes or its timings disagree (a busy machine)
# A measurement is clean (and stored for later runs) when the leader's two best timings are within this ratio.
STABLE_SPREAD = 1.1
# The cost model's pick stays unless a candidate is faster by more than this: timing noise of a few percent
# must not move a choice, and where two algorithms are that close the choice hardly matters.
MODEL_MARGIN = 0.05
# Seconds of measuring per process; after that, new shapes take the cost model (DYNCONV_MEASURE_BUDGET_S). A
# ResNet18 at 224 px, batch 16, measures for 15-50 s on 2 CPU cores (quiet / one core busy); scripts/bench.py lifts it.
MEASURE_BUDGET_S = float(os.environ.get("DYNCONV_MEASURE_BUDGET_S", "300"))
# After each round, candidates more than this many times slower than the best so far stop being timed: on 2 CPU
# cores "outputs" and early-layer "fused" lose by 4x or more, and timing them three times only costs.
DROP_FACTOR = 2.5
# Below this many multiply-accumulates a convolution takes well under a millisecond: measuring it costs more
# than any choice could save, and the timings are mostly scheduler noise. The cost model decides there.
MEASURE_MIN_MACS = 1 << 23

# time.perf_counter, looked up through the module so tests can count (or fake) the timing calls.
timer = time.perf_counter

Tensors = Sequence["torch.Tensor | None"]


class Routine:
    """One routine's exact algorithms, as the selector sees them.

    `tensors` is the tuple of the call's tensor inputs (None for an absent optional one; the first is the input
    feature map, the second the weight-like tensor whose device is checked), `params` the rest (geometry,
    flags); both are passed through unchanged to the methods below.
    """

    name: str = "routine"  # the first field of every cache key
    algorithms: tuple[str, ...] = ()
    canonical: str = ""  # what MAC counting evaluates: the papers' formulation
    forced: Mapping[str, str] = {}  # policy -> the algorithm of this routine it forces
    # The algorithms whose recorded graph holds for every batch size (export), in order of preference: no batch
    # folded into groups, no loop over the samples, no Python branch on the batch size.
    batch_free: tuple[str, ...] = ()
    # Whether some of its algorithms make per-sample kernels, which `recompute` may make again in the backward
    # (their training calls are then timed and keyed apart: `_context_key`).
    makes_kernels: bool = False

    def applicable(self, algorithm: str, tensors: Tensors, params: Any) -> bool:
        return True

    def export_choice(self, tensors: Tensors, params: Any) -> str:
        """The algorithm an exported graph runs (precedence step 2): one of `batch_free`, decided without reading
        the batch size (a comparison with a symbolic batch would specialise the graph). By default the first of
        `batch_free` that applies to the call; a routine with a cost model of its own overrides this."""
        for name in self.batch_free:
            if self.applicable(name, tensors, params):
                return name
        declared = ", ".join(self.batch_free) or "none declared"
        raise ValueError(f"{self.name}: none of its batch-independent algorithms ({declared}) applies to this call, "
                         "so it cannot be exported with a dynamic batch")

    def cost_model(self, tensors: Tensors, params: Any) -> str:
        """The algorithm without timing (also at batch 1)."""
        raise NotImplementedError

    def macs(self, tensors: Tensors, params: Any) -> int:
        """The convolution's multiply-accumulates: below `MEASURE_MIN_MACS` timing cannot pay."""
        raise NotImplementedError

    def timed(self, tensors: Tensors, params: Any) -> list[str]:
        """The candidates worth timing for this call (applicable, and not known to lose by far)."""
        return [name for name in self.algorithms if self.applicable(name, tensors, params)]

    def shape_key(self, tensors: Tensors, params: Any) -> tuple:
        """What the algorithms' speed depends on beyond the context (see `describe` for the fields)."""
        raise NotImplementedError

    def run(self, algorithm: str, tensors: Tensors, params: Any) -> torch.Tensor:
        raise NotImplementedError


@dataclass
class Choice:
    """What the measurement found for one key: the winner and each candidate's best milliseconds."""

    algorithm: str
    ms: dict[str, float]
    # "measured" in this process, "stored" by an earlier run (algorithm_store), "budget": the cost model's, the
    # measuring budget being spent
    source: str = "measured"
    rounds: int = 0  # timed rounds it took ("stored": those of the run that measured it)
    clean: bool = True  # the leader's timings agreed (see the module docstring); only clean choices are stored

    def as_dict(self) -> dict:
        return {"algorithm": self.algorithm, "ms": self.ms, "source": self.source, "rounds": self.rounds,
                "clean": self.clean}


_cache: dict[tuple, Choice] = {}
_spent_measuring_s = 0.0


def _read_env() -> str:
    value = os.environ.get(ENV_VAR, "measure").strip() or "measure"
    if value not in POLICIES:
        raise ValueError(f"{ENV_VAR}={value!r} is invalid; allowed values: {', '.join(POLICIES)}")
    return value


# Plain module globals (not ContextVars): torch.compile guards on module globals without a graph break.
_policy = _read_env()
_counting_depth = 0
_exporting_depth = 0


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
    """Use policy `name` within the block (a training run, a benchmark of one algorithm), then restore the
    previous one."""
    previous = _policy
    set_policy(name)
    try:
        yield
    finally:
        set_policy(previous)


@contextlib.contextmanager
def counting_macs() -> Iterator[None]:
    """Within this block every routine runs its papers' formulation (precedence step 1), and kernel
    generators take the matmul forms that a FLOP counter sees."""
    global _counting_depth
    _counting_depth += 1
    try:
        yield
    finally:
        _counting_depth -= 1


def is_counting_macs() -> bool:
    return _counting_depth > 0


@contextlib.contextmanager
def exporting() -> Iterator[None]:
    """Within this block every routine runs its batch-independent algorithm (precedence step 2), and the layers'
    batch-1 shortcuts are off: what `dynconv.export` records must serve every batch size."""
    global _exporting_depth
    _exporting_depth += 1
    try:
        yield
    finally:
        _exporting_depth -= 1


def is_exporting() -> bool:
    """Whether a graph that must serve every batch size is being recorded: inside `exporting()`, under
    `torch.export` (torch.onnx's exporter runs it too) or while `torch.jit` traces (the TorchScript exporter). Not
    under torch.compile, which recompiles for a new batch size and may specialise freely."""
    return _exporting_depth > 0 or torch.compiler.is_exporting() or torch.jit.is_tracing()


def clear_cache() -> None:
    """Forget every choice this process made or read, and reset the measuring budget (the stored files stay: turn
    them off with DYNCONV_ALGORITHM_CACHE=off, or delete `algorithm_store.folder()`)."""
    global _spent_measuring_s
    _cache.clear()
    algorithm_store.forget()
    _spent_measuring_s = 0.0


def choices() -> dict[str, dict]:
    """The choices in use, keyed by a readable description of the shape (benchmark reports, run folders):
    algorithm, each candidate's best ms, whether measured here or stored by an earlier run, rounds, clean."""
    return {describe(key): choice.as_dict() for key, choice in _cache.items()}


def seconds_spent_measuring() -> float:
    """What timing candidates has cost this process so far (against `MEASURE_BUDGET_S`)."""
    return _spent_measuring_s


def select(routine: Routine, tensors: Tensors, params: Any) -> str:
    """The algorithm `routine` runs for this call, by the precedence of the module docstring."""
    if _counting_depth > 0:
        return routine.canonical
    if is_exporting():
        return routine.export_choice(tensors, params)
    if _policy != "measure":
        forced = routine.forced.get(_policy)
        if forced is not None and routine.applicable(forced, tensors, params):
            return forced
        return routine.cost_model(tensors, params)
    x = tensors[0]
    if not _measuring_allowed(x, tensors[1]) or x.shape[0] == 1:
        return routine.cost_model(tensors, params)
    if routine.macs(tensors, params) < MEASURE_MIN_MACS:
        return routine.cost_model(tensors, params)  # never measured, so never in the cache: no key needed
    key = _context_key(routine, tensors) + routine.shape_key(tensors, params)
    cached = _cache.get(key)
    if cached is not None:
        return cached.algorithm
    model = routine.cost_model(tensors, params)
    names = routine.timed(tensors, params)
    if len(names) == 1:
        _cache[key] = Choice(names[0], {})
        return names[0]
    text = describe(key)
    stored = algorithm_store.lookup(x.device, text)
    if stored is not None and stored["algorithm"] in names:
        _cache[key] = Choice(stored["algorithm"], dict(stored.get("ms", {})), "stored", int(stored.get("rounds", 0)))
        return stored["algorithm"]
    if _spent_measuring_s >= MEASURE_BUDGET_S:
        # Kept for this process (later calls are one lookup), never stored: a later run may still measure it.
        _cache[key] = Choice(model, {}, "budget", clean=False)
        return model
    choice = _measure(routine, names, model, tensors, params)
    _cache[key] = choice
    if choice.clean:
        algorithm_store.remember(x.device, text, choice.as_dict())
    return choice.algorithm


def _measure(routine: Routine, names: list[str], model: str, tensors: Tensors, params: Any) -> Choice:
    """Time the candidates; the fastest wins unless the cost model's pick is within `MODEL_MARGIN` of it."""
    global _spent_measuring_s
    started = time.perf_counter()
    candidates = {name: _bound(routine, name, params) for name in names}
    samples, rounds, clean = _time_candidates(candidates, tensors)
    _spent_measuring_s += time.perf_counter() - started
    best = {name: min(values) for name, values in samples.items()}
    if not best:
        return Choice(model, {}, rounds=rounds, clean=False)
    algorithm = min(best, key=best.get)
    if model in best and best[model] <= (1.0 + MODEL_MARGIN) * best[algorithm]:
        algorithm = model
    return Choice(algorithm, {name: round(value, 4) for name, value in best.items()}, rounds=rounds, clean=clean)


def _bound(routine: Routine, name: str, params: Any) -> Callable[..., torch.Tensor]:
    return lambda *tensors: routine.run(name, tensors, params)


def _measuring_allowed(*tensors: torch.Tensor) -> bool:
    """False where timing would be wrong, visible or unwanted (precedence step 4)."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.are_deterministic_algorithms_enabled():
        return False
    if any(t.device.type not in ("cpu", "cuda") for t in tensors):
        return False
    if _get_current_dispatch_mode() is not None:
        return False
    return not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


def autocast_on(x: torch.Tensor) -> bool:
    """Whether autocast is on for x's device (CPU and CUDA; other devices have none here). Algorithms written as
    custom autograd functions either cast their inputs to `autocast_dtype` in their forward (so that the backward
    sees one dtype) or leave themselves out under it."""
    device = x.device.type
    return torch.is_autocast_enabled(device) if device in ("cpu", "cuda") else False


def autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype autocast computes matmuls in on x's device, or None when it is off."""
    return torch.get_autocast_dtype(x.device.type) if autocast_on(x) else None


def _context_key(routine: Routine, tensors: Tensors) -> tuple:
    """Routine, device, dtype, autocast, and whether a backward follows (and remakes the kernels) and for which
    inputs."""
    name, x = routine.name, tensors[0]
    device = x.device.type
    autocast = autocast_on(x)
    needs_grad = tuple(t is not None and t.requires_grad for t in tensors)
    train: bool | str = torch.is_grad_enabled() and any(needs_grad)
    if train and routine.makes_kernels and recompute.enabled(x, *tensors[1:]):
        train = "recompute"  # the kernels' algorithms pay for making them again in the backward: another choice
    return (name, device, x.dtype, autocast, train, needs_grad)


def conv_shape_key(x: torch.Tensor, weight_shape: Sequence[int], stride, padding, dilation, groups: int,
                   flags: tuple[str, ...] = ()) -> tuple:
    """The shape part of a key for a convolution-like routine: the input's size class, the weight's shape,
    the geometry and flags (bias, spatial, ...)."""
    return (input_shape_class(x.shape), tuple(weight_shape), stride, padding, dilation, groups, flags)


def input_shape_class(shape: Sequence[int]) -> tuple:
    """Batch and channels exactly, the spatial size as its pixel count rounded to a power of sqrt(2).

    Why a class and not the exact size: detection feeds every batch at another padded size (multi-scale
    training, per-image aspect ratios), and measuring each new size anew would cost more than any choice saves
    (on 2 CPU cores the toy Mask R-CNN ran 3-10x slower). The algorithms' relative speed changes smoothly with
    the pixel count, so sizes within a factor of ~1.2 share a choice. A classification run, whose sizes are
    fixed, measures each of them as before.
    """
    if len(shape) < 3:
        return tuple(shape)
    pixels = math.prod(shape[2:])
    bucket = round(2 * math.log2(pixels)) / 2 if pixels > 0 else 0
    return (shape[0], shape[1], bucket)


def describe(key: tuple) -> str:
    """A key as a readable string: "per_sample_conv2d cpu float32 train grad:111 x16x64xpx2^11.5 w16x64x64x3x3
    s1x1 p1x1 d1x1 g1 bias" (autocast, when on, after the dtype; flags last)."""
    name, device, dtype, autocast, train, needs_grad, shape_class, weight, stride, padding, dilation, groups, flags \
        = key
    grads = "grad:" + "".join("1" if g else "0" for g in needs_grad)
    if len(shape_class) == 3:
        size = f"x{shape_class[0]}x{shape_class[1]}xpx2^{shape_class[2]:g}"
    else:
        size = "x" + "x".join(map(str, shape_class))
    geometry = [f"{label}{_pair_str(value)}" for label, value in (("s", stride), ("p", padding), ("d", dilation))]
    mode = {True: "train", "recompute": "train-recompute"}.get(train, "infer")
    parts = [name, device, str(dtype).removeprefix("torch."), *(["autocast"] if autocast else []), mode, grads,
             size, "w" + "x".join(map(str, weight)), *geometry, f"g{groups}", *flags]
    return " ".join(str(part) for part in parts)


def _pair_str(value) -> str:
    return f"{value}x{value}" if isinstance(value, int) else "x".join(map(str, value))


def _time_candidates(candidates: dict[str, Callable[..., torch.Tensor]],
                     inputs: Tensors) -> tuple[dict[str, list[float]], int, bool]:
    """Each candidate's timed milliseconds, the rounds run, and whether the measurement was clean.

    One warm call each, then rounds of one timed call per candidate. The candidates alternate (A, B, A, B, ...) so
    that a burst of load from another process hits all of them rather than whichever happened to run then; the
    minimum is what counts, as noise only ever adds time. After `MEASURE_REPEATS` rounds it stops as soon as the
    same candidate led the last two rounds and its two best timings agree within `STABLE_SPREAD` (clean); else it
    goes on up to `MEASURE_MAX_ROUNDS` (not clean, if still unsettled). A candidate that fails (e.g. out of memory
    on the GPU) is dropped.
    """
    train = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs)
    with recompute.shielded():  # a layer's recomputed kernels must not see the candidates' saved tensors
        return _time_rounds(candidates, inputs, train)


def _time_rounds(candidates, inputs: Tensors, train: bool) -> tuple[dict[str, list[float]], int, bool]:
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

    samples: dict[str, list[float]] = {}
    for name, fn in candidates.items():
        try:
            call(fn)  # warm: lazy initialisation, allocator, and any nested routine's own measurement
        except (RuntimeError, MemoryError):  # e.g. CUDA out of memory: this candidate cannot win
            continue
        samples[name] = []
    running, leaders, rounds = list(samples), [], 0
    while running and rounds < max(MEASURE_MAX_ROUNDS, MEASURE_REPEATS):
        for name in running:
            _synchronize(device)
            start = timer()
            call(candidates[name])
            _synchronize(device)
            samples[name].append(1000.0 * (timer() - start))
        rounds += 1
        best = {name: min(samples[name]) for name in running}
        fastest = min(best.values())
        running = [name for name in running if best[name] <= DROP_FACTOR * fastest]
        leaders.append(min(best, key=best.get))
        if rounds >= MEASURE_REPEATS and _settled(samples, leaders, running):
            return samples, rounds, True
    return samples, rounds, bool(leaders) and _settled(samples, leaders, running)


def _settled(samples: dict[str, list[float]], leaders: list[str], running: list[str]) -> bool:
    """The leader is decided (the same in the last two rounds, or the only candidate left) and its two best
    timings agree within `STABLE_SPREAD`."""
    leader = leaders[-1]
    decided = len(running) == 1 or (len(leaders) >= 2 and leaders[-2] == leader)
    return decided and _agree(samples[leader])


def _agree(values: list[float]) -> bool:
    if len(values) < 2:
        return False
    first, second = sorted(values)[:2]
    return second <= STABLE_SPREAD * first


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
