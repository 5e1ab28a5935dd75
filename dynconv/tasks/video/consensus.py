"""An image backbone under task=video: TSN's per-frame network with the average consensus (Wang et al., "Temporal
Segment Networks", ECCV 2016, Sec. 3.1).

Every frame of the clip goes through the 2-D backbone as one image, and the clip's logits are the mean of its frames'
logits. This is exactly TSM without the shift (TSM's own baseline, "TSN"), so `backbone=resnet50 task=video` is
the ablation of `backbone=tsm_resnet50`: an order-blind model, which cannot tell "Swiping Left" from "Swiping
Right" (nor the toy data's directions) however well it sees each frame. Any backbone x operator x attention that
classifies images works here unchanged: dynamic operators then compute their kernels per frame.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from dynconv.backbones import Backbone
from dynconv.backbones.clip_frames import average_over_frames, clip_as_frames


class FrameAverage(nn.Module):
    """clips (B, C, T, H, W) -> mean over t of backbone(frame t), (B, classes)."""

    def __init__(self, backbone: Backbone):
        super().__init__()
        self.backbone = backbone

    def forward(self, clips: torch.Tensor) -> torch.Tensor:
        frames, count = clip_as_frames(clips, self.backbone.name)
        return average_over_frames(self.backbone(frames), count)
