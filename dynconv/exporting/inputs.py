"""The inputs an export is traced and checked with, the eager model's outputs on them, and the distance between
an export's outputs and those."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from dynconv.functional import selector

DEFAULT_BATCH_SIZES = (1, 3, 8)
DEFAULT_TOLERANCE = 1e-4  # max abs difference to eager, float32
# torch.export specialises a dimension whose example size is 0 or 1 (a size-1 dimension broadcasts, so it cannot
# stand for every size): a batch-1 example would freeze the batch. Traces therefore see at least two samples.
TRACE_BATCH = 2
CHECK_SEED = 0


def default_example(model: nn.Module) -> torch.Tensor:
    """A (2, 3, side, side) batch at the model's resolution: `model.dynconv_config["image_size"]` (dynconv.load,
    dynconv.create_model), else its `default_resolution`, else 224."""
    config = getattr(model, "dynconv_config", None) or {}
    side = int(config.get("image_size") or getattr(model, "default_resolution", 224))
    generator = torch.Generator().manual_seed(CHECK_SEED)
    return torch.randn(TRACE_BATCH, 3, side, side, generator=generator)


def trace_input(example: torch.Tensor) -> torch.Tensor:
    """The example with at least `TRACE_BATCH` samples (repeated when it has fewer)."""
    if example.dim() < 1 or example.shape[0] < 1:
        raise ValueError(f"example_input needs a batch dimension with at least one sample, got {tuple(example.shape)}")
    if example.shape[0] >= TRACE_BATCH:
        return example
    return example.repeat(TRACE_BATCH, *([1] * (example.dim() - 1)))[:TRACE_BATCH]


def check_inputs(example: torch.Tensor, batch_sizes: Sequence[int]) -> list[torch.Tensor]:
    """One N(0, 1) batch of each size, shaped, typed and placed like `example`; seeded, so reruns compare alike."""
    generator = torch.Generator().manual_seed(CHECK_SEED)
    return [torch.randn(size, *example.shape[1:], generator=generator, dtype=example.dtype).to(example.device)
            for size in batch_sizes]


def eager_outputs(model: nn.Module, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The eager model's outputs, under the cost model: no timing (every algorithm is exact, so the choice
    cannot move the reference beyond rounding)."""
    with torch.no_grad(), selector.policy("model"):
        return [_tensor_output(model(x)) for x in inputs]


def _tensor_output(output) -> torch.Tensor:
    if not isinstance(output, torch.Tensor):
        raise TypeError(f"export checks models with one output tensor (classification logits), got {type(output)}")
    return output


def max_abs_diff(outputs: Sequence[torch.Tensor], references: Sequence[torch.Tensor]) -> float:
    """The largest |export - eager| over every batch; infinite where a shape differs (a frozen dimension)."""
    worst = 0.0
    for output, reference in zip(outputs, references, strict=True):
        if tuple(output.shape) != tuple(reference.shape):
            return float("inf")
        worst = max(worst, (output.detach().cpu().double() - reference.detach().cpu().double()).abs().max().item())
    return worst
