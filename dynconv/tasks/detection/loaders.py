"""Build the train/val DataLoaders of a detection run (COCO layout, or the embedded toy_coco).

Why one entry point: like build_classification_data, the trainer and the detection task should not know
how the split files are found and checked, how batches are grouped and sharded, or how bad files are
reported; they get the loaders, the sampler (``set_epoch`` / ``set_start``), the label mapping and the
validation ground truth for COCOeval.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from pycocotools.coco import COCO
from torch.utils.data import DataLoader

from dynconv.data.checked_loader import CheckedDataLoader
from dynconv.data.collate import split_corrupt
from dynconv.data.datasets import dataset_for
from dynconv.data.errors import DataError
from dynconv.data.loader_options import fixed_subset, worker_options
from dynconv.data.seeded import EpochSampler, SeededDataset
from dynconv.tasks.detection.coco import CocoDetectionDataset, annotation_file, coco_subset, validate_coco_root
from dynconv.tasks.detection.data_transforms import build_detection_transforms
from dynconv.tasks.detection.grouped_sampler import GroupedBatchSampler

__all__ = ["DetectionData", "build_detection_data", "collate_detection"]

log = logging.getLogger("dynconv")


@dataclass
class DetectionData:
    """What the trainer and the detection task need.  Batches are ``(images, targets, skipped_paths)``."""

    train_loader: DataLoader  # batch_sampler=train_sampler, so train_loader.batch_size is None
    val_loader: DataLoader
    train_sampler: GroupedBatchSampler
    num_classes: int  # K; the detector adds the background class itself
    category_ids: list[int]  # label l (1..K) <-> COCO category id category_ids[l - 1]
    val_coco: COCO  # ground truth holding exactly the evaluated val images
    train_sizes: list[int]
    test_size: int
    max_size: int
    mean: list[float]
    std: list[float]
    with_masks: bool
    stats: dict[str, int] = field(default_factory=dict)
    val_image_ids: list[int] = field(default_factory=list)  # every evaluated image id (all ranks), sorted


def collate_detection(batch: Sequence[Any]) -> tuple[list | None, list | None, list[str]]:
    """Lists (not stacked: sizes differ) of images and targets, dropping and naming corrupt samples.

    Images and target tensors are unwrapped from tv_tensors to plain tensors: the model needs nothing of
    their metadata, and plain tensors behave predictably under pin_memory and ``.to(device)``.
    Every sample corrupt -> ``(None, None, skipped_paths)``; the caller skips the step.
    """
    good, skipped = split_corrupt(batch)
    if not good:
        return None, None, skipped
    images = [image.as_subclass(torch.Tensor) for image, _ in good]
    targets = [{key: value.as_subclass(torch.Tensor) if isinstance(value, torch.Tensor) else value
                for key, value in target.items()} for _, target in good]
    return images, targets, skipped


def _limit_ids(ids: list[int], max_samples) -> list[int]:
    chosen = fixed_subset(len(ids), max_samples)
    return ids if chosen is None else [ids[i] for i in chosen]


def _resolve_root(data_cfg: Mapping[str, Any]) -> Path:
    spec = dataset_for(data_cfg, "detection")
    return validate_coco_root(spec.locate(data_cfg), (split_name(data_cfg, "train"), split_name(data_cfg, "val")))


def split_name(data_cfg: Mapping[str, Any], which: str) -> str:
    return str(data_cfg.get(f"{which}_split") or f"{which}2017")


# What a non-strict build leaves out (CocoDetectionDataset.skipped keys), as the warnings word it.
_LEFT_OUT = {
    "missing_images": "missing image file(s)",
    "empty_image_files": "empty (0-byte) image file(s)",
    "zero_size_images": "zero-area image entry(ies)",
    "unknown_category_dropped": "annotation(s) of a category not in \"categories\"",
    "malformed_boxes_dropped": "annotation(s) without a valid bbox",
}


def _warn_skipped(dataset: CocoDetectionDataset) -> None:
    for key, wording in _LEFT_OUT.items():
        items = dataset.skipped.get(key, [])
        if items:
            shown = "; ".join(items[:5]) + (f"; and {len(items) - 5} more" if len(items) > 5 else "")
            log.warning("left out %d %s (data.strict=false): %s", len(items), wording, shown)


def build_detection_data(
    data_cfg: Mapping[str, Any],
    recipe_cfg: Mapping[str, Any],
    *,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    with_masks: bool,
    pin_memory: bool | None = None,
) -> DetectionData:
    """Create the train/val loaders for ``data_cfg.name`` in {coco, toy_coco}.

    Train: aspect-grouped batches of ``recipe.batch_size``, the same number on every rank, deterministic
    per (seed, epoch).  Val: batches of ``recipe.eval_batch_size`` (default 2), in order, sharded
    ``r::world_size`` without padding, so each image is evaluated exactly once over all ranks.
    """
    root = _resolve_root(data_cfg)
    strict = bool(data_cfg.get("strict", True))
    train_split, val_split = split_name(data_cfg, "train"), split_name(data_cfg, "val")
    # defer_corrupt: undecodable files reach the main process as skipped paths, and CheckedDataLoader applies
    # data.strict there (one clean error instead of a worker traceback).
    train_set = CocoDetectionDataset(root / train_split, annotation_file(root, train_split), train=True,
                                     with_masks=with_masks, strict=strict, defer_corrupt=True,
                                     transforms=build_detection_transforms(data_cfg, True))
    val_set = CocoDetectionDataset(root / val_split, annotation_file(root, val_split), train=False,
                                   with_masks=with_masks, strict=strict, defer_corrupt=True,
                                   transforms=build_detection_transforms(data_cfg, False),
                                   category_ids=train_set.category_ids)
    if sorted(val_set.coco.getCatIds()) != train_set.category_ids:
        # Labels are positions in the sorted category list; a mismatch would shift them.
        raise DataError(f"the categories of {annotation_file(root, train_split)} and "
                        f"{annotation_file(root, val_split)} differ; both splits need the same \"categories\"")
    _warn_skipped(train_set)
    _warn_skipped(val_set)
    full_train, full_val = len(train_set.ids), len(val_set.ids)
    train_set.ids = _limit_ids(train_set.ids, data_cfg.get("max_train_samples"))
    val_set.ids = _limit_ids(val_set.ids, data_cfg.get("max_val_samples"))
    if not train_set.ids:
        raise DataError(f"no training image with a usable annotation in {annotation_file(root, train_split)}: "
                        "training needs at least one non-crowd box of at least 1 x 1 pixel")

    stats = {
        "train_images": len(train_set.ids),
        "train_annotations": train_set.num_annotations,
        "val_images": len(val_set.ids),
        "val_annotations": val_set.num_annotations,
        "crowd_ignored": train_set.stats["crowd_ignored"],
        "degenerate_dropped": train_set.stats["degenerate_dropped"],
        "train_images_without_annotations": train_set.stats["images_without_annotations"],
        **{key: train_set.stats[key] + val_set.stats[key] for key in _LEFT_OUT},
    }
    limited = (f" (a fixed subset of {full_train} / {full_val})"
               if (full_train, full_val) != (stats["train_images"], stats["val_images"]) else "")
    log.info(
        "%s %s: %d train images with %d annotations, %d val images%s; ignored %d crowd annotations, "
        "dropped %d degenerate boxes, skipped %d train images without annotations, %d missing image files; "
        "left out %d empty image files, %d zero-area image entries, %d annotations of unknown categories, "
        "%d annotations without a valid bbox",
        data_cfg.get("name"), root, stats["train_images"], stats["train_annotations"], stats["val_images"],
        limited, stats["crowd_ignored"], stats["degenerate_dropped"], stats["train_images_without_annotations"],
        stats["missing_images"], stats["empty_image_files"], stats["zero_size_images"],
        stats["unknown_category_dropped"], stats["malformed_boxes_dropped"],
    )

    val_image_ids = sorted(val_set.ids)
    val_coco = val_set.coco if len(val_image_ids) == len(val_set.coco.imgs) else coco_subset(val_set.coco,
                                                                                            val_image_ids)
    common: dict[str, Any] = dict(collate_fn=collate_detection, strict=strict, **worker_options(data_cfg, pin_memory))
    train_sampler = GroupedBatchSampler(train_set.group_ids(), int(recipe_cfg.get("batch_size")), seed=seed,
                                        rank=rank, world_size=world_size)
    val_sampler = EpochSampler(len(val_set), shuffle=False, seed=seed, rank=rank, world_size=world_size,
                               pad=False)
    # Private generators: DataLoader draws a base seed from it each epoch, which would otherwise advance
    # the global torch RNG.  Augmentation randomness comes from the per-sample seeds, not from this.
    # The trainer counts and warns about skipped training images itself; nothing reports evaluation ones.
    train_loader = CheckedDataLoader(SeededDataset(train_set), batch_sampler=train_sampler,
                                     generator=torch.Generator().manual_seed(seed),
                                     source=f"the training split {root / train_split}", warn_skipped=False,
                                     **common)
    val_loader = CheckedDataLoader(SeededDataset(val_set), batch_size=int(recipe_cfg.get("eval_batch_size") or 2),
                                   sampler=val_sampler, drop_last=False,
                                   generator=torch.Generator().manual_seed(seed),
                                   source=f"the validation split {root / val_split}", warn_skipped=True, **common)
    return DetectionData(
        train_loader=train_loader,
        val_loader=val_loader,
        train_sampler=train_sampler,
        num_classes=len(train_set.category_ids),
        category_ids=list(train_set.category_ids),
        val_coco=val_coco,
        train_sizes=[int(s) for s in data_cfg.get("train_sizes", [800])],
        test_size=int(data_cfg.get("test_size", 800)),
        max_size=int(data_cfg.get("max_size", 1333)),
        mean=[float(v) for v in data_cfg.get("mean", [0.485, 0.456, 0.406])],
        std=[float(v) for v in data_cfg.get("std", [0.229, 0.224, 0.225])],
        with_masks=bool(with_masks),
        stats=stats,
        val_image_ids=val_image_ids,
    )
