"""Semantic segmentation: the task (`task.py`), its datasets (`datasets.py`: voc, cityscapes, toy_seg), their
readers (`voc.py`, `cityscapes.py`, the embedded `toy_seg.py`, label masks in `masks.py`, split files in
`splits.py`, image/mask pairs in `pairs.py`), transforms (`transforms.py`), batching (`collate.py`) and loaders
(`loaders.py`)."""

from dynconv.tasks.segmentation import datasets  # noqa: F401  (registers the datasets)
from dynconv.tasks.segmentation.loaders import SegmentationData, build_segmentation_data
from dynconv.tasks.segmentation.task import SegmentationTask

__all__ = ["SegmentationData", "SegmentationTask", "build_segmentation_data"]
