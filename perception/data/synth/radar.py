"""Radar: returns of the 5 nuScenes radars (Continental ARS408-like) from the road users and structures of a
`World`, written as binary PCD v0.7 with the 18 nuScenes fields.

Each return lies in the radar frame (x forward, y left) at z = 0, as in real nuScenes. A Doppler radar measures
only the radial speed, so both velocity pairs are radial vectors (along the line from the radar to the return), as
in real nuScenes data (nuscenes-devkit issues #748, #924): `vx_comp, vy_comp` carry the radial part of the
object's own velocity (ego motion compensated), `vx, vy` the radial part of its velocity relative to the moving
ego; the tangential part is not measured. All returns pass the devkit's default filters (invalid_state 0,
dyn_prop 0..6, ambig_state 3).
"""

from __future__ import annotations

import math

import numpy as np

from perception.data.loading import RADAR_PCD_DTYPE, RADAR_PCD_HEADER
from perception.data.synth.lidar import boxes_in_frame
from perception.data.synth.world import World, WorldBoxes

RADAR_DTYPE = RADAR_PCD_DTYPE
_HEADER = RADAR_PCD_HEADER
assert RADAR_DTYPE.itemsize == 43

NEAR_RANGE, NEAR_FOV = 70.0, math.radians(60.0)
FAR_RANGE, FAR_FOV = 200.0, math.radians(9.0)
INSET = 0.3  # returns sit this far inside the object's surface (metres)


