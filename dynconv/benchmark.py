"""Operator speed: a dynamic model against its static twin, timed interleaved in one process.

Used by `scripts/bench.py`. Kept free of config handling so notebooks and other scripts can time any pair
of modules the same way.

Why the measurements look the way they do:

- Interleaved repeats (A, B, A, B, ...) after a warmup: CPU frequency, thermal state and other load drift
  over minutes; alternating the two models spreads that drift over both instead of biasing whichever ran
  second. The median over repeats discards the occasional repeat hit by a hiccup.
- `time.perf_counter` around `steps` iterations, with `torch.cuda.synchronize` at both ends on CUDA (kernels
  run asynchronously, so without it the clock would stop while the GPU is still working) and never inside
  the loop (a per-iteration sync would add a stall the real training loop does not have).
- The training step is forward + cross-entropy + backward + `SGD(momentum=0.9, fused=True).step()`, the whole cost of
  one optimizer step; dynamic operators add parameters (experts, routing), so the optimizer step differs too.
- Inference runs in eval mode under `torch.no_grad()`, at the benchmark batch and at batch 1 (deployment
  latency, where a dynamic operator cannot amortise its per-sample kernel generation over a batch).
  A model with training-only reparameterisations is folded first (`inference_model`), as it is deployed.
- `amp` ("bf16", "fp16"): both models' forward (and loss) run under `torch.autocast`, as train.py's `recipe.amp`
  runs them, fp16 with a gradient scaler like the trainer's. Mixed precision is how GPUs train (timm's published
  benchmark files, the anchor of docs/benchmarks.md, are AMP runs) and what CPUs with bfloat16 matrix units
  (AMX) are fastest at; the ratio to static changes with it, since the dynamic operators' extra work is mostly
  memory traffic, which autocast shrinks less than the convolutions' arithmetic.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from dynconv.precision import AMP_DTYPES, autocast


BENCH_DEVICES = ("auto", "cpu", "cuda")
# Smallest sensible value of each integer knob. Resolution: a ResNet/MobileNet downsamples 32x, so 32px is
# where the last stage still sees a 1x1 map. Warmup may be 0 (the first repeat then pays one-off costs).
BENCH_MINIMUMS = {"batch": 1, "resolution": 32, "repeats": 1, "steps": 1, "warmup": 0, "num_classes": 1}
# What each bench.mode times: "full" the training step and inference at the bench batch and at batch 1;
# "latency" batch-1 eval inference only (deployment latency, DyNet's Table 2), nothing else to wait for;
# "inference" eval inference at the inference batch only (throughput, KernelWarehouse's Table 12 FPS at batch 100);
# "memory" times nothing: it measures peak memory instead (dynconv/peak_memory.py; KernelWarehouse's Table 16,
# Weight Excitation's Table 1).
BENCH_MODES = {"full": ("train", "inference", "batch1"), "latency": ("batch1",), "inference": ("inference",),
               "memory": ()}


def check_run_settings(settings: Mapping[str, Any], context: str = "") -> None:
    """The settings one measurement runs with (`bench.batch`, `bench.mode`, ...): the bench section itself, or a
    suite row's merged settings (`context` then says which suite and row, after the message)."""
    from dynconv.config import ConfigError
    from dynconv.knobs import Knobs

    knobs = Knobs(settings, "bench", error=ConfigError)
    try:
        for key, minimum in BENCH_MINIMUMS.items():
            if key in settings:
                knobs.integer(key, low=minimum)
        knobs.integer("inference_batch", low=1, nullable=True)
        knobs.choice("mode", tuple(BENCH_MODES), default="full")
    except ConfigError as error:
        raise ConfigError(f"{error}{context}") from None


def validate_policies(cfg) -> None:
    """The training config's `conv_algorithm` and `kernel_memory`, which the benchmark applies as train.py does:
    ConfigError naming the key and the allowed values."""
    from omegaconf import OmegaConf

    from dynconv.config import ConfigError
    from dynconv.config_checks import TOP_LEVEL, Section, check_section

    policies = {key: TOP_LEVEL[key] for key in ("conv_algorithm", "kernel_memory")}
    plain = {key: OmegaConf.select(cfg, key, default=None) for key in policies}
    check_section({key: value for key, value in plain.items() if value is not None}, Section("", policies, required=()),
                  ConfigError)


