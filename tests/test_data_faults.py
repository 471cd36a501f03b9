"""Bad input: each case raises a DataError naming the file and the sample; skip_bad_samples skips instead."""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import shutil

from pathlib import Path

import numpy as np
import pytest

from perception.data.dataset import DatasetConfig, NuScenesDataset
from perception.data.loading import read_lidar_bin, read_radar_pcd
from perception.data.mmdet3d_info import read_mmdet3d_infos
from perception.data.transforms import ImageAugConfig
from perception.errors import DataError

CFG = DatasetConfig(image=ImageAugConfig(final_hw=(64, 176)), lidar_sweeps=2, radar_sweeps=1, map="off")


@pytest.fixture(scope="module")
def ds(synth_root):
    return NuScenesDataset(synth_root, "v1.0-mini", "mini_val", config=CFG)


def _with_file(ds, kind: str, tmp_file, skip=False) -> NuScenesDataset:
    """The dataset with sample 0's first `kind` file replaced by an absolute path to `tmp_file`."""
    idx = ds.index
    if kind == "cam":
        paths = idx.cam_paths.copy().astype(object)
        paths[0, 0] = str(tmp_file)
        new = dataclasses.replace(idx, cam_paths=paths.astype(str))
    else:
        arr = getattr(idx, f"{kind}_paths").copy().astype(object)
        arr[getattr(idx, f"{kind}_offsets")[0]] = str(tmp_file)
        new = dataclasses.replace(idx, **{f"{kind}_paths": arr.astype(str)})
    return NuScenesDataset(ds.dataroot, config=dataclasses.replace(CFG, skip_bad_samples=skip), index=new)


def _source(ds, kind):
    idx = ds.index
    rel = idx.cam_paths[0, 0] if kind == "cam" else getattr(idx, f"{kind}_paths")[getattr(idx, f"{kind}_offsets")[0]]
    return Path(ds._path(str(rel)))


def _expect(ds, match, path, i=0):
    with pytest.raises(DataError, match=match) as err:
        ds[i]
    assert str(path) in str(err.value) and str(ds.index.tokens[i]) in str(err.value)
    assert err.value.token == str(ds.index.tokens[i])


@pytest.mark.parametrize("kind", ["lidar", "radar", "cam"])
def test_missing_file(ds, tmp_path, kind):
    missing = tmp_path / "gone.bin"
    _expect(_with_file(ds, kind, missing), "cannot read", missing)


@pytest.mark.parametrize("kind,cut", [("lidar", 7), ("radar", 50), ("cam", 500)])
def test_truncated_file(ds, tmp_path, kind, cut):
    data = _source(ds, kind).read_bytes()
    bad = tmp_path / "truncated"
    bad.write_bytes(data[: len(data) - cut])
    _expect(_with_file(ds, kind, bad), "truncated", bad)


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_non_finite_lidar_points(ds, tmp_path, value):
    pts = np.fromfile(_source(ds, "lidar"), np.float32).reshape(-1, 5).copy()
    pts[3, 1] = value
    bad = tmp_path / "bad.pcd.bin"
    pts.tofile(bad)
    _expect(_with_file(ds, "lidar", bad), "NaN or inf", bad)


def test_non_finite_radar_points(ds, tmp_path):
    src = _source(ds, "radar").read_bytes()
    k = src.find(b"DATA binary\n") + len(b"DATA binary\n")
    body = bytearray(src[k:])
    n = (len(body) - 1) // 43
    assert n >= 1
    recs = np.frombuffer(bytes(body[: n * 43]), np.uint8).reshape(n, 43).copy()
    recs[:, 15:19] = np.frombuffer(np.float32(np.inf).tobytes(), np.uint8)  # rcs (bytes 15-18 of a record) of every return
    bad = tmp_path / "bad.pcd"
    bad.write_bytes(src[:k] + recs.tobytes() + bytes(body[n * 43:]))
    with pytest.raises(DataError, match="NaN or inf"):
        read_radar_pcd(bad, "tok")


def test_empty_point_cloud_is_valid(ds, tmp_path):
    empty = tmp_path / "empty.pcd.bin"
    empty.write_bytes(b"")
    assert read_lidar_bin(empty).shape == (0, 5)
    d = _with_file(ds, "lidar", empty)
    s = d[0]
    full = ds[0]
    assert s.points_lidar.shape[0] < full.points_lidar.shape[0]  # the other sweep is still there


def test_non_orthonormal_calibration(synth_root, tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    for name in ("samples", "sweeps", "maps"):
        os.symlink(synth_root / name, root / name)
    shutil.copytree(synth_root / "v1.0-mini", root / "v1.0-mini")
    table = root / "v1.0-mini" / "calibrated_sensor.json"
    records = json.loads(table.read_text())
    sensors = {s["token"]: s["channel"] for s in json.loads((root / "v1.0-mini" / "sensor.json").read_text())}
    bad = [r for r in records if sensors[r["sensor_token"]] == "CAM_FRONT"]  # one per scene
    for r in bad:
        r["rotation"] = [v * 1.2 for v in r["rotation"]]
    table.write_text(json.dumps(records))
    with pytest.raises(DataError, match="not orthonormal") as err:
        NuScenesDataset(root, "v1.0-mini", "mini_val", config=CFG)
    assert any(r["token"] in str(err.value) for r in bad) and "sample" in str(err.value)
    skipping = NuScenesDataset(root, "v1.0-mini", "mini_val", config=dataclasses.replace(CFG, skip_bad_samples=True))
    assert len(skipping.bad_samples) > 0
    assert len(skipping) + len(skipping.bad_samples) == 6


def test_non_orthonormal_mmdet3d_calibration(ds, tmp_path):
    from tests.test_dataset import _write_mmdet3d_info

    path = tmp_path / "infos.pkl"
    _write_mmdet3d_info(ds, path)
    data = pickle.loads(path.read_bytes())
    m = np.array(data["data_list"][1]["images"]["CAM_BACK"]["lidar2cam"])
    m[:3, :3] *= 1.1
    data["data_list"][1]["images"]["CAM_BACK"]["lidar2cam"] = m.tolist()
    path.write_bytes(pickle.dumps(data))
    with pytest.raises(DataError, match="not orthonormal") as err:
        read_mmdet3d_infos(path, ds.dataroot)
    assert str(path) in str(err.value) and data["data_list"][1]["token"] in str(err.value)
    assert len(read_mmdet3d_infos(path, ds.dataroot, skip_bad_samples=True)) == len(ds) - 1


def test_skip_bad_samples_logs_counts_and_skips(ds, tmp_path, caplog):
    bad = tmp_path / "truncated.pcd.bin"
    bad.write_bytes(b"\0" * 7)
    d = _with_file(ds, "lidar", bad, skip=True)
    with caplog.at_level("WARNING"):
        s = d[0]
    assert s.meta["sample_token"] == str(ds.index.tokens[1])
    assert s.meta["skipped"] == [str(ds.index.tokens[0])]
    assert d.num_skipped == 1
    assert any("skipping bad sample" in r.message for r in caplog.records)
