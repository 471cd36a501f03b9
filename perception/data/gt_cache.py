"""The GT-sampling database of a training split, cached between runs and shared between ranks.

Building a `GTDatabase` reads every LiDAR sweep of the split, so it is cached under ``$PERCEPTION_CACHE``
(`perception.cache`), keyed by everything it is built from (`gt_database_key`): a changed dataset or setting
misses. Under torchrun, rank 0 loads or builds it and the other ranks read rank 0's file (`cached_gt_database`).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch.distributed as dist

from perception.cache import array_digest, atomic_write, cache_path, table_fingerprint
from perception.data.dataset import NuScenesDataset
from perception.data.gt_sampling import GTDatabase
from perception.distributed import DistInfo
from perception.errors import PerceptionError
from perception.structures import BEVGrid

log = logging.getLogger(__name__)


def gt_database_key(dataset: NuScenesDataset, min_points: int = 5, grid: BEVGrid | None = None) -> dict:
    """What a GT-sampling database of `dataset` is built from, as a cache key: the dataroot, version and split,
    the LiDAR settings, the grid whose boxes it keeps (default the dataset's), the table files' sizes and mtimes,
    and a digest of the index arrays the build reads (samples, sweep files and poses, boxes): a changed dataset
    misses."""
    idx, c = dataset.index, dataset.config
    grid = grid if grid is not None else c.grid
    return {"format": 1, "dataroot": str(Path(dataset.dataroot).resolve()), "version": dataset.version,
            "split": dataset.split, "lidar_sweeps": c.lidar_sweeps, "min_distance": c.min_distance,
            "min_points": min_points, "grid": [grid.x_min, grid.x_max, grid.y_min, grid.y_max],
            "tables": table_fingerprint(dataset.dataroot, dataset.version),
            "index": array_digest(idx.tokens, idx.lidar_offsets, idx.lidar_paths, idx.lidar_sweep2lidar, idx.lidar_dt,
                                  idx.box_offsets, idx.boxes, idx.labels, idx.attributes)}


def cached_gt_database(dataset: NuScenesDataset, dist_info: DistInfo, *, fallback_dir: Path, min_points: int = 5,
                       grid: BEVGrid | None = None) -> GTDatabase:
    """The `GTDatabase` of `dataset`, from the cache when it was built before from the same data.

    The cache file is `perception.cache.cache_path("gt_database", gt_database_key(...), ".npz")` (under
    ``$PERCEPTION_CACHE``, default ``~/.cache/perception``), or the same name in `fallback_dir` (the run's work
    dir) when the cache folder cannot be written; never in the dataroot. Rank 0 loads or builds and writes it;
    the other ranks wait for it (one broadcast of its path) and load it, building their own only when they
    cannot read it (a cache folder that is not shared between nodes).
    """
    key = gt_database_key(dataset, min_points, grid)
    candidates = [cache_path("gt_database", key, ".npz"), cache_path("gt_database", key, ".npz", root=fallback_dir)]
    db, where = None, None
    if dist_info.is_main:
        db, where = _load_cached(candidates)
        if db is None:
            db = GTDatabase.build(dataset, min_points, grid)
            where = _write_cache(db, candidates, key)
    if dist_info.enabled:
        shared = [None if where is None else str(where)]
        dist.broadcast_object_list(shared, src=0)
        if not dist_info.is_main:
            try:
                db = GTDatabase.load(shared[0]) if shared[0] is not None else None
            except (OSError, ValueError, KeyError):
                db = None
            if db is None:
                log.warning("GT database: rank %d cannot read rank 0's cache file %s; building its own", dist_info.rank, shared[0])
                db = GTDatabase.build(dataset, min_points, grid)
    return db


def _load_cached(candidates: list[Path]) -> tuple[GTDatabase | None, Path | None]:
    """The first readable database among `candidates` and its path, or (None, None)."""
    for path in candidates:
        if path.is_file():
            try:
                db = GTDatabase.load(path)
                log.info("GT database: cache hit %s (%d objects)", path, len(db))
                return db, path
            except (OSError, ValueError, KeyError) as exc:
                log.warning("GT database: unreadable cache file %s (%s); rebuilding", path, exc)
    return None, None


def _write_cache(db: GTDatabase, candidates: list[Path], key: dict) -> Path | None:
    """Write `db` to the first writable of `candidates` (with `key` beside it); its path, or None if none is."""
    for path in candidates:
        try:
            with atomic_write(path, key) as f:
                db.save(f)
            log.info("GT database: cached in %s", path)
            return path
        except PerceptionError as exc:
            log.warning("GT database: %s", exc)
    return None
