"""The temporal state that training, evaluation and every runner carry from one keyframe to the next.

A model with temporal fusion (`fusion.temporal.TemporalFuser`, ``model.temporal.frames: 1``) takes, besides the
sensors, the previous keyframe's fused BEV, the transform from the current to the previous LIDAR_TOP frame and
whether there is a history at all. `TemporalState` keeps, per batch slot, what the last call left: the fused BEV
(detached), its LIDAR_TOP -> global pose (after that sample's BEV augmentation, so the BEV's own frame) and its
sample token. A slot has a history when the state holds exactly the sample's previous keyframe
(``meta["prev_token"]``): the first keyframe of a scene, a skipped or missing keyframe, a slot whose stream
moved to another scene, or a reset state (a "history lost" robustness condition) all mean no history.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

from perception.structures import BEVGrid


@dataclass
class History:
    """The temporal inputs of the core for one batch of B samples.

    prev_bev: (B, C, H, W) the previous keyframes' fused BEV features, each in its own (augmented) LIDAR_TOP
        frame on the BEV grid; zeros where there is no history.
    curr2prev: (B, 4, 4) float32, current -> previous (augmented) LIDAR_TOP frame, metres; identity where there
        is no history.
    has_history: (B,) bool.
    """

    prev_bev: Tensor
    curr2prev: Tensor
    has_history: Tensor

    def as_tuple(self) -> tuple[Tensor, Tensor, Tensor]:
        return self.prev_bev, self.curr2prev, self.has_history

    def repeat(self, n: int) -> "History":
        """The batch repeated `n` times along the batch dimension (paired passes)."""
        return History(*(t.repeat(n, *([1] * (t.dim() - 1))) for t in self.as_tuple()))

    @staticmethod
    def empty(batch_size: int, channels: int, grid: BEVGrid, device: torch.device | str,
              dtype: torch.dtype = torch.float32) -> "History":
        """No history for any sample."""
        return History(torch.zeros(batch_size, channels, *grid.shape, device=device, dtype=dtype),
                       torch.eye(4, device=device).repeat(batch_size, 1, 1),
                       torch.zeros(batch_size, dtype=torch.bool, device=device))


def bev_frame2global(meta: dict[str, Any]) -> np.ndarray:
    """(4, 4) float64: the sample's BEV frame (LIDAR_TOP after its BEV augmentation ``meta["lidar_aug"]``, none
    when absent) -> global: ``ego2global @ lidar2ego @ inverse(lidar_aug)``."""
    lidar2global = np.asarray(meta["ego2global"], np.float64) @ np.asarray(meta["lidar2ego"], np.float64)
    aug = meta.get("lidar_aug")
    return lidar2global if aug is None else lidar2global @ np.linalg.inv(np.asarray(aug, np.float64))


class TemporalState:
    """Per batch slot: the last keyframe's fused BEV, BEV-frame pose and token (see the module docstring)."""

    def __init__(self) -> None:
        self.bev: Tensor | None = None
        self.tokens: list[str] = []
        self.poses: list[np.ndarray] = []

    def reset(self) -> None:
        """Forget everything: the next batch has no history."""
        self.__init__()

    def history(self, meta: Sequence[dict[str, Any]], channels: int, grid: BEVGrid, device: torch.device | str) -> History:
        """The `History` of a batch with these per-sample `meta` (slot i = sample i)."""
        b = len(meta)
        curr2prev = np.tile(np.eye(4), (b, 1, 1))
        has = np.zeros(b, bool)
        usable = self.bev is not None and self.bev.shape == (b, channels, *grid.shape)
        for i, m in enumerate(meta):
            prev = m.get("prev_token", "")
            if usable and prev and self.tokens[i] == prev:
                has[i] = True
                curr2prev[i] = np.linalg.inv(self.poses[i]) @ bev_frame2global(m)
        prev_bev = self.bev.to(device) if usable else torch.zeros(b, channels, *grid.shape, device=device)
        return History(prev_bev, torch.from_numpy(curr2prev.astype(np.float32)).to(device), torch.from_numpy(has).to(device))

    def update(self, meta: Sequence[dict[str, Any]], bev: Tensor) -> None:
        """Remember this batch's fused BEV (B, C, H, W), detached, with its samples' tokens and poses."""
        self.bev = bev.detach()
        self.tokens = [m["sample_token"] for m in meta]
        self.poses = [bev_frame2global(m) for m in meta]
