"""The per-frame folder format (perception/data/frames.py, docs/custom-data.md): `data frames` on the synthetic
dataroot checked against the devkit, and one-line errors for bad input on a tiny hand-written folder."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest
from nuscenes.utils.data_classes import RadarPointCloud
from pyquaternion import Quaternion
from typer.testing import CliRunner

from perception.cli import app
from perception.data.frames import EGO_FRAME, GLOBAL_FRAME, box_to_global, load_frames
from perception.data.frames_export import export_frames
from perception.errors import DataError

ALL_STATES = list(range(-128, 128))


@pytest.fixture(scope="module")
def exported(synth_root, tmp_path_factory):
    """`perception data frames` of synth_root's mini_val, and the folder loaded back."""
    out = tmp_path_factory.mktemp("frames") / "mini_val"
    res = CliRunner().invoke(app, ["data", "frames", "--data", str(synth_root), "--version", "v1.0-mini",
                                   "--split", "mini_val", "--out", str(out)])
    assert res.exit_code == 0, res.output + repr(res.exception)
    return load_frames(out)


def _scene_sample_data(nusc, scene) -> list[dict]:
    samples = {s["token"] for s in nusc.sample if s["scene_token"] == scene["token"]}
    return [sd for sd in nusc.sample_data if sd["sample_token"] in samples]


def test_export_counts_records_and_files_match_the_devkit(exported, synth_root, synth_nusc):
    nusc = synth_nusc
    val = [s for s in nusc.scene if s["name"] in exported.splits["mini_val"]]
    assert [s.name for s in exported.scenes] == [s["name"] for s in val] and len(val) == 1
    for scene_rec in val:
        scene = exported.scene(scene_rec["name"])
        sds = _scene_sample_data(nusc, scene_rec)
        by_key = {(sd["channel"], sd["timestamp"]): sd for sd in sds}
        # Keyframes: the scene's samples, in order; every sensor record of the scene, keyframe or sweep, once.
        chain, tok = [], scene_rec["first_sample_token"]
        while tok:
            chain.append(tok)
            tok = nusc.get("sample", tok)["next"]
        assert [f.sample_token for f in scene.keyframes] == chain and len(chain) == scene_rec["nbr_samples"]
        records = [r for f in scene.frames for r in f.records.values()]
        assert Counter(r.sensor for r in records) == Counter(sd["channel"] for sd in sds)
        assert len(scene.frames) == sum(sd["channel"] == "LIDAR_TOP" for sd in sds)  # LiDAR is the densest channel
        for f in scene.frames:
            for name, rec in f.records.items():
                sd = by_key.pop((name, rec.timestamp))
                assert sd["is_key_frame"] == f.keyframe
                if f.keyframe:
                    assert nusc.get("sample", f.sample_token)["data"][name] == sd["token"]
                ep = nusc.get("ego_pose", sd["ego_pose_token"])
                cs = nusc.get("calibrated_sensor", sd["calibrated_sensor_token"])
                assert rec.ego2global.translation == tuple(ep["translation"])
                assert rec.ego2global.rotation == tuple(ep["rotation"])
                assert rec.calibration.sensor2ego.translation == tuple(cs["translation"])
                assert rec.calibration.sensor2ego.rotation == tuple(cs["rotation"])
                src = Path(synth_root) / sd["filename"]
                if sd["sensor_modality"] == "radar":  # converted: every return, all 18 fields
                    pc = RadarPointCloud.from_file(str(src), invalid_states=ALL_STATES, dynprop_states=ALL_STATES,
                                                   ambig_states=ALL_STATES)
                    np.testing.assert_array_equal(np.load(rec.file), pc.points.T)
                    assert rec.num_points == pc.nbr_points()
                else:  # copied byte for byte
                    assert rec.file.read_bytes() == src.read_bytes(), rec.file
                if sd["sensor_modality"] == "camera":
                    assert rec.image_size == (sd["width"], sd["height"])
                    np.testing.assert_array_equal(rec.calibration.intrinsics, cs["camera_intrinsic"])
        assert not by_key, f"records not exported: {sorted(by_key)[:3]}"


