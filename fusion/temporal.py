"""Temporal BEV alignment: a previous keyframe's BEV features resampled into the current keyframe's frame.

The building block of temporal BEV fusion (BEVDet4D-style): with the ego motion known from the poses, every cell
centre of the current BEV grid is mapped into the previous keyframe's LIDAR_TOP frame and the previous features
are sampled there (bilinear; cells that come from outside the previous grid get zeros and a False mask). Plain
`grid_sample` (ONNX GridSample, opset 16+; TensorRT's IGridSampleLayer), no plugin.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from perception.structures import BEVGrid


def curr2prev_transform(prev_lidar2global: Tensor, curr_lidar2global: Tensor) -> Tensor:
    """(B, 4, 4) rigid transforms from the current keyframe's LIDAR_TOP frame to the previous one's:
    ``inverse(prev_lidar2global) @ curr_lidar2global`` (both (B, 4, 4), float64 recommended: global coordinates
    are hundreds of metres)."""
    return torch.linalg.inv(prev_lidar2global) @ curr_lidar2global


def warp_bev(prev_bev: Tensor, curr2prev: Tensor, grid: BEVGrid) -> tuple[Tensor, Tensor]:
    """The previous BEV seen from the current keyframe.

    Args:
        prev_bev: (B, C, H, W) features of the previous keyframe on `grid` (row i along +y, column j along +x of
            its LIDAR_TOP frame).
        curr2prev: (B, 4, 4) current LIDAR_TOP -> previous LIDAR_TOP (`curr2prev_transform`); only the planar
            part (x, y and the yaw) is used: the BEV has no height.
        grid: the BEV grid of both.

    Returns:
        warped: (B, C, H, W) in `prev_bev`'s dtype, on the current keyframe's grid.
        valid: (B, 1, H, W) bool, the cell's centre falls inside the previous grid.
    """
    b = prev_bev.shape[0]
    h, w = grid.shape
    dev = prev_bev.device
    xs = grid.x_min + (torch.arange(w, device=dev, dtype=torch.float32) + 0.5) * grid.cell
    ys = grid.y_min + (torch.arange(h, device=dev, dtype=torch.float32) + 0.5) * grid.cell
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    centres = torch.stack([xx, yy], -1).reshape(1, h * w, 2)  # (1, HW, 2) current frame, metres
    m = curr2prev.to(device=dev, dtype=torch.float32)
    prev_xy = centres @ m[:, :2, :2].transpose(1, 2) + m[:, None, :2, 3]  # (B, HW, 2) previous frame
    # grid_sample's normalised coordinates (align_corners=False: -1 and 1 are the grid's outer edges).
    u = (prev_xy[..., 0] - grid.x_min) / (grid.x_max - grid.x_min) * 2 - 1
    v = (prev_xy[..., 1] - grid.y_min) / (grid.y_max - grid.y_min) * 2 - 1
    sample_at = torch.stack([u, v], -1).reshape(b, h, w, 2)
    warped = F.grid_sample(prev_bev.float(), sample_at, mode="bilinear", padding_mode="zeros", align_corners=False)
    valid = ((u.abs() <= 1) & (v.abs() <= 1)).reshape(b, 1, h, w)
    return warped.to(prev_bev.dtype), valid


class TemporalFuser(nn.Module):
    """The previous keyframe's fused BEV, warped into the current frame, fused with the current fused BEV
    (BEVDet4D-style, one past frame): ``bev + block([bev, warped, valid])`` with a 3x3 conv, BatchNorm and ReLU
    block, so a sample without history (``valid`` all False, warped zeros) still gets a well-defined output.

    Args:
        channels: C of the fused BEV.
        grid: the BEV grid of both frames.
    """

    def __init__(self, channels: int, grid: BEVGrid):
        super().__init__()
        self.grid = grid
        self.block = nn.Sequential(nn.Conv2d(2 * channels + 1, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels),
                                   nn.ReLU(inplace=True), nn.Conv2d(channels, channels, 3, padding=1))
        nn.init.zeros_(self.block[-1].weight)  # starts as the single-frame model
        nn.init.zeros_(self.block[-1].bias)

    def forward(self, bev: Tensor, prev_bev: Tensor, curr2prev: Tensor, has_history: Tensor) -> Tensor:
        """
        Args:
            bev: (B, C, H, W) the current fused BEV.
            prev_bev: (B, C, H, W) the previous keyframe's fused BEV in its own frame (zeros without history).
            curr2prev: (B, 4, 4) float32, current -> previous LIDAR_TOP frame (both after their BEV augmentation;
                `perception.model.temporal.TemporalState`); identity without history.
            has_history: (B,) bool.

        Returns: (B, C, H, W) in `bev`'s dtype.
        """
        warped, valid = warp_bev(prev_bev, curr2prev, self.grid)
        valid = valid & has_history.to(valid.device).reshape(-1, 1, 1, 1)
        warped = torch.where(valid, warped.to(bev.dtype), torch.zeros((), dtype=bev.dtype, device=bev.device))
        return bev + self.block(torch.cat([bev, warped, valid.to(bev.dtype)], 1))
