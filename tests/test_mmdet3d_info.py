"""mmdet3d v2 info files: mmdetection3d's own test file (tests/data/mmdet3d_nuscenes, real nuScenes boxes and
calibrations) and a file written from the synthetic devkit tables, through the reader and the commands."""

from __future__ import annotations

import json
import pickle
import re
import shutil
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from perception.cli import app
from perception.config import load_config
from perception.data.collate import collate_samples
from perception.data.dataset import DatasetConfig, NuScenesDataset
from perception.data.loading import invert_rigid
from perception.data.mmdet3d_info import read_mmdet3d_infos, write_mmdet3d_infos
from perception.data.transforms import ImageAugConfig
from perception.errors import DataError
from perception.structures import CAMERA_CHANNELS, DETECTION_CLASSES
from tests.test_training import FAST, TINY

FIXTURE = Path(__file__).resolve().parent / "data" / "mmdet3d_nuscenes"
INFO = FIXTURE / "nus_info.pkl"
# mmdet3d's NuScenesDataset class order (METAINFO['classes']), which bbox_label_3d indexes; written out, not imported.
MM_CLASSES = ("car", "truck", "trailer", "bus", "construction_vehicle", "bicycle", "motorcycle", "pedestrian",
              "traffic_cone", "barrier")
VEHICLES = ("car", "truck", "trailer", "bus", "construction_vehicle")


def _pkl(path: Path = INFO) -> dict:
    with open(path, "rb") as f:
        return pickle.load(f)


def _kept(data: dict) -> list[list[dict]]:
    """Per sample, the instances a reader should keep: a label of the 10 classes and a LiDAR or radar return."""
    return [[i for i in info["instances"] if 0 <= i["bbox_label_3d"] < 10 and i["num_lidar_pts"] + i["num_radar_pts"] > 0]
            for info in data["data_list"]]


def _copy_fixture(dst: Path) -> Path:
    shutil.copytree(FIXTURE, dst, symlinks=True)
    return dst


# ------------------------------------------------------------------------------- the real fixture (c, d)


def test_fixture_labels_follow_mmdet3d_class_order(tmp_path):
    data = _pkl()
    assert "CLASSES" in data["metainfo"] and "categories" not in data["metainfo"]
    expected = Counter(MM_CLASSES[i["bbox_label_3d"]] for inst in _kept(data) for i in inst)
    index = read_mmdet3d_infos(INFO, FIXTURE)
    assert Counter(DETECTION_CLASSES[k] for k in index.labels) == expected
    assert sum(expected.values()) == 71 and len(expected) == 10
    assert np.diff(index.box_offsets).tolist() == [len(k) for k in _kept(data)]

    # the same labels through the other tables: a permuted `categories` dict, a `classes` list, no metainfo
    perm = [3, 0, 9, 1, 2, 8, 4, 7, 6, 5]  # new label of old label k
    variants = {
        "categories": {**data, "metainfo": {"categories": {MM_CLASSES[k]: perm[k] for k in range(10)}},
                       "data_list": [{**info, "instances": [{**i, "bbox_label_3d": perm[i["bbox_label_3d"]]}
                                                           for i in info["instances"]]} for info in data["data_list"]]},
        "classes": {**data, "metainfo": {"classes": list(MM_CLASSES)}},
        "none": {"data_list": data["data_list"]},
    }
    for name, variant in variants.items():
        path = tmp_path / f"{name}.pkl"
        path.write_bytes(pickle.dumps(variant))
        other = read_mmdet3d_infos(path, FIXTURE)
        np.testing.assert_array_equal(other.labels, index.labels, err_msg=name)

    # labels that map to no class of ours: an error naming the file, not an empty dataset
    path = tmp_path / "unknown.pkl"
    path.write_bytes(pickle.dumps({**data, "metainfo": {"classes": [f"sign_{k}" for k in range(10)]}}))
    with pytest.raises(DataError, match=r"unknown\.pkl: none of the 75 instances has a label of our classes"):
        read_mmdet3d_infos(path, FIXTURE)


