"""BEV pooling by scatter-add: plain PyTorch, exports to ONNX as ScatterElements(reduction="add") (opset >= 16).

Shared by the lift-splat view transform and the pillar encoders: each gives, for every feature vector, the
flat index of the BEV cell it falls into, and features of the same cell are summed. The sums are accumulated
in float32 whatever the autocast dtype: a lift-splat cell gathers up to thousands of frustum points, and on
CUDA a scatter-add into a bfloat16 tensor adds atomically in bfloat16 (8 significant bits: an addend below
~1/256 of the running sum is lost); on CPU the sums are at least rounded to bfloat16 (relative error 2^-9).
"""

from __future__ import annotations

import torch
from torch import Tensor

from perception.structures import BEVGrid


def scatter_add_rows(features: Tensor, index: Tensor, num_rows: int) -> Tensor:
    """Sum rows of `features` into `num_rows` output rows.

    Args:
        features: (P, C) float (float16 / bfloat16 are upcast).
        index: (P,) int64 in [0, num_rows), the output row of each input row.
        num_rows: number of output rows.

    Returns:
        (num_rows, C) float32 (float64 for float64 features), zeros where no input row landed.
    """
    if features.dtype in (torch.float16, torch.bfloat16):
        features = features.float()
    channels = features.shape[1]
    out = features.new_zeros(num_rows, channels)
    return out.scatter_add(0, index[:, None].expand(-1, channels), features)


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
