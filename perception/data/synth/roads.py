"""Procedural road networks for the synthetic world: a small block grammar after MetaDrive's procedural maps.

A scene's network is a *chain* of blocks along the ego's route (straight pieces, circular curves, X, T and Y
junctions at angles from 50 to 130 degrees) plus the side arms of every junction. Everything is in the scene
frame (metres, ground plane): the world later places it into the map's global frame.

A road is a centreline polyline with lanes to its right (travel along the polyline, "forward") and to its
left ("backward"), right-hand traffic, an optional median, or one-way. Lateral offsets `d` are measured to
the left of the centreline. Every map layer, the painted ground and each lane's path derive from these
offsets, so the map, the cameras and the LiDAR see the same road.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from shapely.geometry import MultiPoint

STEP = 1.0  # metres between centreline vertices


def _unit(a: float) -> np.ndarray:
    return np.array([math.cos(a), math.sin(a)])


def wrap(a):
    """Angle(s) wrapped to [-pi, pi)."""
    return (np.asarray(a) + math.pi) % (2 * math.pi) - math.pi


class Polyline:
    """A 2D polyline with arc length. Positions beyond either end extrapolate along the end tangents."""

    def __init__(self, pts: np.ndarray):
        pts = np.asarray(pts, dtype=np.float64)
        keep = np.concatenate([[True], np.linalg.norm(np.diff(pts, axis=0), axis=1) > 1e-6])
        self.pts = pts[keep]
        if len(self.pts) < 2:
            raise ValueError("a polyline needs two distinct points")
        seg = np.diff(self.pts, axis=0)
        self.seg_len = np.linalg.norm(seg, axis=1)
        self.s = np.concatenate([[0.0], np.cumsum(self.seg_len)])
        self.seg_dir = seg / self.seg_len[:, None]
        tang = np.empty_like(self.pts)
        tang[0], tang[-1] = self.seg_dir[0], self.seg_dir[-1]
        mid = self.seg_dir[:-1] + self.seg_dir[1:]
        tang[1:-1] = mid / np.maximum(np.linalg.norm(mid, axis=1, keepdims=True), 1e-9)
        self.tangent = tang
        self.normal = np.stack([-tang[:, 1], tang[:, 0]], 1)  # left normal
        self.heading = np.unwrap(np.arctan2(tang[:, 1], tang[:, 0]))

    @property
    def length(self) -> float:
        return float(self.s[-1])

    def at(self, s) -> tuple[np.ndarray, np.ndarray]:
        """Positions (..., 2) and headings (...,) (rad, unwrapped along the line) at arc lengths s."""
        s = np.asarray(s, dtype=np.float64)
        i = np.clip(np.searchsorted(self.s, s, side="right") - 1, 0, len(self.s) - 2)
        f = s - self.s[i]
        xy = self.pts[i] + self.seg_dir[i] * f[..., None]
        h0, h1 = self.heading[i], self.heading[i + 1]
        w = np.clip(f / self.seg_len[i], 0.0, 1.0)
        return xy, h0 + (h1 - h0) * w

    def offset(self, d) -> np.ndarray:
        """(K, 2) vertices offset by d (scalar or (K,)) to the left."""
        d = np.broadcast_to(np.asarray(d, dtype=np.float64), (len(self.pts),))
        return self.pts + self.normal * d[:, None]

    def reversed(self) -> "Polyline":
        return Polyline(self.pts[::-1])

    def curvature(self) -> np.ndarray:
        """(K,) |d heading / ds| (1/m), smoothed over a few metres."""
        dh = np.gradient(self.heading, self.s)
        k = np.ones(5) / 5
        return np.abs(np.convolve(np.pad(dh, 2, mode="edge"), k, mode="valid"))

    def end_pose(self) -> tuple[np.ndarray, float]:
        return self.pts[-1].copy(), float(self.heading[-1])


def straight(p: np.ndarray, heading: float, length: float) -> np.ndarray:
    n = max(1, int(math.ceil(length / STEP)))
    return p + np.outer(np.linspace(0.0, length, n + 1), _unit(heading))


def arc(p: np.ndarray, heading: float, radius: float, angle: float) -> np.ndarray:
    """A circular arc from p, tangent to `heading`, turning `angle` (rad, + left)."""
    sgn = 1.0 if angle >= 0 else -1.0
    centre = p + sgn * radius * _unit(heading + math.pi / 2)
    n = max(2, int(math.ceil(radius * abs(angle) / STEP)))
    a0 = heading - sgn * math.pi / 2
    a = a0 + np.linspace(0.0, angle, n + 1)
    return centre + radius * np.stack([np.cos(a), np.sin(a)], 1)


def bezier(p0: np.ndarray, h0: float, p1: np.ndarray, h1: float) -> np.ndarray:
    """A cubic Bezier from (p0, h0) to (p1, h1), sampled about every STEP metres."""
    dist = float(np.linalg.norm(p1 - p0))
    k = 0.42 * dist
    c0, c1 = p0 + k * _unit(h0), p1 - k * _unit(h1)
    n = max(4, int(math.ceil(dist * 1.3 / STEP)))
    t = np.linspace(0.0, 1.0, n + 1)[:, None]
    return (1 - t) ** 3 * p0 + 3 * (1 - t) ** 2 * t * c0 + 3 * (1 - t) * t**2 * c1 + t**3 * p1


def join(*parts: np.ndarray) -> np.ndarray:
    """Concatenate vertex arrays, dropping a repeated joint vertex."""
    out = [parts[0]]
    for p in parts[1:]:
        out.append(p[1:] if np.linalg.norm(p[0] - out[-1][-1]) < 1e-6 else p)
    return np.concatenate(out)


@dataclass(frozen=True)
class Lanes:
    """A road's cross-section. `n_bwd == 0` is a one-way road; `median` (m) splits a two-way road."""

    n_fwd: int
    n_bwd: int
    width: float = 3.5
    median: float = 0.0

    @property
    def one_way(self) -> bool:
        return self.n_bwd == 0

    @property
    def right_edge(self) -> float:
        return -self.n_fwd * self.width / 2 if self.one_way else -(self.median / 2 + self.n_fwd * self.width)

    @property
    def left_edge(self) -> float:
        return self.n_fwd * self.width / 2 if self.one_way else self.median / 2 + self.n_bwd * self.width

    @property
    def half_width(self) -> float:
        return max(-self.right_edge, self.left_edge)

    def lane_centre(self, direction: int, i: int) -> float:
        """Offset of lane i (0 = innermost, next to the centre or, one-way, leftmost) in direction +1/-1."""
        if self.one_way:
            return self.left_edge - (i + 0.5) * self.width
        inner = self.median / 2 + (i + 0.5) * self.width
        return -inner if direction > 0 else inner

    def lanes(self, direction: int) -> int:
        return self.n_fwd if direction > 0 else self.n_bwd

    def lane_bounds(self, direction: int, i: int) -> tuple[float, float]:
        c = self.lane_centre(direction, i)
        return c - self.width / 2, c + self.width / 2

    def road_dividers(self) -> list[float]:
        if self.one_way:
            return []
        return [0.0] if self.median == 0 else [-self.median / 2, self.median / 2]

    def lane_dividers(self) -> list[float]:
        if self.one_way:
            return [self.left_edge - k * self.width for k in range(1, self.n_fwd)]
        out = [-(self.median / 2 + k * self.width) for k in range(1, self.n_fwd)]
        return out + [self.median / 2 + k * self.width for k in range(1, self.n_bwd)]


