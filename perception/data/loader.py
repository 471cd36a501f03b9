"""Training batches: which samples each rank draws in an epoch (`EpochSampler`) and the `DataLoader` that
collates them into `Batch`es (`make_loader`).

An epoch is a permutation of the split seeded by (seed, epoch), cut into global batches of
``micro_batch x world_size x accumulate`` samples, so that every rank and every resumed run agrees on which
sample goes into which optimizer step.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from perception.data.collate import collate_samples


class EpochSampler(Sampler[int]):
    """Indices of one epoch for one rank: a permutation seeded by (seed, epoch), cut into global batches of
    ``micro_batch x world_size x accumulate`` samples; micro-batch ``a * world_size + rank`` of each global
    batch goes to `rank` as its a-th accumulation step. Incomplete global batches are dropped.

    `start_batch` skips that many global batches (resuming mid-epoch).
    """

    def __init__(self, num_samples: int, *, micro_batch: int, world_size: int = 1, rank: int = 0, accumulate: int = 1,
                 seed: int = 0, epoch: int = 0, shuffle: bool = True, start_batch: int = 0):
        self.n, self.mb, self.world, self.rank, self.acc = num_samples, micro_batch, world_size, rank, accumulate
        self.seed, self.epoch, self.shuffle, self.start_batch = seed, epoch, shuffle, start_batch

    @property
    def global_batch(self) -> int:
        """Samples per optimizer step over all ranks and accumulation steps."""
        return self.mb * self.world * self.acc

    def batches_per_epoch(self) -> int:
        """Complete global batches in one epoch (the incomplete tail is dropped)."""
        return self.n // self.global_batch

    def __len__(self) -> int:
        return max(0, self.batches_per_epoch() - self.start_batch) * self.mb * self.acc

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
            perm = torch.randperm(self.n, generator=g).tolist()
        else:
            perm = list(range(self.n))
        for b in range(self.start_batch, self.batches_per_epoch()):
            chunk = perm[b * self.global_batch:(b + 1) * self.global_batch]
            for a in range(self.acc):
                m = a * self.world + self.rank
                yield from chunk[m * self.mb:(m + 1) * self.mb]


def make_loader(dataset: Dataset, sampler: Sampler[int], batch_size: int, workers: int) -> DataLoader:
    """A `DataLoader` of `Batch`es (`collate_samples`) of `batch_size` samples drawn in `sampler`'s order, with
    `workers` worker processes (0: in this process); pinned memory when CUDA is available."""
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, collate_fn=collate_samples,
                      persistent_workers=False, pin_memory=torch.cuda.is_available())
