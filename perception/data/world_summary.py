"""How diverse the world of a nuScenes dataroot is, from the devkit tables and the map expansion JSON alone.

`perception data check` prints this (`check_dataroot` puts it in ``report.summary["world"]``). Everything is
read straight from ``DIR/<version>/*.json`` and ``DIR/maps/expansion/<location>.json`` (no devkit, no
generator), so it describes a real nuScenes set and a synthetic one the same way:

1. Off-axis keyframes: the road and lane dividers around the ego (segment midpoints within
   `OFF_AXIS_RADIUS_M`, 2D) are mostly aligned with the ego's axes, or not. A keyframe is off-axis when at
   least `OFF_AXIS_MIN_SHARE` of that divider length is more than `OFF_AXIS_ANGLE_DEG` off the ego's axes
   (the direction relative to the ego heading folded into [0, 45] degrees).
2. Turning scenes: the largest absolute change of the ego heading from the scene's first keyframe (unwrapped).
3. Junctions and roads of the map expansion near the keyframes (within `NEAR_EGO_M` of a keyframe ego
   position): junctions (``is_intersection`` road segments) by kind, other road segments straight or curved,
   and car parks.

Scene tags (the keyword tags of the scene descriptions) are summarised by `check._summarise_heads` in
``report.summary["scene_tags"]``; they are not repeated here.

Frames and units: the map expansion and ego poses are in the global frame of the location's map (metres, x
east, y north); yaws are counter-clockwise from +x; angles in the returned dict are in degrees.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import shapely
from shapely.geometry import Polygon
from shapely.ops import nearest_points

WORLD_TABLES = ("scene", "log", "sample", "sample_data", "calibrated_sensor", "sensor", "ego_pose")

# 1. Off-axis keyframes.
OFF_AXIS_RADIUS_M = 30.0  # divider segments whose midpoint is within this 2D distance of the ego
OFF_AXIS_ANGLE_DEG = 10.0  # a segment is off-axis when its folded direction is more than this
OFF_AXIS_MIN_SHARE = 0.30  # a keyframe is off-axis when at least this share of the divider length is off-axis
DIVIDER_LAYERS = ("road_divider", "lane_divider")
# 2. Turning scenes.
TURNING_MIN_DEG = 30.0
# 3. Junctions and roads.
NEAR_EGO_M = 60.0  # map records count when within this distance of at least one keyframe ego position
ARM_GAP_M = 0.5  # a non-intersection road segment within this distance of a junction is one of its arms
ARM_DISC_M = 25.0  # arm direction: towards the centroid of the arm inside this disc around the junction centroid
T_OPPOSITE_TOL_DEG = 25.0  # 3 arms make a T when two arm directions are within this of opposite
CURVED_MAX_FILL = 0.97  # curved road segment: area / area(minimum rotated rectangle) below this ...
CURVED_MIN_LENGTH_M = 15.0  # ... and its minimum rotated rectangle's long side longer than this
JUNCTION_KINDS = ("X", "T", "Y", "bend", "multi", "roundabout", "other")
PER_SCENE_PRINTED = 6  # turning scenes printed by `format_world` (largest turns first; all are in the dict)


def world_summary(dataroot: str | Path, version: str, tables: dict[str, list[dict]] | None = None) -> dict:
    """Diversity of the world of a dataroot, from the devkit tables and the map expansion JSON files.

    dataroot: nuScenes dataroot; version: table folder, e.g. "v1.0-mini".
    tables: the tables already loaded (name -> records; at least `WORLD_TABLES`), or None to read them from
        ``dataroot/version/*.json``.
    Missing references are skipped (`check_dataroot` reports them); a location without a readable
    ``maps/expansion/<location>.json`` has no off-axis or junction figures and is listed instead.

    Returns a JSON-serialisable dict:
        off_axis_keyframes: {count, total, share}: keyframes (with a LIDAR_TOP keyframe pose, at a location with
            a map expansion) where >= 30% of the divider length within 30 m is > 10 degrees off the ego's axes;
            share is count / total (None when total is 0).
        keyframes_without_map: keyframes at locations without a map expansion (not in off_axis_keyframes).
        turning_scenes: {count, total, share, max_turn_deg}: max_turn_deg maps scene name -> the largest
            absolute ego heading change from its first keyframe (degrees, unwrapped, rounded to 0.1); count is
            the scenes reaching >= 30 degrees, total the scenes with at least one keyframe pose.
        junctions: kind -> count for kind in `JUNCTION_KINDS`, summed over the locations.
        road_segments: {straight, curved}: non-intersection road segments, summed over the locations.
        carpark_areas: carpark_area records, summed over the locations.
        locations_with_map_expansion, locations_without_map_expansion: sorted location names of the scenes.
    Junctions, road segments and car parks count once each, when within 60 m of at least one keyframe ego
    position of this version's scenes.
    """
    root = Path(dataroot)
    t = tables if tables is not None else _read_tables(root, version)
    keyframes = _keyframe_poses(t)  # scene token -> (ego_xy_global (K, 2), yaw_global (K,)) in sample order
    location_of_log = {r.get("token"): r.get("location", "") for r in t["log"]}
    scenes_at: dict[str, list[dict]] = defaultdict(list)
    for sc in t["scene"]:
        scenes_at[location_of_log.get(sc.get("log_token"), "")].append(sc)

    off_count = off_total = no_map_keyframes = 0
    junctions = dict.fromkeys(JUNCTION_KINDS, 0)
    roads = {"straight": 0, "curved": 0}
    carparks = 0
    with_map, without_map = [], []
    for loc in sorted(scenes_at):
        poses = [keyframes[sc["token"]] for sc in scenes_at[loc] if sc.get("token") in keyframes]
        expansion = _read_map_expansion(root, loc)
        if expansion is None:
            without_map.append(loc or "(no location)")
            no_map_keyframes += sum(len(xy) for xy, _ in poses)
            continue
        with_map.append(loc)
        dividers = divider_segments_global(expansion)
        for ego_xy_global, yaw_global in poses:
            off = off_axis_keyframes(ego_xy_global, yaw_global, dividers)
            off_count += int(off.sum())
            off_total += len(off)
        all_ego_xy_global = np.concatenate([xy for xy, _ in poses]) if poses else np.zeros((0, 2))
        counts = map_counts(expansion, all_ego_xy_global)
        for kind, n in counts["junctions"].items():
            junctions[kind] += n
        for kind, n in counts["road_segments"].items():
            roads[kind] += n
        carparks += counts["carpark_areas"]

    names = {sc.get("token"): sc.get("name", sc.get("token")) for sc in t["scene"]}
    turns = {tok: max_heading_change_deg(yaw) for tok, (_, yaw) in keyframes.items() if tok in names}
    n_turning = sum(v >= TURNING_MIN_DEG for v in turns.values())
    return {
        "off_axis_keyframes": {"count": off_count, "total": off_total, "share": _share(off_count, off_total)},
        "keyframes_without_map": no_map_keyframes,
        "turning_scenes": {
            "count": int(n_turning),
            "total": len(turns),
            "share": _share(int(n_turning), len(turns)),
            "max_turn_deg": {names[tok]: round(v, 1) for tok, v in turns.items()},
        },
        "junctions": junctions,
        "road_segments": roads,
        "carpark_areas": carparks,
        "locations_with_map_expansion": with_map,
        "locations_without_map_expansion": without_map,
    }


def format_world(world: dict) -> list[str]:
    """The lines `Report.format` prints for `world_summary`'s dict (indented by two spaces)."""
    no_map = ", ".join(world["locations_without_map_expansion"])
    lines = ["  world (from the tables and the map expansion):"]
    off = world["off_axis_keyframes"]
    if not world["locations_with_map_expansion"]:
        lines.append(f"    {'off-axis keyframes':<20} no map expansion ({no_map})")
    else:
        text = (f"{off['count']} / {off['total']} ({_percent(off['share'])}): dividers within {OFF_AXIS_RADIUS_M:g} m "
                f"more than {OFF_AXIS_ANGLE_DEG:g}° off the ego's axes")
        if world["keyframes_without_map"]:
            text += f"; {world['keyframes_without_map']} keyframes without map expansion ({no_map})"
        lines.append(f"    {'off-axis keyframes':<20} {text}")
    turn = world["turning_scenes"]
    largest = sorted(turn["max_turn_deg"].items(), key=lambda kv: -kv[1])
    per_scene = ", ".join(f"{name} {deg:.1f}°" for name, deg in largest[:PER_SCENE_PRINTED])
    if len(largest) > PER_SCENE_PRINTED:
        per_scene += f", ... ({len(largest) - PER_SCENE_PRINTED} more in --report)"
    lines.append(f"    {'turning scenes':<20} {turn['count']} / {turn['total']} ({_percent(turn['share'])}) turn >= "
                 f"{TURNING_MIN_DEG:g}°" + (f"; largest: {per_scene}" if per_scene else ""))
    if not world["locations_with_map_expansion"]:
        lines.append(f"    {'junctions':<20} no map expansion ({no_map})")
    else:
        suffix = f"; no map expansion for {no_map}" if no_map else ""
        kinds = ", ".join(f"{k} {n}" for k, n in world["junctions"].items() if n) or "none"
        lines.append(f"    {'junctions':<20} {kinds} (within {NEAR_EGO_M:g} m of a keyframe){suffix}")
        rs = world["road_segments"]
        lines.append(f"    {'road segments':<20} straight {rs['straight']}, curved {rs['curved']}; "
                     f"car parks {world['carpark_areas']}")
    lines.append(f"    {'scene tags':<20} see 'scenes per scene tag' above (from the scene descriptions)")
    return lines


# -------------------------------------------------------------------------------------- tables and poses


def _read_tables(root: Path, version: str) -> dict[str, list[dict]]:
    return {name: json.loads((root / version / f"{name}.json").read_text()) for name in WORLD_TABLES}


def _read_map_expansion(root: Path, location: str) -> dict | None:
    """The map expansion JSON of a location, or None when missing or unreadable (`check._check_maps` says why)."""
    path = root / "maps" / "expansion" / f"{location}.json"
    if not location or not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def yaw_from_quaternion(q_wxyz: np.ndarray) -> np.ndarray:
    """Yaw (radians, counter-clockwise about +z) of (N, 4) quaternions [w, x, y, z] (normalised first)."""
    q = np.asarray(q_wxyz, dtype=float).reshape(-1, 4)
    q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
    w, x, y, z = q.T
    return np.arctan2(2.0 * (w * z + x * y), 1.0 - 2.0 * (y * y + z * z))


def _keyframe_poses(t: dict[str, list[dict]]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per scene token: the LIDAR_TOP keyframe ego poses of its samples in sample order (first_sample_token,
    then sample.next) as (ego_xy_global (K, 2) metres, yaw_global (K,) radians). Samples without a LIDAR_TOP
    keyframe pose are skipped; scenes with none are left out."""
    channel_of_sensor = {r.get("token"): r.get("channel") for r in t["sensor"]}
    lidar_calib = {r.get("token") for r in t["calibrated_sensor"] if channel_of_sensor.get(r.get("sensor_token")) == "LIDAR_TOP"}
    poses = {r.get("token"): r for r in t["ego_pose"]}
    pose_of_sample = {}
    for sd in t["sample_data"]:
        if sd.get("is_key_frame") and sd.get("calibrated_sensor_token") in lidar_calib and sd.get("ego_pose_token") in poses:
            pose_of_sample[sd.get("sample_token")] = poses[sd["ego_pose_token"]]
    samples = {r.get("token"): r for r in t["sample"]}
    out = {}
    for sc in t["scene"]:
        tok, seen, chain = sc.get("first_sample_token"), set(), []
        while tok and tok in samples and tok not in seen:
            seen.add(tok)
            if tok in pose_of_sample:
                chain.append(pose_of_sample[tok])
            tok = samples[tok].get("next")
        if not chain:
            continue
        ego_xy_global = np.array([p["translation"][:2] for p in chain], dtype=float)
        yaw_global = yaw_from_quaternion(np.array([p["rotation"] for p in chain], dtype=float))
        out[sc.get("token")] = (ego_xy_global, yaw_global)
    return out


# ------------------------------------------------------------------------------------ off-axis keyframes


@dataclass(frozen=True)
class DividerSegments:
    """Divider segments of one location, sorted by the x of their midpoints (for a per-scene range lookup).

    mid_xy_global: (S, 2) segment midpoints, metres, global frame; direction_deg: (S,) direction of each
    segment, degrees counter-clockwise from +x (its sign along the line does not matter once folded);
    length_m: (S,) segment lengths, metres."""

    mid_xy_global: np.ndarray
    direction_deg: np.ndarray
    length_m: np.ndarray

    @classmethod
    def from_ends(cls, start_global: np.ndarray, end_global: np.ndarray) -> "DividerSegments":
        """From (S, 2) segment start and end points, metres, global frame."""
        start = np.asarray(start_global, dtype=float).reshape(-1, 2)
        end = np.asarray(end_global, dtype=float).reshape(-1, 2)
        mid, d = 0.5 * (start + end), end - start
        order = np.argsort(mid[:, 0], kind="stable")
        return cls(mid[order], np.degrees(np.arctan2(d[order, 1], d[order, 0])), np.hypot(d[order, 0], d[order, 1]))


def divider_segments_global(expansion: dict) -> DividerSegments:
    """Every segment (consecutive node pair of `node_tokens`) of the lines of the road_divider and
    lane_divider records of a map expansion (global frame, metres)."""
    node_xy = {n["token"]: (n["x"], n["y"]) for n in expansion.get("node", [])}
    line_nodes = {ln["token"]: ln.get("node_tokens", []) for ln in expansion.get("line", [])}
    starts, ends = [], []
    for layer in DIVIDER_LAYERS:
        for rec in expansion.get(layer, []):
            pts = [node_xy[n] for n in line_nodes.get(rec.get("line_token"), []) if n in node_xy]
            if len(pts) >= 2:
                starts.extend(pts[:-1])
                ends.extend(pts[1:])
    return DividerSegments.from_ends(np.asarray(starts, dtype=float), np.asarray(ends, dtype=float))


def off_axis_keyframes(ego_xy_global: np.ndarray, yaw_global: np.ndarray, dividers: DividerSegments,
                       chunk: int = 4_000_000) -> np.ndarray:
    """Which keyframes see mostly off-axis dividers.

    ego_xy_global: (K, 2) ego positions, metres; yaw_global: (K,) ego headings, radians; dividers: the
    location's divider segments (`divider_segments_global`), global frame.
    A segment belongs to a keyframe when its midpoint is within `OFF_AXIS_RADIUS_M` (2D) of the ego; its
    direction relative to the ego heading is folded into [0, 45] degrees (modulo 90, then min(a, 90 - a)) and
    it is off-axis above `OFF_AXIS_ANGLE_DEG`. Returns (K,) bool: at least `OFF_AXIS_MIN_SHARE` of the
    keyframe's divider length is off-axis (False with no divider in range).
    The segments are prefiltered to the keyframes' bounding box grown by the radius (a binary search on the
    sorted midpoint x, then y; the callers pass one scene at a time), then processed in chunks of at most
    `chunk` keyframe-segment pairs.
    """
    ego = np.asarray(ego_xy_global, dtype=float).reshape(-1, 2)
    out = np.zeros(len(ego), dtype=bool)
    if len(ego) == 0 or len(dividers.length_m) == 0:
        return out
    lo, hi = ego.min(0) - OFF_AXIS_RADIUS_M, ego.max(0) + OFF_AXIS_RADIUS_M
    i0 = int(np.searchsorted(dividers.mid_xy_global[:, 0], lo[0], side="left"))
    i1 = int(np.searchsorted(dividers.mid_xy_global[:, 0], hi[0], side="right"))
    mid = dividers.mid_xy_global[i0:i1]
    keep = (mid[:, 1] >= lo[1]) & (mid[:, 1] <= hi[1])
    if not keep.any():
        return out
    mid, direction_deg, length = mid[keep], dividers.direction_deg[i0:i1][keep], dividers.length_m[i0:i1][keep]
    yaw_deg = np.degrees(np.asarray(yaw_global, dtype=float).reshape(-1))
    step = max(1, chunk // len(mid))
    for i in range(0, len(ego), step):
        near = np.hypot(mid[None, :, 0] - ego[i:i + step, None, 0], mid[None, :, 1] - ego[i:i + step, None, 1]) <= OFF_AXIS_RADIUS_M  # (k, S)
        rel = np.mod(direction_deg[None] - yaw_deg[i:i + step, None], 90.0)
        folded = np.minimum(rel, 90.0 - rel)
        total = (near * length).sum(1)
        off = (near * (folded > OFF_AXIS_ANGLE_DEG) * length).sum(1)
        out[i:i + step] = (total > 0) & (off >= OFF_AXIS_MIN_SHARE * total - 1e-9 * total)
    return out


# --------------------------------------------------------------------------------------- turning scenes


def max_heading_change_deg(yaw_global: np.ndarray) -> float:
    """Largest absolute change of the (unwrapped) heading from the first keyframe, degrees.

    yaw_global: (K,) ego headings of one scene's keyframes in sample order, radians."""
    yaw = np.unwrap(np.asarray(yaw_global, dtype=float))
    return float(np.degrees(np.abs(yaw - yaw[0]).max())) if len(yaw) else 0.0


# ---------------------------------------------------------------------------------- junctions and roads


def _polygons(expansion: dict, layer: str) -> tuple[list[dict], list]:
    """The records of a polygon layer and their shapely polygons (global frame, metres; holes included).
    Records whose polygon has fewer than 3 nodes are dropped."""
    node_xy = {n["token"]: (n["x"], n["y"]) for n in expansion.get("node", [])}
    polys = {p["token"]: p for p in expansion.get("polygon", [])}
    recs, geoms = [], []
    for rec in expansion.get(layer, []):
        p = polys.get(rec.get("polygon_token"))
        if p is None:
            continue
        shell = [node_xy[n] for n in p.get("exterior_node_tokens", []) if n in node_xy]
        holes = []
        for h in p.get("holes") or []:
            tokens = h.get("node_tokens", []) if isinstance(h, dict) else h
            ring = [node_xy[n] for n in tokens if n in node_xy]
            if len(ring) >= 3:
                holes.append(ring)
        if len(shell) < 3:
            continue
        g = Polygon(shell, holes)
        if not g.is_valid:
            g = shapely.make_valid(g)
        recs.append(rec)
        geoms.append(g)
    return recs, geoms


def _pairs_within(a_geoms: list, b_geoms: list, radius: float) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs (i, j) with distance(a_geoms[i], b_geoms[j]) <= radius: an STRtree over b queried with
    a's bounding boxes grown by the radius, then the exact distance of the candidates."""
    if not a_geoms or not b_geoms:
        return np.zeros(0, dtype=int), np.zeros(0, dtype=int)
    a = np.asarray(a_geoms, dtype=object)
    b = np.asarray(b_geoms, dtype=object)
    bounds = shapely.bounds(a)
    boxes = shapely.box(bounds[:, 0] - radius, bounds[:, 1] - radius, bounds[:, 2] + radius, bounds[:, 3] + radius)
    i, j = shapely.STRtree(b).query(boxes)
    keep = shapely.distance(a[i], b[j]) <= radius
    return i[keep], j[keep]


def classify_junction(junction, arms: list) -> str:
    """Kind of one junction polygon (global frame, metres) given the polygons of its arms (`JUNCTION_KINDS`).

    roundabout: the polygon has a hole; else by the number of arms: 4 X, 3 T (two arm directions within
    `T_OPPOSITE_TOL_DEG` of opposite) or Y, 2 bend, >= 5 multi, 0-1 other. Arm direction: from the junction's
    centroid to the centroid of the arm inside a disc of `ARM_DISC_M` around it (to the arm's nearest point
    when the arm does not reach into the disc)."""
    parts = junction.geoms if hasattr(junction, "geoms") else [junction]  # make_valid may give a collection
    if any(p.geom_type == "Polygon" and len(p.interiors) for p in parts):
        return "roundabout"
    n = len(arms)
    if n == 4:
        return "X"
    if n == 2:
        return "bend"
    if n >= 5:
        return "multi"
    if n != 3:
        return "other"
    c = junction.centroid
    disc = c.buffer(ARM_DISC_M, quad_segs=32)
    directions_deg = []
    for arm in arms:
        part = arm.intersection(disc)
        target = part.centroid if not part.is_empty and part.area > 0 else nearest_points(arm, c)[0]
        directions_deg.append(math.degrees(math.atan2(target.y - c.y, target.x - c.x)))
    for i in range(3):
        for j in range(i + 1, 3):
            diff = abs(directions_deg[i] - directions_deg[j]) % 360.0
            if min(diff, 360.0 - diff) >= 180.0 - T_OPPOSITE_TOL_DEG:
                return "T"
    return "Y"


def is_curved(road) -> bool:
    """Whether a road segment polygon (global frame, metres) is curved: it fills less than `CURVED_MAX_FILL` of
    its minimum rotated rectangle and that rectangle's long side exceeds `CURVED_MIN_LENGTH_M`."""
    rect = road.minimum_rotated_rectangle
    if rect.area <= 0:
        return False
    xy = np.asarray(rect.exterior.coords)[:4]
    length = max(np.hypot(*(xy[1] - xy[0])), np.hypot(*(xy[2] - xy[1])))
    return road.area / rect.area < CURVED_MAX_FILL and length > CURVED_MIN_LENGTH_M


def map_counts(expansion: dict, ego_xy_global: np.ndarray) -> dict:
    """Junctions by kind, road segments straight/curved and car parks of one location's map expansion, each
    record counted once when within `NEAR_EGO_M` of at least one of the keyframe ego positions
    ego_xy_global (N, 2), metres, global frame. Arms are searched among all non-intersection road segments of
    the map (near the keyframes or not)."""
    points = list(shapely.points(np.asarray(ego_xy_global, dtype=float).reshape(-1, 2)))
    recs, geoms = _polygons(expansion, "road_segment")
    junction_idx = [k for k, r in enumerate(recs) if r.get("is_intersection")]
    road_idx = [k for k, r in enumerate(recs) if not r.get("is_intersection")]
    near = set(_pairs_within(geoms, points, NEAR_EGO_M)[0].tolist())

    junctions = dict.fromkeys(JUNCTION_KINDS, 0)
    near_junctions = [k for k in junction_idx if k in near]
    arms_of: dict[int, list] = defaultdict(list)
    ji, ri = _pairs_within([geoms[k] for k in near_junctions], [geoms[k] for k in road_idx], ARM_GAP_M)
    for a, b in zip(ji.tolist(), ri.tolist()):
        arms_of[a].append(geoms[road_idx[b]])
    for a, k in enumerate(near_junctions):
        junctions[classify_junction(geoms[k], arms_of[a])] += 1

    roads = {"straight": 0, "curved": 0}
    for k in road_idx:
        if k in near:
            roads["curved" if is_curved(geoms[k]) else "straight"] += 1

    _, parks = _polygons(expansion, "carpark_area")
    carparks = len(set(_pairs_within(parks, points, NEAR_EGO_M)[0].tolist()))
    return {"junctions": junctions, "road_segments": roads, "carpark_areas": carparks}


def _share(count: int, total: int) -> float | None:
    return round(count / total, 4) if total else None


def _percent(share: float | None) -> str:
    return "-" if share is None else f"{100 * share:.1f}%"
