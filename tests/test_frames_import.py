"""`perception data import` (perception/data/frames_import.py): a round trip of the synthetic dataroot through
`data frames` and back gives the same sample index and ground truth; conversions, point counting, maps and refusals
on a tiny hand-written folder."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from nuscenes.nuscenes import NuScenes
from nuscenes.utils.data_classes import RadarPointCloud
from typer.testing import CliRunner

from perception import cli
from perception.data.dataset import INDEX_ARRAYS, DatasetConfig, index_from_tables
from perception.data.frames_export import export_frames
from perception.data.frames_import import TABLES, import_frames
from perception.data.loading import read_jpeg, read_lidar_bin, read_radar_pcd
from perception.data.submission import gt_submission
from perception.errors import DataError

VERSION = "v1.0-mini"
# Index arrays of tokens the frames format does not carry (made anew by the import): compared as a one-to-one map.
NEW_TOKENS = ("scene_tokens", "box_tokens")


@pytest.fixture(scope="module")
def round_trip(synth_root, synth_nusc, tmp_path_factory) -> Path:
    """synth_root exported (every scene, with its maps) and imported back: the imported dataroot."""
    tmp = tmp_path_factory.mktemp("import")
    summary = export_frames(synth_root, VERSION, None, tmp / "frames", nusc=synth_nusc)
    assert summary.map_files > 0
    out = tmp / "dataroot"
    s = import_frames(tmp / "frames", out, VERSION)
    assert (s.scenes, s.samples, s.annotations) == (3, 18, summary.boxes)
    assert s.counted_boxes == 0 and s.converted_images == s.converted_lidar == 0 and s.converted_radar > 0
    assert s.splits == ("mini_train", "mini_val") and not s.blank_maps and len(s.map_expansions) > 0
    return out


def _same_tokens(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether a and b (same shape, str) are the same labelling up to renaming the labels one to one."""
    pairs = set(zip(a.tolist(), b.tolist()))
    return a.shape == b.shape and len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


def test_round_trip_gives_the_same_index_and_files(round_trip, synth_root):
    nusc = NuScenes(VERSION, str(round_trip), verbose=False)
    assert len(nusc.sample) == 18 and len(nusc.map) > 0
    assert all((round_trip / m["filename"]).is_file() for m in nusc.map)
    cfg = DatasetConfig(lidar_sweeps=3, radar_sweeps=3)
    for split in ("mini_train", "mini_val"):
        original, _ = index_from_tables(synth_root, VERSION, split, cfg)
        imported, _ = index_from_tables(round_trip, VERSION, split, cfg, nusc=nusc)
        assert len(original) > 0 and len(imported) == len(original)
        for name in INDEX_ARRAYS:
            a, b = getattr(original, name), getattr(imported, name)
            if name in NEW_TOKENS:
                assert _same_tokens(a, b), name
            elif a.dtype.kind == "U":
                np.testing.assert_array_equal(a, b, err_msg=name)
            else:
                assert a.shape == b.shape, name
                np.testing.assert_allclose(a, b, atol=1e-6, rtol=0, err_msg=name)
        # The same relative file names, and the same bytes (radar: .pcd -> .npy -> .pcd).
        paths = [*original.cam_paths.ravel(), *original.lidar_paths, *original.radar_paths]
        for rel in paths:
            assert (round_trip / rel).read_bytes() == (synth_root / rel).read_bytes(), rel
    for location in ("boston-seaport", "singapore-onenorth", "singapore-queenstown"):
        exp = synth_root / "maps" / "expansion" / f"{location}.json"
        if exp.exists():
            assert (round_trip / "maps" / "expansion" / f"{location}.json").read_bytes() == exp.read_bytes()


def test_round_trip_ground_truth_submissions_are_equal(round_trip, synth_root, tmp_path):
    for split in ("mini_train", "mini_val"):
        a = json.loads(gt_submission(synth_root, VERSION, split, tmp_path / f"a_{split}.json").read_text())["results"]
        b = json.loads(gt_submission(round_trip, VERSION, split, tmp_path / f"b_{split}.json").read_text())["results"]
        assert list(a) == list(b) and sum(map(len, a.values())) > 0
        for token in a:
            assert len(a[token]) == len(b[token])
            for x, y in zip(a[token], b[token]):
                for key in ("translation", "size", "rotation", "velocity"):
                    np.testing.assert_allclose(x[key], y[key], atol=1e-4, rtol=0, err_msg=key)
                assert (x["detection_name"], x["attribute_name"]) == (y["detection_name"], y["attribute_name"])


def test_import_is_deterministic(round_trip, tmp_path):
    frames = round_trip.parent / "frames"
    again = import_frames(frames, tmp_path / "again", VERSION)
    assert again.samples == 18
    for name in (*TABLES, "splits"):
        assert ((tmp_path / "again" / VERSION / f"{name}.json").read_bytes()
                == (round_trip / VERSION / f"{name}.json").read_bytes()), name


# ------------------------------------------------------------------------------------- a tiny hand-written folder