@dataclass
class Road:
    """One road piece: a centreline and its lanes. `kind` is "straight" or "curved"."""

    line: Polyline
    lanes: Lanes
    kind: str
    mouths: tuple[bool, bool] = (False, False)  # whether the start / end meets a junction
    walk: tuple[float, float] = (3.0, 3.0)  # walkway width right / left (0: none)

    def band(self, d0, d1, s0: float = 0.0, s1: float | None = None) -> np.ndarray:
        """Polygon (P, 2) between offsets d0 < d1 (scalars or (K,) arrays) from arc length s0 to s1."""
        xy, h = self.line.at(self._ss(s0, s1))
        nrm = np.stack([-np.sin(h), np.cos(h)], 1)
        a = xy + nrm * np.asarray(d0)
        b = xy + nrm * np.asarray(d1)
        return np.concatenate([a, b[::-1]])

    def _ss(self, s0: float, s1: float | None) -> np.ndarray:
        s1 = self.line.length if s1 is None else s1
        sel = (self.line.s > s0 + 1e-6) & (self.line.s < s1 - 1e-6)
        return np.concatenate([[s0], self.line.s[sel], [s1]])

    def path(self, d: float, s0: float = 0.0, s1: float | None = None) -> np.ndarray:
        """Vertices of the line at offset d between arc lengths s0 and s1."""
        ss = self._ss(s0, s1)
        xy, h = self.line.at(ss)
        return xy + np.stack([-np.sin(h), np.cos(h)], 1) * d

    def lane_path(self, direction: int, i: int) -> np.ndarray:
        """Vertices of lane i's centre in its travel direction."""
        p = self.path(self.lanes.lane_centre(direction, i))
        return p if direction > 0 else p[::-1]

    def mouth_s(self, end: int) -> float:
        """Arc length of the start (end=0) or end (end=1) of the road."""
        return 0.0 if end == 0 else self.line.length


