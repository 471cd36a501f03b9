"""Where derived data is cached (GT-sampling databases, evaluation indexes, map rasters): never in the dataroot.

The cache root is ``$PERCEPTION_CACHE``, else ``~/.cache/perception``. A cached file lives at
``<root>/<kind>/<digest><suffix>``, where the digest is the SHA-256 of the JSON of a key dict that names
everything the file was built from (dataroot, version, split, settings, table fingerprints, a format number),
so a changed dataset or setting misses instead of reading stale data. A ``<digest>.json`` beside it holds the
key, for people looking at the folder.

Example::

    key = {"format": 1, "split": "train", "tables": table_fingerprint(root, "v1.0-trainval"), ...}
    path = cache_path("gt_database", key, ".npz")
    if not path.is_file():
        with atomic_write(path) as f:
            np.savez(f, ...)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Any, BinaryIO, Iterator, Mapping

import numpy as np

from perception.errors import PerceptionError

ENV_VAR = "PERCEPTION_CACHE"


def cache_dir() -> Path:
    """The cache root: ``$PERCEPTION_CACHE`` if set and not empty, else ``~/.cache/perception`` (not created)."""
    value = os.environ.get(ENV_VAR, "").strip()
    return Path(value).expanduser() if value else Path.home() / ".cache" / "perception"


def key_digest(key: Mapping[str, Any]) -> str:
    """SHA-256 (hex, first 24 digits) of `key` as canonical JSON (sorted keys); values must be JSON types."""
    try:
        text = json.dumps(key, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"cache key is not plain JSON data: {exc}") from None
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def cache_path(kind: str, key: Mapping[str, Any], suffix: str = "", *, root: str | Path | None = None) -> Path:
    """The path of the cached `kind` (a folder name, e.g. ``"gt_database"``) built from `key`, under `root`
    (default `cache_dir()`), with file-name `suffix` (e.g. ``".npz"``). Nothing is created."""
    if not kind or "/" in kind or kind.startswith("."):
        raise ValueError(f"cache kind {kind!r} must be a plain folder name")
    return Path(root if root is not None else cache_dir()) / kind / f"{key_digest(key)}{suffix}"


def table_fingerprint(dataroot: str | Path, version: str) -> dict[str, list[int]]:
    """``{table file name: [size in bytes, mtime in ns]}`` for the ``*.json`` tables of ``dataroot/version``:
    a cheap stand-in for their content in cache keys (a rewritten or replaced table changes it)."""
    folder = Path(dataroot) / version
    out = {}
    for path in sorted(folder.glob("*.json")):
        st = path.stat()
        out[path.name] = [st.st_size, st.st_mtime_ns]
    return out


def array_digest(*arrays) -> str:
    """SHA-256 (hex) of numpy arrays' dtypes, shapes and bytes (string arrays by their text), for cache keys."""
    h = hashlib.sha256()
    for a in arrays:
        a = np.asarray(a)
        if a.dtype.kind in "OUS":
            a = np.asarray("\n".join(map(str, a.ravel().tolist())).encode())
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


@contextlib.contextmanager
def atomic_write(path: str | Path, key: Mapping[str, Any] | None = None) -> Iterator[BinaryIO]:
    """Open a temp file beside `path` for binary writing; on success rename it over `path` (and, with `key`,
    write the key as ``<path stem>.json`` beside it). Creates the folder. On failure nothing is left behind.

    Raises PerceptionError naming the path when the folder cannot be created or written.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        if key is not None:
            path.with_name(path.name.split(".")[0] + ".json").write_text(json.dumps(key, indent=1, sort_keys=True))
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise PerceptionError(f"{path}: cannot write cache file ({exc.strerror or exc})") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