def test_export_boxes_equal_the_devkit_annotations(exported, synth_nusc):
    nusc = synth_nusc
    attr = {a["token"]: a["name"] for a in nusc.attribute}
    n = 0
    for scene in exported.scenes:
        for f in scene.keyframes:
            anns = [nusc.get("sample_annotation", t) for t in nusc.get("sample", f.sample_token)["anns"]]
            assert len(f.boxes) == len(anns)
            for box, ann in zip(f.boxes, anns):
                g = box_to_global(box, f, exported.rig)
                assert g.frame == GLOBAL_FRAME and g.category == ann["category_name"]
                np.testing.assert_allclose(g.center, ann["translation"], atol=1e-6, rtol=0)
                np.testing.assert_allclose(g.size, ann["size"], atol=1e-6, rtol=0)
                yaw = Quaternion(ann["rotation"]).yaw_pitch_roll[0]
                assert abs(math.remainder(g.yaw - yaw, 2 * math.pi)) < 1e-6
                v = nusc.box_velocity(ann["token"])[:2]
                if np.isfinite(v).all():
                    np.testing.assert_allclose(g.velocity, v, atol=1e-6, rtol=0)
                else:
                    assert g.velocity is None
                assert g.track_id == ann["instance_token"]
                assert g.attribute == (attr[ann["attribute_tokens"][0]] if ann["attribute_tokens"] else None)
                assert (g.num_lidar_pts, g.num_radar_pts) == (ann["num_lidar_pts"], ann["num_radar_pts"])
                n += 1
    assert n > 0


def test_export_refuses_a_non_empty_folder(exported, synth_root):
    with pytest.raises(DataError, match="not empty"):
        export_frames(synth_root, "v1.0-mini", "mini_val", exported.root)


# ------------------------------------------------------------------------------------- a tiny hand-written folder

RIG = {"sensors": [
    {"name": "CAM_FRONT", "modality": "camera", "image_size": [16, 8],
     "calibration": {"translation": [1.5, 0.0, 1.5], "rotation": [0.5, -0.5, 0.5, -0.5],
                     "intrinsics": [[10.0, 0.0, 8.0], [0.0, 10.0, 4.0], [0.0, 0.0, 1.0]]}},
    {"name": "CAM_BACK", "modality": "camera",
     "calibration": {"translation": [-1.0, 0.0, 1.5], "rotation": [0.5, 0.5, 0.5, 0.5],
                     "intrinsics": [[10.0, 0.0, 8.0], [0.0, 10.0, 4.0], [0.0, 0.0, 1.0]]}},
    {"name": "LIDAR_TOP", "modality": "lidar", "points": {"columns": ["x", "y", "z", "intensity", "ring"],
                                                          "intensity_max": 255.0},
     "calibration": {"translation": [0.9, 0.0, 1.8], "rotation": [1.0, 0.0, 0.0, 0.0]}},
]}
EGO = {"translation": [100.0, 200.0, 0.0], "rotation": [math.cos(math.pi / 4), 0.0, 0.0, math.sin(math.pi / 4)]}


def _record(ts: int, file: str) -> dict:
    return {"timestamp": ts, "file": file, "ego_pose": EGO}