def test_fixture_image_sizes_come_from_the_jpeg_headers(tmp_path):
    index = read_mmdet3d_infos(INFO, FIXTURE)
    for rel in {str(p) for p in index.cam_paths.ravel()}:
        h, w = cv2.imread(str(FIXTURE / rel)).shape[:2]  # a full decode, independent of the header parse
        assert (w, h) == (1600, 900)
    assert (index.cam_wh == np.array([1600, 900])).all()
    root = _copy_fixture(tmp_path / "root")
    gone = root / index.cam_paths[1, 2]
    gone.unlink()
    with pytest.raises(DataError, match=re.escape(f"{gone}, sample {index.tokens[1]}: camera image not found")):
        read_mmdet3d_infos(INFO, root)
    assert len(read_mmdet3d_infos(INFO, root, skip_bad_samples=True)) == 1


def test_fixture_box_and_sweep_conventions():
    """The fixture holds mmdet3d < 1.0 boxes ([w, l, h], -yaw - pi/2); checked against physics, not the formula:
    vehicles are longer than wide, move along their heading, and stand on the ground 1.84 m below the LiDAR."""
    data = _pkl()
    index = read_mmdet3d_infos(INFO, FIXTURE)
    assert read_mmdet3d_infos(INFO, FIXTURE, box_convention="legacy").boxes.tobytes() == index.boxes.tobytes()
    veh = np.isin(index.labels, [DETECTION_CLASSES.index(c) for c in VEHICLES])
    b = index.boxes[veh]
    assert veh.sum() == sum(MM_CLASSES[i["bbox_label_3d"]] in VEHICLES for k in _kept(data) for i in k) == 47
    assert (b[:, 3] < b[:, 4]).all()  # w < l
    speed = np.hypot(b[:, 7], b[:, 8])
    moving = speed > 1.0
    assert moving.sum() == 4
    off = (b[moving, 6] - np.arctan2(b[moving, 8], b[moving, 7]) + np.pi / 2) % np.pi - np.pi / 2
    assert np.abs(off).max() < 0.1  # 0.04-0.05 rad; read as mmdet3d >= 1.0 boxes they are 0.93 and 1.52 rad off
    for i, info in enumerate(data["data_list"]):
        ground = -info["lidar_points"]["lidar2ego"][2][3]
        bi = index.boxes[index.box_offsets[i]:index.box_offsets[i + 1]][veh[index.box_offsets[i]:index.box_offsets[i + 1]]]
        assert abs(np.median(bi[:, 2] - bi[:, 5] / 2) - ground) < 0.05  # centre z: bottoms 1.5 cm off the ground

    # sample 2's sweeps store lidar2sensor under `lidar2cam`: it must equal the sweep's pose chain
    assert np.diff(index.lidar_offsets).tolist() == [1, 3]
    info = data["data_list"][1]
    key2global = np.asarray(info["ego2global"]) @ np.asarray(info["lidar_points"]["lidar2ego"])
    for k, sw in enumerate(info["lidar_sweeps"]):
        sweep2global = np.asarray(sw["ego2global"]) @ np.asarray(sw["lidar_points"]["lidar2ego"])
        np.testing.assert_allclose(index.lidar_sweep2lidar[2 + k], np.linalg.inv(key2global) @ sweep2global, atol=1e-4)
        assert index.lidar_dt[2 + k] == pytest.approx(info["timestamp"] - sw["timestamp"], abs=1e-6)


def test_train_cli_on_the_fixture_trains_on_its_boxes(tmp_path, monkeypatch):
    """`perception train --info` on mmdetection3d's real file: one step, with its real boxes as targets."""
    import perception.model.bevfusion as bevfusion

    calls = []
    real = bevfusion.build_detection_targets

    def spy(boxes, labels, attributes, num_boxes, grid, *args, **kwargs):
        out = real(boxes, labels, attributes, num_boxes, grid, *args, **kwargs)
        calls.append((boxes.clone(), labels.clone(), num_boxes.clone(), out))
        return out

    monkeypatch.setattr(bevfusion, "build_detection_targets", spy)
    overrides = ["data.image_size=[64,176]", "grid.cell=1.6", "data.lidar_sweeps=2", "data.bev_aug=false",
                 "train.batch_size=2", "train.num_workers=0", "train.warmup_steps=1", "model.fuser.paired_drop=[]"]
    res = CliRunner().invoke(app, ["train", "--config", str(TINY), "--info", str(INFO), "--data", str(FIXTURE),
                                   "--max-steps", "1", "--work-dir", str(tmp_path / "w"), "--device", "cpu", *overrides])
    assert res.exit_code == 0, res.output + repr(res.exception)
    assert (tmp_path / "w" / "checkpoints" / "last.pt").is_file()

    grid = load_config(TINY, overrides).grid
    expected = 0
    for kept in _kept(_pkl()):
        xy = np.array([i["bbox_3d"][:2] for i in kept])
        expected += int(((xy[:, 0] >= grid.x_min) & (xy[:, 0] < grid.x_max)
                         & (xy[:, 1] >= grid.y_min) & (xy[:, 1] < grid.y_max)).sum())
    assert expected == 67  # 71 boxes with returns, 4 beyond 51.2 m
    boxes, labels, num_boxes, targets = calls[0]
    assert sorted(num_boxes.tolist()) == [34, 37]
    assert all(len(c[3].regression) == expected for c in calls)
    veh = torch.isin(labels, torch.tensor([DETECTION_CLASSES.index(c) for c in VEHICLES]))
    assert (boxes[veh, 3] < boxes[veh, 4]).all()  # the targets' vehicles are longer than wide