@dataclass
class Arm:
    """A road meeting a junction at its start (end=0, pointing away) or at its end (end=1, pointing in)."""

    road: Road
    end: int

    @property
    def away(self) -> int:
        """Travel direction (+1 forward / -1 backward along the road) of traffic leaving the junction."""
        return 1 if self.end == 0 else -1

    def mouth_pose(self) -> tuple[np.ndarray, float]:
        """Centre point of the mouth and the heading pointing away from the junction."""
        s = self.road.mouth_s(self.end)
        xy, h = self.road.line.at(s)
        return xy, float(h) if self.end == 0 else float(h) + math.pi

    def lane_point(self, direction_away: bool, i: int) -> tuple[np.ndarray, float]:
        """Point of lane i's centre at the mouth and its travel heading, for traffic leaving (True) or entering."""
        lanes = self.road.lanes
        trav = self.away if direction_away else -self.away
        d = lanes.lane_centre(trav, i)
        s = self.road.mouth_s(self.end)
        xy, h = self.road.line.at(s)
        p = xy + d * np.array([-math.sin(h), math.cos(h)])
        return p, float(h) if trav > 0 else float(h) + math.pi

    def lanes_leaving(self) -> int:
        return self.road.lanes.lanes(self.away)

    def lanes_entering(self) -> int:
        return self.road.lanes.lanes(-self.away)


@dataclass
class Junction:
    kind: str  # "X", "T", "Y"
    centre: np.ndarray
    radius: float
    arms: list[Arm]
    polygon: np.ndarray = field(default=None)  # (P, 2)
    stop_release: float = 0.0  # when the chain's traffic may go (s of scene time; 0: green)


def connector(a: Arm, i: int, b: Arm, j: int) -> np.ndarray:
    """Vertices of the path through a junction from lane i entering at arm a to lane j leaving at arm b."""
    p0, h0 = a.lane_point(False, i)
    p1, h1 = b.lane_point(True, j)
    return bezier(p0, h0, p1, h1)


@dataclass
class Network:
    """The roads, junctions and the chain (the ego's route) of one scene."""

    roads: list[Road]
    junctions: list[Junction]
    chain: list  # alternating Road (travelled forward) and (Junction, in Arm, out Arm)
    kind: str  # the block at the ego's drive: "junction", "curve", "straight"
    event_item: int = 0  # index into chain of the event's junction, or of the road holding the curve
    event_offset: float = 0.0  # arc length along that road where the event starts


