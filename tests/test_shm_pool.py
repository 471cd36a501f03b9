"""Reused shared memory between DataLoader workers and the main process (`perception.data.shm_pool`): a batch the
main process keeps is never overwritten, dropped batches free their segments for reuse, descriptors travel once."""

from __future__ import annotations

import dataclasses
import pickle
import subprocess
import sys
from multiprocessing.reduction import ForkingPickler

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from perception.data import shm_pool
from perception.data.batch import INLINE_PICKLE_BYTES
from perception.data.collate import collate_samples
from perception.data.dataset import DatasetConfig, NuScenesDataset
from perception.data.loader import SampleLoader
from perception.data.transforms import ImageAugConfig


class _Marked(Dataset):
    """Item i: a real sample with every pixel, point coordinate and map cell set to i (and a point count that
    varies with i, so segments must fit clouds of different sizes)."""

    def __init__(self, sample, n: int):
        self.sample, self.n = sample, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        s = self.sample
        points = torch.full((4000 + 500 * (i % 5), 5), float(i))
        return dataclasses.replace(s, images=torch.full_like(s.images, i), points_lidar=points,
                                   map_masks=torch.full_like(s.map_masks, i % 2))


@pytest.fixture(scope="module")
def sample(synth_root):
    ds = NuScenesDataset(synth_root, "v1.0-mini", None, config=DatasetConfig(
        image=ImageAugConfig(final_hw=(64, 176), resize_lim=(0.44, 0.44)), train=False, lidar_sweeps=1, radar_sweeps=1))
    return ds[0]


def _check(batch, i: int, what: str) -> None:
    assert bool((batch.images == i).all()), f"{what}: images of item {i} were overwritten"
    assert bool((batch.points_lidar == float(i)).all()), f"{what}: points of item {i} were overwritten"
    assert len(batch.points_lidar) == 4000 + 500 * (i % 5)
    assert bool((batch.map_masks == float(i % 2)).all())