# ------------------------------------------------------------------------- written from the devkit tables


@pytest.fixture(scope="module")
def val_info(synth_root, tmp_path_factory):
    return write_mmdet3d_infos(synth_root, "v1.0-mini", "mini_val", tmp_path_factory.mktemp("info") / "val.pkl")


def test_info_from_the_tables_loads_as_the_devkit_index(synth_root, val_info):
    """mmdet3d's converter conventions (devkit Box in LIDAR_TOP, yaw_pitch_roll, sizes l, w, h, velocities rotated
    into LIDAR_TOP, obtain_sensor2top) read back to exactly what the devkit path builds."""
    cfg = DatasetConfig(image=ImageAugConfig(final_hw=(128, 352)))
    dev = NuScenesDataset(synth_root, "v1.0-mini", "mini_val", config=cfg)
    index = read_mmdet3d_infos(val_info, synth_root)
    info = NuScenesDataset(synth_root, config=cfg, index=index)
    assert sorted(index.tokens.tolist()) == sorted(dev.index.tokens.tolist())
    assert read_mmdet3d_infos(val_info, synth_root, box_convention="current").boxes.tobytes() == index.boxes.tobytes()
    row = {t: j for j, t in enumerate(index.tokens.tolist())}
    total = 0
    for i, token in enumerate(dev.index.tokens.tolist()):
        j = row[token]
        for key in ("lidar2ego", "ego2global", "cam_intrinsics", "cam2lidar", "cam_wh", "timestamps"):
            np.testing.assert_allclose(getattr(index, key)[j], getattr(dev.index, key)[i], atol=1e-9, err_msg=key)
        a, b = slice(dev.index.lidar_offsets[i], dev.index.lidar_offsets[i + 1]), slice(index.lidar_offsets[j], index.lidar_offsets[j + 1])
        assert index.lidar_paths[b].tolist() == dev.index.lidar_paths[a].tolist()
        np.testing.assert_allclose(index.lidar_sweep2lidar[b], dev.index.lidar_sweep2lidar[a], atol=1e-9)
        np.testing.assert_array_equal(index.lidar_dt[b], dev.index.lidar_dt[a])
        # every box of the devkit path is in the file, equal in float32 up to 1e-9 (velocities of parked cars are
        # float64 rounding noise, ~1e-14) and yaw up to a float32 ulp modulo 2 pi (a heading of pi can come out
        # as -pi); the file also has those the devkit path leaves out (beyond the class range, bicycles in racks)
        ours, labels, _ = dev.index.boxes_of(i)
        theirs, their_labels, _ = index.boxes_of(j)
        for box, label in zip(ours, labels):
            dyaw = (theirs[:, 6].astype(np.float64) - box[6] + np.pi) % (2 * np.pi) - np.pi
            same = (np.abs(np.delete(theirs - box, 6, axis=1)).max(1) < 1e-9) & (np.abs(dyaw) < 1e-6)
            hit = np.flatnonzero(same)
            assert len(hit) == 1 and their_labels[hit[0]] == label
        total += len(ours)
        x, y = dev[i], info[j]
        for key in ("images", "cam2img", "img_aug", "points_lidar"):
            assert torch.equal(getattr(x, key), getattr(y, key)), key
        torch.testing.assert_close(y.cam2lidar, x.cam2lidar, atol=1e-12, rtol=0)
        assert y.points_radar.shape == (0, 7) and not y.has_radar and x.has_radar
        assert not y.has_map and not y.has_scene_tags
    assert total > 50
    batch = collate_samples([info[0], dev[0]])
    assert batch.modality_mask.tolist() == [[True, True, False], [True, True, True]]


