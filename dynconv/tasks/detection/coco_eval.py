"""COCO box and mask AP of a detector's outputs with pycocotools' COCOeval, gathered across ranks.

Each rank converts its images' detections to COCO result records (`update`); `summarize` gathers them on rank 0,
runs COCOeval (Lin et al. 2014, the COCO detection metric: AP averaged over IoU 0.50:0.95, AP50, AP75 and AP by
object area) and broadcasts the numbers, so every rank returns the same dict.

Numbers are in percent. pycocotools reports -1 for an area range without any ground-truth object (e.g. no
small objects in the evaluated images); that value is kept as -1.0 (not scaled, not NaN: it stays valid JSON
and means "undefined" exactly as in pycocotools' own summary).
"""

from __future__ import annotations

import contextlib
import io
import logging
from typing import Any, Iterable, Sequence

import numpy as np
import pycocotools.mask as mask_util
import torch
import torch.distributed as dist
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

log = logging.getLogger("dynconv")

IOU_TYPES = ("bbox", "segm")
# COCOeval.stats[0:6] in this order.
STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class CocoEvaluator:
    """Accumulate detections per image; `summarize()` -> {"bbox_AP", ..., "segm_APl"} in percent.

    `category_ids[l - 1]` is the COCO category id of contiguous label l (1..K). Detections with a label outside
    1..K (RetinaNet's background column) are dropped. `image_ids`: the images to score; by default those seen by
    `update` on any rank (an image with no detections still counts: its objects are misses).
    """

    def __init__(self, coco_gt: COCO, iou_types: Sequence[str], category_ids: Sequence[int],
                 image_ids: Iterable[int] | None = None):
        unknown = [t for t in iou_types if t not in IOU_TYPES]
        if unknown or not iou_types:
            raise ValueError(f"iou_types={list(iou_types)}: allowed {', '.join(IOU_TYPES)}")
        self.coco_gt = coco_gt
        self.iou_types = list(iou_types)
        self.category_ids = [int(c) for c in category_ids]
        self.image_ids = None if image_ids is None else sorted({int(i) for i in image_ids})
        self.results: dict[str, list[dict[str, Any]]] = {t: [] for t in self.iou_types}
        self.seen: set[int] = set()

    # ------------------------------------------------------------------------------------------- update
    def update(self, outputs: Sequence[dict[str, torch.Tensor]], targets: Sequence[dict[str, Any]]) -> None:
        """Record one batch: `outputs[i]` (boxes XYXY in original pixels, labels, scores, masks [N,1,H,W]) are
        the detections of the image `targets[i]["image_id"]`."""
        for output, target in zip(outputs, targets):
            image_id = int(target["image_id"])
            self.seen.add(image_id)
            labels = output["labels"].detach().cpu().long()
            keep = (labels >= 1) & (labels <= len(self.category_ids))
            labels = labels[keep].tolist()
            if not labels:
                continue
            scores = output["scores"].detach().cpu().float()[keep].tolist()
            categories = [self.category_ids[label - 1] for label in labels]
            boxes = output["boxes"].detach().cpu().float()[keep]
            xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
            if "bbox" in self.results:
                self.results["bbox"] += [{"image_id": image_id, "category_id": c, "bbox": b, "score": s}
                                         for c, b, s in zip(categories, xywh, scores)]
            if "segm" in self.results:
                # No "bbox" key: pycocotools' loadRes would then take the box area as the mask's area.
                self.results["segm"] += [{"image_id": image_id, "category_id": c, "segmentation": rle, "score": s}
                                         for rle, c, s in zip(encode_masks(output["masks"][keep]), categories, scores)]

    # ---------------------------------------------------------------------------------------- summarize
    def summarize(self) -> dict[str, float]:
        """Gather every rank's results, score them on rank 0, return the same numbers on every rank."""
        results, seen = self.results, self.seen
        if _distributed():
            gathered: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, (results, sorted(seen)))
            results = {t: [r for part, _ in gathered for r in part[t]] for t in self.iou_types}
            seen = {i for _, ids in gathered for i in ids}
        metrics = None
        if not _distributed() or dist.get_rank() == 0:
            image_ids = self.image_ids if self.image_ids is not None else sorted(seen)
            metrics = {}
            for iou_type in self.iou_types:
                metrics.update(self._score(iou_type, results[iou_type], image_ids))
        if _distributed():
            box = [metrics]
            dist.broadcast_object_list(box, src=0)
            metrics = box[0]
        return metrics

    def _score(self, iou_type: str, results: list[dict[str, Any]], image_ids: list[int]) -> dict[str, float]:
        if not image_ids:
            log.warning("COCO %s evaluation: no image was evaluated", iou_type)
            return {f"{iou_type}_{name}": 0.0 for name in STAT_NAMES}
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):  # pycocotools prints progress and the table
            coco_dt = load_results(self.coco_gt, results)
            evaluator = COCOeval(self.coco_gt, coco_dt, iou_type)
            evaluator.params.imgIds = image_ids
            evaluator.evaluate()
            evaluator.accumulate()
            summary = io.StringIO()
            with contextlib.redirect_stdout(summary):
                evaluator.summarize()
        log.info("COCO %s on %d images, %d detections:\n%s", iou_type, len(image_ids), len(results),
                 summary.getvalue().rstrip())
        stats = evaluator.stats[: len(STAT_NAMES)]
        return {f"{iou_type}_{name}": (float(v) * 100.0 if v >= 0 else -1.0) for name, v in zip(STAT_NAMES, stats)}


def encode_masks(masks: torch.Tensor) -> list[dict[str, Any]]:
    """[N, 1, H, W] probabilities -> COCO RLEs of (p > 0.5), with `counts` as str (JSON-ready)."""
    if masks.shape[0] == 0:
        return []
    binary = (masks.detach()[:, 0] > 0.5).cpu().numpy().astype(np.uint8)
    rles = mask_util.encode(np.asfortranarray(binary.transpose(1, 2, 0)))  # pycocotools wants H x W x N, Fortran
    for rle in rles:
        rle["counts"] = rle["counts"].decode("ascii")
    return rles


def load_results(coco_gt: COCO, results: list[dict[str, Any]]) -> COCO:
    """`coco_gt.loadRes(results)`, or an empty result set when there are no detections (loadRes fails on an
    empty list): every object is then a miss, AP 0."""
    if results:
        return coco_gt.loadRes([dict(r) for r in results])  # loadRes adds keys in place: keep ours clean
    empty = COCO()
    empty.dataset = {"images": list(coco_gt.dataset["images"]), "categories": list(coco_gt.dataset["categories"]),
                     "annotations": []}
    empty.createIndex()
    return empty
