"""`perception data corrupt` (perception/data/corrupt.py): every corruption at severities 1 and 5 writes a dataroot
the devkit loads, with the ground truth untouched, the source unchanged and the output deterministic; fog, snow,
dropout, incomplete echo, beam reduction, spatial and temporal misalignment and lost cameras checked against closed
forms; links, symlink fallback, splits and bad input."""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import stat
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from nuscenes.nuscenes import NuScenes
from nuscenes.utils.data_classes import RadarPointCloud
from pyquaternion import Quaternion
from typer.testing import CliRunner

from perception import cli
from perception.data.corrupt import CORRUPTIONS, corrupt_dataroot, list_corruptions
from perception.data.corrupt_lidar import LIDAR_RINGS
from perception.data.loading import read_lidar_bin, read_radar_pcd
from perception.errors import ConfigError
from perception.structures import CAMERA_CHANNELS

VERSION = "v1.0-mini"
SPLIT = "mini_val"


def _tree(root: Path) -> dict[str, tuple]:
    """rel path -> (size, mtime_ns, sha256) of every file under `root`, and (mode,) of every folder."""
    out = {}
    for dirpath, dirs, files in os.walk(root):
        out[os.path.relpath(dirpath, root) + "/"] = (stat.S_IMODE(os.stat(dirpath).st_mode),)
        for name in files:
            p = Path(dirpath) / name
            st = p.stat()
            out[p.relative_to(root).as_posix()] = (st.st_size, st.st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
    return out


def _chmod_tree(root: Path, file_mode: int, dir_mode: int) -> None:
    for dirpath, dirs, files in os.walk(root, topdown=False):
        for name in files:
            os.chmod(Path(dirpath) / name, file_mode)
        os.chmod(dirpath, dir_mode)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A tiny synthetic dataroot (scene-0061 in mini_train, scene-0103 in mini_val; 4 samples each, 160x90 images,
    one LiDAR and one radar sweep per keyframe), read-only for the module; yields (root, snapshot of its tree)."""
    from perception.data.synth.generate import SynthConfig, generate

    root = tmp_path_factory.mktemp("corrupt_src") / "nuscenes"
    generate(root, SynthConfig(num_scenes=2, samples_per_scene=4, image_width=160, image_height=90, lidar_sweeps=1,
                               radar_sweeps=1), workers=1, progress=False)
    _chmod_tree(root, 0o444, 0o555)
    try:
        yield root, _tree(root)
    finally:
        _chmod_tree(root, 0o644, 0o755)


@pytest.fixture(scope="module")
def source_nusc(source):
    return NuScenes(VERSION, str(source[0]), verbose=False)


def _val_scene(nusc) -> dict:
    return next(s for s in nusc.scene if s["name"] == "scene-0103")


def _scene_of(nusc, sd) -> str:
    return nusc.get("scene", nusc.get("sample", sd["sample_token"])["scene_token"])["name"]


def _chains_consistent(nusc) -> None:
    """Every prev/next link is mirrored, and each chain stays in one scene and one channel."""
    for sd in nusc.sample_data:
        for key, back in (("prev", "next"), ("next", "prev")):
            if sd[key]:
                other = nusc.get("sample_data", sd[key])
                assert other[back] == sd["token"] and other["channel"] == sd["channel"]
                assert _scene_of(nusc, other) == _scene_of(nusc, sd)
                assert (other["timestamp"] < sd["timestamp"]) == (key == "prev")


def _gray(path: Path) -> np.ndarray:
    return cv2.imread(str(path), cv2.IMREAD_GRAYSCALE).astype(np.float64)


def _change(name: str, src: Path, out: Path, src_nusc, out_nusc) -> float:
    """How much `out` differs from `src` for corruption `name`, one number per kind of corruption."""
    spec = CORRUPTIONS[name]
    if spec.action == "remove":
        return len(src_nusc.sample_data) - len(out_nusc.sample_data)
    if spec.action == "calibration":
        return sum(_rotation_angle(src_nusc.get("calibrated_sensor", sd["calibrated_sensor_token"])["rotation"],
                                   out_nusc.get("calibrated_sensor", sd["calibrated_sensor_token"])["rotation"])
                   for sd in out_nusc.sample_data if sd["channel"].startswith("CAM"))
    if spec.action == "delay":  # total lag, in microseconds, of the data each record now points at
        ts = {sd["filename"]: sd["timestamp"] for sd in src_nusc.sample_data}
        return sum(sd["timestamp"] - ts[sd["filename"]] for sd in out_nusc.sample_data)
    files = json.loads((out / "corruption.json").read_text())
    total = 0.0
    for sd in out_nusc.sample_data:
        if _scene_of(out_nusc, sd) != "scene-0103" or sd["sensor_modality"] != spec.sensor:
            continue
        a, b = src / sd["filename"], out / sd["filename"]
        if spec.action == "image":  # 1 - correlation of the grey images: contrast, structure and level lost
            x, y = _gray(a).ravel(), _gray(b).ravel()
            total += 1 - np.corrcoef(x, y)[0, 1] if y.std() > 0 else 1.0
        elif spec.action == "lidar":
            p, q = read_lidar_bin(a), read_lidar_bin(b)
            total += abs(len(p) - len(q)) / len(p)
            if len(p) == len(q):
                total += float(np.abs(p[:, :3] - q[:, :3]).mean())
        else:
            total += abs(len(read_radar_pcd(a)) - len(read_radar_pcd(b)))
    assert files["files_corrupted"] > 0
    return total


def _rotation_angle(q1, q2) -> float:
    d = abs(float(np.dot(np.asarray(q1) / np.linalg.norm(q1), np.asarray(q2) / np.linalg.norm(q2))))
    return 2 * math.acos(min(1.0, d))


def _out_files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_every_corruption_at_severity_1_and_5(name, source, source_nusc, tmp_path):
    src, snapshot = source
    outs, changes = {}, {}
    for tag, severity in (("s1", 1), ("s5", 5), ("s5bis", 5)):
        out = tmp_path / tag
        report = corrupt_dataroot(src, VERSION, out, name, severity, split=SPLIT, seed=7)
        assert report.files_corrupted + report.records_removed + report.records_changed > 0
        nusc = NuScenes(VERSION, str(out), verbose=False)
        assert (out / VERSION / "sample_annotation.json").read_bytes() == (src / VERSION / "sample_annotation.json").read_bytes()
        assert len(nusc.sample) == len(source_nusc.sample) and len(nusc.sample_annotation) == len(source_nusc.sample_annotation)
        _chains_consistent(nusc)
        for sd in nusc.sample_data:  # every file the tables name is there and reads
            path = out / sd["filename"]
            if sd["sensor_modality"] == "lidar":
                read_lidar_bin(path)
            elif sd["sensor_modality"] == "radar":
                RadarPointCloud.from_file(str(path))
            else:
                assert cv2.imread(str(path)) is not None
        outs[tag] = out
        if tag != "s5bis":
            changes[tag] = _change(name, src, out, source_nusc, nusc)
    assert changes["s5"] > changes["s1"] > 0, changes
    assert _out_files(outs["s5"]) == _out_files(outs["s5bis"])  # byte-identical for a seed
    assert _tree(src) == snapshot  # the source is untouched: sizes, mtimes, contents, modes


def _xyz_keys(points: np.ndarray) -> np.ndarray:
    """One opaque 12-byte key per point: its exact x, y, z."""
    return np.ascontiguousarray(points[:, :3]).view(np.dtype((np.void, 12))).ravel()


def _survival_check(name, severity, expected, source, tmp_path, moved_max_m=None):
    """Run `name` and compare, per range bin, the share of the source's LiDAR returns found unchanged (same xyz) in
    the output with `expected(points)` (per-point survival probabilities), within 4 binomial sigmas; returns the
    output points that are not source points (moved or new) and the number of returns lost."""
    src, _ = source
    out = tmp_path / name
    corrupt_dataroot(src, VERSION, out, name, severity, split=SPLIT, seed=3)
    nusc = NuScenes(VERSION, str(out), verbose=False)
    survived, p_all, r_all, new, lost = [], [], [], [], 0
    for sd in nusc.sample_data:
        if sd["channel"] != "LIDAR_TOP" or _scene_of(nusc, sd) != "scene-0103":
            continue
        p, q = read_lidar_bin(src / sd["filename"]), read_lidar_bin(out / sd["filename"])
        here = np.isin(_xyz_keys(p), _xyz_keys(q))
        survived.append(here)
        p_all.append(expected(p))
        r_all.append(np.linalg.norm(p[:, :3].astype(np.float64), axis=1))
        new.append(q[~np.isin(_xyz_keys(q), _xyz_keys(p))])
        lost += int((~here).sum())
    survived, p_all, r_all = np.concatenate(survived), np.concatenate(p_all), np.concatenate(r_all)
    checked = 0
    for lo in range(0, 80, 10):
        m = (r_all >= lo) & (r_all < lo + 10)
        n = int(m.sum())
        if n < 100:
            continue
        mean_p = float(p_all[m].mean())
        tol = 4 * math.sqrt(max(float((p_all[m] * (1 - p_all[m])).sum()), 1.0)) / n + 1e-3
        assert abs(survived[m].mean() - mean_p) <= tol, (name, lo, survived[m].mean(), mean_p, tol)
        checked += 1
    assert checked >= 4
    return np.concatenate(new) if new else np.zeros((0, 5), np.float32), lost


def test_fog_removes_returns_by_range_and_adds_near_backscatter(source, tmp_path):
    alpha, share = 0.03, 0.4  # severity 4 (docs/robustness.md: Hahner et al.'s alpha, our backscatter share)
    new, lost = _survival_check("fog_lidar", 4, lambda p: np.exp(-2 * alpha * np.linalg.norm(p[:, :3].astype(np.float64), axis=1)),
                                source, tmp_path)
    r = np.linalg.norm(new[:, :3].astype(np.float64), axis=1)
    assert len(new) and r.max() <= 10 + 1e-3  # backscatter only within 10 m
    assert abs(len(new) - share * lost) <= 4 * math.sqrt(lost * share * (1 - share)) + 1
    assert new[:, 3].max() < 10


def test_snow_loses_returns_to_flakes_and_echoes_near_ones(source, tmp_path):
    rate = 0.010  # flakes per metre at severity 5
    new, lost = _survival_check("snow_lidar", 5, lambda p: np.exp(-rate * np.linalg.norm(p[:, :3].astype(np.float64), axis=1)),
                                source, tmp_path)
    r = np.linalg.norm(new[:, :3].astype(np.float64), axis=1)
    assert len(new) and r.min() >= 1 - 1e-3 and r.max() <= 10 + 1e-3


def test_point_dropout_and_incomplete_echo_thin_as_documented(source, tmp_path):
    _survival_check("point_dropout", 2, lambda p: np.full(len(p), 1 - 0.375), source, tmp_path)

    def echo(p):  # the weakest quarter (ties in file order) survives with 1 - 0.85 at severity 3
        weak = np.zeros(len(p), bool)
        weak[np.argsort(p[:, 3], kind="stable")[:len(p) // 4]] = True
        return np.where(weak, 0.15, 1.0)

    new, _ = _survival_check("incomplete_echo", 3, echo, source, tmp_path)
    assert len(new) == 0


@pytest.mark.parametrize("severity,beams", [(1, 24), (2, 16), (3, 12), (4, 8), (5, 4)])
def test_beam_reduction_keeps_exactly_the_chosen_rings(severity, beams, source, tmp_path):
    src, _ = source
    out = tmp_path / "beams"
    corrupt_dataroot(src, VERSION, out, "beam_reduction", severity, split=SPLIT)
    rings = sorted({i * LIDAR_RINGS // beams for i in range(beams)})  # evenly spaced: floor(i * 32 / n)
    assert len(rings) == beams
    nusc = NuScenes(VERSION, str(out), verbose=False)
    checked = 0
    for sd in nusc.sample_data:
        if sd["channel"] == "LIDAR_TOP" and _scene_of(nusc, sd) == "scene-0103":
            p, q = read_lidar_bin(src / sd["filename"]), read_lidar_bin(out / sd["filename"])
            assert len(np.unique(p[:, 4])) == LIDAR_RINGS
            np.testing.assert_array_equal(q, p[np.isin(p[:, 4], rings)])
            assert sorted(np.unique(q[:, 4]).astype(int)) == rings
            checked += 1
    assert checked >= 4


@pytest.mark.parametrize("severity", [1, 5])
def test_spatial_misalignment_moves_projections_by_f_tan_theta(severity, source, source_nusc, tmp_path):
    src, _ = source
    out = tmp_path / "spatial"
    corrupt_dataroot(src, VERSION, out, "spatial_misalignment", severity, split=SPLIT, seed=11)
    nusc = NuScenes(VERSION, str(out), verbose=False)
    sigma = 2 * 0.002 * severity  # Dong et al.'s rotation noise per matrix entry
    theta = 2 * sigma / math.sqrt(math.pi)  # the mean angle of that noise's rotation part
    rng = np.random.default_rng(0)
    seen = set()
    for sd in nusc.sample_data:
        if sd["sensor_modality"] != "camera":
            continue
        old_cs = source_nusc.get("calibrated_sensor", source_nusc.get("sample_data", sd["token"])["calibrated_sensor_token"])
        new_cs = nusc.get("calibrated_sensor", sd["calibrated_sensor_token"])
        if _scene_of(nusc, sd) != "scene-0103":
            assert new_cs == {**old_cs, "token": new_cs["token"]} and new_cs["token"] == old_cs["token"]
            continue
        if new_cs["token"] in seen:
            continue
        seen.add(new_cs["token"])
        assert new_cs["translation"] == old_cs["translation"] and new_cs["camera_intrinsic"] == old_cs["camera_intrinsic"]
        K = np.array(old_cs["camera_intrinsic"])
        f = K[0, 0]
        assert K[1, 1] == f
        R_old, R_new = Quaternion(old_cs["rotation"]).rotation_matrix, Quaternion(new_cs["rotation"]).rotation_matrix
        t = np.array(old_cs["translation"])

        def project(R, p_ego):
            c = R.T @ (p_ego - t)
            return (K @ c)[:2] / c[2]

        on_axis = t + R_old @ np.array([0.0, 0.0, 20.0])  # a point 20 m down the original optical axis
        shift = np.linalg.norm(project(R_new, on_axis) - K[:2, 2])
        assert shift == pytest.approx(f * math.tan(theta), rel=1e-6)
        # The perturbation, in the camera frame, is a rotation by theta about an axis in the image plane...
        delta = R_old.T @ R_new
        assert math.acos((np.trace(delta) - 1) / 2) == pytest.approx(theta, rel=1e-6)
        axis = np.array([delta[2, 1] - delta[1, 2], delta[0, 2] - delta[2, 0], delta[1, 0] - delta[0, 1]])
        axis /= np.linalg.norm(axis)
        assert abs(axis[2]) < 1e-9
        for _ in range(5):  # ...so the rays to any point's old and new pixels are phi apart (Rodrigues' formula)
            uv, depth = rng.uniform([10, 10], [150, 80]), rng.uniform(3, 60)
            p_ego = t + R_old @ (np.linalg.inv(K) @ np.array([*uv, 1.0]) * depth)
            rays = [np.linalg.inv(K) @ np.array([*project(R, p_ego), 1.0]) for R in (R_old, R_new)]
            rays = [r / np.linalg.norm(r) for r in rays]
            cos_phi = math.cos(theta) + (1 - math.cos(theta)) * float(axis @ rays[0]) ** 2
            assert rays[0] @ rays[1] == pytest.approx(cos_phi, abs=1e-12)
    assert len(seen) == len(CAMERA_CHANNELS)


def test_spatial_misalignment_gives_a_split_its_own_copy_of_a_shared_calibration(source, source_nusc, tmp_path):
    src, snapshot = source
    shared = tmp_path / "shared"  # the source, with scene-0103's cameras on scene-0061's calibration records
    for dirpath, dirs, files in os.walk(src):
        rel = Path(dirpath).relative_to(src)
        (shared / rel).mkdir(parents=True, exist_ok=True)
        for name in files:
            if rel.as_posix() == VERSION:
                (shared / rel / name).write_bytes((Path(dirpath) / name).read_bytes())
            else:
                os.link(Path(dirpath) / name, shared / rel / name)
    train_cs = {sd["channel"]: sd["calibrated_sensor_token"] for sd in source_nusc.sample_data
                if _scene_of(source_nusc, sd) == "scene-0061"}
    rows = json.loads((src / VERSION / "sample_data.json").read_text())
    val = {sd["token"] for sd in source_nusc.sample_data if _scene_of(source_nusc, sd) == "scene-0103"}
    for row in rows:
        if row["token"] in val:
            row["calibrated_sensor_token"] = train_cs[source_nusc.get("sample_data", row["token"])["channel"]]
    (shared / VERSION / "sample_data.json").write_text(json.dumps(rows))
    out = tmp_path / "out"
    report = corrupt_dataroot(shared, VERSION, out, "spatial_misalignment", 3, split=SPLIT)
    nusc = NuScenes(VERSION, str(out), verbose=False)
    assert len(nusc.calibrated_sensor) == len(source_nusc.calibrated_sensor) + len(CAMERA_CHANNELS)
    assert report.records_changed == len(CAMERA_CHANNELS) + sum(sd["token"] in val and sd["sensor_modality"] == "camera"
                                                                for sd in source_nusc.sample_data)
    for sd in nusc.sample_data:
        old = source_nusc.get("calibrated_sensor", train_cs[sd["channel"]])
        new = nusc.get("calibrated_sensor", sd["calibrated_sensor_token"])
        if sd["token"] in val and sd["sensor_modality"] == "camera":
            assert new["token"] != old["token"] and new["sensor_token"] == old["sensor_token"]
            assert _rotation_angle(old["rotation"], new["rotation"]) == pytest.approx(2 * 0.012 / math.sqrt(math.pi), rel=1e-6)
        elif _scene_of(nusc, sd) == "scene-0061":
            assert new == old  # the other scene keeps the calibration it shared
    assert _tree(src) == snapshot


@pytest.mark.parametrize("camera", [None, "CAM_BACK"])
def test_camera_crash_removes_a_camera_from_every_sample_of_the_scene(camera, source, source_nusc, tmp_path):
    src, _ = source
    out = tmp_path / "crash"
    report = corrupt_dataroot(src, VERSION, out, "camera_crash", 1, split=SPLIT, camera=camera)
    lost = camera or "CAM_FRONT"
    nusc = NuScenes(VERSION, str(out), verbose=False)
    _chains_consistent(nusc)
    for sample in nusc.sample:
        scene = nusc.get("scene", sample["scene_token"])["name"]
        expected = set(source_nusc.get("sample", sample["token"])["data"]) - ({lost} if scene == "scene-0103" else set())
        assert set(sample["data"]) == expected
    assert not [sd for sd in nusc.sample_data if sd["channel"] == lost and _scene_of(nusc, sd) == "scene-0103"]
    n_source = sum(sd["channel"] == lost and _scene_of(source_nusc, sd) == "scene-0103" for sd in source_nusc.sample_data)
    assert report.records_removed == n_source == 4
    # Our loader reads it with that camera absent (masked), the others as in the source.
    from perception.data.dataset import DatasetConfig, NuScenesDataset
    from perception.data.transforms import ImageAugConfig

    cfg = DatasetConfig(image=ImageAugConfig(final_hw=(32, 64)), lidar_sweeps=1, radar_sweeps=0, map="off")
    ds = NuScenesDataset(out, VERSION, SPLIT, config=cfg)
    assert len(ds) == 4
    c = CAMERA_CHANNELS.index(lost)
    for i in range(len(ds)):
        assert ds[i].camera_mask.tolist() == [k != c for k in range(len(CAMERA_CHANNELS))]
    # Severity 5 loses 5 of the 6 cameras, the named one among them.
    out5 = tmp_path / "crash5"
    corrupt_dataroot(src, VERSION, out5, "camera_crash", 5, split=SPLIT, camera=camera)
    nusc5 = NuScenes(VERSION, str(out5), verbose=False)
    left = {sd["channel"] for sd in nusc5.sample_data if sd["sensor_modality"] == "camera" and _scene_of(nusc5, sd) == "scene-0103"}
    assert len(left) == 1 and lost not in left


def test_frame_lost_relinks_chains_and_leaves_samples_without_the_lost_channel(source, source_nusc, tmp_path):
    src, _ = source
    out = tmp_path / "lost"
    report = corrupt_dataroot(src, VERSION, out, "frame_lost", 5, split=SPLIT, seed=5)
    nusc = NuScenes(VERSION, str(out), verbose=False)
    _chains_consistent(nusc)
    cams = [sd for sd in source_nusc.sample_data if sd["sensor_modality"] == "camera" and _scene_of(source_nusc, sd) == "scene-0103"]
    assert 0 < report.records_removed < len(cams)
    # 24 frames, each lost with probability 5/6: within 4 binomial sigmas.
    assert abs(report.records_removed - len(cams) * 5 / 6) <= 4 * math.sqrt(len(cams) * 5 / 36)
    missing = sum(len(source_nusc.get("sample", s["token"])["data"]) - len(s["data"]) for s in nusc.sample)
    assert missing == report.records_removed  # no camera sweeps here: every lost frame was a keyframe
    for chain_start in (sd for sd in nusc.sample_data if not sd["prev"]):  # each chain walks through its channel
        n, sd = 1, chain_start
        while sd["next"]:
            sd, n = nusc.get("sample_data", sd["next"]), n + 1
        assert n == sum(x["channel"] == chain_start["channel"] and _scene_of(nusc, x) == _scene_of(nusc, chain_start)
                        for x in nusc.sample_data)


@pytest.mark.parametrize("name,channels,k", [("temporal_misalignment", {"LIDAR_TOP"}, 2),
                                             ("temporal_misalignment_camera", set(CAMERA_CHANNELS), 2)])
def test_temporal_misalignment_points_each_record_k_records_back(name, channels, k, source, source_nusc, tmp_path):
    src, _ = source
    out = tmp_path / name
    corrupt_dataroot(src, VERSION, out, name, 1, split=SPLIT)
    nusc = NuScenes(VERSION, str(out), verbose=False)
    checked = 0
    for first in (sd for sd in source_nusc.sample_data if not sd["prev"]):
        chain = [first]
        while chain[-1]["next"]:
            chain.append(source_nusc.get("sample_data", chain[-1]["next"]))
        val = _scene_of(source_nusc, first) == "scene-0103" and first["channel"] in channels
        for i, sd in enumerate(chain):
            new = nusc.get("sample_data", sd["token"])
            assert new["timestamp"] == sd["timestamp"] and new["ego_pose_token"] == sd["ego_pose_token"]
            assert new["filename"] == (chain[max(i - k, 0)]["filename"] if val else sd["filename"])
            checked += val
    assert checked >= 8


def test_split_corrupts_every_file_of_its_scenes_and_links_the_rest(source, source_nusc, tmp_path):
    src, _ = source
    out = tmp_path / "split"
    report = corrupt_dataroot(src, VERSION, out, "point_dropout", 1, split=SPLIT)
    corrupted = linked = 0
    for sd in source_nusc.sample_data:
        a, b = os.stat(src / sd["filename"]), os.stat(out / sd["filename"])
        if sd["channel"] == "LIDAR_TOP" and _scene_of(source_nusc, sd) == "scene-0103":  # keyframes and sweeps
            assert b.st_ino != a.st_ino and b.st_nlink == 1  # written fresh, never through a link
            corrupted += 1
        else:
            assert b.st_ino == a.st_ino  # a hard link to the source
            linked += 1
    assert corrupted == report.files_corrupted == 8  # 4 keyframes + 4 sweeps
    assert any(not sd["is_key_frame"] for sd in source_nusc.sample_data if sd["channel"] == "LIDAR_TOP")
    assert report.files_symlinked == 0 and report.files_linked >= linked
    for p in (src / "maps").rglob("*"):
        if p.is_file():
            assert os.stat(out / p.relative_to(src)).st_ino == os.stat(p).st_ino
    assert report.extra_bytes >= sum((out / sd["filename"]).stat().st_size for sd in source_nusc.sample_data
                                     if sd["channel"] == "LIDAR_TOP" and _scene_of(source_nusc, sd) == "scene-0103")
    # Without a split every scene is corrupted.
    everything = corrupt_dataroot(src, VERSION, tmp_path / "all", "point_dropout", 1)
    assert everything.files_corrupted == 16 and everything.scenes == 2


def test_falls_back_to_symlinks_across_file_systems(source, monkeypatch, tmp_path):
    src, snapshot = source

    def no_hard_links(a, b, *args, **kwargs):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", no_hard_links)
    out = tmp_path / "symlinked"
    report = corrupt_dataroot(src, VERSION, out, "radar_clutter", 2, split=SPLIT)
    assert report.files_linked == 0 and report.files_symlinked > 0
    links = [p for p in out.rglob("*") if p.is_symlink()]
    assert len(links) == report.files_symlinked
    assert all(Path(os.readlink(p)).is_absolute() and Path(os.readlink(p)).resolve() == (src / p.relative_to(out)).resolve()
               for p in links)
    NuScenes(VERSION, str(out), verbose=False)
    assert _tree(src) == snapshot


def test_list_and_cli(source, tmp_path):
    lines = list_corruptions()
    assert len(lines) == len(CORRUPTIONS) and lines[2].split() == ["fog_camera", "camera"]
    assert {line.split()[1] for line in lines} == {"camera", "lidar", "radar"}
    res = CliRunner().invoke(cli.app, ["data", "corrupt", "--list"])
    assert res.exit_code == 0 and res.output.splitlines() == lines
    out = tmp_path / "cli"
    res = CliRunner().invoke(cli.app, ["data", "corrupt", "--data", str(source[0]), "--version", VERSION, "--out", str(out),
                                       "--corruption", "color_quant", "--severity", "2", "--split", SPLIT, "--seed", "1",
                                       "--workers", "2"])
    assert res.exit_code == 0, res.output
    assert "24 files corrupted" in res.output and "MB written" in res.output
    done = json.loads((out / "corruption.json").read_text())
    assert done["parameters"] == {"bits": 4} and done["scene_names"] == ["scene-0103"]
    # Two workers give the files one worker gives.
    corrupt_dataroot(source[0], VERSION, tmp_path / "one", "color_quant", 2, split=SPLIT, seed=1, workers=1)
    assert _out_files(out) == _out_files(tmp_path / "one")


@pytest.mark.parametrize("args,message", [
    (["--corruption", "haze", "--severity", "1"], "unknown corruption 'haze'"),
    (["--corruption", "fog_lidar", "--severity", "0"], "severity must be an integer 1..5"),
    (["--corruption", "fog_lidar", "--severity", "6"], "severity must be an integer 1..5"),
    (["--corruption", "fog_lidar"], "needs --data, --out, --corruption and --severity"),
    (["--corruption", "fog_lidar", "--severity", "2", "--camera", "CAM_FRONT"], "--camera applies to camera corruptions only"),
    (["--corruption", "camera_crash", "--severity", "2", "--camera", "CAM_ROOF"], "unknown camera 'CAM_ROOF'"),
    (["--corruption", "fog_lidar", "--severity", "2", "--split", "nope"], "unknown split 'nope'"),
])
def test_bad_input_is_one_error_line(args, message, source, tmp_path, monkeypatch, capsys):
    out = tmp_path / "bad"
    monkeypatch.setattr(sys, "argv", ["perception", "data", "corrupt", "--data", str(source[0]), "--out", str(out), *args])
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not out.exists()


def test_out_must_be_empty_and_outside_the_source(source, tmp_path):
    src, _ = source
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("x")
    with pytest.raises(ConfigError, match="must not exist or be an empty folder"):
        corrupt_dataroot(src, VERSION, busy, "fog_lidar", 1)
    with pytest.raises(ConfigError, match="outside the source"):
        corrupt_dataroot(src, VERSION, src / "corrupted", "fog_lidar", 1)
