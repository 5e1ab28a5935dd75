"""Peak memory of one model's training step or inference at a batch, measured in a fresh child process.

`scripts/bench.py bench.mode=memory` reports it for a model and for its static twin, training and inference
separately, as KernelWarehouse's Table 16 (training memory at batch 128 / 32, inference memory at batch 100) and
Weight Excitation's Table 1 (both at batch 128) do. Why one child process per (model, train|inference):

- On the CPU the only peak there is, the process's peak resident set (VmHWM), counts everything the process ever
  touched: the other model, the allocator's retained free memory, the first of the two measurements. A fresh
  process holds only this model, so its peak is this model's.
- The selector (dynconv/functional/selector.py) times every candidate algorithm on a layer shape's first call;
  those candidates' buffers are not what training needs. So the child runs one step first (the selection pass),
  then drops the gradients and optimizer state, returns freed memory to the OS (glibc `malloc_trim`) and only
  then takes its baseline and resets the peak. A static model gets the same pass, so both sides are alike.

What is reported (`MEASURES`):

- `cpu_peak_rss_growth`: VmHWM - VmRSS over the warm and measured steps, the baseline taken after the model and
  its input exist: what a step adds (activations kept for the backward, gradients, SGD momentum, temporaries,
  library workspaces). The peak is reset by writing 5 to /proc/self/clear_refs (Linux >= 4.0); where that is
  not possible the child falls back to ru_maxrss, which cannot be reset and so may include the build, and says
  so (`peak_reset`). Parameters and buffers are reported beside it (`model_bytes`, counted, not measured).
- `cuda_max_allocated`: torch.cuda.max_memory_allocated over the same steps, in a process where nothing but this
  model, its input and its step are allocated: what `CudaPeakMemory` approximates for two resident models by
  subtracting the other's tensors. It includes the model's own parameters (the GPU figure the papers print, less
  the CUDA context and the caching allocator's slack).

Training is `benchmark.training_step` (forward, cross-entropy, backward, SGD with momentum); inference is
`benchmark.inference_step` on the model as deployed (`benchmark.inference_model`: Weight Excitation folded).
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

MEASURES = {"cpu": "cpu_peak_rss_growth", "cuda": "cuda_max_allocated"}
KINDS = ("train", "inference")
_PACKAGE_PARENT = Path(__file__).resolve().parents[1]


def measure(spec: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
    """Run one measurement in a fresh Python process; its result dict, or {"error": why} when the child failed
    (an out-of-memory kill included: at the papers' batch sizes that is a result, not a crash of the suite).

    `spec`: backbone, op, attn (resolved config sections), kind (train | inference), batch, resolution,
    num_classes, device (cpu | cuda), warmup, steps, policy (the selector's, as the parent runs it), kernel_memory
    (likewise)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(_PACKAGE_PARENT), *filter(None, [env.get("PYTHONPATH")])])
    env["PYTHONUNBUFFERED"] = "1"
    try:
        completed = subprocess.run([sys.executable, "-m", "dynconv.peak_memory"], input=json.dumps(spec),
                                   capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    result = _last_json(completed.stdout)
    if completed.returncode == 0 and result is not None:
        return result
    why = f"exit {completed.returncode}"
    if completed.returncode in (-9, 137):
        why += " (killed by SIGKILL: most likely out of memory)"
    tail = [line for line in completed.stderr.splitlines() if line.strip()]
    return {"error": why + (f": {tail[-1].strip()}" if tail else "")}


def _last_json(stdout: str) -> dict | None:
    for line in reversed(stdout.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                return None
    return None


def tensor_bytes(model) -> int:
    """Bytes of a model's parameters and buffers (shared storages once), on any device."""
    seen, total = set(), 0
    for tensor in [*model.parameters(), *model.buffers()]:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


def _status_kb(field: str) -> int | None:
    """A field of /proc/self/status in KiB (VmRSS, VmHWM); None off Linux."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current VmRSS (Linux >= 4.0); False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def _trim() -> None:
    """Hand freed heap memory back to the OS (glibc), so the baseline is what is live, not what was once used."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the allocator keeps what it keeps
        pass


def _max_rss_bytes() -> int:
    """ru_maxrss, the peak resident set since the process started (or since the last reset), in bytes."""
    import resource  # Unix only

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def _rss_bytes() -> int:
    kb = _status_kb("VmRSS")
    return _max_rss_bytes() if kb is None else kb * 1024  # not Linux: ru_maxrss is the only figure


def run_child(spec: dict[str, Any]) -> dict[str, Any]:
    """The measurement itself (in the child process): build, selection pass, baseline, reset, steps, peak."""
    import torch

    from dynconv import benchmark as bm
    from dynconv.build import build_backbone
    from dynconv.functional import recompute, selector

    started = time.perf_counter()
    selector.set_policy(spec.get("policy", "measure"))
    recompute.set_kernel_memory(spec.get("kernel_memory", "auto"))
    device = torch.device(spec["device"])
    torch.manual_seed(0)
    built = build_backbone(spec["backbone"], spec["op"], spec["attn"], num_classes=spec["num_classes"],
                           image_size=spec["resolution"])
    converted = sum(d.converted for d in built.decisions)
    model = built.backbone.to(device)
    del built
    batch, side, kind = spec["batch"], spec["resolution"], spec["kind"]
    inputs = torch.randn(batch, 3, side, side, device=device)
    folded = False
    if kind == "train":
        targets = torch.randint(0, spec["num_classes"], (batch,), device=device)

        def fresh_step():
            return bm.training_step(model, inputs, targets, bm.make_optimizer(model), spec.get("amp"))
    else:
        model, folded = bm.inference_model(model)  # the original is dropped: only the deployed model stays

        def fresh_step():
            return bm.inference_step(model, inputs, spec.get("amp"))
    step = fresh_step()
    step()  # the selection pass: the selector's candidate timings and one-off initialisation, not measured
    model.zero_grad(set_to_none=True)
    step = fresh_step()  # a new optimizer: no momentum yet, as before a first step
    _trim()
    bm.synchronize(device)
    peak_reset = None
    if device.type == "cuda":
        baseline = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    else:
        baseline = _rss_bytes()
        peak_reset = "clear_refs" if _reset_peak_rss() else "ru_maxrss"
    for _ in range(spec["warmup"] + spec["steps"]):
        step()
    bm.synchronize(device)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        growth = peak - baseline
    else:
        hwm_kb = _status_kb("VmHWM") if peak_reset == "clear_refs" else None
        high = hwm_kb * 1024 if hwm_kb is not None else _max_rss_bytes()
        growth = max(0, high - baseline)
        peak = growth
    return {
        "kind": kind,
        "measure": MEASURES[device.type],
        "peak_bytes": int(peak),
        "growth_bytes": int(growth),
        "baseline_bytes": int(baseline),
        "model_bytes": tensor_bytes(model),
        "input_bytes": inputs.numel() * inputs.element_size(),
        "peak_reset": peak_reset,
        "inference_folded": folded,
        "converted_layers": converted,
        "batch": batch,
        "resolution": side,
        "warmup": spec["warmup"],
        "steps": spec["steps"],
        "threads": torch.get_num_threads(),
        "pid": os.getpid(),
        "seconds": round(time.perf_counter() - started, 1),
    }


if __name__ == "__main__":
    print(json.dumps(run_child(json.loads(sys.stdin.read()))))
