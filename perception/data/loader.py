"""Training batches: which samples each rank draws in an epoch (`EpochSampler`) and the `DataLoader` that
collates them into `Batch`es (`make_loader`).

An epoch is a permutation of the split seeded by (seed, epoch), cut into global batches of
``micro_batch x world_size x accumulate`` samples, so that every rank and every resumed run agrees on which
sample goes into which optimizer step.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
from typing import Iterator

import cv2
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from perception.data.collate import collate_samples

# glibc mallopt parameters (malloc.h): M_TRIM_THRESHOLD, M_MMAP_THRESHOLD.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def data_worker_init(worker_id: int) -> None:
    """`worker_init_fn` of every DataLoader of samples (training, evaluation, `perception bench data`).

    glibc keeps freed blocks up to 64 MB on the heap (mmap threshold 64 MB, trim threshold 256 MB) instead of
    returning each to the kernel: every item allocates multi-MB point clouds and images, and fresh pages cost a
    fault each (measured: LiDAR loading of 10 sweeps 18 -> 9.5 ms on the synthetic set). Skipped where the C
    library is not glibc. (OpenCV's thread count is set by `SampleLoader` in the parent, not here: in a forked
    worker whose parent already ran OpenCV's thread pool `cv2.setNumThreads` deadlocks.)
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    mallopt(_M_MMAP_THRESHOLD, 64 << 20)
    mallopt(_M_TRIM_THRESHOLD, 256 << 20)


@contextlib.contextmanager
def _single_threaded_opencv():
    """OpenCV runs on one thread in the worker processes started inside this block (fork: the parent's setting is
    inherited; spawn/forkserver: a fresh interpreter reads OPENCV_FOR_THREADS_NUM when it imports cv2); the
    parent's own setting is restored on exit."""
    threads, env = cv2.getNumThreads(), os.environ.get("OPENCV_FOR_THREADS_NUM")
    cv2.setNumThreads(1)
    os.environ["OPENCV_FOR_THREADS_NUM"] = "1"
    try:
        yield
    finally:
        cv2.setNumThreads(threads)
        if env is None:
            os.environ.pop("OPENCV_FOR_THREADS_NUM", None)
        else:
            os.environ["OPENCV_FOR_THREADS_NUM"] = env


class SampleLoader(DataLoader):
    """A `DataLoader` whose worker processes run OpenCV on one thread each (and set up glibc's allocator with
    `data_worker_init` unless another `worker_init_fn` is given).

    OpenCV's default pool has one thread per core in every process: with a worker per core, the warps of each item
    fan out over threads that wait on one another. Measured on the synthetic set (`configs/base.yaml`, 2 workers,
    2 cores): 70 -> 60 ms of worker CPU per sample. With no workers, the loading process keeps its own setting.
    """

    def __init__(self, dataset: Dataset, **kwargs):
        if kwargs.get("num_workers", 0) and kwargs.get("worker_init_fn") is None:
            kwargs["worker_init_fn"] = data_worker_init
        super().__init__(dataset, **kwargs)

    def __iter__(self):
        if self.num_workers == 0:
            return super().__iter__()
        with _single_threaded_opencv():  # the workers start in here (every epoch: they are not persistent)
            return super().__iter__()


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
    return SampleLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                        collate_fn=collate_samples, persistent_workers=False, pin_memory=torch.cuda.is_available())


class SequenceSampler(Sampler[int]):
    """Indices for streaming temporal training: each of the ``micro_batch x world_size`` batch slots walks
    keyframes in time order, so slot s of consecutive micro-batches holds consecutive keyframes of one scene
    (the temporal state of slot s, `perception.model.temporal.TemporalState`, carries over between them).

    Each epoch, the scenes are concatenated in a seeded order (seed, epoch), each in time order, and that one
    sequence is cut into ``slots`` contiguous streams of exactly ``N // slots`` samples (the remainder is left
    out), so every epoch and every rank has the same number of micro-batches (DDP ranks step together, and a
    resumed run knows where it is), and no sample goes to two slots. A rank yields the micro-batches of slots
    ``rank * micro_batch ...``; `start_batch` skips that many of its micro-batches (resuming mid-epoch).
    `is_first` says which yielded positions have no history in their slot (a stream's first keyframe, or the
    first keyframe of the next scene).

    Args:
        scene_of: (N,) a scene key per sample (any hashable), e.g. the sample's scene token.
        timestamps: (N,) the samples' times (order within a scene).
    """

    def __init__(self, scene_of, timestamps, *, micro_batch: int, world_size: int = 1, rank: int = 0, seed: int = 0,
                 epoch: int = 0, shuffle: bool = True, start_batch: int = 0):
        if len(scene_of) != len(timestamps):
            raise ValueError(f"SequenceSampler: {len(scene_of)} scene keys for {len(timestamps)} timestamps")
        scenes: dict = {}
        for i, key in enumerate(scene_of):
            scenes.setdefault(key, []).append(i)
        self.scenes = [sorted(v, key=lambda i: timestamps[i]) for v in scenes.values()]
        self.scene_of = list(scene_of)
        self.mb, self.world, self.rank = micro_batch, world_size, rank
        self.seed, self.epoch, self.shuffle, self.start_batch = seed, epoch, shuffle, start_batch

    def batches_per_epoch(self) -> int:
        """Micro-batches a rank yields in a whole epoch (the same every epoch)."""
        return len(self.scene_of) // (self.mb * self.world)

    def streams(self) -> list[list[int]]:
        """The ``micro_batch x world_size`` slot streams of this epoch, each ``batches_per_epoch()`` long."""
        order = list(range(len(self.scenes)))
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
            order = torch.randperm(len(order), generator=g).tolist()
        sequence = [i for s in order for i in self.scenes[s]]
        length = self.batches_per_epoch()
        return [sequence[k * length:(k + 1) * length] for k in range(self.mb * self.world)]

    def is_first(self) -> list[bool]:
        """For each index this rank yields (in order): nothing before it in its slot belongs to its scene."""
        mine = self.streams()[self.rank * self.mb:(self.rank + 1) * self.mb]
        first = [[k == 0 or self.scene_of[stream[k - 1]] != self.scene_of[stream[k]] for k in range(len(stream))]
                 for stream in mine]
        return [first[slot][step] for step in range(self.start_batch, self.batches_per_epoch()) for slot in range(self.mb)]

    def __len__(self) -> int:
        return max(0, self.batches_per_epoch() - self.start_batch) * self.mb

    def __iter__(self) -> Iterator[int]:
        mine = self.streams()[self.rank * self.mb:(self.rank + 1) * self.mb]
        for step in range(self.start_batch, self.batches_per_epoch()):
            for stream in mine:
                yield stream[step]

