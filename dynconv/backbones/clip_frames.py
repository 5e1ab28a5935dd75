"""A clip as a batch of frames for a 2-D network, and the clip's score as the average of its frames' scores.

TSN's segmental consensus (Wang et al., "Temporal Segment Networks", ECCV 2016, Sec. 3.1: the "average" consensus
function) and TSM (Lin et al., "TSM: Temporal Shift Module for Efficient Video Understanding", ICCV 2019, Sec. 3,
which keeps TSN's framework): a 2-D network sees every frame of a (B, C, T, H, W) clip as one image of a batch of
B x T, and the clip's logits are the mean of its T frames' logits. Both TSM's backbones (`tsm.py`) and the video
task's per-frame wrapper for image backbones (`dynconv/tasks/video/consensus.py`) use these two functions, so the
two foldings cannot disagree on the order of the frames.
"""

from __future__ import annotations

import torch


def clip_as_frames(clips: torch.Tensor, backbone_name: str) -> tuple[torch.Tensor, int]:
    """(B, C, T, H, W) -> ((B * T, C, H, W), T): frame t of clip b is image b * T + t (the frames of a clip are
    neighbours, which the temporal shift relies on)."""
    if clips.dim() != 5:
        raise ValueError(f"backbone {backbone_name} takes video clips shaped (batch, channels, frames, height, "
                         f"width); got a tensor of shape {tuple(clips.shape)} (task=video reads clips)")
    batch, channels, frames, height, width = clips.shape
    return clips.transpose(1, 2).reshape(batch * frames, channels, height, width), frames


def average_over_frames(frame_logits: torch.Tensor, frames: int) -> torch.Tensor:
    """(B * T, K) per-frame logits -> (B, K): the average consensus."""
    return frame_logits.view(-1, frames, *frame_logits.shape[1:]).mean(dim=1)
