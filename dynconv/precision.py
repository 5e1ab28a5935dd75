"""Mixed precision: the autocast dtype of each `amp` setting, for training (`recipe.amp`) and for the benchmarks
(`bench.amp`), so that both run a model in the same precision. fp16 needs CUDA (and a gradient scaler in training);
bf16 runs on CPUs too (fast where they have bfloat16 matrix units, AMX)."""

from __future__ import annotations

import contextlib
from typing import ContextManager

import torch

# The keys are config_checks.AMP_MODES (kept torch-free there; tests/test_bench.py checks they agree).
AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def amp_dtype(amp: str | None) -> torch.dtype | None:
    """The autocast dtype of an `amp` setting; None for "none" (or None): no autocast."""
    return AMP_DTYPES[amp or "none"]


def autocast(device: torch.device, amp: str | None) -> ContextManager:
    """`torch.autocast` on `device` in the precision of `amp`; a null context for "none"."""
    dtype = amp_dtype(amp)
    return contextlib.nullcontext() if dtype is None else torch.autocast(device_type=device.type, dtype=dtype)
