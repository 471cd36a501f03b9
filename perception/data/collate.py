"""Collate `Sample`s into the `Batch` contract (perception/data/batch.py).

Point clouds and boxes are concatenated along the first axis and their per-sample counts kept, so empty point
clouds and scenes without boxes need no padding or special case. Map masks become float32 {0, 1}.

In a DataLoader worker the large outputs (images, point clouds, map masks) are written straight into shared memory
that the worker reuses from batch to batch (`perception.data.shm_pool`); the main process copies them out when it
receives the batch.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch.utils.data import get_worker_info

from perception.data.batch import INLINE_PICKLE_BYTES, Batch
from perception.data.dataset import Sample
from perception.data.shm_pool import worker_pool


def _cat(tensors: Sequence[torch.Tensor], stack: bool) -> torch.Tensor:
    """torch.stack (`stack`) or torch.cat along dim 0; inside a DataLoader worker, a result larger than what a Batch
    pickles inline goes into the worker's shared pool."""
    first = tensors[0]
    shape = (len(tensors), *first.shape) if stack else (sum(t.shape[0] for t in tensors), *first.shape[1:])
    numel = 1
    for n in shape:
        numel *= n
    if get_worker_info() is None or numel * first.element_size() <= INLINE_PICKLE_BYTES:
        return torch.stack(list(tensors)) if stack else torch.cat(list(tensors), 0)
    pool = worker_pool()
    if len(tensors) == 1 and pool.holds(first):  # one item that was written into the pool (`output_array`)
        return first.unsqueeze(0) if stack else first
    out = pool.empty(shape, first.dtype)
    return torch.stack(list(tensors), out=out) if stack else torch.cat(list(tensors), 0, out=out)


def collate_samples(samples: Sequence[Sample]) -> Batch:
    """B samples -> one Batch (see `Batch` for shapes). `camera_mask` is None when every sample has every camera.
    `modality_mask[b]` = (camera, lidar, radar) present: cameras when the sample has at least one; LiDAR always is
    in a nuScenes sample; radar when the sample has radar sweeps (`Sample.has_radar`:
    a sample with zero radar returns still has the modality; one without radar files, e.g. from an mmdet3d info
    file, does not)."""
    if not samples:
        raise ValueError("collate_samples needs at least one sample")

    def count(ts) -> torch.Tensor:
        return torch.tensor([t.shape[0] for t in ts], dtype=torch.int64)

    lidar = [s.points_lidar for s in samples]
    radar = [s.points_radar for s in samples]
    cameras = samples[0].images.shape[0]
    camera_mask = None
    if any(s.camera_mask is not None and not bool(s.camera_mask.all()) for s in samples):
        camera_mask = torch.stack([torch.ones(cameras, dtype=torch.bool) if s.camera_mask is None
                                   else s.camera_mask.bool() for s in samples])
    return Batch(
        images=_cat([s.images for s in samples], stack=True),
        cam2img=torch.stack([s.cam2img for s in samples]),
        cam2lidar=torch.stack([s.cam2lidar for s in samples]),
        img_aug=torch.stack([s.img_aug for s in samples]),
        points_lidar=_cat(lidar, stack=False),
        num_points_lidar=count(lidar),
        points_radar=_cat(radar, stack=False),
        num_points_radar=count(radar),
        boxes=torch.cat([s.boxes_lidar.tensor for s in samples], 0),
        labels=torch.cat([s.labels for s in samples], 0),
        attributes=torch.cat([s.attributes for s in samples], 0),
        num_boxes=torch.tensor([len(s.boxes_lidar) for s in samples], dtype=torch.int64),
        map_masks=_cat([s.map_masks.to(torch.float32) for s in samples], stack=True),
        scene_tags=torch.stack([s.scene_tags for s in samples]),
        modality_mask=torch.tensor([[camera_mask is None or bool(camera_mask[b].any()), True, s.has_radar]
                                    for b, s in enumerate(samples)], dtype=torch.bool),
        has_map=torch.tensor([s.has_map for s in samples], dtype=torch.bool),
        has_scene_tags=torch.tensor([s.has_scene_tags for s in samples], dtype=torch.bool),
        meta=[s.meta for s in samples],
        map_masks_eval=(torch.stack([s.map_masks_eval for s in samples]).to(torch.float32)
                        if all(s.map_masks_eval is not None for s in samples) else None),
        camera_mask=camera_mask,
    )
