"""Image classification: the task (`task.py`), its datasets (`datasets.py`: digits, imagefolder, imagenet,
cifar100), their readers (`image_folder.py`, `digits.py`, `cifar.py`), transforms (`transforms.py`) and loaders
(`loaders.py`)."""

from dynconv.tasks.classification import datasets  # noqa: F401  (registers the datasets)
from dynconv.tasks.classification.loaders import ClassificationData, build_classification_data
from dynconv.tasks.classification.task import ClassificationTask

__all__ = ["ClassificationData", "ClassificationTask", "build_classification_data"]
