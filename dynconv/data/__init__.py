"""Data pipelines: classification (ImageFolder, digits, CIFAR-100) and detection (COCO, toy COCO); deterministic
sampling, transforms, loaders."""

from dynconv.data.coco import CocoDetectionDataset, coco_subset, validate_coco_root
from dynconv.data.collate import collate_skip_corrupt
from dynconv.data.detection_loaders import (
    DETECTION_DATASET_NAMES,
    DetectionData,
    build_detection_data,
    collate_detection,
)
from dynconv.data.detection_transforms import build_detection_transforms
from dynconv.data.grouped_sampler import GroupedBatchSampler
from dynconv.data.toy_coco import ensure_toy_coco
from dynconv.data.digits import ensure_digits_imagefolder
from dynconv.data.image_folder import (
    CorruptImageError,
    CorruptSample,
    RobustImageFolder,
    validate_imagefolder_root,
)
from dynconv.data.loaders import ClassificationData, build_classification_data
from dynconv.data.seeded import EpochSampler, SeededDataset
from dynconv.data.transforms import build_transforms

__all__ = [
    "DETECTION_DATASET_NAMES",
    "ClassificationData",
    "CocoDetectionDataset",
    "DetectionData",
    "GroupedBatchSampler",
    "build_detection_data",
    "build_detection_transforms",
    "coco_subset",
    "collate_detection",
    "ensure_toy_coco",
    "validate_coco_root",
    "CorruptImageError",
    "CorruptSample",
    "EpochSampler",
    "RobustImageFolder",
    "SeededDataset",
    "build_classification_data",
    "build_transforms",
    "collate_skip_corrupt",
    "ensure_digits_imagefolder",
    "validate_imagefolder_root",
]
