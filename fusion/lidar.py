"""LiDAR encoder: pillar voxelisation (pre-processing, plain torch), PointPillars feature net, placement on the
BEV grid, and a small 2D backbone.

`PillarVoxelizer` runs outside the exportable core: it turns a concatenated point cloud with per-sample counts
into padded pillars and, for every cell of its pillar grid, the row of its pillar. The pillar grid is the BEV
grid, or with ``pillar_stride`` k > 1 a grid k times finer in x and y over the same extent; the encoder's first,
strided conv then brings the features back onto the BEV grid. `PillarEncoder` is exportable (Linear,
BatchNorm, max, Gather, convs; `fusion.bev_pool`). The radar encoder (`fusion.radar`) reuses both with radar
columns.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn

from fusion.bev_pool import bev_flat_index, gather_bev, pillar_bev_index
from perception.structures import BEVGrid

# Columns of Batch.points_lidar: x, y, z, intensity, dt.
LIDAR_FEATURE_COLUMNS: tuple[int, ...] = (0, 1, 2, 3, 4)
# Decoration appended to each point: offset to its pillar's point mean (3) and to the pillar centre (2).
NUM_DECORATIONS = 5
# Points with a time lag below this (s) belong to the keyframe sweep (dt = 0; the next 20 Hz sweep has 0.05).
KEYFRAME_DT = 0.025


@dataclass(frozen=True)
class Pillars:
    """Padded non-empty pillars of a batch of B samples, and where each lies on the voxeliser's pillar grid.

    A batch without any pillar gets one all-padding pillar (zero features, zero mask, referenced by no cell),
    so that no runtime sees a zero-sized tensor.

    Attributes:
        features: (P, M, F + 5) float32: the selected point columns, then x, y, z minus the pillar's point
            mean, then x, y minus the pillar centre (LIDAR_TOP, metres); zeros for padding slots.
        point_mask: (P, M) float32, 1 for real points.
        bev_index: (B, k*H, k*W) int64 in [0, P]: the pillar of each cell of the pillar grid (row i along +y,
            column j along +x), P where the cell has none; k = `PillarVoxelizer.pillar_stride` (1: the BEV grid
            (H, W) itself).
    """

    features: Tensor
    point_mask: Tensor
    bev_index: Tensor

    def as_tuple(self) -> tuple[Tensor, Tensor, Tensor]:
        return self.features, self.point_mask, self.bev_index


class PillarVoxelizer:
    """Groups points into pillars (one pillar per cell of `pillar_grid`, points with z outside the grid dropped).

    Args:
        grid: the BEV grid.
        feature_columns: which columns of the input points become point features (x, y, z must be 0, 1, 2
            of the input whether or not they are selected).
        max_points_per_pillar: M; a pillar with more points keeps M spread evenly over its points in input
            order (so over all sweeps of a multi-sweep cloud).
        max_pillars: per sample; when exceeded, the pillars with the most points are kept.
        pillar_stride: k >= 1; pillars are ``grid.cell / k`` metres on a side, over the grid's extent (the
            `PillarEncoder` downsamples by k back onto `grid`). 1: the pillars are the BEV cells.
    """

    def __init__(self, *, grid: BEVGrid, feature_columns: tuple[int, ...], max_points_per_pillar: int, max_pillars: int,
                 pillar_stride: int = 1):
        if int(pillar_stride) != pillar_stride or pillar_stride < 1:
            raise ValueError(f"pillar_stride must be a positive integer, got {pillar_stride}")
        self.grid = grid
        self.feature_columns = feature_columns
        self.max_points_per_pillar = max_points_per_pillar
        self.max_pillars = max_pillars
        self.pillar_stride = int(pillar_stride)
        # Same bounds, cells k times smaller: (k*H, k*W) cells, cell (i, j) inside BEV cell (i // k, j // k).
        self.pillar_grid = grid if self.pillar_stride == 1 else replace(grid, cell=grid.cell / self.pillar_stride)

    @property
    def num_features(self) -> int:
        """F + 5: channels of `Pillars.features`."""
        return len(self.feature_columns) + NUM_DECORATIONS

    def to_json(self) -> dict[str, Any]:
        """The settings an export manifest records (the grid is recorded once, beside them)."""
        return {"feature_columns": list(self.feature_columns), "max_points_per_pillar": self.max_points_per_pillar,
                "max_pillars": self.max_pillars, "num_features": self.num_features, "pillar_stride": self.pillar_stride}

    @staticmethod
    def from_json(d: dict[str, Any], grid: BEVGrid) -> "PillarVoxelizer":
        """The voxeliser `to_json` records, on the BEV `grid` (a manifest without ``pillar_stride`` predates it: 1)."""
        return PillarVoxelizer(grid=grid, feature_columns=tuple(int(c) for c in d["feature_columns"]),
                               max_points_per_pillar=int(d["max_points_per_pillar"]), max_pillars=int(d["max_pillars"]),
                               pillar_stride=int(d.get("pillar_stride", 1)))

    @torch.no_grad()
    def __call__(self, points: Tensor, num_points: Tensor) -> Pillars:
        """points: (sum N_b, F_in) float32 in LIDAR_TOP; num_points: (B,) int64 -> `Pillars`."""
        device = points.device
        grid = self.pillar_grid
        cells = grid.height * grid.width
        batch_size = int(num_points.shape[0])
        m = self.max_points_per_pillar
        batch_idx = torch.repeat_interleave(torch.arange(batch_size, device=device), num_points.to(device))
        cell = bev_flat_index(points[:, 0], points[:, 1], points[:, 2], grid)
        inside = cell < cells
        points, key = points[inside], (batch_idx[inside] * cells + cell[inside])

        order = torch.argsort(key, stable=True)
        points, key = points[order], key[order]
        pillar_key, point_pillar, counts = torch.unique_consecutive(key, return_inverse=True, return_counts=True)
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.arange(key.shape[0], device=device) - starts[point_pillar]

        # Per-sample cap on pillars: keep the fullest.
        pillar_batch = pillar_key // cells
        counts_kept = counts.clamp(max=m)
        by_fill = torch.argsort(pillar_batch * (m + 1) + (m - counts_kept), stable=True)
        per_batch = torch.bincount(pillar_batch, minlength=batch_size)
        batch_start = torch.cumsum(per_batch, 0) - per_batch
        pillar_rank = torch.empty_like(by_fill)
        pillar_rank[by_fill] = torch.arange(by_fill.shape[0], device=device)
        pillar_rank = pillar_rank - batch_start[pillar_batch]
        keep_pillar = pillar_rank < self.max_pillars
        new_id = torch.cumsum(keep_pillar.long(), 0) - 1

        # A pillar with more than M points keeps M of them evenly spread in input order (ranks floor(j * c / M),
        # j < M), not the first M: with multi-sweep clouds (keyframe sweep first) the first M would all come from
        # the newest sweep and drop the motion history of everything near the sensor.
        c = counts[point_pillar]
        slot = (rank * m + c - 1) // c  # the j whose sample floor(j * c / M) is at or after this point
        strided = (slot < m) & ((slot * c) // m == rank)
        keep_point = torch.where(c <= m, rank < m, strided) & keep_pillar[point_pillar]
        slot = torch.where(c <= m, rank, slot)
        points, rank, pillar_of_point = points[keep_point], slot[keep_point], new_id[point_pillar[keep_point]]
        pillar_key, counts_kept = pillar_key[keep_pillar], counts_kept[keep_pillar]
        num_pillars = int(pillar_key.shape[0])

        xyz = points[:, :3]
        mean = torch.zeros(num_pillars, 3, device=device).index_add_(0, pillar_of_point, xyz)
        mean = mean / counts_kept.clamp(min=1)[:, None].to(mean.dtype)
        flat = pillar_key % cells
        centre = torch.stack([
            grid.x_min + ((flat % grid.width).float() + 0.5) * grid.cell,
            grid.y_min + ((flat // grid.width).float() + 0.5) * grid.cell,
        ], -1)
        decorated = torch.cat([
            points[:, list(self.feature_columns)], xyz - mean[pillar_of_point], xyz[:, :2] - centre[pillar_of_point]
        ], -1)
        features = torch.zeros(num_pillars, m, self.num_features, device=device)
        features[pillar_of_point, rank] = decorated
        point_mask = torch.zeros(num_pillars, m, device=device)
        point_mask[pillar_of_point, rank] = 1.0
        bev_index = pillar_bev_index(pillar_key, batch_size, grid)
        if num_pillars == 0:  # one padding pillar, which no cell reads (index 1 is the zero row after it)
            features, point_mask = features.new_zeros(1, m, self.num_features), point_mask.new_zeros(1, m)
            bev_index = torch.ones_like(bev_index)
        return Pillars(features=features, point_mask=point_mask, bev_index=bev_index)


class PillarEncoder(nn.Module):
    """PointPillars: per-point Linear + BatchNorm + ReLU, max over the pillar's points, laid out on the
    voxeliser's pillar grid (`fusion.bev_pool.gather_bev`), then a small 2D conv backbone on the BEV grid.

    With ``voxelizer.pillar_stride`` k > 1 the pillar grid is k times finer than the BEV grid, and the backbone
    starts with `downsample`: a k x k conv of stride k (+ BN + ReLU, channels kept), which maps each BEV cell's
    k x k pillars onto that cell (centred on it, no overlap: (k*H, k*W) -> (H, W) exactly, as ConvNeXt's and
    Swin's downsampling layers do). With k = 1 `downsample` is an identity without parameters, so the module,
    its parameter names and shapes are those of an encoder without the option.

    Args:
        voxelizer: pre-processing that makes this encoder's `Pillars` (not called in `forward`).
        pfn_channels: pillar feature channels.
        out_channels: channels of the BEV output.
        backbone_layers: number of 3x3 conv + BN + ReLU layers on the BEV grid (after `downsample`).
        keyframe_feature: index into `Pillars.features` of the points' time lag (s); if given, the pillar's
            keyframe-sweep points (time lag < KEYFRAME_DT) are max-pooled again on their own and those
            `pfn_channels` are laid out beside the all-sweep ones, so the BEV keeps where a moving object is now
            apart from where it was. None: one max over all points.
    """

    def __init__(self, *, voxelizer: PillarVoxelizer, pfn_channels: int, out_channels: int, backbone_layers: int,
                 keyframe_feature: int | None = None):
        super().__init__()
        self.voxelizer = voxelizer
        self.grid = voxelizer.grid
        self.out_channels = out_channels
        self.pfn_channels = pfn_channels
        if keyframe_feature is not None and not 0 <= keyframe_feature < voxelizer.num_features:
            raise ValueError(f"keyframe_feature {keyframe_feature} is not one of the {voxelizer.num_features} point features")
        self.keyframe_feature = keyframe_feature
        self.pfn = nn.Sequential(
            nn.Linear(voxelizer.num_features, pfn_channels, bias=False), nn.BatchNorm1d(pfn_channels), nn.ReLU(inplace=True)
        )
        layers: list[nn.Module] = []
        cin = pfn_channels * (1 if keyframe_feature is None else 2)
        k = voxelizer.pillar_stride
        self.downsample: nn.Module = nn.Identity() if k == 1 else nn.Sequential(
            nn.Conv2d(cin, cin, k, stride=k, bias=False), nn.BatchNorm2d(cin), nn.ReLU(inplace=True))
        for _ in range(backbone_layers):
            layers += [nn.Conv2d(cin, out_channels, 3, padding=1, bias=False), nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True)]
            cin = out_channels
        if cin != out_channels:
            layers += [nn.Conv2d(cin, out_channels, 1)]
        self.backbone = nn.Sequential(*layers)

    def pool(self, features: Tensor, point_mask: Tensor) -> Tensor:
        """Pillar feature net and max over each pillar's points: features (P, M, F) float, point_mask (P, M)
        float -> (P, pfn_channels), or (P, 2 * pfn_channels) with `keyframe_feature` (all points, then the
        keyframe sweep's points only; 0 for a pillar without any)."""
        p, m, f = features.shape
        x = self.pfn(features.reshape(p * m, f)).view(p, m, self.pfn_channels)
        pooled = (x * point_mask[..., None]).amax(dim=1)  # (P, C); ReLU output >= 0 so masked zeros never win
        if self.keyframe_feature is None:
            return pooled
        keyframe = (features[..., self.keyframe_feature] < KEYFRAME_DT).to(x.dtype) * point_mask  # (P, M)
        return torch.cat([pooled, (x * keyframe[..., None]).amax(dim=1)], 1)

    def forward(self, features: Tensor, point_mask: Tensor, bev_index: Tensor) -> Tensor:
        """features: (P, M, F) float; point_mask: (P, M) float; bev_index: (B, k*H, k*W) int64 in [0, P]
        (`Pillars`; k = the voxeliser's `pillar_stride`, (H, W) = `grid.shape`).

        Returns: (B, out_channels, H, W) float BEV features on the grid (row along +y, column along +x); a
        pillar-grid cell without a pillar enters the backbone as zeros.
        """
        placed = gather_bev(self.pool(features, point_mask), bev_index)  # (B, C, k*H, k*W)
        return self.backbone(self.downsample(placed))


class LidarEncoder(PillarEncoder):
    """`PillarEncoder` over LiDAR points (x, y, z, intensity, dt)."""

    # Index of dt in the LiDAR `Pillars.features` (the `keyframe_feature` of a keyframe-pooling encoder).
    DT_FEATURE = LIDAR_FEATURE_COLUMNS.index(4)

    @staticmethod
    def make_voxelizer(grid: BEVGrid, *, max_points_per_pillar: int, max_pillars: int,
                       pillar_stride: int = 1) -> PillarVoxelizer:
        return PillarVoxelizer(grid=grid, feature_columns=LIDAR_FEATURE_COLUMNS, max_points_per_pillar=max_points_per_pillar,
                               max_pillars=max_pillars, pillar_stride=pillar_stride)
