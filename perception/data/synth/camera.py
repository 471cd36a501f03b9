"""Cameras: pinhole renders of a `World` through each camera's calibration.

The ground (road, markings, walkways, car park, grass) is textured per pixel from the world's ground raster;
sky above the horizon; road users and structures are shaded solids drawn far to near, so nearer objects
occlude farther ones. An object's 3D box projects onto its own pixels. Night scenes are dark and noisy, with
pools of street-lamp light; dusk scenes dim and warm; rain scenes hazy with streaks. Each scene has its own
exposure and noise level.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from perception.data.synth.rig import Sensor
from perception.data.synth.world import (
    CARPARK, CENTER_YELLOW, GRASS, LANE_WHITE, PARKING_LINE, ROAD, STOP_WHITE, WALKWAY, ZEBRA, World, WorldBoxes,
)

_PALETTE = np.zeros((256, 3), dtype=np.float32)
for _cls, _rgb in {
    GRASS: (78, 112, 60), ROAD: (72, 72, 78), WALKWAY: (150, 146, 138), ZEBRA: (226, 226, 222),
    LANE_WHITE: (220, 220, 216), CENTER_YELLOW: (214, 178, 48), CARPARK: (96, 96, 102),
    STOP_WHITE: (232, 232, 228), PARKING_LINE: (214, 214, 210),
}.items():
    _PALETTE[_cls] = _rgb

_SUN = np.array([0.35, 0.45, 0.82]) / np.linalg.norm([0.35, 0.45, 0.82])
_HAZE = np.array([182.0, 192.0, 205.0], dtype=np.float32)
MAX_GROUND_RANGE = 250.0
NEAR = 0.15  # near clipping plane (metres)

# Box faces as corner indices into the corner order (+l+w+h, +l-w+h, +l-w-h, +l+w-h, -l+w+h, -l-w+h, -l-w-h, -l+w-h)
# with their outward normal in the box frame (x along length, y across, z up).
_FACES = [
    ((0, 1, 2, 3), (1, 0, 0)),
    ((4, 7, 6, 5), (-1, 0, 0)),
    ((0, 3, 7, 4), (0, 1, 0)),
    ((1, 5, 6, 2), (0, -1, 0)),
    ((0, 4, 5, 1), (0, 0, 1)),
    ((3, 2, 6, 7), (0, 0, -1)),
]
_BELOW = {0: 3, 1: 2, 4: 7, 5: 6}  # the corner under each top corner
_SIGNS = np.array([[1, 1, 1], [1, -1, 1], [1, -1, -1], [1, 1, -1], [-1, 1, 1], [-1, -1, 1], [-1, -1, -1], [-1, 1, -1]], dtype=np.float64)

# Painted bands on the side faces per category prefix: (from, to) as fractions of height, RGB.
_BANDS = {
    "vehicle.car": [((0.62, 0.9), (35, 40, 52))],
    "vehicle.truck": [((0.7, 0.9), (35, 40, 52))],
    "vehicle.bus": [((0.5, 0.85), (35, 40, 52))],
    "vehicle.construction": [((0.65, 0.95), (35, 40, 52)), ((0.0, 0.2), (40, 40, 40))],
    "vehicle.motorcycle": [((0.0, 0.35), (30, 30, 30))],
    "vehicle.bicycle": [((0.0, 0.4), (30, 30, 30))],
    "human": [((0.86, 1.0), (222, 184, 150)), ((0.0, 0.45), (45, 45, 60))],
    "movable_object.trafficcone": [((0.45, 0.62), (245, 245, 245))],
    "movable_object.barrier": [((0.3, 0.5), (245, 245, 245)), ((0.7, 0.85), (245, 245, 245))],
}


@dataclass
class CameraModel:
    """Per-camera quantities that do not change from frame to frame (the rig is rigid, the ground flat)."""

    sensor: Sensor
    ground_xy_ego: np.ndarray  # (G, 2) float32, ego-frame ground point of each ground pixel
    ground_index: np.ndarray  # (G,) flat pixel index of the ground pixels
    ground_fog: np.ndarray  # (G, 1) float32 in [0, 1], haze weight by distance
    sky: np.ndarray  # (H, W, 3) float32, sky colour (day)
    grain: np.ndarray  # (H, W) float32, fixed-pattern sensor grain

    @staticmethod
    def build(sensor: Sensor, seed: int = 0) -> "CameraModel":
        H, W = sensor.height, sensor.width
        K_inv = np.linalg.inv(sensor.intrinsic)
        u, v = np.meshgrid(np.arange(W) + 0.5, np.arange(H) + 0.5)
        rays_cam = np.stack([u, v, np.ones_like(u)], -1) @ K_inv.T
        rays_ego = rays_cam @ sensor.rotation.T
        dz = rays_ego[..., 2]
        height = sensor.translation[2]
        with np.errstate(divide="ignore"):
            t = np.where(dz < -1e-6, -height / dz, np.inf)
        hit = t * np.linalg.norm(rays_ego[..., :2], axis=-1)
        ground = hit < MAX_GROUND_RANGE
        idx = np.flatnonzero(ground)
        xy = (sensor.translation[:2] + rays_ego[..., :2] * t[..., None]).reshape(-1, 2)[idx].astype(np.float32)
        fog = (1.0 - np.exp(-hit.reshape(-1)[idx] / 140.0)).astype(np.float32)[:, None]
        elev = np.arctan2(dz, np.linalg.norm(rays_ego[..., :2], axis=-1))
        a = np.clip(elev / 0.6, 0.0, 1.0)[..., None]
        sky = ((1 - a) * _HAZE + a * np.array([92.0, 140.0, 210.0])).astype(np.float32)
        grain = np.random.default_rng(seed).normal(0.0, 1.0, (H, W)).astype(np.float32)
        return CameraModel(sensor, xy, idx, fog, sky, grain)


def render(model: CameraModel, world: World, boxes: WorldBoxes, ego2global: np.ndarray, categories: list[str], rng: np.random.Generator) -> np.ndarray:
    """(H, W, 3) uint8 RGB image of `world` at the pose `ego2global` (4x4; flat ground, yaw only).

    `categories` names the first `boxes.num_agents` solids (for class-dependent appearance).
    """
    sensor = model.sensor
    H, W = sensor.height, sensor.width
    img = model.sky.copy()
    flat = img.reshape(-1, 3)
    # Ground.
    R2 = ego2global[:2, :2]
    xy_global = model.ground_xy_ego @ R2.T.astype(np.float32) + ego2global[:2, 3].astype(np.float32)
    uv = world.to_scene(xy_global.astype(np.float64))
    cls = world.ground_class(uv[:, 0], uv[:, 1])
    colour = _PALETTE[cls]
    flat[model.ground_index] = colour * (1 - model.ground_fog) + _HAZE * model.ground_fog
    # At night the surroundings go dark, save the street lamps' pools, while road users stay lit by headlights
    # and lamps; at dusk the light is dimmer and warmer.
    night_bg, night_agent = (0.22, 0.8) if world.night else (0.55, 0.85) if world.dusk else (1.0, 1.0)
    if world.night or world.dusk:
        img *= night_bg
    if world.night and len(world.lamps):
        pool = world.lamp_light(uv[:, 0], uv[:, 1])
        flat[model.ground_index] *= (1.0 + 2.6 * pool)[:, None]
    # Solids, far to near.
    cam2global = ego2global @ sensor.sensor2ego
    global2cam = np.linalg.inv(cam2global)
    centers_cam = boxes.centers @ global2cam[:3, :3].T + global2cam[:3, 3]
    dist = np.linalg.norm(centers_cam, axis=1)
    radius = np.linalg.norm(boxes.sizes, axis=1) / 2
    candidates = np.nonzero((centers_cam[:, 2] > -radius) & (dist < 160.0))[0]
    K = sensor.intrinsic
    for b in candidates[np.argsort(-dist[candidates])]:
        w, l, h = boxes.sizes[b]
        c, s = math.cos(boxes.yaws[b]), math.sin(boxes.yaws[b])
        R_box = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
        local = _SIGNS * np.array([l / 2, w / 2, h / 2])
        corners_g = local @ R_box.T + boxes.centers[b]
        corners_c = corners_g @ global2cam[:3, :3].T + global2cam[:3, 3]
        base = boxes.colours[b].astype(np.float64) * (night_agent if b < boxes.num_agents else night_bg)
        cat = categories[b] if b < boxes.num_agents else ("building" if boxes.sizes[b, 2] > 6.5 and boxes.sizes[b, 0] > 1 else "pole")
        bands = next((v for k, v in _BANDS.items() if cat.startswith(k)), [])
        for idx, n_box in _FACES:
            n_global = R_box @ np.array(n_box, dtype=np.float64)
            n_cam = global2cam[:3, :3] @ n_global
            face = corners_c[list(idx)]
            if np.dot(n_cam, face.mean(0)) >= 0:  # back face
                continue
            shade = 0.42 + 0.58 * max(0.0, float(n_global @ _SUN))
            _fill(img, K, face, base * shade)
            if n_box[2] == 0 and bands:
                upper = [i for i in idx if _SIGNS[i, 2] > 0]
                top = corners_c[upper]
                bottom = corners_c[[_BELOW[i] for i in upper]]
                for (f0, f1), rgb in bands:
                    q = np.concatenate([bottom + (top - bottom) * f1, (bottom + (top - bottom) * f0)[::-1]])
                    _fill(img, K, q, np.array(rgb, dtype=np.float64) * shade * (night_agent if b < boxes.num_agents else night_bg))
    # Weather and sensor.
    if world.night:
        img += 5.0 * model.grain[..., None]
        noise_sigma = 6.0
    else:
        noise_sigma = 2.5
    if world.dusk:
        img *= np.array([1.05, 0.88, 0.72], dtype=np.float32)
    img *= np.float32(world.exposure)
    noise_sigma *= world.noise
    if world.rain:
        img = 0.72 * img + 0.28 * np.float32(150.0)
        streaks = np.zeros((H, W), np.float32)
        n = int(H * W / 4000)
        x0 = rng.integers(0, W, n)
        y0 = rng.integers(0, H, n)
        length = rng.integers(max(3, H // 40), max(6, H // 12), n)
        for x, y, L in zip(x0, y0, length):
            cv2.line(streaks, (int(x), int(y)), (int(x + L * 0.25), int(y + L)), 1.0, 1)
        img = img * (1 - 0.35 * streaks[..., None]) + 210.0 * 0.35 * streaks[..., None]
        img = cv2.GaussianBlur(img, (3, 3), 0)
    roll = rng.integers(0, 64, 2)
    img += noise_sigma * np.roll(model.grain, (int(roll[0]), int(roll[1])), axis=(0, 1))[..., None]
    return np.clip(img, 0, 255).astype(np.uint8)


def _fill(img: np.ndarray, K: np.ndarray, poly_cam: np.ndarray, rgb: np.ndarray) -> None:
    """Fill a planar convex polygon given in the camera frame, clipped to z >= NEAR."""
    poly = _clip_near(poly_cam)
    if len(poly) < 3:
        return
    p = poly @ K.T
    uv = p[:, :2] / p[:, 2:3]
    if (uv[:, 0].max() < 0) or (uv[:, 1].max() < 0) or (uv[:, 0].min() > img.shape[1]) or (uv[:, 1].min() > img.shape[0]):
        return
    uv = np.clip(uv, -1e5, 1e5)
    pts = np.round((uv - 0.5) * 16).astype(np.int32)
    cv2.fillConvexPoly(img, pts, [float(x) for x in rgb], lineType=cv2.LINE_AA, shift=4)


def _clip_near(poly: np.ndarray) -> np.ndarray:
    """Sutherland-Hodgman clip of a polygon (P, 3) against the plane z = NEAR."""
    inside = poly[:, 2] >= NEAR
    if inside.all():
        return poly
    if not inside.any():
        return poly[:0]
    out = []
    n = len(poly)
    for i in range(n):
        a, b = poly[i], poly[(i + 1) % n]
        ia, ib = a[2] >= NEAR, b[2] >= NEAR
        if ia:
            out.append(a)
        if ia != ib:
            t = (NEAR - a[2]) / (b[2] - a[2])
            out.append(a + t * (b - a))
    return np.array(out)


def write_jpeg(path, rgb: np.ndarray, quality: int = 90) -> None:
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise RuntimeError(f"JPEG encoding failed for {path}")
    with open(path, "wb") as f:
        f.write(buf.tobytes())