def _in_fov(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    r = np.hypot(x, y)
    az = np.abs(np.arctan2(y, x))
    return ((r < NEAR_RANGE) & (az < NEAR_FOV)) | ((r < FAR_RANGE) & (az < FAR_FOV))


def _segment_blocked(p: np.ndarray, centers: np.ndarray, sizes: np.ndarray, yaws: np.ndarray, skip: int) -> bool:
    """Whether the segment from the origin to p (2D, radar frame) passes through any footprint but `skip`."""
    L = float(np.hypot(*p))
    if L < 1e-6:
        return False
    d = p / L
    c, s = np.cos(yaws), np.sin(yaws)
    ox, oy = -(c * centers[:, 0] + s * centers[:, 1]), -(-s * centers[:, 0] + c * centers[:, 1])
    dx, dy = c * d[0] + s * d[1], -s * d[0] + c * d[1]
    hx, hy = sizes[:, 1] / 2, sizes[:, 0] / 2
    with np.errstate(divide="ignore", invalid="ignore"):
        tx1, tx2 = (-hx - ox) / dx, (hx - ox) / dx
        ty1, ty2 = (-hy - oy) / dy, (hy - oy) / dy
    tmin = np.maximum(np.minimum(tx1, tx2), np.minimum(ty1, ty2))
    tmax = np.minimum(np.maximum(tx1, tx2), np.maximum(ty1, ty2))
    hit = (tmax >= tmin) & (tmin > 0) & (tmin < L - 0.5) & np.isfinite(tmin)
    hit[skip] = False
    return bool(hit.any())


def _doppler(v_radar: np.ndarray, ego_v_radar: np.ndarray, p: np.ndarray, rng: np.random.Generator,
             sigma: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """What a Doppler radar reports for a return at p (2D, radar frame, m) on an object moving at v_radar (m/s,
    radar frame, ground velocity) seen from an ego moving at ego_v_radar: (v_comp, v_rel), each (2,), the radial
    speed (noise `sigma`) times the unit line of sight. v_comp is ego-motion compensated, v_rel is not."""
    los = p / max(float(np.hypot(*p)), 1e-6)
    vr_comp = float(np.dot(v_radar, los)) + rng.normal(0.0, sigma)
    vr_ego = float(np.dot(ego_v_radar, los))
    return vr_comp * los, (vr_comp - vr_ego) * los


def scan(world: World, boxes: WorldBoxes, radar2global: np.ndarray, rng: np.random.Generator, t: float) -> np.ndarray:
    """One radar scan: a RADAR_DTYPE array of returns in the radar frame."""
    centers, yaws = boxes_in_frame(boxes, radar2global)
    R = radar2global[:3, :3]
    ego_v_global = np.array([*world.ego_velocity_global(t), 0.0])
    ego_v_radar = R.T @ ego_v_global
    rows = []
    n_agents = boxes.num_agents
    visible = _in_fov(centers[:, 0], centers[:, 1])
    for b in np.nonzero(visible)[0]:
        is_agent = b < n_agents
        cx, cy = centers[b, :2]
        c, s = math.cos(yaws[b]), math.sin(yaws[b])
        hl, hw = boxes.sizes[b, 1] / 2, boxes.sizes[b, 0] / 2
        if is_agent and boxes.sizes[b, 2] < 0.6:
            continue  # below the radar's mounting height
        # Closest point of the footprint to the radar, pulled inside the object.
        lx, ly = c * -cx + s * -cy, -s * -cx + c * -cy  # radar origin in the box frame
        qx = float(np.clip(lx, -hl + min(INSET, hl), hl - min(INSET, hl)))
        qy = float(np.clip(ly, -hw + min(INSET, hw), hw - min(INSET, hw)))
        if is_agent:
            agent = world.agents[b]
            lo_rcs = agent.rcs
            n = 1 + int(rng.random() < 0.5) + (1 if boxes.sizes[b, 1] > 6 else 0)
            p_detect = 0.9 if np.hypot(cx, cy) < 50 else 0.6
        else:
            lo_rcs = rng.uniform(0.0, 12.0)
            n = 1
            p_detect = 0.35
        for _ in range(n):
            if rng.random() > p_detect:
                continue
            jx = qx + rng.uniform(-0.2, 0.2) * (hl > 1.0)
            jy = qy + rng.uniform(-0.2, 0.2) * (hw > 1.0)
            jx = float(np.clip(jx, -hl + 0.05, hl - 0.05))
            jy = float(np.clip(jy, -hw + 0.05, hw - 0.05))
            p = np.array([cx + c * jx - s * jy, cy + s * jx + c * jy])
            if not _in_fov(p[:1], p[1:])[0] or _segment_blocked(p, centers[:, :2], boxes.sizes, yaws, b):
                continue
            if is_agent:
                v_global = np.array([*world.agent_velocity_global(b, t), 0.0])
            else:
                v_global = np.zeros(3)
            v_comp, v_rel = _doppler((R.T @ v_global)[:2], ego_v_radar[:2], p, rng)
            speed = float(np.hypot(*v_global[:2]))
            if speed < 0.2:
                dyn = 1
            else:
                radial = float(np.dot(v_comp, p / np.hypot(*p)))
                dyn = 2 if radial < -0.5 else 0
            rows.append((p[0], p[1], 0.0, dyn, 0, lo_rcs + rng.normal(0, 1.0), v_rel[0], v_rel[1], v_comp[0], v_comp[1], 1, 3, 19, 19, 0, 1, 17, 17))
    # Clutter: ghost returns from the road surroundings, stationary.
    for _ in range(int(rng.integers(2, 8))):
        r, az = rng.uniform(5.0, 60.0), rng.uniform(-NEAR_FOV, NEAR_FOV) * 0.9
        p = np.array([r * math.cos(az), r * math.sin(az)])
        v_comp, v_rel = _doppler(np.zeros(2), ego_v_radar[:2], p, rng)
        rows.append((p[0], p[1], 0.0, 1, 0, rng.uniform(-8.0, 4.0), v_rel[0], v_rel[1], v_comp[0], v_comp[1], 1, 3, 20, 20, 0, 1, 17, 17))
    out = np.zeros(len(rows), dtype=RADAR_DTYPE)
    for i, r in enumerate(rows):
        out[i] = r
    out["id"] = np.arange(len(rows), dtype=np.int16)
    return out


def write_radar_pcd(path, points: np.ndarray) -> None:
    """Write RADAR_DTYPE returns as nuScenes binary PCD v0.7 (with the trailing byte the devkit requires).

    An empty scan is written as one NaN point, which the devkit reads as an empty cloud.
    """
    if len(points) == 0:
        points = np.zeros(1, dtype=RADAR_DTYPE)
        points["x"] = np.nan
    body = np.ascontiguousarray(points.astype(RADAR_DTYPE, copy=False)).tobytes()
    with open(path, "wb") as f:
        f.write(_HEADER.format(n=len(points)).encode("ascii"))
        f.write(body)
        f.write(b"\n")


def expected_returns(centers: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Closed-form count of the returns `scan` places on each road user, without sampling (tables-only datasets).

    centers: (M, 2) box centres in the radar frame (x forward, y left), metres; sizes: (M, 3) w, l, h metres.
    Returns (M,) int: `scan`'s expected returns (1.5 per object, one more beyond 6 m long, times the detection
    probability: 0.9 within 50 m, else 0.6), rounded; 0 outside the field of view or below the mounting height.
    Occlusion is not modelled.
    """
    centers, sizes = np.asarray(centers, np.float64).reshape(-1, 2), np.asarray(sizes, np.float64).reshape(-1, 3)
    n = 1.5 + (sizes[:, 1] > 6)
    p_detect = np.where(np.hypot(centers[:, 0], centers[:, 1]) < 50, 0.9, 0.6)
    seen = _in_fov(centers[:, 0], centers[:, 1]) & (sizes[:, 2] >= 0.6)
    return np.where(seen, np.round(n * p_detect), 0).astype(np.int64)
