"""Post-processing shared by every runtime: the core's head tensors -> `Prediction`s.

Decoding is the model's own `perception.model.heads.decode_detections` (3x3 max-pool peaks, top-k, score
threshold, per-class circle NMS) with the settings the manifest records, and map / scene probabilities are
the sigmoid of their logits: exactly what `BEVFusionModel.predict` does after its forward.
"""

from __future__ import annotations

from dataclasses import dataclass
from dataclasses import asdict
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from perception.classes import NUSCENES, ClassList
from perception.model.bevfusion import DecodeSettings, Prediction, outputs_to_predictions
from perception.model.lidar_velocity import LidarVelocityConfig
from perception.structures import BEVGrid


@dataclass(frozen=True)
class PostprocessSpec:
    """The manifest's ``postprocessing`` section: decoding settings on the BEV grid."""

    grid: BEVGrid
    decode: DecodeSettings

    def to_json(self) -> dict[str, Any]:
        return {"top_k": self.decode.top_k, "score_threshold": self.decode.score_threshold,
                "max_detections": self.decode.max_detections,
                "circle_nms_radius_m": {c.name: c.nms_radius_m for c in self.decode.classes.classes},
                "classes": self.decode.classes.to_json(),
                "lidar_velocity": None if self.decode.lidar_velocity is None else asdict(self.decode.lidar_velocity),
                "peaks": "3x3 max-pool on sigmoid(heatmap)", "boxes": "Boxes3D layout in LIDAR_TOP: x, y, z, w, l, h, yaw, vx, vy"}

    @staticmethod
    def from_json(d: Mapping[str, Any], grid: BEVGrid) -> "PostprocessSpec":
        lv = d.get("lidar_velocity")  # (absent in manifests written before the option)
        lidar_velocity = None if lv is None else LidarVelocityConfig(  # fields absent from older manifests: defaults
            **{k: tuple(v) if isinstance(v, list) else v for k, v in lv.items()})
        classes = NUSCENES if "classes" not in d else ClassList.from_json(d["classes"])  # older manifests: nuScenes
        return PostprocessSpec(grid=grid, decode=DecodeSettings(top_k=int(d["top_k"]), score_threshold=float(d["score_threshold"]),
                                                                max_detections=int(d["max_detections"]),
                                                                lidar_velocity=lidar_velocity, classes=classes))


class Postprocessor:
    """``{output name: tensor}`` (batch first, any device; numpy arrays are accepted) -> one `Prediction` per sample."""

    def __init__(self, spec: PostprocessSpec):
        self.spec = spec

    @torch.no_grad()
    def __call__(self, outputs: Mapping[str, Any], points_lidar: Sequence[Tensor | None] | None = None
                 ) -> list[Prediction]:
        """`points_lidar`: per sample, its LiDAR points or None (see `outputs_to_predictions`)."""
        out = {k: torch.as_tensor(v).float() for k, v in outputs.items()}
        return outputs_to_predictions(out, self.spec.grid, self.spec.decode, points_lidar)
