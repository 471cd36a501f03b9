"""Shared-memory buffers that a DataLoader worker reuses from batch to batch, sent to the main process once.

A worker sends each batch's large tensors (images, point clouds, map masks) to the main process through shared
memory. torch's default (a fresh segment per tensor, as in `default_collate`) costs, per sample of the synthetic
set with `configs/base.yaml` (8.3 MB), about 6 ms of page faults and zeroing in the worker, and each segment's
file descriptor then travels over an authenticated socket (`multiprocessing.resource_sharer`): several more ms of
worker time and ~0.5 ms of the main process's per tensor.

Here a worker keeps its segments (`SharedPool`). A segment's file descriptor is sent with the first batch that
uses it; the main process keeps that mapping (`unpack`) and later batches name the segment by key. Each segment
has a busy flag (an int64 after the data, in the shared memory itself): the worker sets it when it hands the
segment out, and the main process clears it when the last tensor, view or numpy array on that batch's memory is
gone. So a batch the main process holds on to is never overwritten: its segments stay busy and the worker uses
or allocates others. A worker keeps at most `MAX_SEGMENTS` and allocates unkept (ordinary shared) memory beyond
that; segments it drops are named in its next batch so the main process unmaps them too, and the main process
forgets the segments of worker processes that have exited.
"""

from __future__ import annotations

import os
import weakref
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import get_worker_info

# Tensors up to this size are pickled inline (as bytes) rather than shared: see `perception.data.batch`.
INLINE_PICKLE_BYTES = 64 * 1024
MAX_SEGMENTS = 32  # a cap, not an allocation: a worker keeps as many as are busy at once (in flight + held)
_FLAG_BYTES = 8  # one int64; data capacity is kept a multiple of 8 so the flag is aligned
_HEADROOM = 1.25  # a new segment holds this much more than asked, so that the next, slightly larger cloud fits


@dataclass(frozen=True)
class Pooled:
    """A pooled tensor as pickled by a worker: its segment (`key`: worker pid, pool token, serial), the
    segment's storage on first use only (else None: the receiver kept it), the tensor's layout, and the keys
    of segments the worker has dropped since its last message."""

    key: tuple[int, int, int]
    storage: torch.UntypedStorage | None
    dtype: torch.dtype
    shape: tuple[int, ...]
    capacity: int
    dropped: tuple[tuple[int, int, int], ...] = ()


class _Segment:
    def __init__(self, key: tuple[int, int, int], capacity: int):
        self.key, self.capacity, self.sent = key, capacity, False
        self.handed = False  # packed for the receiver: from then on only the receiver frees it
        self.storage = torch.UntypedStorage._new_shared(capacity + _FLAG_BYTES)
        self.flag = _flag_view(self.storage, capacity)
        self.flag.zero_()

    @property
    def busy(self) -> bool:
        return bool(self.flag.item())


