"""The procedural synthetic world: road grammar, traffic without collisions, sensors that agree with the map on
a curve and at an angled junction (the devkit's map API as the oracle), and the dataset-level guarantees."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from nuscenes.map_expansion.map_api import NuScenesMap
from nuscenes.nuscenes import NuScenes
from nuscenes.utils.data_classes import LidarPointCloud
from nuscenes.utils.geometry_utils import view_points
from pyquaternion import Quaternion
from shapely.geometry import Polygon

from perception.data.synth import roads as rd
from perception.data.synth.camera import CameraModel, render
from perception.data.synth.generate import GENERATOR_VERSION, SynthConfig, _placement, generate, generator_version, scene_names
from perception.data.synth.rig import build_rig
from perception.data.synth.world import DETECTION_CLASS, WorldBoxes, build_world, lookup_prefix
from perception.data.world_summary import world_summary
from perception.errors import PerceptionError

ORIGIN = np.array([300.0, 300.0])


@pytest.fixture(scope="module")
def curve_and_junction(tmp_path_factory):
    """Two scenes whose ego drives through a curve and through a junction, 4 keyframes each."""
    root = tmp_path_factory.mktemp("world") / "nuscenes"
    cfg = SynthConfig(num_scenes=2, samples_per_scene=4, image_width=480, image_height=270, lidar_sweeps=0,
                      radar_sweeps=0, events=("curve", "junction"), seed=3)
    generate(root, cfg, workers=1, progress=False)
    return root, NuScenes("v1.0-mini", str(root), verbose=False)


def _pose(nusc, rec):
    return nusc.get("calibrated_sensor", rec["calibrated_sensor_token"]), nusc.get("ego_pose", rec["ego_pose_token"])


def _to_global(points: np.ndarray, cs: dict, pose: dict) -> np.ndarray:
    p = Quaternion(cs["rotation"]).rotation_matrix @ points + np.array(cs["translation"])[:, None]
    return Quaternion(pose["rotation"]).rotation_matrix @ p + np.array(pose["translation"])[:, None]


def _map_classes(nmap: NuScenesMap, centre: np.ndarray, xy: np.ndarray) -> dict[str, np.ndarray]:
    """Per global point (N, 2): whether the devkit's map puts it on each layer (0.1 m raster, 100 m patch)."""
    layers = ["drivable_area", "walkway", "ped_crossing", "stop_line", "carpark_area", "road_divider", "lane_divider"]
    masks = nmap.get_map_mask((centre[0], centre[1], 100.0, 100.0), 0.0, layers, canvas_size=(1000, 1000))
    col = np.floor((xy[:, 0] - (centre[0] - 50.0)) / 0.1).astype(int)
    row = np.floor((xy[:, 1] - (centre[1] - 50.0)) / 0.1).astype(int)
    ok = (col >= 0) & (col < 1000) & (row >= 0) & (row < 1000)
    out = {}
    for name, m in zip(layers, masks):
        v = np.zeros(len(xy), bool)
        v[ok] = m[row[ok], col[ok]] > 0
        out[name] = v
    painted = out["ped_crossing"] | out["stop_line"] | out["carpark_area"] | out["road_divider"] | out["lane_divider"]
    return {"road": out["drivable_area"] & ~painted, "walkway": out["walkway"] & ~out["drivable_area"]}


