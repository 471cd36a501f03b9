"""LiDAR pillars finer than the BEV cell (`model.lidar.pillar_stride`): where points land, the strided conv back
onto the BEV grid, the whole model's forward/backward, checkpoint compatibility at stride 1, and the plugin-free
ONNX export.

Oracles are closed forms written here (``floor((x - x_min) / (cell / k))``, the receptive field of a BEV cell)
and a literal of the stride-1 encoder's parameter layout, never the code's own voxeliser run backwards.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from fusion.lidar import LidarEncoder, PillarVoxelizer
from perception.config import ExperimentConfig, load_config
from perception.errors import ConfigError
from perception.model.build import build_lidar_encoder, build_model
from perception.model.preprocess import Preprocessor
from perception.model.synthetic import make_synthetic_batch
from perception.structures import BEVGrid

ROOT = Path(__file__).resolve().parents[1]
# tests/test_model.py's small tiny: 2 ViT blocks, 64x176 images, a 32 x 32 BEV grid of 0.8 m, no modality dropout.
SMALL_TINY = ["data.image_size=[64, 176]", "model.camera.blocks=2", "model.fuser.modality_dropout=0",
              "grid.x_min=-12.8", "grid.x_max=12.8", "grid.y_min=-12.8", "grid.y_max=12.8"]


def small_tiny(*extra: str) -> ExperimentConfig:
    return load_config(ROOT / "configs" / "tiny.yaml", [*SMALL_TINY, *extra])


def _grad_norm(module: torch.nn.Module) -> float:
    return sum(float(p.grad.abs().sum()) for p in module.parameters() if p.grad is not None)


# ------------------------------------------------------------------------------------------ voxelisation


def test_points_land_in_the_fine_pillar_of_the_closed_form():
    grid = BEVGrid(x_min=-4.0, x_max=4.0, y_min=-4.0, y_max=4.0, z_min=-5.0, z_max=3.0, cell=0.8)
    k = 2
    fine = grid.cell / k  # 0.4 m
    vox = LidarEncoder.make_voxelizer(grid, max_points_per_pillar=4, max_pillars=100, pillar_stride=k)
    points = torch.tensor([
        [0.25, 0.10, 0.0, 1.0, 0.0],    # x 0.25 and 0.55: one 0.8 m cell [0, 0.8), two 0.4 m pillars
        [0.55, 0.10, 0.0, 2.0, 0.0],
        [-3.9, -3.9, -1.0, 3.0, 0.0],   # the first pillar of the grid
        [3.95, 3.7, 1.0, 4.0, 0.05],    # the last
        [-1.3, 2.9, 0.5, 5.0, 0.0],
        [1.1, -0.7, 0.2, 6.0, 0.0],
    ])
    pillars = vox(points, torch.tensor([len(points)]))
    h, w = grid.shape
    assert pillars.bev_index.shape == (1, k * h, k * w) == (1, 20, 20)
    num_pillars = pillars.features.shape[0]
    assert num_pillars == len(points)  # every point alone in its pillar
    for x, y, z, intensity, _ in points.tolist():
        col, row = math.floor((x - grid.x_min) / fine), math.floor((y - grid.y_min) / fine)
        p = int(pillars.bev_index[0, row, col])
        assert p < num_pillars, (x, y)
        real = pillars.point_mask[p] > 0
        assert int(real.sum()) == 1
        got = pillars.features[p][real][0]
        torch.testing.assert_close(got[:4], torch.tensor([x, y, z, intensity]))
        # Offset to the fine pillar's centre, in closed form.
        centre = (grid.x_min + (col + 0.5) * fine, grid.y_min + (row + 0.5) * fine)
        torch.testing.assert_close(got[-2:], torch.tensor([x - centre[0], y - centre[1]]))
    assert int((pillars.bev_index < num_pillars).sum()) == len(points)  # no other cell has a pillar

    # The same two points 0.3 m apart: two pillars at stride 2, one (with both points) at stride 1.
    pair = points[:2]
    at2 = vox(pair, torch.tensor([2]))
    at1 = LidarEncoder.make_voxelizer(grid, max_points_per_pillar=4, max_pillars=100)(pair, torch.tensor([2]))
    assert at2.features.shape[0] == 2 and at2.point_mask.sum(1).tolist() == [1.0, 1.0]
    assert at1.features.shape[0] == 1 and at1.point_mask.sum().item() == 2.0
    assert at1.bev_index.shape == (1, h, w)
    row, col = math.floor((0.10 - grid.y_min) / grid.cell), math.floor((0.25 - grid.x_min) / grid.cell)
    assert int(at1.bev_index[0, row, col]) == 0


def test_empty_cloud_and_manifest_round_trip_at_stride_3():
    grid = BEVGrid(x_min=-4.0, x_max=4.0, y_min=-4.0, y_max=4.0, cell=0.8)
    vox = LidarEncoder.make_voxelizer(grid, max_points_per_pillar=4, max_pillars=10, pillar_stride=3)
    empty = vox(torch.zeros(0, 5), torch.tensor([0, 0]))
    assert empty.features.shape == (1, 4, vox.num_features) and not empty.point_mask.any()
    assert torch.equal(empty.bev_index, torch.ones(2, 30, 30, dtype=torch.long))  # no cell reads the padding pillar
    again = PillarVoxelizer.from_json(vox.to_json(), grid)
    assert again.pillar_stride == 3 and again.pillar_grid.shape == (30, 30) and again.grid == grid
    older = {k: v for k, v in vox.to_json().items() if k != "pillar_stride"}  # a manifest from before the option
    assert PillarVoxelizer.from_json(older, grid).pillar_stride == 1


# ------------------------------------------------------------------------------------------ the encoder


@pytest.mark.parametrize("stride", [1, 2, 3, 4])
def test_encoder_output_is_on_the_bev_grid(stride):
    cfg = small_tiny(f"model.lidar.pillar_stride={stride}")
    grid = cfg.grid.build()
    h, w = grid.shape
    encoder = build_lidar_encoder(cfg.model.lidar, grid).eval()
    assert encoder.grid == grid and encoder.voxelizer.pillar_grid.shape == (stride * h, stride * w)
    batch = make_synthetic_batch(batch_size=2, image_size=cfg.data.image_size, grid=grid, seed=stride)
    pillars = encoder.voxelizer(batch.points_lidar, batch.num_points_lidar)
    assert pillars.bev_index.shape == (2, stride * h, stride * w)
    with torch.no_grad():
        bev = encoder(*pillars.as_tuple())
    assert bev.shape == (2, cfg.model.lidar.out_channels, h, w)

    if stride > 1:
        # Receptive field of the strided conv: BEV cell (r, c) reads exactly the fine cells
        # [k r, k r + k) x [k c, k c + k), i.e. the pillars inside the cell's own x/y bounds.
        conv = encoder.downsample[0]
        placed = torch.zeros(1, conv.in_channels, stride * h, stride * w, requires_grad=True)
        r, c = 5, 17
        conv(placed)[0, :, r, c].sum().backward()
        reads = placed.grad[0].abs().sum(0) > 0
        expected = torch.zeros(stride * h, stride * w, dtype=torch.bool)
        expected[stride * r: stride * r + stride, stride * c: stride * c + stride] = True
        assert torch.equal(reads, expected)


def test_whole_model_forward_backward_at_stride_2_with_an_empty_cloud():
    torch.manual_seed(0)
    cfg = small_tiny("model.lidar.pillar_stride=2")
    grid = cfg.grid.build()
    model = build_model(cfg).train()
    for counts in ([None, None], [0, None], [0, 0]):  # default clouds; sample 0 empty; no pillar in the batch
        batch = make_synthetic_batch(batch_size=2, image_size=cfg.data.image_size, grid=grid, boxes_per_sample=[3, 1],
                                     lidar_points_per_sample=counts, seed=7)
        model.zero_grad(set_to_none=True)
        losses = model.loss(batch)
        for key, value in losses.items():
            assert value.ndim == 0 and torch.isfinite(value), (counts, key)
        sum(losses.values()).backward()
        if counts != [0, 0]:
            assert _grad_norm(model.lidar_encoder.downsample) > 0 and _grad_norm(model.lidar_encoder.pfn) > 0
            assert _grad_norm(model.lidar_encoder.backbone) > 0
    model.eval()
    with torch.no_grad():
        predictions = model.predict(batch)
    assert len(predictions) == 2


# ------------------------------------------------------------------------------------------ checkpoints


# The tiny LiDAR encoder's parameters and buffers as they were before `pillar_stride` (keyframe_pool: 2 x 64
# channels into a backbone of 2 3x3 convs to 64).
TINY_LIDAR_LAYOUT = {
    "pfn.0.weight": (64, 10),
    **{f"pfn.1.{n}": (64,) for n in ("weight", "bias", "running_mean", "running_var")}, "pfn.1.num_batches_tracked": (),
    "backbone.0.weight": (64, 128, 3, 3),
    **{f"backbone.1.{n}": (64,) for n in ("weight", "bias", "running_mean", "running_var")},
    "backbone.1.num_batches_tracked": (),
    "backbone.3.weight": (64, 64, 3, 3),
    **{f"backbone.4.{n}": (64,) for n in ("weight", "bias", "running_mean", "running_var")},
    "backbone.4.num_batches_tracked": (),
}


def _layout(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def test_stride_1_is_the_encoder_of_before_and_stride_2_only_adds_the_downsample():
    torch.manual_seed(0)
    default = build_model(small_tiny())
    explicit = build_model(small_tiny("model.lidar.pillar_stride=1"))
    assert _layout(explicit) == _layout(default)
    assert _layout(default.lidar_encoder) == TINY_LIDAR_LAYOUT
    explicit.load_state_dict(default.state_dict(), strict=True)

    fine = build_lidar_encoder(small_tiny("model.lidar.pillar_stride=2").model.lidar, small_tiny().grid.build())
    layout = _layout(fine)
    added = {k: v for k, v in layout.items() if k not in TINY_LIDAR_LAYOUT}
    assert {k: v for k, v in layout.items() if k in TINY_LIDAR_LAYOUT} == TINY_LIDAR_LAYOUT  # stride-1 weights load
    assert added == {"downsample.0.weight": (128, 128, 2, 2),
                     **{f"downsample.1.{n}": (128,) for n in ("weight", "bias", "running_mean", "running_var")},
                     "downsample.1.num_batches_tracked": ()}


# ------------------------------------------------------------------------------------------ export


def test_onnx_export_at_stride_2_matches_torch_and_needs_no_plugin(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    from deploy.export import export_model
    from deploy.manifest import Manifest
    from deploy.trt_compat import check_onnx

    torch.manual_seed(0)
    cfg = small_tiny("model.lidar.pillar_stride=2")
    model = build_model(cfg).eval()
    grid = cfg.grid.build()
    example = make_synthetic_batch(batch_size=1, image_size=cfg.data.image_size, grid=grid, seed=0)
    names = export_model(model, cfg, tmp_path, example=example).output_names
    report = check_onnx(tmp_path / "core.onnx")
    assert report.ok, report.format()
    manifest = Manifest.read(tmp_path)
    assert manifest.preprocessing.lidar.pillar_stride == 2 and manifest.preprocessing.radar.pillar_stride == 1

    session = ort.InferenceSession(str(tmp_path / "core.onnx"), providers=["CPUExecutionProvider"])
    # Another batch size and pillar counts than the export example, and an empty LiDAR cloud.
    batch = make_synthetic_batch(batch_size=2, image_size=cfg.data.image_size, grid=grid, seed=5, boxes_per_sample=6,
                                 lidar_points_per_sample=[0, None], modality_mask=[[True, False, True], [True, True, True]])
    inputs = model.prepare(batch)
    assert inputs.lidar.bev_index.shape == (2, 2 * grid.height, 2 * grid.width)
    # The runtime's pre-processing, made from the manifest alone, gives the same pillars.
    again = Preprocessor(manifest.preprocessing)(batch)
    assert torch.equal(again.lidar.bev_index, inputs.lidar.bev_index)
    with torch.no_grad():
        expected = model(*inputs.as_args())
    got = session.run(None, {n: t.numpy() for n, t in inputs.named().items()})
    for name, value in zip(names, got):
        np.testing.assert_allclose(value, expected[name].numpy(), rtol=1e-3, atol=1e-4, err_msg=name)


def test_radar_pillar_stride_is_refused():
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml", ["model.radar.pillar_stride=2"])
    with pytest.raises(ConfigError, match="model.radar.pillar_stride"):
        build_model(cfg)
