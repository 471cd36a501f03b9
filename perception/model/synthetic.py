"""Synthetic batches for tests, smoke runs and `perception model-info`: a plausible six-camera rig and random
scenes whose LiDAR and radar points lie in and on the boxes (so the point branches can learn them)."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from perception.data.batch import MODALITIES, Batch
from perception.structures import (
    ATTRIBUTES, CAMERA_CHANNELS, CLASS_ATTRIBUTES, DETECTION_CLASSES, MAP_CLASSES, SCENE_TAGS, BEVGrid, Boxes3D,
)

# Camera optical-axis yaw about +z, counter-clockwise from the LIDAR_TOP +y (forward) axis, degrees.
CAMERA_YAW_DEG: dict[str, float] = {
    "CAM_FRONT": 0.0, "CAM_FRONT_RIGHT": -55.0, "CAM_FRONT_LEFT": 55.0,
    "CAM_BACK": 180.0, "CAM_BACK_LEFT": 110.0, "CAM_BACK_RIGHT": -110.0,
}
# nuScenes-like intrinsics of the original 1600x900 image.
ORIGINAL_SIZE = (900, 1600)  # (H, W)
FOCAL_PX = 1266.0
# Typical (w, l, h) per class, metres.
CLASS_SIZE_M: dict[str, tuple[float, float, float]] = {
    "car": (1.9, 4.6, 1.7), "truck": (2.5, 7.0, 2.9), "bus": (2.9, 11.0, 3.5), "trailer": (2.9, 12.0, 3.9),
    "construction_vehicle": (2.8, 6.4, 3.2), "pedestrian": (0.7, 0.7, 1.8), "motorcycle": (0.8, 2.1, 1.5),
    "bicycle": (0.6, 1.7, 1.3), "traffic_cone": (0.4, 0.4, 1.1), "barrier": (2.5, 0.5, 1.0),
}
GROUND_Z_LIDAR = -1.8  # ground height in LIDAR_TOP, metres


def camera_rig(image_size: tuple[int, int], num_cameras: int = len(CAMERA_CHANNELS)
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A surround rig for images resized to width W and cropped from the top to H: the six CAMERA_CHANNELS at their
    nuScenes headings, or `num_cameras` others evenly spaced in heading.

    Returns: cam2img (N, 3, 3), cam2lidar (N, 4, 4), img_aug (N, 3, 3), float32.
    """
    h, w = image_size
    scale = w / ORIGINAL_SIZE[1]
    crop_top = max(ORIGINAL_SIZE[0] * scale - h, 0.0)
    intrinsics = torch.tensor([[FOCAL_PX, 0, ORIGINAL_SIZE[1] / 2], [0, FOCAL_PX, ORIGINAL_SIZE[0] / 2], [0, 0, 1]])
    img_aug = torch.tensor([[scale, 0, 0], [0, scale, -crop_top], [0, 0, 1]])
    yaws_deg = ([CAMERA_YAW_DEG[name] for name in CAMERA_CHANNELS] if num_cameras == len(CAMERA_CHANNELS)
                else [360.0 * i / num_cameras for i in range(num_cameras)])
    cam2lidar = torch.zeros(num_cameras, 4, 4)
    for i, yaw_deg in enumerate(yaws_deg):
        yaw = math.radians(yaw_deg)
        forward = torch.tensor([-math.sin(yaw), math.cos(yaw), 0.0])
        right = torch.tensor([math.cos(yaw), math.sin(yaw), 0.0])
        down = torch.tensor([0.0, 0.0, -1.0])
        cam2lidar[i, :3, :3] = torch.stack([right, down, forward], 1)
        cam2lidar[i, :3, 3] = 0.8 * forward + torch.tensor([0.0, 0.0, -0.3])
        cam2lidar[i, 3, 3] = 1.0
    img_aug = img_aug.expand(num_cameras, 3, 3).clone()
    return img_aug @ intrinsics, cam2lidar, img_aug