def validate_bench_config(bench: Mapping[str, Any], check_device: bool = True) -> None:
    """Reject `bench.*` values that cannot run (or would time nothing) before anything is built.

    Raises ConfigError naming the key and the allowed values, as every other config check does.
    `check_device=False` leaves out whether the device is there (composing a documented CUDA command on a CPU).
    """
    from dynconv.config import ConfigError
    from dynconv.knobs import Knobs

    knobs = Knobs(bench, "bench", error=ConfigError)
    for key, minimum in BENCH_MINIMUMS.items():
        knobs.integer(key, low=minimum)
    check_run_settings(bench)
    device = knobs.choice("device", BENCH_DEVICES)
    if check_device and device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("bench.device='cuda' but no CUDA device is available; allowed values here: auto, cpu")
    amp = knobs.choice("amp", tuple(AMP_DTYPES), default="none")  # train.py's recipe.amp; fp16 on CUDA only
    on_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if check_device and amp == "fp16" and not on_cuda:
        raise ConfigError(f"bench.amp='fp16' runs on CUDA only, and bench.device={device!r} runs on the CPU here; "
                          "allowed values here: none, bf16")
    knobs.flag("layers")
    layer = bench.get("layer")
    if layer is not None and not isinstance(layer, str):
        raise knobs.fail("layer", layer, "null or an fnmatch pattern of converted layer names")
    mode = bench.get("mode", "full")
    if mode == "memory" and (bench.get("layers") or layer is not None):
        raise ConfigError("bench.layers/bench.layer time layers, which bench.mode='memory' does not; allowed values "
                          "with bench.mode=memory: bench.layers=false, bench.layer=null")
    _validate_suite_keys(bench, knobs)
    baseline = bench.get("baseline")
    if baseline is not None:
        from dynconv.backbones import BACKBONES

        if not isinstance(baseline, str) or baseline not in BACKBONES:
            raise knobs.fail("baseline", baseline, f"null (the same backbone) or a backbone name: "
                             f"{', '.join(BACKBONES.names())}")
        if bench.get("layers") or layer is not None:
            raise ConfigError(f"bench.baseline={baseline!r} cannot be combined with bench.layers/bench.layer (layers "
                              "are compared by name with the same backbone); allowed values here: null")


def _validate_suite_keys(bench: Mapping[str, Any], knobs) -> None:
    """bench.suite (a file of configs/bench_suites/), bench.rows and bench.out (which only a suite reads)."""
    from dynconv.bench_suites import suite_names
    from dynconv.config import ConfigError

    suite = bench.get("suite")
    if suite is not None:
        names = suite_names()
        if not isinstance(suite, str) or suite not in names:
            raise knobs.fail("suite", suite, f"null (one model against op=static) or a suite: {', '.join(names)}")
        if bench.get("layers") or bench.get("layer") is not None:
            raise ConfigError(f"bench.suite={suite!r} cannot be combined with bench.layers/bench.layer (time one model's "
                              "layers without a suite); allowed values with a suite: bench.layers=false, bench.layer=null")
        if bench.get("baseline") is not None:
            raise ConfigError(f"bench.suite={suite!r} names each row's static model itself; allowed values of "
                              "bench.baseline with a suite: null")
    for key, example in (("rows", "[condconv8,kw1]"), ("out", "benchmarks/resnet18")):
        value = bench.get(key)
        if value is None:
            continue
        if suite is None:
            raise knobs.fail(key, value, f"null (bench.{key} is read only with bench.suite=<name>)")
        if key == "rows":
            knobs.strings(key, example=example)
            if not value:
                raise knobs.fail(key, list(value), f"null (every row) or a non-empty list of row ids or fnmatch "
                                                   f"patterns, e.g. {example}")
        else:
            knobs.text(key)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step: Callable[[], None], steps: int, device: torch.device) -> float:
    """Milliseconds per call of `step`, averaged over `steps` back-to-back calls."""
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    return 1000.0 * (time.perf_counter() - start) / steps


