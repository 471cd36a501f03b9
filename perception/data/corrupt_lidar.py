"""LiDAR and radar point corruptions of `perception data corrupt` (docs/robustness.md).

LiDAR sweeps are (N, 5) float32 arrays in the LIDAR_TOP frame (x, y, z, intensity 0-255, ring index), radar sweeps
the structured records of a nuScenes radar `.pcd` (`RADAR_PCD_DTYPE`). Every function draws the same random numbers
in the same order whatever the severity (one uniform per point and so on), so that for a file the points a
severity-5 corruption removes include those of severity 1 where the corruption is a thinning (fog, snow, dropout).
"""

from __future__ import annotations

import numpy as np

from perception.data.loading import LIDAR_RECORD_FLOATS, RADAR_PCD_DTYPE, RADAR_PCD_HEADER
from perception.errors import DataError

LIDAR_RINGS = 32  # nuScenes' Velodyne HDL-32E; ring indices 0..31 in column 4
LIDAR_SWEEP_S = 0.05  # one revolution at 20 Hz

# Fog (Hahner et al. 2021, the alphas Robo3D draws from): extinction coefficient alpha (1/m); a return at range r
# survives with probability exp(-2 alpha r) (the two-way attenuation), its intensity attenuated by the same factor.
FOG_ALPHA = (0.005, 0.01, 0.02, 0.03, 0.06)
# Share of the lost returns that come back as backscatter from the fog itself, at a range uniform in
# FOG_BACKSCATTER_M (clipped to the lost return's range); our grading (Robo3D grades the backscatter coefficient).
FOG_BACKSCATTER = (0.1, 0.2, 0.3, 0.4, 0.5)
FOG_BACKSCATTER_M = (1.0, 10.0)
# Snow: snowflakes along a beam as a Poisson process of rate lambda (1/m): the first flake lies at an exponential
# distance D; when D < r the return is lost, and a flake between SNOW_ECHO_M is seen instead (nearer flakes are
# too close to register, farther ones too weak); our grading.
SNOW_RATE = (0.002, 0.004, 0.006, 0.008, 0.010)
SNOW_ECHO_M = (1.0, 10.0)
# Beam reduction (Robo3D's cross-sensor corruption keeps 24, 16, 8 of 32 beams): rings kept, evenly spaced.
BEAMS_KEPT = (24, 16, 12, 8, 4)
# Point dropout: each return dropped with this probability (ModelNet-C's global-dropout ratios, Ren et al. 2022).
POINT_DROPOUT = (0.25, 0.375, 0.5, 0.625, 0.75)
# Crosstalk: share of returns whose range is replaced by a uniform one in CROSSTALK_RANGE_M along their beam
# (Robo3D's nuScenes-C script defaults to 0.03; the rest is our grading).
CROSSTALK = (0.01, 0.03, 0.05, 0.08, 0.12)
CROSSTALK_RANGE_M = (1.0, 80.0)
# Incomplete echo (Robo3D drops 75/85/95% of the returns of vehicles; without point labels we drop that share of
# the weakest echoes): the INCOMPLETE_ECHO_SHARE of returns with the lowest intensity are each lost with this
# probability.
INCOMPLETE_ECHO = (0.75, 0.80, 0.85, 0.90, 0.95)
INCOMPLETE_ECHO_SHARE = 0.25
# Motion blur: each return displaced along the ego's velocity by u * k * v * 50 ms (u uniform in [-1/2, 1/2]: an
# uncompensated revolution k times as long as it is), plus Robo3D's per-point jitter of sigma 0.1 x trans_std
# (0.05 x in z, clipped at 3 trans_std), trans_std 0.20/0.25/0.30 at Robo3D's light/moderate/heavy.
MOTION_BLUR_SWEEPS = (1.0, 2.0, 3.0, 4.0, 5.0)
MOTION_BLUR_TRANS_STD = (0.20, 0.225, 0.25, 0.275, 0.30)
# LiDAR frame lost: a sweep is lost (written as an empty file) with probability severity / 6 (RoboBEV's frame loss).
LIDAR_FRAME_LOST = tuple(s / 6 for s in range(1, 6))

