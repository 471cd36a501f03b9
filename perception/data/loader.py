"""Training batches: which samples each rank draws in an epoch (`EpochSampler`; class-balanced: `CBGSSampler`;
temporal: `SequenceSampler`) and the `DataLoader` that collates them into `Batch`es (`make_loader`).

An epoch is a permutation of the split seeded by (seed, epoch), cut into global batches of
``micro_batch x world_size x accumulate`` samples, so that every rank and every resumed run agrees on which
sample goes into which optimizer step.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
from typing import Iterable, Iterator, Sequence

import cv2
import numpy as np
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


class CBGSSampler(Sampler[int]):
    """Class-balanced grouping and sampling (CBGS, Zhu et al. 2019, arXiv:1908.09492): `EpochSampler`'s order
    over an expanded list of sample ids in which each class's samples are repeated toward balance.

    The expansion is mmdetection3d's `CBGSDataset._get_sample_indices` (mmdet3d/datasets/dataset_wrappers.py):
    with C classes, ids_c the samples whose boxes include class c (a sample counts once per class it holds),
    n_c = len(ids_c), T = sum_c n_c, f_c = n_c / T and r_c = (1 / C) / f_c, class c contributes int(n_c * r_c)
    ids drawn from ids_c with replacement. As n_c * r_c = T / C, every class present gets T // C draws (computed
    in integers here: when C divides T, mmdet3d's float product often rounds down to T // C - 1); a class with no
    sample gets none (mmdet3d divides by zero). So the expanded list has (classes present) x (T // C) entries:
    with all classes present about T, the number of (sample, class) pairs, several times the split.

    Differences from mmdet3d: the draws are seeded by (seed, epoch) and redrawn every epoch (mmdet3d draws once
    for the whole run, so one draw's misses and repeats last all run). The expanded list is then shuffled, cut
    into global batches and sharded across ranks exactly as `EpochSampler` does with the split (`order`: over
    positions in the list; the incomplete last global batch is dropped, nothing is padded). One epoch is one
    pass over the expanded list: `batches_per_epoch` counts its global batches, and ``--epochs`` counts passes.

    CBGS reorders samples freely, so it does not combine with the temporal `SequenceSampler` (scenes streamed in
    time order): the config rejects ``train.cbgs`` with ``model.temporal.frames``.

    Args:
        sample_classes: (N,) per sample, the class ids (0 .. num_classes - 1) of its boxes; repeats are ignored.
        num_classes: C, the classes balanced over (`perception.structures.DETECTION_CLASSES`).
        The other arguments are `EpochSampler`'s.
    """

    def __init__(self, sample_classes: Sequence[Iterable[int]], *, num_classes: int, micro_batch: int,
                 world_size: int = 1, rank: int = 0, accumulate: int = 1, seed: int = 0, epoch: int = 0,
                 start_batch: int = 0):
        ids: list[list[int]] = [[] for _ in range(num_classes)]
        for i, classes in enumerate(sample_classes):
            for c in set(classes):
                ids[c].append(i)
        self.ids_of_class = [np.asarray(v, np.int64) for v in ids]
        per_class = sum(map(len, ids)) // num_classes  # int(n_c * r_c) = T // C
        self.draws = [per_class if len(v) else 0 for v in ids]
        self.seed, self.epoch = seed, epoch
        self.order = EpochSampler(sum(self.draws), micro_batch=micro_batch, world_size=world_size, rank=rank,
                                  accumulate=accumulate, seed=seed, epoch=epoch, start_batch=start_batch)

    def expanded(self) -> np.ndarray:
        """(L,) int64 sample ids of this epoch's expanded list, class by class (before `order` shuffles it)."""
        rng = np.random.default_rng([self.seed, self.epoch])
        return np.concatenate([np.zeros(0, np.int64)] + [ids[rng.integers(len(ids), size=k)]
                                                         for ids, k in zip(self.ids_of_class, self.draws) if k])

    def batches_per_epoch(self) -> int:
        """Complete global batches in one pass over the expanded list."""
        return self.order.batches_per_epoch()

    def __len__(self) -> int:
        return len(self.order)

    def __iter__(self) -> Iterator[int]:
        ids = self.expanded()
        return (int(ids[p]) for p in self.order)


def make_loader(dataset: Dataset, sampler: Sampler[int], batch_size: int, workers: int) -> DataLoader:
    """A `DataLoader` of `Batch`es (`collate_samples`) of `batch_size` samples drawn in `sampler`'s order, with
    `workers` worker processes (0: in this process); pinned memory when CUDA is available. The workers are not
    persistent: each iteration starts them with a fresh copy of `dataset` (so they see its `set_epoch`)."""
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

