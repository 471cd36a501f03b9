"""`world_summary` on a dataroot written by hand, with geometry whose expected figures follow in closed form.

Location singapore-onenorth has a map expansion; boston-seaport has none. Global frame, metres, yaw
counter-clockwise from +x.

scene-0001 (onenorth), 5 keyframes 100 m apart along x, each with its own dividers (`DIVIDERS`):
    kf0 (0, 0) yaw 0:     6.5 m along x (a 3-node lane divider) + 3.5 m at 30°    -> 35% off: off-axis
    kf1 (100, 0) yaw 0:   7.5 m along -x + 2.5 m at 30° (+ a 30° segment whose end is within 30 m but whose
                          midpoint is not)                                        -> 25% off: not off-axis
    kf2 (200, 0) yaw 0:   only a 30° divider with its midpoint 31 m away          -> no divider: not off-axis
    kf3 (300, 0) yaw 90°: 10 m along x (90° off the heading folds to 0°)          -> not off-axis
    kf4 (400, 0) yaw 90°: 10 m at 115° (25° off)                                  -> off-axis
    heading change 0 -> 90°: 90°.
scene-0002 (onenorth), yaws 0, 50, -20 (listed out of order in sample.json): 50°, at the X, T, Y junctions.
scene-0003 (boston, no map), yaws 170, -170, -150: 40° unwrapped (340° without unwrapping).
scene-0004 (onenorth), yaws 0, 20, -25, -10: 25° (not turning), at the roundabout, bend, multi and "other"
    junctions.
So off-axis 2 of 5 + 3 + 4 = 12 keyframes (3 without map), turning 3 of 4 scenes.

Junctions (`JUNCTIONS`): a 32-gon of radius 10 (15 with a 5 m hole for the roundabout) with rectangular arms
10 m wide from 9.5 m to 50 m out at the given directions, centred on an ego position: X, T (0°, 180°, 70°), Y (0°,
120°, 235°), roundabout (4 arms), bend (0°, 90°), multi (5 arms), other (no arm), and a bend far from every
ego (not counted, nor its arms). Road segments near an ego: the 4 + 3 + 3 + 4 + 2 + 5 arms and a small
triangle are straight (the triangle fills half its rectangle but is shorter than 15 m); a quarter annulus
(radii 30 to 40) is curved; a far rectangle does not count. Car parks: one near, one far.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from perception.data.check import Report
from perception.data.world_summary import (
    DividerSegments,
    classify_junction,
    is_curved,
    max_heading_change_deg,
    off_axis_keyframes,
    world_summary,
)

MAP_LOC, NO_MAP_LOC = "singapore-onenorth", "boston-seaport"


def _yaw_quat(yaw_deg: float) -> list[float]:
    h = math.radians(yaw_deg) / 2
    return [math.cos(h), 0.0, 0.0, math.sin(h)]


def _seg(centre, length, angle_deg):
    """Segment of `length` through `centre` at `angle_deg`: [(x0, y0), (x1, y1)]."""
    c, u = np.asarray(centre, float), np.array([math.cos(math.radians(angle_deg)), math.sin(math.radians(angle_deg))])
    return [tuple(c - u * length / 2), tuple(c + u * length / 2)]


# (layer, node list) per divider line.
DIVIDERS = [
    # kf0 at (0, 0): 6.5 m along x as a 3-node lane divider, 3.5 m at 30 degrees
    ("lane_divider", [(-3.0, 5.0), (1.0, 5.0), (3.5, 5.0)]),
    ("road_divider", _seg((0, -5), 3.5, 30)),
    # kf1 at (100, 0): 7.5 m along -x, 2.5 m at 30 degrees; a 30 degree segment reaching in from outside
    ("road_divider", [(104.0, 4.0), (96.5, 4.0)]),
    ("lane_divider", _seg((100, -4), 2.5, 30)),
    ("lane_divider", [(100.0 + 28.0, 0.0), (100.0 + 28.0 + 20 * math.cos(math.radians(30)), 20 * math.sin(math.radians(30)))]),
    # kf2 at (200, 0): a 30 degree divider with its midpoint 31 m away
    ("road_divider", _seg((200, 31), 4.0, 30)),
    # kf3 at (300, 0), heading +y: 10 m along x
    ("road_divider", _seg((300, 3), 10.0, 0)),
    # kf4 at (400, 0), heading +y: 10 m at 115 degrees
    ("lane_divider", _seg((400, 3), 10.0, 115)),
]

# (centre, kind, arm directions in degrees); the last one is far from every ego.
JUNCTIONS = [
    ((1000.0, 0.0), "X", (0, 90, 180, 270)),
    ((1300.0, 0.0), "T", (0, 180, 70)),
    ((1600.0, 0.0), "Y", (0, 120, 235)),
    ((1900.0, 0.0), "roundabout", (0, 90, 180, 270)),
    ((2200.0, 0.0), "bend", (0, 90)),
    ((2500.0, 0.0), "multi", (0, 72, 144, 216, 288)),
    ((2800.0, 0.0), "other", ()),
    ((5000.0, 5000.0), "bend", (0, 90)),
]

# scene name -> (location, [(ego_xy_global, yaw_deg)] in sample order)
SCENES = {
    "scene-0001": (MAP_LOC, [((0, 0), 0), ((100, 0), 0), ((200, 0), 0), ((300, 0), 90), ((400, 0), 90)]),
    "scene-0002": (MAP_LOC, [((1000, 0), 0), ((1300, 0), 50), ((1600, 0), -20)]),
    "scene-0003": (NO_MAP_LOC, [((0, 0), 170), ((5, 0), -170), ((10, 0), -150)]),
    "scene-0004": (MAP_LOC, [((1900, 0), 0), ((2200, 0), 20), ((2500, 0), -25), ((2800, 0), -10)]),
}


def _ngon(centre, radius, n=32):
    a = np.arange(n) * 2 * math.pi / n
    return [(centre[0] + radius * math.cos(t), centre[1] + radius * math.sin(t)) for t in a]


def _arm(centre, angle_deg, inner=9.5, outer=50.0, half_width=5.0):
    u = np.array([math.cos(math.radians(angle_deg)), math.sin(math.radians(angle_deg))])
    v = np.array([-u[1], u[0]])
    c = np.asarray(centre, float)
    return [tuple(c + u * r + v * s) for r, s in ((inner, -half_width), (outer, -half_width), (outer, half_width), (inner, half_width))]


def _quarter_annulus(centre, r0, r1, n=16):
    a = np.linspace(0, math.pi / 2, n)
    outer = [(centre[0] + r1 * math.cos(t), centre[1] + r1 * math.sin(t)) for t in a]
    inner = [(centre[0] + r0 * math.cos(t), centre[1] + r0 * math.sin(t)) for t in a[::-1]]
    return outer + inner


class _MapWriter:
    def __init__(self):
        self.layers = {k: [] for k in ("node", "line", "polygon", "road_segment", "carpark_area", "road_divider", "lane_divider")}
        self.n = 0

    def tok(self) -> str:
        self.n += 1
        return f"m{self.n:05d}"

    def nodes(self, pts) -> list[str]:
        out = []
        for x, y in pts:
            out.append(self.tok())
            self.layers["node"].append({"token": out[-1], "x": float(x), "y": float(y)})
        return out

    def polygon(self, pts, holes=()) -> str:
        t = self.tok()
        self.layers["polygon"].append({"token": t, "exterior_node_tokens": self.nodes(pts),
                                       "holes": [{"node_tokens": self.nodes(h)} for h in holes]})
        return t

    def line(self, pts) -> str:
        t = self.tok()
        self.layers["line"].append({"token": t, "node_tokens": self.nodes(pts)})
        return t

    def add(self, layer: str, **record) -> None:
        self.layers[layer].append({"token": self.tok(), **record})


def _write_map(path) -> None:
    mw = _MapWriter()
    for layer, pts in DIVIDERS:
        mw.add(layer, line_token=mw.line(pts))
    for centre, kind, arms in JUNCTIONS:
        if kind == "roundabout":
            poly = mw.polygon(_ngon(centre, 15.0), holes=[_ngon(centre, 5.0)])
            arm_polys = [_arm(centre, a, inner=14.5) for a in arms]
        else:
            poly = mw.polygon(_ngon(centre, 10.0))
            arm_polys = [_arm(centre, a) for a in arms]
        mw.add("road_segment", polygon_token=poly, is_intersection=True, drivable_area_token="")
        for p in arm_polys:
            mw.add("road_segment", polygon_token=mw.polygon(p), is_intersection=False, drivable_area_token="")
    # near the "other" junction's ego at (2800, 0): a quarter annulus (curved) and a small triangle (straight)
    mw.add("road_segment", polygon_token=mw.polygon(_quarter_annulus((2800.0, 0.0), 30.0, 40.0)), is_intersection=False)
    mw.add("road_segment", polygon_token=mw.polygon([(2800.0, -30.0), (2808.0, -30.0), (2800.0, -24.0)]), is_intersection=False)
    # far from every ego: a straight road segment and a car park; a car park near the ego at (0, 0)
    mw.add("road_segment", polygon_token=mw.polygon([(5000, 4000), (5040, 4000), (5040, 4010), (5000, 4010)]), is_intersection=False)
    mw.add("carpark_area", polygon_token=mw.polygon([(3000, 3000), (3010, 3000), (3010, 3010), (3000, 3010)]))
    mw.add("carpark_area", polygon_token=mw.polygon([(-20, -50), (20, -50), (20, -40), (-20, -40)]))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"version": "1.3", "canvas_edge": [6000.0, 6000.0], **mw.layers}))


def _write_tables(table_dir) -> None:
    t = {k: [] for k in ("scene", "log", "sample", "sample_data", "calibrated_sensor", "sensor", "ego_pose")}
    t["sensor"] = [{"token": "sen_lidar", "channel": "LIDAR_TOP", "modality": "lidar"},
                   {"token": "sen_cam", "channel": "CAM_FRONT", "modality": "camera"}]
    t["calibrated_sensor"] = [{"token": "cs_lidar", "sensor_token": "sen_lidar"}, {"token": "cs_cam", "sensor_token": "sen_cam"}]
    t["log"] = [{"token": "log_map", "location": MAP_LOC}, {"token": "log_nomap", "location": NO_MAP_LOC}]
    ts = 1_000_000
    for s_i, (name, (loc, poses)) in enumerate(SCENES.items()):
        tokens = [f"s{s_i}_{k}" for k in range(len(poses))]
        scene_samples = []
        for k, ((x, y), yaw) in enumerate(poses):
            ts += 500_000
            scene_samples.append({"token": tokens[k], "scene_token": f"sc{s_i}", "timestamp": ts,
                                  "prev": tokens[k - 1] if k else "", "next": tokens[k + 1] if k + 1 < len(poses) else ""})
            # the LIDAR_TOP keyframe's pose is the one that counts; a camera keyframe and a LiDAR sweep with
            # other poses must be ignored
            for kind, cs, key, dyaw in (("lidar", "cs_lidar", True, 0), ("cam", "cs_cam", True, 45), ("sweep", "cs_lidar", False, 60)):
                ep = f"ep{s_i}_{k}_{kind}"
                t["ego_pose"].append({"token": ep, "translation": [x + (0 if kind == "lidar" else 7), y, 0.0],
                                      "rotation": _yaw_quat(yaw + dyaw), "timestamp": ts})
                t["sample_data"].append({"token": f"sd{s_i}_{k}_{kind}", "sample_token": tokens[k], "ego_pose_token": ep,
                                         "calibrated_sensor_token": cs, "is_key_frame": key, "timestamp": ts})
        t["sample"].extend(scene_samples[::-1] if name == "scene-0002" else scene_samples)  # table order is not sample order
        t["scene"].append({"token": f"sc{s_i}", "name": name, "log_token": "log_map" if loc == MAP_LOC else "log_nomap",
                           "first_sample_token": tokens[0], "last_sample_token": tokens[-1], "nbr_samples": len(poses)})
    table_dir.mkdir(parents=True)
    for name, rows in t.items():
        (table_dir / f"{name}.json").write_text(json.dumps(rows))


@pytest.fixture()
def hand_root(tmp_path):
    root = tmp_path / "nuscenes"
    _write_tables(root / "v1.0-mini")
    _write_map(root / "maps" / "expansion" / f"{MAP_LOC}.json")
    return root


def test_world_summary_closed_form(hand_root):
    w = world_summary(hand_root, "v1.0-mini")
    assert w["off_axis_keyframes"] == {"count": 2, "total": 12, "share": round(2 / 12, 4)}
    assert w["keyframes_without_map"] == 3
    assert w["turning_scenes"] == {
        "count": 3, "total": 4, "share": 0.75,
        "max_turn_deg": {"scene-0001": 90.0, "scene-0002": 50.0, "scene-0003": 40.0, "scene-0004": 25.0},
    }
    assert w["junctions"] == {"X": 1, "T": 1, "Y": 1, "bend": 1, "multi": 1, "roundabout": 1, "other": 1}
    assert w["road_segments"] == {"straight": 4 + 3 + 3 + 4 + 2 + 5 + 1, "curved": 1}
    assert w["carpark_areas"] == 1
    assert w["locations_with_map_expansion"] == [MAP_LOC]
    assert w["locations_without_map_expansion"] == [NO_MAP_LOC]
    json.dumps(w)  # goes into the --report JSON


def test_off_axis_threshold_both_sides():
    """Share of off-axis divider length 29% / 30% / 31% and segments 9° / 11° off the heading, one keyframe each
    (100 m apart, so each sees only its own dividers)."""
    ego_xy_global = np.array([[0.0, 0.0], [100.0, 0.0], [200.0, 0.0], [300.0, 0.0], [400.0, 0.0]])
    yaw_global = np.radians([0.0, 0.0, 0.0, 20.0, 20.0])
    segs = [
        _seg((0, 5), 7.1, 0), _seg((0, -5), 2.9, 30),  # 29% off -> not off-axis
        _seg((100, 5), 7.0, 180), _seg((100, -5), 3.0, 30),  # exactly 30% -> off-axis ("at least")
        _seg((200, 5), 6.9, 90), _seg((200, -5), 3.1, -30),  # 31% -> off-axis
        _seg((300, 5), 10.0, 20 + 9),  # 9° off -> not off-axis
        _seg((400, 5), 10.0, 20 - 11 + 90),  # 11° off the lateral axis -> off-axis
    ]
    dividers = DividerSegments.from_ends(np.array([s[0] for s in segs]), np.array([s[1] for s in segs]))
    off = off_axis_keyframes(ego_xy_global, yaw_global, dividers)
    assert off.tolist() == [False, True, True, False, True]
    # a keyframe without dividers in range, and a location without dividers at all
    assert off_axis_keyframes(np.array([[1000.0, 0.0]]), np.zeros(1), dividers).tolist() == [False]
    none = DividerSegments.from_ends(np.zeros((0, 2)), np.zeros((0, 2)))
    assert off_axis_keyframes(ego_xy_global, yaw_global, none).tolist() == [False] * 5


def test_without_any_map_expansion(hand_root):
    (hand_root / "maps" / "expansion" / f"{MAP_LOC}.json").unlink()
    w = world_summary(hand_root, "v1.0-mini")
    assert w["off_axis_keyframes"] == {"count": 0, "total": 0, "share": None}
    assert w["keyframes_without_map"] == 15
    assert w["locations_without_map_expansion"] == [NO_MAP_LOC, MAP_LOC]
    assert w["turning_scenes"]["count"] == 3  # the tables alone still give the turns
    assert sum(w["junctions"].values()) == 0
    text = Report(hand_root, "v1.0-mini", summary={"world": w}).format()
    assert f"off-axis keyframes   no map expansion ({NO_MAP_LOC}, {MAP_LOC})" in text
    assert f"junctions            no map expansion ({NO_MAP_LOC}, {MAP_LOC})" in text
    assert "turning scenes       3 / 4 (75.0%)" in text


def test_report_format_world_block(hand_root):
    report = Report(hand_root, "v1.0-mini", summary={"world": world_summary(hand_root, "v1.0-mini")})
    text = report.format()
    assert "  world (from the tables and the map expansion):" in text
    assert ("    off-axis keyframes   2 / 12 (16.7%): dividers within 30 m more than 10° off the ego's axes; "
            f"3 keyframes without map expansion ({NO_MAP_LOC})") in text
    assert ("    turning scenes       3 / 4 (75.0%) turn >= 30°; largest: scene-0001 90.0°, scene-0002 50.0°, "
            "scene-0003 40.0°, scene-0004 25.0°") in text
    assert (f"    junctions            X 1, T 1, Y 1, bend 1, multi 1, roundabout 1, other 1 (within 60 m of a keyframe); "
            f"no map expansion for {NO_MAP_LOC}") in text
    assert "    road segments        straight 22, curved 1; car parks 1" in text
    assert "scenes per scene tag" in text


def test_heading_change_unwraps():
    yaw = np.radians([170.0, -170.0, -150.0])
    assert max_heading_change_deg(yaw) == pytest.approx(40.0)
    assert max_heading_change_deg(np.radians([0.0, 50.0, -20.0])) == pytest.approx(50.0)
    assert max_heading_change_deg(np.radians([-179.0, 179.0, 90.0])) == pytest.approx(91.0)


def test_classify_junction_kinds():
    from shapely.geometry import Polygon

    c = (0.0, 0.0)
    j = Polygon(_ngon(c, 10.0))
    arms = lambda *angles: [Polygon(_arm(c, a)) for a in angles]  # noqa: E731
    assert classify_junction(j, arms(0, 90, 180, 270)) == "X"
    assert classify_junction(j, arms(0, 180, 70)) == "T"
    assert classify_junction(j, arms(0, 154, 270)) == "Y"  # 154° apart: more than 25° off opposite
    assert classify_junction(j, arms(0, 156, 270)) == "T"
    assert classify_junction(j, arms(0, 120, 235)) == "Y"
    assert classify_junction(j, arms(10, 100)) == "bend"
    assert classify_junction(j, arms(*range(0, 360, 60))) == "multi"
    assert classify_junction(j, arms(30)) == "other"
    assert classify_junction(Polygon(_ngon(c, 15.0), [_ngon(c, 5.0)]), arms(0, 180, 70)) == "roundabout"


def test_is_curved():
    from shapely.geometry import Polygon

    assert is_curved(Polygon(_quarter_annulus((0.0, 0.0), 30.0, 40.0)))
    assert not is_curved(Polygon([(0, 0), (40, 0), (40, 10), (0, 10)]))
    assert not is_curved(Polygon([(0, 0), (8, 0), (0, 6)]))  # fills half its rectangle but only 8 m long
    assert not is_curved(Polygon(_quarter_annulus((0.0, 0.0), 3.0, 4.0)))  # bent, but 4 m long