# Radar dropout: each return dropped with this probability (our grading).
RADAR_DROPOUT = (0.1, 0.25, 0.4, 0.55, 0.7)
# Radar clutter: Poisson(ratio x max(N, 10)) fake returns added, uniform in azimuth (+-RADAR_FOV_DEG) and range
# (RADAR_RANGE_M), RCS uniform in [-10, 10] dBsm, velocities N(0, 1) m/s; our grading.
RADAR_CLUTTER = (0.1, 0.25, 0.5, 0.75, 1.0)
RADAR_FOV_DEG = 60.0
RADAR_RANGE_M = (1.0, 100.0)
# Fields of a fake radar return when the sweep has no real one to copy them from (valid, unambiguous: kept by the
# devkit's default filters).
RADAR_TEMPLATE = {"dyn_prop": 1, "is_quality_valid": 1, "ambig_state": 3, "x_rms": 19, "y_rms": 19, "invalid_state": 0,
                  "pdh0": 1, "vx_rms": 17, "vy_rms": 17}

LIDAR_CORRUPTIONS = ("fog_lidar", "snow_lidar", "beam_reduction", "point_dropout", "crosstalk", "incomplete_echo",
                     "motion_blur_lidar", "lidar_frame_lost")
RADAR_CORRUPTIONS = ("radar_dropout", "radar_clutter")


