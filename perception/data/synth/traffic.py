"""Road users of the synthetic world: trajectories on lane paths, car-following, and a collision filter.

Every moving road user follows a path (a `Polyline` in the scene frame) with a longitudinal motion s(t) from
the intelligent driver model (IDM): it keeps its desired speed, slows for curves, follows the vehicle ahead on
the same path and waits at stop points until their release time. Trajectories are sampled on one time grid
(`TimeGrid`); a box's position at any sensor time is interpolated from it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from perception.data.synth.roads import Polyline

# IDM parameters (Treiber et al.): max acceleration, comfortable deceleration (m/s^2), jam gap (m), time headway (s).
IDM_A, IDM_B, IDM_S0, IDM_T = 1.4, 2.2, 2.4, 1.3
A_LAT = 2.0  # lateral acceleration a curve allows (m/s^2)


@dataclass(frozen=True)
class TimeGrid:
    """Scene times (s, 0 = first keyframe) on which trajectories are sampled."""

    t0: float
    dt: float
    n: int

    @property
    def times(self) -> np.ndarray:
        return self.t0 + self.dt * np.arange(self.n)

    def weights(self, t: float) -> tuple[int, float]:
        x = (t - self.t0) / self.dt
        i = int(np.clip(math.floor(x), 0, self.n - 2))
        return i, float(np.clip(x - i, 0.0, 1.0))


@dataclass
class Agent:
    """A road user or movable object. Arrays are on the world's `TimeGrid`, in the scene frame.

    xy: (N, 2) box-centre ground position (m); yaw: (N,) heading (rad, unwrapped); speed: (N,) m/s along yaw.
    """

    category: str
    size: tuple[float, float, float]  # w, l, h (metres)
    xy: np.ndarray
    yaw: np.ndarray
    speed: np.ndarray
    kind: str  # "vehicle", "cycle", "pedestrian", "object"
    colour: tuple[int, int, int]
    rcs: float
    parked: bool = False  # a vehicle with no intent to move (else a stop is "stopped")
    rider: bool = True  # cycles
    group: int = -1  # agents of one group (truck and its trailer) may touch

    def attribute(self, i: int) -> str | None:
        """The nuScenes attribute at grid index i."""
        moving = self.speed[i] > 0.3
        if self.kind == "vehicle":
            return "vehicle.moving" if moving else "vehicle.parked" if self.parked else "vehicle.stopped"
        if self.kind == "cycle":
            return "cycle.with_rider" if self.rider else "cycle.without_rider"
        if self.kind == "pedestrian":
            return "pedestrian.moving" if moving else "pedestrian.standing"
        return None


def idm(path: Polyline, grid: TimeGrid, s_init: float, v_init: float, v_des: float, length: float,
        leader: tuple[np.ndarray, float] | None = None, stops: tuple[tuple[float, float], ...] = ()) -> tuple[np.ndarray, np.ndarray]:
    """Arc length s (N,) and speed v (N,) along `path` on the grid, starting at (s_init, v_init) at grid.t0.

    leader: (s (N,) of the vehicle ahead on the same path, its length); stops: (s_stop, release time) pairs,
    each a standing obstacle at s_stop until the release time.
    """
    kappa = path.curvature()
    look = np.array([0.0, 5.0, 10.0, 15.0, 22.0, 30.0, 40.0])
    s_out, v_out = np.empty(grid.n), np.empty(grid.n)
    s, v = s_init, v_init
    t = grid.t0
    for k in range(grid.n):
        s_out[k], v_out[k] = s, v
        ks = np.interp(s + look, path.s, kappa)
        v_curve = np.sqrt(A_LAT / np.maximum(ks, 1e-4))
        v_t = min(v_des, float(np.min(np.sqrt(v_curve**2 + 2 * IDM_B * look))))
        v_t = max(v_t, 0.5)
        acc = IDM_A * (1.0 - (v / v_t) ** 4)
        gaps = []
        if leader is not None:
            s_l, len_l = leader
            v_l = (s_l[min(k + 1, grid.n - 1)] - s_l[k]) / grid.dt if k + 1 < grid.n else 0.0
            gaps.append((s_l[k] - s - (len_l + length) / 2, v_l))
        for s_stop, release in stops:
            if t < release and s + length / 2 <= s_stop + 0.5:
                gaps.append((s_stop - s - length / 2, 0.0))
        for gap, v_l in gaps:
            s_star = IDM_S0 * 0.4 + v * IDM_T + v * (v - v_l) / (2 * math.sqrt(IDM_A * IDM_B))
            acc -= IDM_A * (max(s_star, 0.0) / max(gap, 0.1)) ** 2
        acc = max(acc, -8.0)
        v = max(0.0, v + acc * grid.dt)
        s += v * grid.dt
        t += grid.dt
    return s_out, v_out


def pose_on(path: Polyline, s: np.ndarray, lateral: float = 0.0, backwards: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Positions (N, 2) and yaws (N,) at arc lengths s, `lateral` metres to the left of the path."""
    xy, h = path.at(s)
    if lateral:
        xy = xy + lateral * np.stack([-np.sin(h), np.cos(h)], 1)
    return xy, h + (math.pi if backwards else 0.0)


def disc_cover(size: tuple[float, float, float]) -> tuple[np.ndarray, float]:
    """Offsets (k,) along a box's length and the radius of k discs covering its footprint."""
    w, l, _ = size
    k = max(1, int(math.ceil(l / max(w, 0.3))))
    half = l / (2 * k)
    return (np.arange(k) - (k - 1) / 2) * 2 * half, math.hypot(half, w / 2)


@dataclass
class CollisionFilter:
    """Accepts agents in priority order, rejecting any whose footprint overlaps an accepted one at any time."""

    index: np.ndarray  # (M,) grid indices checked
    margin: float = 0.15
    centres: list = field(default_factory=list)  # (M, 2) per accepted disc
    radii: list = field(default_factory=list)
    groups: list = field(default_factory=list)

    def _discs(self, xy: np.ndarray, yaw: np.ndarray, size) -> tuple[np.ndarray, float]:
        offs, r = disc_cover(size)
        xy, yaw = xy[self.index], yaw[self.index]
        d = np.stack([np.cos(yaw), np.sin(yaw)], 1)
        return xy[None] + offs[:, None, None] * d[None], r  # (k, M, 2)

    def add(self, xy: np.ndarray, yaw: np.ndarray, size, group: int = -1, force: bool = False) -> bool:
        discs, r = self._discs(xy, yaw, size)
        if not force and self.centres:
            c = np.stack(self.centres)  # (D, M, 2)
            rad = np.array(self.radii)
            grp = np.array(self.groups)
            other = (grp != group) | (group < 0)
            if other.any():
                dist = np.linalg.norm(discs[:, None] - c[None, other], axis=-1)  # (k, D', M)
                if (dist < (r + rad[other])[None, :, None] + self.margin).any():
                    return False
        for dsc in discs:
            self.centres.append(dsc)
            self.radii.append(r)
            self.groups.append(group)
        return True
