"""A camera absent from a sample: its sample_data record missing from the tables loads as that camera masked
(`Sample.camera_mask`, `Batch.camera_mask`), and the model keeps its features out of the BEV.

Oracle for the model: the same rig without that camera (its slice removed from every camera tensor), which gives
the same camera BEV; the view transforms take any camera count.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from perception import robustness as R
from perception.config import load_config
from perception.data.collate import collate_samples
from perception.data.dataset import DatasetConfig, NuScenesDataset
from perception.data.transforms import ImageAugConfig
from perception.model.build import build_model
from perception.model.synthetic import make_synthetic_batch
from perception.structures import CAMERA_CHANNELS

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["data.image_size=[64, 176]", "model.camera.blocks=1", "model.fuser.modality_dropout=0",
         "grid.x_min=-12.8", "grid.x_max=12.8", "grid.y_min=-12.8", "grid.y_max=12.8"]


def _without_camera(batch, c: int):
    keep = [i for i in range(batch.images.shape[1]) if i != c]
    return replace(batch, images=batch.images[:, keep], cam2img=batch.cam2img[:, keep],
                   cam2lidar=batch.cam2lidar[:, keep], img_aug=batch.img_aug[:, keep])


@pytest.mark.parametrize("transform", ["lift_splat", "bev_sample"])
def test_absent_camera_gives_the_bev_of_the_rig_without_it(transform):
    extra = [] if transform == "lift_splat" else [
        "model.view_transform={kind: bev_sample, z_levels: 4, out_channels: 32}", "loss.depth=0"]
    cfg = load_config(ROOT / "configs" / "tiny.yaml", [*SMALL, *extra])
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    batch = make_synthetic_batch(batch_size=2, image_size=cfg.data.image_size, grid=cfg.grid.build(), seed=3)
    mask = torch.ones(2, len(CAMERA_CHANNELS), dtype=torch.bool)
    mask[0, 1] = False  # sample 0 lacks camera 1; sample 1 has all six
    masked = replace(batch, camera_mask=mask)
    without = _without_camera(batch, 1)  # a 5-camera rig: its inputs made directly (the model's rig has six)
    pre = model.preprocessor
    with torch.no_grad():
        bev_masked, _ = model.encode_camera(*model.prepare(masked).as_args()[:2])
        bev_without, _ = model.encode_camera(pre.normalize(without.images),
                                             model.view_transform.rig_geometry(without.cam2img, without.cam2lidar))
        bev_full, _ = model.encode_camera(*model.prepare(batch).as_args()[:2])
    torch.testing.assert_close(bev_masked[0], bev_without[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bev_masked[1], bev_full[1], rtol=0, atol=0)
    assert not torch.allclose(bev_masked[0], bev_full[0])  # camera 1 did contribute when present
    with pytest.raises(Exception, match="5 cameras but the model's rig has 6"):
        model.prepare(without)
    # What the absent camera's image holds does not matter.
    images = batch.images.clone()
    images[0, 1] = torch.randint(0, 256, images[0, 1].shape, dtype=torch.uint8)
    with torch.no_grad():
        a = model.predict(masked)[0]
        b = model.predict(replace(masked, images=images))[0]
    assert torch.equal(a.scores, b.scores) and torch.allclose(a.boxes_lidar.tensor, b.boxes_lidar.tensor)


def test_geometry_cache_tells_masks_apart():
    cfg = load_config(ROOT / "configs" / "tiny.yaml", SMALL)
    model = build_model(cfg).eval()
    batch = make_synthetic_batch(batch_size=1, image_size=cfg.data.image_size, grid=cfg.grid.build(), seed=1)
    full = model.prepare(batch).geometry
    lost = R.one_camera_missing(batch, 0)
    masked = model.prepare(lost).geometry
    assert not all(torch.equal(a, b) for a, b in zip(full, masked))
    assert all(torch.equal(a, b) for a, b in zip(full, model.prepare(replace(lost, camera_mask=None)).geometry))


def _drop_camera_records(src: Path, dst: Path, channels: tuple[str, ...], samples: set[str] | None) -> set[str]:
    """A copy of `src`'s tables without the `channels`' keyframe sample_data records of `samples` (None: all),
    each chain re-linked as a lost frame leaves it. Returns the sample tokens that lost one."""
    dst.mkdir()
    for name in ("samples", "sweeps", "maps"):
        os.symlink(src / name, dst / name)
    shutil.copytree(src / "v1.0-mini", dst / "v1.0-mini")
    tables = dst / "v1.0-mini"
    sensors = {s["token"]: s["channel"] for s in json.loads((tables / "sensor.json").read_text())}
    channel_of = {c["token"]: sensors[c["sensor_token"]] for c in json.loads((tables / "calibrated_sensor.json").read_text())}
    records = json.loads((tables / "sample_data.json").read_text())
    by_token = {r["token"]: r for r in records}
    gone = [r for r in records if r["is_key_frame"] and channel_of[r["calibrated_sensor_token"]] in channels
            and (samples is None or r["sample_token"] in samples)]
    for r in gone:
        if r["prev"]:
            by_token[r["prev"]]["next"] = r["next"]
        if r["next"]:
            by_token[r["next"]]["prev"] = r["prev"]
        del by_token[r["token"]]
    (tables / "sample_data.json").write_text(json.dumps(list(by_token.values())))
    return {r["sample_token"] for r in gone}


def test_sample_without_a_camera_record_loads_with_that_camera_absent(synth_root, tmp_path):
    cfg = DatasetConfig(image=ImageAugConfig(final_hw=(64, 176)), lidar_sweeps=1, radar_sweeps=1, map="off")
    clean = NuScenesDataset(synth_root, "v1.0-mini", "mini_val", config=cfg)
    first = str(clean.index.tokens[0])
    lost = _drop_camera_records(synth_root, tmp_path / "root", ("CAM_BACK",), {first})
    assert lost == {first}
    ds = NuScenesDataset(tmp_path / "root", "v1.0-mini", "mini_val", config=cfg)
    assert len(ds) == len(clean)  # nothing skipped, nothing raised
    s = ds[0]
    c = CAMERA_CHANNELS.index("CAM_BACK")
    assert s.camera_mask.tolist() == [i != c for i in range(len(CAMERA_CHANNELS))]
    assert int(s.images[c].abs().sum()) == 0
    ref = clean[0]
    keep = [i for i in range(len(CAMERA_CHANNELS)) if i != c]
    assert torch.equal(s.images[keep], ref.images[keep]) and torch.allclose(s.cam2lidar[keep], ref.cam2lidar[keep])
    batch = collate_samples([s, ds[1]])
    assert batch.camera_mask.tolist()[0][c] is False and bool(batch.camera_mask[1].all())
    assert batch.modality_mask[:, 0].tolist() == [True, True]
    assert collate_samples([ds[1]]).camera_mask is None  # every camera there: no mask at all


def test_sample_without_any_camera_has_the_camera_modality_off(synth_root, tmp_path):
    cfg = DatasetConfig(image=ImageAugConfig(final_hw=(64, 176)), lidar_sweeps=1, radar_sweeps=0, map="off")
    clean = NuScenesDataset(synth_root, "v1.0-mini", "mini_val", config=cfg)
    first = str(clean.index.tokens[0])
    _drop_camera_records(synth_root, tmp_path / "root", CAMERA_CHANNELS, {first})
    ds = NuScenesDataset(tmp_path / "root", "v1.0-mini", "mini_val", config=cfg)
    batch = collate_samples([ds[0], ds[1]])
    assert not bool(batch.camera_mask[0].any())
    assert batch.modality_mask[:, 0].tolist() == [False, True]


def test_one_camera_missing_summary_is_the_mean_and_the_worst():
    results = {f"camera_missing_{ch}": {"nds": 0.1 * (i + 1), "map": 0.05 * i, "seg_miou": None}
               for i, ch in enumerate(CAMERA_CHANNELS)}
    summary = R.one_camera_summary(results)
    assert summary["one_camera_missing"]["nds"] == pytest.approx(sum(0.1 * (i + 1) for i in range(6)) / 6)
    assert summary["one_camera_missing"]["seg_miou"] is None
    assert summary["one_camera_missing_worst"]["camera"] == CAMERA_CHANNELS[0]
    assert summary["one_camera_missing_worst"]["nds"] == pytest.approx(0.1)
    assert R.one_camera_summary({"clean": {"nds": 1.0}}) == {}