@pytest.fixture(scope="module")
def tiny_checkpoint(synth_root, tmp_path_factory):
    from perception.training import RunSpec, Trainer

    work = tmp_path_factory.mktemp("ckpt")
    trainer = Trainer(load_config(TINY, FAST), RunSpec(data=synth_root, work_dir=work, max_steps=1, device="cpu",
                                                       progress=False))
    trainer.fit()
    trainer.close()
    return work / "checkpoints" / "last.pt"


def _eval(args: list[str], out: Path) -> tuple[dict, dict]:
    res = CliRunner().invoke(app, ["eval", *args, "--out", str(out)])
    assert res.exit_code == 0, res.output + repr(res.exception)
    sub = out / "submission.json"
    return json.loads((out / "metrics.json").read_text()), json.loads(sub.read_text()) if sub.exists() else {}


def test_eval_info_gives_the_split_metrics(synth_root, val_info, tiny_checkpoint, tmp_path):
    """`perception eval --info` on a file written from mini_val = `perception eval --split mini_val` with the same
    checkpoint (without radar: the file has none), and the devkit's own split path scores a submission the same."""
    common = ["--checkpoint", str(tiny_checkpoint), "--data", str(synth_root), "--device", "cpu", "--workers", "0"]
    m_split, s_split = _eval([*common, "--split", "mini_val", "--modalities", "camera,lidar"], tmp_path / "split")
    m_info, s_info = _eval([*common, "--info", str(val_info)], tmp_path / "info")
    assert s_info["meta"] == s_split["meta"] and set(s_info["results"]) == set(s_split["results"])
    for token, boxes in s_split["results"].items():
        assert len(s_info["results"][token]) == len(boxes)
        for a, b in zip(boxes, s_info["results"][token]):
            assert a["detection_name"] == b["detection_name"] and a["detection_score"] == b["detection_score"]
            for key in ("translation", "size", "rotation", "velocity"):
                np.testing.assert_allclose(b[key], a[key], rtol=0, atol=1e-9)
    assert sum(map(len, s_info["results"].values())) > 0
    assert m_info["nds"] == m_split["nds"] and m_info["map"] == m_split["map"]
    assert m_info["num_samples"] == m_split["num_samples"] == 6 and m_info["modalities"]["radar"] is False

    # a submission with non-zero metrics: the ground truth moved 1 m, scored on the file's samples and on the split
    from perception.data.submission import gt_submission

    sub = json.loads(gt_submission(synth_root, "v1.0-mini", "mini_val", tmp_path / "gt.json").read_text())
    for entries in sub["results"].values():
        for e in entries:
            e["translation"][0] += 1.0
    (tmp_path / "shifted.json").write_text(json.dumps(sub))
    common = ["--results", str(tmp_path / "shifted.json"), "--data", str(synth_root)]
    m_split, _ = _eval([*common, "--split", "mini_val"], tmp_path / "r_split")
    m_info, _ = _eval([*common, "--info", str(val_info)], tmp_path / "r_info")
    assert 0.3 < m_split["nds"] < 0.9
    for key in ("nds", "map", "mate", "mase", "maoe", "mave", "maae", "per_class_ap"):
        assert m_info[key] == m_split[key], key


def test_eval_info_needs_the_samples_in_the_tables(synth_root, val_info, tiny_checkpoint, tmp_path):
    data = _pkl(val_info)
    data["data_list"][0]["token"] = "not-a-sample-token"
    bad = tmp_path / "bad.pkl"
    bad.write_bytes(pickle.dumps(data))
    runner = CliRunner()
    res = runner.invoke(app, ["eval", "--checkpoint", str(tiny_checkpoint), "--data", str(synth_root), "--info", str(bad),
                              "--out", str(tmp_path / "a"), "--device", "cpu"])
    assert isinstance(res.exception, DataError)
    assert str(res.exception).startswith(f"{bad}: 1 sample token(s) are not in the v1.0-mini tables")
    # the fixture's dataroot has no tables: said before any inference
    res = runner.invoke(app, ["eval", "--checkpoint", str(tiny_checkpoint), "--data", str(FIXTURE), "--info", str(INFO),
                              "--out", str(tmp_path / "b"), "--device", "cpu"])
    assert isinstance(res.exception, DataError) and "no v1.0-mini tables" in str(res.exception)
    assert not (tmp_path / "b" / "submission.json").exists()