def test_kept_batches_and_views_survive_while_dropped_batches_are_reused(sample):
    n = 30
    loader = SampleLoader(_Marked(sample, n), batch_size=1, num_workers=1, collate_fn=collate_samples,
                          sampler=list(range(n)), prefetch_factor=2)
    first_sends = []
    real_unpack = shm_pool.unpack

    def spy(p):
        first_sends.append(p.storage is not None)
        return real_unpack(p)

    kept, views = {}, {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("perception.data.batch.unpack", spy)
        for i, batch in enumerate(loader):
            _check(batch, i, "fresh")
            if i % 10 == 0:
                kept[i] = batch  # held by the main process across the rest of the epoch
            elif i % 10 == 5:
                views[i] = batch.points_lidar[100:200]  # only a view of one field is kept
            for j, b in kept.items():
                _check(b, j, f"kept, after item {i}")
            for j, v in views.items():
                assert bool((v == float(j)).all()), f"a view of item {j} was overwritten after item {i}"
    fields = 3 if sample.map_masks.numel() * 4 > INLINE_PICKLE_BYTES else 2  # images, LiDAR points (map masks)
    assert len(first_sends) == fields * n  # every batch's large tensors came through the pool
    # Descriptors travel once per segment: far fewer than once per tensor, so segments were reused ...
    assert sum(first_sends) < n
    # ... but never one that the main process still held (kept batches and views pin theirs).
    assert sum(first_sends) >= fields + len(kept) * fields + len(views)


def test_pool_flags_packing_and_fallback():
    pool = shm_pool.SharedPool(max_segments=2)
    a = pool.empty((1000,), torch.float32)
    b = pool.empty((10, 10), torch.uint8)
    assert pool.allocated == 2
    c = pool.empty((100,), torch.float32)  # both kept segments busy, pool full: ordinary shared memory
    assert pool.pack(c) is None and c.is_shared()

    # The receiving side: same memory, no copy; the segment is busy until every view of it is gone.
    packed = pool.pack(a)
    assert packed.storage is not None  # first use: the storage (and so its descriptor) is sent
    received = shm_pool.unpack(packed)
    received.fill_(3.0)
    assert bool((a == 3.0).all())
    seg_a = pool.segments[a.untyped_storage().data_ptr()]
    view = received[10:20]
    del received
    assert seg_a.busy
    del view
    assert not seg_a.busy

    # A free segment that is large enough is reused, and then sent by key alone.
    d = pool.empty((500,), torch.float32)
    assert d.untyped_storage().data_ptr() == a.untyped_storage().data_ptr() and pool.reused == 1
    packed = pool.pack(d)
    assert packed.storage is None
    received = shm_pool.unpack(packed)
    assert bool((received == 3.0).all())  # the receiver's mapping from the first message
    del received

    # When the pool is full, a free segment that is too small is dropped and named in the next message, and the
    # receiver forgets it.
    key_b = pool.segments[b.untyped_storage().data_ptr()].key
    shm_pool.unpack(pool.pack(b))
    assert key_b in shm_pool._RECEIVED
    e = pool.empty((10_000,), torch.float32)  # fits in neither kept segment: the smaller free one (b's) goes
    assert pool.allocated == 3 and len(pool.segments) == 2
    packed = pool.pack(e)
    assert packed.dropped == (key_b,)
    shm_pool.unpack(packed)
    assert key_b not in shm_pool._RECEIVED


def test_receiver_forgets_segments_of_exited_workers():
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    storage = torch.UntypedStorage._new_shared(64)
    stale = shm_pool.Pooled((dead_pid, 1, 1), storage, torch.uint8, (8,), 56)
    shm_pool._SENDERS.discard(dead_pid)
    shm_pool.unpack(stale)  # (that process has exited: its entry is kept only until another sender appears)
    assert (dead_pid, 1, 1) in shm_pool._RECEIVED
    live = shm_pool.Pooled((-12345, 2, 1), torch.UntypedStorage._new_shared(64), torch.uint8, (8,), 56)
    shm_pool._SENDERS.discard(-12345)
    with pytest.MonkeyPatch.context() as mp:  # a new sender: the receiver checks which senders still run
        mp.setattr(shm_pool, "_alive", lambda pid: pid != dead_pid)
        shm_pool.unpack(live)
    assert (dead_pid, 1, 1) not in shm_pool._RECEIVED and (-12345, 2, 1) in shm_pool._RECEIVED
    shm_pool._RECEIVED.pop((-12345, 2, 1))
    with pytest.raises(RuntimeError, match="never received"):
        shm_pool.unpack(dataclasses.replace(live, storage=None))


def test_a_batch_collated_in_the_main_process_pickles_as_before(sample):
    batch = collate_samples([sample])
    assert shm_pool.pack(batch.images) is None  # no pool in the main process
    back = pickle.loads(ForkingPickler.dumps(batch))
    assert torch.equal(back.images, batch.images) and torch.equal(back.points_lidar, batch.points_lidar)
    assert np.array_equal(back.num_boxes.numpy(), batch.num_boxes.numpy())


def test_items_written_straight_into_the_pool_arrive_intact(synth_root):
    """The dataset writes images and LiDAR points into the worker's pool (`output_array`): a batch of one item is
    sent without a copy, larger batches are copied and the items' segments freed. Every batch, kept or dropped,
    equals the same items loaded and collated in this process."""
    ds = NuScenesDataset(synth_root, "v1.0-mini", None, config=DatasetConfig(
        image=ImageAugConfig(final_hw=(64, 176)), train=False, lidar_sweeps=2, radar_sweeps=1))
    n = 10
    for batch_size in (1, 2):
        refs = [collate_samples([ds[i] for i in range(k, k + batch_size)]) for k in range(0, n, batch_size)]
        assert refs[0].points_lidar.numel() * 4 > INLINE_PICKLE_BYTES and refs[0].images.numel() > INLINE_PICKLE_BYTES

        def loader():
            return SampleLoader(ds, batch_size=batch_size, num_workers=1, collate_fn=collate_samples,
                                sampler=list(range(n)), prefetch_factor=2)

        kept = list(loader())  # all held at once: nothing may be reused under them
        for _ in range(2):  # dropped as they come: segments are reused
            for b, ref in zip(loader(), refs):
                assert torch.equal(b.images, ref.images) and torch.equal(b.points_lidar, ref.points_lidar)
        for b, ref in zip(kept, refs, strict=True):
            assert torch.equal(b.images, ref.images) and torch.equal(b.points_lidar, ref.points_lidar)
            assert torch.equal(b.map_masks, ref.map_masks) and torch.equal(b.boxes, ref.boxes)


def test_a_pinning_loader_pins_every_tensor_of_a_batch(sample):
    """With `pin_memory=True` (CUDA training), the DataLoader's pinning thread pins the Batch's tensors (it leaves
    objects of types it does not know untouched unless they have `pin_memory`). Pinning itself needs CUDA, so it
    is recorded here instead."""
    from torch.utils.data._utils.pin_memory import pin_memory

    batch = collate_samples([sample])
    pinned_ids = []

    def fake_pin(t, *args, **kwargs):
        out = t.clone()
        pinned_ids.append(id(out))
        return out

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.Tensor, "pin_memory", fake_pin)
        out = pin_memory(batch)
    tensors = [f.name for f in dataclasses.fields(batch) if isinstance(getattr(batch, f.name), torch.Tensor)]
    assert type(out).__name__ == "Batch" and {id(getattr(out, n)) for n in tensors} <= set(pinned_ids)
    assert all(torch.equal(getattr(out, n), getattr(batch, n)) for n in tensors) and out.meta == batch.meta
