"""Deterministic, resumable sampling: augmentations depend only on (seed, epoch, index).

Why: a run stopped after epoch k (or mid-epoch) and resumed in a new process
must see exactly the same images *and the same random augmentations* as an
uninterrupted run, whatever ``num_workers`` is.  Worker RNG streams depend on
how samples are distributed over workers and on how long a worker has been
alive, so they cannot give that guarantee.  Instead the sampler hands every
sample its own seed, and :class:`SeededDataset` reseeds all global RNGs from it
right before loading that sample.
"""

from __future__ import annotations

import random
from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler, get_worker_info

__all__ = ["EpochSampler", "SeededDataset", "sample_seeds"]

_MASK64 = (1 << 64) - 1


def _splitmix64(x: np.ndarray) -> np.ndarray:
    # SplitMix64 finaliser: cheap, well-mixed, and identical on every platform
    # and process (unlike hash() of strings).  uint64 arrays wrap on overflow.
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def sample_seeds(seed: int, epoch: int, indices: Sequence[int] | np.ndarray) -> np.ndarray:
    """Per-sample 63-bit seeds (int64, non-negative) as a pure function of (seed, epoch, index).

    Vectorised so a full ImageNet epoch costs milliseconds.
    """
    idx = np.atleast_1d(np.asarray(indices, dtype=np.int64)).astype(np.uint64)
    head = _splitmix64(np.array([int(seed) & _MASK64], dtype=np.uint64))
    head = _splitmix64(head ^ np.uint64(int(epoch) & _MASK64))
    mixed = _splitmix64(head ^ idx)
    # 63 bits so the value fits a signed int64 and any seeding API.
    return (mixed >> np.uint64(1)).astype(np.int64)


class EpochSampler(Sampler[tuple[int, int]]):
    """Yields ``(index, sample_seed)`` for this rank; order fixed by ``(seed, epoch)``.

    * shuffle: permutation from ``torch.Generator().manual_seed(seed + epoch)``,
      identical on every rank, then split like ``DistributedSampler``:
      rank r takes ``indices[r::world_size]``.
    * pad=True (training): the permutation is padded by wrapping around so
      every rank gets ``ceil(N / world_size)`` samples (equal step counts keep
      DDP collectives in lock-step).  pad=False (evaluation): no duplicates,
      ranks may differ by one sample.
    * drop_last=True: the tail is cut instead, ``N // world_size`` per rank.
    * ``set_start(n)`` skips the first n samples of *this rank's* stream on
      the next iteration only (mid-epoch resume); ``len()`` is the remainder.

    The sampler lives in the main process, so ``set_epoch`` works even with
    persistent workers.
    """

    def __init__(
        self,
        dataset_len: int,
        *,
        shuffle: bool,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
        pad: bool = True,
    ) -> None:
        if dataset_len < 0:
            raise ValueError(f"dataset_len must be >= 0, got {dataset_len}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.dataset_len = int(dataset_len)
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.drop_last = bool(drop_last)
        self.pad = bool(pad)
        self.epoch = 0
        self._start = 0

    @property
    def num_samples(self) -> int:
        """Samples this rank sees in a full (not resumed) epoch."""
        n, w = self.dataset_len, self.world_size
        if self.drop_last:
            return n // w
        if self.pad:
            return -(-n // w)
        return len(range(self.rank, n, w))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def set_start(self, num_samples_to_skip: int) -> None:
        """Skip this many samples of this rank's stream in the next ``__iter__`` only."""
        skip = int(num_samples_to_skip)
        if not 0 <= skip <= self.num_samples:
            raise ValueError(f"cannot skip {skip} samples of an epoch with {self.num_samples} on this rank")
        self._start = skip

    def epoch_indices(self) -> np.ndarray:
        """This rank's full index order for the current epoch (no skip applied)."""
        n, w = self.dataset_len, self.world_size
        if self.shuffle:
            gen = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(n, generator=gen).numpy()
        else:
            order = np.arange(n, dtype=np.int64)
        if self.drop_last:
            order = order[: (n // w) * w]
        elif self.pad and n > 0:
            total = self.num_samples * w
            if total > n:
                # np.resize repeats from the start, like DistributedSampler's padding.
                order = np.resize(order, total)
        return order[self.rank :: w]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        # Not a generator function: the skip must be consumed when iteration
        # starts, so that a later len() reports the full next epoch.
        indices = self.epoch_indices()[self._start :]
        self._start = 0
        seeds = sample_seeds(self.seed, self.epoch, indices)
        return iter(zip(indices.tolist(), seeds.tolist()))

    def __len__(self) -> int:
        return self.num_samples - self._start


class SeededDataset(Dataset):
    """Wraps a map-style dataset; ``ds[(index, sample_seed)]`` reseeds RNGs, then loads ``index``.

    torch (CPU generator), ``random`` and ``numpy.random`` are all seeded, since
    torchvision, timm's RandAugment and user transforms use different ones.
    In the main process (``num_workers=0``) the previous RNG states are put
    back afterwards so data loading does not perturb training randomness
    (dropout, mixup, ...).  Inside worker processes nothing needs restoring.
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    @staticmethod
    def _seed_all(sample_seed: int) -> None:
        # default_generator rather than torch.manual_seed: the latter would also
        # reseed CUDA generators in the main process.
        torch.default_generator.manual_seed(sample_seed)
        random.seed(sample_seed)
        np.random.seed(sample_seed & 0xFFFFFFFF)  # numpy's legacy seeding takes 32 bits

    def __getitem__(self, key: tuple[int, int]):
        index, sample_seed = key
        if get_worker_info() is not None:
            self._seed_all(sample_seed)
            return self.dataset[index]
        saved = (torch.get_rng_state(), random.getstate(), np.random.get_state())
        try:
            self._seed_all(sample_seed)
            return self.dataset[index]
        finally:
            torch.set_rng_state(saved[0])
            random.setstate(saved[1])
            np.random.set_state(saved[2])