@pytest.fixture()
def tiny(tmp_path) -> Path:
    """One scene, a sweep then a keyframe with one box in the ego frame; a split "val"."""
    root = tmp_path / "frames_dir"
    (root / "data").mkdir(parents=True)
    ok, jpeg = cv2.imencode(".jpg", np.zeros((8, 16, 3), np.uint8))
    for name in ("f0.jpg", "f1.jpg", "b1.jpg"):
        (root / "data" / name).write_bytes(jpeg.tobytes())
    for name in ("l0.bin", "l1.bin"):
        np.ones((7, 5), "<f4").tofile(root / "data" / name)
    (root / "rig.json").write_text(json.dumps(RIG))
    (root / "splits.json").write_text(json.dumps({"val": ["scene-a"]}))
    frames = root / "frames" / "scene-a"
    frames.mkdir(parents=True)
    (frames / "000000.json").write_text(json.dumps({"keyframe": False, "records": {
        "LIDAR_TOP": _record(1000, "data/l0.bin"), "CAM_FRONT": _record(1010, "data/f0.jpg")}}))
    (frames / "000001.json").write_text(json.dumps({"keyframe": True, "sample_token": "s1", "records": {
        "LIDAR_TOP": _record(51000, "data/l1.bin"), "CAM_FRONT": _record(51010, "data/f1.jpg"),
        "CAM_BACK": _record(51020, "data/b1.jpg")},
        "boxes": [{"category": "car", "center": [10.0, 0.0, 1.0], "size": [1.8, 4.5, 1.5], "yaw": 0.3,
                   "frame": EGO_FRAME, "velocity": [2.0, 0.0], "track_id": 7}]}))
    return root


def _edit(root: Path, rel: str, fn) -> None:
    path = root / rel
    value = json.loads(path.read_text())
    fn(value)
    path.write_text(json.dumps(value))


def _error(root: Path) -> str:
    with pytest.raises(DataError) as info:
        load_frames(root)
    msg = str(info.value)
    assert "\n" not in msg, msg
    return msg


def test_tiny_folder_loads_and_converts_an_ego_box(tiny):
    fs = load_frames(tiny)
    (scene,) = fs.scenes
    assert fs.rig.cameras == ("CAM_FRONT", "CAM_BACK") and fs.rig.reference_lidar == "LIDAR_TOP"
    assert [f.keyframe for f in scene.frames] == [False, True]
    assert list(scene.frames[0].records) == ["CAM_FRONT", "LIDAR_TOP"]  # CAM_BACK absent from the sweep frame
    rec = scene.frames[1].records["CAM_FRONT"]
    assert rec.image_size == (16, 8) and scene.frames[1].records["LIDAR_TOP"].num_points == 7
    g = box_to_global(scene.keyframes[0].boxes[0], scene.keyframes[0], fs.rig)  # ego: 90 degrees, at (100, 200)
    np.testing.assert_allclose(g.center, [100.0, 210.0, 1.0], atol=1e-9)
    assert abs(g.yaw - (0.3 + math.pi / 2)) < 1e-9 and g.track_id == "7"
    np.testing.assert_allclose(g.velocity, [0.0, 2.0], atol=1e-9)


def test_a_camera_omitted_by_a_keyframe_is_absent(tiny):
    _edit(tiny, "frames/scene-a/000001.json", lambda v: v["records"].pop("CAM_FRONT"))
    kf = load_frames(tiny).scenes[0].keyframes[0]
    assert "CAM_FRONT" not in kf.records and set(kf.records) == {"CAM_BACK", "LIDAR_TOP"}


def test_malformed_json(tiny):
    (tiny / "frames/scene-a/000001.json").write_text('{"keyframe": true, "records": {')
    msg = _error(tiny)
    assert msg.startswith(str(tiny / "frames/scene-a/000001.json") + ": malformed JSON at line 1"), msg


def test_missing_key(tiny):
    _edit(tiny, "frames/scene-a/000001.json", lambda v: v["records"]["LIDAR_TOP"].pop("timestamp"))
    assert _error(tiny).endswith("000001.json: records.LIDAR_TOP.timestamp: missing required key")


def test_negative_size(tiny):
    _edit(tiny, "frames/scene-a/000001.json", lambda v: v["boxes"][0].update(size=[1.0, -2.0, 1.5]))
    assert _error(tiny).endswith("000001.json: boxes[0].size: expected 3 positive numbers, got [1.0, -2.0, 1.5]")


