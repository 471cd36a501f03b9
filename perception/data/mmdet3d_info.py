"""Read mmdetection3d's v2 nuScenes info files (`nuscenes_infos_*.pkl`, info_version 1.1) as a `SampleIndex`.

The fields read (as written by mmdet3d's `update_infos_to_v2.py` / `nuscenes_converter.py`):
  metainfo.categories {name: label}; data_list[]:
    token, timestamp (s), ego2global (4x4),
    lidar_points.lidar_path (file name under samples/LIDAR_TOP), lidar_points.lidar2ego (4x4),
    lidar_sweeps[] (newest first): lidar_points.lidar_path (a path ending in sweeps/LIDAR_TOP/<file>),
        lidar_points.lidar2sensor (4x4: keyframe LiDAR -> this sweep's LiDAR), timestamp (s),
    images.<CAM>: img_path (file name under samples/<CAM>), cam2img (3x3), lidar2cam (4x4), cam2ego,
    instances[]: bbox_3d [x, y, z, l, w, h, yaw] in LIDAR_TOP, bbox_label_3d (index into
        metainfo.categories; -1 for ignored categories), velocity [vx, vy] (LIDAR_TOP, NaN when unknown),
        num_lidar_pts, num_radar_pts.
Box convention: yaw is counter-clockwise from +x about z with the length l along the heading, as our
`Boxes3D`; the size order differs (l, w, h vs our w, l, h). In nuScenes info files (x, y, z) is the box's
gravity centre: mmdet3d's NuScenesDataset builds `LiDARInstance3DBoxes(..., origin=(0.5, 0.5, 0.5))` from it and
only then moves it to its runtime bottom-centre origin. A file whose z is the bottom face (KITTI-style) is read
with `box_origin_z=0.0`.

Not in these files, so left empty: radar sweeps, attributes (-1), scene tags (0), map location ("": no map
masks). Instances are kept when num_lidar_pts + num_radar_pts > 0 and their class is one of ours, without the
evaluation's range filter (that needs the ego pose of the annotation time, which matches the keyframe's).
"""

from __future__ import annotations

import logging
import pickle
from pathlib import Path

import numpy as np

from perception.data.dataset import SampleIndex, _str_array
from perception.data.loading import check_rotation, invert_rigid
from perception.errors import DataError
from perception.structures import CAMERA_CHANNELS, DETECTION_CLASSES, SCENE_TAGS, Boxes3D

log = logging.getLogger(__name__)


def _matrix(value, shape, what: str, path, token) -> np.ndarray:
    m = np.asarray(value, np.float64)
    if m.shape != shape or not np.isfinite(m).all():
        raise DataError(f"{what}: expected a finite {shape} matrix, got shape {m.shape}", path=path, token=token)
    return m


def _resolve(dataroot: Path, path: str, default_dir: str) -> str:
    """A path relative to the dataroot: mmdet3d stores bare file names for keyframes and paths with a prefix
    (e.g. './data/nuscenes/sweeps/...') for sweeps."""
    p = path.replace("\\", "/")
    for anchor in ("samples/", "sweeps/"):
        k = p.rfind(anchor)
        if k >= 0:
            return p[k:]
    if "/" not in p:
        return f"{default_dir}/{p}"
    if Path(p).is_absolute():
        try:
            return str(Path(p).relative_to(dataroot))
        except ValueError:
            return p
    return p


def read_mmdet3d_infos(info_path: str | Path, dataroot: str | Path, *, lidar_sweeps: int = 10,
                       box_origin_z: float = 0.5, skip_bad_samples: bool = False) -> SampleIndex:
    """Read an mmdet3d v2 info file into a `SampleIndex` (see the module docstring for the fields).

    Args:
        lidar_sweeps: LiDAR sweeps per sample including the keyframe (at most 1 + len(lidar_sweeps)).
        box_origin_z: where z sits on the box's height in the file: 0.5 gravity centre (nuScenes infos),
            0.0 bottom face.

    Raises: DataError naming the file and sample token for a missing field or a non-orthonormal rotation
        (unless `skip_bad_samples`, which logs and leaves the sample out).
    """
    info_path, root = Path(info_path), Path(dataroot)
    try:
        with open(info_path, "rb") as f:
            data = pickle.load(f)
    except (OSError, pickle.UnpicklingError, EOFError) as exc:
        raise DataError(f"cannot read mmdet3d info file: {exc}", path=info_path) from None
    if not isinstance(data, dict) or "data_list" not in data or "metainfo" not in data:
        raise DataError("not an mmdet3d v2 info file (needs 'metainfo' and 'data_list')", path=info_path)
    categories = data["metainfo"].get("categories") or {
        n: k for k, n in enumerate(data["metainfo"].get("classes", ()))}
    label_map = {int(k): DETECTION_CLASSES.index(n) for n, k in categories.items() if n in DETECTION_CLASSES}

    cols: dict[str, list] = {k: [] for k in (
        "tokens", "timestamps", "lidar2ego", "ego2global", "cam_paths", "cam_wh", "cam_intrinsics", "cam2lidar",
        "lidar_count", "box_count", "lidar_paths", "lidar_sweep2lidar", "lidar_dt", "boxes", "labels")}
    for info in data["data_list"]:
        token = str(info.get("token", info.get("sample_idx", "")))
        try:
            row = _read_one(info, token, root, info_path, label_map, lidar_sweeps, box_origin_z)
        except (DataError, KeyError, TypeError) as exc:
            err = exc if isinstance(exc, DataError) else DataError(f"malformed info entry: {exc!r}",
                                                                    path=info_path, token=token)
            if not skip_bad_samples:
                raise err from None
            log.warning("skipping sample: %s", err)
            continue
        for k, v in row.items():
            if k in ("lidar_paths", "lidar_sweep2lidar", "lidar_dt", "boxes", "labels"):
                cols[k].extend(v)
            else:
                cols[k].append(v)
    S = len(cols["tokens"])
    C = len(CAMERA_CHANNELS)

    def offsets(counts):
        return np.concatenate([[0], np.cumsum(counts, dtype=np.int64)]).astype(np.int64)

    B = len(cols["labels"])
    return SampleIndex(
        dataroot=str(root),
        tokens=_str_array(cols["tokens"]),
        timestamps=np.asarray(cols["timestamps"], np.int64),
        scene_tags=np.zeros((S, len(SCENE_TAGS)), np.float32),
        has_scene_tags=np.zeros(S, bool),
        locations=np.array([""] * S, dtype=str),
        lidar2ego=np.asarray(cols["lidar2ego"]).reshape(S, 4, 4),
        ego2global=np.asarray(cols["ego2global"]).reshape(S, 4, 4),
        cam_paths=np.array(cols["cam_paths"], dtype=str).reshape(S, C),
        cam_wh=np.asarray(cols["cam_wh"], np.int64).reshape(S, C, 2),
        cam_intrinsics=np.asarray(cols["cam_intrinsics"]).reshape(S, C, 3, 3),
        cam2lidar=np.asarray(cols["cam2lidar"]).reshape(S, C, 4, 4),
        lidar_offsets=offsets(cols["lidar_count"]),
        lidar_paths=_str_array(cols["lidar_paths"]),
        lidar_sweep2lidar=np.asarray(cols["lidar_sweep2lidar"], np.float64).reshape(-1, 4, 4),
        lidar_dt=np.asarray(cols["lidar_dt"], np.float32),
        radar_offsets=np.zeros(S + 1, np.int64),
        radar_paths=_str_array([]),
        radar_sweep2lidar=np.zeros((0, 4, 4)),
        radar_dt=np.zeros(0, np.float32),
        box_offsets=offsets(cols["box_count"]),
        boxes=np.asarray(cols["boxes"], np.float32).reshape(B, Boxes3D.DIM),
        labels=np.asarray(cols["labels"], np.int64),
        attributes=np.full(B, -1, np.int64),
        box_tokens=np.array([""] * B, dtype=str),
    )


