"""Keep large CPU buffers in the process instead of returning them to the OS after every use (glibc only).

Why: glibc serves every allocation above its mmap threshold (at most 32 MB by default) with a fresh mmap and
unmaps it on free. A training step allocates the same large buffers every time (per-sample kernels, im2col
columns, a ResNet's first activations: 50-150 MB each at batch 16, 224 px), so each step pays the page faults of
touching them anew: on the 2-core CPU a plain copy of 75 MB took 84 ms with fresh pages and 46 ms with reused ones.
Raising the mmap threshold and the trim threshold makes glibc keep freed memory for the next step, as a caching
allocator would (what jemalloc or tcmalloc do when preloaded, the usual advice for PyTorch on CPUs). The process
keeps its peak resident set instead of shrinking between steps.

`DYNCONV_MALLOC=retain` (what train.py and scripts/bench.py apply by default) or `default` (glibc as it is);
nothing happens on a C library without mallopt (macOS, musl).
"""

from __future__ import annotations

import ctypes
import os

ENV_VAR = "DYNCONV_MALLOC"
CHOICES = ("retain", "default")
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# Above every buffer a step allocates (the largest per-sample kernels are ~150 MB); glibc 2.36 accepts it.
_MMAP_THRESHOLD = 1 << 30
_TRIM_THRESHOLD = 2**31 - 1

_applied: str | None = None


def apply(choice: str | None = None) -> str:
    """Apply `choice` (default: $DYNCONV_MALLOC, else "retain") once per process; returns what is in force."""
    global _applied
    choice = (choice or os.environ.get(ENV_VAR) or "retain").strip().lower()
    if choice not in CHOICES:
        raise ValueError(f"{ENV_VAR}={choice!r} is invalid; allowed values: {', '.join(CHOICES)}")
    if _applied is not None or choice == "default":
        _applied = _applied or choice
        return _applied
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD) and libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD)
    except (OSError, AttributeError):
        ok = False
    _applied = "retain" if ok else "default"
    return _applied


def retaining() -> bool:
    """Whether this process keeps large buffers (`apply` put "retain" in force): freshly mapped pages then cost
    nothing, which changes which algorithms win (dynconv/ops/kw/apply.py)."""
    return _applied == "retain"