def test_unknown_sensor(tiny):
    _edit(tiny, "frames/scene-a/000000.json", lambda v: v["records"].update(CAM_SIDE=_record(1020, "data/f0.jpg")))
    msg = _error(tiny)
    assert msg.endswith("000000.json: records.CAM_SIDE: unknown sensor 'CAM_SIDE' (rig.json declares: CAM_FRONT, "
                        "CAM_BACK, LIDAR_TOP)"), msg


def test_missing_and_unreadable_sensor_files(tiny):
    (tiny / "data" / "b1.jpg").unlink()
    msg = _error(tiny)
    assert msg.endswith(f"000001.json: records.CAM_BACK.file: missing file {tiny / 'data' / 'b1.jpg'}"), msg
    (tiny / "data" / "b1.jpg").write_bytes(b"not a jpeg")
    assert _error(tiny).endswith(f"000001.json: records.CAM_BACK.file: unreadable image {tiny / 'data' / 'b1.jpg'}: "
                                 "not a JPEG or PNG")
    noise = np.random.default_rng(0).integers(0, 255, (64, 128, 3), dtype=np.uint8)
    (tiny / "data" / "b1.jpg").write_bytes(cv2.imencode(".jpg", noise)[1].tobytes()[:-1000])
    assert _error(tiny).endswith(f"records.CAM_BACK.file: image {tiny / 'data' / 'b1.jpg'} is truncated (no JPEG end marker)")
    (tiny / "data" / "b1.jpg").write_bytes((tiny / "data" / "f1.jpg").read_bytes())
    (tiny / "data" / "l1.bin").write_bytes(b"\0" * 21)
    assert _error(tiny).endswith(f"000001.json: records.LIDAR_TOP.file: {tiny / 'data' / 'l1.bin'} has 21 bytes, not a "
                                 "multiple of 20 (5 float32 per point)")


def test_split_naming_an_unknown_scene(tiny):
    (tiny / "splits.json").write_text(json.dumps({"val": ["scene-a", "scene-b"]}))
    assert _error(tiny) == f"{tiny / 'splits.json'}: val[1]: unknown scene \"scene-b\" (no folder frames/scene-b)"


def test_timestamps_must_increase_per_sensor(tiny):
    _edit(tiny, "frames/scene-a/000001.json", lambda v: v["records"]["LIDAR_TOP"].update(timestamp=1000))
    msg = _error(tiny)
    assert "000001.json: records.LIDAR_TOP.timestamp: 1000 is not after 1000" in msg, msg


def test_rig_and_scene_errors_name_the_key(tiny):
    _edit(tiny, "frames/scene-a/000001.json", lambda v: v["records"].pop("LIDAR_TOP"))
    assert "000001.json: records: a keyframe needs a record of the reference lidar 'LIDAR_TOP'" in _error(tiny)
    _edit(tiny, "frames/scene-a/000001.json", lambda v: v["records"].update(LIDAR_TOP=_record(51000, "data/l1.bin")))
    _edit(tiny, "rig.json", lambda v: v["sensors"][1].pop("calibration"))
    assert "000001.json: records.CAM_BACK: no calibration for sensor 'CAM_BACK'" in _error(tiny)
    # A scene-level calibration fills it in; a record-level one overrides it.
    calib = dict(RIG["sensors"][1]["calibration"], translation=[-2.0, 0.0, 1.5])
    (tiny / "scenes.json").write_text(json.dumps({"scene-a": {"location": "boston-seaport",
                                                              "calibration": {"CAM_BACK": calib}}}))
    rec = load_frames(tiny).scenes[0].keyframes[0].records["CAM_BACK"]
    assert rec.calibration.sensor2ego.translation == (-2.0, 0.0, 1.5)
    _edit(tiny, "rig.json", lambda v: v["sensors"][2]["points"].update(columns=["x", "y", "z"]))
    assert _error(tiny).endswith("rig.json: sensors[2].points.columns: a lidar needs columns x, y, z, intensity; "
                                 "missing intensity")
