"""Object detection: RetinaNet and Mask R-CNN (`task.py`) on torchvision's detectors over any backbone x op x
attn (`models.py`, the FPN `neck.py`, the resize `model_transform.py`, `freeze.py`), COCO data (`datasets.py`,
`coco.py`, `toy_coco.py`, `data_transforms.py`, `grouped_sampler.py`, `loaders.py`), COCO evaluation
(`coco_eval.py`) and the detection tables' profile (`profile.py`)."""

from dynconv.tasks.detection import datasets  # noqa: F401  (registers the datasets)
from dynconv.tasks.detection.task import DetectionTask, MaskRCNNTask, RetinaNetTask

__all__ = ["DetectionTask", "MaskRCNNTask", "RetinaNetTask"]
