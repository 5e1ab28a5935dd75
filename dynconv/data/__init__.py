"""Classification data pipeline: datasets, deterministic sampling, transforms, loaders."""

from dynconv.data.collate import collate_skip_corrupt
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
    "ClassificationData",
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
