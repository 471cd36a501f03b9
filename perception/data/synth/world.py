"""A synthetic world per scene: road layout, map layers, roadside structures, traffic and the ego's drive.

Everything is laid out in a *scene frame* (u along the main road, v to its left, metres; ground at z = 0)
and placed into the map's global frame by a rotation `theta` and an offset. The same primitives feed the
map expansion, the ground texture the cameras see and the surfaces the LiDAR hits, so all sensors agree.

Layout: a 4-lane main road (u axis) crossed by a 4-lane road at u = 0, walkways along both, zebra crossings
on every arm, stop lines, a car park beside the main road, buildings and lamp posts. Traffic drives on the
right; the ego drives the eastbound inner lane (v = -1.75) at constant speed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import cv2
import numpy as np

# Ground classes of the scene raster.
GRASS, ROAD, WALKWAY, ZEBRA, LANE_WHITE, CENTER_YELLOW, CARPARK, STOP_WHITE, PARKING_LINE = range(9)

EXTENT = 160.0  # the world spans [-EXTENT, EXTENT] in u and v
RASTER_RES = 0.1  # metres per ground-raster pixel
ROAD_HALF = 7.0  # 2 lanes of 3.5 m each way
LANE = 3.5
WALK_OUT = 11.0  # walkways span |v| in [ROAD_HALF, WALK_OUT]
CROSS_NEAR, CROSS_FAR = 8.0, 12.0  # zebra crossings span |u| in [8, 12] on the main road's arms

EGO_LANE_V = -1.75

# (w, l, h) means and the nuScenes category per kind of road user.
SIZES = {
    "vehicle.car": (1.95, 4.6, 1.7),
    "vehicle.truck": (2.5, 6.8, 3.0),
    "vehicle.bus.rigid": (2.9, 11.0, 3.4),
    "vehicle.bus.bendy": (2.9, 17.0, 3.3),
    "vehicle.trailer": (2.6, 9.5, 3.6),
    "vehicle.construction": (2.8, 6.5, 3.2),
    "human.pedestrian.adult": (0.68, 0.72, 1.76),
    "human.pedestrian.child": (0.5, 0.5, 1.25),
    "human.pedestrian.construction_worker": (0.72, 0.75, 1.78),
    "human.pedestrian.police_officer": (0.7, 0.72, 1.8),
    "vehicle.motorcycle": (0.85, 2.1, 1.5),
    "vehicle.bicycle": (0.62, 1.75, 1.3),
    "movable_object.trafficcone": (0.42, 0.42, 1.0),
    "movable_object.barrier": (2.5, 0.55, 1.0),
}

# Base colours (RGB) per category; cars and trucks draw from palettes for variety. All are chosen to stand
# out from asphalt, grass and walkway grey.
CAR_PAINTS = [(200, 30, 35), (30, 70, 200), (235, 235, 240), (240, 200, 30), (30, 150, 60), (150, 40, 170), (240, 120, 20), (20, 170, 190)]
COLOURS = {
    "vehicle.truck": [(240, 240, 240), (40, 90, 200), (200, 40, 40)],
    "vehicle.bus.rigid": [(220, 40, 40), (250, 200, 20)],
    "vehicle.bus.bendy": [(220, 40, 40), (30, 120, 220)],
    "vehicle.trailer": [(190, 200, 215), (120, 40, 160)],
    "vehicle.construction": [(250, 190, 0)],
    "human.pedestrian.adult": [(210, 40, 120), (40, 60, 200), (230, 150, 30), (30, 160, 150)],
    "human.pedestrian.child": [(250, 90, 160), (90, 200, 60)],
    "human.pedestrian.construction_worker": [(255, 140, 0)],
    "human.pedestrian.police_officer": [(20, 30, 140)],
    "vehicle.motorcycle": [(200, 20, 20), (20, 20, 230)],
    "vehicle.bicycle": [(20, 120, 240), (230, 40, 200)],
    "movable_object.trafficcone": [(255, 100, 0)],
    "movable_object.barrier": [(230, 30, 30)],
}
# LiDAR reflectivity (intensity 0-255) per category; cones and barriers carry retro-reflective bands.
REFLECTIVITY = {
    "vehicle": 30.0,
    "human": 18.0,
    "movable_object.trafficcone": 110.0,
    "movable_object.barrier": 70.0,
    "building": 25.0,
    "pole": 40.0,
}
# Radar cross-section (dBsm) ranges per category prefix.
RCS = {
    "vehicle.car": (4.0, 14.0),
    "vehicle.truck": (12.0, 25.0),
    "vehicle.bus": (15.0, 28.0),
    "vehicle.trailer": (12.0, 25.0),
    "vehicle.construction": (12.0, 25.0),
    "vehicle.motorcycle": (-2.0, 6.0),
    "vehicle.bicycle": (-6.0, 2.0),
    "human": (-10.0, -2.0),
    "movable_object.trafficcone": (-12.0, -4.0),
    "movable_object.barrier": (-2.0, 8.0),
}


def lookup_prefix(table: dict, category: str, default=None):
    """Value of the longest key of `table` that prefixes `category`."""
    best = None
    for k in table:
        if category.startswith(k) and (best is None or len(k) > len(best)):
            best = k
    return table[best] if best is not None else default


@dataclass
class Agent:
    """A road user or movable object moving at constant velocity in the scene frame.

    Position at scene time t (s): (u0 + du * t, v0 + dv * t), box bottom on the ground.
    """

    category: str
    size: tuple[float, float, float]  # w, l, h (metres)
    u0: float
    v0: float
    du: float
    dv: float
    yaw: float  # heading in the scene frame (rad)
    attribute: str | None
    colour: tuple[int, int, int]
    rcs: float

    def position(self, t: float) -> tuple[float, float]:
        return self.u0 + self.du * t, self.v0 + self.dv * t

    @property
    def speed(self) -> float:
        return math.hypot(self.du, self.dv)


@dataclass
class World:
    """One scene's world. See the module docstring for frames."""

    seed: int
    theta: float  # scene frame -> global rotation (rad)
    origin: np.ndarray  # (2,) global position of the scene frame's origin
    ego_u0: float
    ego_speed: float  # m/s along +u
    night: bool
    rain: bool
    tags: list[str]
    agents: list[Agent]
    statics: np.ndarray  # (S, 8): u, v, z, w, l, h, yaw, kind (0 building, 1 pole)
    static_colours: np.ndarray  # (S, 3) uint8
    polygons: dict[str, list[np.ndarray]]  # layer -> list of (P, 2) scene-frame polygons
    lines: dict[str, list[np.ndarray]]  # road_divider / lane_divider -> list of (2, 2) segments
    raster: np.ndarray = field(repr=False)  # (H, W) uint8 ground classes; row along +v, col along +u

    # --- frames ---------------------------------------------------------------------------------------
    @property
    def rotation(self) -> np.ndarray:
        c, s = math.cos(self.theta), math.sin(self.theta)
        return np.array([[c, -s], [s, c]])

    def to_global(self, uv: np.ndarray) -> np.ndarray:
        """(..., 2) scene-frame points -> global x, y."""
        return uv @ self.rotation.T + self.origin

    def to_scene(self, xy: np.ndarray) -> np.ndarray:
        """(..., 2) global x, y -> scene frame."""
        return (xy - self.origin) @ self.rotation

    def ego_pose(self, t: float) -> tuple[np.ndarray, float]:
        """Ego position (3,) in the global frame and yaw (rad) at scene time t (s)."""
        uv = np.array([self.ego_u0 + self.ego_speed * t, EGO_LANE_V])
        xy = self.to_global(uv)
        return np.array([xy[0], xy[1], 0.0]), self.theta

    def ego_velocity_global(self) -> np.ndarray:
        return self.rotation @ np.array([self.ego_speed, 0.0])

    # --- ground ---------------------------------------------------------------------------------------
    def ground_class(self, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        """Ground class at scene-frame points (any shape); GRASS outside the world."""
        col = np.floor((u + EXTENT) / RASTER_RES).astype(np.int64)
        row = np.floor((v + EXTENT) / RASTER_RES).astype(np.int64)
        h, w = self.raster.shape
        ok = (col >= 0) & (col < w) & (row >= 0) & (row < h)
        out = np.full(np.shape(u), GRASS, dtype=np.uint8)
        out[ok] = self.raster[row[ok], col[ok]]
        return out

    # --- boxes at a time ------------------------------------------------------------------------------
    def boxes_at(self, t: float) -> "WorldBoxes":
        """Every solid (agents then statics) at scene time t, in the global frame."""
        n = len(self.agents)
        centers = np.zeros((n + len(self.statics), 3))
        sizes = np.zeros((n + len(self.statics), 3))
        yaws = np.zeros(n + len(self.statics))
        colours = np.zeros((n + len(self.statics), 3), dtype=np.uint8)
        refl = np.zeros(n + len(self.statics))
        for i, a in enumerate(self.agents):
            u, v = a.position(t)
            centers[i, :2] = (u, v)
            centers[i, 2] = a.size[2] / 2
            sizes[i] = a.size
            yaws[i] = a.yaw
            colours[i] = a.colour
            refl[i] = lookup_prefix(REFLECTIVITY, a.category, 30.0)
        if len(self.statics):
            s = self.statics
            centers[n:, :2] = s[:, 0:2]
            centers[n:, 2] = s[:, 2]
            sizes[n:] = s[:, 3:6]
            yaws[n:] = s[:, 6]
            colours[n:] = self.static_colours
            refl[n:] = np.where(s[:, 7] == 0, REFLECTIVITY["building"], REFLECTIVITY["pole"])
        centers[:, :2] = self.to_global(centers[:, :2])
        return WorldBoxes(centers, sizes, yaws + self.theta, colours, refl, n)


@dataclass
class WorldBoxes:
    """Solids in the global frame. Rows [0, num_agents) are `World.agents` in order, the rest static."""

    centers: np.ndarray  # (M, 3) box centres, global
    sizes: np.ndarray  # (M, 3) w, l, h
    yaws: np.ndarray  # (M,) heading, global
    colours: np.ndarray  # (M, 3) uint8 RGB
    reflectivity: np.ndarray  # (M,)
    num_agents: int


# ---------------------------------------------------------------------------------------------------------
# Building a world.


def _rect(u0: float, u1: float, v0: float, v1: float) -> np.ndarray:
    return np.array([[u0, v0], [u1, v0], [u1, v1], [u0, v1]], dtype=np.float64)


def _segments(p0: np.ndarray, p1: np.ndarray, max_len: float = 20.0) -> list[np.ndarray]:
    """Split the straight line p0 -> p1 into 2-node segments no longer than max_len."""
    n = max(1, int(math.ceil(np.linalg.norm(p1 - p0) / max_len)))
    pts = [p0 + (p1 - p0) * k / n for k in range(n + 1)]
    return [np.stack([pts[k], pts[k + 1]]) for k in range(n)]


def _jitter(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(rng.uniform(lo, hi))


def build_world(seed: int, scene_index: int, origin: np.ndarray, duration_s: float) -> World:
    """A deterministic world for one scene. `duration_s` is the time from first to last keyframe."""
    rng = np.random.default_rng([seed, scene_index, 0x5EED])
    theta = float(rng.uniform(-math.pi, math.pi))
    night = bool(rng.random() < 0.25)
    rain = bool(not night and rng.random() < 0.25)
    want_intersection = bool(rng.random() < 0.6)
    want_parking = bool(rng.random() < 0.5)
    want_crowd = bool(rng.random() < 0.5)
    want_construction = bool(rng.random() < 0.5)

    ego_speed = _jitter(rng, 5.0, 8.5)
    path = ego_speed * duration_s
    if want_intersection:
        ego_u0 = -path * _jitter(rng, 0.3, 0.7)
    else:  # the whole drive stays at least 45 m east of the crossroads
        ego_u0 = _jitter(rng, 45.0, 60.0)
    u_lo, u_hi = ego_u0, ego_u0 + path
    passes_intersection = u_lo - 20.0 <= 0.0 <= u_hi + 20.0

    polygons: dict[str, list[np.ndarray]] = {k: [] for k in ("drivable_area", "road_segment", "ped_crossing", "walkway", "stop_line", "carpark_area", "lane")}
    lines: dict[str, list[np.ndarray]] = {"road_divider": [], "lane_divider": []}
    E, R = EXTENT, ROAD_HALF

    # Roads: one cross-shaped drivable polygon; road segments per arm and the intersection box.
    cross = np.array([(-E, -R), (-R, -R), (-R, -E), (R, -E), (R, -R), (E, -R), (E, R), (R, R), (R, E), (-R, E), (-R, R), (-E, R)], dtype=np.float64)
    polygons["drivable_area"].append(cross)
    polygons["road_segment"] += [_rect(-R, R, -R, R), _rect(R, E, -R, R), _rect(-E, -R, -R, R), _rect(-R, R, R, E), _rect(-R, R, -E, -R)]
    # Lanes of the main road's and the cross road's arms.
    for sgn in (1, -1):
        for k in range(-2, 2):
            polygons["lane"].append(_rect(min(sgn * R, sgn * E), max(sgn * R, sgn * E), k * LANE, (k + 1) * LANE))
            polygons["lane"].append(_rect(k * LANE, (k + 1) * LANE, min(sgn * R, sgn * E), max(sgn * R, sgn * E)))

    # Walkways: an L per quadrant.
    W = WALK_OUT
    for su in (1, -1):
        for sv in (1, -1):
            L = np.array([(R, R), (E, R), (E, W), (W, W), (W, E), (R, E)], dtype=np.float64) * np.array([su, sv])
            polygons["walkway"].append(L)

    # Zebra crossings on the 4 arms and stop lines in front of them on the incoming lanes.
    for s in (1, -1):
        polygons["ped_crossing"].append(_rect(min(s * CROSS_NEAR, s * CROSS_FAR), max(s * CROSS_NEAR, s * CROSS_FAR), -R + 0.05, R - 0.05))
        polygons["ped_crossing"].append(_rect(-R + 0.05, R - 0.05, min(s * CROSS_NEAR, s * CROSS_FAR), max(s * CROSS_NEAR, s * CROSS_FAR)))
    # Right-hand traffic: on the east arm (u > 0) traffic heads west in v > 0, etc.
    polygons["stop_line"] += [
        _rect(12.6, 13.2, 0.25, R - 0.25),
        _rect(-13.2, -12.6, -R + 0.25, -0.25),
        _rect(-R + 0.25, -0.25, 12.6, 13.2),
        _rect(0.25, R - 0.25, -13.2, -12.6),
    ]

    # Dividers: centre line (road_divider) and lane lines (lane_divider), outside the intersection and crossings.
    for s in (1, -1):
        a, b = s * 13.5, s * (E - 0.5)
        for v in (0.0, LANE, -LANE):
            for seg in _segments(np.array([a, v]), np.array([b, v])):
                lines["road_divider" if v == 0.0 else "lane_divider"].append(seg)
            for seg in _segments(np.array([v, a]), np.array([v, b])):
                lines["road_divider" if v == 0.0 else "lane_divider"].append(seg)

    # Car park beside the main road, on side `park_side`, near the drive if wanted.
    park_side = 1 if rng.random() < 0.5 else -1
    park_len, park_depth = 48.0, 26.0
    if want_parking:
        mid = _jitter(rng, u_lo, u_hi)
        park_u0 = mid - park_len / 2
    else:
        park_u0 = u_lo - 130.0 if rng.random() < 0.5 else u_hi + 90.0
    if park_u0 < 15.0 < park_u0 + park_len + 15 or park_u0 - 15 < -15.0 < park_u0 + park_len:  # keep clear of the crossroads
        park_u0 = 16.0 if park_u0 > -park_len / 2 else -16.0 - park_len
    pv0, pv1 = (W + 1.0, W + 1.0 + park_depth) if park_side > 0 else (-(W + 1.0 + park_depth), -(W + 1.0))
    park_poly = _rect(park_u0, park_u0 + park_len, pv0, pv1)
    polygons["carpark_area"].append(park_poly)
    polygons["drivable_area"].append(park_poly)
    near_parking = (park_u0 - 30.0 <= u_hi) and (park_u0 + park_len + 30.0 >= u_lo)

    # Buildings along the main road (beyond the walkways, clear of the car park) and the cross road.
    statics: list[tuple] = []
    colours: list[tuple] = []
    for sv in (1, -1):
        u = -E
        while u < E:
            length = _jitter(rng, 14.0, 30.0)
            depth = _jitter(rng, 10.0, 18.0)
            u0, u1 = u, min(u + length, E)
            u = u1 + _jitter(rng, 3.0, 9.0)
            if u1 > -W - 2 and u0 < W + 2:
                continue
            if sv == park_side and u1 > park_u0 - 2 and u0 < park_u0 + park_len + 2:
                continue
            v_in = sv * (W + 2.0)
            h = _jitter(rng, 6.0, 24.0)
            statics.append(((u0 + u1) / 2, v_in + sv * depth / 2, h / 2, depth, u1 - u0, h, 0.0, 0))
            g = int(rng.integers(110, 200))
            colours.append((g, int(g * _jitter(rng, 0.8, 1.0)), int(g * _jitter(rng, 0.7, 0.95))))
    for su in (1, -1):
        v = W + 30.0
        while v < E:
            length = _jitter(rng, 14.0, 30.0)
            depth = _jitter(rng, 10.0, 18.0)
            for sv in (1, -1):
                v0, v1 = sv * v, sv * min(v + length, E)
                h = _jitter(rng, 6.0, 20.0)
                statics.append((su * (W + 2.0 + depth / 2), (v0 + v1) / 2, h / 2, depth, abs(v1 - v0), h, 0.0, 0))
                g = int(rng.integers(110, 200))
                colours.append((g, g, int(g * 0.85)))
            v += length + _jitter(rng, 3.0, 9.0)
    # Lamp posts on the walkways.
    for sv in (1, -1):
        for u in np.arange(-E + 10.0, E - 10.0, 25.0):
            if abs(u) < W + 3:
                continue
            statics.append((float(u) + _jitter(rng, -1, 1), sv * (W - 0.25), 3.0, 0.3, 0.3, 6.0, 0.0, 1))
            colours.append((60, 60, 65))

    agents, has_crowd, has_construction = _populate(rng, ego_u0, ego_speed, duration_s, want_crowd, want_construction, park_poly, park_side)

    tags = []
    if night:
        tags.append("night")
    if rain:
        tags.append("rain")
    if passes_intersection:
        tags.append("intersection")
    if near_parking:
        tags.append("parking lot")
    if has_crowd:
        tags.append("pedestrians")
    if has_construction:
        tags.append("construction")

    world = World(
        seed=seed,
        theta=theta,
        origin=np.asarray(origin, dtype=np.float64),
        ego_u0=ego_u0,
        ego_speed=ego_speed,
        night=night,
        rain=rain,
        tags=tags,
        agents=agents,
        statics=np.array(statics, dtype=np.float64).reshape(-1, 8),
        static_colours=np.array(colours, dtype=np.uint8).reshape(-1, 3),
        polygons=polygons,
        lines=lines,
        raster=np.zeros((1, 1), np.uint8),
    )
    world.raster = _rasterise_ground(world)
    return world


def _pick(rng: np.random.Generator, options: list):
    return options[int(rng.integers(len(options)))]


def _make_agent(rng, category, u, v, yaw, speed, attribute) -> Agent:
    w, l, h = SIZES[category]
    f = _jitter(rng, 0.92, 1.08)
    size = (round(w * f, 3), round(l * _jitter(rng, 0.92, 1.08), 3), round(h * f, 3))
    colour = _pick(rng, CAR_PAINTS) if category == "vehicle.car" else _pick(rng, COLOURS[category])
    lo, hi = lookup_prefix(RCS, category)
    return Agent(category, size, u, v, speed * math.cos(yaw), speed * math.sin(yaw), yaw, attribute, colour, _jitter(rng, lo, hi))


def _populate(rng, ego_u0, ego_speed, T, want_crowd, want_construction, park_poly, park_side):
    """Traffic and objects. Vehicles in a lane share the lane's speed and keep their gaps, so nothing collides."""
    agents: list[Agent] = []
    u_mid = ego_u0 + ego_speed * T / 2
    E = EXTENT

    def fill_lane(v, heading, speed, kinds, gap_range, u_from, u_to, keep_clear=()):
        u = u_from + _jitter(rng, 0, gap_range[1])
        while u < u_to:
            cat = _pick(rng, kinds)
            length = SIZES[cat][1]
            c = u + length / 2
            if all(abs(c - k) > (length / 2 + 6.0) for k in keep_clear):
                attr = {"vehicle.motorcycle": "cycle.with_rider", "vehicle.bicycle": "cycle.with_rider"}.get(cat, "vehicle.moving")
                agents.append(_make_agent(rng, cat, c, v, heading, speed, attr))
                if cat == "vehicle.truck" and rng.random() < 0.5:  # a truck towing a trailer
                    tl = SIZES["vehicle.trailer"][1]
                    tc = c - math.cos(heading) * (length / 2 + 0.6 + tl / 2)
                    agents.append(_make_agent(rng, "vehicle.trailer", tc, v, heading, speed, "vehicle.moving"))
                    u += tl + 0.6
            u += length + _jitter(rng, *gap_range)

    span = ego_speed * T + 40.0
    # Ego lane: escorts ahead and behind at the ego's speed (positions at t = 0).
    moto_u = ego_u0 + _jitter(rng, 9.0, 12.0)
    fill_lane(EGO_LANE_V, 0.0, ego_speed, ["vehicle.car", "vehicle.car", "vehicle.motorcycle"], (14.0, 30.0), ego_u0 - 80.0, ego_u0 + 90.0, keep_clear=(ego_u0, moto_u))
    agents.append(_make_agent(rng, "vehicle.motorcycle", moto_u, EGO_LANE_V - 0.8, 0.0, ego_speed, "cycle.with_rider"))
    # Eastbound outer lane: slower heavy traffic and cyclists, including a truck+trailer and a bus near the ego.
    slow = ego_speed * _jitter(rng, 0.7, 0.9)
    rel = ego_speed - slow
    u0 = ego_u0 + rel * T / 2  # where a slow-lane object sits beside the ego at mid-scene
    agents.append(_make_agent(rng, "vehicle.truck", u0 + 8.0, -5.25, 0.0, slow, "vehicle.moving"))
    agents.append(_make_agent(rng, "vehicle.trailer", u0 + 8.0 - (SIZES["vehicle.truck"][1] + SIZES["vehicle.trailer"][1]) / 2 - 0.6, -5.25, 0.0, slow, "vehicle.moving"))
    bus = _pick(rng, ["vehicle.bus.rigid", "vehicle.bus.rigid", "vehicle.bus.bendy"])
    agents.append(_make_agent(rng, bus, u0 + 35.0, -5.25, 0.0, slow, "vehicle.moving"))
    agents.append(_make_agent(rng, "vehicle.bicycle", u0 + 22.0, -6.0, 0.0, slow, "cycle.with_rider"))
    fill_lane(-5.25, 0.0, slow, ["vehicle.car", "vehicle.truck", "vehicle.bicycle", "vehicle.car"], (18.0, 40.0), -E - slow * T, u0 - 30.0)
    fill_lane(-5.25, 0.0, slow, ["vehicle.car", "vehicle.bus.rigid", "vehicle.construction", "vehicle.car"], (18.0, 40.0), u0 + 55.0, E + 40.0)
    # Westbound lanes.
    fast = _jitter(rng, 7.0, 11.0)
    fill_lane(1.75, math.pi, fast, ["vehicle.car", "vehicle.car", "vehicle.car", "vehicle.motorcycle", "vehicle.truck"], (16.0, 35.0), -E, E + fast * T + 20)
    zone = None
    if want_construction:
        zu = u_mid + _jitter(rng, -10.0, 5.0)
        if -30.0 < zu < 30.0:
            zu = 30.0 if zu >= 0 else -55.0
        zone = (zu, zu + 24.0)
    if zone is None:
        # A construction vehicle driving west that passes the ego at mid-scene.
        cu = u_mid + slow * T / 2
        agents.append(_make_agent(rng, "vehicle.construction", cu, 5.25, math.pi, slow, "vehicle.moving"))
        fill_lane(5.25, math.pi, slow, ["vehicle.car", "vehicle.truck"], (20.0, 40.0), -E, E + slow * T + 20, keep_clear=(cu,))
    else:
        zu0, zu1 = zone
        # Work zone closing the westbound outer lane: cones along the lane line, barriers at the ends,
        # a working construction vehicle and workers.
        for u in np.arange(zu0, zu1 + 0.01, 3.0):
            agents.append(_make_agent(rng, "movable_object.trafficcone", float(u), 3.8, 0.0, 0.0, None))
        for u in (zu0 - 1.0, zu1 + 1.0):
            agents.append(_make_agent(rng, "movable_object.barrier", u, 5.25, 0.0, 0.0, None))
        agents.append(_make_agent(rng, "vehicle.construction", (zu0 + zu1) / 2, 5.4, math.pi, 0.0, "vehicle.parked"))
        for _ in range(int(rng.integers(2, 4))):
            cat = "human.pedestrian.construction_worker"
            moving = rng.random() < 0.4
            wu = _jitter(rng, zu0 + 2, zu0 + 7) if rng.random() < 0.5 else _jitter(rng, zu1 - 7, zu1 - 2)
            agents.append(_make_agent(rng, cat, wu, _jitter(rng, 4.6, 6.4), _pick(rng, [0.0, math.pi]), 0.6 if moving else 0.0, "pedestrian.moving" if moving else "pedestrian.standing"))
        # The outer lane's westbound traffic stays out of the zone (it is closed): place it beyond.
        fill_lane(5.25, math.pi, slow, ["vehicle.car", "vehicle.truck"], (20.0, 40.0), -E, zu0 - 40.0)
    # Cross road: queues stopped at the stop lines, traffic leaving the crossroads.
    for s in (1, -1):
        heading = math.pi / 2 if s < 0 else -math.pi / 2  # towards the crossroads
        u_lane = 1.75 if s < 0 else -1.75
        v = s * 13.8
        for _ in range(int(rng.integers(1, 4))):
            cat = _pick(rng, ["vehicle.car", "vehicle.car", "vehicle.truck"])
            L = SIZES[cat][1]
            agents.append(_make_agent(rng, cat, u_lane, v + s * L / 2, heading, 0.0, "vehicle.stopped"))
            v += s * (L + _jitter(rng, 1.5, 3.0))
        away = -heading
        sp = _jitter(rng, 6.0, 10.0)
        for vv in np.arange(16.0, E, _jitter(rng, 25.0, 45.0)):
            agents.append(_make_agent(rng, "vehicle.car", -u_lane, s * float(vv), away, sp, "vehicle.moving"))

    # Pedestrians: walking or standing on the walkways near the drive, some on the cross road's crossings.
    n_ped = int(rng.integers(14, 22)) if want_crowd else int(rng.integers(3, 6))
    for k in range(n_ped):
        sv = 1 if rng.random() < 0.5 else -1
        u = _jitter(rng, ego_u0 - 20.0, ego_u0 + ego_speed * T + 25.0)
        if abs(u) < WALK_OUT + 1:
            u += 2 * (WALK_OUT + 1) * (1 if u >= 0 else -1)
        cat = _pick(rng, ["human.pedestrian.adult"] * 6 + ["human.pedestrian.child", "human.pedestrian.police_officer"])
        moving = rng.random() < 0.7
        heading = 0.0 if rng.random() < 0.5 else math.pi
        agents.append(_make_agent(rng, cat, u, sv * _jitter(rng, 8.3, 9.4), heading, _jitter(rng, 0.9, 1.6) if moving else 0.0, "pedestrian.moving" if moving else "pedestrian.standing"))
    if want_crowd:
        for _ in range(int(rng.integers(2, 5))):
            s = 1 if rng.random() < 0.5 else -1
            heading = 0.0 if rng.random() < 0.5 else math.pi
            agents.append(_make_agent(rng, "human.pedestrian.adult", _jitter(rng, -6.0, 6.0), s * _jitter(rng, 8.6, 11.4), heading, _jitter(rng, 1.0, 1.5), "pedestrian.moving"))
    def near_drive(lo: float, hi: float) -> float:
        """A position along the drive, on a walkway (just clear of the crossroads if it falls there)."""
        u = _jitter(rng, lo, hi)
        if abs(u) < WALK_OUT + 3:
            u = (1.0 if u >= 0 else -1.0) * _jitter(rng, WALK_OUT + 3, WALK_OUT + 8)
        return u

    u_end = ego_u0 + ego_speed * T
    # Parked bicycles along the walkway near the drive.
    for _ in range(int(rng.integers(1, 4))):
        sv = 1 if rng.random() < 0.5 else -1
        agents.append(_make_agent(rng, "vehicle.bicycle", near_drive(ego_u0 - 5.0, u_end + 10.0), sv * 10.2, 0.0, 0.0, "cycle.without_rider"))
    # Roadside cones and barriers near the drive (beside the walkway edge).
    for _ in range(int(rng.integers(2, 4))):
        agents.append(_make_agent(rng, "movable_object.trafficcone", near_drive(ego_u0 - 5.0, u_end + 10.0), -7.45, 0.0, 0.0, None))
    # Cones on the centre line ahead of the ego (a marked-off centre island): seen from the ego lane even when
    # the outer lane's trucks hide the walkway.
    for _ in range(int(rng.integers(2, 4))):
        agents.append(_make_agent(rng, "movable_object.trafficcone", near_drive(ego_u0 + 5.0, u_end + 10.0), 0.0, 0.0, 0.0, None))
    bu = near_drive(ego_u0 - 5.0, u_end + 5.0)
    for k in range(int(rng.integers(2, 4))):
        agents.append(_make_agent(rng, "movable_object.barrier", bu + (2.7 * k if bu > 0 else -2.7 * k), -7.6, math.pi / 2, 0.0, None))
    # Car park: parked cars in stalls (nose towards the road or away), barriers along its road side.
    pu0, pv0 = park_poly[0]
    pu1, pv1 = park_poly[2]
    row_vs = (pv0 + 3.2, pv1 - 3.2)
    for rv in row_vs:
        for u in np.arange(pu0 + 2.0, pu1 - 1.5, 2.8):
            if rng.random() < 0.6:
                cat = "vehicle.car" if rng.random() < 0.9 else "vehicle.truck"
                if cat == "vehicle.truck":
                    continue
                agents.append(_make_agent(rng, cat, float(u) + 0.2, rv, _pick(rng, [math.pi / 2, -math.pi / 2]), 0.0, "vehicle.parked"))
    road_edge_v = pv0 + 0.4 if park_side > 0 else pv1 - 0.4
    for u in np.arange(pu0 + 1.3, pu0 + 14.0, 2.7):
        agents.append(_make_agent(rng, "movable_object.barrier", float(u), road_edge_v, math.pi / 2, 0.0, None))
    return agents, want_crowd, zone is not None


def _rasterise_ground(world: World) -> np.ndarray:
    """(H, W) uint8 ground classes of the scene frame at RASTER_RES; row along +v, col along +u."""
    n = int(round(2 * EXTENT / RASTER_RES))
    img = np.full((n, n), GRASS, dtype=np.uint8)
    shift = 4
    scale = (1 << shift) / RASTER_RES

    def pts(poly: np.ndarray) -> np.ndarray:
        return np.round((poly + EXTENT) * scale).astype(np.int32)

    def fill(poly: np.ndarray, cls: int) -> None:
        cv2.fillPoly(img, [pts(poly)], int(cls), lineType=cv2.LINE_8, shift=shift)

    def line(p0, p1, cls: int, width_m: float) -> None:
        a, b = pts(np.asarray([p0, p1]))
        cv2.line(img, tuple(int(x) for x in a), tuple(int(x) for x in b), int(cls), max(1, int(round(width_m / RASTER_RES))), cv2.LINE_8, shift)

    for poly in world.polygons["walkway"]:
        fill(poly, WALKWAY)
    for poly in world.polygons["drivable_area"]:
        fill(poly, ROAD)
    for poly in world.polygons["carpark_area"]:
        fill(poly, CARPARK)
        (u0, v0), (u1, v1) = poly[0], poly[2]
        for u in np.arange(u0 + 0.6, u1 - 0.5, 2.8):  # stall lines
            line((u, v0 + 0.5), (u, v0 + 5.5), PARKING_LINE, 0.12)
            line((u, v1 - 5.5), (u, v1 - 0.5), PARKING_LINE, 0.12)
    for seg in world.lines["road_divider"]:
        for off in (-0.12, 0.12):
            d = seg[1] - seg[0]
            nrm = np.array([-d[1], d[0]]) / (np.linalg.norm(d) + 1e-9)
            line(seg[0] + off * nrm, seg[1] + off * nrm, CENTER_YELLOW, 0.12)
    for seg in world.lines["lane_divider"]:  # dashed: 3 m paint, 6 m gap
        d = seg[1] - seg[0]
        L = float(np.linalg.norm(d))
        for s0 in np.arange(0.0, L, 9.0):
            s1 = min(s0 + 3.0, L)
            line(seg[0] + d * s0 / L, seg[0] + d * s1 / L, LANE_WHITE, 0.15)
    for poly in world.polygons["ped_crossing"]:  # zebra stripes along the road, 0.5 m paint / 0.5 m gap
        (u0, v0), (u1, v1) = poly[0], poly[2]
        along_v = (v1 - v0) > (u1 - u0)
        if along_v:
            for v in np.arange(v0 + 0.25, v1 - 0.25, 1.0):
                fill(_rect(u0, u1, v, v + 0.5), ZEBRA)
        else:
            for u in np.arange(u0 + 0.25, u1 - 0.25, 1.0):
                fill(_rect(u, u + 0.5, v0, v1), ZEBRA)
    for poly in world.polygons["stop_line"]:
        fill(poly, STOP_WHITE)
    return img
