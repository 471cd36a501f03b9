"""Pre-processing shared by every runtime: a `Batch` -> the deployed core's named input tensors.

Image normalisation, pillar voxelisation and the camera geometry are the model's own code
(`CameraEncoder.normalize`'s formula, `fusion.lidar.PillarVoxelizer`, `LiftSplat.geometry` /
`BEVSample.geometry`), rebuilt from the export's manifest so that a runtime needs no model weights. On top
come the two layouts the plugin-free core reads (`deploy.core`):

  - `PoolingPlan`: the lift-splat BEV pooling as Gather tables, made once per camera rig and cached;
  - pillar BEV indices: for every BEV cell, the row of its pillar (or P, the zero row).

Everything here is torch on the batch's device; `Preprocessor.__call__` returns ``{name: tensor}`` in the
core's input order.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

from deploy.core import LIFT_SPLAT_GEOMETRY, PILLAR_INPUTS
from fusion.lidar import NUM_DECORATIONS, PillarVoxelizer
from perception.data.batch import Batch
from perception.model.view_transform import BEVSample, LiftSplat
from perception.structures import BEVGrid

# Frustum points per lift-splat pooling segment (K of `PoolingPlan.segments`).
DEFAULT_SEGMENT_SIZE = 8


@dataclass(frozen=True)
class PoolingPlan:
    """Lift-splat BEV pooling as Gather tables for a batch of B samples with P frustum points each.

    Attributes:
        segments: (S, K) int64 rows of the (B*P, C) frustum volume, in (b, n, d, h, w) order; every row
            lists up to K points of one BEV cell, padded with B*P (the zero row). S >= 1.
        merges: (M, K2) int64 rows of the (S, C) segment sums, one row per cell that has several segments,
            padded with S (the zero row). M, K2 >= 1 (an all-padding row when no cell has several).
        cells: (B, H, W) int64 row of each BEV cell in ``cat(segment sums, merged sums)`` (S + M rows), or
            S + M (the zero row) for a cell that no frustum point reaches.
    """

    segments: Tensor
    merges: Tensor
    cells: Tensor

    def as_inputs(self) -> dict[str, Tensor]:
        return dict(zip(LIFT_SPLAT_GEOMETRY, (self.segments, self.merges, self.cells)))


def make_pooling_plan(geometry: Tensor, grid: BEVGrid, segment_size: int = DEFAULT_SEGMENT_SIZE) -> PoolingPlan:
    """The `PoolingPlan` of lift-splat geometry.

    Args:
        geometry: (B, P) int64 flat BEV index of every frustum point in [0, H*W] (H*W = dropped), as
            `LiftSplat.geometry` gives it.
        grid: the BEV grid.
        segment_size: K, frustum points per segment.
    """
    device = geometry.device
    b, p = geometry.shape
    height, width = grid.shape
    cells = height * width
    flat = geometry.reshape(-1)
    rows = torch.nonzero(flat < cells).flatten()  # rows of the (B*P, C) volume that land on the grid
    keys = (rows // p) * cells + flat[rows]  # b * H*W + cell
    order = torch.argsort(keys, stable=True)
    rows, keys = rows[order], keys[order]
    cell_keys, point_cell, counts = torch.unique_consecutive(keys, return_inverse=True, return_counts=True)
    rank = torch.arange(keys.shape[0], device=device) - (torch.cumsum(counts, 0) - counts)[point_cell]
    seg_count = (counts + segment_size - 1) // segment_size  # segments per occupied cell
    seg_start = torch.cumsum(seg_count, 0) - seg_count
    num_segments = max(int(seg_count.sum()), 1)
    segments = torch.full((num_segments, segment_size), b * p, dtype=torch.int64, device=device)
    segments[seg_start[point_cell] + rank // segment_size, rank % segment_size] = rows

    heavy = torch.nonzero(seg_count > 1).flatten()
    width2 = max(int(seg_count[heavy].max()) if heavy.numel() else 1, 1)
    num_merged = max(int(heavy.numel()), 1)
    merges = torch.full((num_merged, width2), num_segments, dtype=torch.int64, device=device)
    if heavy.numel():
        slot = torch.arange(width2, device=device)
        used = slot[None, :] < seg_count[heavy][:, None]
        merges = torch.where(used, seg_start[heavy][:, None] + slot[None, :], merges)

    table_rows = num_segments + num_merged
    cell_row = torch.full((b * cells,), table_rows, dtype=torch.int64, device=device)
    cell_row[cell_keys] = seg_start
    cell_row[cell_keys[heavy]] = num_segments + torch.arange(heavy.numel(), device=device)
    return PoolingPlan(segments=segments, merges=merges, cells=cell_row.view(b, height, width))


def pillar_bev_index(index: Tensor, batch_size: int, grid: BEVGrid) -> Tensor:
    """(B, H, W) int64 row of each cell's pillar, P (the zero row) where there is none, from `Pillars.index`
    (P,) = ``b * H * W + row * W + col`` (one pillar per cell)."""
    height, width = grid.shape
    p = index.shape[0]
    out = torch.full((batch_size * height * width,), p, dtype=torch.int64, device=index.device)
    out[index] = torch.arange(p, device=index.device)
    return out.view(batch_size, height, width)


@dataclass(frozen=True)
class PillarSpec:
    """A voxeliser as the manifest records it (`fusion.lidar.PillarVoxelizer` arguments)."""

    feature_columns: tuple[int, ...]
    max_points_per_pillar: int
    max_pillars: int

    def build(self, grid: BEVGrid) -> PillarVoxelizer:
        return PillarVoxelizer(grid=grid, feature_columns=self.feature_columns,
                               max_points_per_pillar=self.max_points_per_pillar, max_pillars=self.max_pillars)

    @property
    def num_features(self) -> int:
        """F of the pillar features: the selected columns plus the decorations."""
        return len(self.feature_columns) + NUM_DECORATIONS

    def to_json(self) -> dict[str, Any]:
        return {"feature_columns": list(self.feature_columns), "max_points_per_pillar": self.max_points_per_pillar,
                "max_pillars": self.max_pillars, "num_features": self.num_features}

    @staticmethod
    def from_json(d: dict[str, Any]) -> "PillarSpec":
        return PillarSpec(tuple(d["feature_columns"]), int(d["max_points_per_pillar"]), int(d["max_pillars"]))


@dataclass(frozen=True)
class PreprocessSpec:
    """Everything pre-processing needs, as the manifest's ``preprocessing`` section records it.

    Attributes:
        image_size: (H, W) of the images the core takes.
        pixel_mean, pixel_std: per RGB channel, in uint8 units: ``(image - mean) / std``.
        grid: the BEV grid.
        lidar, radar: the voxelisers.
        view_transform: ``{"kind": "lift_splat", "depth_min", "depth_step", "num_bins", "feature_stride",
            "segment_size"}`` or ``{"kind": "bev_sample", "z_levels"}``.
    """

    image_size: tuple[int, int]
    pixel_mean: tuple[float, float, float]
    pixel_std: tuple[float, float, float]
    grid: BEVGrid
    lidar: PillarSpec
    radar: PillarSpec
    view_transform: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {
            "image_size": list(self.image_size), "image_layout": "RGB, (B, 6, 3, H, W), cameras in CAMERA_CHANNELS order",
            "pixel_mean": list(self.pixel_mean), "pixel_std": list(self.pixel_std),
            "normalization": "float32(image_uint8 - pixel_mean) / pixel_std",
            "grid": asdict(self.grid), "lidar": self.lidar.to_json(), "radar": self.radar.to_json(),
            "view_transform": dict(self.view_transform),
        }

    @staticmethod
    def from_json(d: dict[str, Any]) -> "PreprocessSpec":
        return PreprocessSpec(
            image_size=tuple(d["image_size"]), pixel_mean=tuple(d["pixel_mean"]), pixel_std=tuple(d["pixel_std"]),
            grid=BEVGrid(**d["grid"]), lidar=PillarSpec.from_json(d["lidar"]), radar=PillarSpec.from_json(d["radar"]),
            view_transform=dict(d["view_transform"]),
        )


def preprocess_spec_of(model, segment_size: int = DEFAULT_SEGMENT_SIZE) -> PreprocessSpec:
    """The `PreprocessSpec` of a `BEVFusionModel` (its normalisation buffers, voxelisers and view transform)."""
    vt = model.view_transform
    if isinstance(vt, LiftSplat):
        bins = vt.depth_bins
        view = {"kind": "lift_splat", "depth_min": float(bins[0]), "depth_step": float(bins[1] - bins[0]),
                "num_bins": vt.num_bins, "feature_stride": vt.feature_stride, "segment_size": segment_size}
    elif isinstance(vt, BEVSample):
        view = {"kind": "bev_sample", "z_levels": vt.z_levels}
    else:
        raise TypeError(f"no deployable pre-processing for {type(vt).__name__}")
    enc = model.camera_encoder

    def pillars(v: PillarVoxelizer) -> PillarSpec:
        return PillarSpec(tuple(v.feature_columns), v.max_points_per_pillar, v.max_pillars)

    return PreprocessSpec(
        image_size=tuple(enc.image_size), pixel_mean=tuple(enc.pixel_mean.flatten().tolist()),
        pixel_std=tuple(enc.pixel_std.flatten().tolist()), grid=model.grid,
        lidar=pillars(model.lidar_encoder.voxelizer), radar=pillars(model.radar_encoder.voxelizer), view_transform=view,
    )


class Preprocessor:
    """`Batch` -> ``{input name: tensor}`` of the deployed core, on the batch's device.

    The camera geometry (and for lift-splat its `PoolingPlan`) depends only on the rig's calibration, so it is
    computed once per distinct (cam2img, cam2lidar) and kept in a small cache.
    """

    def __init__(self, spec: PreprocessSpec, cache_size: int = 8):
        self.spec = spec
        self.grid = spec.grid
        self.lidar_voxelizer = spec.lidar.build(spec.grid)
        self.radar_voxelizer = spec.radar.build(spec.grid)
        vt = spec.view_transform
        if vt["kind"] == "lift_splat":
            # Only `geometry` of this module is used; the channel counts do not enter it.
            self.view = LiftSplat(grid=spec.grid, in_channels=1, out_channels=1, image_size=spec.image_size,
                                  feature_stride=int(vt["feature_stride"]), depth_min=float(vt["depth_min"]),
                                  depth_step=float(vt["depth_step"]), num_bins=int(vt["num_bins"]))
            self.segment_size = int(vt["segment_size"])
        elif vt["kind"] == "bev_sample":
            self.view = BEVSample(grid=spec.grid, in_channels=1, out_channels=1, image_size=spec.image_size,
                                  z_levels=int(vt["z_levels"]))
        else:
            raise ValueError(f"unknown view transform kind {vt['kind']!r}")
        self._cache: OrderedDict[tuple, dict[str, Tensor]] = OrderedDict()
        self._cache_size = cache_size

    def normalize(self, images: Tensor) -> Tensor:
        """(B, N, 3, H, W) uint8 RGB -> float32 normalised (the formula of `CameraEncoder.normalize`)."""
        mean = torch.tensor(self.spec.pixel_mean, dtype=torch.float32, device=images.device).view(3, 1, 1)
        std = torch.tensor(self.spec.pixel_std, dtype=torch.float32, device=images.device).view(3, 1, 1)
        return (images.float() - mean) / std

    def geometry(self, cam2img: Tensor, cam2lidar: Tensor) -> dict[str, Tensor]:
        """The camera-geometry inputs for a rig: cam2img (B, N, 3, 3), cam2lidar (B, N, 4, 4) (cached)."""
        key = (str(cam2img.device), tuple(cam2img.shape),
               hashlib.sha1(cam2img.float().cpu().numpy().tobytes() + cam2lidar.float().cpu().numpy().tobytes()).hexdigest())
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit
        view = self.view.to(cam2img.device)
        with torch.no_grad():
            geometry = view.geometry(cam2img, cam2lidar)
        if isinstance(view, LiftSplat):
            out = make_pooling_plan(geometry, self.grid, self.segment_size).as_inputs()
        else:
            out = {"lidar2img": geometry.float()}
        self._cache[key] = out
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return out

    def pillars(self, sensor: str, points: Tensor, num_points: Tensor) -> dict[str, Tensor]:
        """``{sensor}_features`` (P, M, F), ``{sensor}_point_mask`` (P, M), ``{sensor}_bev_index`` (B, H, W).

        A batch without any pillar gets one all-padding pillar (zero features, zero mask, referenced by no
        cell), so that no runtime sees a zero-sized tensor.
        """
        voxelizer = self.lidar_voxelizer if sensor == "lidar" else self.radar_voxelizer
        pillars = voxelizer(points, num_points)
        features, mask = pillars.features, pillars.point_mask
        batch_size = int(num_points.shape[0])
        bev_index = pillar_bev_index(pillars.index, batch_size, self.grid)
        if features.shape[0] == 0:
            features = features.new_zeros(1, *features.shape[1:])
            mask = mask.new_zeros(1, mask.shape[1])
            bev_index = torch.ones_like(bev_index)  # the zero row after the padding pillar
        return dict(zip((f"{sensor}_{n}" for n in PILLAR_INPUTS), (features, mask, bev_index)))

    @torch.no_grad()
    def __call__(self, batch: Batch) -> dict[str, Tensor]:
        """The core's inputs for `batch`, in graph order (see `deploy.core.core_input_names`)."""
        if tuple(batch.images.shape[-2:]) != tuple(self.spec.image_size):
            raise ValueError(f"images are {tuple(batch.images.shape[-2:])} (H, W) but the core takes {self.spec.image_size}")
        return {
            "images": self.normalize(batch.images),
            **self.geometry(batch.cam2img, batch.cam2lidar),
            **self.pillars("lidar", batch.points_lidar, batch.num_points_lidar),
            **self.pillars("radar", batch.points_radar, batch.num_points_radar),
            "modality_mask": batch.modality_mask.bool(),
        }
