"""Mean IoU and pixel accuracy from a confusion matrix accumulated over a whole split.

Why a confusion matrix: IoU is a ratio of sums over the whole split (Everingham et al., PASCAL VOC; Cordts et al.,
Cityscapes), not a mean of per-image ratios, and a K x K matrix of int64 counts is all a split reduces to. Each
DDP rank accumulates its shard; one all-reduce (a sum) gives the split's matrix, so the metric does not depend on
how the split was sharded.

Rows are the ground truth, columns the prediction. Pixels labelled `ignore_index` (255: VOC's object boundaries,
Cityscapes' unlabelled classes, crop padding) are left out. For class k:

    IoU_k = C[k, k] / (sum_j C[k, j] + sum_i C[i, k] - C[k, k])

mIoU averages IoU_k over the classes that occur in the ground truth or in the prediction (union > 0); a class
absent from both has no IoU and is not counted as 0 (the VOC/Cityscapes evaluation convention: nan-mean).
Pixel accuracy is trace(C) / sum(C). Both in percent, like top-1.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = 255


class ConfusionMatrix:
    """Accumulates (target, prediction) pixel pairs; `reduce` sums it across DDP ranks."""

    def __init__(self, num_classes: int, device: torch.device | str = "cpu", ignore_index: int = IGNORE_INDEX):
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    @torch.no_grad()
    def update(self, prediction: torch.Tensor, target: torch.Tensor) -> None:
        """prediction, target: integer tensors of one shape (B, H, W); target holds classes or ignore_index.

        A target value outside 0..K-1 other than the ignore index is an error here (the loaders reject such
        masks by path before they reach the model)."""
        if prediction.shape != target.shape:
            raise ValueError(f"prediction {tuple(prediction.shape)} and target {tuple(target.shape)} differ in shape")
        valid = target != self.ignore_index
        target, prediction = target[valid].long(), prediction[valid].long()
        if target.numel() and (target.min() < 0 or target.max() >= self.num_classes):
            raise ValueError(f"target labels must be in 0..{self.num_classes - 1} or {self.ignore_index}, got "
                             f"{int(target.min())}..{int(target.max())}")
        counts = torch.bincount(target * self.num_classes + prediction, minlength=self.num_classes ** 2)
        self.matrix += counts.view(self.num_classes, self.num_classes)

    def reduce(self) -> "ConfusionMatrix":
        """Sum the matrix over the DDP ranks (no-op without a process group)."""
        from dynconv.engine.distributed import all_reduce_sum

        self.matrix = all_reduce_sum(self.matrix)
        return self

    def iou(self) -> torch.Tensor:
        """Per-class IoU in [0, 1] (float64); nan for a class absent from both target and prediction."""
        matrix = self.matrix.double()
        intersection = matrix.diagonal()
        union = matrix.sum(0) + matrix.sum(1) - intersection
        return torch.where(union > 0, intersection / union.clamp_min(1), torch.full_like(union, float("nan")))

    def class_accuracy(self) -> torch.Tensor:
        """Per-class recall (pixels of class k predicted as k), nan for a class absent from the target."""
        matrix = self.matrix.double()
        total = matrix.sum(1)
        return torch.where(total > 0, matrix.diagonal() / total.clamp_min(1), torch.full_like(total, float("nan")))

    def summary(self) -> dict[str, float]:
        """mIoU, pixel accuracy and mean class accuracy in percent, and the number of labelled pixels."""
        matrix = self.matrix.double()
        total = float(matrix.sum())
        iou, accuracy = self.iou(), self.class_accuracy()
        present = ~torch.isnan(iou)
        return {
            "mIoU": 100.0 * float(iou[present].mean()) if bool(present.any()) else 0.0,
            "pixel_acc": 100.0 * float(matrix.diagonal().sum()) / total if total else 0.0,
            "mean_acc": 100.0 * float(accuracy[~torch.isnan(accuracy)].mean()) if total else 0.0,
            "pixels": int(total),
        }