@dataclass
class Timed:
    """Per-repeat milliseconds of one measurement of one candidate; `ms` is their median."""

    samples: list[float] = field(default_factory=list)

    @property
    def ms(self) -> float:
        return statistics.median(self.samples)


def interleaved(
    candidates: dict[str, dict[str, Callable[[], None]]],
    *,
    device: torch.device,
    repeats: int,
    warmup: int,
    steps: int,
    on_repeat: Callable[[int, dict[str, dict[str, Timed]]], None] | None = None,
    around: Callable[[str], ContextManager] | None = None,
) -> dict[str, dict[str, Timed]]:
    """Time every measurement of every candidate, candidates alternating within each repeat.

    `candidates` maps candidate -> measurement -> step callable, e.g. {"static": {"train": f, ...},
    "dynamic": {...}}; all candidates must offer the same measurements. The order within a repeat is
    measurement by measurement, candidate by candidate (train A, train B, infer A, infer B, ...), so each
    comparison is between two runs seconds apart. `warmup` untimed calls of every step come first (lazy
    allocations, cuDNN/oneDNN algorithm selection, allocator caches). `around(name)` optionally returns a
    context manager entered around each candidate's runs (peak-memory accounting).
    """
    names = list(candidates)
    measurements = list(candidates[names[0]])
    for name in names:
        if list(candidates[name]) != measurements:
            raise ValueError(f"candidate {name!r} offers {list(candidates[name])}, expected {measurements}")
    for name in names:
        with around(name) if around else contextlib.nullcontext():
            for measurement in measurements:
                for _ in range(warmup):
                    candidates[name][measurement]()
    results = {name: {m: Timed() for m in measurements} for name in names}
    for repeat in range(repeats):
        for measurement in measurements:
            for name in names:
                with around(name) if around else contextlib.nullcontext():
                    results[name][measurement].samples.append(
                        time_steps(candidates[name][measurement], steps, device))
        if on_repeat:
            on_repeat(repeat, results)
    return results


def images_per_second(batch: int, ms: float | None) -> float | None:
    """Throughput (FPS, images/s) of a measurement that handles `batch` images in `ms` milliseconds: what
    KernelWarehouse's Table 12 reports (inference at batch 100)."""
    return None if ms is None else round(1000.0 * batch / ms, 3)


def training_step(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor,
                  optimizer: torch.optim.Optimizer, amp: str | None = None) -> Callable[[], None]:
    """One optimizer step on a fixed batch: forward, cross-entropy, backward, SGD step (train mode); under
    `amp` the forward and loss run in autocast (fp16 with a gradient scaler, as the trainer does)."""
    scaler = torch.amp.GradScaler(inputs.device.type) if amp == "fp16" else None

    def step() -> None:
        model.train()
        optimizer.zero_grad(set_to_none=True)
        with autocast(inputs.device, amp):
            loss = F.cross_entropy(model(inputs), targets)
        if scaler is None:
            loss.backward()
            optimizer.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()

    return step


def inference_step(model: nn.Module, inputs: torch.Tensor, amp: str | None = None) -> Callable[[], None]:
    """One forward pass in eval mode without autograd (what deployment runs), in autocast under `amp`."""

    def step() -> None:
        model.eval()
        with torch.no_grad(), autocast(inputs.device, amp):
            model(inputs)

    return step


def inference_model(model: nn.Module) -> tuple[nn.Module, bool]:
    """The model inference is timed on, and whether it was folded.

    Training-only reparameterisations (weight parametrizations such as Weight Excitation's, modules defining
    `fold_for_inference`) are folded away before deployment, so timing them unfolded would charge inference for
    work it never does: such a model is timed as `dynconv.profiling.fold_for_inference` returns it (a copy;
    the training steps keep the original). Anything else is timed as it is.
    """
    from torch.nn.utils import parametrize

    from dynconv.profiling import fold_for_inference

    foldable = any(parametrize.is_parametrized(module) or callable(getattr(module, "fold_for_inference", None))
                   for module in model.modules())
    return (fold_for_inference(model), True) if foldable else (model, False)