def _street(rng: np.random.Generator, allow_one_way: bool = True) -> Lanes:
    width = float(rng.uniform(3.2, 3.7))
    r = rng.random()
    if allow_one_way and r < 0.12:
        return Lanes(int(rng.integers(1, 3)), 0, width)
    n = int(rng.choice([1, 1, 2, 2, 2, 3], p=None))
    median = float(rng.uniform(1.2, 3.0)) if n >= 2 and rng.random() < 0.35 else 0.0
    n_bwd = n if rng.random() < 0.8 else max(1, n - 1)
    return Lanes(n, n_bwd, width, median)


def _walk(rng: np.random.Generator) -> tuple[float, float]:
    return float(rng.uniform(2.8, 4.2)), float(rng.uniform(2.8, 4.2))


def _curve_pts(rng, p, h, min_len=25.0, max_radius=300.0, min_angle_deg=20.0):
    radius = float(np.exp(rng.uniform(math.log(25.0), math.log(max_radius))))
    lo = max(math.radians(min_angle_deg), min_len / radius)
    angle = float(rng.uniform(lo, max(lo, min(math.radians(100.0), 140.0 / radius + math.radians(15)))))
    angle *= 1 if rng.random() < 0.5 else -1
    return arc(p, h, radius, angle)


def junction_arms(rng: np.random.Generator, kind: str) -> list[float]:
    """Arm directions (rad, relative to the incoming heading; the incoming arm is at pi) for a junction kind."""
    def ang(lo, hi):
        return math.radians(rng.uniform(lo, hi))
    if kind == "X":
        return [math.pi, ang(-12, 12), ang(50, 130), -ang(50, 130)]
    if kind == "T":
        if rng.random() < 0.5:  # the main road goes on; a branch leaves at 50-130 degrees to one side
            side = 1 if rng.random() < 0.5 else -1
            return [math.pi, ang(-8, 8), side * ang(50, 130)]
        a = ang(60, 120)  # the chain's road ends at a through road
        return [math.pi, a, a - math.pi]
    # Y: a fork, the two branches 50-130 degrees apart
    spread = ang(50, 130)
    skew = ang(-15, 15)
    return [math.pi, skew + spread / 2, skew - spread / 2]


