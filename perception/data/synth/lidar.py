"""LiDAR: a 32-beam spinning sensor (the HDL-32E's vertical angles) ray-cast against the ground, the road users
and the roadside structures of a `World`.

Points are written as nuScenes `.pcd.bin`: little-endian float32 x5 (x, y, z, intensity, ring) in the
LIDAR_TOP frame (x right, y forward, z up).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from perception.data.synth.world import LANE_WHITE, CENTER_YELLOW, GRASS, PARKING_LINE, ROAD, STOP_WHITE, WALKWAY, ZEBRA, CARPARK, World, WorldBoxes

# HDL-32E: 32 beams from -30.67 to +10.67 degrees, 1.33 degrees apart; ring 0 is the lowest beam.
ELEVATIONS_DEG = np.linspace(-30.67, 10.67, 32)
NUM_AZIMUTH = 1084  # firings per revolution at 20 Hz
MAX_RANGE = 70.0
SURFACE_INSET = 0.03  # physical solids are this much smaller than their annotation boxes (metres, per side)

_GROUND_INTENSITY = {GRASS: 9.0, ROAD: 5.0, WALKWAY: 22.0, ZEBRA: 70.0, LANE_WHITE: 65.0, CENTER_YELLOW: 55.0, CARPARK: 7.0, STOP_WHITE: 70.0, PARKING_LINE: 60.0}
_GROUND_LUT = np.zeros(256, dtype=np.float32)
for _k, _v in _GROUND_INTENSITY.items():
    _GROUND_LUT[_k] = _v


@dataclass(frozen=True)
class BeamPattern:
    """Unit ray directions in the LIDAR_TOP frame, arranged (NUM_AZIMUTH, 32): azimuth-major."""

    dirs: np.ndarray  # (A, 32, 3)
    azimuth: np.ndarray  # (A,) radians, counter-clockwise from +x, in [0, 2 pi)

    @staticmethod
    def hdl32(num_azimuth: int = NUM_AZIMUTH) -> "BeamPattern":
        az = (np.arange(num_azimuth) + 0.5) * (2 * math.pi / num_azimuth)
        el = np.radians(ELEVATIONS_DEG)
        ca, sa = np.cos(az)[:, None], np.sin(az)[:, None]
        ce, se = np.cos(el)[None, :], np.sin(el)[None, :]
        dirs = np.stack([ca * ce, sa * ce, np.broadcast_to(se, (num_azimuth, 32))], -1)
        return BeamPattern(dirs, az)


@dataclass
class RayHits:
    """Result of one sweep. Arrays over all rays (A * 32), in the LIDAR_TOP frame."""

    t: np.ndarray  # (R,) distance to the first hit, inf for none
    box: np.ndarray  # (R,) index into the WorldBoxes of the first hit, -1 for ground or none
    rays_through: np.ndarray  # (M,) number of rays whose line passes through each box (occluded or not)
    rays_first: np.ndarray  # (M,) number of rays whose first hit is each box


def boxes_in_frame(boxes: WorldBoxes, sensor2global: np.ndarray):
    """Box centres (M, 3) and yaws (M,) in a sensor frame whose rotation is about z only."""
    R = sensor2global[:3, :3]
    centers = (boxes.centers - sensor2global[:3, 3]) @ R
    yaws = boxes.yaws - math.atan2(R[1, 0], R[0, 0])
    return centers, yaws


def cast(pattern: BeamPattern, sensor_height: float, centers: np.ndarray, sizes: np.ndarray, yaws: np.ndarray, max_range: float = MAX_RANGE, inset: np.ndarray | None = None) -> RayHits:
    """First hits of every beam against the ground plane z = -sensor_height and the boxes (sensor frame).

    centers: (M, 3), sizes: (M, 3) w, l, h, yaws: (M,). `inset` (M,) shrinks each solid per side.
    """
    A = pattern.dirs.shape[0]
    dirs = pattern.dirs
    dz = dirs[..., 2]
    with np.errstate(divide="ignore"):
        t_best = np.where(dz < -1e-6, -sensor_height / dz, np.inf)  # (A, 32)
    t_best = np.where(t_best <= max_range, t_best, np.inf)
    box_best = np.full((A, 32), -1, dtype=np.int64)
    M = len(centers)
    through = np.zeros(M, dtype=np.int64)
    first = np.zeros(M, dtype=np.int64)
    if M == 0:
        return RayHits(t_best.reshape(-1), box_best.reshape(-1), through, first)
    half = sizes[:, [1, 0, 2]] / 2.0  # along heading, across, up
    if inset is not None:
        half = np.maximum(half - inset[:, None], 0.01)
    dist = np.linalg.norm(centers[:, :2], axis=1)
    radius = np.linalg.norm(half[:, :2], axis=1)
    dphi = 2 * math.pi / A
    candidates = np.nonzero(dist - radius < max_range)[0]
    order = candidates[np.argsort(dist[candidates])]
    span = np.zeros((M, 2), dtype=np.int64)
    for b in order:
        cx, cy, cz = centers[b]
        c, s = math.cos(yaws[b]), math.sin(yaws[b])
        hx, hy, hz = half[b]
        # Azimuth interval covered by the box's footprint corners.
        corners = np.array([[cx + c * a - s * bb, cy + s * a + c * bb] for a in (-hx, hx) for bb in (-hy, hy)])
        if dist[b] <= radius[b] + 0.05:
            idx = np.arange(A)
        else:
            phc = math.atan2(cy, cx)
            ang = np.arctan2(corners[:, 1], corners[:, 0]) - phc
            ang = (ang + math.pi) % (2 * math.pi) - math.pi
            lo = int(math.floor((phc + ang.min()) / dphi - 0.5)) - 1
            hi = int(math.ceil((phc + ang.max()) / dphi - 0.5)) + 1
            idx = np.arange(lo, hi + 1) % A
        d = dirs[idx]  # (k, 32, 3)
        # Ray origin (0) and directions in the box frame.
        ox, oy, oz = -(c * cx + s * cy), -(-s * cx + c * cy), -cz
        dx = c * d[..., 0] + s * d[..., 1]
        dy = -s * d[..., 0] + c * d[..., 1]
        dzb = d[..., 2]
        with np.errstate(divide="ignore", invalid="ignore"):
            tx1, tx2 = (-hx - ox) / dx, (hx - ox) / dx
            ty1, ty2 = (-hy - oy) / dy, (hy - oy) / dy
            tz1, tz2 = (-hz - oz) / dzb, (hz - oz) / dzb
        tmin = np.maximum(np.maximum(np.minimum(tx1, tx2), np.minimum(ty1, ty2)), np.minimum(tz1, tz2))
        tmax = np.minimum(np.minimum(np.maximum(tx1, tx2), np.maximum(ty1, ty2)), np.maximum(tz1, tz2))
        hit = (tmax >= tmin) & (tmin > 0) & (tmin <= max_range)
        hit &= np.isfinite(tmin)
        if not hit.any():
            continue
        # A ray whose ground hit comes first cannot reach the box above the ground.
        sub_t = t_best[idx]
        ground_first = (box_best[idx] < 0) & (sub_t < tmin)
        through[b] = int((hit & ~ground_first).sum())
        better = hit & (tmin < sub_t)
        if better.any():
            sub_t = np.where(better, tmin, sub_t)
            sub_b = np.where(better, b, box_best[idx])
            t_best[idx] = sub_t
            box_best[idx] = sub_b
    flat_box = box_best.reshape(-1)
    first = np.bincount(flat_box[flat_box >= 0], minlength=M)
    return RayHits(t_best.reshape(-1), flat_box, through, first)


def sweep(world: World, boxes: WorldBoxes, lidar2global: np.ndarray, sensor_height: float, rng: np.random.Generator, pattern: BeamPattern) -> tuple[np.ndarray, RayHits]:
    """One LiDAR sweep. Returns (N, 5) float32 points (x, y, z, intensity, ring) in the LIDAR_TOP frame."""
    centers, yaws = boxes_in_frame(boxes, lidar2global)
    inset = np.full(len(centers), SURFACE_INSET)
    hits = cast(pattern, sensor_height, centers, boxes.sizes, yaws, inset=inset)
    dirs = pattern.dirs.reshape(-1, 3)
    ring = np.tile(np.arange(32, dtype=np.float32), pattern.dirs.shape[0])
    keep = np.isfinite(hits.t)
    # Dropout: a base rate, more in rain and at long range.
    p_drop = (0.12 if world.rain else 0.03) + 0.1 * np.clip((hits.t - 40.0) / 30.0, 0, 1)
    keep &= rng.random(len(keep)) >= np.where(np.isfinite(p_drop), p_drop, 1.0)
    t = hits.t[keep]
    noise = np.clip(rng.normal(0.0, 0.012 if not world.rain else 0.02, len(t)), -0.025, 0.025)
    t = t + noise
    pts = dirs[keep] * t[:, None]
    box_idx = hits.box[keep]
    # Intensity: ground by surface class, solids by reflectivity and incidence.
    intensity = np.empty(len(t), dtype=np.float32)
    on_ground = box_idx < 0
    if on_ground.any():
        g = pts[on_ground]
        g_global = g @ lidar2global[:3, :3].T + lidar2global[:3, 3]
        uv = world.to_scene(g_global[:, :2])
        cls = world.ground_class(uv[:, 0], uv[:, 1])
        intensity[on_ground] = _GROUND_LUT[cls]
    if (~on_ground).any():
        intensity[~on_ground] = boxes.reflectivity[box_idx[~on_ground]]
    intensity *= np.exp(-t / 120.0) * rng.uniform(0.8, 1.2, len(t))
    intensity = np.clip(np.round(intensity), 0, 255)
    out = np.concatenate([pts, intensity[:, None], ring[keep][:, None]], axis=1).astype(np.float32)
    return out, hits


def write_pcd_bin(path, points: np.ndarray) -> None:
    """Write (N, 5) float32 points as a nuScenes `.pcd.bin`."""
    np.ascontiguousarray(points, dtype="<f4").tofile(path)


def expected_points(offsets: np.ndarray, sizes: np.ndarray, yaws: np.ndarray, rain: bool = False, max_range: float = MAX_RANGE) -> np.ndarray:
    """Closed-form estimate of the LiDAR returns on each box, without ray casting (tables-only datasets).

    offsets: (M, 3) box centres minus the LiDAR origin, metres, in a frame whose z is up (global or LIDAR_TOP);
    sizes: (M, 3) w, l, h metres; yaws: (M,) box headings in that frame, radians; rain: the sweep's dropout.
    Returns (M,) float: the HDL-32E beams across the box's elevation span (as seen from its near face) times the
    azimuth firings across its silhouette (its width across the line of sight), thinned by `sweep`'s dropout;
    0 beyond `max_range`. Occlusion by other boxes is not modelled, so this is an upper estimate of `cast`.
    """
    offsets, sizes, yaws = np.asarray(offsets, np.float64).reshape(-1, 3), np.asarray(sizes, np.float64).reshape(-1, 3), np.asarray(yaws, np.float64)
    w, l, h = sizes[:, 0], sizes[:, 1], sizes[:, 2]
    dist = np.hypot(offsets[:, 0], offsets[:, 1])
    rel = yaws - np.arctan2(offsets[:, 1], offsets[:, 0])  # box heading relative to the line of sight
    across = np.abs(l * np.sin(rel)) + np.abs(w * np.cos(rel))  # silhouette width (m)
    depth = np.abs(l * np.cos(rel)) + np.abs(w * np.sin(rel))  # extent along the line of sight (m)
    near = np.maximum(dist - depth / 2, 0.5)
    azimuth_span = 2 * np.arctan(across / (2 * near))  # radians
    spacing = math.radians(ELEVATIONS_DEG[1] - ELEVATIONS_DEG[0])
    lo = np.maximum(np.arctan2(offsets[:, 2] - h / 2, near), math.radians(ELEVATIONS_DEG[0]) - spacing / 2)
    hi = np.minimum(np.arctan2(offsets[:, 2] + h / 2, near), math.radians(ELEVATIONS_DEG[-1]) + spacing / 2)
    beams = np.maximum(hi - lo, 0.0) / spacing
    firings = azimuth_span / (2 * math.pi / NUM_AZIMUTH)
    keep = (0.88 if rain else 0.97) - 0.1 * np.clip((near - 40.0) / 30.0, 0, 1)
    return np.where(near <= max_range, beams * firings * keep, 0.0)
