"""The video datasets: `data=video_folder` (a folder of clips with list files) and `data=toy_video` (embedded, in
the same layout, read by the same reader)."""

from __future__ import annotations

from dynconv.data.datasets import DatasetSpec, data_root, register_dataset
from dynconv.tasks.video.folder_layout import check_video_folder, looks_like_video_folder
from dynconv.tasks.video.toy_video import check_toy_video_root, ensure_toy_video

KIND = "video"

register_dataset(DatasetSpec("video_folder", KIND, check=check_video_folder, locate=data_root,
                             recognise=looks_like_video_folder))
register_dataset(DatasetSpec(
    "toy_video", KIND, embedded=True,
    # data.root must be the toy tree, absent, or an empty folder: anything else is refused, unchanged.
    check=lambda data_cfg: check_toy_video_root(data_root(data_cfg)),
    locate=lambda data_cfg: ensure_toy_video(data_root(data_cfg))))
