"""Object detection tasks: RetinaNet (WeightNet Sec. 4.2) and Mask R-CNN (KernelWarehouse Appendix A.1.2).

The model is torchvision's detector on the converted backbone (`dynconv.tasks.detection.models`); it normalises,
resizes and batches the images itself and returns its loss dict in training and per-image detections in
original image coordinates at eval. Evaluation is COCO AP (`dynconv.tasks.detection.coco_eval`), in percent.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from dynconv.tasks.detection.coco_eval import STAT_NAMES, CocoEvaluator
from dynconv.tasks.detection.models import (
    MASKRCNN_LEVELS,
    RETINANET_LEVELS,
    build_maskrcnn,
    build_retinanet,
    check_frozen_stages,
    maskrcnn_knobs,
    retinanet_knobs,
)
from dynconv.tasks.detection.neck import require_levels, strip_classifier
from dynconv.engine.distributed import all_reduce_sum
from dynconv.tasks.base import TASKS, Task


class DetectionTask(Task):
    name = "detection"
    primary_metric = "bbox_AP"
    # The neck removes what the detector never runs (classifier, unused heads), so every trainable parameter
    # gets a gradient at every step and DDP needs no unused-parameter search.
    find_unused_parameters = False
    iou_types: tuple[str, ...] = ("bbox",)
    data_kind = "detection"
    builder = staticmethod(build_retinanet)

    def __init__(self, cfg, recipe, num_classes, data=None):
        # data: the DetectionData of build_data (sizes, mean/std, val ground truth, category ids); None builds
        # a detector with torchvision's default sizes (profiling), which cannot be evaluated.
        super().__init__(cfg, recipe, num_classes, data)

    @classmethod
    def with_masks(cls) -> bool:
        return "segm" in cls.iou_types

    @classmethod
    def build_data(cls, data_cfg, recipe, *, rank, world_size, seed):
        from dynconv.tasks.detection.loaders import build_detection_data

        return build_detection_data(data_cfg, recipe, rank=rank, world_size=world_size, seed=seed,
                                    with_masks=cls.with_masks())

    knobs = staticmethod(retinanet_knobs)
    levels = RETINANET_LEVELS

    @classmethod
    def validate_config(cls, cfg, backbone) -> None:
        """The knobs, the feature levels the neck needs and frozen_stages against this backbone, checked on the
        meta-device build before anything runs, by the same checks the builder makes."""
        knobs = cls.knobs(cfg)
        require_levels(backbone, cls.levels)
        strip_classifier(backbone)  # a throwaway meta-device build; the detector never has the classifier
        check_frozen_stages(backbone, cfg, knobs["frozen_stages"])

    def build_model(self, backbone: nn.Module) -> nn.Module:
        return type(self).builder(backbone, self.cfg, self.num_classes, self.data)

    def prepare_batch(self, batch, device, training):
        images, targets = batch[0], batch[1]
        images = [image.to(device, non_blocking=True) for image in images]
        # collate_detection already unwrapped the tv_tensors (torchvision's detectors index and rebuild them).
        targets = [{key: value.to(device, non_blocking=True) if isinstance(value, torch.Tensor) else value
                    for key, value in target.items()} for target in targets]
        return images, targets

    def forward_loss(self, model, inputs, targets):
        """torchvision's loss dict (RetinaNet: classification, bbox_regression; Mask R-CNN: loss_objectness,
        loss_rpn_box_reg, loss_classifier, loss_box_reg, loss_mask), summed with weight 1 as both papers do."""
        losses = model(inputs, targets)
        loss = sum(losses.values())
        return loss, len(inputs), {key: value.detach() for key, value in losses.items()}

    def result_keys(self) -> list[str]:
        return [f"{iou_type}_{stat}" for iou_type in self.iou_types for stat in STAT_NAMES]

    @classmethod
    def profile(cls, cfg):
        """The detector at `profile.resolution` and its backbone's classification counts beside it."""
        from dynconv.tasks.detection.profile import profile_report

        return profile_report(cls, cfg)

    @torch.no_grad()
    def evaluate(self, model, loader, device, autocast, channels_last=False):
        """COCO AP over the val split (every rank scores its shard; rank 0 runs COCOeval on all of them).

        `channels_last` is not applied: the images are a list of differently sized tensors that the model's
        transform batches itself.
        """
        if self.data is None:
            raise RuntimeError(f"task {self.name}: evaluation needs the detection data (its val ground truth)")
        model.eval()
        evaluator = CocoEvaluator(self.data.val_coco, self.iou_types, self.data.category_ids)
        count = torch.zeros((), dtype=torch.float64, device=device)
        for batch in loader:
            if batch[0] is None:  # every image of the batch was unreadable and skipped
                continue
            images, targets = self.prepare_batch(batch, device, training=False)
            with autocast():
                outputs = model(images)
            outputs = [{key: (value.float() if value.is_floating_point() else value).cpu()
                        for key, value in output.items()} for output in outputs]
            evaluator.update(outputs, [{"image_id": target["image_id"]} for target in targets])
            count += len(images)
        metrics = evaluator.summarize()
        metrics["samples"] = int(all_reduce_sum(count).item())
        return metrics


@TASKS.register("retinanet")
class RetinaNetTask(DetectionTask):
    name = "retinanet"
    iou_types = ("bbox",)
    builder = staticmethod(build_retinanet)


@TASKS.register("maskrcnn")
class MaskRCNNTask(DetectionTask):
    name = "maskrcnn"
    iou_types = ("bbox", "segm")
    builder = staticmethod(build_maskrcnn)
    knobs = staticmethod(maskrcnn_knobs)
    levels = MASKRCNN_LEVELS
