"""Image classification: the backbone's own classifier, timm's Mixup/CutMix and losses, top-1/top-5."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

from dynconv.engine.distributed import all_reduce_sum
from dynconv.tasks.base import TASKS, Task


@TASKS.register("classification")
class ClassificationTask(Task):
    name = "classification"
    primary_metric = "top1"
    data_kind = "classification"

    def __init__(self, cfg, recipe, num_classes, data=None):
        super().__init__(cfg, recipe, num_classes, data)
        aug = recipe.get("aug", {}) or {}
        smoothing = float(recipe.get("smoothing", 0.0) or 0.0)
        mixup, cutmix = float(aug.get("mixup", 0.0) or 0.0), float(aug.get("cutmix", 0.0) or 0.0)
        self.mixup = None
        if mixup > 0 or cutmix > 0:
            self.mixup = Mixup(
                mixup_alpha=mixup,
                cutmix_alpha=cutmix,
                prob=float(aug.get("mixup_prob", 1.0)),
                switch_prob=float(aug.get("mixup_switch_prob", 0.5)),
                label_smoothing=smoothing,
                num_classes=num_classes,
            )
            # Mixup already folds label smoothing into its soft targets.
            self.criterion = SoftTargetCrossEntropy()
        elif smoothing > 0:
            self.criterion = LabelSmoothingCrossEntropy(smoothing=smoothing)
        else:
            self.criterion = nn.CrossEntropyLoss()

    @staticmethod
    def build_data(data_cfg, recipe, *, rank, world_size, seed):
        from dynconv.tasks.classification.loaders import build_classification_data

        return build_classification_data(data_cfg, recipe, rank=rank, world_size=world_size, seed=seed)

    @classmethod
    def build_eval_data(cls, data_cfg, recipe, *, rank, world_size, seed):
        from dynconv.tasks.classification.loaders import build_classification_data

        return build_classification_data(data_cfg, recipe, rank=rank, world_size=world_size, seed=seed,
                                         splits=("val",))

    def build_model(self, backbone: nn.Module) -> nn.Module:
        return backbone  # the backbone keeps its own classifier (sized by num_classes)

    def prepare_batch(self, batch, device, training):
        images, targets = batch[0], batch[1]
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        if training and self.mixup is not None:
            if images.shape[0] % 2:
                # timm's Mixup pairs samples and needs an even batch (a trailing partial batch may be odd).
                images, targets = images[:-1], targets[:-1]
            images, targets = self.mixup(images, targets)
        return images, targets

    def loss(self, outputs, targets):
        return self.criterion(outputs, targets)

    def result_keys(self):
        return ["top1", "top5", "loss"]

    @torch.no_grad()
    def evaluate(self, model, loader, device, autocast, channels_last=False):
        """Top-1/top-5 (percent) and mean cross-entropy over the whole split, summed across ranks."""
        model.eval()
        totals = torch.zeros(4, dtype=torch.float64, device=device)  # correct1, correct5, loss_sum, count
        for batch in loader:
            if batch[0] is None:  # every image of the batch was corrupt and skipped
                continue
            images, targets = self.prepare_batch(batch, device, training=False)
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with autocast():
                logits = model(images)
            logits = logits.float()
            top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
            hits = top5.eq(targets[:, None])
            totals += torch.stack([
                hits[:, 0].sum().double(),
                hits.any(dim=1).sum().double(),
                F.cross_entropy(logits, targets, reduction="sum").double(),
                torch.tensor(float(targets.numel()), dtype=torch.float64, device=device),
            ])
        correct1, correct5, loss_sum, count = all_reduce_sum(totals).tolist()
        count = max(count, 1.0)
        return {"top1": 100.0 * correct1 / count, "top5": 100.0 * correct5 / count, "loss": loss_sum / count,
                "samples": int(count)}
