"""Bad input and faults: fuzzed readers, rejected submissions, checkpoint integrity, training through bad
files, disk full, absent sensors. Only our error types may escape; nothing finished may be lost."""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from perception.data.loading import MAX_ABS_COORD_M, read_jpeg, read_lidar_bin, read_radar_pcd, read_radar_pcds
from perception.errors import ConfigError, DataError, PerceptionError
from perception.structures import RADAR_CHANNELS

FUZZ_CASES = 150  # per binary reader
ROOT = Path(__file__).resolve().parent.parent


def _keyframe(synth_root: Path, channel: str) -> Path:
    return sorted((synth_root / "samples" / channel).iterdir())[0]


def _check_points(out: np.ndarray, width: int) -> None:
    """What a reader may return: a finite (N, width) float32 array within the plausible range."""
    assert out.dtype == np.float32 and out.ndim == 2 and out.shape[1] == width
    assert np.isfinite(out).all() and (out.size == 0 or np.abs(out[:, :3]).max() <= MAX_ABS_COORD_M)


def _mutations(rng: np.random.Generator, raw: bytes, body_start: int = 0) -> list[bytes]:
    """Random truncations, random bytes (whole file and in place), for one fuzz round."""
    cut = int(rng.integers(0, len(raw)))
    garbage = rng.integers(0, 256, size=int(rng.integers(0, 4000)), dtype=np.uint8).tobytes()
    flipped = bytearray(raw)
    for pos in rng.integers(body_start, len(raw), size=8):
        flipped[pos] = int(rng.integers(0, 256))
    return [raw[:cut], garbage, bytes(flipped)]