def build_network(rng: np.random.Generator, event: str, route_length: float, event_at: float) -> Network:
    """A chain of blocks of total length about `route_length`, with `event` ("junction", "curve",
    "straight") starting about `event_at` metres along it, plus every junction's side arms."""
    roads: list[Road] = []
    junctions: list[Junction] = []
    chain: list = []
    p, h = np.zeros(2), 0.0
    lanes = _street(rng)
    pts = [p[None]]
    travelled = 0.0
    placed_event = False
    event_item, event_offset = 0, 0.0

    def close_road(kind: str, start_mouth: bool, end_mouth: bool):
        nonlocal pts
        line = Polyline(join(*pts))
        road = Road(line, lanes, kind, (start_mouth, end_mouth), _walk(rng))
        roads.append(road)
        chain.append(road)
        pts = [line.pts[-1:]]
        return road

    start_mouth = False
    curved = False
    while travelled < route_length:
        near_event = not placed_event and travelled + 1.0 >= event_at
        if near_event:
            block = event
            placed_event = True
            event_item = len(chain)
            event_offset = Polyline(join(*pts)).length if len(join(*pts)) >= 2 else 0.0
        elif not placed_event and travelled + 80.0 > event_at:
            block = "straight"
        else:
            block = str(rng.choice(["straight", "curve", "curve", "junction"]))
        if block == "straight":
            L = float(rng.uniform(25.0, 70.0)) if not (not placed_event and travelled + 80.0 > event_at) else max(1.0, event_at - travelled)
            seg = straight(p, h, L)
            pts.append(seg)
            p, h = seg[-1], h
            travelled += L
        elif block == "curve":
            # The curve the ego drives through is an urban bend (25-120 m); others span 25-300 m.
            seg = _curve_pts(rng, p, h, max_radius=120.0, min_angle_deg=35.0) if near_event else _curve_pts(rng, p, h)
            pts.append(seg)
            line = Polyline(seg)
            p, h = line.end_pose()
            travelled += line.length
            curved = True
        else:  # junction: close the current road at the mouth, lay the junction, go on along one arm
            if len(join(*pts)) < 2 or Polyline(join(*pts)).length < 12.0:
                seg = straight(p, h, 15.0)
                pts.append(seg)
                p = seg[-1]
                travelled += 15.0
            in_road = close_road("curved" if curved else "straight", start_mouth, True)
            if event_item == len(chain) - 1 and near_event:
                event_item = len(chain)
            curved = False
            kind = str(rng.choice(["X", "T", "Y"]))
            rel = junction_arms(rng, kind)
            arm_lanes = [in_road.lanes] + [_street(rng) for _ in rel[1:]]
            # Junction radius: adjacent arms' mouths must not overlap.
            dirs = sorted(wrap(np.array(rel)))
            gaps = np.diff(np.concatenate([dirs, [dirs[0] + 2 * math.pi]]))
            hw = max(l.half_width for l in arm_lanes) + 1.0
            radius = max(9.0, hw / math.tan(max(min(gaps), math.radians(40)) / 2) + 1.5)
            centre = p + radius * _unit(h)
            arms = [Arm(in_road, 1)]
            if event == "junction" and near_event:
                choices = list(range(1, len(rel)))
                weights = np.array([0.2 if abs(wrap(rel[c])) < math.radians(20) else 1.0 for c in choices])
                out_idx = int(rng.choice(choices, p=weights / weights.sum()))
            else:
                straightish = [c for c in range(1, len(rel)) if abs(wrap(rel[c])) < math.radians(30)]
                out_idx = straightish[0] if straightish else 1
            for k in range(1, len(rel)):
                a_h = h + rel[k]
                mouth = centre + radius * _unit(a_h)
                if k == out_idx:
                    out_start = mouth
                    out_heading = a_h
                    continue
                # Side arms run on past the world's edge, so no traffic leaves them onto the grass.
                if rng.random() < 0.5:
                    bend = _curve_pts(rng, mouth + 25.0 * _unit(a_h), a_h)
                    end, h_end = Polyline(bend).end_pose()
                    side, kind_k = join(straight(mouth, a_h, 25.0), bend, straight(end, h_end, 150.0)), "curved"
                else:
                    side, kind_k = straight(mouth, a_h, float(rng.uniform(170.0, 230.0))), "straight"
                road = Road(Polyline(side), arm_lanes[k], kind_k, (True, False), _walk(rng))
                roads.append(road)
                arms.append(Arm(road, 0))
            lanes = arm_lanes[out_idx]
            p, h = out_start, out_heading
            pts = [p[None]]
            # The out road is built as the chain goes on; its Arm is patched in once closed.
            junction = Junction(kind, centre, radius, arms)
            junctions.append(junction)
            chain.append((junction, arms[0], None))
            travelled += 2 * radius
            start_mouth = True
    pts.append(straight(p, h, 150.0))  # the chain runs on past the world's edge
    close_road("curved" if curved else "straight", start_mouth, False)
    # Patch the out arms of the junctions: the chain road following each junction.
    for n, item in enumerate(chain):
        if isinstance(item, tuple):
            j, a_in, _ = item
            nxt = chain[n + 1]
            a_out = Arm(nxt, 0)
            j.arms.append(a_out)
            chain[n] = (j, a_in, a_out)
    for j in junctions:
        j.polygon = junction_polygon(j)
    return Network(roads, junctions, chain, event, event_item, event_offset)


def junction_polygon(j: Junction) -> np.ndarray:
    """The junction's area: the convex hull of its arms' mouth edges."""
    pts = []
    for a in j.arms:
        s = a.road.mouth_s(a.end)
        xy, h = a.road.line.at(s)
        nrm = np.array([-math.sin(h), math.cos(h)])
        pts.append(xy + nrm * a.road.lanes.right_edge)
        pts.append(xy + nrm * a.road.lanes.left_edge)
    hull = MultiPoint(np.array(pts)).convex_hull
    return np.asarray(hull.exterior.coords)[:-1]
