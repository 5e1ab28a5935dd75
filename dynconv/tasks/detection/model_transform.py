"""The detector's input transform: normalise, resize (multi-scale in training), batch; and back to image coords.

The data pipeline hands over images at their original size in [0, 1]; all resizing happens here (one place
for train and test scales). torchvision's `GeneralizedRCNNTransform` samples the short side per image from
`min_size` in training but takes `min_size[-1]` at eval, which ties the test scale to the last train scale.
Here `min_size` is a view: `train_sizes` in train mode and `(test_size,)` in eval mode, so the test scale is
explicit (600 in the WeightNet recipe, 800 for Mask R-CNN) whatever the training scales are.
`postprocess` (torchvision's) maps boxes and masks back to the original image size.
"""

from __future__ import annotations

from typing import Sequence

from torchvision.models.detection.transform import GeneralizedRCNNTransform

# torchvision's detection defaults (and ImageNet statistics), used when no data description is given
# (building or profiling a detector without a dataset).
DEFAULT_TRAIN_SIZES = (800,)
DEFAULT_TEST_SIZE = 800
DEFAULT_MAX_SIZE = 1333
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class DetectionTransform(GeneralizedRCNNTransform):
    """GeneralizedRCNNTransform with a short side sampled from `train_sizes` in training and `test_size` at eval."""

    def __init__(self, train_sizes: Sequence[int], test_size: int, max_size: int,
                 mean: Sequence[float], std: Sequence[float], size_divisible: int = 32):
        sizes = tuple(int(s) for s in train_sizes)
        if not sizes or min(sizes) <= 0 or int(test_size) <= 0 or int(max_size) <= 0:
            raise ValueError(f"detection sizes must be positive: train_sizes={list(sizes)}, test_size={test_size}, "
                             f"max_size={max_size}")
        self.test_size = int(test_size)
        super().__init__(sizes, int(max_size), list(mean), list(std), size_divisible=size_divisible)

    @property
    def min_size(self) -> tuple[int, ...]:
        """What torchvision's `resize` reads: a per-image choice in training, the one test scale at eval."""
        return self.train_sizes if self.training else (self.test_size,)

    @min_size.setter
    def min_size(self, sizes: Sequence[int]) -> None:
        # torchvision's __init__ assigns min_size; it sets the training scales.
        self.train_sizes = tuple(sizes)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(train_sizes={list(self.train_sizes)}, test_size={self.test_size}, "
                f"max_size={self.max_size}, mean={self.image_mean}, std={self.image_std})")


def transform_from(data) -> DetectionTransform:
    """The transform for a DetectionData (sizes, mean/std from the data config); torchvision's defaults
    when `data` is None."""
    if data is None:
        return DetectionTransform(DEFAULT_TRAIN_SIZES, DEFAULT_TEST_SIZE, DEFAULT_MAX_SIZE, IMAGENET_MEAN,
                                  IMAGENET_STD)
    return DetectionTransform(data.train_sizes, data.test_size, data.max_size, data.mean, data.std)
