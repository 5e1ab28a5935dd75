"""Video classification (`task=video`): action recognition (Mini-Kinetics) and gesture recognition (Jester), Weight
Excitation Sec. 4.5-4.6 / Table 6: a clip in, one label out, cross-entropy, top-1 / top-5 of the single centre clip
and crop.

The model is the backbone itself when it takes clips (R3D-18's 3-D convolutions, TSM's shifted 2-D ResNets), and an
image backbone inside TSN's per-frame average otherwise (`consensus.py`), so every backbone x operator fits. T is
`data.num_frames`: the data decides it, the backbones read it off the clip.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from dynconv.engine.distributed import all_reduce_sum
from dynconv.tasks.base import TASKS, Task
from dynconv.tasks.video.consensus import FrameAverage

# The clip length of an image backbone's MACs when no video data is configured (TSN / TSM: 8 segments).
DEFAULT_FRAMES = 8


def video_model(backbone: nn.Module) -> nn.Module:
    """The backbone if it takes clips, else the backbone per frame with the average consensus."""
    return backbone if getattr(backbone, "takes_clips", False) else FrameAverage(backbone)


@TASKS.register("video")
class VideoTask(Task):
    name = "video"
    primary_metric = "top1"
    data_kind = "video"

    def __init__(self, cfg, recipe, num_classes, data=None):
        super().__init__(cfg, recipe, num_classes, data)
        # Label smoothing where a recipe asks for it (WE's video recipes do not: recipe.smoothing=0).
        self.criterion = nn.CrossEntropyLoss(label_smoothing=float(recipe.get("smoothing", 0.0) or 0.0))

    @staticmethod
    def build_data(data_cfg, recipe, *, rank, world_size, seed):
        from dynconv.tasks.video.loaders import build_video_data

        return build_video_data(data_cfg, recipe, rank=rank, world_size=world_size, seed=seed)

    def build_model(self, backbone: nn.Module) -> nn.Module:
        return video_model(backbone)

    def prepare_batch(self, batch, device, training):
        return batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)

    def loss(self, outputs, targets):
        return self.criterion(outputs, targets)

    def result_keys(self):
        return ["top1", "top5", "loss"]

    def input_size(self, data_cfg: Mapping[str, Any]) -> tuple[int, ...]:
        side = int(data_cfg["image_size"])
        return (3, int(data_cfg["num_frames"]), side, side)

    @classmethod
    def profile(cls, cfg):
        """The model the task trains, on one clip: `profile.resolution` (default: the backbone's own side, 112 for
        R3D-18) and data.num_frames frames (default: the backbone's clip length, 16 for R3D-18, 8 for TSM)."""
        from omegaconf import OmegaConf

        from dynconv.backbones import BACKBONES
        from dynconv.profiling import profile_backbone

        frames = OmegaConf.select(cfg, "data.num_frames", default=None)
        if frames is None:
            with torch.device("meta"):
                probe = BACKBONES.get(cfg.backbone.name)(num_classes=10, image_size=32)
            frames = probe.clip_length or DEFAULT_FRAMES
        return profile_backbone(cfg, frames=int(frames), wrap=video_model)

    @torch.no_grad()
    def evaluate(self, model, loader, device, autocast, channels_last=False):
        """Top-1/top-5 (percent) and mean cross-entropy over the whole split (one centre clip, one centre crop per
        video), summed across ranks. `channels_last` does not apply: the input is a 5-D clip."""
        model.eval()
        totals = torch.zeros(4, dtype=torch.float64, device=device)  # correct1, correct5, loss_sum, count
        for batch in loader:
            if batch[0] is None:  # every clip of the batch was undecodable and skipped
                continue
            clips, targets = self.prepare_batch(batch, device, training=False)
            with autocast():
                logits = model(clips)
            logits = logits.float()
            top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
            hits = top5.eq(targets[:, None])
            totals += torch.stack([
                hits[:, 0].sum().double(),
                hits.any(dim=1).sum().double(),
                F.cross_entropy(logits, targets, reduction="sum").double(),
                torch.tensor(float(targets.numel()), dtype=torch.float64, device=device),
            ])
        correct1, correct5, loss_sum, count = all_reduce_sum(totals).tolist()
        count = max(count, 1.0)
        return {"top1": 100.0 * correct1 / count, "top5": 100.0 * correct5 / count, "loss": loss_sum / count,
                "samples": int(count)}
