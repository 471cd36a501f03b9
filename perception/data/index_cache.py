"""The sample index of a split, built from the devkit tables once and then read from a memory-mapped cache.

Parsing the tables of v1.0-trainval takes minutes and gigabytes of memory per process. `cached_index_arrays`
keeps the compact index a split needs (`perception.data.dataset.SampleIndex`'s arrays) under
``$PERCEPTION_CACHE/sample_index/<digest>/``, one ``.npy`` file per array plus ``meta.json``, keyed by the
dataroot, version, split, the split's scene names, the index settings and the table files' sizes and mtimes
(`index_cache_key`): a changed table file misses and rebuilds. A hit maps the files copy-on-write (``np.load(...,
mmap_mode="c")``: pages are shared until a process writes to one, and the file never changes), so DataLoader
workers and the ranks of a job on one machine share one copy in the page cache.

Under torchrun, rank 0 alone loads or builds (it parses the tables; the other ranks wait in one broadcast of the
folder's path) and the others map rank 0's files. A rank that cannot read them (a cache folder that is not
shared between nodes), or a job whose cache folder cannot be written, builds its own and says so.

The folder is written beside its final name and renamed into place, so a reader never sees half an index, and
two jobs that build it at once both end with a complete folder.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import torch.distributed as dist

from perception.cache import cache_path, table_fingerprint
from perception.distributed import DistInfo

log = logging.getLogger(__name__)

# Bump when the index arrays or their meaning change: every cached index then misses.
# 2: a camera absent from a sample is an empty cam_path (it was a bad sample).
INDEX_FORMAT = 2
KIND = "sample_index"

Arrays = dict[str, "np.ndarray | None"]
BuildResult = tuple[Arrays, dict]  # (arrays; None for an array the source does not have), JSON-able meta


def index_cache_key(dataroot: str | Path, version: str, split: str | None, scenes: set[str] | None,
                    settings: dict) -> dict:
    """What the index of (`dataroot`, `version`, `split`) is built from: the resolved dataroot, version, split,
    its scene names (None: every scene), the index `settings` (sweep counts, bad-sample policy) and the
    fingerprint of the table files (`perception.cache.table_fingerprint`)."""
    return {"format": INDEX_FORMAT, "dataroot": str(Path(dataroot).resolve()), "version": version, "split": split,
            "scenes": None if scenes is None else sorted(scenes), "settings": settings,
            "tables": table_fingerprint(dataroot, version)}


def save_index_arrays(folder: Path, arrays: Arrays, meta: dict, key: dict) -> Path:
    """Write `arrays` (``name.npy`` each; a None array is listed in ``meta.json`` as absent), `meta` and `key`
    into `folder`, atomically: into a temporary sibling first, renamed into place. If another process renamed
    its folder there first, its copy is kept. Raises OSError when the parent cannot be written."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".{folder.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        for name, array in arrays.items():
            if array is not None:
                np.save(tmp / f"{name}.npy", np.ascontiguousarray(array), allow_pickle=False)
        record = {"meta": meta, "arrays": sorted(arrays), "absent": sorted(k for k, v in arrays.items() if v is None),
                  "key": key}
        (tmp / "meta.json").write_text(json.dumps(record, indent=1))
        try:
            os.rename(tmp, folder)
        except OSError:
            if not (folder / "meta.json").is_file():  # not a finished copy of another process: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def load_index_arrays(folder: Path) -> BuildResult:
    """The arrays (memory-mapped copy-on-write) and meta of a folder `save_index_arrays` wrote.

    Raises OSError or ValueError for a missing or damaged folder."""
    folder = Path(folder)
    record = json.loads((folder / "meta.json").read_text())
    arrays: Arrays = {name: None for name in record["absent"]}
    for name in record["arrays"]:
        if name not in arrays:
            arrays[name] = np.load(folder / f"{name}.npy", mmap_mode="c", allow_pickle=False)
    return arrays, record["meta"]


def cached_index_arrays(key: dict, build: Callable[[], BuildResult], dist_info: DistInfo | None = None, *,
                        root: str | Path | None = None) -> BuildResult:
    """The index arrays for `key`: from the cache when present, else from `build()` (which parses the tables)
    and then cached. Under torchrun (`dist_info.enabled`), every rank must call this together: rank 0 loads or
    builds, the others read its folder.

    `root`: the cache root (default ``$PERCEPTION_CACHE``, see `perception.cache.cache_dir`).
    """
    folder = cache_path(KIND, key, root=root)
    dist_info = dist_info or DistInfo()
    result, where = None, None
    if dist_info.is_main:
        result, where = _load_or_build(folder, key, build)
    if dist_info.enabled:
        shared = [None if where is None else str(where)]
        dist.broadcast_object_list(shared, src=0)
        if not dist_info.is_main:
            try:
                result = load_index_arrays(Path(shared[0])) if shared[0] is not None else None
            except (OSError, ValueError, KeyError) as exc:
                log.warning("sample index: rank %d cannot read rank 0's cache %s (%s); parsing the tables itself",
                            dist_info.rank, shared[0], exc)
            if result is None:
                result = build()
    return result


def _load_or_build(folder: Path, key: dict, build: Callable[[], BuildResult]) -> tuple[BuildResult, Path | None]:
    """(the index, the folder it is cached in or None when it could not be written)."""
    if (folder / "meta.json").is_file():
        try:
            result = load_index_arrays(folder)
            log.info("sample index: cache hit %s", folder)
            return result, folder
        except (OSError, ValueError, KeyError) as exc:
            log.warning("sample index: unreadable cache %s (%s); rebuilding", folder, exc)
            shutil.rmtree(folder, ignore_errors=True)
    arrays, meta = build()
    try:
        save_index_arrays(folder, arrays, meta, key)
    except OSError as exc:
        log.warning("sample index: cannot write the cache %s (%s); every process parses the tables", folder, exc)
        return (arrays, meta), None
    log.info("sample index: cached in %s", folder)
    return load_index_arrays(folder), folder
