"""Caches of derived data: under $PERCEPTION_CACHE, keyed by what they were built from, never in the dataroot."""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest

from perception.cache import cache_dir, cache_path
from perception.config import load_config
from perception.data.gt_sampling import GTDatabase
from perception.training import RunSpec, Trainer
from tests.test_training import FAST, TINY


def _listing(root: Path) -> dict[str, tuple[int, int]]:
    """{relative path: (size, mtime ns)} of every file and folder under `root`."""
    out = {}
    for path in sorted(root.rglob("*")):
        st = path.stat()
        out[str(path.relative_to(root))] = (st.st_size if path.is_file() else 0, st.st_mtime_ns)
    return out


def _set_writable(root: Path, writable: bool) -> None:
    for path in [root, *root.rglob("*")]:
        mode = path.stat().st_mode
        os.chmod(path, mode | stat.S_IWUSR if writable else mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))


def test_cache_dir_and_paths(tmp_path, monkeypatch):
    monkeypatch.setenv("PERCEPTION_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    key = {"split": "train", "version": "v1.0-mini"}
    path = cache_path("gt_database", key, ".npz")
    assert path.parent == tmp_path / "c" / "gt_database" and path.suffix == ".npz"
    assert cache_path("gt_database", dict(reversed(key.items())), ".npz") == path  # key order does not matter
    assert cache_path("gt_database", {**key, "split": "val"}, ".npz") != path
    monkeypatch.delenv("PERCEPTION_CACHE")
    assert cache_dir() == Path.home() / ".cache" / "perception"


@pytest.mark.slow
def test_gt_database_is_cached_outside_a_read_only_dataroot_and_hit_on_the_second_run(synth_root, tmp_path, monkeypatch):
    root = tmp_path / "readonly" / "nuscenes"
    shutil.copytree(synth_root, root)
    _set_writable(root, False)  # root ignores the permission bits: the listing below is the real check
    before = _listing(root)
    monkeypatch.setenv("PERCEPTION_CACHE", str(tmp_path / "cache"))
    builds = []
    build = GTDatabase.build.__func__

    def counting_build(cls, dataset, min_points=5, grid=None):
        builds.append(dataset.split)
        return build(cls, dataset, min_points, grid)

    monkeypatch.setattr(GTDatabase, "build", classmethod(counting_build))
    cfg = load_config(TINY, FAST + ["train.gt_sampling=true"])

    def gt_database(run: str) -> GTDatabase:
        trainer = Trainer(cfg, RunSpec(data=root, work_dir=tmp_path / run, max_steps=1, device="cpu", progress=False))
        trainer.close()
        return trainer.train_set.gt_sampler.db

    first = gt_database("run1")
    assert builds == ["mini_train"]
    cached = list((tmp_path / "cache" / "gt_database").glob("*.npz"))
    assert len(cached) == 1 and cached[0].with_suffix(".json").is_file()
    second = gt_database("run2")
    assert builds == ["mini_train"], "the second run rebuilt the database instead of reading the cache"
    assert len(first) > 0
    for name in ("boxes", "labels", "attributes", "point_offsets", "points"):
        np.testing.assert_array_equal(getattr(second, name), getattr(first, name), err_msg=name)
    assert _listing(root) == before, "something was written into the dataroot"

    # a changed dataset misses: a rewritten annotation table (same content, new mtime) rebuilds
    table = root / "v1.0-mini" / "sample_annotation.json"
    _set_writable(root, True)
    st = table.stat()
    os.utime(table, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    gt_database("run3")
    assert builds == ["mini_train", "mini_train"]
    assert len(list((tmp_path / "cache" / "gt_database").glob("*.npz"))) == 2
