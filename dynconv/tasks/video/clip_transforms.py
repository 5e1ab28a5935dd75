"""Spatial transforms of a clip: one random crop and one flip per clip in training (every frame gets the same, so
the motion between frames is kept), a single centre crop in evaluation (Weight Excitation Sec. 4.5: "standard
single center-crop", TSM's single-clip, centre-crop protocol).

The decoder already scaled the frames to short side `data.resize` (`decoding.py`). Then:

- training: a square crop of side s x (short side), s uniform in `data.crop_scale`, at a uniform position,
  resized to `data.image_size`; flipped left-right with probability `data.hflip`. R3D's recipe (frames at 128 x 171,
  random 112 x 112 crops, Tran et al. 2018) is resize 128, crop_scale [0.875, 0.875], image_size 112; TSM's
  multi-scale crop (crops of 1, 0.875, 0.75, 0.66 of the short side at 256, resized to 224) is approximated by
  crop_scale [0.66, 1.0] with square crops.
- evaluation: the centre `data.image_size` x `data.image_size` crop (resize 128 -> crop 112; resize 256 -> 224).

Flip is off where the direction is the label (Jester's "Swiping Left" / "Swiping Right", the toy video data's
motions): a flipped "left" clip is a "right" one.
"""

from __future__ import annotations

import random
from typing import Sequence

import torch
import torch.nn.functional as F


class ClipTransform:
    """uint8 (T, H, W, 3) -> normalised float (3, T, image_size, image_size)."""

    def __init__(self, *, training: bool, image_size: int, crop_scale: Sequence[float], hflip: float,
                 mean: Sequence[float], std: Sequence[float]):
        self.training = training
        self.image_size = int(image_size)
        self.crop_scale = (float(crop_scale[0]), float(crop_scale[1]))
        self.hflip = float(hflip)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1, 1)

    def _crop_box(self, height: int, width: int) -> tuple[int, int, int]:
        """(top, left, side) of the square crop."""
        if not self.training:
            side = min(self.image_size, height, width)
            return (height - side) // 2, (width - side) // 2, side
        side = max(1, min(round(random.uniform(*self.crop_scale) * min(height, width)), height, width))
        return random.randint(0, height - side), random.randint(0, width - side), side

    def __call__(self, frames: torch.Tensor) -> torch.Tensor:
        top, left, side = self._crop_box(*frames.shape[1:3])
        clip = frames[:, top:top + side, left:left + side].permute(0, 3, 1, 2).float().div_(255)  # T, 3, s, s
        if side != self.image_size:
            clip = F.interpolate(clip, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False,
                                 antialias=True)
        if self.training and random.random() < self.hflip:
            clip = clip.flip(-1)
        return (clip.permute(1, 0, 2, 3) - self.mean) / self.std  # 3, T, s, s
