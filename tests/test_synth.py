"""The synthetic set, checked with the devkit's own functions."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from nuscenes.eval.common.config import config_factory
from nuscenes.eval.detection.evaluate import DetectionEval
from nuscenes.eval.detection.utils import category_to_detection_name
from nuscenes.map_expansion.map_api import NuScenesMap
from nuscenes.utils.data_classes import LidarPointCloud, RadarPointCloud
from nuscenes.utils.geometry_utils import points_in_box, view_points
from nuscenes.utils.splits import create_splits_scenes
from pyquaternion import Quaternion

from perception.data.synth.world import DRIVE_WORDS
from perception.structures import CAMERA_CHANNELS, RADAR_CHANNELS, SCENE_TAGS, parse_scene_tags


def _box_in_sensor(nusc, ann_token, sd_token):
    _, boxes, _ = nusc.get_sample_data(sd_token, selected_anntokens=[ann_token])
    return boxes[0]


def test_tables_and_splits(synth_nusc):
    nusc = synth_nusc
    assert len(nusc.scene) == 3 and len(nusc.sample) == 18
    assert len(nusc.category) == 23 and len(nusc.attribute) == 8 and len(nusc.visibility) == 4 and len(nusc.sensor) == 12
    splits = create_splits_scenes()
    names = {s["name"] for s in nusc.scene}
    assert len(names & set(splits["mini_train"])) == 2 and len(names & set(splits["mini_val"])) == 1
    for scene in nusc.scene:
        sample = nusc.get("sample", scene["first_sample_token"])
        ts, n = [], 0
        while True:
            ts.append(sample["timestamp"])
            n += 1
            assert set(sample["data"]) == set(CAMERA_CHANNELS) | {"LIDAR_TOP"} | set(RADAR_CHANNELS)
            if not sample["next"]:
                break
            sample = nusc.get("sample", sample["next"])
        assert n == scene["nbr_samples"] and sample["token"] == scene["last_sample_token"]
        assert np.all(np.diff(ts) > 0)
        tags = [t.strip() for t in scene["description"].split(",")]
        assert tags[0] in ("day", "dusk", "night") and tags[1] in ("clear", "rain")
        assert set(tags[2:]) <= set(SCENE_TAGS) | set(DRIVE_WORDS), tags
    # The words that say what the drive does never read as a scene tag.
    for word in DRIVE_WORDS:
        assert not parse_scene_tags(word).any(), word
    # Sweeps interleave with keyframes at the sensor rate: 2 LiDAR sweeps 50 ms apart before each keyframe.
    sd = nusc.get("sample_data", nusc.sample[3]["data"]["LIDAR_TOP"])
    prev = nusc.get("sample_data", sd["prev"])
    assert not prev["is_key_frame"] and sd["timestamp"] - prev["timestamp"] == 50_000
    for rec in nusc.sample_annotation:
        assert category_to_detection_name(nusc.get("instance", rec["instance_token"])["category_name"] if "category_name" in nusc.get("instance", rec["instance_token"]) else nusc.get("category", nusc.get("instance", rec["instance_token"])["category_token"])["name"]) is not None


def test_renders_and_multisweep(synth_nusc, tmp_path):
    nusc = synth_nusc
    sample = nusc.sample[2]
    nusc.render_sample_data(sample["data"]["CAM_FRONT"], out_path=str(tmp_path / "cam.png"), verbose=False)
    nusc.render_sample_data(sample["data"]["LIDAR_TOP"], nsweeps=3, underlay_map=True, with_anns=True, out_path=str(tmp_path / "lidar.png"), verbose=False)
    nusc.render_pointcloud_in_image(sample["token"], pointsensor_channel="LIDAR_TOP", camera_channel="CAM_FRONT", out_path=str(tmp_path / "pc.png"), verbose=False)
    nusc.render_pointcloud_in_image(sample["token"], pointsensor_channel="RADAR_FRONT", camera_channel="CAM_FRONT", out_path=str(tmp_path / "radar.png"), verbose=False)
    for name in ("cam.png", "lidar.png", "pc.png", "radar.png"):
        assert (tmp_path / name).stat().st_size > 1000
    for s in nusc.sample:
        pc, times = LidarPointCloud.from_file_multisweep(nusc, s, "LIDAR_TOP", "LIDAR_TOP", nsweeps=3)
        assert pc.points.shape[0] == 4 and pc.points.shape[1] > 10_000 and np.isfinite(pc.points).all()
        assert len(np.unique(times)) >= 2 or s["prev"] == ""
        for ch in RADAR_CHANNELS:
            rpc, _ = RadarPointCloud.from_file_multisweep(nusc, s, ch, "LIDAR_TOP", nsweeps=3)
            assert rpc.points.shape[0] == 18


def test_map_masks_around_ego(synth_nusc, synth_root):
    nusc = synth_nusc
    maps = {}
    for scene in nusc.scene:
        loc = nusc.get("log", scene["log_token"])["location"]
        nmap = maps.setdefault(loc, NuScenesMap(dataroot=str(synth_root), map_name=loc))
        sample = nusc.get("sample", scene["first_sample_token"])
        pose = nusc.get("ego_pose", nusc.get("sample_data", sample["data"]["LIDAR_TOP"])["ego_pose_token"])
        x, y = pose["translation"][:2]
        yaw = Quaternion(pose["rotation"]).yaw_pitch_roll[0]
        layers = ["drivable_area", "ped_crossing", "walkway", "lane_divider", "road_divider", "stop_line", "carpark_area"]
        masks = nmap.get_map_mask((x, y, 200, 200), np.degrees(yaw), layers, canvas_size=(400, 400))
        counts = dict(zip(layers, masks.reshape(len(layers), -1).sum(1)))
        for layer in ("drivable_area", "ped_crossing", "walkway", "lane_divider"):
            assert counts[layer] > 0, (scene["name"], layer)
        assert nmap.layers_on_point(x, y)["drivable_area"] != ""
        # The ego stands on drivable area in the semantic-prior raster too.
        assert nusc.get("map", [m["token"] for m in nusc.map if scene["log_token"] in m["log_tokens"]][0])["mask"].is_on_mask(x, y)


def test_num_lidar_and_radar_pts_match_files(synth_nusc):
    nusc = synth_nusc
    bad_lidar, bad_radar, checked = [], [], 0
    for sample in nusc.sample:
        lidar_sd = sample["data"]["LIDAR_TOP"]
        pc = LidarPointCloud.from_file(nusc.get_sample_data_path(lidar_sd))
        radar = []
        for ch in RADAR_CHANNELS:
            sd = nusc.get("sample_data", sample["data"][ch])
            rpc = RadarPointCloud.from_file(nusc.get_sample_data_path(sd["token"]))
            cs = nusc.get("calibrated_sensor", sd["calibrated_sensor_token"])
            pose = nusc.get("ego_pose", sd["ego_pose_token"])
            rpc.rotate(Quaternion(cs["rotation"]).rotation_matrix)
            rpc.translate(np.array(cs["translation"]))
            rpc.rotate(Quaternion(pose["rotation"]).rotation_matrix)
            rpc.translate(np.array(pose["translation"]))
            radar.append(rpc.points[:3])
        radar_global = np.concatenate(radar, 1)
        for ann_token in sample["anns"]:
            ann = nusc.get("sample_annotation", ann_token)
            box = _box_in_sensor(nusc, ann_token, lidar_sd)
            n = int(points_in_box(box, pc.points[:3]).sum())
            if abs(n - ann["num_lidar_pts"]) > 2:
                bad_lidar.append((ann_token, n, ann["num_lidar_pts"]))
            n_r = int(points_in_box(nusc.get_box(ann_token), radar_global).sum())
            if abs(n_r - ann["num_radar_pts"]) > 1:
                bad_radar.append((ann_token, n_r, ann["num_radar_pts"]))
            checked += 1
    assert checked > 200
    assert not bad_lidar, bad_lidar[:5]
    assert not bad_radar, bad_radar[:5]
    # Most nearby objects are seen by the sensors.
    near = [a for a in nusc.sample_annotation if a["num_lidar_pts"] > 0]
    assert len(near) > 0.5 * len(nusc.sample_annotation)


def test_radar_velocities_are_radial_doppler(synth_nusc):
    """A Doppler radar measures radial speed only: both velocity pairs point along the line of sight, and on a
    moving object the compensated one is the object's velocity projected on it."""
    nusc = synth_nusc
    errors, returns = [], 0
    for sample in nusc.sample[::3]:
        for ch in RADAR_CHANNELS:
            sd = nusc.get("sample_data", sample["data"][ch])
            pts = RadarPointCloud.from_file(nusc.get_sample_data_path(sd["token"])).points  # (18, M), radar frame
            xy, v, v_comp = pts[0:2], pts[6:8], pts[8:10]
            los = xy / np.linalg.norm(xy, axis=0)
            for vel in (v, v_comp):
                assert np.abs(los[0] * vel[1] - los[1] * vel[0]).max(initial=0) < 1e-3, (ch, "tangential velocity")
            returns += xy.shape[1]
            cs = nusc.get("calibrated_sensor", sd["calibrated_sensor_token"])
            pose = nusc.get("ego_pose", sd["ego_pose_token"])
            radar2global = Quaternion(pose["rotation"]).rotation_matrix @ Quaternion(cs["rotation"]).rotation_matrix
            _, boxes, _ = nusc.get_sample_data(sd["token"])
            for box in boxes:
                v_global = nusc.box_velocity(box.token)
                if not np.isfinite(v_global).all() or np.hypot(*v_global[:2]) < 2.0:
                    continue
                inside = points_in_box(box, np.vstack([xy, np.zeros((1, xy.shape[1]))]))
                v_radar = (radar2global.T @ v_global)[:2]
                errors += [abs(float(los[:, k] @ (v_comp[:, k] - v_radar))) for k in np.nonzero(inside)[0]]
    assert returns > 100 and len(errors) > 5
    # A few clutter returns fall inside a moving box by chance.
    assert np.mean(np.array(errors) < 0.6) > 0.9, sorted(errors)