def _random_boxes(rng: np.random.Generator, num: int, extent: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    labels = rng.integers(0, len(DETECTION_CLASSES), num)
    boxes = np.zeros((num, Boxes3D.DIM), np.float32)
    attrs = np.full(num, -1, np.int64)
    for k, c in enumerate(labels):
        name = DETECTION_CLASSES[c]
        size = np.array(CLASS_SIZE_M[name]) * rng.uniform(0.9, 1.1, 3)
        # Spread boxes over a ring so they do not overlap much.
        angle = 2 * math.pi * (k + rng.uniform(0.0, 0.5)) / max(num, 1)
        radius = rng.uniform(0.25, 0.8) * extent
        boxes[k, 0:2] = radius * math.cos(angle), radius * math.sin(angle)
        boxes[k, 2] = GROUND_Z_LIDAR + size[2] / 2
        boxes[k, 3:6] = size
        boxes[k, 6] = rng.uniform(-math.pi, math.pi)
        boxes[k, 7:9] = rng.normal(0.0, 2.0, 2)
        allowed = CLASS_ATTRIBUTES[name]
        if allowed:
            attrs[k] = ATTRIBUTES.index(allowed[rng.integers(len(allowed))])
    return boxes, labels.astype(np.int64), attrs


def make_synthetic_batch(
    *,
    batch_size: int,
    image_size: tuple[int, int],
    grid: BEVGrid,
    boxes_per_sample: int | Sequence[int] = 4,
    points_per_box: int = 64,
    background_points: int = 256,
    lidar_points_per_sample: Sequence[int | None] | None = None,
    radar_points_per_box: int = 3,
    modality_mask: Sequence[bool] | torch.Tensor = (True, True, True),
    map_grid: BEVGrid | None = None,
    seed: int = 0,
    num_cameras: int = len(CAMERA_CHANNELS),
) -> Batch:
    """A random `Batch` with a plausible camera rig.

    Args:
        batch_size: B.
        image_size: (H, W) of the uint8 noise images.
        grid: the BEV grid (boxes fall inside it; map masks are on it).
        boxes_per_sample: K_b, one int for all samples or one per sample (0 = empty scene).
        points_per_box: LiDAR points sampled uniformly inside each box.
        background_points: LiDAR ground points per sample.
        lidar_points_per_sample: per sample, None for the default cloud or 0 for an empty cloud.
        radar_points_per_box: radar returns per box (at its centre with its velocity) plus as many clutter points.
        modality_mask: (3,) for all samples or (B, 3) bool.
        map_grid: grid of the random map masks (None: `grid`).
        seed: RNG seed; the same seed gives the same batch.
        num_cameras: N, the camera axis (`camera_rig`).
    """
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    counts = [boxes_per_sample] * batch_size if isinstance(boxes_per_sample, int) else list(boxes_per_sample)
    extent = min(grid.x_max, -grid.x_min, grid.y_max, -grid.y_min)
    cam2img, cam2lidar, img_aug = camera_rig(image_size, num_cameras)
    n_cam = num_cameras

    boxes_all, labels_all, attrs_all, lidar_all, radar_all = [], [], [], [], []
    num_lidar, num_radar = [], []
    for b in range(batch_size):
        boxes, labels, attrs = _random_boxes(rng, counts[b], extent)
        boxes_all.append(boxes), labels_all.append(labels), attrs_all.append(attrs)
        # LiDAR: points inside each box (box frame -> LIDAR_TOP) and ground clutter.
        pts = []
        for box in boxes:
            local = (rng.uniform(-0.5, 0.5, (points_per_box, 3)) * box[[4, 3, 5]]).astype(np.float32)
            c, s = math.cos(box[6]), math.sin(box[6])
            xy = np.stack([c * local[:, 0] - s * local[:, 1], s * local[:, 0] + c * local[:, 1]], 1) + box[:2]
            pts.append(np.concatenate([xy, local[:, 2:3] + box[2]], 1))
        ground = np.stack([rng.uniform(-extent, extent, background_points), rng.uniform(-extent, extent, background_points),
                           np.full(background_points, GROUND_Z_LIDAR + 0.05)], 1)
        pts.append(ground)
        xyz = np.concatenate(pts, 0).astype(np.float32)
        lidar = np.concatenate([xyz, rng.uniform(0, 255, (len(xyz), 1)), rng.uniform(0, 0.45, (len(xyz), 1))], 1)
        wanted = None if lidar_points_per_sample is None else lidar_points_per_sample[b]
        if wanted is not None:
            lidar = lidar[: int(wanted)]
        lidar_all.append(lidar.astype(np.float32)), num_lidar.append(len(lidar))
        # Radar: returns at the box centres with their velocity, plus clutter.
        rows = []
        for box in boxes:
            for _ in range(radar_points_per_box):
                rows.append([box[0] + rng.normal(0, 0.3), box[1] + rng.normal(0, 0.3), GROUND_Z_LIDAR + 0.5,
                             rng.uniform(-5, 20), box[7], box[8], rng.uniform(0, 0.5)])
        for _ in range(radar_points_per_box * max(len(boxes), 1)):
            rows.append([rng.uniform(-extent, extent), rng.uniform(-extent, extent), GROUND_Z_LIDAR + 0.5,
                         rng.uniform(-10, 10), 0.0, 0.0, rng.uniform(0, 0.5)])
        radar = np.asarray(rows, np.float32).reshape(-1, 7)
        radar_all.append(radar), num_radar.append(len(radar))

    h_bev, w_bev = (grid if map_grid is None else map_grid).shape
    map_masks = torch.zeros(batch_size, len(MAP_CLASSES), h_bev, w_bev)
    for b in range(batch_size):
        for c in range(len(MAP_CLASSES)):
            r0, c0 = rng.integers(0, h_bev // 2), rng.integers(0, w_bev // 2)
            map_masks[b, c, r0 : r0 + h_bev // 3, c0 : c0 + w_bev // 4] = 1.0
    mask = torch.as_tensor(modality_mask, dtype=torch.bool)
    if mask.ndim == 1:
        mask = mask[None].expand(batch_size, len(MODALITIES)).clone()

    return Batch(
        images=torch.randint(0, 256, (batch_size, n_cam, 3, *image_size), generator=gen, dtype=torch.uint8),
        cam2img=cam2img.expand(batch_size, -1, -1, -1).clone(),
        cam2lidar=cam2lidar.expand(batch_size, -1, -1, -1).clone(),
        img_aug=img_aug.expand(batch_size, -1, -1, -1).clone(),
        points_lidar=torch.from_numpy(np.concatenate(lidar_all, 0)).reshape(-1, 5),
        num_points_lidar=torch.tensor(num_lidar, dtype=torch.int64),
        points_radar=torch.from_numpy(np.concatenate(radar_all, 0)).reshape(-1, 7),
        num_points_radar=torch.tensor(num_radar, dtype=torch.int64),
        boxes=torch.from_numpy(np.concatenate(boxes_all, 0)).reshape(-1, Boxes3D.DIM),
        labels=torch.from_numpy(np.concatenate(labels_all, 0)).long(),
        attributes=torch.from_numpy(np.concatenate(attrs_all, 0)).long(),
        num_boxes=torch.tensor(counts, dtype=torch.int64),
        map_masks=map_masks,
        scene_tags=torch.from_numpy(rng.integers(0, 2, (batch_size, len(SCENE_TAGS))).astype(np.float32)),
        modality_mask=mask,
        has_map=torch.ones(batch_size, dtype=torch.bool),
        has_scene_tags=torch.ones(batch_size, dtype=torch.bool),
        meta=[{"sample_token": f"synthetic-{seed}-{b}", "timestamp": 0, "lidar2ego": np.eye(4), "ego2global": np.eye(4)}
              for b in range(batch_size)],
    )
