"""LIDAR_TOP-frame boxes -> a global-frame nuScenes detection submission, and the ground-truth check.

`submission_entries` is the one place that converts boxes for the devkit: ground truth (`gt-submission`)
and model predictions go through the same code, so a ground-truth round trip that scores NDS ~1 checks the
frames, yaw, size order and velocity of the prediction path too.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Sequence

import numpy as np
from pyquaternion import Quaternion

from perception.data.dataset import DatasetConfig, NuScenesDataset
from perception.classes import NUSCENES, ClassList
from perception.structures import Boxes3D

log = logging.getLogger(__name__)

SUBMISSION_META_KEYS = ("use_camera", "use_lidar", "use_radar", "use_map", "use_external")


def boxes_lidar_to_global(boxes_lidar: Boxes3D, lidar2ego: np.ndarray, ego2global: np.ndarray) -> np.ndarray:
    """Boxes (K, 9) `Boxes3D` layout in the keyframe LIDAR_TOP frame -> (K, 9) float64 in the global frame
    (centre by lidar2global, yaw plus lidar2global's heading, velocity rotated; sizes unchanged)."""
    T = np.asarray(ego2global, np.float64) @ np.asarray(lidar2ego, np.float64)
    b = boxes_lidar.tensor.detach().cpu().double().numpy()
    out = b.copy()
    out[:, 0:3] = b[:, 0:3] @ T[:3, :3].T + T[:3, 3]
    heading = np.stack([np.cos(b[:, 6]), np.sin(b[:, 6]), np.zeros(len(b))], 1) @ T[:3, :3].T
    out[:, 6] = np.arctan2(heading[:, 1], heading[:, 0])
    vel = np.concatenate([b[:, 7:9], np.zeros((len(b), 1))], 1) @ T[:3, :3].T
    out[:, 7:9] = vel[:, :2]
    return out


def submission_entries(
    sample_token: str,
    boxes_lidar: Boxes3D,
    labels: Sequence[int],
    scores: Sequence[float],
    attributes: Sequence[int],
    lidar2ego: np.ndarray,
    ego2global: np.ndarray,
    classes: ClassList = NUSCENES,
) -> list[dict]:
    """One sample's result list for a nuScenes submission.

    Args:
        boxes_lidar: K boxes in the (unaugmented) keyframe LIDAR_TOP frame.
        labels: (K,) indices into `classes`. scores: (K,) in [0, 1].
        attributes: (K,) indices into `classes.attributes`, or -1 for "" (no attribute).
        lidar2ego, ego2global: (4, 4) float64 of the sample (`meta`).
        classes: the class list (default: nuScenes').

    Returns: dicts with sample_token, translation, size (w, l, h), rotation (w, x, y, z), velocity (global
    vx, vy), detection_name, detection_score, attribute_name; all in the global frame.
    """
    g = boxes_lidar_to_global(boxes_lidar, lidar2ego, ego2global)
    labels, scores, attributes = (np.asarray(v).reshape(-1) for v in (labels, scores, attributes))
    out = []
    for k in range(len(g)):
        attr = int(attributes[k])
        out.append({
            "sample_token": sample_token,
            "translation": [float(v) for v in g[k, 0:3]],
            "size": [float(v) for v in g[k, 3:6]],
            "rotation": [float(v) for v in Quaternion(axis=[0.0, 0.0, 1.0], angle=float(g[k, 6])).elements],
            "velocity": [float(v) for v in g[k, 7:9]],
            "detection_name": classes.names[int(labels[k])],
            "detection_score": float(scores[k]),
            "attribute_name": classes.attributes[attr] if attr >= 0 else "",
        })
    return out


def write_submission(path: str | Path, results: dict[str, list[dict]], *, use_camera: bool, use_lidar: bool,
                     use_radar: bool, use_map: bool, use_external: bool = False) -> Path:
    """Write `{"meta": ..., "results": ...}` as JSON. Every evaluated sample must have a key ([] when empty)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(use_camera=use_camera, use_lidar=use_lidar, use_radar=use_radar, use_map=use_map,
                use_external=use_external)
    for entries in results.values():
        for e in entries:
            if not all(math.isfinite(v) for v in e["translation"] + e["size"] + e["rotation"] + e["velocity"]):
                raise ValueError(f"non-finite box in submission for sample {e['sample_token']}")
    path.write_text(json.dumps({"meta": meta, "results": results}))
    log.info("wrote %d samples, %d boxes to %s", len(results), sum(map(len, results.values())), path)
    return path


def gt_submission(dataroot: str | Path, version: str, split: str, out: str | Path, classes: ClassList = NUSCENES) -> Path:
    """Write the split's ground truth, as `NuScenesDataset` loads it (LIDAR_TOP frame, eval filtering) for the
    class list `classes`, back in the global frame through `submission_entries`, with score 1. Loads no sensor
    files."""
    ds = NuScenesDataset(dataroot, version, split, config=DatasetConfig(map="off", classes=classes))
    idx = ds.index
    results = {}
    for i in range(len(idx)):
        boxes, labels, attrs = idx.boxes_of(i)
        results[str(idx.tokens[i])] = submission_entries(
            str(idx.tokens[i]), Boxes3D(boxes), labels, np.ones(len(labels)), attrs, idx.lidar2ego[i],
            idx.ego2global[i], classes)
    return write_submission(out, results, use_camera=False, use_lidar=False, use_radar=False, use_map=False,
                            use_external=True)