def _flag_view(storage: torch.UntypedStorage, capacity: int) -> Tensor:
    return torch.empty(0, dtype=torch.int64).set_(storage, capacity // _FLAG_BYTES, (1,))


class SharedPool:
    """The kept segments of one process (a DataLoader worker). Not thread-safe (a worker collates on one thread)."""

    def __init__(self, max_segments: int = MAX_SEGMENTS):
        self.max_segments = max_segments
        self.segments: dict[int, _Segment] = {}  # storage data_ptr -> segment
        self.token = int.from_bytes(os.urandom(6), "little")
        self._serial = 0
        self._dropped: list[tuple[int, int, int]] = []
        self.reused = self.allocated = 0

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
        """An uninitialised contiguous tensor of `shape`/`dtype` in a free kept segment (busy from now on), or in
        fresh shared memory when every kept segment is busy and the pool is full."""
        shape = tuple(int(n) for n in shape)
        numel = 1
        for n in shape:
            numel *= n
        nbytes = numel * torch.empty(0, dtype=dtype).element_size()
        free = [s for s in self.segments.values() if s.capacity >= nbytes and not s.busy]
        if free:
            seg = min(free, key=lambda s: s.capacity)
            self.reused += 1
        else:
            if len(self.segments) >= self.max_segments:
                idle = [s for s in self.segments.values() if not s.busy]
                if not idle:
                    storage = torch.UntypedStorage._new_shared(max(nbytes, 1))
                    return torch.empty(0, dtype=dtype).set_(storage, 0, shape)
                victim = min(idle, key=lambda s: s.capacity)
                del self.segments[victim.storage.data_ptr()]
                if victim.sent:
                    self._dropped.append(victim.key)
            self._serial += 1
            capacity = -(-max(int(nbytes * _HEADROOM), _FLAG_BYTES) // _FLAG_BYTES) * _FLAG_BYTES
            seg = _Segment((os.getpid(), self.token, self._serial), capacity)
            self.segments[seg.storage.data_ptr()] = seg
            self.allocated += 1
        seg.flag.fill_(1)
        seg.handed = False
        return torch.empty(0, dtype=dtype).set_(seg.storage, 0, shape)

    def array(self, shape: tuple[int, ...], dtype) -> np.ndarray:
        """`empty` as a numpy array, for a dataset item to write its output straight into shared memory. The
        segment is freed again when the array and every view of it are gone in this process, unless it was
        packed for the receiver first (a batch of one item, sent as it is: then the receiver frees it)."""
        t = self.empty(shape, torch.from_numpy(np.empty(0, dtype)).dtype)
        array = t.numpy()
        seg = self.segments.get(t.untyped_storage().data_ptr())
        if seg is not None:
            weakref.finalize(array, _free_unless_handed, seg)
        return array

    def holds(self, t: Tensor) -> bool:
        """`t` starts at the beginning of one of this pool's kept segments and is contiguous (`pack` sends it)."""
        return (t.untyped_storage().data_ptr() in self.segments and t.storage_offset() == 0
                and t.is_contiguous())

    def pack(self, t: Tensor) -> Pooled | None:
        """`t` as a `Pooled` if it is a whole-segment-prefix tensor of one of this pool's kept segments."""
        if not self.holds(t):
            return None
        seg = self.segments[t.untyped_storage().data_ptr()]
        first, seg.sent, seg.handed = not seg.sent, True, True
        dropped, self._dropped = tuple(self._dropped), []
        return Pooled(seg.key, seg.storage if first else None, t.dtype, tuple(t.shape), seg.capacity, dropped)


def _free_unless_handed(seg: _Segment) -> None:
    if not seg.handed:
        seg.flag.zero_()


_POOL: SharedPool | None = None
_POOL_PID: int | None = None


def worker_pool() -> SharedPool:
    """This process's pool (a forked worker gets its own, never its parent's segments)."""
    global _POOL, _POOL_PID
    if _POOL is None or _POOL_PID != os.getpid():
        _POOL, _POOL_PID = SharedPool(), os.getpid()
    return _POOL


def output_array(shape: tuple[int, ...], dtype) -> np.ndarray:
    """An uninitialised numpy array for a dataset item's large output: in a DataLoader worker (and larger than
    `INLINE_PICKLE_BYTES`) in the worker's pool, so that a batch of one item reaches the main process with no copy;
    elsewhere ordinary memory."""
    dtype = np.dtype(dtype)
    nbytes = dtype.itemsize * int(np.prod(shape, dtype=np.int64))
    if get_worker_info() is None or nbytes <= INLINE_PICKLE_BYTES:
        return np.empty(shape, dtype)
    return worker_pool().array(tuple(shape), dtype)


def pack(t: Tensor) -> Pooled | None:
    """In a worker, while pickling: `SharedPool.pack` of this process's pool (None when it has none or `t` is
    not pooled: then `t` is pickled as usual)."""
    if _POOL is None or _POOL_PID != os.getpid() or not isinstance(t, Tensor) or t.device.type != "cpu":
        return None
    return _POOL.pack(t)


# Receiving side: the segments of each sending worker, by key, mapped once.
_RECEIVED: dict[tuple[int, int, int], torch.UntypedStorage] = {}
_SENDERS: set[int] = set()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def unpack(p: Pooled) -> Tensor:
    """In the receiving process: the tensor `p` describes, on the sender's segment. The segment's busy flag is
    cleared when the last tensor, view or numpy array on the returned tensor's memory is gone."""
    for key in p.dropped:
        _RECEIVED.pop(key, None)
    pid = p.key[0]
    if pid not in _SENDERS:  # a new worker: forget the segments of workers that have exited
        _SENDERS.add(pid)
        for gone in [q for q in _SENDERS if q != pid and not _alive(q)]:
            _SENDERS.discard(gone)
            for key in [k for k in _RECEIVED if k[0] == gone]:
                del _RECEIVED[key]
    if p.storage is not None:
        _RECEIVED[p.key] = p.storage
    storage = _RECEIVED.get(p.key)
    if storage is None:
        raise RuntimeError(f"shared segment {p.key} was never received: a worker's first batch on it was lost")
    flag = _flag_view(storage, p.capacity)
    array = torch.empty(0, dtype=p.dtype).set_(storage, 0, p.shape).numpy()  # holds the storage alive
    out = torch.from_numpy(array)  # its storage holds `array`: every view of `out` keeps it alive
    weakref.finalize(array, flag.zero_)
    return out
