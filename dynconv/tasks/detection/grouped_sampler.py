"""Aspect-ratio grouped batches that are deterministic per (seed, epoch), sharded, and resumable.

Why group: the detector pads every image of a batch to the batch's largest height and width; mixing a
landscape and a portrait image pads both to a square and wastes up to half the compute.  Batches are
therefore formed from images of one group (w >= h or w < h, read from the annotation JSON, never by
decoding images).

Why batches are formed globally and then dealt to ranks: the number of batches then depends only on how
many images each group has, not on the epoch's permutation, so ``len()`` is the same every epoch (the lr
schedule counts on it) and on every rank (DDP collectives stay in lock-step).
"""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Sampler

from dynconv.data.seeded import sample_seeds

__all__ = ["GroupedBatchSampler"]


class GroupedBatchSampler(Sampler[list[tuple[int, int]]]):
    """Yields this rank's batches as lists of ``(index, sample_seed)`` (what SeededDataset takes).

    Per epoch: a permutation from ``torch.Generator().manual_seed(seed + epoch)`` (identical on every
    rank, like EpochSampler); scanning it, each image joins its group's open batch and a batch is emitted
    when full.  A group's last partial batch is completed with that group's first images of the epoch
    (wrapping), so every batch has ``batch_size`` images.  The batch list is padded by wrapping to a
    multiple of ``world_size`` and rank r takes batches ``r::world_size``.

    ``set_start(num_samples)`` skips the first ``num_samples // batch_size`` batches of the next
    ``__iter__`` only (mid-epoch resume); ``len()`` is the number of batches that iteration yields.
    """

    def __init__(
        self,
        group_ids: Sequence[int],
        batch_size: int,
        *,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.group_ids = np.asarray(group_ids, dtype=np.int64).reshape(-1)
        if len(self.group_ids) == 0:
            raise ValueError("GroupedBatchSampler needs at least one item")
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.epoch = 0
        self._start = 0
        counts = np.bincount(self.group_ids - self.group_ids.min())
        self._global_batches = int(sum(-(-int(c) // self.batch_size) for c in counts if c > 0))

    @property
    def num_batches(self) -> int:
        """Batches this rank yields in a full (not resumed) epoch; the same every epoch and on every rank."""
        return -(-self._global_batches // self.world_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def set_start(self, num_samples_to_skip: int) -> None:
        """Skip the batches holding the first ``num_samples_to_skip`` samples of this rank's next epoch."""
        skip = int(num_samples_to_skip) // self.batch_size
        if not 0 <= skip <= self.num_batches:
            raise ValueError(f"cannot skip {num_samples_to_skip} samples ({skip} batches) of an epoch with "
                             f"{self.num_batches} batches of {self.batch_size} on this rank")
        self._start = skip

    def _all_batches(self) -> list[list[int]]:
        gen = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.group_ids), generator=gen).tolist()
        open_batches: dict[int, list[int]] = {}
        first_members: dict[int, list[int]] = {}
        batches: list[list[int]] = []
        for index in order:
            group = int(self.group_ids[index])
            first_members.setdefault(group, [])
            if len(first_members[group]) < self.batch_size:
                first_members[group].append(index)
            batch = open_batches.setdefault(group, [])
            batch.append(index)
            if len(batch) == self.batch_size:
                batches.append(batch)
                open_batches[group] = []
        for group in sorted(open_batches):
            partial = open_batches[group]
            if partial:
                # np.resize repeats from the start: enough even when the group is smaller than a batch.
                fill = np.resize(np.asarray(first_members[group]), self.batch_size - len(partial)).tolist()
                batches.append(partial + fill)
        return batches

    def epoch_batches(self) -> list[list[int]]:
        """This rank's batches (dataset indices) for the current epoch, no skip applied."""
        batches = self._all_batches()
        total = self.num_batches * self.world_size
        batches = [batches[k % len(batches)] for k in range(total)]
        return batches[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        # Not a generator function: the skip is consumed when iteration starts, so that a later len()
        # reports the full next epoch (same contract as EpochSampler).
        batches = self.epoch_batches()[self._start :]
        self._start = 0
        flat = np.asarray([i for batch in batches for i in batch], dtype=np.int64)
        seeds = iter(sample_seeds(self.seed, self.epoch, flat).tolist())
        return iter([[(index, next(seeds)) for index in batch] for batch in batches])

    def __len__(self) -> int:
        return self.num_batches - self._start