def test_fuzz_lidar_reader(synth_root, tmp_path):
    raw = _keyframe(synth_root, "LIDAR_TOP").read_bytes()
    rng = np.random.default_rng(0)
    path = tmp_path / "fuzz.pcd.bin"
    cases = 0
    for _ in range(FUZZ_CASES // 3):
        for data in _mutations(rng, raw):
            path.write_bytes(data)
            cases += 1
            try:
                _check_points(read_lidar_bin(path, "tok"), 5)
            except DataError as exc:
                assert str(path) in str(exc) and "tok" in str(exc)
    pts = np.frombuffer(raw, "<f4").reshape(-1, 5).copy()
    for value in (np.nan, np.inf, -np.inf, 1e30, -1e30):
        bad = pts.copy()
        bad[int(rng.integers(0, len(bad))), int(rng.integers(0, 3))] = value
        path.write_bytes(bad.tobytes())
        with pytest.raises(DataError, match="NaN or inf|farther than"):
            read_lidar_bin(path, "tok")
        cases += 1
    assert cases >= FUZZ_CASES


def test_fuzz_radar_reader(synth_root, tmp_path):
    raw = _keyframe(synth_root, "RADAR_FRONT").read_bytes()
    header_end = raw.index(b"DATA binary\n") + len(b"DATA binary\n")
    header = raw[:header_end].decode()
    rng = np.random.default_rng(1)
    path = tmp_path / "fuzz.pcd"
    cases = 0
    for _ in range(FUZZ_CASES // 3):
        for data in _mutations(rng, raw, body_start=header_end):
            path.write_bytes(data)
            cases += 1
            try:
                _check_points(read_radar_pcd(path, "tok"), 18)
            except DataError as exc:
                assert str(path) in str(exc)
    width = int(header.split("WIDTH ")[1].split("\n")[0])
    for old, new in (("WIDTH %d" % width, "WIDTH %d" % (width + 5)), ("WIDTH %d" % width, "WIDTH abc"),
                     ("HEIGHT 1", "HEIGHT 2"), ("DATA binary", "DATA ascii"), ("FIELDS x y z", "FIELDS y x z"),
                     ("VERSION 0.7\n", ""), ("WIDTH %d" % width, "WIDTH 99999999999")):
        path.write_bytes(header.replace(old, new, 1).encode() + raw[header_end:])
        with pytest.raises(DataError):
            read_radar_pcd(path, "tok")
        cases += 1
    records = np.frombuffer(raw[header_end:header_end + width * 43], np.uint8).reshape(width, 43).copy()
    for value in (np.nan, np.inf, 1e30):
        bad = records.copy()
        bad[:, 0:4] = np.frombuffer(np.float32(value).tobytes(), np.uint8)  # x of every return
        path.write_bytes(raw[:header_end] + bad.tobytes() + raw[header_end + width * 43:])
        with pytest.raises(DataError):
            read_radar_pcd(path, "tok")
        cases += 1
        # Read together with good files (as a sample's ~30 sweeps are), the error names the bad file.
        good = [_keyframe(synth_root, ch) for ch in ("RADAR_FRONT", "RADAR_BACK_LEFT")]
        with pytest.raises(DataError) as err:
            read_radar_pcds([good[0], path, good[1]], "tok")
        assert str(path) in str(err.value) and str(good[0]) not in str(err.value)
    assert cases >= FUZZ_CASES


def test_radar_files_read_together_equal_the_devkit_reading_each(synth_root, tmp_path):
    from nuscenes.utils.data_classes import RadarPointCloud

    paths = [_keyframe(synth_root, ch) for ch in RADAR_CHANNELS]
    empty = tmp_path / "empty.pcd"  # the nuScenes empty-sweep marker: one record with NaN coordinates
    raw = paths[0].read_bytes()
    header_end = raw.index(b"DATA binary\n") + len(b"DATA binary\n")
    width = int(raw.decode("latin-1").split("WIDTH ")[1].split("\n")[0])
    marker = bytearray(raw[header_end:header_end + 43])
    marker[0:12] = np.full(3, np.nan, np.float32).tobytes()
    header = raw[:header_end].decode().replace(f"WIDTH {width}\n", "WIDTH 1\n").replace(f"POINTS {width}\n", "POINTS 1\n")
    empty.write_bytes(header.encode() + bytes(marker) + raw[header_end + width * 43:])  # (the file's tail, as nuScenes')
    paths = [paths[0], empty, *paths[1:]]
    together, counts = read_radar_pcds(paths, "tok", columns=("x", "y", "vx_comp", "rcs"))
    # The devkit reads each file alone with its default filters (fields: x y z dyn_prop id rcs vx vy vx_comp ...).
    alone = [RadarPointCloud.from_file(str(p)).points[[0, 1, 8, 5]].T.astype(np.float32) for p in paths]
    assert counts.tolist() == [len(a) for a in alone] and counts[1] == 0 and counts.sum() > 0
    np.testing.assert_array_equal(together, np.concatenate(alone))
    assert read_radar_pcds([], "tok")[0].shape == (0, 18)


def test_fuzz_jpeg_reader(synth_root, tmp_path):
    import cv2

    src = _keyframe(synth_root, "CAM_FRONT")
    raw = src.read_bytes()
    h, w = cv2.imread(str(src)).shape[:2]
    rng = np.random.default_rng(2)
    path = tmp_path / "fuzz.jpg"
    cases = 0
    for _ in range(FUZZ_CASES // 3):
        cut = int(rng.integers(0, len(raw) - 2))
        garbage = rng.integers(0, 256, size=int(rng.integers(0, 5000)), dtype=np.uint8).tobytes()
        for data in (raw[:cut], garbage, b"\xff\xd8" + garbage + b"\xff\xd9"):
            path.write_bytes(data)
            cases += 1
            with pytest.raises(DataError) as err:
                read_jpeg(path, "tok", expected_wh=(w, h))
            assert str(path) in str(err.value)
    # a header that says another size
    sof = raw.index(b"\xff\xc0")
    other = bytearray(raw)
    other[sof + 5:sof + 7] = (h + 8).to_bytes(2, "big")
    path.write_bytes(bytes(other))
    with pytest.raises(DataError):
        read_jpeg(path, "tok", expected_wh=(w, h))
    assert cases >= FUZZ_CASES


def test_bad_map_json_and_info_pickle_and_config(synth_root, tmp_path):
    from perception.config import load_config
    from perception.data.dataset import DatasetConfig, NuScenesDataset
    from perception.data.mmdet3d_info import read_mmdet3d_infos

    root = tmp_path / "root"
    root.mkdir()
    for name in ("samples", "sweeps", "v1.0-mini"):
        os.symlink(synth_root / name, root / name)
    shutil.copytree(synth_root / "maps", root / "maps")
    m = next((root / "maps" / "expansion").glob("*.json"))
    m.write_text(m.read_text()[:1000])
    ds = NuScenesDataset(root, "v1.0-mini", None, config=DatasetConfig())
    with pytest.raises(DataError) as err:
        for i in range(len(ds)):
            ds[i]
    assert m.name in str(err.value)
    pkl = tmp_path / "infos.pkl"
    pkl.write_bytes(b"\x80\x04garbage")
    with pytest.raises(DataError, match="infos.pkl"):
        read_mmdet3d_infos(pkl, synth_root)
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("train: {lr: [unclosed")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(cfg)


# ---------------------------------------------------------------------------------------- submissions


@pytest.fixture(scope="module")
def gt_sub(synth_root, tmp_path_factory):
    from perception.data.submission import gt_submission

    return json.loads(gt_submission(synth_root, "v1.0-mini", "mini_val", tmp_path_factory.mktemp("s") / "gt.json").read_text())


@pytest.mark.parametrize("case,message", [
    ("missing_sample", "have no entry"),
    ("unknown_class", "unknown detection_name"),
    ("nan", "non-finite"),
    ("too_many", "at most 500"),
    ("bad_attribute", "not valid for"),
    ("score", "detection_score"),
])
def test_bad_submissions_are_rejected_before_metrics(synth_root, gt_sub, tmp_path, case, message):
    from perception.evaluation import evaluate_results_file

    sub = json.loads(json.dumps(gt_sub))
    tokens = sorted(sub["results"])
    box = next(b for t in tokens for b in sub["results"][t] if b["detection_name"] == "car")
    if case == "missing_sample":
        sub["results"].pop(tokens[0])
    elif case == "unknown_class":
        box["detection_name"] = "tank"
    elif case == "nan":
        box["translation"][1] = float("nan")
    elif case == "too_many":
        sub["results"][tokens[0]] = [dict(box, sample_token=tokens[0])] * 501
    elif case == "bad_attribute":
        box["attribute_name"] = "pedestrian.moving"
    elif case == "score":
        box["detection_score"] = 3.0
    path = tmp_path / "sub.json"
    path.write_text(json.dumps(sub))
    with pytest.raises(PerceptionError, match=message) as err:
        evaluate_results_file(path, synth_root, "v1.0-mini", "mini_val", tmp_path / "out")
    assert str(path) in str(err.value)
    assert not (tmp_path / "out" / "metrics.json").exists()


def test_cli_prints_one_error_line(synth_root, tmp_path):
    bad = tmp_path / "sub.json"
    bad.write_text("{not json")
    res = subprocess.run([sys.executable, "-m", "perception", "eval", "--results", str(bad), "--data", str(synth_root),
                          "--split", "mini_val", "--out", str(tmp_path / "o")], capture_output=True, text=True)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and str(bad) in lines[-1]
    assert "Traceback" not in res.stderr
    dbg = subprocess.run([sys.executable, "-m", "perception", "--debug", "eval", "--results", str(bad), "--data",
                          str(synth_root), "--split", "mini_val", "--out", str(tmp_path / "o")], capture_output=True, text=True)
    assert dbg.returncode != 0 and "Traceback" in dbg.stderr


# ---------------------------------------------------------------------------------------- checkpoints


def test_checkpoint_checksum_truncation_and_disk_full(tmp_path, monkeypatch):
    from perception import checkpoint
    from perception.checkpoint import load_checkpoint, save_atomic

    path = tmp_path / "ck.pt"
    save_atomic({"step": 1, "model": {"w": torch.ones(1000)}}, path)
    assert load_checkpoint(path)["step"] == 1
    good = path.read_bytes()
    path.write_bytes(good[: len(good) // 2])
    with pytest.raises(PerceptionError, match="truncated or corrupt"):
        load_checkpoint(path)
    # a flipped byte inside the payload: the checksum catches it even where unpickling would not
    obj = torch.load(io.BytesIO(good), weights_only=False)
    payload = bytearray(obj["payload"])
    idx = payload.rfind(b"\x00\x00\x80\x3f")  # a 1.0 of the weights
    payload[idx + 3] = 0x40
    obj["payload"] = bytes(payload)
    torch.save(obj, path)
    with pytest.raises(PerceptionError, match="SHA-256"):
        load_checkpoint(path)
    # disk full while writing: the previous checkpoint stays readable and no temp file is left
    path.write_bytes(good)

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint.os, "fsync", full)
    with pytest.raises(PerceptionError, match="No space left"):
        save_atomic({"step": 2, "model": {"w": torch.zeros(1000)}}, path)
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pt"]


@pytest.mark.slow
def test_resume_falls_back_from_corrupt_last_and_training_skips_bad_files(synth_root, tmp_path, caplog):
    from perception.config import load_config
    from perception.training import RunSpec, Trainer
    from tests.test_training import FAST, TINY

    # a dataroot copy where two mini_train keyframes have corrupted LiDAR files
    root = tmp_path / "root"
    shutil.copytree(synth_root, root)
    sd = json.loads((root / "v1.0-mini" / "sample_data.json").read_text())
    samples = {s["token"]: s for s in json.loads((root / "v1.0-mini" / "sample.json").read_text())}
    scenes = {s["token"]: s["name"] for s in json.loads((root / "v1.0-mini" / "scene.json").read_text())}
    from nuscenes.utils.splits import create_splits_scenes

    train_scenes = set(create_splits_scenes()["mini_train"])
    lidar = [r for r in sd if r["is_key_frame"] and "LIDAR_TOP" in r["filename"]
             and scenes[samples[r["sample_token"]]["scene_token"]] in train_scenes]
    corrupted = {lidar[2]["sample_token"], lidar[7]["sample_token"]}
    (root / lidar[2]["filename"]).write_bytes(b"\x00" * 13)  # truncated
    pts = np.fromfile(root / lidar[7]["filename"], np.float32)
    pts[10] = np.nan
    pts.tofile(root / lidar[7]["filename"])

    cfg = load_config(TINY, FAST + ["data.skip_bad_samples=true", "train.checkpoint_every=3"])
    work = tmp_path / "work"
    res = subprocess.run([sys.executable, "-m", "perception", "train", "--config", str(TINY), "--data", str(root),
                          "--work-dir", str(work), "--max-steps", "12", "--device", "cpu", "--skip-bad-samples"]
                         + FAST + ["train.checkpoint_every=3"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    skipped = json.loads((work / "skipped_samples.json").read_text())
    assert set(skipped) == corrupted, (skipped, corrupted)
    assert all(("truncated" in r) or ("NaN" in r) for r in skipped.values())
    # --resume with a corrupt last.pt: falls back to the newest valid step checkpoint and says so
    last = work / "checkpoints" / "last.pt"
    last.write_bytes(last.read_bytes()[:1000])
    with caplog.at_level("WARNING"):
        trainer = Trainer(cfg, RunSpec(data=root, work_dir=work, max_steps=12, resume=True, device="cpu", progress=False))
    assert trainer.step == 12  # step_0000012.pt
    assert any("corrupt" in r.message and "step_0000012.pt" in r.message for r in caplog.records)
    trainer.close()


def test_prediction_with_absent_and_empty_sensors_per_sample(synth_root):
    from dataclasses import replace

    from perception.config import load_config
    from perception.data.collate import collate_samples
    from perception.model.build import build_model
    from perception.robustness import _keep_points
    from perception.data.build import build_dataset
    from tests.test_training import FAST, TINY

    cfg = load_config(TINY, FAST)
    model = build_model(cfg).eval()
    ds = build_dataset(cfg, synth_root, "v1.0-mini", "mini_val", train=False, map_grid=model.map_grid)
    batch = collate_samples([ds[0], ds[1], ds[2]])
    # sample 0: no LiDAR points at all; sample 1: no radar and no camera; sample 2: nothing but radar
    sample_of = torch.repeat_interleave(torch.arange(3), batch.num_points_lidar)
    batch = _keep_points(batch, "points_lidar", (sample_of != 0) & (sample_of != 2))
    sample_of = torch.repeat_interleave(torch.arange(3), batch.num_points_radar)
    batch = _keep_points(batch, "points_radar", sample_of != 1)
    mask = torch.tensor([[True, False, True], [False, True, False], [False, False, True]])
    batch = replace(batch, modality_mask=mask)
    preds = model.predict(batch)
    assert len(preds) == 3
    for p in preds:
        assert torch.isfinite(p.map_probs).all() and torch.isfinite(p.scene_probs).all()
        assert torch.isfinite(p.boxes_lidar.tensor).all()
