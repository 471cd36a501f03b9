"""The data pipeline's fast paths against independent references: cached map rasters against the exact
per-sample rendering (the devkit's polygon clipping), the BEV augmentation composed into each sweep's transform
against transforming the loaded cloud afterwards, Batch pickling, and `perception bench data`'s report."""

from __future__ import annotations

import json
import pickle
from dataclasses import fields

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from perception.cache import cache_dir
from perception.data.bench import bench_report, run_data_bench, stage_times
from perception.data.collate import collate_samples
from perception.data.dataset import DatasetConfig, NuScenesDataset
from perception.data.map_raster import LocationRaster
from perception.data.transforms import BEVAugConfig, ImageAugConfig, sample_bev_aug, transform_points, transform_radar
from perception.structures import MAP_CLASSES

SMALL_IMG = ImageAugConfig(final_hw=(128, 352))
# Per-class IoU of cached vs exact masks; measured on synthetic mini (200 samples, 40 compared, half augmented):
# drivable 0.98, ped_crossing 0.93, walkway 0.93, stop_line 0.84, carpark 0.99, divider 0.88.
MIN_IOU = {"drivable_area": 0.95, "ped_crossing": 0.85, "walkway": 0.88, "stop_line": 0.7, "carpark_area": 0.95,
           "divider": 0.8}


@pytest.fixture(scope="module")
def train_ds(synth_root):
    return NuScenesDataset(synth_root, "v1.0-mini", None, config=DatasetConfig(
        image=SMALL_IMG, train=True, bev_aug=BEVAugConfig(), lidar_sweeps=2, radar_sweeps=2))


def test_raster_grid_sampling_matches_pointwise_lookup(train_ds):
    """`LocationRaster.sample_grid` (one OpenCV warp) against `lookup` of every cell point (numpy floor and
    gather) on rotated, scaled, reflected grids, partly outside the raster."""
    raster = train_ds.map_rasterizer.raster(str(train_ds.index.locations[0]), train_ds.map_rasterizer.grid)
    h, w = raster.bits.shape
    rng = np.random.default_rng(0)
    hw = (90, 120)
    jj, ii = np.meshgrid(np.arange(hw[1]), np.arange(hw[0]))
    checked = 0
    on_map = np.argwhere(raster.bits != 0)
    for _ in range(20):
        yaw, scale = rng.uniform(-np.pi, np.pi), rng.uniform(0.3, 0.7)
        flip = rng.choice([-1.0, 1.0])
        L = scale * np.array([[np.cos(yaw), -np.sin(yaw)], [np.sin(yaw), np.cos(yaw)]]) @ np.diag([flip, 1.0])
        if rng.random() < 0.5:  # anywhere, partly outside the raster
            centre = (raster.x0 + rng.uniform(-0.1, 1.1) * w * raster.res, raster.y0 + rng.uniform(-0.1, 1.1) * h * raster.res)
        else:  # on the map's content (roads cover a small part of the canvas)
            row, col = on_map[int(rng.integers(len(on_map)))]
            centre = (raster.x0 + col * raster.res, raster.y0 + row * raster.res)
        cell2global = np.concatenate([L, np.asarray(centre)[:, None]], 1)
        xy = np.stack([jj, ii, np.ones_like(jj)], -1).astype(np.float64) @ cell2global.T
        expect = raster.lookup(xy)
        got = raster.sample_grid(cell2global, hw)
        assert got.shape == hw and got.dtype == np.uint8
        assert (got != expect).mean() < 1e-3
        checked += int(expect.any())
    assert checked >= 5
    # a raster wider than OpenCV's warp accepts (32767 pixels): still sampled, through the covered window
    wide = LocationRaster(np.zeros((8, 40000), np.uint8), x0=0.0, y0=0.0, res=0.1)
    wide.bits[3, 35000:35010] = 5
    cell2global = np.array([[0.1, 0.0, 3500.05], [0.0, 0.1, 0.05]])  # cell (j, i) -> pixel centre (35000 + j, i)
    got = wide.sample_grid(cell2global, (8, 12))
    np.testing.assert_array_equal(got, wide.lookup(
        np.stack(np.meshgrid(np.arange(12) * 0.1 + 3500.05, np.arange(8) * 0.1 + 0.05), -1)))
    assert got[3, :10].tolist() == [5] * 10


