"""`perception viz` pictures and the robustness conditions on the tiny model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from perception.cli import app
from perception.config import load_config
from perception.data.collate import collate_samples
from perception.robustness import CONDITIONS, lidar_ring
from perception.structures import CAMERA_CHANNELS
from tests.test_training import FAST, TINY


@pytest.fixture(scope="module")
def tiny_checkpoint(synth_root, tmp_path_factory):
    """A briefly trained tiny model in the trainer's checkpoint format."""
    from perception.training import RunSpec, Trainer

    cfg = load_config(TINY, FAST)
    work = tmp_path_factory.mktemp("ckpt")
    trainer = Trainer(cfg, RunSpec(data=synth_root, work_dir=work, max_steps=2, device="cpu", progress=False))
    trainer.fit()
    trainer.close()
    return work / "checkpoints" / "last.pt"


def test_viz_without_and_with_checkpoint(synth_root, synth_nusc, tiny_checkpoint, tmp_path):
    token = synth_nusc.sample[0]["token"]
    runner = CliRunner()
    res = runner.invoke(app, ["viz", "--data", str(synth_root), "--sample", token, "--out", str(tmp_path / "a")])
    assert res.exit_code == 0, res.output
    for suffix in ("_cameras.png", "_bev.png", "_points.ply", "_boxes_gt.ply"):
        assert (tmp_path / "a" / f"{token}{suffix}").stat().st_size > 1000
    scene = synth_nusc.scene[-1]["name"]
    res = runner.invoke(app, ["viz", "--data", str(synth_root), "--scene", scene, "--checkpoint", str(tiny_checkpoint),
                              "--out", str(tmp_path / "b"), "--video"])
    assert res.exit_code == 0, res.output
    assert len(list((tmp_path / "b").glob("*_cameras.png"))) == 6
    assert len(list((tmp_path / "b").glob("*_boxes_pred.ply"))) == 6
    assert (tmp_path / "b" / f"{scene}.mp4").stat().st_size > 1000
    import cv2

    img = cv2.imread(str(next((tmp_path / "b").glob("*_cameras.png"))))
    assert img.shape[0] > 100 and img.std() > 10
    bad = runner.invoke(app, ["viz", "--data", str(synth_root), "--scene", "scene-9999", "--out", str(tmp_path / "c")])
    assert bad.exit_code != 0


def test_conditions_change_what_they_should(synth_root):
    from perception.data.build import build_dataset

    cfg = load_config(TINY, FAST)
    ds = build_dataset(cfg, synth_root, "v1.0-mini", "mini_val", train=False)
    batch = collate_samples([ds[0], ds[1]])
    out = {name: fn(batch) for name, fn in CONDITIONS.items()}
    assert torch.equal(out["clean"].images, batch.images)
    assert not out["cameras_missing"].modality_mask[:, 0].any() and out["cameras_missing"].images.max() == 0
    assert out["lidar_missing"].points_lidar.shape[0] == 0 and not out["lidar_missing"].modality_mask[:, 1].any()
    assert out["radar_only"].modality_mask[:, 2].all() and not out["radar_only"].modality_mask[:, :2].any()
    n = batch.points_lidar.shape[0]
    assert 0.35 * n < out["lidar_drop_50"].points_lidar.shape[0] < 0.65 * n
    assert int(out["lidar_drop_50"].num_points_lidar.sum()) == out["lidar_drop_50"].points_lidar.shape[0]
    n16, n8 = out["lidar_beams_16"].points_lidar.shape[0], out["lidar_beams_8"].points_lidar.shape[0]
    assert n8 < n16 < n
    assert out["camera_low_light"].images.float().mean() < 0.5 * batch.images.float().mean()
    assert not torch.allclose(out["calibration_error"].cam2lidar, batch.cam2lidar)
    assert torch.equal(CONDITIONS["camera_noise"](batch).images, out["camera_noise"].images)  # seeded
    back = out["camera_missing_CAM_BACK"]
    assert back.camera_mask.tolist() == [[ch != "CAM_BACK" for ch in CAMERA_CHANNELS]] * 2
    assert back.modality_mask[:, 0].all() and torch.equal(back.images, batch.images)  # masked, not blacked out
    lost = out["camera_frame_lost"].camera_mask
    assert 0 < int(lost.sum()) < lost.numel()
    assert torch.equal(out["camera_frame_lost"].modality_mask[:, 0], lost.any(1))


def test_lidar_ring_recovers_hdl32_rings(synth_root):
    from perception.data.loading import read_lidar_bin

    path = next((synth_root / "samples" / "LIDAR_TOP").iterdir())
    pts = read_lidar_bin(path)
    ring = lidar_ring(torch.from_numpy(pts)).numpy()
    far = np.hypot(pts[:, 0], pts[:, 1]) > 3.0  # near the car the sensor-origin offset blurs elevations
    assert (ring[far] == pts[far, 4].astype(int)).mean() > 0.9


def test_robustness_command_runs_every_condition(synth_root, tiny_checkpoint, tmp_path):
    res = CliRunner().invoke(app, ["robustness", "--checkpoint", str(tiny_checkpoint), "--data", str(synth_root),
                                   "--split", "mini_val", "--out", str(tmp_path), "--workers", "0"])
    assert res.exit_code == 0, res.output
    results = json.loads((tmp_path / "robustness.json").read_text())
    # A single-frame model has no history to lose; the per-camera losses are summarised as their mean and worst.
    assert set(results) == set(CONDITIONS) - {"history_lost"} | {"one_camera_missing", "one_camera_missing_worst"}
    assert results["one_camera_missing_worst"]["camera"] in CAMERA_CHANNELS
    for r in results.values():
        assert {"nds", "map", "mate", "mase", "maoe", "mave", "maae", "seg_miou", "ratio"} <= set(r)
    assert (tmp_path / "robustness.md").read_text().count("|") > 50
    assert (tmp_path / "robustness.png").stat().st_size > 1000
