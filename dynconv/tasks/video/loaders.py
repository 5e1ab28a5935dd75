"""The train/val DataLoaders of a video run, built like the classification ones (`dynconv/tasks/classification/
loaders.py`): deterministic, resumable sampling whose randomness (the frames picked, the crop, the flip) depends only
on (seed, epoch, clip index) (`dynconv.data.seeded`); undecodable clips dropped by the collate function and counted,
named, or stopped on by the `CheckedDataLoader` (data.strict); fixed subsets for smoke runs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch.utils.data import DataLoader, Subset

from dynconv.data.checked_loader import CheckedDataLoader
from dynconv.data.collate import collate_skip_corrupt
from dynconv.data.datasets import dataset_for
from dynconv.data.errors import DataError
from dynconv.data.loader_options import fixed_subset, worker_options
from dynconv.data.seeded import EpochSampler, SeededDataset
from dynconv.tasks.video.clip_transforms import ClipTransform
from dynconv.tasks.video.clips import ClipSampling, VideoClips
from dynconv.tasks.video.folder_layout import read_splits

__all__ = ["VideoData", "build_video_data"]


@dataclass
class VideoData:
    """What the trainer needs. Batches are `(clips (B, 3, T, H, W), targets, skipped_paths)`."""

    train_loader: DataLoader
    val_loader: DataLoader
    train_sampler: EpochSampler
    num_classes: int
    class_names: list[str]


def _transform(data_cfg: Mapping[str, Any], training: bool) -> ClipTransform:
    return ClipTransform(training=training, image_size=int(data_cfg["image_size"]),
                         crop_scale=data_cfg.get("crop_scale") or (1.0, 1.0), hflip=float(data_cfg.get("hflip", 0.0)),
                         mean=data_cfg["mean"], std=data_cfg["std"])


def _limit(dataset, max_samples):
    chosen = fixed_subset(len(dataset), max_samples)
    return dataset if chosen is None else Subset(dataset, chosen)


def build_video_data(data_cfg: Mapping[str, Any], recipe_cfg: Mapping[str, Any], *, rank: int = 0,
                     world_size: int = 1, seed: int = 0, pin_memory: bool | None = None) -> VideoData:
    """Loaders for `data.name` in {video_folder, toy_video}. Train: shuffled, padded so every rank takes the same
    number of steps. Val: every clip once, sharded across ranks (the task sums the metrics after the loop)."""
    root = dataset_for(data_cfg, "video").locate(data_cfg)
    splits = read_splits(root, data_cfg)
    num_classes = len(splits.classes)
    configured = data_cfg.get("num_classes")
    if configured is not None and int(configured) != num_classes:
        raise DataError(f"data.num_classes={configured} but the clip lists under {root} have {num_classes} classes; "
                        f"pass data.num_classes={num_classes} (or null to count them)")
    sampling = ClipSampling(str(data_cfg.get("sampling", "dense")), int(data_cfg["num_frames"]),
                            int(data_cfg.get("frame_stride", 1)), int(data_cfg["resize"]))
    train_set = _limit(VideoClips(splits.train_paths, splits.train_labels, splits.classes, sampling,
                                  _transform(data_cfg, True)), data_cfg.get("max_train_samples"))
    val_set = _limit(VideoClips(splits.val_paths, splits.val_labels, splits.classes, sampling,
                                _transform(data_cfg, False)), data_cfg.get("max_val_samples"))

    strict = bool(data_cfg.get("strict", True))
    batch_size = int(recipe_cfg["batch_size"])
    eval_batch_size = int(recipe_cfg.get("eval_batch_size") or 2 * batch_size)
    drop_last = bool(recipe_cfg.get("drop_last", True))
    workers = worker_options(data_cfg, pin_memory)
    train_sampler = EpochSampler(len(train_set), shuffle=True, seed=seed, rank=rank, world_size=world_size)
    val_sampler = EpochSampler(len(val_set), shuffle=False, seed=seed, rank=rank, world_size=world_size, pad=False)

    def loader(dataset, sampler, batch: int, last: bool, source: str, warn: bool) -> DataLoader:
        return CheckedDataLoader(
            SeededDataset(dataset), strict=strict, source=source, warn_skipped=warn, noun="video clip",
            item="video clip", batch_size=batch, sampler=sampler, drop_last=last, collate_fn=collate_skip_corrupt,
            # A private generator: DataLoader's per-epoch base seed must not advance the global torch RNG.
            generator=torch.Generator().manual_seed(seed), **workers)

    # The trainer counts and warns about skipped training clips itself; nothing else reports evaluation ones.
    train_loader = loader(train_set, train_sampler, batch_size, drop_last,
                          f"the training clips of {root / data_cfg['train_list']}", False)
    val_loader = loader(val_set, val_sampler, eval_batch_size, False,
                        f"the validation clips of {root / data_cfg['val_list']}", True)
    if len(train_loader) == 0:
        raise DataError(f"training set too small: {train_sampler.num_samples} clips per rank < batch_size={batch_size} "
                        "with drop_last=True; lower recipe.batch_size or set recipe.drop_last=false")
    return VideoData(train_loader, val_loader, train_sampler, num_classes, list(splits.classes))
