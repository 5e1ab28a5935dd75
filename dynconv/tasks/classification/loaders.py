"""Build the train/val DataLoaders for a classification run from the configs.

Why one entry point: the trainer should not know which dataset is used, how
sampling is made deterministic, or how corrupt files are handled; it gets two
loaders, the train sampler (for ``set_epoch`` / ``set_start``) and the classes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from torch.utils.data import DataLoader, Subset

from dynconv.data.checked_loader import CheckedDataLoader
from dynconv.data.collate import collate_skip_corrupt
from dynconv.data.datasets import dataset_for
from dynconv.data.errors import DataError
from dynconv.data.loader_options import fixed_subset, worker_options
from dynconv.data.seeded import EpochSampler, SeededDataset
from dynconv.tasks.classification.cifar import Cifar100, cifar_transforms
from dynconv.tasks.classification.image_folder import RobustImageFolder
from dynconv.tasks.classification.transforms import build_transforms

__all__ = ["ClassificationData", "build_classification_data"]


@dataclass
class ClassificationData:
    """What the trainer needs.  Batches are ``(images, targets, skipped_paths)``.

    ``empty_class_folders``: class folders kept without samples (data.strict=false), already warned about."""

    train_loader: DataLoader
    val_loader: DataLoader
    train_sampler: EpochSampler
    num_classes: int
    empty_class_folders: list[str] = field(default_factory=list)


def _resolve_root(data_cfg: Mapping[str, Any]) -> Path:
    spec = dataset_for(data_cfg, "classification")
    return spec.locate(data_cfg)


def _limit(dataset, max_samples):
    chosen = fixed_subset(len(dataset), max_samples)
    return dataset if chosen is None else Subset(dataset, chosen)


def _loader(dataset, sampler: EpochSampler, *, batch_size: int, drop_last: bool, seed: int, strict: bool,
            source: str, warn_skipped: bool, **workers: Any) -> DataLoader:
    # CheckedDataLoader applies data.strict in the main process (one clean error naming the file) and refuses
    # a pass in which no image could be decoded.
    return CheckedDataLoader(
        SeededDataset(dataset),
        strict=strict,
        source=source,
        warn_skipped=warn_skipped,
        batch_size=batch_size,
        sampler=sampler,
        drop_last=drop_last,
        collate_fn=collate_skip_corrupt,
        # A private generator: DataLoader draws a base seed from it each epoch,
        # which would otherwise advance the global torch RNG.  Augmentation
        # randomness comes from the per-sample seeds, not from this.
        generator=torch.Generator().manual_seed(seed),
        **workers,
    )


def build_classification_data(
    data_cfg: Mapping[str, Any],
    recipe_cfg: Mapping[str, Any],
    *,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    pin_memory: bool | None = None,
) -> ClassificationData:
    """Create train/val loaders for ``data_cfg.name`` in {digits, imagefolder, imagenet, cifar100}.

    Train: shuffled, padded so every rank has the same number of steps;
    ``recipe_cfg.drop_last`` (default True) drops each rank's last partial batch.
    Val: not shuffled, sharded ``r::world_size`` without padding, so each
    sample is evaluated exactly once; ranks may get one sample more or less,
    so reduce metrics after the loop rather than with per-batch collectives.
    """
    root = _resolve_root(data_cfg)
    strict = bool(data_cfg.get("strict", True))
    aug_cfg = recipe_cfg.get("aug") or {}
    if str(data_cfg.get("name")).lower() == "cifar100":
        # CIFAR's pickles (test = val split) with CIFAR's own pad-crop-flip augmentation.
        train_set = Cifar100(root, "train", transform=cifar_transforms(data_cfg, aug_cfg, True))
        val_set = Cifar100(root, "test", transform=cifar_transforms(data_cfg, aug_cfg, False))
        counted = f"{root / 'meta'} names {len(train_set.classes)} classes"
        empty: list[str] = []
        sources = (f"the CIFAR-100 file {root / 'train'}", f"the CIFAR-100 file {root / 'test'}")
    else:
        train_set, val_set = (
            RobustImageFolder(root / split, transform=build_transforms(data_cfg, aug_cfg, split == "train"),
                              strict=strict, defer_corrupt=True)
            for split in ("train", "val"))
        counted = f"{root / 'train'} has {len(train_set.classes)} class folders"
        empty = train_set.empty_classes + val_set.empty_classes
        sources = (f"the train split {root / 'train'}", f"the val split {root / 'val'}")
    if train_set.classes != val_set.classes:
        # Labels are indices into the sorted class list; a mismatch would shift them.
        raise DataError(f"train and val classes differ under {root}; every class needs a folder in both splits")

    num_classes = len(train_set.classes)
    configured = data_cfg.get("num_classes")
    if configured is not None and int(configured) != num_classes:
        raise DataError(f"data.num_classes={configured} but {counted}; pass data.num_classes={num_classes} "
                        "(or null to count them)")

    train_set = _limit(train_set, data_cfg.get("max_train_samples"))
    val_set = _limit(val_set, data_cfg.get("max_val_samples"))

    common: dict[str, Any] = dict(seed=seed, strict=strict, **worker_options(data_cfg, pin_memory))
    batch_size = int(recipe_cfg.get("batch_size"))
    eval_batch_size = int(recipe_cfg.get("eval_batch_size") or 2 * batch_size)
    drop_last = bool(recipe_cfg.get("drop_last", True))

    train_sampler = EpochSampler(len(train_set), shuffle=True, seed=seed, rank=rank, world_size=world_size)
    val_sampler = EpochSampler(len(val_set), shuffle=False, seed=seed, rank=rank, world_size=world_size, pad=False)
    # The trainer counts and warns about skipped training images itself; nothing reports evaluation ones.
    train_loader = _loader(train_set, train_sampler, batch_size=batch_size, drop_last=drop_last,
                           source=sources[0], warn_skipped=False, **common)
    val_loader = _loader(val_set, val_sampler, batch_size=eval_batch_size, drop_last=False, source=sources[1],
                         warn_skipped=True, **common)
    if len(train_loader) == 0:
        raise DataError(
            f"training set too small: {train_sampler.num_samples} samples per rank < batch_size={batch_size} "
            "with drop_last=True; lower recipe.batch_size or set recipe.drop_last=false"
        )
    return ClassificationData(
        train_loader=train_loader,
        val_loader=val_loader,
        train_sampler=train_sampler,
        num_classes=num_classes,
        empty_class_folders=empty,
    )
