"""Readers for the nuScenes sensor files and calibration records, with checks that name the bad file.

Every reader takes the sample token it works for, so that a `DataError` says which file of which sample was
bad. Formats (see docs/nuscenes-format.md):
  - LiDAR `.pcd.bin`: little-endian float32, N x 5 (x, y, z, intensity, ring), LIDAR_TOP sensor frame.
  - Radar `.pcd`: an 11-line ASCII header and N packed 43-byte records, radar sensor frame (x forward, y left).
  - Cameras: JPEG, undistorted pinhole images.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import cv2
import numpy as np
from pyquaternion import Quaternion

from perception.errors import DataError

# Tolerances for calibration checks: a unit quaternion and an orthonormal, right-handed rotation.
QUATERNION_NORM_TOL = 1e-3
ROTATION_ORTHO_TOL = 1e-3

LIDAR_RECORD_FLOATS = 5
# No return of a car-mounted LiDAR or radar lies farther than this (HDL-32E: ~100 m, ARS 408: 250 m); a larger
# coordinate is a corrupt file, not a far point.
MAX_ABS_COORD_M = 1000.0

# Radar record layout, in the devkit's field order (`RadarPointCloud.from_file`).
RADAR_FIELDS: tuple[str, ...] = (
    "x", "y", "z", "dyn_prop", "id", "rcs", "vx", "vy", "vx_comp", "vy_comp", "is_quality_valid",
    "ambig_state", "x_rms", "y_rms", "invalid_state", "pdh0", "vx_rms", "vy_rms",
)
# One record of a nuScenes radar .pcd file (binary, 43 bytes, no padding) and the header nuScenes writes before them.
RADAR_PCD_DTYPE = np.dtype([(name, code) for name, code in zip(
    RADAR_FIELDS, ("<f4", "<f4", "<f4", "i1", "<i2", "<f4", "<f4", "<f4", "<f4", "<f4",
                   "i1", "i1", "i1", "i1", "i1", "i1", "i1", "i1"))])
RADAR_PCD_HEADER = (
    "# .PCD v0.7 - Point Cloud Data file format\n"
    "VERSION 0.7\n"
    f"FIELDS {' '.join(RADAR_FIELDS)}\n"
    "SIZE 4 4 4 1 2 4 4 4 4 4 1 1 1 1 1 1 1 1\n"
    "TYPE F F F I I F F F F F I I I I I I I I\n"
    "COUNT 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1\n"
    "WIDTH {n}\n"
    "HEIGHT 1\n"
    "VIEWPOINT 0 0 0 1 0 0 0\n"
    "POINTS {n}\n"
    "DATA binary\n"
)
assert RADAR_PCD_DTYPE.itemsize == 43


def read_lidar_bin(path: str | Path, token: str | None = None) -> np.ndarray:
    """Read one LiDAR sweep.

    Returns: (N, 5) float32 in the LIDAR_TOP sensor frame of that sweep: x, y, z (m), intensity (0-255), ring.
    An empty file is a valid sweep with N = 0.

    Raises: DataError if the file is missing, its size is not a multiple of 20 bytes (truncated) or a value is
    NaN/inf.
    """
    record = 4 * LIDAR_RECORD_FLOATS
    try:
        with open(path, "rb") as f:
            nbytes = os.fstat(f.fileno()).st_size
            if nbytes % record:
                raise DataError(
                    f"LiDAR file is truncated: {nbytes} bytes is not a multiple of {record} (N x 5 float32)",
                    path=path, token=token,
                )
            points = np.fromfile(f, dtype="<f4", count=nbytes // 4)
    except OSError as exc:
        raise DataError(f"cannot read LiDAR file ({exc.strerror or exc})", path=path, token=token) from None
    if points.size * 4 != nbytes:
        raise DataError(f"LiDAR file is truncated: read {points.size * 4} of {nbytes} bytes", path=path, token=token)
    points = points.reshape(-1, LIDAR_RECORD_FLOATS)
    if not points.size or (-MAX_ABS_COORD_M <= float(points.min()) and float(points.max()) <= MAX_ABS_COORD_M):
        return points  # the common case in two reductions: NaN fails both comparisons, inf the bound
    if not np.isfinite(points).all():
        bad = int((~np.isfinite(points).all(axis=1)).sum())
        raise DataError(f"LiDAR file has {bad} points with NaN or inf values", path=path, token=token)
    if np.abs(points[:, :3]).max() > MAX_ABS_COORD_M:
        bad = int((np.abs(points[:, :3]) > MAX_ABS_COORD_M).any(axis=1).sum())
        raise DataError(f"LiDAR file has {bad} points farther than {MAX_ABS_COORD_M:g} m (corrupt values)", path=path, token=token)
    return points.astype(np.float32, copy=False)


@functools.lru_cache(maxsize=64)
def _state_table(states: tuple[int, ...]) -> np.ndarray:
    """(256,) bool: entry v & 0xFF is True for each int8 state v in `states` (a lookup instead of np.isin)."""
    table = np.zeros(256, bool)
    table[np.asarray(states, np.int64) & 0xFF] = True
    return table


def read_radar_pcd(
    path: str | Path,
    token: str | None = None,
    *,
    invalid_states: tuple[int, ...] = (0,),
    dynprop_states: tuple[int, ...] = tuple(range(7)),
    ambig_states: tuple[int, ...] = (3,),
    columns: tuple[str, ...] = RADAR_FIELDS,
) -> np.ndarray:
    """Read one radar sweep, keeping the returns the devkit keeps by default (`RadarPointCloud.from_file`).

    Args:
        columns: the fields returned, in this order (names from `RADAR_FIELDS`); the default is all of them.

    Returns: (M, len(columns)) float32 in the radar sensor frame (x forward, y left), by default the 18 fields in
    `RADAR_FIELDS` order (x, y, z m; rcs dBsm; velocities m/s). The nuScenes marker for an empty sweep (a single
    record with NaN coordinates) gives M = 0.

    Raises: DataError if the file is missing, the header is malformed, the body is shorter than the header
    says (truncated) or a kept return has NaN/inf values.
    """
    return read_radar_pcds([path], token, invalid_states=invalid_states, dynprop_states=dynprop_states,
                           ambig_states=ambig_states, columns=columns)[0]


def _radar_records(path: str | Path, token: str | None) -> np.ndarray:
    """The records of one radar `.pcd` file as a structured array (`RADAR_PCD_DTYPE`); none for the nuScenes
    empty-sweep marker. Raises DataError for a missing file, a malformed header or a truncated body."""
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read radar file ({exc.strerror or exc})", path=path, token=token) from None
    lines = raw.split(b"\n", 11)
    if len(lines) < 12:
        raise DataError("radar file header is incomplete (fewer than 11 lines)", path=path, token=token)
    header = [line.strip().decode("ascii", errors="replace") for line in lines[:11]]
    if not header[0].startswith("#") or not header[1].startswith("VERSION") or not header[10].startswith("DATA"):
        raise DataError("radar file header is not the 11-line PCD v0.7 header", path=path, token=token)
    fields = header[2].split()[1:]
    if tuple(fields) != RADAR_FIELDS or header[10].split()[1:] != ["binary"]:
        raise DataError(f"radar file has unexpected FIELDS/DATA lines: {header[2]!r}, {header[10]!r}",
                        path=path, token=token)
    try:
        width = int(header[6].split()[1])
        height = int(header[7].split()[1])
    except (IndexError, ValueError):
        raise DataError("radar file WIDTH/HEIGHT lines are malformed", path=path, token=token) from None
    if height != 1 or width < 0:
        raise DataError(f"radar file has WIDTH {width}, HEIGHT {height}; expected HEIGHT 1", path=path, token=token)
    need = width * RADAR_PCD_DTYPE.itemsize
    pos = len(raw) - len(lines[11])
    if len(raw) - pos < need:
        raise DataError(
            f"radar file is truncated: {len(raw) - pos} body bytes, header promises {width} x 43 = {need}",
            path=path, token=token,
        )
    rec = np.frombuffer(raw, dtype=RADAR_PCD_DTYPE, count=width, offset=pos)
    if width == 1 and np.isnan([rec["x"][0], rec["y"][0], rec["z"][0]]).all():
        return rec[:0]
    return rec


def kept_counts(keep: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """(F,) int64: how many of each consecutive group's rows `keep` (sum(counts),) bool keeps, for groups of
    `counts` (F,) rows (the files of a concatenation)."""
    kept_before = np.concatenate([[0], np.cumsum(keep, dtype=np.int64)])
    return np.diff(kept_before[np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])])


def read_radar_pcds(
    paths: list[str | Path],
    token: str | None = None,
    *,
    invalid_states: tuple[int, ...] = (0,),
    dynprop_states: tuple[int, ...] = tuple(range(7)),
    ambig_states: tuple[int, ...] = (3,),
    columns: tuple[str, ...] = RADAR_FIELDS,
) -> tuple[np.ndarray, np.ndarray]:
    """`read_radar_pcd` of several files at once: the filtering, column extraction and value checks run once over
    all their records (a sample has ~30 small radar files, so per-file numpy calls would dominate).

    Returns: points (sum M_f, len(columns)) float32, each file's returns in its own sensor frame, files in order;
    counts (F,) int64, M_f.

    Raises: DataError naming the first bad file, as `read_radar_pcd`.
    """
    records = [_radar_records(path, token) for path in paths]
    if not records:
        return np.zeros((0, len(columns)), np.float32), np.zeros(0, np.int64)
    rec = np.concatenate(records) if len(records) != 1 else records[0]
    keep = (_state_table(invalid_states)[rec["invalid_state"].view(np.uint8)]
            & _state_table(dynprop_states)[rec["dyn_prop"].view(np.uint8)]
            & _state_table(ambig_states)[rec["ambig_state"].view(np.uint8)])
    counts = kept_counts(keep, np.array([len(r) for r in records], np.int64))
    rec = rec[keep]
    out = np.empty((len(rec), len(columns)), np.float32)
    for j, name in enumerate(columns):
        out[:, j] = rec[name]
    if out.size and not (np.isfinite(out).all() and np.abs(out[:, :3]).max() <= MAX_ABS_COORD_M):
        starts = np.cumsum(counts) - counts
        for path, a, n in zip(paths, starts, counts):
            part = out[a:a + n]
            if not np.isfinite(part).all():
                bad = int((~np.isfinite(part).all(axis=1)).sum())
                raise DataError(f"radar file has {bad} returns with NaN or inf values", path=path, token=token)
            if part.size and np.abs(part[:, :3]).max() > MAX_ABS_COORD_M:
                raise DataError(f"radar file has returns farther than {MAX_ABS_COORD_M:g} m (corrupt values)",
                                path=path, token=token)
    return out, counts


def read_jpeg(
    path: str | Path,
    token: str | None = None,
    *,
    expected_wh: tuple[int, int] | None = None,
    reduce: int = 1,
    rgb: bool = True,
) -> np.ndarray:
    """Read one camera image.

    Args:
        expected_wh: (width, height) from `sample_data`; a mismatch is an error. Compared before reduction.
        reduce: 1, 2, 4 or 8: let libjpeg decode at 1/reduce of the resolution (DCT-domain scaling, much
            cheaper than a full decode followed by a resize).
        rgb: False returns libjpeg's BGR order, for callers that reorder channels later anyway (saves a pass).

    Returns: (H / reduce, W / reduce, 3) uint8 RGB (BGR when not `rgb`).

    Raises: DataError if the file is missing, is not a complete JPEG (no SOI/EOI marker: truncated) or cannot be
    decoded, or its size differs from `expected_wh`.
    """
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read image ({exc.strerror or exc})", path=path, token=token) from None
    if not raw.startswith(b"\xff\xd8") or not raw.rstrip(b"\x00").endswith(b"\xff\xd9"):
        raise DataError("image is not a complete JPEG (missing start or end marker; truncated?)",
                        path=path, token=token)
    flags = {1: cv2.IMREAD_COLOR, 2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4,
             8: cv2.IMREAD_REDUCED_COLOR_8}[reduce]
    bgr = cv2.imdecode(np.frombuffer(raw, np.uint8), flags)
    if bgr is None:
        raise DataError("image cannot be decoded as JPEG", path=path, token=token)
    if expected_wh is not None:
        w, h = expected_wh
        want = (-(-h // reduce), -(-w // reduce))
        if bgr.shape[:2] != want:
            raise DataError(
                f"image is {bgr.shape[1] * reduce}x{bgr.shape[0] * reduce} but sample_data says {w}x{h}",
                path=path, token=token,
            )
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB) if rgb else bgr


def quaternion_to_matrix(q, *, what: str, path: str | Path | None = None, token: str | None = None) -> np.ndarray:
    """(3, 3) float64 rotation from a [w, x, y, z] quaternion that must have unit norm.

    Raises: DataError (naming `what`, e.g. "calibrated_sensor <token> rotation") for a non-unit or non-finite
    quaternion: its matrix would not be orthonormal (pyquaternion would silently renormalise).
    """
    arr = np.asarray(q, dtype=np.float64)
    if arr.shape != (4,) or not np.isfinite(arr).all():
        raise DataError(f"{what}: expected a finite [w, x, y, z] quaternion, got {q!r}", path=path, token=token)
    norm = float(np.linalg.norm(arr))
    if abs(norm - 1.0) > QUATERNION_NORM_TOL:
        raise DataError(f"{what}: rotation quaternion has norm {norm:.6f}, so its rotation is not orthonormal",
                        path=path, token=token)
    return Quaternion(arr / norm).rotation_matrix


def check_rotation(R: np.ndarray, *, what: str, path: str | Path | None = None, token: str | None = None) -> None:
    """Raise DataError unless R (3, 3) is orthonormal with determinant +1 (within ROTATION_ORTHO_TOL)."""
    R = np.asarray(R, dtype=np.float64)
    if R.shape != (3, 3) or not np.isfinite(R).all():
        raise DataError(f"{what}: expected a finite 3x3 rotation, got shape {R.shape}", path=path, token=token)
    err = float(np.abs(R @ R.T - np.eye(3)).max())
    det = float(np.linalg.det(R))
    if err > ROTATION_ORTHO_TOL or abs(det - 1.0) > ROTATION_ORTHO_TOL:
        raise DataError(f"{what}: rotation is not orthonormal (max |R R^T - I| = {err:.2e}, det = {det:.4f})",
                        path=path, token=token)


def pose_matrix(rotation_wxyz, translation, *, what: str, path: str | Path | None = None,
                token: str | None = None) -> np.ndarray:
    """(4, 4) float64 homogeneous src->dst transform from a nuScenes rotation/translation record pair."""
    T = np.eye(4)
    T[:3, :3] = quaternion_to_matrix(rotation_wxyz, what=what, path=path, token=token)
    t = np.asarray(translation, dtype=np.float64)
    if t.shape != (3,) or not np.isfinite(t).all():
        raise DataError(f"{what}: expected a finite 3-vector translation, got {translation!r}", path=path, token=token)
    T[:3, 3] = t
    return T


def invert_rigid(T: np.ndarray) -> np.ndarray:
    """Inverse of a (4, 4) rigid transform."""
    out = np.eye(4)
    R = T[:3, :3]
    out[:3, :3] = R.T
    out[:3, 3] = -R.T @ T[:3, 3]
    return out
