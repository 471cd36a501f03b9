"""Fuser: combines camera, LiDAR and radar BEV features under a per-sample modality mask.

Every branch always runs (one static graph for export); a missing modality's features are multiplied by 0 and
the mask itself is appended as 3 constant channels, so the fuser knows which inputs to trust. An empty point
cloud is an ordinary input: its BEV features are the encoder's response to an all-zero grid, and a sample whose
LiDAR is absent is masked anyway.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from perception.data.batch import MODALITIES


class BEVFuser(nn.Module):
    """Concatenate masked BEV features + mask channels, then two 3x3 conv + BN + ReLU (BEVFusion's ConvFuser).

    Args:
        in_channels: channels of the camera, LiDAR and radar BEV features, in `MODALITIES` order.
        out_channels: fused channels.
    """

    def __init__(self, *, in_channels: tuple[int, int, int], out_channels: int):
        super().__init__()
        self.out_channels = out_channels
        total = sum(in_channels) + len(MODALITIES)
        self.fuse = nn.Sequential(
            nn.Conv2d(total, out_channels, 3, padding=1, bias=False), nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False), nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True),
        )

    def forward(self, camera_bev: Tensor, lidar_bev: Tensor, radar_bev: Tensor, modality_mask: Tensor) -> Tensor:
        """camera_bev, lidar_bev, radar_bev: (B, C_m, H, W); modality_mask: (B, 3) bool -> (B, out_channels, H, W)."""
        mask = modality_mask.to(camera_bev.dtype)[:, :, None, None]  # (B, 3, 1, 1)
        h, w = camera_bev.shape[-2:]
        parts = [camera_bev * mask[:, 0:1], lidar_bev * mask[:, 1:2], radar_bev * mask[:, 2:3],
                 mask.expand(-1, -1, h, w)]
        return self.fuse(torch.cat(parts, 1))


def drop_modalities(modality_mask: Tensor, prob: float | tuple[float, float, float],
                    generator: torch.Generator | None = None) -> Tensor:
    """Modality dropout for training: each present modality of each sample is dropped with probability `prob`
    (one for all, or per modality in `MODALITIES` order), but a sample always keeps at least one of the
    modalities it had.

    modality_mask: (B, 3) bool -> (B, 3) bool.
    """
    probs = torch.as_tensor(prob, dtype=torch.float32, device=modality_mask.device).expand(modality_mask.shape[1])
    if not (probs > 0).any():
        return modality_mask
    drop = torch.rand(modality_mask.shape, generator=generator, device=modality_mask.device) < probs
    kept = modality_mask & ~drop
    emptied = ~kept.any(1) & modality_mask.any(1)
    if emptied.any():
        # Restore one random modality the sample had.
        scores = torch.rand(modality_mask.shape, generator=generator, device=modality_mask.device) * modality_mask
        pick = torch.nn.functional.one_hot(scores.argmax(1), modality_mask.shape[1]).bool()
        kept = torch.where(emptied[:, None], pick, kept)
    return kept
