"""The temporal shift of TSM (Lin et al., "TSM: Temporal Shift Module for Efficient Video Understanding", ICCV 2019).

Sec. 3: a 2-D network sees the T frames of a clip as T images; before a convolution, part of the channels is moved
one frame along time, so the convolution mixes information of neighbouring frames at no extra cost. With
`shift_div` = 8 (the paper's choice: 1/4 of the channels shifted, 1/8 in each direction):

    channels [0, C/8):       frame t takes frame t+1's values (shifted one step back in time)
    channels [C/8, C/4):     frame t takes frame t-1's values (shifted one step forward in time)
    channels [C/4, C):       unchanged

A value shifted past either end of the clip is dropped and the vacated frame gets zeros (the paper's zero padding,
not a circulant shift). The paper's "residual shift" (rather than the in-place one): the shift sits in the residual
branch, before the block's first convolution, so the shortcut still carries every frame's own features unchanged.

How it is put into timm's blocks without renaming anything (`add_residual_shift`): the block's class becomes a
subclass of timm's (`TemporalShiftBasicBlock` / `TemporalShiftBottleneck`, still `isinstance` of timm's, so the
attention add-ons' sites still find them) whose forward runs timm's own forward with a one-call forward pre-hook on
whatever module is the block's `conv1` at that moment, which shifts that convolution's input. The placement rules,
the state-dict keys and KernelWarehouse's layouts therefore see exactly timm's ResNet, and an operator that replaces
`conv1` (a CondConv2d, a KWConv2d) gets the shifted input just the same. The shift holds no parameters.

T is known only from the data (`data.num_frames`): the backbone's forward folds the clip and tells every shift
module T (`segments`) for the duration of that forward (`tsm.py`).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn as nn
from timm.models.resnet import BasicBlock, Bottleneck


def temporal_shift(frames: torch.Tensor, segments: int, shift_div: int) -> torch.Tensor:
    """Shift (N * T, C, H, W) frames (T consecutive frames per clip) as the module doc says; returns a new tensor."""
    total, channels = frames.shape[:2]
    if total % segments:
        raise ValueError(f"temporal shift: {total} frames are not whole clips of {segments} frames")
    clips = frames.reshape(total // segments, segments, *frames.shape[1:])
    fold = channels // shift_div
    shifted = torch.zeros_like(clips)
    shifted[:, :-1, :fold] = clips[:, 1:, :fold]  # back in time: t sees t+1; the last frame gets zeros
    shifted[:, 1:, fold:2 * fold] = clips[:, :-1, fold:2 * fold]  # forward in time: t sees t-1; the first gets zeros
    shifted[:, :, 2 * fold:] = clips[:, :, 2 * fold:]
    return shifted.reshape(frames.shape)


class TemporalShift(nn.Module):
    """The shift as a module (no parameters): `shift_div` from the config, `segments` (T) set by the backbone's
    forward for each clip batch (`segments_of`)."""

    def __init__(self, shift_div: int):
        super().__init__()
        self.shift_div = int(shift_div)
        self.segments: int | None = None

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        if self.segments is None:
            raise RuntimeError("the temporal shift needs the clip length: run the TSM backbone on clips (B, C, T, H, "
                               "W), whose forward folds them and sets it (calling backbone.net on frames does not)")
        return temporal_shift(frames, self.segments, self.shift_div)

    def extra_repr(self) -> str:
        return f"shift_div={self.shift_div} (1/{self.shift_div} of the channels each way)"


class _ShiftFirstConvInput:
    """Mixin for timm's blocks: timm's forward, with the residual branch's first convolution fed shifted frames."""

    temporal_shift: TemporalShift

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Looked up now, not at construction: an operator may have replaced conv1 since.
        handle = self.conv1.register_forward_pre_hook(self._shift_input)
        try:
            return super().forward(x)
        finally:
            handle.remove()

    def _shift_input(self, conv: nn.Module, args: tuple) -> tuple:
        return (self.temporal_shift(args[0]), *args[1:])


class TemporalShiftBasicBlock(_ShiftFirstConvInput, BasicBlock):
    """timm's BasicBlock with TSM's residual shift before conv1 (ResNet18/34)."""


class TemporalShiftBottleneck(_ShiftFirstConvInput, Bottleneck):
    """timm's Bottleneck with TSM's residual shift before conv1 (ResNet50 and deeper: TSM's networks)."""


_SHIFTED = {BasicBlock: TemporalShiftBasicBlock, Bottleneck: TemporalShiftBottleneck}


def add_residual_shift(net: nn.Module, shift_div: int) -> int:
    """Put the residual shift into every residual block of a timm ResNet, in place; returns how many."""
    count = 0
    for block in net.modules():
        shifted = _SHIFTED.get(type(block))
        if shifted is not None:
            block.__class__ = shifted
            block.temporal_shift = TemporalShift(shift_div)
            count += 1
    if not count:
        raise ValueError(f"{type(net).__name__} has no timm BasicBlock / Bottleneck for the temporal shift")
    return count


@contextmanager
def segments_of(net: nn.Module, segments: int) -> Iterator[None]:
    """Tell every shift module of `net` the clip length T for one forward; forgotten afterwards, so a stray call on
    frames without it fails loudly instead of shifting across clips."""
    shifts = [module for module in net.modules() if isinstance(module, TemporalShift)]
    for shift in shifts:
        shift.segments = segments
    try:
        yield
    finally:
        for shift in shifts:
            shift.segments = None