def test_viz_robustness_and_bench_take_info(synth_root, val_info, tiny_checkpoint, tmp_path):
    runner = CliRunner()
    res = runner.invoke(app, ["viz", "--data", str(FIXTURE), "--info", str(INFO), "--out", str(tmp_path / "viz"),
                              "--checkpoint", str(tiny_checkpoint), "--device", "cpu"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    for token in _pkl()["data_list"]:
        assert (tmp_path / "viz" / f"{token['token']}_boxes_pred.ply").is_file()
    res = runner.invoke(app, ["robustness", "--checkpoint", str(tiny_checkpoint), "--data", str(synth_root), "--info",
                              str(val_info), "--out", str(tmp_path / "rob"), "--conditions", "lidar_missing",
                              "--device", "cpu", "--workers", "0"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    assert set(json.loads((tmp_path / "rob" / "robustness.json").read_text())) == {"clean", "lidar_missing"}
    res = runner.invoke(app, ["bench", "data", "--data", str(FIXTURE), "--info", str(INFO), "--workers", "0",
                              "--samples", "2", "--repeats", "1", "data.lidar_sweeps=1"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    assert "6 x 1600x900" in res.output and "radar files/sample 0.0" in res.output


def test_export_calibration_and_latency_bench_take_info(tmp_path):
    """INT8 calibration on the fixture's samples (`export --calib-info`) and `bench latency --info`."""
    from perception.model.build import build_model
    from perception.checkpoint import save_atomic

    small = ["data.image_size=[64,176]", "grid.cell=1.6", "data.lidar_sweeps=2"]
    cfg = load_config(TINY, small)
    ckpt = tmp_path / "random.pt"
    save_atomic({"model": build_model(cfg).state_dict(), "ema": None, "config": cfg.model_dump(mode="json"), "step": 0}, ckpt)
    runner = CliRunner()
    res = runner.invoke(app, ["export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "export"), "--int8",
                              "--calib-data", str(FIXTURE), "--calib-info", str(INFO), "--calib-samples", "2"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    manifest = json.loads((tmp_path / "export" / "manifest.json").read_text())
    assert manifest["quantization"]["calibration_samples"] == 2
    assert manifest["quantization"]["calibration_data"] == {"calib_data": str(FIXTURE), "info": str(INFO)}
    out = tmp_path / "latency.json"
    res = runner.invoke(app, ["bench", "latency", "--config", str(TINY), "--data", str(FIXTURE), "--info", str(INFO),
                              "--iterations", "1", "--warmup", "0", "--out", str(out), *small])
    assert res.exit_code == 0, res.output + repr(res.exception)
    assert json.loads(out.read_text())["input"]["source"] == str(INFO)


def test_train_with_info_files_validates_on_the_val_file(synth_root, val_info, tmp_path):
    train_info = write_mmdet3d_infos(synth_root, "v1.0-mini", "mini_train", tmp_path / "train.pkl")
    runner = CliRunner()
    res = runner.invoke(app, ["train", "--config", str(TINY), "--data", str(synth_root), "--info", str(train_info),
                              "--val-info", str(val_info), "--max-steps", "1", "--work-dir", str(tmp_path / "w"),
                              "--device", "cpu", *FAST, "train.val_every=1"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    metrics = json.loads((tmp_path / "w" / "val" / "step_0000001" / "metrics.json").read_text())
    assert metrics["num_samples"] == 6 and metrics["modalities"]["radar"] is False
    # validation needs the tables: said at the start, not after training
    res = runner.invoke(app, ["train", "--config", str(TINY), "--data", str(FIXTURE), "--info", str(INFO),
                              "--max-steps", "1", "--work-dir", str(tmp_path / "f"), "--device", "cpu", *FAST,
                              "train.val_every=1"])
    assert isinstance(res.exception, DataError) and "no v1.0-mini tables" in str(res.exception)
    assert not (tmp_path / "f" / "checkpoints").exists()
