"""BEV pooling: every placement of features on the BEV grid, in training, evaluation and every runtime.

One formulation, used by the lift-splat view transform and both pillar encoders alike: pre-processing works
out *where* each feature goes (index tables made from the calibration and the point clouds, plain torch), and
the model places and sums features with ``index_select`` (ONNX ``Gather``) and ``sum`` (``ReduceSum``) only.
No ``scatter_add``: ONNX writes it as ``ScatterElements(reduction="add")``, which TensorRT 10's ONNX parser only
imports through its ``ScatterElements`` plugin, and a deployed model here needs no plugin. (On CPU a training
step of ``configs/tiny.yaml`` takes as long with either; README, "Architecture".)

  - Pillars: one pillar per cell of the voxeliser's pillar grid (the BEV grid, or one ``pillar_stride`` times
    finer), so that grid is a ``Gather`` of the pillar features plus a zero row, indexed by each cell's pillar
    (`gather_bev`, with the index of `PillarVoxelizer`).
  - Lift-splat: the frustum points of the rig, sorted by BEV cell, are cut into segments of at most ``K``
    points of one cell (`PoolingPlan`). ``Gather`` + ``ReduceSum`` sums every segment; a second ``Gather`` +
    ``ReduceSum`` sums the segments of the cells that have several; `gather_bev` lays the cell sums out on
    the grid (`pool_with_plan`). The sums are exact up to summation order, and run in float32 whatever the
    autocast dtype: a cell gathers up to thousands of frustum points, and bfloat16 (8 significant bits) would
    lose every addend below 1/256 of the running sum.

The backward of ``index_select`` is ``index_add``, so training sums gradients with one scatter per table.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from perception.structures import BEVGrid

# Frustum points per lift-splat pooling segment (K of `PoolingPlan.segments`).
DEFAULT_SEGMENT_SIZE = 8


def bev_flat_index(x: Tensor, y: Tensor, z: Tensor, grid: BEVGrid) -> Tensor:
    """Flat BEV cell index ``row * width + col`` of points, or ``height * width`` (the drop slot) outside the grid.

    Args:
        x, y, z: (...) float, metres in the grid's frame.

    Returns:
        (...) int64 in [0, height * width].
    """
    height, width = grid.shape
    col = torch.floor((x - grid.x_min) / grid.cell)
    row = torch.floor((y - grid.y_min) / grid.cell)
    inside = (col >= 0) & (col < width) & (row >= 0) & (row < height) & (z >= grid.z_min) & (z < grid.z_max)
    flat = (row * width + col).clamp(0, height * width - 1).long()
    return torch.where(inside, flat, torch.full_like(flat, height * width))


def _with_zero_row(rows: Tensor) -> Tensor:
    """rows (R, C) -> (R + 1, C): row R is zeros (the target of every padding index)."""
    return torch.cat([rows, rows.new_zeros(1, rows.shape[1])], 0)


def gather_bev(rows: Tensor, bev_index: Tensor) -> Tensor:
    """Lay rows out on the BEV grid.

    Args:
        rows: (R, C) float, one feature vector per occupied cell (or per pooled cell sum).
        bev_index: (B, H, W) int64 in [0, R], the row of each cell; R = empty cell (reads zeros).

    Returns:
        (B, C, H, W) BEV features, row i along +y, column j along +x, dtype of `rows`.
    """
    b, h, w = bev_index.shape
    out = _with_zero_row(rows).index_select(0, bev_index.reshape(-1))
    return out.view(b, h, w, rows.shape[1]).permute(0, 3, 1, 2).contiguous()


def segment_sum(rows: Tensor, segments: Tensor) -> Tensor:
    """rows (R, C), segments (S, K) int64 in [0, R] (R = padding) -> (S, C): the sum of each segment's rows."""
    s, k = segments.shape
    return _with_zero_row(rows).index_select(0, segments.reshape(-1)).view(s, k, rows.shape[1]).sum(1)


@dataclass(frozen=True)
class PoolingPlan:
    """Lift-splat BEV pooling as Gather tables, for a batch of B samples with P frustum points each.

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

    def as_tuple(self) -> tuple[Tensor, Tensor, Tensor]:
        return self.segments, self.merges, self.cells


def make_pooling_plan(geometry: Tensor, grid: BEVGrid, segment_size: int = DEFAULT_SEGMENT_SIZE) -> PoolingPlan:
    """The `PoolingPlan` of lift-splat geometry (pre-processing; not differentiable, not exported).

    Args:
        geometry: (B, P) int64 flat BEV index of every frustum point in [0, H*W] (H*W = dropped), as
            `perception.model.view_transform.LiftSplat.geometry` gives it.
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


def pool_with_plan(volume: Tensor, segments: Tensor, merges: Tensor, cells: Tensor) -> Tensor:
    """Sum the rows of a frustum volume into the BEV grid with a `PoolingPlan`'s tables.

    Args:
        volume: (B*P, C) float, one feature vector per frustum point in the plan's row order; float16 and
            bfloat16 are upcast (the sums run in float32).
        segments, merges, cells: the plan (see `PoolingPlan`).

    Returns:
        (B, C, H, W) float32 (float64 for float64 input): the sum of the rows that fall in each cell.
    """
    if volume.dtype in (torch.float16, torch.bfloat16):
        volume = volume.float()
    segment_sums = segment_sum(volume, segments)  # (S, C)
    merged = segment_sum(segment_sums, merges)  # (M, C)
    return gather_bev(torch.cat([segment_sums, merged], 0), cells)


def pillar_bev_index(index: Tensor, batch_size: int, grid: BEVGrid) -> Tensor:
    """(B, H, W) int64 row of each cell's pillar, P (the zero row) where there is none, from the pillars' flat
    keys (P,) = ``b * H * W + row * W + col`` (at most one pillar per cell)."""
    height, width = grid.shape
    p = index.shape[0]
    out = torch.full((batch_size * height * width,), p, dtype=torch.int64, device=index.device)
    out[index] = torch.arange(p, device=index.device)
    return out.view(batch_size, height, width)