CALIB_LIDAR = {"translation": [0.0, 0.0, 1.8], "rotation": [1.0, 0.0, 0.0, 0.0]}
CALIB_RADAR = {"translation": [2.0, 0.0, 0.5], "rotation": [1.0, 0.0, 0.0, 0.0]}
RIG = {"sensors": [
    {"name": "CAM_FRONT", "modality": "camera", "image_size": [32, 16],
     "calibration": {"translation": [1.5, 0.0, 1.5], "rotation": [0.5, -0.5, 0.5, -0.5],
                     "intrinsics": [[10.0, 0.0, 16.0], [0.0, 10.0, 8.0], [0.0, 0.0, 1.0]]}},
    {"name": "LIDAR_TOP", "modality": "lidar", "calibration": CALIB_LIDAR,
     "points": {"columns": ["x", "y", "z", "intensity"], "intensity_max": 1.0}},
    {"name": "RADAR_FRONT", "modality": "radar", "calibration": CALIB_RADAR,
     "points": {"columns": ["x", "y", "z", "rcs", "vx_comp", "vy_comp"]}},
]}
EGO = {"translation": [100.0, 200.0, 0.0], "rotation": [math.cos(math.pi / 4), 0.0, 0.0, math.sin(math.pi / 4)]}
# A box in the ego frame at (10, 0, 1), 2 m wide, 4 m long, 2 m high; 5 LiDAR points and 2 radar returns inside it.
BOX = {"category": "vehicle.car", "frame": "ego", "center": [10.0, 0.0, 1.0], "size": [2.0, 4.0, 2.0], "yaw": 0.0,
       "track_id": 3, "attribute": "vehicle.parked"}
LIDAR_EGO = np.array([[10, 0, 1], [11.9, 0.9, 1.9], [8.1, -0.9, 0.1], [10, 0.5, 1.5], [9, 0, 1],  # inside
                      [12.5, 0, 1], [10, 1.5, 1], [10, 0, 2.5]], np.float32)  # outside
RADAR_EGO = np.array([[10, 0, 1], [11, 0.2, 0.8], [20, 0, 1]], np.float32)


def _record(ts: int, file: str) -> dict:
    return {"timestamp": ts, "file": file, "ego_pose": EGO}


def _write_tiny(root: Path) -> Path:
    """One scene: a sweep (LiDAR, an empty radar sweep) then a keyframe (PNG camera, LiDAR, radar) with one box
    that gives no point counts; split "my_val"; no scenes.json, no maps/."""
    (root / "data").mkdir(parents=True)
    gradient = np.broadcast_to(np.linspace(0, 255, 32, dtype=np.float32)[None, :, None], (16, 32, 3))
    cv2.imwrite(str(root / "data" / "cam.png"), gradient.astype(np.uint8))
    lidar = np.zeros((len(LIDAR_EGO), 4), np.float32)
    lidar[:, :3] = LIDAR_EGO - np.array(CALIB_LIDAR["translation"], np.float32)
    lidar[:, 3] = np.linspace(0.0, 1.0, len(LIDAR_EGO))
    np.save(root / "data" / "lidar1.npy", lidar)
    np.save(root / "data" / "lidar0.npy", lidar[:2])
    radar = np.zeros((len(RADAR_EGO), 6), np.float32)
    radar[:, :3] = RADAR_EGO - np.array(CALIB_RADAR["translation"], np.float32)
    radar[:, 3:] = [5.0, 1.0, -0.5]
    np.save(root / "data" / "radar1.npy", radar)
    np.save(root / "data" / "radar0.npy", np.zeros((0, 6), np.float32))
    (root / "rig.json").write_text(json.dumps(RIG))
    (root / "splits.json").write_text(json.dumps({"my_val": ["drive-1"]}))
    frames = root / "frames" / "drive-1"
    frames.mkdir(parents=True)
    (frames / "000000.json").write_text(json.dumps({"keyframe": False, "records": {
        "LIDAR_TOP": _record(1000, "data/lidar0.npy"), "RADAR_FRONT": _record(1010, "data/radar0.npy")}}))
    (frames / "000001.json").write_text(json.dumps({"keyframe": True, "records": {
        "CAM_FRONT": _record(51010, "data/cam.png"), "LIDAR_TOP": _record(51000, "data/lidar1.npy"),
        "RADAR_FRONT": _record(51020, "data/radar1.npy")}, "boxes": [BOX]}))
    return root


@pytest.fixture()
def tiny(tmp_path) -> Path:
    return _write_tiny(tmp_path / "frames_dir")


