"""Build the train/val DataLoaders of a segmentation run from the configs.

Why one entry point: like build_classification_data, the trainer and the segmentation task should not know
where a dataset's files are, how its label values map to classes, how sampling is made deterministic or how
bad pairs are reported; they get the loaders, the train sampler (`set_epoch` / `set_start`), the classes and
the ignore index.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from torch.utils.data import DataLoader, Subset

from dynconv.data.checked_loader import CheckedDataLoader
from dynconv.data.datasets import dataset_for
from dynconv.data.errors import DataError
from dynconv.data.loader_options import fixed_subset, worker_options
from dynconv.data.seeded import EpochSampler, SeededDataset
from dynconv.tasks.segmentation.collate import collate_segmentation
from dynconv.tasks.segmentation.masks import IGNORE_INDEX
from dynconv.tasks.segmentation.pairs import SegmentationPairs, keep_existing_pairs
from dynconv.tasks.segmentation.splits import split_files
from dynconv.tasks.segmentation.transforms import build_segmentation_transforms

__all__ = ["SegmentationData", "build_segmentation_data"]

log = logging.getLogger("dynconv")

KIND = "segmentation"


@dataclass
class SegmentationData:
    """What the trainer and the segmentation task need. Batches are `(images, masks, skipped_paths)`: images
    float (B, 3, H, W) normalised with data.mean / data.std, masks int64 (B, H, W) of train ids
    0..num_classes-1 and `ignore_index`; images and masks None when every pair of the batch was skipped."""

    train_loader: DataLoader
    val_loader: DataLoader
    train_sampler: EpochSampler
    num_classes: int
    class_names: list[str]
    ignore_index: int = IGNORE_INDEX
    stats: dict[str, int] = field(default_factory=dict)


def _limit(dataset: SegmentationPairs, max_samples) -> SegmentationPairs | Subset:
    chosen = fixed_subset(len(dataset), max_samples)
    return dataset if chosen is None else Subset(dataset, chosen)


def build_segmentation_data(
    data_cfg: Mapping[str, Any],
    recipe_cfg: Mapping[str, Any],
    *,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    pin_memory: bool | None = None,
) -> SegmentationData:
    """Create the train/val loaders for `data.name` in {voc, cityscapes, toy_seg}.

    Train: shuffled random-scale / crop / flip samples of `recipe.batch_size`, padded so every rank has the
    same number of steps; `recipe.drop_last` (default true) drops each rank's last partial batch. Val: whole
    images in order, `recipe.eval_batch_size` (default 1) per batch padded to the largest, sharded
    `r::world_size` without padding, so each image is scored exactly once over all ranks (reduce the
    confusion matrix across ranks after the loop).
    """
    spec = dataset_for(data_cfg, KIND)
    root = spec.locate(data_cfg)  # the layout checked (an embedded dataset: written first)
    strict = bool(data_cfg.get("strict", True))
    files = split_files(data_cfg, root)
    num_classes = len(files.class_names)
    configured = data_cfg.get("num_classes")
    if configured is not None and int(configured) != num_classes:
        raise DataError(f"data.num_classes={configured} but data={spec.name} has {num_classes} classes; pass "
                        f"data.num_classes={num_classes} (or null)")

    train_pairs = keep_existing_pairs(files.train_pairs, strict=strict, source=files.train_source)
    val_pairs = keep_existing_pairs(files.val_pairs, strict=strict, source=files.val_source)
    for pairs, source in ((train_pairs, files.train_source), (val_pairs, files.val_source)):
        if not pairs:
            raise DataError(f"no image/mask pair of {source} has both files; nothing is left to use")
    train_set = _limit(SegmentationPairs(train_pairs, files.mapping, build_segmentation_transforms(data_cfg, True)),
                       data_cfg.get("max_train_samples"))
    val_set = _limit(SegmentationPairs(val_pairs, files.mapping, build_segmentation_transforms(data_cfg, False)),
                     data_cfg.get("max_val_samples"))
    stats = {"train_images": len(train_set), "val_images": len(val_set),
             "missing_pairs": len(files.train_pairs) - len(train_pairs) + len(files.val_pairs) - len(val_pairs)}
    log.info("%s %s: %d train / %d val images, %d classes (ignore index %d)", spec.name, root,
             stats["train_images"], stats["val_images"], num_classes, IGNORE_INDEX)

    batch_size = int(recipe_cfg.get("batch_size"))
    eval_batch_size = int(recipe_cfg.get("eval_batch_size") or 1)
    drop_last = bool(recipe_cfg.get("drop_last", True))
    # A skipped path is the image or the mask of a pair that could not be used, and the messages say so.
    options = dict(noun="image/mask pair", item="image or mask file", **worker_options(data_cfg, pin_memory))
    train_sampler = EpochSampler(len(train_set), shuffle=True, seed=seed, rank=rank, world_size=world_size)
    val_sampler = EpochSampler(len(val_set), shuffle=False, seed=seed, rank=rank, world_size=world_size, pad=False)
    # CheckedDataLoader applies data.strict in the main process (one clean error naming the file) and refuses a
    # pass in which no pair could be used. A private generator: DataLoader draws a base seed from it each epoch,
    # which would otherwise advance the global torch RNG (augmentations come from the per-sample seeds).
    # The trainer counts and warns about skipped training pairs itself; nothing else reports evaluation ones.
    train_loader = CheckedDataLoader(SeededDataset(train_set), strict=strict, source=files.train_source,
                                     warn_skipped=False, batch_size=batch_size, sampler=train_sampler,
                                     drop_last=drop_last, collate_fn=collate_segmentation,
                                     generator=torch.Generator().manual_seed(seed), **options)
    val_loader = CheckedDataLoader(SeededDataset(val_set), strict=strict, source=files.val_source,
                                   warn_skipped=True, batch_size=eval_batch_size, sampler=val_sampler,
                                   drop_last=False, collate_fn=collate_segmentation,
                                   generator=torch.Generator().manual_seed(seed), **options)
    if len(train_loader) == 0:
        raise DataError(f"training set too small: {train_sampler.num_samples} samples per rank < "
                        f"batch_size={batch_size} with drop_last=True; lower recipe.batch_size or set "
                        "recipe.drop_last=false")
    return SegmentationData(train_loader=train_loader, val_loader=val_loader, train_sampler=train_sampler,
                            num_classes=num_classes, class_names=list(files.class_names), stats=stats)
