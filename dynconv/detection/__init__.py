"""Detection on dynconv backbones: FPN neck, resize transform, torchvision RetinaNet / Mask R-CNN, freezing,
COCO evaluation. The tasks that use them live in dynconv/tasks/detection.py."""

from dynconv.detection.coco_eval import CocoEvaluator
from dynconv.detection.freeze import apply_freezing, freeze_batchnorm, freeze_stages
from dynconv.detection.models import build_maskrcnn, build_retinanet
from dynconv.detection.neck import BackboneWithFPN
from dynconv.detection.transform import DetectionTransform

__all__ = ["BackboneWithFPN", "CocoEvaluator", "DetectionTransform", "apply_freezing",
           "build_maskrcnn", "build_retinanet", "freeze_batchnorm", "freeze_stages"]