def make_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    """SGD with momentum, the papers' ImageNet optimizer: one state tensor per parameter, like most recipes; fused,
    as train.py builds it (`engine.training_run.FUSED_SGD`)."""
    return torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, fused=True)


class CudaPeakMemory:
    """Peak CUDA memory of one candidate while both candidates stay resident on the same GPU.

    `torch.cuda.max_memory_allocated` counts everything on the device, including the other model's
    parameters, gradients and optimizer state. Each scope therefore resets the peak, notes what was
    allocated on entry that does not belong to this candidate (`owned()` returns the bytes the candidate
    itself keeps resident: parameters, buffers, gradients, optimizer state) and records
    peak - foreign bytes. The result is what this model needs on a GPU of its own (plus the shared input).
    """

    def __init__(self, device: torch.device, owned: dict[str, Callable[[], int]]):
        self.device, self.owned = device, owned
        self.peak_bytes: dict[str, int] = {name: 0 for name in owned}

    def __call__(self, name: str):
        meter = self

        class Scope:
            def __enter__(self):
                synchronize(meter.device)
                torch.cuda.reset_peak_memory_stats(meter.device)
                self.foreign = torch.cuda.memory_allocated(meter.device) - meter.owned[name]()
                return self

            def __exit__(self, *exc):
                synchronize(meter.device)
                peak = torch.cuda.max_memory_allocated(meter.device) - self.foreign
                meter.peak_bytes[name] = max(meter.peak_bytes[name], peak)
                return False

        return Scope()


def resident_bytes(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> int:
    """Bytes of the tensors a model keeps between steps: parameters, buffers, gradients, optimizer state."""
    seen: set[int] = set()
    total = 0

    def add(tensor) -> None:
        nonlocal total
        if isinstance(tensor, torch.Tensor) and tensor.device.type == "cuda":
            key = tensor.untyped_storage().data_ptr()
            if key not in seen:
                seen.add(key)
                total += tensor.untyped_storage().nbytes()

    for tensor in list(model.parameters()) + list(model.buffers()):
        add(tensor)
        add(tensor.grad)
    if optimizer is not None:
        for state in optimizer.state.values():
            for value in state.values():
                add(value)
    return total


# ------------------------------------------------------------------------------------------- per layer


def capture_input_shapes(model: nn.Module, names: Sequence[str], inputs: torch.Tensor) -> dict[str, tuple]:
    """The input shape of each named submodule (`model.get_submodule(name)`) during one forward pass.

    Forward pre-hooks see the real tensors, so the shapes are exactly what the layer gets at this batch and
    resolution (after strides, pooling and any reshaping by the backbone), without re-deriving them.
    """
    shapes: dict[str, tuple] = {}
    handles = []
    for name in names:
        def hook(module, args, name=name):
            shapes.setdefault(name, tuple(args[0].shape))
        handles.append(model.get_submodule(name).register_forward_pre_hook(hook))
    try:
        model.eval()
        with torch.no_grad():
            model(inputs)
    finally:
        for handle in handles:
            handle.remove()
    missing = [name for name in names if name not in shapes]
    if missing:
        raise RuntimeError(f"layers never called during the forward pass: {', '.join(missing)}")
    return shapes


def layer_steps(layer: nn.Module, shape: tuple, device: torch.device,
                amp: str | None = None) -> dict[str, Callable[[], None]]:
    """Training (forward + backward, input gradient included as inside a network) and inference steps of
    one layer alone on a fixed random input of `shape`, in autocast under `amp`. No optimizer step: per layer it
    is a handful of elementwise updates and would only blur the comparison of the operators' compute."""
    x = torch.randn(shape, device=device)
    x_grad = x.clone().requires_grad_(True)

    def train() -> None:
        layer.train()
        layer.zero_grad(set_to_none=True)
        x_grad.grad = None
        with autocast(device, amp):
            out = layer(x_grad)
        out.float().sum().backward()

    def infer() -> None:
        layer.eval()
        with torch.no_grad(), autocast(device, amp):
            layer(x)

    return {"train": train, "inference": infer}
