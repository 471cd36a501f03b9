"""BEV decoder: a SECOND-style two-stage 2D conv backbone and an FPN neck back at the BEV grid's resolution."""

from __future__ import annotations

import torch
from torch import Tensor, nn


def _conv_bn_relu(cin: int, cout: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class BEVDecoder(nn.Module):
    """Stage 1 at stride 1, stage 2 at stride 2; the neck upsamples stage 2 and concatenates.

    Args:
        in_channels: fused BEV channels.
        channels: (C1, C2) of the two stages.
        layers: extra 3x3 convs per stage (after each stage's first conv).
        out_channels: channels of the output, split evenly between the two neck branches.
        position_channels: append two channels to the input, each cell's column (x) and row (y) index scaled
            linearly to [-1, 1] from the first to the last, so that what depends on where
            a cell is relative to the ego (oncoming lanes on one side, the ego's lane ahead) can be learnt; the
            convolutions alone see position only near the grid's edges (BEVFormer's BEV queries carry a learnt
            position embedding for the same reason).

    Input (B, in_channels, H, W) with H, W even -> output (B, out_channels, H, W).
    """

    def __init__(self, *, in_channels: int, channels: tuple[int, int], layers: tuple[int, int], out_channels: int,
                 position_channels: bool = False):
        super().__init__()
        if out_channels % 2:
            raise ValueError(f"BEVDecoder: out_channels must be even, got {out_channels}")
        c1, c2 = channels
        self.position_channels = position_channels
        stage1 = _conv_bn_relu(in_channels + (2 if position_channels else 0), c1)
        for _ in range(layers[0]):
            stage1 += _conv_bn_relu(c1, c1)
        stage2 = _conv_bn_relu(c1, c2, stride=2)
        for _ in range(layers[1]):
            stage2 += _conv_bn_relu(c2, c2)
        self.stage1 = nn.Sequential(*stage1)
        self.stage2 = nn.Sequential(*stage2)
        half = out_channels // 2
        self.lateral1 = nn.Sequential(nn.Conv2d(c1, half, 1, bias=False), nn.BatchNorm2d(half), nn.ReLU(inplace=True))
        self.lateral2 = nn.Sequential(nn.ConvTranspose2d(c2, half, 2, stride=2, bias=False), nn.BatchNorm2d(half), nn.ReLU(inplace=True))
        self.out_channels = out_channels

    def forward(self, bev: Tensor) -> Tensor:
        if self.position_channels:
            B, _, H, W = bev.shape
            col = torch.linspace(-1.0, 1.0, W, device=bev.device, dtype=bev.dtype).view(1, 1, 1, W).expand(B, 1, H, W)
            row = torch.linspace(-1.0, 1.0, H, device=bev.device, dtype=bev.dtype).view(1, 1, H, 1).expand(B, 1, H, W)
            bev = torch.cat([bev, col, row], 1)
        x1 = self.stage1(bev)
        x2 = self.stage2(x1)
        return torch.cat([self.lateral1(x1), self.lateral2(x2)], 1)