def kept_rings(severity: int, rings: int = LIDAR_RINGS) -> np.ndarray:
    """The ring indices beam reduction keeps: floor(i * rings / n) for i < n, n = BEAMS_KEPT[severity - 1]."""
    n = BEAMS_KEPT[severity - 1]
    return np.unique(np.arange(n) * rings // n)


def _ranges(points: np.ndarray) -> np.ndarray:
    return np.sqrt((points[:, :3].astype(np.float64) ** 2).sum(axis=1))


def _along_ray(points: np.ndarray, r: np.ndarray, new_r: np.ndarray) -> np.ndarray:
    """xyz of `points` moved along their beam (through the sensor origin) to range `new_r`."""
    scale = np.divide(new_r, r, out=np.ones_like(new_r), where=r > 0)
    return (points[:, :3] * scale[:, None]).astype(np.float32)


def fog(points: np.ndarray, severity: int, rng: np.random.Generator, ctx: dict) -> np.ndarray:
    n = len(points)
    u_survive, u_echo, u_range, u_intensity = (rng.random(n) for _ in range(4))
    r = _ranges(points)
    transmission = np.exp(-2 * FOG_ALPHA[severity - 1] * r)
    survive = u_survive < transmission
    echo = ~survive & (u_echo < FOG_BACKSCATTER[severity - 1])
    out = points.copy()
    out[:, 3] = np.round(points[:, 3] * transmission)
    lo, hi = np.minimum(FOG_BACKSCATTER_M[0], r), np.minimum(FOG_BACKSCATTER_M[1], r)
    out[echo, :3] = _along_ray(points[echo], r[echo], (lo + u_range * (hi - lo))[echo])
    out[echo, 3] = np.floor(u_intensity[echo] * 10)  # backscatter is weak
    return out[survive | echo]


def snow(points: np.ndarray, severity: int, rng: np.random.Generator, ctx: dict) -> np.ndarray:
    n = len(points)
    u_flake, u_intensity = rng.random(n), rng.random(n)
    r = _ranges(points)
    flake = -np.log1p(-u_flake) / SNOW_RATE[severity - 1]  # exponential distance to the first flake on the beam
    hit = flake < r
    echo = hit & (flake >= SNOW_ECHO_M[0]) & (flake <= SNOW_ECHO_M[1])
    out = points.copy()
    out[echo, :3] = _along_ray(points[echo], r[echo], flake[echo])
    out[echo, 3] = np.floor(u_intensity[echo] * 10)
    return out[~hit | echo]


def beam_reduction(points: np.ndarray, severity: int, rng: np.random.Generator, ctx: dict) -> np.ndarray:
    keep = np.zeros(max(LIDAR_RINGS, 1), bool)
    keep[kept_rings(severity)] = True
    ring = points[:, 4].astype(np.int64)
    inside = (ring >= 0) & (ring < LIDAR_RINGS)
    return points[inside & keep[np.clip(ring, 0, LIDAR_RINGS - 1)]]


def point_dropout(points: np.ndarray, severity: int, rng: np.random.Generator, ctx: dict) -> np.ndarray:
    return points[rng.random(len(points)) >= POINT_DROPOUT[severity - 1]]


def crosstalk(points: np.ndarray, severity: int, rng: np.random.Generator, ctx: dict) -> np.ndarray:
    n = len(points)
    u_pick, u_range = rng.random(n), rng.random(n)
    pick = u_pick < CROSSTALK[severity - 1]
    lo, hi = CROSSTALK_RANGE_M
    out = points.copy()
    out[pick, :3] = _along_ray(points[pick], _ranges(points[pick]), lo + u_range[pick] * (hi - lo))
    return out


def weakest_returns(points: np.ndarray) -> np.ndarray:
    """(N,) bool: the floor(INCOMPLETE_ECHO_SHARE x N) returns of lowest intensity (ties in file order)."""
    weak = np.zeros(len(points), bool)
    weak[np.argsort(points[:, 3], kind="stable")[:int(INCOMPLETE_ECHO_SHARE * len(points))]] = True
    return weak


def incomplete_echo(points: np.ndarray, severity: int, rng: np.random.Generator, ctx: dict) -> np.ndarray:
    lost = weakest_returns(points) & (rng.random(len(points)) < INCOMPLETE_ECHO[severity - 1])
    return points[~lost]


def motion_blur(points: np.ndarray, severity: int, rng: np.random.Generator, ctx: dict) -> np.ndarray:
    """`ctx["velocity"]`: the ego's velocity (m/s) in this sweep's sensor frame."""
    n = len(points)
    u = rng.random(n) - 0.5
    jitter = rng.standard_normal((n, 3))
    std = MOTION_BLUR_TRANS_STD[severity - 1]
    jitter *= np.array([0.1, 0.1, 0.05]) * std
    np.clip(jitter, -3 * std, 3 * std, out=jitter)
    smear = np.asarray(ctx.get("velocity", (0.0, 0.0, 0.0)), np.float64) * (MOTION_BLUR_SWEEPS[severity - 1] * LIDAR_SWEEP_S)
    out = points.copy()
    out[:, :3] = (points[:, :3] + u[:, None] * smear[None, :] + jitter).astype(np.float32)
    return out


def frame_lost(points: np.ndarray, severity: int, rng: np.random.Generator, ctx: dict) -> np.ndarray:
    return points[:0] if rng.random() < LIDAR_FRAME_LOST[severity - 1] else points


_LIDAR = {"fog_lidar": fog, "snow_lidar": snow, "beam_reduction": beam_reduction, "point_dropout": point_dropout,
          "crosstalk": crosstalk, "incomplete_echo": incomplete_echo, "motion_blur_lidar": motion_blur,
          "lidar_frame_lost": frame_lost}


def corrupt_lidar_points(name: str, points: np.ndarray, severity: int, rng: np.random.Generator,
                         ctx: dict | None = None) -> np.ndarray:
    """The corruption `name` (one of `LIDAR_CORRUPTIONS`) of one (N, 5) float32 sweep at `severity` 1..5."""
    return np.ascontiguousarray(_LIDAR[name](points, severity, rng, ctx or {}), dtype="<f4")


def corrupt_lidar_file(name: str, raw: bytes, severity: int, rng: np.random.Generator, ctx: dict | None = None,
                       path: str = "") -> bytes:
    """A LiDAR `.pcd.bin` file's bytes corrupted; an empty result is an empty (0-byte) file."""
    if len(raw) % (4 * LIDAR_RECORD_FLOATS):
        raise DataError(f"LiDAR file is truncated: {len(raw)} bytes is not a multiple of 20 (N x 5 float32)", path=path)
    points = np.frombuffer(raw, "<f4").reshape(-1, LIDAR_RECORD_FLOATS)
    return corrupt_lidar_points(name, points, severity, rng, ctx).tobytes()


def split_radar_file(raw: bytes, path: str = "") -> tuple[np.ndarray, bytes]:
    """(records, tail) of a nuScenes radar `.pcd`: every record the header announces (the empty-sweep marker
    included) and the bytes after them (nuScenes writes one newline)."""
    lines = raw.split(b"\n", 11)
    if len(lines) < 12 or not lines[10].startswith(b"DATA binary"):
        raise DataError("radar file header is not the 11-line binary PCD v0.7 header", path=path)
    try:
        width = int(lines[6].split()[1])
    except (IndexError, ValueError):
        raise DataError("radar file WIDTH line is malformed", path=path) from None
    pos = len(raw) - len(lines[11])
    end = pos + width * RADAR_PCD_DTYPE.itemsize
    if end > len(raw):
        raise DataError(f"radar file is truncated: the header promises {width} records", path=path)
    return np.frombuffer(raw, RADAR_PCD_DTYPE, count=width, offset=pos).copy(), raw[end:]


def radar_file_bytes(records: np.ndarray, tail: bytes = b"\n") -> bytes:
    """A nuScenes radar `.pcd` of `records`; none gives the nuScenes empty-sweep marker (one record of NaNs)."""
    if not len(records):
        records = np.zeros(1, RADAR_PCD_DTYPE)
        for name in RADAR_PCD_DTYPE.names:
            if RADAR_PCD_DTYPE[name].kind == "f":
                records[name] = np.nan
    return RADAR_PCD_HEADER.format(n=len(records)).encode("ascii") + records.tobytes() + tail


def _is_marker(records: np.ndarray) -> bool:
    return len(records) == 1 and bool(np.isnan([records["x"][0], records["y"][0], records["z"][0]]).all())


def radar_dropout(records: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    keep = rng.random(len(records)) >= RADAR_DROPOUT[severity - 1]
    return records[:0] if _is_marker(records) else records[keep]


def radar_clutter(records: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    real = records[:0] if _is_marker(records) else records
    k = int(rng.poisson(RADAR_CLUTTER[severity - 1] * max(len(real), 10)))
    fake = np.zeros(k, RADAR_PCD_DTYPE)
    if len(real):
        fake[:] = real[rng.integers(0, len(real), k)]
    else:
        for name, value in RADAR_TEMPLATE.items():
            fake[name] = value
    azimuth = np.radians(rng.uniform(-RADAR_FOV_DEG, RADAR_FOV_DEG, k))
    rng_m = rng.uniform(*RADAR_RANGE_M, k)
    fake["x"], fake["y"], fake["z"] = rng_m * np.cos(azimuth), rng_m * np.sin(azimuth), 0.0
    fake["rcs"] = rng.uniform(-10, 10, k)
    v = rng.standard_normal((k, 2))
    fake["vx"], fake["vy"], fake["vx_comp"], fake["vy_comp"] = v[:, 0], v[:, 1], v[:, 0], v[:, 1]
    fake["dyn_prop"] = rng.integers(0, 7, k)
    fake["invalid_state"], fake["ambig_state"] = 0, 3
    start = int(real["id"].max()) + 1 if len(real) else 0
    fake["id"] = (start + np.arange(k)) % np.iinfo(np.int16).max
    return np.concatenate([real, fake])


_RADAR = {"radar_dropout": radar_dropout, "radar_clutter": radar_clutter}


def corrupt_radar_file(name: str, raw: bytes, severity: int, rng: np.random.Generator, path: str = "") -> bytes:
    """A radar `.pcd` file's bytes corrupted by `name` (one of `RADAR_CORRUPTIONS`)."""
    records, tail = split_radar_file(raw, path)
    return radar_file_bytes(_RADAR[name](records, severity, rng), tail or b"\n")