def _read_one(info, token, root, info_path, label_map, lidar_sweeps, box_origin_z) -> dict:
    lp = info["lidar_points"]
    lidar2ego = _matrix(lp["lidar2ego"], (4, 4), "lidar_points.lidar2ego", info_path, token)
    ego2global = _matrix(info["ego2global"], (4, 4), "ego2global", info_path, token)
    check_rotation(lidar2ego[:3, :3], what="lidar_points.lidar2ego", path=info_path, token=token)
    check_rotation(ego2global[:3, :3], what="ego2global", path=info_path, token=token)
    t_key = float(info["timestamp"])

    paths = [_resolve(root, lp["lidar_path"], "samples/LIDAR_TOP")]
    mats, dts = [np.eye(4)], [0.0]
    for sw in info.get("lidar_sweeps", [])[: max(0, lidar_sweeps - 1)]:
        l2s = _matrix(sw["lidar_points"]["lidar2sensor"], (4, 4), "lidar_sweeps[].lidar_points.lidar2sensor",
                      info_path, token)
        check_rotation(l2s[:3, :3], what="lidar_sweeps[].lidar_points.lidar2sensor", path=info_path, token=token)
        paths.append(_resolve(root, sw["lidar_points"]["lidar_path"], "sweeps/LIDAR_TOP"))
        mats.append(invert_rigid(l2s))
        dts.append(max(0.0, t_key - float(sw["timestamp"])))

    cam_paths, cam_wh, cam_K, cam2lidar = [], [], [], []
    for ch in CAMERA_CHANNELS:
        im = info["images"][ch]
        K = _matrix(im["cam2img"], (3, 3), f"images.{ch}.cam2img", info_path, token)
        l2c = _matrix(im["lidar2cam"], (4, 4), f"images.{ch}.lidar2cam", info_path, token)
        check_rotation(l2c[:3, :3], what=f"images.{ch}.lidar2cam", path=info_path, token=token)
        cam_paths.append(_resolve(root, im["img_path"], f"samples/{ch}"))
        cam_wh.append((0, 0))  # not stored: the image size is taken from the file
        cam_K.append(K)
        cam2lidar.append(invert_rigid(l2c))

    boxes, labels = [], []
    for inst in info.get("instances", []):
        lab = int(inst.get("bbox_label_3d", inst.get("bbox_label", -1)))
        if lab not in label_map or inst.get("num_lidar_pts", 1) + inst.get("num_radar_pts", 0) <= 0:
            continue
        x, y, z, l, w, h, yaw = (float(v) for v in inst["bbox_3d"][:7])
        vel = np.asarray(inst.get("velocity", [0.0, 0.0]), np.float64)[:2]
        vel = np.where(np.isfinite(vel), vel, 0.0)
        boxes.append([x, y, z + (0.5 - box_origin_z) * h, w, l, h, yaw, vel[0], vel[1]])
        labels.append(label_map[lab])
    return {
        "tokens": token, "timestamps": int(round(t_key * 1e6)), "lidar2ego": lidar2ego, "ego2global": ego2global,
        "cam_paths": cam_paths, "cam_wh": cam_wh, "cam_intrinsics": cam_K, "cam2lidar": cam2lidar,
        "lidar_count": len(paths), "box_count": len(labels), "lidar_paths": paths, "lidar_sweep2lidar": mats,
        "lidar_dt": dts, "boxes": boxes, "labels": labels,
    }
