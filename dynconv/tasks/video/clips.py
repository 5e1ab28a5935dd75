"""The dataset of one split of video clips: path + label -> (clip tensor (3, T, H, W), label).

A clip that cannot give its frames (missing, undecodable, too short: `decoding.UndecodableClip`) comes back as a
`CorruptSample` naming its path and the reason, never as an exception: `collate_skip_corrupt` drops it and the
`CheckedDataLoader` counts and names it, or stops on it under data.strict=true (from the main process, with one
clean message rather than a worker's traceback).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch.utils.data import Dataset

from dynconv.data.images import CorruptSample
from dynconv.tasks.video.clip_transforms import ClipTransform
from dynconv.tasks.video.decoding import UndecodableClip, read_clip
from dynconv.tasks.video.sampling import frame_indices


@dataclass(frozen=True)
class ClipSampling:
    """How many frames a sample reads and how they are spread (`sampling.py`), and the decoded frames' short side."""

    sampling: str  # dense | segments
    frames: int  # T, data.num_frames
    stride: int  # dense: frames between two sampled ones (data.frame_stride)
    short_side: int  # data.resize


class VideoClips(Dataset):
    """`paths[i]` with class `labels[i]`; `classes` are the class names (best.pt records them)."""

    def __init__(self, paths: list[Path], labels: list[int], classes: list[str], sampling: ClipSampling,
                 transform: ClipTransform):
        self.paths, self.labels, self.classes = paths, labels, classes
        self.sampling, self.transform = sampling, transform

    def __len__(self) -> int:
        return len(self.paths)

    def _pick(self, frame_count: int) -> list[int]:
        s = self.sampling
        return frame_indices(s.sampling, frame_count, s.frames, s.stride, self.transform.training)

    def __getitem__(self, index: int):
        path = self.paths[index]
        try:
            frames = read_clip(path, self._pick, self.sampling.short_side)
        except UndecodableClip as error:
            return CorruptSample(str(path), error.reason)
        return self.transform(frames), self.labels[index]