def test_sensors_agree_with_the_map_on_a_curve_and_at_an_angled_junction(curve_and_junction):
    root, nusc = curve_and_junction
    summary = world_summary(root, "v1.0-mini")
    assert summary["off_axis_keyframes"]["count"] >= 1  # the dividers near the drive leave the ego's axes
    worlds = _worlds(SynthConfig(num_scenes=2, samples_per_scene=4, events=("curve", "junction"), seed=3))
    rig = build_rig(480, 270)
    # The junction the ego drives through has an arm more than 10 degrees off a right angle to another.
    junction_world = next(w for w in worlds.values() if w.event == "junction")
    arms = min(junction_world.junction_arms, key=lambda a: np.linalg.norm(junction_world.ego_xy - a[0], axis=1).min())[1:]
    angles = np.degrees(np.arccos(np.clip(arms @ arms.T, -1, 1)))
    folded = np.minimum(angles % 90.0, 90.0 - angles % 90.0)
    assert folded.max() > 10.0, angles
    maps = {}
    for scene in nusc.scene:
        loc = nusc.get("log", scene["log_token"])["location"]
        nmap = maps.setdefault(loc, NuScenesMap(dataroot=str(root), map_name=loc))
        sample = nusc.get("sample", scene["first_sample_token"])
        # LiDAR: ground returns on the road are dark, on the walkway bright (intensity 5 vs 22 before range loss).
        sd = nusc.get("sample_data", sample["data"]["LIDAR_TOP"])
        pc = LidarPointCloud.from_file(str(root / sd["filename"]))
        cs, pose = _pose(nusc, sd)
        g = _to_global(pc.points[:3], cs, pose)
        rng_m = np.linalg.norm(g[:2] - np.array(pose["translation"][:2])[:, None], axis=0)
        ground = (np.abs(g[2]) < 0.08) & (rng_m < 35.0)
        cls = _map_classes(nmap, np.array(pose["translation"][:2]), g[:2, ground].T)
        inten = pc.points[3, ground]
        assert cls["road"].sum() > 200 and cls["walkway"].sum() > 50, (scene["description"], cls["road"].sum(), cls["walkway"].sum())
        assert np.mean(inten[cls["road"]] < 10.0) > 0.93, scene["description"]
        assert np.mean(inten[cls["walkway"]] > 10.0) > 0.85, scene["description"]
        # Cameras: the map's walkway projects onto brighter pixels than its road, in every camera that sees both.
        # The scene's world is rendered again without its road users (which hide the ground behind them) through
        # the calibration and pose the tables hold.
        world = worlds[scene["name"]]
        statics = world.boxes_at(0.0)
        n = statics.num_agents
        statics = WorldBoxes(statics.centers[n:], statics.sizes[n:], statics.yaws[n:], statics.colours[n:], statics.reflectivity[n:], 0)
        seen = 0
        for ch in ("CAM_FRONT", "CAM_FRONT_LEFT", "CAM_FRONT_RIGHT", "CAM_BACK"):
            sd = nusc.get("sample_data", sample["data"][ch])
            cs, pose = _pose(nusc, sd)
            ego2global = np.eye(4)
            ego2global[:3, :3] = Quaternion(pose["rotation"]).rotation_matrix
            ego2global[:3, 3] = pose["translation"]
            model = CameraModel.build(rig[ch], seed=0)
            img = render(model, world, statics, ego2global, [], np.random.default_rng(0)).mean(-1)
            c = np.array(pose["translation"][:2])
            gx, gy = np.meshgrid(np.arange(-30, 30, 0.5), np.arange(-30, 30, 0.5))
            xy = np.stack([gx.ravel() + c[0], gy.ravel() + c[1]], 1)
            cls = _map_classes(nmap, c, xy)
            p = np.concatenate([xy.T, np.zeros((1, len(xy)))])
            p = Quaternion(pose["rotation"]).rotation_matrix.T @ (p - np.array(pose["translation"])[:, None])
            p = Quaternion(cs["rotation"]).rotation_matrix.T @ (p - np.array(cs["translation"])[:, None])
            front = p[2] > 2.0
            uv = view_points(p, np.array(cs["camera_intrinsic"]), normalize=True)[:2]
            inside = front & (uv[0] >= 0) & (uv[0] < img.shape[1]) & (uv[1] >= 0) & (uv[1] < img.shape[0])
            vals = {}
            for name in ("road", "walkway"):
                m = inside & cls[name]
                if m.sum() >= 20:
                    vals[name] = np.median(img[uv[1, m].astype(int), uv[0, m].astype(int)])
            if len(vals) == 2:
                seen += 1
                assert vals["walkway"] > 1.3 * vals["road"], (scene["description"], ch, vals)
        assert seen >= 1


def _worlds(cfg: SynthConfig) -> dict:
    """The generator's worlds of a set by scene name, drawn as `generate` draws them."""
    out, per_split = {}, {"train": 0, "val": 0}
    places = _placement(cfg.num_scenes)
    for i, (name, split) in enumerate(scene_names(cfg.version, cfg.num_scenes)):
        out[name] = build_world(cfg.seed, per_split[split], places[i][1], (cfg.samples_per_scene - 1) * 0.5,
                                stream=int(split == "val"), event=cfg.events[i])
        per_split[split] += 1
    return out


