"""Video classification (`task=video`, docs/video.md): the task (`task.py`) and TSN's per-frame average for image
backbones (`consensus.py`); the datasets (`datasets.py`: video_folder, toy_video), their layout and lists
(`folder_layout.py`, `list_file.py`), frame sampling (`sampling.py`), decoding of frame folders and video files
(`decoding.py`), clip transforms (`clip_transforms.py`), the clip dataset (`clips.py`), the loaders (`loaders.py`)
and the embedded toy clips (`toy_video.py`). The video backbones (R3D-18, TSM) are in `dynconv/backbones/`."""

from dynconv.tasks.video import datasets  # noqa: F401  (registers the datasets)
from dynconv.tasks.video.loaders import VideoData, build_video_data
from dynconv.tasks.video.task import VideoTask

__all__ = ["VideoData", "VideoTask", "build_video_data"]