def test_cached_map_raster_agrees_with_exact_rendering(train_ds, synth_root):
    mr, idx = train_ds.map_rasterizer, train_ds.index
    assert train_ds.map_locations, "the synthetic set has map expansion files"
    for loc in train_ds.map_locations:  # built at construction, in the cache, never in the dataroot
        path = mr.raster_path(loc)
        assert path.is_file() and cache_dir() in path.parents
        assert not list(synth_root.rglob("*.npy"))
    inter, union = np.zeros(len(MAP_CLASSES)), np.zeros(len(MAP_CLASSES))
    rng = np.random.default_rng(0)
    flips = 0
    for i in range(len(train_ds)):
        aug = sample_bev_aug(rng, BEVAugConfig(trans_std=(2.0, 2.0, 0.0))) if i % 3 else np.eye(4)
        flips += bool(np.linalg.det(aug[:2, :2]) < 0)
        l2g = idx.ego2global[i] @ idx.lidar2ego[i]
        loc = str(idx.locations[i])
        exact = mr.render(loc, l2g, aug)
        cached = mr.render_cached(loc, l2g, aug)
        assert cached.shape == exact.shape and cached.dtype == np.uint8
        inter += (exact & cached).sum((1, 2))
        union += (exact | cached).sum((1, 2))
    assert flips > 0
    for k, name in enumerate(MAP_CLASSES):
        if union[k] == 0:
            continue
        assert inter[k] / union[k] >= MIN_IOU[name], (name, inter[k] / union[k])


def test_items_train_on_cached_maps_and_evaluate_on_exact_ones(train_ds):
    i = 0
    s = train_ds[i]
    aug, idx = s.meta["lidar_aug"], train_ds.index
    l2g = idx.ego2global[i] @ idx.lidar2ego[i]
    cached = train_ds.map_rasterizer.render_cached(s.meta["location"], l2g, aug)
    assert np.array_equal(s.map_masks.numpy(), cached)
    exact_ds = train_ds.with_config(map_cache=False)
    assert np.array_equal(exact_ds[i].map_masks.numpy(), train_ds.map_rasterizer.render(s.meta["location"], l2g, aug))


def test_augmentation_composed_into_sweeps_equals_augmenting_the_cloud(train_ds):
    for i in (0, 5):
        aug = sample_bev_aug(np.random.default_rng(i), BEVAugConfig(flip_x_prob=1.0))
        lidar = transform_points(train_ds.load_points_lidar(i), aug)
        radar = transform_radar(train_ds.load_points_radar(i), aug)
        np.testing.assert_allclose(train_ds.load_points_lidar(i, aug), lidar, atol=2e-4)
        np.testing.assert_allclose(train_ds.load_points_radar(i, aug), radar, atol=2e-4)
    # an item draws the same augmentation it reports, and its points are the unaugmented ones moved by it
    s = train_ds[3]
    np.testing.assert_allclose(s.points_lidar.numpy(), transform_points(train_ds.load_points_lidar(3), s.meta["lidar_aug"]),
                               atol=2e-4)


def test_batch_pickles_small_tensors_inline_and_round_trips(train_ds):
    b = collate_samples([train_ds[0], train_ds[1]])
    back = pickle.loads(pickle.dumps(b))
    for f in fields(b):
        x, y = getattr(b, f.name), getattr(back, f.name)
        if isinstance(x, torch.Tensor):
            assert type(y) is torch.Tensor and y.dtype == x.dtype and torch.equal(x, y), f.name
    assert back.meta[0]["sample_token"] == b.meta[0]["sample_token"]


def test_bench_data_report(train_ds, synth_root, tmp_path):
    ds = train_ds
    results = run_data_bench(ds, workers=(0, 1), samples=2, repeats=1)
    assert [r.workers for r in results] == [0, 1]
    assert all(r.pipeline_samples_per_s > 0 and r.decode_only_samples_per_s > 0 for r in results)
    stages = stage_times(ds, samples=2)
    assert set(stages) == {"images", "lidar", "radar", "map", "item", "collate"} and all(v > 0 for v in stages.values())
    report = bench_report(ds, results, stages)
    for key in ("pipeline_samples_per_s", "decode_only_samples_per_s", "ratio", "stages_ms", "by_workers"):
        assert key in report
    assert report["workers"] == 1 and report["ratio"] == pytest.approx(
        results[1].pipeline_samples_per_s / results[1].decode_only_samples_per_s, rel=1e-3)
    json.dumps(report)

    from perception.cli import app

    out = tmp_path / "bench.json"
    res = CliRunner().invoke(app, ["bench", "data", "--data", str(synth_root), "--samples", "2", "--workers", "0",
                                   "--repeats", "1", "--config", "configs/tiny.yaml", "--out", str(out),
                                   "data.lidar_sweeps=1"])
    assert res.exit_code == 0, res.output
    written = json.loads(out.read_text())
    assert written["by_workers"][0]["workers"] == 0 and written["image_hw"] == [128, 352]
    assert written["lidar_sweeps_per_sample"] <= 2
