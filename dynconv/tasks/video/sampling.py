"""Which frames of a clip of n frames a sample reads (`data.sampling`).

- `dense` (R3D; Weight Excitation Sec. 4.5, "16 densely sampled frames"; Tran et al. 2018): T frames, `stride` apart,
  spanning (T - 1) x stride + 1 frames; a random start in training, the centred one in evaluation (the single centre
  clip of WE's "standard single center-crop" evaluation).
- `segments` (TSN, Wang et al. ECCV 2016, Sec. 3.2; TSM Sec. 4, which WE Sec. 4.6 calls "strided sampling"): the
  clip cut into T equal segments of n / T frames, one random frame of each in training, the middle frame of each in
  evaluation (frame int((i + 1/2) n / T) of segment i, TSN's and TSM's test frames).

A clip with fewer frames than the sampling needs (dense: the span; segments: T) raises `ClipTooShort`: the loader
skips it, counts it and names it, or stops under data.strict=true (no silent looping or repetition of frames).
Randomness comes from Python's `random`, which `SeededDataset` seeds per sample from (seed, epoch, index).
"""

from __future__ import annotations

import random

SAMPLINGS = ("dense", "segments")


class ClipTooShort(ValueError):
    """The clip has fewer frames than the sampling reads."""


def dense_indices(frame_count: int, frames: int, stride: int, training: bool) -> list[int]:
    """T consecutive frames `stride` apart: a random window in training, the centred one in evaluation."""
    span = (frames - 1) * stride + 1
    if frame_count < span:
        raise ClipTooShort(f"has {frame_count} frames, fewer than the {span} that {frames} frames {stride} apart "
                           "span (data.num_frames, data.frame_stride)")
    slack = frame_count - span
    start = random.randint(0, slack) if training else slack // 2
    return [start + step * stride for step in range(frames)]


def segment_indices(frame_count: int, frames: int, training: bool) -> list[int]:
    """One frame from each of T equal segments: random within the segment in training, its middle in evaluation."""
    if frame_count < frames:
        raise ClipTooShort(f"has {frame_count} frames, fewer than the {frames} segments asked (data.num_frames)")
    length = frame_count / frames  # >= 1: every segment holds at least one frame
    if not training:
        return [int((segment + 0.5) * length) for segment in range(frames)]  # TSN's and TSM's test offsets
    return [random.randrange(int(segment * length), int((segment + 1) * length)) for segment in range(frames)]


def frame_indices(sampling: str, frame_count: int, frames: int, stride: int, training: bool) -> list[int]:
    """The frames a sample reads, in time order."""
    if sampling == "dense":
        return dense_indices(frame_count, frames, stride, training)
    if sampling == "segments":
        return segment_indices(frame_count, frames, training)
    raise ValueError(f"data.sampling={sampling!r}; allowed values: {', '.join(SAMPLINGS)}")
