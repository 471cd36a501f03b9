"""A synthetic world per scene: a procedural road network, map layers, roadside structures, traffic and the
ego's drive.

Everything is laid out in a *scene frame* (metres, ground at z = 0, the ego's drive centred on the origin)
and placed into the map's global frame by a rotation `theta` and an offset. The same geometry feeds the map
expansion, the ground texture the cameras see and the surfaces the LiDAR hits, so all sensors agree.

Layout (`roads.py`): each scene draws a chain of blocks (straight pieces, curves of 25-300 m radius, X, T and
Y junctions at 50-130 degrees) with 1-3 lanes per direction, one-way streets and medians; walkways, zebra
crossings and stop lines follow the geometry; car parks with perpendicular or angled bays sit beside the
roads. Traffic (`traffic.py`) drives on the right along lane paths, through junctions and turns, follows the
vehicle ahead and waits at stop lines; the ego drives a route through the network, turning at junctions,
changing lanes, stopping at stop lines and behind traffic, at 0-15 m/s.

The world (roads, traffic, weather) knows nothing of the sensor rig that observes it: sensors query
`ego_pose`, `boxes_at`, `ground_class` and the weather fields.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import cv2
import numpy as np
from shapely import affinity
from shapely.geometry import LineString, MultiPolygon, Point, Polygon, box
from shapely.ops import unary_union

from perception.data.synth import roads as rd
from perception.data.synth.traffic import Agent, CollisionFilter, TimeGrid, idm, pose_on

# Ground classes of the scene raster.
GRASS, ROAD, WALKWAY, ZEBRA, LANE_WHITE, CENTER_YELLOW, CARPARK, STOP_WHITE, PARKING_LINE = range(9)

EXTENT = 160.0  # the world spans [-EXTENT, EXTENT] in both scene axes
RASTER_RES = 0.1  # metres per ground-raster pixel
GRID_DT = 0.05  # s between trajectory samples
GRID_MARGIN = 1.5  # s of trajectory before the first and after the last keyframe (sensor sweeps)
EGO_SIZE = (1.73, 4.08, 1.56)  # w, l, h of the ego (nuScenes' Renault Zoe)
EGO_REAR_AXLE = 1.0  # the ego frame's origin (rear axle) lies this far behind the body's centre (m)
CROSS_NEAR, CROSS_FAR = 0.8, 3.8  # zebra crossings span these distances from a junction mouth (m)
STOP_NEAR, STOP_FAR = 4.4, 5.0  # stop lines span these distances from a junction mouth (m)
DIVIDER_GAP = 5.6  # dividers end this far from a junction mouth (m)
EVENTS = ("junction", "curve", "straight")
# Words of a scene description that say what the drive does (after the lighting, the weather and the tags).
DRIVE_WORDS = ("turn left", "turn right", "curve", "lane change", "stop at stop line", "queue", "slow traffic")

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




Poly = tuple  # (exterior (P, 2), [holes (Q, 2), ...]) in the scene frame


@dataclass
class World:
    """One scene's world. See the module docstring for frames."""

    seed: int
    theta: float  # scene frame -> global rotation (rad)
    origin: np.ndarray  # (2,) global position of the scene frame's origin
    grid: TimeGrid
    ego_xy: np.ndarray  # (N, 2) ego frame origin (rear axle) on the grid, scene frame
    ego_yaw: np.ndarray  # (N,) ego heading, scene frame (rad, unwrapped)
    ego_speed: np.ndarray  # (N,) m/s
    lighting: str  # "day", "dusk" or "night"
    rain: bool
    exposure: float  # camera gain (1 = nominal)
    noise: float  # camera noise scale (1 = nominal)
    tags: list[str]  # description words: scene tags first, then what the drive does
    agents: list[Agent]
    statics: np.ndarray  # (S, 8): u, v, z, w, l, h, yaw, kind (0 building, 1 pole)
    static_colours: np.ndarray  # (S, 3) uint8
    polygons: dict[str, list[Poly]]  # layer -> polygons
    lines: dict[str, list[np.ndarray]]  # road_divider / lane_divider -> list of (2, 2) segments
    is_intersection: list[bool]  # per polygons["road_segment"]
    carpark_yaw: list[float]  # per polygons["carpark_area"]: the bays' row direction (rad, scene frame)
    event: str  # the block the ego drives through: "junction", "curve" or "straight"
    junction_kinds: list[str]
    junction_arms: list[np.ndarray]  # per junction: (2,) centre then its arms' headings (rad, scene frame), (1 + A,) x 2
    raster: np.ndarray = field(repr=False)  # (H, W) uint8 ground classes; row along +v, col along +u
    lamps: np.ndarray = field(default_factory=lambda: np.zeros((0, 2)))  # (L, 2) street lamp positions

    @property
    def night(self) -> bool:
        return self.lighting == "night"

    @property
    def dusk(self) -> bool:
        return self.lighting == "dusk"

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

    def _interp(self, arr: np.ndarray, t: float) -> np.ndarray:
        i, f = self.grid.weights(t)
        return arr[..., i] * (1 - f) + arr[..., i + 1] * f

    def grid_index(self, t: float) -> int:
        i, f = self.grid.weights(t)
        return i + int(f >= 0.5)

    def ego_pose(self, t: float) -> tuple[np.ndarray, float]:
        """Ego position (3,) in the global frame and yaw (rad) at scene time t (s)."""
        i, f = self.grid.weights(t)
        uv = self.ego_xy[i] * (1 - f) + self.ego_xy[i + 1] * f
        yaw = self.ego_yaw[i] * (1 - f) + self.ego_yaw[i + 1] * f
        xy = self.to_global(uv)
        return np.array([xy[0], xy[1], 0.0]), float(rd.wrap(yaw + self.theta))

    def ego_velocity_global(self, t: float) -> np.ndarray:
        """(2,) ego velocity in the global frame at scene time t (m/s)."""
        i, f = self.grid.weights(t)
        yaw = self.ego_yaw[i] * (1 - f) + self.ego_yaw[i + 1] * f
        v = self.ego_speed[i] * (1 - f) + self.ego_speed[i + 1] * f
        return self.rotation @ (v * np.array([math.cos(yaw), math.sin(yaw)]))

    def agent_velocity_global(self, index: int, t: float) -> np.ndarray:
        """(2,) velocity of agent `index` in the global frame at scene time t (m/s)."""
        a = self.agents[index]
        i, f = self.grid.weights(t)
        yaw = a.yaw[i] * (1 - f) + a.yaw[i + 1] * f
        v = a.speed[i] * (1 - f) + a.speed[i + 1] * f
        return self.rotation @ (v * np.array([math.cos(yaw), math.sin(yaw)]))

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

    def lamp_light(self, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        """Street-lamp illumination (0-1) of the ground at scene-frame points: a pool of about 9 m radius."""
        out = np.zeros(np.shape(u), dtype=np.float32)
        if not len(self.lamps) or not np.size(u):
            return out
        lo, hi = np.array([np.min(u), np.min(v)]) - 15.0, np.array([np.max(u), np.max(v)]) + 15.0
        near = np.all((self.lamps > lo) & (self.lamps < hi), axis=1)
        for lu, lv in self.lamps[near]:
            d2 = (u - lu) ** 2 + (v - lv) ** 2
            out = np.maximum(out, np.exp(-d2 / (2 * 4.5**2)).astype(np.float32))
        return out

    # --- boxes at a time ------------------------------------------------------------------------------
    def boxes_at(self, t: float) -> "WorldBoxes":
        """Every solid (agents then statics) at scene time t, in the global frame."""
        n, m = len(self.agents), len(self.statics)
        centers = np.zeros((n + m, 3))
        sizes = np.zeros((n + m, 3))
        yaws = np.zeros(n + m)
        colours = np.zeros((n + m, 3), dtype=np.uint8)
        refl = np.zeros(n + m)
        if n:
            i, f = self.grid.weights(t)
            xy = self._agent_xy[:, i] * (1 - f) + self._agent_xy[:, i + 1] * f
            centers[:n, :2] = xy
            yaws[:n] = self._agent_yaw[:, i] * (1 - f) + self._agent_yaw[:, i + 1] * f
            sizes[:n] = self._agent_size
            centers[:n, 2] = self._agent_size[:, 2] / 2
            colours[:n] = self._agent_colour
            refl[:n] = self._agent_refl
        if m:
            s = self.statics
            centers[n:, :2] = s[:, 0:2]
            centers[n:, 2] = s[:, 2]
            sizes[n:] = s[:, 3:6]
            yaws[n:] = s[:, 6]
            colours[n:] = self.static_colours
            refl[n:] = np.where(s[:, 7] == 0, REFLECTIVITY["building"], REFLECTIVITY["pole"])
        centers[:, :2] = self.to_global(centers[:, :2])
        return WorldBoxes(centers, sizes, rd.wrap(yaws + self.theta), colours, refl, n)

    def finalise(self) -> None:
        """Stack the agents' arrays for `boxes_at` (call after the agents are final)."""
        n = len(self.agents)
        self._agent_xy = np.stack([a.xy for a in self.agents]) if n else np.zeros((0, self.grid.n, 2))
        self._agent_yaw = np.stack([a.yaw for a in self.agents]) if n else np.zeros((0, self.grid.n))
        self._agent_size = np.array([a.size for a in self.agents], dtype=np.float64).reshape(-1, 3)
        self._agent_colour = np.array([a.colour for a in self.agents], dtype=np.uint8).reshape(-1, 3)
        self._agent_refl = np.array([lookup_prefix(REFLECTIVITY, a.category, 30.0) for a in self.agents])


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


def _jitter(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(rng.uniform(lo, hi))


def _pick(rng: np.random.Generator, options: list):
    return options[int(rng.integers(len(options)))]


def _colour(rng, category: str) -> tuple[int, int, int]:
    return _pick(rng, CAR_PAINTS) if category == "vehicle.car" else _pick(rng, COLOURS[category])


def _size(rng, category: str) -> tuple[float, float, float]:
    w, l, h = SIZES[category]
    f = _jitter(rng, 0.92, 1.08)
    return (round(w * f, 3), round(l * _jitter(rng, 0.92, 1.08), 3), round(h * f, 3))


def _kind(category: str) -> str:
    if category in ("vehicle.bicycle", "vehicle.motorcycle"):
        return "cycle"
    if category.startswith("vehicle"):
        return "vehicle"
    if category.startswith("human"):
        return "pedestrian"
    return "object"


def _shapes(geom) -> list[Polygon]:
    if geom.is_empty:
        return []
    if isinstance(geom, Polygon):
        return [geom]
    if isinstance(geom, MultiPolygon):
        return list(geom.geoms)
    return [g for g in getattr(geom, "geoms", []) if isinstance(g, Polygon)]


def _poly_tuple(p: Polygon) -> Poly:
    return (np.asarray(p.exterior.coords)[:-1], [np.asarray(h.coords)[:-1] for h in p.interiors])


def _simplify_line(pts: np.ndarray, max_turn_deg: float = 2.0, max_len: float = 20.0) -> np.ndarray:
    """Vertices of a polyline kept where it turns by more than max_turn_deg since the last kept one or every
    max_len metres: the divider's straight 2-node pieces (pitfall 7 of the devkit)."""
    keep = [0]
    h = np.arctan2(*(np.diff(pts, axis=0)[:, ::-1].T))
    h0, acc = h[0], 0.0
    for k in range(1, len(pts) - 1):
        acc += float(np.linalg.norm(pts[k] - pts[k - 1]))
        if abs(rd.wrap(h[k] - h0)) > math.radians(max_turn_deg) or acc + float(np.linalg.norm(pts[k + 1] - pts[k])) > max_len:
            keep.append(k)
            h0, acc = h[k], 0.0
    keep.append(len(pts) - 1)
    return pts[keep]


def _dashes(pts: np.ndarray, on: float, off: float) -> list[np.ndarray]:
    """Pieces of a polyline painted as dashes `on` metres long with `off` metres gaps."""
    line = rd.Polyline(pts)
    out = []
    for s0 in np.arange(0.0, line.length, on + off):
        s1 = min(s0 + on, line.length)
        ss = np.concatenate([[s0], line.s[(line.s > s0) & (line.s < s1)], [s1]])
        out.append(line.at(ss)[0])
    return out


# --- the ego's route and the lane routes ------------------------------------------------------------------


@dataclass
class Route:
    """A lane-level path through the chain: its polyline, where each chain item starts on it, and stop lines."""

    line: rd.Polyline
    item_s: list[float]  # arc length where each chain item begins (junctions included)
    stops: list[tuple[float, "rd.Junction"]]  # (arc length of the stop line, junction it guards)


def chain_route(net: rd.Network, direction: int, lanes: list[int], change: tuple[int, int, float] | None = None) -> Route | None:
    """The route along the chain in `direction` (+1 the ego's way, -1 the opposite way).

    lanes: lane index per chain item (junction items ignored); change: (item, lane before, fraction of the
    item's length where a 40 m lane change starts) for the ego. None when a road lacks lanes that way.
    """
    items = list(enumerate(net.chain))
    if direction < 0:
        items = items[::-1]
    parts: list[np.ndarray] = []
    item_s = [0.0] * len(net.chain)
    stops = []
    s_acc = 0.0
    for n, (k, item) in enumerate(items):
        item_s[k] = s_acc
        if isinstance(item, rd.Road):
            nl = item.lanes.lanes(direction)
            if nl == 0:
                return None
            i = min(lanes[k], nl - 1)
            if change is not None and change[0] == k and nl > 1:
                i0 = min(change[1], nl - 1)
                d0, d1 = item.lanes.lane_centre(direction, i0), item.lanes.lane_centre(direction, i)
                L = item.line.length
                sa = change[2] * L
                ss = item.line.s
                f = np.clip((ss - sa) / 40.0, 0.0, 1.0)
                d = d0 + (d1 - d0) * (3 * f**2 - 2 * f**3)
                pts = item.line.offset(d)
            else:
                pts = item.line.offset(item.lanes.lane_centre(direction, i))
            pts = pts if direction > 0 else pts[::-1]
        else:
            j, a_in, a_out = item
            a, b = (a_in, a_out) if direction > 0 else (a_out, a_in)
            if a.lanes_entering() == 0 or b.lanes_leaving() == 0:
                return None
            prev_k = k - direction
            nxt_k = k + direction
            i = min(lanes[prev_k], a.lanes_entering() - 1)
            # Into a road where the ego changes lanes, the path arrives in the lane the change starts from.
            o = min(change[1] if change is not None and change[0] == nxt_k else lanes[nxt_k], b.lanes_leaving() - 1)
            pts = rd.connector(a, i, b, o)
            stops.append((s_acc - STOP_NEAR, j))
        if parts:
            s_acc += float(np.linalg.norm(pts[0] - parts[-1][-1]))
            item_s[k] = s_acc
        parts.append(pts)
        s_acc += float(np.sum(np.linalg.norm(np.diff(pts, axis=0), axis=1)))
    return Route(rd.Polyline(rd.join(*parts)), item_s, stops)


# --- building ---------------------------------------------------------------------------------------------


def _road_polys(r: rd.Road) -> dict[str, list]:
    """Shapely polygons of a road piece: the whole segment, its carriageways (no median) and walkways."""
    ln = r.lanes
    seg = Polygon(r.band(ln.right_edge, ln.left_edge))
    if ln.median > 0:
        carriage = [Polygon(r.band(ln.right_edge, -ln.median / 2)), Polygon(r.band(ln.median / 2, ln.left_edge))]
    else:
        carriage = [seg]
    walks = []
    if r.walk[0] > 0:
        walks.append(Polygon(r.band(ln.right_edge - r.walk[0], ln.right_edge)))
    if r.walk[1] > 0:
        walks.append(Polygon(r.band(ln.left_edge, ln.left_edge + r.walk[1])))
    return {"segment": seg, "carriage": carriage, "walk": walks}


def _network_ok(net: rd.Network) -> bool:
    """Roads of the network overlap only where they meet at a junction."""
    polys = [Polygon(r.band(r.lanes.right_edge - r.walk[0], r.lanes.left_edge + r.walk[1], min(3.0, r.line.length / 3), r.line.length - min(3.0, r.line.length / 3))) for r in net.roads]
    if not all(p.is_valid for p in polys):
        return False
    for a in range(len(polys)):
        for b in range(a + 1, len(polys)):
            if polys[a].intersects(polys[b]):
                return False
    for j in net.junctions:
        jp = Polygon(j.polygon)
        members = {id(arm.road) for arm in j.arms}
        for r, p in zip(net.roads, polys):
            if id(r) not in members and jp.buffer(2.0).intersects(p):
                return False
        for other in net.junctions:
            if other is not j and jp.buffer(4.0).intersects(Polygon(other.polygon)):
                return False
    return True


def _near_mask(xy: np.ndarray, ego_xy: np.ndarray, radius: float) -> np.ndarray:
    """(K,) whether each point lies within `radius` of some ego position."""
    e = ego_xy[:: max(1, len(ego_xy) // 12)]
    d = np.linalg.norm(xy[:, None] - e[None], axis=-1).min(1)
    return d < radius


class _Builder:
    """Collects the agents of one world in priority order through the collision filter."""

    def __init__(self, rng, grid: TimeGrid, ego_xy, ego_yaw):
        self.rng, self.grid = rng, grid
        idx = np.arange(0, grid.n, 5)
        self.filter = CollisionFilter(idx)
        body = ego_xy + EGO_REAR_AXLE * np.stack([np.cos(ego_yaw), np.sin(ego_yaw)], 1)
        self.filter.add(body, ego_yaw, EGO_SIZE, force=True)
        self.ego_xy = ego_xy
        self.agents: list[Agent] = []
        self.next_group = 0

    def near(self, xy: np.ndarray, radius: float = 85.0) -> bool:
        step = max(1, len(xy) // 10)
        return bool(_near_mask(xy[::step], self.ego_xy, radius).any())

    def add(self, category, xy, yaw, speed, size=None, parked=False, rider=True, group=-1, radius=85.0) -> bool:
        size = size or _size(self.rng, category)
        n = self.grid.n
        xy = np.broadcast_to(np.asarray(xy, dtype=np.float64), (n, 2)).copy()
        yaw = np.broadcast_to(np.asarray(yaw, dtype=np.float64), (n,)).copy()
        speed = np.broadcast_to(np.asarray(speed, dtype=np.float64), (n,)).copy()
        if not self.near(xy, radius):
            return False
        if not self.filter.add(xy, yaw, size, group):
            return False
        lo, hi = lookup_prefix(RCS, category)
        self.agents.append(Agent(category, size, xy, yaw, speed, _kind(category), _colour(self.rng, category), _jitter(self.rng, lo, hi), parked, rider, group))
        return True

    def static(self, category, xy, yaw, **kw) -> bool:
        return self.add(category, xy, yaw, 0.0, **kw)

    def platoon(self, line: rd.Polyline, members: list[dict], stops=()) -> None:
        """Simulate vehicles on one path (`simulate_platoon`) and add them."""
        self.add_platoon(line, simulate_platoon(self.rng, line, self.grid, members, stops))

    def add_platoon(self, line: rd.Polyline, sims: list) -> None:
        """Add simulated vehicles; a truck may tow a trailer 0.6 m behind it."""
        for m, size, s, v, xy, yaw in sims:
            group = -1
            if m["category"] == "vehicle.truck" and self.rng.random() < 0.4:
                group = self.next_group
                self.next_group += 1
            ok = self.add(m["category"], xy, yaw, v, size=size, group=group)
            if ok and group >= 0:
                tl = _size(self.rng, "vehicle.trailer")
                xy_t, yaw_t = pose_on(line, s - (size[1] + tl[1]) / 2 - 0.6, m.get("lateral", 0.0))
                self.add("vehicle.trailer", xy_t, yaw_t, v, size=tl, group=group)


def simulate_platoon(rng, line: rd.Polyline, grid: TimeGrid, members: list[dict], stops=(), leader=None) -> list:
    """Vehicles on one path simulated front to back, each following the one ahead (IDM).

    members: dicts with s (arc length at grid.t0), v (desired speed), v0 (initial speed), category, optional
    lateral (m left of the path) and size. Returns (member, size, s (N,), v (N,), xy (N, 2), yaw (N,)) each.
    """
    out = []
    for m in sorted(members, key=lambda m: -m["s"]):
        size = m.get("size") or _size(rng, m["category"])
        s, v = idm(line, grid, m["s"], m.get("v0", m["v"]), m["v"], size[1], leader, stops)
        leader = (s, size[1])
        xy, yaw = pose_on(line, s, m.get("lateral", 0.0))
        out.append((m, size, s, v, xy, yaw))
    return out


def _route_members(rng, line: rd.Polyline, s_lo: float, s_hi: float, v_lane: float, kinds, gap, skip=()) -> list[dict]:
    out, s = [], s_lo + _jitter(rng, 0.0, gap[1])
    while s < s_hi:
        if all(abs(s - k) > 9.0 for k in skip):
            cat = _pick(rng, kinds)
            out.append({"s": s, "v": v_lane * _jitter(rng, 0.9, 1.1), "category": cat, "v0": v_lane})
        s += _jitter(rng, *gap)
    return out


def _route_window(line: rd.Polyline, ego_xy: np.ndarray, radius: float = 110.0) -> tuple[float, float] | None:
    near = _near_mask(line.pts, ego_xy, radius)
    if not near.any():
        return None
    return float(line.s[near].min()), float(line.s[near].max())


def build_world(seed: int, scene_index: int, origin: np.ndarray, duration_s: float, stream: int = 0, event: str | None = None) -> World:
    """A deterministic world for one scene. `duration_s` is the time from first to last keyframe.

    stream: the random stream the scene is drawn from (0 train, 1 validation), so validation layouts are
    never copies of training ones; event: force the block at the ego's drive ("junction", "curve",
    "straight"; default drawn).
    """
    rng = np.random.default_rng([seed, stream, scene_index, 0x5EED2])
    theta = _jitter(rng, -math.pi, math.pi)
    lighting = _pick(rng, ["day"] * 12 + ["dusk"] * 3 + ["night"] * 5)
    rain = bool(lighting != "night" and rng.random() < 0.25)
    exposure, noise = _jitter(rng, 0.8, 1.25), _jitter(rng, 0.7, 1.6)
    event = event or _pick(rng, ["junction"] * 9 + ["curve"] * 8 + ["straight"] * 3)
    if event not in EVENTS:
        raise ValueError(f"event must be one of {EVENTS}, got {event!r}")
    slow = bool(rng.random() < 0.2)
    want_stop = event == "junction" and rng.random() < 0.35
    want_crowd, want_construction, want_parking = (bool(rng.random() < p) for p in (0.5, 0.4, 0.5))
    want_lane_change = bool(rng.random() < 0.35)
    T = duration_s
    grid = TimeGrid(-GRID_MARGIN, GRID_DT, int(round((T + 2 * GRID_MARGIN) / GRID_DT)) + 1)
    v_ego = _jitter(rng, 2.5, 5.0) if slow else _jitter(rng, 6.5, 13.5)
    D = v_ego * T
    event_at = 190.0
    for _ in range(40):
        net = rd.build_network(rng, event, event_at + D + 200.0, event_at)
        if _network_ok(net):
            break
    else:
        raise RuntimeError(f"synth: no valid road network for scene {scene_index} (seed {seed})")

    # --- the ego's route ---
    ev = net.chain[net.event_item]
    lanes = [int(rng.integers(0, 3)) for _ in net.chain]
    turn = 0.0
    if isinstance(ev, tuple):
        j, a_in, a_out = ev
        turn = float(rd.wrap(a_out.mouth_pose()[1] - (a_in.mouth_pose()[1] + math.pi)))
        n_in = a_in.road.lanes.n_fwd
        lanes[net.event_item - 1] = 0 if turn > math.radians(20) else n_in - 1 if turn < -math.radians(20) else min(lanes[net.event_item - 1], n_in - 1)
        if want_stop:
            j.stop_release = _jitter(rng, 3.0, 7.0)
    route = chain_route(net, +1, lanes)
    if isinstance(ev, tuple):
        s_event = route.item_s[net.event_item]
        frac = _jitter(rng, 0.55, 0.9) if want_stop else _jitter(rng, 0.35, 0.75)
    else:
        s_event = route.item_s[net.event_item] + net.event_offset
        frac = _jitter(rng, 0.1, 0.5) if event == "curve" else 0.5
    s_ego = max(5.0, s_event - frac * D)
    change = None
    if want_lane_change:
        k = int(np.searchsorted(route.item_s, s_ego + 0.2 * D, side="right") - 1)
        item = net.chain[k]
        if isinstance(item, rd.Road) and item.lanes.n_fwd > 1:
            s_in = s_ego + 0.2 * D - route.item_s[k]
            if 0 <= s_in < item.line.length - 45.0:
                start_lane = (min(lanes[k], item.lanes.n_fwd - 1) + 1) % item.lanes.n_fwd
                change = (k, start_lane, s_in / item.line.length)
                route = chain_route(net, +1, lanes, change)
    stops = tuple((s, j.stop_release) for s, j in route.stops if j.stop_release > 0)

    # Vehicles on the ego's path: ahead (a slow leader in slow scenes) and behind.
    members = [{"s": s_ego, "v": v_ego, "v0": v_ego * _jitter(rng, 0.6, 1.0), "category": "vehicle.car", "ego": True, "size": EGO_SIZE}]
    s_ahead = s_ego + (_jitter(rng, 9.0, 16.0) if slow else _jitter(rng, 14.0, 40.0))
    if slow:
        members.append({"s": s_ahead, "v": _jitter(rng, 1.5, 3.5), "v0": 2.0, "category": _pick(rng, ["vehicle.truck", "vehicle.bus.rigid", "vehicle.car"])})
        s_ahead += _jitter(rng, 9.0, 14.0)
    members += _route_members(rng, route.line, s_ahead, s_ego + D + 110.0, v_ego * _jitter(rng, 0.8, 1.05), ["vehicle.car"] * 4 + ["vehicle.motorcycle", "vehicle.truck", "vehicle.bus.rigid"], (12.0, 40.0))
    members += _route_members(rng, route.line, max(0.0, s_ego - 110.0), s_ego - 14.0, v_ego, ["vehicle.car"] * 4 + ["vehicle.motorcycle"], (14.0, 40.0))
    # The ego and the vehicles ahead of it first, so that everything else keeps clear of them.
    ahead = [m for m in members if m["s"] >= s_ego]
    sims = simulate_platoon(rng, route.line, grid, ahead, stops)
    ego_xy, ego_yaw, ego_speed, ego_s = next((xy, yaw, v, s) for m, _, s, v, xy, yaw in sims if m.get("ego"))
    b = _Builder(rng, grid, ego_xy, ego_yaw)
    b.add_platoon(route.line, [x for x in sims if not x[0].get("ego")])
    behind = [m for m in members if m["s"] < s_ego]
    b.add_platoon(route.line, simulate_platoon(rng, route.line, grid, behind, stops, leader=(ego_s, EGO_SIZE[1])))

    world_geo = _geometry(rng, net, b, want_parking)
    _place_objects(rng, net, b, world_geo, want_construction, route, lanes)

    # Other lanes of the chain, both ways.
    max_fwd = max(r.lanes.n_fwd for r in net.chain if isinstance(r, rd.Road))
    max_bwd = max(r.lanes.n_bwd for r in net.chain if isinstance(r, rd.Road))
    for direction, n in ((+1, max_fwd), (-1, max_bwd)):
        for i in range(n):
            rt = chain_route(net, direction, [i] * len(net.chain))
            if rt is None:
                continue
            win = _route_window(rt.line, ego_xy)
            if win is None:
                continue
            outer = i == n - 1
            v_lane = _jitter(rng, 5.0, 13.0) * (0.8 if outer else 1.0)
            kinds = ["vehicle.car"] * 5 + ["vehicle.truck", "vehicle.motorcycle"] + (["vehicle.bus.rigid", "vehicle.bus.bendy", "vehicle.construction"] if outer else [])
            mem = _route_members(rng, rt.line, win[0], win[1], v_lane, kinds, (14.0, 45.0) if not slow else (9.0, 20.0))
            if outer and rng.random() < 0.7:  # a cyclist at the kerb side of the outer lane
                s_c = _jitter(rng, win[0], win[1])
                mem = [m for m in mem if abs(m["s"] - s_c) > 12.0]
                mem.append({"s": s_c, "v": _jitter(rng, 3.5, 6.0), "v0": 4.0, "category": _pick(rng, ["vehicle.bicycle", "vehicle.bicycle", "vehicle.motorcycle"]), "lateral": -1.0})
            rt_stops = tuple((s, j.stop_release) for s, j in rt.stops if j.stop_release > 0)
            b.platoon(rt.line, mem, rt_stops)
    # Side arms: queues at their stop lines, traffic leaving the junctions.
    chain_roads = {id(r) for r in net.chain if isinstance(r, rd.Road)}
    for j in net.junctions:
        for a in j.arms:
            if id(a.road) in chain_roads:
                continue
            for i in range(a.lanes_entering()):
                others = [o for o in j.arms if o is not a and o.lanes_leaving() > 0]
                if not others:
                    continue
                o = _pick(rng, others)
                path = rd.join(a.road.lane_path(-a.away, i), rd.connector(a, i, o, min(i, o.lanes_leaving() - 1))[1:], o.road.lane_path(o.away, min(i, o.lanes_leaving() - 1))[1:])
                line = rd.Polyline(path)
                s_stop = a.road.line.length - STOP_NEAR
                release = np.inf if j.stop_release <= 0 else -np.inf  # waits while the chain has green
                mem = []
                s = s_stop - _jitter(rng, 3.0, 12.0)
                for _ in range(int(rng.integers(0, 4))):
                    cat = _pick(rng, ["vehicle.car", "vehicle.car", "vehicle.car", "vehicle.truck", "vehicle.motorcycle"])
                    mem.append({"s": s, "v": _jitter(rng, 6.0, 10.0), "v0": 0.0, "category": cat})
                    s -= SIZES[cat][1] + _jitter(rng, 2.5, 9.0)
                b.platoon(line, mem, ((s_stop, release),))
            for i in range(a.lanes_leaving()):
                line = rd.Polyline(a.road.lane_path(a.away, i))
                mem = _route_members(rng, line, 4.0, line.length, _jitter(rng, 6.0, 11.0), ["vehicle.car"] * 4 + ["vehicle.truck"], (18.0, 45.0))
                b.platoon(line, mem)
    _pedestrians(rng, net, b, want_crowd, T, route, ego_xy)
    _ensure_classes(rng, net, b, world_geo["buildings"])

    # Centre the drive on the scene origin.
    mid = ego_xy[grid.n // 2].copy()
    for a in b.agents:
        a.xy = a.xy - mid
    ego_xy = ego_xy - mid
    geo = _shift_geometry(world_geo, mid)

    tags = []
    if lighting == "night":
        tags.append("night")
    if rain:
        tags.append("rain")
    keyframes = slice(int(round(GRID_MARGIN / GRID_DT)), grid.n - int(round(GRID_MARGIN / GRID_DT)))
    ek = ego_xy[keyframes]
    if any(np.linalg.norm(ek - (jn.centre - mid), axis=1).min() < jn.radius + 12.0 for jn in net.junctions):
        tags.append("intersection")
    if any(np.linalg.norm(ek[:, None] - p[0][None], axis=-1).min() < 35.0 for p in geo["polygons"]["carpark_area"]):
        tags.append("parking lot")
    if want_crowd:
        tags.append("pedestrians")
    if geo["construction"] is not None and np.linalg.norm(ek - (geo["construction"] - mid), axis=1).min() < 60.0:
        tags.append("construction")
    dh = float(np.degrees(ego_yaw[keyframes][-1] - ego_yaw[keyframes][0]))
    if dh > 30:
        tags.append("turn left")
    elif dh < -30:
        tags.append("turn right")
    elif net.kind == "curve":
        tags.append("curve")
    if change is not None:
        tags.append("lane change")
    if ego_speed[keyframes].min() < 0.3:
        tags.append("stop at stop line" if want_stop else "queue")
    elif slow:
        tags.append("slow traffic")

    world = World(
        seed=seed,
        theta=theta,
        origin=np.asarray(origin, dtype=np.float64),
        grid=grid,
        ego_xy=ego_xy,
        ego_yaw=ego_yaw,
        ego_speed=ego_speed,
        lighting=lighting,
        rain=rain,
        exposure=exposure,
        noise=noise,
        tags=tags,
        agents=b.agents,
        statics=np.array(geo["statics"], dtype=np.float64).reshape(-1, 8),
        static_colours=np.array(geo["static_colours"], dtype=np.uint8).reshape(-1, 3),
        polygons=geo["polygons"],
        lines=geo["lines"],
        is_intersection=geo["is_intersection"],
        carpark_yaw=geo["carpark_yaw"],
        event=event,
        junction_kinds=[jn.kind for jn in net.junctions],
        junction_arms=[np.array([jn.centre - mid] + [[math.cos(a.mouth_pose()[1]), math.sin(a.mouth_pose()[1])] for a in jn.arms]) for jn in net.junctions],
        raster=np.zeros((1, 1), np.uint8),
        lamps=np.array(geo["lamps"], dtype=np.float64).reshape(-1, 2),
    )
    world.lane_edges = geo["lane_edges"]
    world.raster = _rasterise_ground(world, geo["paint"])
    world.finalise()
    return world


def _geometry(rng, net: rd.Network, b: "_Builder", want_parking: bool) -> dict:
    """Map layers, painted ground, car parks with parked cars, buildings and lamp posts of a network."""
    polys = {k: [] for k in ("drivable_area", "road_segment", "ped_crossing", "walkway", "stop_line", "carpark_area", "lane")}
    lines = {"road_divider": [], "lane_divider": []}
    paint = {"road_divider": [], "lane_divider": [], "zebra": [], "stall": []}
    is_inter, lane_edges, carpark_yaw = [], [], []
    carriages, walks, segments = [], [], []
    for r in net.roads:
        p = _road_polys(r)
        segments.append(p["segment"])
        carriages += p["carriage"]
        walks += p["walk"]
        polys["road_segment"].append(p["segment"])
        is_inter.append(False)
        for direction in (1, -1):
            for i in range(r.lanes.lanes(direction)):
                lo, hi = r.lanes.lane_bounds(direction, i)
                band = r.band(lo, hi)
                polys["lane"].append(Polygon(band))
                k = len(band) // 2
                lane_edges.append((band[[0, -1]], band[[k - 1, k]]))
        L = r.line.length
        s_a = DIVIDER_GAP if r.mouths[0] else 0.0
        s_b = L - DIVIDER_GAP if r.mouths[1] else L
        if s_b - s_a > 2.0:
            for layer, offsets in (("road_divider", r.lanes.road_dividers()), ("lane_divider", r.lanes.lane_dividers())):
                for d in offsets:
                    pts = _simplify_line(r.path(d, s_a, s_b))
                    paint[layer].append(pts)
                    lines[layer] += [pts[k : k + 2].copy() for k in range(len(pts) - 1)]
    junction_polys = []
    for j in net.junctions:
        jp = Polygon(j.polygon)
        junction_polys.append(jp)
        polys["road_segment"].append(jp)
        is_inter.append(True)
        for a in j.arms:
            r, L = a.road, a.road.line.length
            ln = r.lanes
            def span(n0, n1):
                return (n0, n1) if a.end == 0 else (L - n1, L - n0)
            s0, s1 = span(CROSS_NEAR, CROSS_FAR)
            polys["ped_crossing"].append(Polygon(r.band(ln.right_edge + 0.05, ln.left_edge - 0.05, s0, s1)))
            for d in np.arange(ln.right_edge + 0.3, ln.left_edge - 0.5, 1.0):
                paint["zebra"].append(r.band(d, d + 0.5, s0 + 0.05, s1 - 0.05))
            n_in = a.lanes_entering()
            if n_in:
                bounds = [ln.lane_bounds(-a.away, i) for i in range(n_in)]
                lo, hi = min(x for x, _ in bounds) + 0.25, max(y for _, y in bounds) - 0.25
                s0, s1 = span(STOP_NEAR, STOP_FAR)
                polys["stop_line"].append(Polygon(r.band(lo, hi, s0, s1)))
    drivable = unary_union(carriages + junction_polys)
    # Car parks beside roads near the drive, with perpendicular or angled bays.
    occupied = unary_union([drivable] + segments + walks)
    carparks = []
    if want_parking or rng.random() < 0.3:
        for _ in range(int(rng.integers(1, 3))):
            for _try in range(12):
                cp = _carpark(rng, net, b, occupied)
                if cp is not None:
                    poly, yaw, stalls, cars = cp
                    occupied = occupied.union(poly)
                    carparks.append(poly)
                    polys["carpark_area"].append(poly)
                    carpark_yaw.append(yaw)
                    paint["stall"] += stalls
                    for xy, h in cars:
                        b.static("vehicle.car", xy, h, parked=True)
                    break
    drivable = unary_union([drivable] + carparks)
    polys["drivable_area"] = _shapes(drivable)
    walk_src = unary_union(walks + [jp.buffer(4.0) for jp in junction_polys])
    walkway = walk_src.difference(unary_union([drivable] + segments)).simplify(0.02)
    polys["walkway"] = [p for p in _shapes(walkway) if p.area > 2.0]
    walk_union = unary_union(polys["walkway"])
    # Buildings beyond the walkways and lamp posts on them.
    statics, colours, lamps = [], [], []
    blocked = unary_union([occupied, walk_union] + carparks).buffer(1.5)
    placed: list[Polygon] = []
    for r in net.roads:
        L = r.line.length
        for side in (1, -1):
            edge = (r.lanes.left_edge + r.walk[1]) if side > 0 else (r.lanes.right_edge - r.walk[0])
            s = _jitter(rng, 0.0, 10.0)
            while s < L:
                length, depth, h = _jitter(rng, 14.0, 30.0), _jitter(rng, 10.0, 18.0), _jitter(rng, 6.0, 24.0)
                sc = min(s + length / 2, L)
                xy, hd = r.line.at(sc)
                hd = float(hd)
                nrm = np.array([-math.sin(hd), math.cos(hd)])
                c = xy + nrm * (edge + side * (_jitter(rng, 2.0, 5.0) + depth / 2))
                rect = affinity.rotate(box(-length / 2, -depth / 2, length / 2, depth / 2), hd, use_radians=True, origin=(0, 0))
                rect = affinity.translate(rect, c[0], c[1])
                if not rect.intersects(blocked) and not any(rect.buffer(0.5).intersects(p) for p in placed) and b.near(c[None], 150.0):
                    placed.append(rect)
                    statics.append((c[0], c[1], h / 2, depth, length, h, hd, 0))
                    g = int(rng.integers(110, 200))
                    colours.append((g, int(g * _jitter(rng, 0.8, 1.0)), int(g * _jitter(rng, 0.7, 0.95))))
                s += length + _jitter(rng, 3.0, 9.0)
            s = _jitter(rng, 4.0, 20.0)
            while s < L:
                xy, hd = r.line.at(s)
                nrm = np.array([-math.sin(float(hd)), math.cos(float(hd))])
                w = r.walk[1] if side > 0 else r.walk[0]
                base = r.lanes.left_edge if side > 0 else r.lanes.right_edge
                p = xy + nrm * (base + side * (w - 0.3))
                if w > 0 and walk_union.contains(Point(p).buffer(0.2)) and b.near(p[None], 120.0) and b.filter.add(np.broadcast_to(p, (b.grid.n, 2)), np.zeros(b.grid.n), (0.3, 0.3, 6.0)):
                    statics.append((p[0], p[1], 3.0, 0.3, 0.3, 6.0, 0.0, 1))
                    colours.append((60, 60, 65))
                    lamps.append(p)
                s += 25.0
    return {"polygons": polys, "lines": lines, "paint": paint, "is_intersection": is_inter, "lane_edges": lane_edges,
            "carpark_yaw": carpark_yaw, "statics": statics, "static_colours": colours, "lamps": lamps,
            "walk_union": walk_union, "drivable": drivable, "construction": None, "buildings": placed}


def _carpark(rng, net: rd.Network, b: "_Builder", occupied):
    """A car park beside a road near the drive: (polygon, bay yaw, stall lines, parked cars) or None."""
    r = _pick(rng, net.roads)
    L = r.line.length
    length = _jitter(rng, 30.0, 56.0)
    if L < length + 10:
        return None
    sc = _jitter(rng, length / 2 + 5, L - length / 2 - 5)
    xy, hd = r.line.at(sc)
    hd = float(hd)
    if not b.near(xy[None], 60.0):
        return None
    side = 1 if rng.random() < 0.5 else -1
    edge = (r.lanes.left_edge + r.walk[1]) if side > 0 else (r.lanes.right_edge - r.walk[0])
    rows = int(rng.integers(1, 3))
    depth = 5.0 + 6.0 + (5.0 if rows == 2 else 0.0)
    e_u = np.array([math.cos(hd), math.sin(hd)])
    e_v = side * np.array([-math.sin(hd), math.cos(hd)])
    origin = xy + (edge + side * 1.0) * np.array([-math.sin(hd), math.cos(hd)]) - e_u * length / 2

    def to_xy(u, v):
        return origin + u * e_u + v * e_v

    poly = Polygon([to_xy(0, 0), to_xy(length, 0), to_xy(length, depth), to_xy(0, depth)])
    if poly.buffer(0.5).intersects(occupied):
        return None
    alpha = math.radians(_pick(rng, [90.0, 90.0, 60.0, 45.0]))
    pitch = 2.6 / math.sin(alpha)
    slant = 5.0 / math.tan(alpha)
    stalls, cars = [], []
    row_v = [(0.0, 5.0)] + ([(11.0, 16.0)] if rows == 2 else [])
    bay_dir = math.atan2(*(math.sin(alpha) * e_v + math.cos(alpha) * e_u)[::-1])
    occupancy = _jitter(rng, 0.5, 0.9)
    for v0, v1 in row_v:
        u = 0.4
        while u + slant + pitch < length - 0.3:
            stalls.append(np.array([to_xy(u, v0 + 0.3), to_xy(u + slant * (v1 - v0 - 0.6) / 5.0, v1 - 0.3)]))
            if rng.random() < occupancy:
                uc = u + pitch / 2 + slant / 2
                nose_in = rng.random() < 0.5 if alpha == math.radians(90.0) else True
                cars.append((to_xy(uc, (v0 + v1) / 2), bay_dir + (math.pi if (nose_in != (v0 == 0.0)) else 0.0)))
            u += pitch
        stalls.append(np.array([to_xy(u, v0 + 0.3), to_xy(u + slant * (v1 - v0 - 0.6) / 5.0, v1 - 0.3)]))
    return poly, bay_dir, stalls, cars


def _place_objects(rng, net: rd.Network, b: "_Builder", geo: dict, want_construction: bool, route: Route, lanes: list[int]) -> None:
    """Construction zones, kerb parking, roadside cones, barriers and parked bicycles near the drive."""
    mid = b.ego_xy[len(b.ego_xy) // 2]
    near_roads = [r for r in net.roads if _near_mask(r.line.pts, mid[None], 70.0).any()]
    chain_roads = {id(r) for r in net.chain if isinstance(r, rd.Road)}
    if want_construction and near_roads:
        for _try in range(8):
            r = _pick(rng, near_roads)
            direction = -1 if id(r) in chain_roads else _pick(rng, [1, -1])
            n = r.lanes.lanes(direction)
            if n == 0 or r.line.length < 40:
                continue
            zl = 24.0
            d_mid = np.linalg.norm(r.line.pts - mid, axis=1)
            s_c = float(np.clip(r.line.s[int(d_mid.argmin())] + _jitter(rng, -15, 25), zl / 2 + 8, r.line.length - zl / 2 - 8))
            lo, hi = r.lanes.lane_bounds(direction, n - 1)
            inner = hi if direction > 0 else lo  # the closed outer lane's boundary towards the open lanes
            centre = (lo + hi) / 2
            ok = 0
            for s in np.arange(s_c - zl / 2, s_c + zl / 2 + 0.01, 3.0):
                xy, hd = r.line.at(s)
                nrm = np.array([-math.sin(float(hd)), math.cos(float(hd))])
                ok += b.static("movable_object.trafficcone", xy + nrm * (inner - 0.3 * np.sign(inner - centre)), float(hd))
            for s in (s_c - zl / 2 - 1.0, s_c + zl / 2 + 1.0):
                xy, hd = r.line.at(s)
                nrm = np.array([-math.sin(float(hd)), math.cos(float(hd))])
                b.static("movable_object.barrier", xy + nrm * centre, float(hd) + math.pi / 2)
            xy, hd = r.line.at(s_c)
            nrm = np.array([-math.sin(float(hd)), math.cos(float(hd))])
            b.static("vehicle.construction", xy + nrm * centre, float(hd) + (0 if direction > 0 else math.pi), parked=True)
            for _ in range(int(rng.integers(2, 4))):
                s = s_c + _pick(rng, [-1, 1]) * _jitter(rng, 5.0, 10.0)
                xy, hd = r.line.at(s)
                nrm = np.array([-math.sin(float(hd)), math.cos(float(hd))])
                p0 = xy + nrm * (centre + _jitter(rng, -1.0, 1.0))
                if rng.random() < 0.4:
                    h = float(hd) + _pick(rng, [0.0, math.pi])
                    t = b.grid.times[:, None] - b.grid.times[b.grid.n // 2]
                    path = p0 + np.clip(t, -2, 2) * 0.5 * np.array([math.cos(h), math.sin(h)])
                    spd = np.where(np.abs(t[:, 0]) < 2, 0.5, 0.0)
                    b.add("human.pedestrian.construction_worker", path, h, spd)
                else:
                    b.static("human.pedestrian.construction_worker", p0, _jitter(rng, -math.pi, math.pi))
            if ok:
                geo["construction"] = r.line.at(s_c)[0]
                break
    # Kerb parking on side roads and on the chain's opposite kerb.
    for r in near_roads:
        for direction in (1, -1):
            if (id(r) in chain_roads and direction > 0) or r.lanes.lanes(direction) == 0 or rng.random() < 0.5:
                continue
            lo, hi = r.lanes.lane_bounds(direction, r.lanes.lanes(direction) - 1)
            d = (lo + 1.05) if direction > 0 else (hi - 1.05)
            s = _jitter(rng, 8.0, 20.0)
            while s < r.line.length - 8.0:
                xy, hd = r.line.at(s)
                nrm = np.array([-math.sin(float(hd)), math.cos(float(hd))])
                if rng.random() < 0.6:
                    b.static(_pick(rng, ["vehicle.car"] * 6 + ["vehicle.truck"]), xy + nrm * d, float(hd) + (0 if direction > 0 else math.pi), parked=True)
                s += _jitter(rng, 6.0, 9.0)
    # Roadside objects on the walkways near the drive: parked bicycles, cones, barriers.
    for _ in range(int(rng.integers(3, 7))):
        r = _pick(rng, near_roads or net.roads)
        side = _pick(rng, [1, -1])
        s = _jitter(rng, 5.0, max(6.0, r.line.length - 5.0))
        xy, hd = r.line.at(s)
        hd = float(hd)
        nrm = np.array([-math.sin(hd), math.cos(hd)])
        edge = r.lanes.left_edge if side > 0 else r.lanes.right_edge
        kind = _pick(rng, ["bicycle", "cone", "barrier"])
        if kind == "bicycle":
            b.static("vehicle.bicycle", xy + nrm * (edge + side * 0.9), hd, rider=False)
        elif kind == "cone":
            b.static("movable_object.trafficcone", xy + nrm * (edge - side * 0.45), hd)
        else:
            for k in range(int(rng.integers(2, 4))):
                p = r.line.at(s + 2.7 * k)[0] + nrm * (edge + side * 0.5)
                b.static("movable_object.barrier", p, hd)


def _pedestrians(rng, net: rd.Network, b: "_Builder", crowd: bool, T: float, route: Route, ego_xy: np.ndarray) -> None:
    """Pedestrians walking or standing on walkways, crossing at zebras and elsewhere."""
    times = b.grid.times
    near_roads = [r for r in net.roads if _near_mask(r.line.pts, ego_xy, 60.0).any()] or net.roads
    n_walk = int(rng.integers(14, 22)) if crowd else int(rng.integers(4, 8))
    cats = ["human.pedestrian.adult"] * 6 + ["human.pedestrian.child", "human.pedestrian.police_officer"]
    for _ in range(n_walk):
        r = _pick(rng, near_roads)
        side = _pick(rng, [1, -1])
        w = r.walk[1] if side > 0 else r.walk[0]
        if w <= 0:
            continue
        edge = r.lanes.left_edge if side > 0 else r.lanes.right_edge
        d = edge + side * w * _jitter(rng, 0.3, 0.7)
        d_near = np.linalg.norm(r.line.pts[:, None] - ego_xy[None, :: 20], axis=-1).min(1)
        cand = r.line.s[d_near < 50.0]
        if not len(cand):
            continue
        s0 = float(_pick(rng, list(cand)))
        moving = rng.random() < 0.7
        v = _jitter(rng, 0.9, 1.6) if moving else 0.0
        back = rng.random() < 0.5
        s = s0 + (-v if back else v) * times
        xy, h = pose_on(r.line, s, d, backwards=back)
        if not moving:
            h = np.full_like(h, h[0] + _jitter(rng, -0.6, 0.6))
        b.add(_pick(rng, cats), xy, h, np.full(len(times), v))
    # Crossing at zebras near the drive, and a few elsewhere.
    arms = [(j, a) for j in net.junctions for a in j.arms if b.near(a.mouth_pose()[0][None], 60.0)]
    n_cross = (int(rng.integers(3, 7)) if crowd else int(rng.integers(1, 3))) if arms else 0
    for k in range(n_cross + int(rng.integers(0, 2))):
        if k < n_cross:
            j, a = _pick(rng, arms)
            L = a.road.line.length
            s = (CROSS_NEAR + CROSS_FAR) / 2 if a.end == 0 else L - (CROSS_NEAR + CROSS_FAR) / 2
            r = a.road
        else:  # a jaywalker
            r = _pick(rng, near_roads)
            s = _jitter(rng, 5.0, max(6.0, r.line.length - 5.0))
        xy, hd = r.line.at(s)
        nrm = np.array([-math.sin(float(hd)), math.cos(float(hd))])
        p0, p1 = xy + nrm * (r.lanes.right_edge - 1.2), xy + nrm * (r.lanes.left_edge + 1.2)
        if rng.random() < 0.5:
            p0, p1 = p1, p0
        width = float(np.linalg.norm(p1 - p0))
        v = _jitter(rng, 1.1, 1.5)
        t_mid = _jitter(rng, 0.0, T)
        f = np.clip(0.5 + (times - t_mid) * v / width, 0.0, 1.0)
        path = p0 + f[:, None] * (p1 - p0)
        spd = np.where((f > 0) & (f < 1), v, 0.0)
        h = math.atan2(*(p1 - p0)[::-1])
        b.add(_pick(rng, cats), path, np.full(len(times), h), spd)


# The detection class of each category prefix (as the devkit's `category_to_detection_name` maps them).
DETECTION_CLASS = {
    "vehicle.car": "car", "vehicle.truck": "truck", "vehicle.bus": "bus", "vehicle.trailer": "trailer",
    "vehicle.construction": "construction_vehicle", "vehicle.bicycle": "bicycle", "vehicle.motorcycle": "motorcycle",
    "human.pedestrian": "pedestrian", "movable_object.trafficcone": "traffic_cone", "movable_object.barrier": "barrier",
}
# What `_ensure_classes` places for a class missing near the drive: category, where ("kerb" or "walkway").
_FALLBACK = {
    "car": ("vehicle.car", "kerb"), "truck": ("vehicle.truck", "kerb"), "bus": ("vehicle.bus.rigid", "kerb"),
    "trailer": ("vehicle.trailer", "kerb"), "construction_vehicle": ("vehicle.construction", "kerb"),
    "motorcycle": ("vehicle.motorcycle", "kerb"), "bicycle": ("vehicle.bicycle", "walkway"),
    "pedestrian": ("human.pedestrian.adult", "walkway"), "traffic_cone": ("movable_object.trafficcone", "walkway"),
    "barrier": ("movable_object.barrier", "walkway"),
}


def _ensure_classes(rng, net: rd.Network, b: "_Builder", buildings: list, radius: float = 28.0) -> None:
    """Every detection class within `radius` of the ego at some keyframe, so that any stretch of any scene
    (a validation split of one scene included) scores every class: a missing class gets a parked vehicle
    at the kerb (or, where traffic leaves no room, on the verge beyond the walkway) or an object on the
    walkway next to the drive."""
    g = b.grid
    keys = np.arange(int(round(GRID_MARGIN / g.dt)), g.n - int(round(GRID_MARGIN / g.dt)) + 1, int(round(0.5 / g.dt)))
    keys = keys[keys < g.n]

    def footprints(k: int, skip: int = -1) -> list[Polygon]:
        out = []
        for n, a in enumerate(b.agents):
            if n == skip or np.linalg.norm(a.xy[k] - b.ego_xy[k]) > radius + 10.0:
                continue
            c, s_ = math.cos(a.yaw[k]), math.sin(a.yaw[k])
            w, l, _ = a.size
            corners = np.array([[l / 2, w / 2], [l / 2, -w / 2], [-l / 2, -w / 2], [-l / 2, w / 2]]) @ np.array([[c, s_], [-s_, c]]) + a.xy[k]
            out.append(Polygon(corners))
        return out

    def seen(xy: np.ndarray, k: int, skip: int = -1) -> bool:
        """Within `radius` of the ego at key k with a clear 2D line of sight from the ego (nothing between)."""
        if np.linalg.norm(xy - b.ego_xy[k]) >= radius:
            return False
        ray = LineString([b.ego_xy[k], xy])
        return not any(ray.intersects(f) for f in footprints(k, skip))

    def present(cls: str) -> bool:
        for n, a in enumerate(b.agents):
            if lookup_prefix(DETECTION_CLASS, a.category) == cls:
                near = np.nonzero(np.linalg.norm(a.xy[keys] - b.ego_xy[keys], axis=1) < radius)[0]
                if any(seen(a.xy[keys[i]], keys[i], skip=n) for i in near):
                    return True
        return False

    for cls, (category, where) in _FALLBACK.items():
        if present(cls):
            continue
        for attempt in range(90):
            k = int(_pick(rng, list(keys)))
            r = min(net.roads, key=lambda r: float(np.linalg.norm(r.line.pts - b.ego_xy[k], axis=1).min()))
            s_near = float(r.line.s[int(np.linalg.norm(r.line.pts - b.ego_xy[k], axis=1).argmin())])
            s = s_near + _jitter(rng, -18.0, 18.0)
            xy, hd = r.line.at(s)
            hd = float(hd)
            nrm = np.array([-math.sin(hd), math.cos(hd)])
            size = _size(rng, category)
            side = _pick(rng, [1, -1])
            edge = r.lanes.left_edge if side > 0 else r.lanes.right_edge
            if where == "kerb" and attempt < 45:
                p = xy + nrm * (edge - side * (size[0] / 2 + 0.3))
                yaw = hd + (0.0 if side < 0 else math.pi)
                if seen(p, k) and b.static(category, p, yaw, size=size, parked=category != "vehicle.bus.rigid"):
                    break
            elif where == "kerb":  # on the verge beyond the walkway, clear of buildings
                w = r.walk[1] if side > 0 else r.walk[0]
                p = xy + nrm * (edge + side * (w + size[0] / 2 + 0.8))
                foot = affinity.rotate(box(-size[1] / 2, -size[0] / 2, size[1] / 2, size[0] / 2), hd, use_radians=True, origin=(0, 0))
                foot = affinity.translate(foot, p[0], p[1])
                if seen(p, k) and not any(foot.intersects(q) for q in buildings) and b.static(category, p, hd, size=size, parked=True):
                    break
            else:
                w = r.walk[1] if side > 0 else r.walk[0]
                p = xy + nrm * (edge + side * (min(w, 3.0) * _jitter(rng, 0.2, 0.5)))
                if seen(p, k) and b.static(category, p, hd + _jitter(rng, -0.3, 0.3), size=size, rider=False):
                    break


def _shift_geometry(geo: dict, mid: np.ndarray) -> dict:
    """Translate every layer by -mid (the drive's centre becomes the scene origin), clipped to the world."""
    world_box = box(-EXTENT, -EXTENT, EXTENT, EXTENT)
    out = dict(geo)
    polys = {}
    for layer, ps in geo["polygons"].items():
        kept = []
        for p in ps:
            q = affinity.translate(p, -mid[0], -mid[1])
            if layer != "lane":
                q = q.intersection(world_box)
            for piece in _shapes(q) if layer != "lane" else [q]:
                if piece.area > 0.05 and piece.is_valid:
                    kept.append(piece)
        polys[layer] = kept
    # road_segment pieces kept their order; recompute intersection flags by matching areas
    seg_src = [affinity.translate(p, -mid[0], -mid[1]) for p in geo["polygons"]["road_segment"]]
    flags = []
    for p in polys["road_segment"]:
        c = p.representative_point()
        flags.append(any(f and s.contains(c) for s, f in zip(seg_src, geo["is_intersection"])))
    out["is_intersection"] = flags
    out["lane_edges"] = [(e0 - mid, e1 - mid) for e0, e1 in geo["lane_edges"]]
    out["polygons"] = {k: [_poly_tuple(p) for p in v] for k, v in polys.items()}
    inside = lambda seg: bool(np.all(np.abs(seg) < EXTENT - 0.5))  # noqa: E731
    out["lines"] = {k: [s - mid for s in v if inside(s - mid)] for k, v in geo["lines"].items()}
    out["paint"] = {k: [p - mid for p in v] for k, v in geo["paint"].items()}
    out["statics"] = [(u - mid[0], v - mid[1], *rest) for u, v, *rest in geo["statics"]]
    out["lamps"] = [p - mid for p in geo["lamps"]]
    return out


def _rasterise_ground(world: World, paint: dict) -> np.ndarray:
    """(H, W) uint8 ground classes of the scene frame at RASTER_RES; row along +v, col along +u."""
    n = int(round(2 * EXTENT / RASTER_RES))
    img = np.full((n, n), GRASS, dtype=np.uint8)
    shift = 4
    scale = (1 << shift) / RASTER_RES

    def pts(poly: np.ndarray) -> np.ndarray:
        return np.round((np.asarray(poly) + EXTENT) * scale).astype(np.int32)

    def fill(poly: Poly | np.ndarray, cls: int) -> None:
        rings = [poly[0], *poly[1]] if isinstance(poly, tuple) else [poly]
        cv2.fillPoly(img, [pts(r) for r in rings], int(cls), lineType=cv2.LINE_8, shift=shift)

    def line(p: np.ndarray, cls: int, width_m: float) -> None:
        cv2.polylines(img, [pts(p)], False, int(cls), max(1, int(round(width_m / RASTER_RES))), cv2.LINE_8, shift)

    for poly in world.polygons["walkway"]:
        fill(poly, WALKWAY)
    for poly in world.polygons["drivable_area"]:
        fill(poly, ROAD)
    for poly in world.polygons["carpark_area"]:
        fill(poly, CARPARK)
    for seg in paint["stall"]:
        line(seg, PARKING_LINE, 0.12)
    for p in paint["road_divider"]:  # double yellow
        lp = rd.Polyline(p)
        for off in (-0.12, 0.12):
            line(lp.offset(off), CENTER_YELLOW, 0.12)
    for p in paint["lane_divider"]:  # dashed white: 3 m paint, 6 m gap
        for dash in _dashes(p, 3.0, 6.0):
            line(dash, LANE_WHITE, 0.15)
    for stripe in paint["zebra"]:
        fill(stripe, ZEBRA)
    for poly in world.polygons["stop_line"]:
        fill(poly, STOP_WHITE)
    return img