def test_tiny_folder_is_converted_and_counted(tiny, tmp_path):
    out = tmp_path / "dataroot"
    s = import_frames(tiny, out)
    assert (s.converted_images, s.converted_lidar, s.converted_radar, s.counted_boxes) == (1, 2, 2, 1)
    assert s.blank_maps == ("",) and s.map_expansions == () and "CAM_BACK" in s.missing_stack_sensors
    nusc = NuScenes("v1.0-trainval", str(out), verbose=False)
    (sample,) = nusc.sample
    (ann,) = [nusc.get("sample_annotation", t) for t in sample["anns"]]
    assert (ann["num_lidar_pts"], ann["num_radar_pts"]) == (5, 2)
    np.testing.assert_allclose(ann["translation"], [100.0, 210.0, 1.0], atol=1e-9)
    assert ann["category_name"] == "vehicle.car" and ann["visibility_token"] == ""
    assert nusc.get("attribute", ann["attribute_tokens"][0])["name"] == "vehicle.parked"
    assert json.loads((out / "v1.0-trainval" / "splits.json").read_text()) == {"my_val": ["drive-1"]}

    # PNG -> JPEG (lossy): the same size, close pixels.
    cam = nusc.get("sample_data", sample["data"]["CAM_FRONT"])
    assert cam["filename"] == "samples/CAM_FRONT/cam.jpg" and (cam["width"], cam["height"]) == (32, 16)
    rgb = read_jpeg(out / cam["filename"], expected_wh=(32, 16))
    assert np.abs(rgb.astype(int) - cv2.imread(str(tiny / "data" / "cam.png"))[..., ::-1]).mean() < 3

    # LiDAR .npy with intensity in [0, 1] -> N x 5 float32, intensity 0-255, ring 0.
    lidar_sd = nusc.get("sample_data", sample["data"]["LIDAR_TOP"])
    assert lidar_sd["filename"] == "samples/LIDAR_TOP/lidar1.pcd.bin"
    points = read_lidar_bin(out / lidar_sd["filename"])
    src = np.load(tiny / "data" / "lidar1.npy")
    np.testing.assert_array_equal(points[:, :3], src[:, :3])
    np.testing.assert_allclose(points[:, 3], src[:, 3] * 255.0, rtol=1e-6)
    assert points[:, 3].max() == pytest.approx(255.0) and not points[:, 4].any()
    sweep = nusc.get("sample_data", lidar_sd["prev"])
    assert sweep["filename"] == "sweeps/LIDAR_TOP/lidar0.pcd.bin" and not sweep["is_key_frame"]
    assert sweep["sample_token"] == sample["token"]

    # Radar .npy of the six required columns -> a PCD the devkit's default filters keep whole; empty -> the marker.
    radar_sd = nusc.get("sample_data", sample["data"]["RADAR_FRONT"])
    pc = RadarPointCloud.from_file(str(out / radar_sd["filename"]))
    assert pc.nbr_points() == 3
    kept = read_radar_pcd(out / radar_sd["filename"], columns=("x", "y", "z", "rcs", "vx_comp", "vy_comp"))
    np.testing.assert_array_equal(kept, np.load(tiny / "data" / "radar1.npy"))
    empty = out / nusc.get("sample_data", radar_sd["prev"])["filename"]
    assert RadarPointCloud.from_file(str(empty)).nbr_points() == 0 and len(read_radar_pcd(empty)) == 0

    # No maps/ in the frames: a blank semantic prior, every log listed, no expansion.
    (map_row,) = nusc.map
    assert (out / map_row["filename"]).is_file() and map_row["log_tokens"] == [nusc.log[0]["token"]]
    assert not (out / "maps" / "expansion").exists()


def test_given_counts_are_kept(tiny, tmp_path):
    path = tiny / "frames" / "drive-1" / "000001.json"
    frame = json.loads(path.read_text())
    frame["boxes"][0].update(num_lidar_pts=42)
    path.write_text(json.dumps(frame))
    s = import_frames(tiny, tmp_path / "dataroot")
    ann = json.loads((tmp_path / "dataroot" / "v1.0-trainval" / "sample_annotation.json").read_text())[0]
    assert s.counted_boxes == 1 and (ann["num_lidar_pts"], ann["num_radar_pts"]) == (42, 2)


def test_cli_imports_and_refuses_a_non_empty_out(tiny, tmp_path, monkeypatch, capsys):
    out = tmp_path / "dataroot"
    res = CliRunner().invoke(cli.app, ["data", "import", "--frames", str(tiny), "--out", str(out)])
    assert res.exit_code == 0, res.output + repr(res.exception)
    assert "1 samples" in res.output and "note: the stack still needs" in res.output
    monkeypatch.setattr(sys, "argv", ["perception", "data", "import", "--frames", str(tiny), "--out", str(out)])
    with pytest.raises(SystemExit) as info:
        cli.main()
    err = capsys.readouterr().err
    assert info.value.code == 2 and err == f"error: {out}: output folder exists and is not empty\n"
    assert not list(tmp_path.glob(".*.partial"))


def test_a_devkit_split_name_with_other_scenes_is_refused(tiny, tmp_path):
    (tiny / "splits.json").write_text(json.dumps({"val": ["drive-1"]}))
    with pytest.raises(DataError) as info:
        import_frames(tiny, tmp_path / "dataroot")
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(f"{tiny / 'splits.json'}: val: this name is a devkit split name"), msg
    assert not (tmp_path / "dataroot").exists() and not list(tmp_path.glob(".*.partial"))
