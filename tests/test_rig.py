"""The config's ``rig:`` section: the dataset reads the rig's cameras in its order, the model's camera axis is its
camera count (trained, exported with N in the graph, run by ONNX Runtime), and a batch of another camera count is
refused in one line. Oracle for the data: the nuScenes-rig dataset's images and calibration of the same cameras."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from perception.checkpoint import save_atomic
from perception.cli import app
from perception.config import load_config
from perception.data.build import build_dataset
from perception.data.collate import collate_samples
from perception.errors import ConfigError, PerceptionError
from perception.model.build import build_model
from perception.rig import NUSCENES, Rig
from perception.structures import CAMERA_CHANNELS

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["data.image_size=[64, 176]", "grid.cell=1.6", "model.fuser.modality_dropout=0", "model.camera.blocks=1"]
# Four of the six cameras in another order, no radar.
FOUR = ["rig.preset=null", "rig.lidars=[LIDAR_TOP]", "rig.radars=[]",
        "rig.cameras=[{name: CAM_BACK, width: 400, height: 225}, {name: CAM_FRONT, width: 400, height: 225}, "
        "{name: CAM_FRONT_LEFT, width: 400, height: 225}, {name: CAM_FRONT_RIGHT, width: 400, height: 225}]"]


def test_dataset_reads_the_rigs_cameras_in_its_order(synth_root):
    six = load_config(ROOT / "configs" / "tiny.yaml", SMALL)
    four = load_config(ROOT / "configs" / "tiny.yaml", [*SMALL, *FOUR])
    ds6 = build_dataset(six, synth_root, "v1.0-mini", "mini_val", train=False)
    ds4 = build_dataset(four, synth_root, "v1.0-mini", "mini_val", train=False)
    order = [CAMERA_CHANNELS.index(c) for c in ("CAM_BACK", "CAM_FRONT", "CAM_FRONT_LEFT", "CAM_FRONT_RIGHT")]
    a, b = ds6[1], ds4[1]
    assert b.images.shape[0] == 4
    assert torch.equal(b.images, a.images[order])
    assert torch.allclose(b.cam2lidar, a.cam2lidar[order]) and torch.allclose(b.cam2img, a.cam2img[order])
    assert b.points_radar.shape[0] == 0 and not b.has_radar  # the rig has no radar
    assert torch.equal(b.points_lidar, a.points_lidar)
    batch = collate_samples([b])
    assert batch.modality_mask.tolist() == [[True, True, False]]


def test_a_four_camera_model_trains_exports_and_refuses_six(synth_root, tmp_path):
    cfg = load_config(ROOT / "configs" / "tiny.yaml", [*SMALL, *FOUR])
    torch.manual_seed(0)
    model = build_model(cfg)
    ds = build_dataset(cfg, synth_root, "v1.0-mini", "mini_train", train=True)
    batch = collate_samples([ds[0], ds[1]])
    loss = sum(model.loss(batch).values())
    assert torch.isfinite(loss)
    loss.backward()
    assert model.camera_encoder.backbone.patch_embed.proj.weight.grad is not None
    model.eval()
    six = load_config(ROOT / "configs" / "tiny.yaml", SMALL)
    six_batch = collate_samples([build_dataset(six, synth_root, "v1.0-mini", "mini_val", train=False)[0]])
    with pytest.raises(PerceptionError, match="6 cameras but the model's rig has 4 \\(CAM_BACK, CAM_FRONT"):
        model.predict(six_batch)
    # Export: the images axis is 4 in the graph, the manifest names the cameras, ONNX Runtime equals torch.
    ckpt = tmp_path / "four.pt"
    save_atomic({"model": model.state_dict(), "ema": None, "config": cfg.model_dump(mode="json"), "step": 0}, ckpt)
    out = tmp_path / "export"
    res = CliRunner().invoke(app, ["export", "--checkpoint", str(ckpt), "--out", str(out)])
    assert res.exit_code == 0, res.output + repr(res.exception)
    import onnx

    from deploy.runners import load_runner

    graph = onnx.load(str(next(out.glob("*.onnx"))))
    images = next(i for i in graph.graph.input if i.name == "images")
    assert images.type.tensor_type.shape.dim[1].dim_value == 4
    runner = load_runner("onnx", out)
    assert runner.preprocessor.spec.rig.camera_names == ("CAM_BACK", "CAM_FRONT", "CAM_FRONT_LEFT", "CAM_FRONT_RIGHT")
    val = collate_samples([build_dataset(cfg, synth_root, "v1.0-mini", "mini_val", train=False)[i] for i in (0, 1)])
    with torch.no_grad():
        expected = model(*model.prepare(val).as_args())
    got = runner.infer(runner.preprocessor(val).named())
    assert float((got["heatmap"] - expected["heatmap"]).abs().max()) <= 1e-3
    with pytest.raises(PerceptionError, match="6 cameras but the model's rig has 4"):
        runner.predict(six_batch)


def test_rig_json_and_bad_rigs():
    assert Rig.from_json(NUSCENES.to_json()) is NUSCENES
    with pytest.raises(ConfigError, match="not both"):
        load_config(ROOT / "configs" / "tiny.yaml", ["rig.lidars=[LIDAR_TOP]"])
    with pytest.raises(ConfigError, match="reference LiDAR"):
        load_config(ROOT / "configs" / "tiny.yaml", ["rig.preset=null", "rig.cameras=[{name: A, width: 4, height: 4}]"])
    with pytest.raises(ConfigError, match="more than once"):
        load_config(ROOT / "configs" / "tiny.yaml", ["rig.preset=null", "rig.lidars=[L]",
                                                     "rig.cameras=[{name: L, width: 4, height: 4}]"])
