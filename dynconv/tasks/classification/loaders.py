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
from dynconv.data.datasets import data_root, dataset_for
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

    train_loader: DataLoader | None  # None for an evaluation (splits=("val",))
    val_loader: DataLoader
    train_sampler: EpochSampler | None
    num_classes: int
    empty_class_folders: list[str] = field(default_factory=list)


def _resolve_root(data_cfg: Mapping[str, Any]) -> Path:
    spec = dataset_for(data_cfg, "classification")
    return spec.locate(data_cfg)


def _eval_root(data_cfg: Mapping[str, Any]) -> Path:
    """The root an evaluation reads: an embedded dataset is located (written) as for training; a folder on disk
    only needs its validation split (`DatasetSpec.check_eval` has checked it)."""
    spec = dataset_for(data_cfg, "classification")
    if spec.embedded or spec.check_eval is None:
        return spec.locate(data_cfg)
    spec.check_eval(data_cfg)
    return data_root(data_cfg)


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


def _open_splits(data_cfg: Mapping[str, Any], aug_cfg: Mapping[str, Any], root: Path, strict: bool,
                 splits: tuple[str, ...]) -> tuple[dict[str, Any], str, list[str], dict[str, str]]:
    """The datasets of `splits` ("train", "val"): (datasets, where the classes were counted, empty class folders,
    how each split is named in errors)."""
    if str(data_cfg.get("name")).lower() == "cifar100":
        # CIFAR's pickles (test = val split) with CIFAR's own pad-crop-flip augmentation.
        files = {"train": "train", "val": "test"}
        sets = {split: Cifar100(root, files[split], transform=cifar_transforms(data_cfg, aug_cfg, split == "train"))
                for split in splits}
        counted = f"{root / 'meta'} names {len(next(iter(sets.values())).classes)} classes"
        return sets, counted, [], {split: f"the CIFAR-100 file {root / files[split]}" for split in splits}
    sets = {split: RobustImageFolder(root / split, transform=build_transforms(data_cfg, aug_cfg, split == "train"),
                                     strict=strict, defer_corrupt=True)
            for split in splits}
    counted = f"{root / splits[0]} has {len(sets[splits[0]].classes)} class folders"
    empty = [name for dataset in sets.values() for name in dataset.empty_classes]
    return sets, counted, empty, {split: f"the {split} split {root / split}" for split in splits}


def build_classification_data(
    data_cfg: Mapping[str, Any],
    recipe_cfg: Mapping[str, Any],
    *,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    pin_memory: bool | None = None,
    splits: tuple[str, ...] = ("train", "val"),
) -> ClassificationData:
    """Create train/val loaders for ``data_cfg.name`` in {digits, imagefolder, imagenet, cifar100}.

    Train: shuffled, padded so every rank has the same number of steps;
    ``recipe_cfg.drop_last`` (default True) drops each rank's last partial batch.
    Val: not shuffled, sharded ``r::world_size`` without padding, so each
    sample is evaluated exactly once; ranks may get one sample more or less,
    so reduce metrics after the loop rather than with per-batch collectives.
    ``splits=("val",)``: an evaluation, which reads the validation split only (no train/ needed; the train
    loader and sampler are None).
    """
    if splits not in (("train", "val"), ("val",)):
        raise ValueError(f"splits={splits!r}; allowed: ('train', 'val'), ('val',)")
    root = _resolve_root(data_cfg) if "train" in splits else _eval_root(data_cfg)
    strict = bool(data_cfg.get("strict", True))
    aug_cfg = recipe_cfg.get("aug") or {}
    sets, counted, empty, sources = _open_splits(data_cfg, aug_cfg, root, strict, splits)
    if "train" in sets and sets["train"].classes != sets["val"].classes:
        # Labels are indices into the sorted class list; a mismatch would shift them.
        raise DataError(f"train and val classes differ under {root}; every class needs a folder in both splits")

    num_classes = len(sets[splits[0]].classes)
    configured = data_cfg.get("num_classes")
    if configured is not None and int(configured) != num_classes:
        raise DataError(f"data.num_classes={configured} but {counted}; pass data.num_classes={num_classes} "
                        "(or null to count them)")

    val_set = _limit(sets["val"], data_cfg.get("max_val_samples"))
    common: dict[str, Any] = dict(seed=seed, strict=strict, **worker_options(data_cfg, pin_memory))
    batch_size = int(recipe_cfg.get("batch_size"))
    eval_batch_size = int(recipe_cfg.get("eval_batch_size") or 2 * batch_size)
    val_sampler = EpochSampler(len(val_set), shuffle=False, seed=seed, rank=rank, world_size=world_size, pad=False)
    # The trainer counts and warns about skipped training images itself; nothing reports evaluation ones.
    val_loader = _loader(val_set, val_sampler, batch_size=eval_batch_size, drop_last=False, source=sources["val"],
                         warn_skipped=True, **common)
    train_loader = train_sampler = None
    if "train" in sets:
        train_set = _limit(sets["train"], data_cfg.get("max_train_samples"))
        drop_last = bool(recipe_cfg.get("drop_last", True))
        train_sampler = EpochSampler(len(train_set), shuffle=True, seed=seed, rank=rank, world_size=world_size)
        train_loader = _loader(train_set, train_sampler, batch_size=batch_size, drop_last=drop_last,
                               source=sources["train"], warn_skipped=False, **common)
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