def test_collision_free_traffic_and_the_grammar():
    """Boxes never overlap at any keyframe (Shapely polygons as the second implementation of the collision
    filter), curves keep to 25-300 m radii, junction arms keep 40 degrees apart, every road has 1-3 lanes."""
    for seed, event in ((0, "junction"), (1, "curve"), (2, "straight")):
        w = build_world(seed, 0, ORIGIN, 9.5, event=event)
        for t in np.arange(0.0, 9.6, 0.5):
            b = w.boxes_at(float(t))
            polys = []
            for k in range(b.num_agents):
                wd, ln, _ = b.sizes[k]
                c, s = math.cos(b.yaws[k]), math.sin(b.yaws[k])
                corners = np.array([[ln / 2, wd / 2], [ln / 2, -wd / 2], [-ln / 2, -wd / 2], [-ln / 2, wd / 2]]) @ np.array([[c, s], [-s, c]]) + b.centers[k, :2]
                polys.append(Polygon(corners))
            groups = [a.group for a in w.agents]
            for i in range(len(polys)):
                for j in range(i + 1, len(polys)):
                    if groups[i] >= 0 and groups[i] == groups[j]:
                        continue
                    assert polys[i].intersection(polys[j]).area < 1e-3, (seed, t, w.agents[i].category, w.agents[j].category)
        assert w.junction_kinds or event != "junction"
    rng = np.random.default_rng(5)
    net = rd.build_network(rng, "curve", 500.0, 150.0)
    for r in net.roads:
        assert 1 <= r.lanes.n_fwd <= 3 and 0 <= r.lanes.n_bwd <= 3
        kappa = np.abs(np.gradient(r.line.heading, r.line.s))[2:-2]
        assert kappa.max() < 1 / 25.0 * 1.15
    for kind in ("X", "T", "Y"):
        for _ in range(20):
            rel = np.sort(rd.wrap(np.array(rd.junction_arms(rng, kind))))
            gaps = np.diff(np.concatenate([rel, [rel[0] + 2 * math.pi]]))
            assert np.degrees(gaps.min()) >= 40.0 and len(rel) == {"X": 4, "T": 3, "Y": 3}[kind]


def test_every_class_near_the_drive_and_velocities_in_range():
    for seed in (0, 1):
        w = build_world(seed, 1, ORIGIN, 2.5, stream=1)
        keys = [w.grid_index(t) for t in np.arange(0.0, 2.6, 0.5)]
        near = {lookup_prefix(DETECTION_CLASS, a.category) for a in w.agents
                if np.linalg.norm(a.xy[keys] - w.ego_xy[keys], axis=1).min() < 28.0}
        assert near >= set(DETECTION_CLASS.values()), set(DETECTION_CLASS.values()) - near
        assert 0.0 <= w.ego_speed.min() and w.ego_speed.max() <= 15.0
        # The ego's path is continuous: each step moves it by its speed, with no sideways jump or heading spike.
        step = np.linalg.norm(np.diff(w.ego_xy, axis=0), axis=1)
        assert np.all(step - w.ego_speed[:-1] * w.grid.dt < 0.3)
        assert np.all(np.abs(np.diff(w.ego_yaw)) / w.grid.dt < 1.5)
        # The ego's velocity is the derivative of its pose (finite differences as the devkit's box_velocity).
        p0, _ = w.ego_pose(1.0)
        p1, _ = w.ego_pose(1.1)
        v = w.ego_velocity_global(1.05)
        assert np.allclose((p1[:2] - p0[:2]) / 0.1, v, atol=0.15)


def test_world_summary_matches_the_generator(curve_and_junction):
    """`data check`'s per-scene turn (from the tables) against the generator's own ego headings."""
    root, nusc = curve_and_junction
    summary = world_summary(root, "v1.0-mini")
    worlds = _worlds(SynthConfig(num_scenes=2, samples_per_scene=4, events=("curve", "junction"), seed=3))
    for name, w in worlds.items():
        yaw = np.unwrap([w.ego_pose(t)[1] for t in np.arange(0.0, 1.6, 0.5)])
        expect = float(np.degrees(np.abs(yaw - yaw[0]).max()))
        assert summary["turning_scenes"]["max_turn_deg"][name] == pytest.approx(expect, abs=0.1)


def test_generator_version_and_splits(tmp_path, monkeypatch):
    cfg = SynthConfig(num_scenes=1, samples_per_scene=2, image_width=160, image_height=90, lidar_sweeps=0, radar_sweeps=0)
    generate(tmp_path / "d", cfg, workers=1, progress=False)
    assert generator_version(tmp_path / "d") == GENERATOR_VERSION
    # A dataroot written by generator 1 is regenerated by the demo, never reused.
    conf = json.loads((tmp_path / "d" / "synth_config.json").read_text())
    conf.pop("generator_version")
    (tmp_path / "d" / "synth_config.json").write_text(json.dumps(conf))
    assert generator_version(tmp_path / "d") == 1
    from perception import demo

    calls = []
    monkeypatch.setattr(demo, "generate", lambda root, c: calls.append(root))
    demo.ensure_synthetic(tmp_path / "d")
    assert calls == [tmp_path / "d"] and not (tmp_path / "d" / "v1.0-mini").exists()
    # Trainval names up to the devkit's 850 (700 train, 150 val).
    pairs = scene_names("v1.0-trainval", 850)
    assert sum(s == "train" for _, s in pairs) == 700 and sum(s == "val" for _, s in pairs) == 150
    with pytest.raises(PerceptionError):
        scene_names("v1.0-trainval", 851)
    with pytest.raises(PerceptionError):
        SynthConfig(num_scenes=1, events=("roundabout",)).validate()
