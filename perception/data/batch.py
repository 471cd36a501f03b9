"""The batch contract between the data pipeline and the model.

Everything is in the keyframe's LIDAR_TOP frame (x right, y forward, z up; metres) unless the name says
otherwise. Point clouds and boxes of a batch are concatenated along the first axis, with per-sample counts
kept, so that empty point clouds and empty scenes are ordinary values.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import torch
from torch import Tensor

from perception.data.shm_pool import INLINE_PICKLE_BYTES, Pooled, pack, unpack

MODALITIES: tuple[str, ...] = ("camera", "lidar", "radar")
# Pickling a Batch (a DataLoader worker sending it to the main process) sends CPU tensors up to
# INLINE_PICKLE_BYTES inline, as bytes: each tensor torch shares by memory costs a shared-memory segment and a file
# descriptor passed over a socket (~0.3 ms per tensor on both ends), far more than copying a few KB. Larger ones
# from a worker's pool go by reference (`perception.data.shm_pool`).


def _rebuild_batch(values: dict[str, Any]) -> "Batch":
    def rebuild(v):
        if isinstance(v, _Inline):
            return torch.from_numpy(v)
        if isinstance(v, Pooled):
            return unpack(v)
        return v
    return Batch(**{k: rebuild(v) for k, v in values.items()})


class _Inline(np.ndarray):
    """Marks a small tensor's numpy copy in a pickled Batch."""


@dataclass
class Batch:
    """A collated batch of B samples with C = 6 cameras.

    Attributes:
        images: (B, C, 3, H, W) uint8, RGB, after image augmentation.
        cam2img: (B, C, 3, 3) float32, camera frame -> augmented pixel coordinates (intrinsics with the
            image augmentation folded in: `img_aug @ K`).
        cam2lidar: (B, C, 4, 4) float32, camera frame -> LIDAR_TOP frame (after BEV augmentation).
        img_aug: (B, C, 3, 3) float32, the image augmentation alone (original pixels -> augmented pixels).
        points_lidar: (sum N_b, 5) float32: x, y, z, intensity, dt (s, >= 0; 0 for the keyframe sweep).
        num_points_lidar: (B,) int64, N_b.
        points_radar: (sum M_b, 7) float32: x, y, z, rcs (dBsm), vx_comp, vy_comp (m/s, this frame), dt (s).
        num_points_radar: (B,) int64, M_b.
        boxes: (sum K_b, 9) float32, `Boxes3D` layout: x, y, z (centre), w, l, h, yaw, vx, vy.
        labels: (sum K_b,) int64, index into DETECTION_CLASSES.
        attributes: (sum K_b,) int64, index into ATTRIBUTES, -1 where the class has none.
        num_boxes: (B,) int64, K_b.
        map_masks: (B, len(MAP_CLASSES), H_bev, W_bev) float32 in {0, 1}, on the model's BEVGrid
            (row i along +y, column j along +x).
        scene_tags: (B, len(SCENE_TAGS)) float32 multi-hot.
        modality_mask: (B, 3) bool, which of MODALITIES are present for each sample.
        camera_mask: (B, C) bool, which cameras are present (a camera absent from a sample: its image is zeros and
            its features do not enter the BEV), or None: every camera of every sample. A sample with no camera
            present has the camera modality off in `modality_mask` too.
        has_map: (B,) bool, the sample has map ground truth (`map_masks` is meaningful; else zeros, and the map
            losses and metrics leave the sample out).
        has_scene_tags: (B,) bool, the sample's scene tags are known (else zeros, left out likewise).
        map_masks_eval: (B, len(MAP_CLASSES), H_e, W_e) float32 in {0, 1} on the dataset's `eval_map_grid`
            (BEVFusion's fixed map-evaluation grid), or None (training batches).
        meta: B dicts with at least `sample_token`, `timestamp` (us), `lidar2ego` and `ego2global`
            (4x4 float64 numpy arrays).
    """

    images: Tensor
    cam2img: Tensor
    cam2lidar: Tensor
    img_aug: Tensor
    points_lidar: Tensor
    num_points_lidar: Tensor
    points_radar: Tensor
    num_points_radar: Tensor
    boxes: Tensor
    labels: Tensor
    attributes: Tensor
    num_boxes: Tensor
    map_masks: Tensor
    scene_tags: Tensor
    modality_mask: Tensor
    has_map: Tensor
    has_scene_tags: Tensor
    meta: list[dict[str, Any]] = field(default_factory=list)
    map_masks_eval: Tensor | None = None
    camera_mask: Tensor | None = None

    def __reduce__(self):
        values = {}
        for f in fields(self):
            v = getattr(self, f.name)
            small = (isinstance(v, Tensor) and v.device.type == "cpu" and v.dtype != torch.bfloat16
                     and not v.requires_grad and v.numel() * v.element_size() <= INLINE_PICKLE_BYTES)
            pooled = pack(v)  # a tensor in a worker's reused shared memory: sent by reference
            values[f.name] = pooled or (v.numpy().copy().view(_Inline) if small else v)
        return _rebuild_batch, (values,)

    @property
    def batch_size(self) -> int:
        return int(self.images.shape[0])

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Batch":
        """A copy with every tensor on `device` (meta stays on the host)."""
        values = {}
        for f in fields(self):
            v = getattr(self, f.name)
            values[f.name] = v.to(device, non_blocking=non_blocking) if isinstance(v, Tensor) else v
        return Batch(**values)

    def pin_memory(self) -> "Batch":
        """A copy with every CPU tensor in page-locked memory, so that `to(cuda, non_blocking=True)` copies
        asynchronously. A DataLoader with `pin_memory=True` calls this in its pinning thread (without it, torch's
        pinning leaves objects of unknown types as they are)."""
        values = {}
        for f in fields(self):
            v = getattr(self, f.name)
            values[f.name] = v.pin_memory() if isinstance(v, Tensor) and v.device.type == "cpu" else v
        return Batch(**values)

    def split_points(self, name: str) -> list[Tensor]:
        """Per-sample views of `points_lidar` or `points_radar`."""
        counts = getattr(self, f"num_{name}").tolist()
        return list(torch.split(getattr(self, name), counts))