def test_objects_stand_out_in_images(synth_nusc):
    """Fully visible objects within 30 m differ clearly in colour from the pixels around their box."""
    import cv2

    nusc = synth_nusc
    diffs = []
    for sample in nusc.sample[::2]:
        for ch in CAMERA_CHANNELS:
            sd_token = sample["data"][ch]
            path, boxes, K = nusc.get_sample_data(sd_token)
            img = cv2.cvtColor(cv2.imread(path), cv2.COLOR_BGR2RGB).astype(np.float32)
            H, W = img.shape[:2]
            hulls = []
            for box in boxes:
                if box.center[2] > 0.5:
                    corners = view_points(box.corners(), K, normalize=True)[:2]
                    hulls.append((box, corners, cv2.convexHull(corners.T.astype(np.float32)).astype(np.int32)))
            for box, corners, hull in hulls:
                ann = nusc.get("sample_annotation", box.token)
                if ann["visibility_token"] != "4" or np.linalg.norm(box.center) > 30 or box.center[2] < 1.0:
                    continue
                x0, y0 = corners.min(1)
                x1, y1 = corners.max(1)
                if x0 < 4 or y0 < 4 or x1 > W - 5 or y1 > H - 5 or (x1 - x0) * (y1 - y0) < 60:
                    continue
                inside = np.zeros((H, W), np.uint8)
                cv2.fillConvexPoly(inside, hull, 1)
                others = np.zeros((H, W), np.uint8)
                for other, _, h in hulls:
                    if other.token != box.token:
                        cv2.fillConvexPoly(others, h, 1)
                ring = (cv2.dilate(inside, np.ones((9, 9), np.uint8)) - inside).astype(bool)
                background = ring & ~others.astype(bool)
                if background.sum() < 0.5 * ring.sum():
                    continue  # surrounded by other objects: no background to compare with
                a, b = img[inside.astype(bool)].mean(0), img[background].mean(0)
                diffs.append(float(np.abs(a - b).max()))
    assert len(diffs) >= 10
    diffs = np.array(diffs)
    assert np.median(diffs) > 30 and np.mean(diffs > 15) > 0.9, np.percentile(diffs, [5, 10, 25, 50])


