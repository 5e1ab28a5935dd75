"""Semantic segmentation (`task=segmentation`): DeepLabV3 or the dilated FCN on a dilated dynconv backbone,
per-pixel cross-entropy, mean IoU and pixel accuracy over the whole split at full resolution.

Weight Excitation Table 6 (DeepLabV3-ResNet50 on PASCAL VOC 2012 and Cityscapes, Sec. 4.4) and DyNet Table 3
(dilated FCN on ResNet50 / Dy-ResNet50, Cityscapes, Sec. 4.4). The model is `models.py`, the metric
`metrics.py`, full-resolution inference `inference.py`, the data `datasets.py` / `loaders.py`.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from dynconv.tasks.base import TASKS, Task
from dynconv.tasks.segmentation.inference import sliding_window_logits, whole_image_logits
from dynconv.tasks.segmentation.metrics import IGNORE_INDEX, ConfusionMatrix
from dynconv.tasks.segmentation.models import (
    build_segmentation_model,
    check_output_stride,
    head_levels,
    segmentation_knobs,
)


@TASKS.register("segmentation")
class SegmentationTask(Task):
    name = "segmentation"
    primary_metric = "mIoU"
    data_kind = "segmentation"
    # The trimmed backbone and both heads run at every training step (the auxiliary head only in training, where
    # the loss uses it), so DDP needs no unused-parameter search.
    find_unused_parameters = False

    def __init__(self, cfg, recipe, num_classes, data=None):
        super().__init__(cfg, recipe, num_classes, data)
        self.knobs = segmentation_knobs(cfg)
        self.ignore_index = int(getattr(data, "ignore_index", IGNORE_INDEX) if data is not None else IGNORE_INDEX)

    @staticmethod
    def build_data(data_cfg, recipe, *, rank, world_size, seed):
        from dynconv.tasks.segmentation.loaders import build_segmentation_data

        return build_segmentation_data(data_cfg, recipe, rank=rank, world_size=world_size, seed=seed)

    @classmethod
    def validate_config(cls, cfg, backbone) -> None:
        """The knobs, and that the backbone is dilated as the task asks and has feature maps for the heads."""
        knobs = segmentation_knobs(cfg)
        check_output_stride(backbone, knobs["output_stride"])
        level, aux_level = head_levels(backbone)
        if knobs["aux_loss"] and aux_level is None:
            raise ValueError(f"task.aux_loss=true needs two feature levels; backbone {backbone.name} gives only "
                             f"{level}: allowed values: task.aux_loss=false")

    def build_model(self, backbone: nn.Module) -> nn.Module:
        return build_segmentation_model(backbone, self.cfg, self.num_classes)

    def prepare_batch(self, batch, device, training):
        images, masks = batch[0], batch[1]
        return images.to(device, non_blocking=True), masks.to(device, non_blocking=True)

    def _cross_entropy(self, logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        # Mean over the labelled pixels of the batch (ignore_index left out), as torch's and the references' loss.
        return F.cross_entropy(logits.float(), masks, ignore_index=self.ignore_index)

    def forward_loss(self, model, inputs, targets):
        """Cross-entropy on the main head, plus `task.aux_weight` x that of the auxiliary head when it exists."""
        outputs = model(inputs)
        main = self._cross_entropy(outputs["out"], targets)
        extras = {"loss_out": main.detach()}
        loss = main
        if "aux" in outputs:
            aux = self._cross_entropy(outputs["aux"], targets)
            extras["loss_aux"] = aux.detach()
            loss = main + self.knobs["aux_weight"] * aux
        return loss, inputs.shape[0], extras

    def result_keys(self) -> list[str]:
        return ["mIoU", "pixel_acc", "mean_acc"]

    def logits(self, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        if self.knobs["eval_mode"] == "slide":
            return sliding_window_logits(model, images, self.knobs["eval_crop"], self.knobs["eval_stride"])
        return whole_image_logits(model, images)

    @classmethod
    def profile(cls, cfg):
        """The segmentation network's parameters and MACs at `profile.resolution` (DyNet Table 3's GFLOPs)."""
        from dynconv.tasks.segmentation.profile import profile_report

        return profile_report(cls, cfg)

    @torch.no_grad()
    def evaluate(self, model, loader, device, autocast, channels_last=False):
        """mIoU, pixel and mean class accuracy (percent) over the val split at full resolution; every rank scores
        its shard, the confusion matrix is summed across ranks."""
        model.eval()
        confusion = ConfusionMatrix(self.num_classes, device, self.ignore_index)
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        images_seen = torch.zeros((), dtype=torch.float64, device=device)
        for batch in loader:
            if batch[0] is None:  # every sample of the batch was unreadable and skipped
                continue
            images, masks = self.prepare_batch(batch, device, training=False)
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with autocast():
                logits = self.logits(model, images)
            logits = logits.float()
            confusion.update(logits.argmax(dim=1), masks)
            if bool((masks != self.ignore_index).any()):
                loss_sum += F.cross_entropy(logits, masks, ignore_index=self.ignore_index).double() * images.shape[0]
            images_seen += images.shape[0]
        from dynconv.engine.distributed import all_reduce_sum

        metrics = confusion.reduce().summary()
        loss_sum, images_seen = all_reduce_sum(torch.stack([loss_sum, images_seen])).tolist()
        metrics["loss"] = loss_sum / max(images_seen, 1.0)
        metrics["samples"] = int(images_seen)
        return metrics