def test_ground_truth_scores_nds_one(synth_nusc, tmp_path):
    nusc = synth_nusc
    val_scenes = set(create_splits_scenes()["mini_val"])
    results = {}
    for sample in nusc.sample:
        if nusc.get("scene", sample["scene_token"])["name"] not in val_scenes:
            continue
        boxes = []
        for ann_token in sample["anns"]:
            ann = nusc.get("sample_annotation", ann_token)
            name = category_to_detection_name(ann["category_name"])
            if name is None or ann["num_lidar_pts"] + ann["num_radar_pts"] == 0:
                continue
            vel = nusc.box_velocity(ann_token)[:2]
            attr = nusc.get("attribute", ann["attribute_tokens"][0])["name"] if ann["attribute_tokens"] else ""
            boxes.append({"sample_token": sample["token"], "translation": ann["translation"], "size": ann["size"], "rotation": ann["rotation"], "velocity": [0.0, 0.0] if np.isnan(vel).any() else list(vel), "detection_name": name, "detection_score": 1.0, "attribute_name": attr})
        results[sample["token"]] = boxes
    sub = {"meta": {"use_camera": False, "use_lidar": True, "use_radar": False, "use_map": False, "use_external": False}, "results": results}
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(sub))
    ev = DetectionEval(nusc, config_factory("detection_cvpr_2019"), str(path), "mini_val", str(tmp_path / "eval"), verbose=False)
    metrics, _ = ev.evaluate()
    summary = metrics.serialize()
    assert summary["nd_score"] >= 0.99, (summary["nd_score"], summary["mean_dist_aps"], summary["tp_errors"])


def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def test_deterministic(tmp_path):
    from perception.data.synth.generate import SynthConfig, generate

    cfg = SynthConfig(num_scenes=1, samples_per_scene=2, image_width=160, image_height=90, lidar_sweeps=1, radar_sweeps=1)
    generate(tmp_path / "a", cfg, workers=1, progress=False)
    generate(tmp_path / "b", cfg, workers=1, progress=False)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    generate(tmp_path / "c", SynthConfig(num_scenes=1, samples_per_scene=2, image_width=160, image_height=90, lidar_sweeps=1, radar_sweeps=1, seed=1), workers=1, progress=False)
    assert _digest(tmp_path / "a") != _digest(tmp_path / "c")
