"""mmdetection3d's v2 nuScenes info files (`nuscenes_infos_*.pkl`): read one as a `SampleIndex`, or write one
from the devkit tables.

Fields read (as mmdet3d's `nuscenes_converter.py` + `update_infos_to_v2.py` write them):
  metainfo: the label table, `categories` {name: label} (update_infos_to_v2; ignored names map to -1), else
      `classes` or `CLASSES` (a list or a {name: label} dict), else mmdet3d's fixed nuScenes order
      `MMDET3D_NUSCENES_CLASSES` (which mmdet3d itself always uses: its `NuScenesDataset.METAINFO`);
  data_list[]:
    token, timestamp (s), ego2global (4x4),
    lidar_points.lidar_path (file name under samples/LIDAR_TOP), lidar_points.lidar2ego (4x4),
    lidar_sweeps[] (newest first): lidar_points.lidar_path (a path ending in sweeps/LIDAR_TOP/<file>),
        lidar_points.lidar2sensor (4x4: keyframe LiDAR -> this sweep's LiDAR; mmdet3d's own test info stores the
        same matrix under `lidar2cam`, which is read when `lidar2sensor` is absent), timestamp (s),
    images.<CAM> for the 6 cameras: img_path (file name under samples/<CAM>), cam2img (3x3), lidar2cam (4x4),
    instances[]: bbox_3d (7 numbers, LIDAR_TOP, see below), bbox_label_3d (index into the label table; -1:
        ignored category), velocity [vx, vy] (LIDAR_TOP, m/s; NaN when unknown -> 0), num_lidar_pts, num_radar_pts.
Image sizes are not in the files: they are read from each JPEG's header (no decoding).

Box conventions (bbox_3d), both with (x, y, z) the box's gravity centre in LIDAR_TOP (mmdet3d's
NuScenesDataset builds `LiDARInstance3DBoxes(..., origin=(0.5, 0.5, 0.5))` from it):
  "current" (mmdet3d >= 1.0, `gt_boxes = [locs, dims[:, [1, 0, 2]], rots]`): [x, y, z, l, w, h, yaw] with yaw
      the devkit's `box.orientation.yaw_pitch_roll[0]` in LIDAR_TOP: counter-clockwise from +x, as our `Boxes3D`;
  "legacy" (mmdet3d < 1.0, `gt_boxes = [locs, dims, -rots - np.pi / 2]`): [x, y, z, w, l, h, -yaw - pi/2].
update_infos_to_v2 copies `gt_boxes` verbatim, so a v2 file can hold either; mmdetection3d's own test file
(`tests/data/nuscenes/nus_info.pkl`) holds legacy boxes: 24 of 24 vehicles have bbox_3d[3] < bbox_3d[4]
(e.g. a car [.., 1.726, 4.257, 1.489, ..]), and the two vehicles moving faster than 1 m/s head along their
velocity within 0.05 rad read as legacy but 0.93 and 1.52 rad off read as current. "auto" decides per file from
the vehicles' footprints (a vehicle is longer than wide); see `detect_box_convention`.

Not in these files, so left empty: radar sweeps (every sample has the radar modality absent), attributes (-1),
scene tags (`has_scene_tags` False), map location ("": no map ground truth). Instances are kept when
num_lidar_pts + num_radar_pts > 0 and their class is one of ours, without the evaluation's range filter.
"""

from __future__ import annotations

import logging
import math
import pickle
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from pyquaternion import Quaternion

from perception.data.dataset import SampleIndex, _str_array, split_scene_names
from perception.data.loading import check_rotation, invert_rigid
from perception.errors import DataError
from perception.structures import CAMERA_CHANNELS, DETECTION_CLASSES, LIDAR_CHANNEL, SCENE_TAGS, Boxes3D

log = logging.getLogger(__name__)

# mmdet3d's NuScenesDataset class order (METAINFO['classes'] in 1.x, CLASSES in 0.x): what bbox_label_3d indexes.
MMDET3D_NUSCENES_CLASSES: tuple[str, ...] = (
    "car", "truck", "trailer", "bus", "construction_vehicle", "bicycle", "motorcycle", "pedestrian", "traffic_cone",
    "barrier")
BOX_CONVENTIONS = ("auto", "current", "legacy")
_VEHICLES = frozenset({"car", "truck", "bus", "trailer", "construction_vehicle"})


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


def _image_wh(path: Path, token: str) -> tuple[int, int]:
    """(width, height) from the image file's header (PIL reads the header only; nothing is decoded)."""
    try:
        with Image.open(path) as im:
            return im.size
    except FileNotFoundError:
        raise DataError("camera image not found", path=path, token=token) from None
    except (OSError, UnidentifiedImageError) as exc:
        raise DataError(f"cannot read the camera image's header ({exc})", path=path, token=token) from None


def label_table(metainfo: dict, info_path) -> tuple[dict[int, str], str]:
    """{file label: class name} and where it came from: metainfo `categories`, `classes` or `CLASSES` (a
    {name: label} dict or a list of names), else mmdet3d's fixed nuScenes order. Negative labels (ignored
    categories) are left out."""
    for key in ("categories", "classes", "CLASSES"):
        value = metainfo.get(key)
        if value is None or len(value) == 0:
            continue
        if isinstance(value, dict):
            return {int(k): str(n) for n, k in value.items() if int(k) >= 0}, f"metainfo.{key}"
        if isinstance(value, (list, tuple)):
            return dict(enumerate(map(str, value))), f"metainfo.{key}"
        raise DataError(f"metainfo.{key}: expected a {{name: label}} dict or a list of class names, got a "
                        f"{type(value).__name__}", path=info_path)
    return dict(enumerate(MMDET3D_NUSCENES_CLASSES)), "mmdet3d's nuScenes class order (no class table in metainfo)"


def detect_box_convention(raw: np.ndarray, names: list[str], info_path) -> str:
    """"current" or "legacy" for a file's boxes, from its vehicles' footprints.

    raw: (N, 7) bbox_3d as stored; names: (N,) our class name of each. Vehicles are longer than wide, so in
    "current" files bbox_3d[3] (l) > bbox_3d[4] (w) and in "legacy" files the reverse. At least 90% of the
    vehicles must agree; a file without vehicles is read as "current" (what mmdet3d >= 1.0 writes).
    Raises DataError naming the file when the vehicles disagree.
    """
    veh = np.array([n in _VEHICLES for n in names], bool) if len(names) else np.zeros(0, bool)
    d = raw[veh][:, 3:5] if len(raw) else np.zeros((0, 2))
    d = d[d[:, 0] != d[:, 1]]
    if len(d) == 0:
        return "current"
    legacy = float(np.mean(d[:, 0] < d[:, 1]))
    if legacy >= 0.9:
        return "legacy"
    if legacy <= 0.1:
        return "current"
    raise DataError(f"cannot tell the box convention: {legacy:.0%} of {len(d)} vehicles have bbox_3d[3] < bbox_3d[4] "
                    "(mmdet3d < 1.0 sizes w, l, h) and the rest the reverse; pass box_convention", path=info_path)


def boxes_from_mmdet3d(raw: np.ndarray, velocity: np.ndarray, convention: str, box_origin_z: float = 0.5) -> np.ndarray:
    """bbox_3d (N, 7) and velocity (N, 2) of one convention -> (N, 9) float32 `Boxes3D` layout (centre z, w, l, h,
    yaw counter-clockwise from +x, vx, vy; LIDAR_TOP). Yaws outside [-pi, pi] are wrapped to [-pi, pi), others kept
    as they are; NaN velocities become 0."""
    raw = np.asarray(raw, np.float64).reshape(-1, 7)
    x, y, z, a, b, h, r = raw.T
    if convention == "current":
        w, l, yaw = b, a, r
    elif convention == "legacy":
        w, l, yaw = a, b, -r - np.pi / 2
    else:
        raise ValueError(f"box convention must be 'current' or 'legacy', got {convention!r}")
    lim = float(np.float32(np.pi))  # the float32 pi is above the float64 one: a float32 file's pi stays pi
    yaw = np.where(np.abs(yaw) > lim, (yaw + np.pi) % (2 * np.pi) - np.pi, yaw)
    vel = np.asarray(velocity, np.float64).reshape(-1, 2)
    vel = np.where(np.isfinite(vel), vel, 0.0)
    zc = z + (0.5 - box_origin_z) * h
    return np.stack([x, y, zc, w, l, h, yaw, vel[:, 0], vel[:, 1]], 1).astype(np.float32)


def read_mmdet3d_infos(info_path: str | Path, dataroot: str | Path, *, lidar_sweeps: int = 10,
                       box_origin_z: float = 0.5, box_convention: str = "auto",
                       skip_bad_samples: bool = False) -> SampleIndex:
    """Read an mmdet3d v2 info file into a `SampleIndex` (see the module docstring for the fields).

    Args:
        dataroot: the nuScenes dataroot the file's paths are relative to (samples/, sweeps/).
        lidar_sweeps: LiDAR sweeps per sample including the keyframe (at most 1 + len(lidar_sweeps)).
        box_origin_z: where z sits on the box's height in the file: 0.5 gravity centre (nuScenes infos),
            0.0 bottom face.
        box_convention: "auto", "current" (mmdet3d >= 1.0) or "legacy" (mmdet3d < 1.0); see the module docstring.

    Raises: DataError naming the file (and sample token) for a file that is not a v2 info file, a missing field,
        a non-orthonormal rotation, a missing or unreadable camera image (these per sample unless
        `skip_bad_samples`, which logs and leaves the sample out), and for a file whose instances map to none of
        our classes.
    """
    if box_convention not in BOX_CONVENTIONS:
        raise ValueError(f"box_convention must be one of {BOX_CONVENTIONS}, got {box_convention!r}")
    info_path, root = Path(info_path), Path(dataroot)
    try:
        with open(info_path, "rb") as f:
            data = pickle.load(f)
    except (OSError, pickle.UnpicklingError, EOFError, AttributeError, ImportError) as exc:
        raise DataError(f"cannot read mmdet3d info file: {exc}", path=info_path) from None
    if not isinstance(data, dict) or not isinstance(data.get("data_list"), list):
        raise DataError("not an mmdet3d v2 info file (needs a 'data_list' list; v1 files have 'infos': convert them "
                        "with mmdet3d's tools/dataset_converters/update_infos_to_v2.py)", path=info_path)
    table, source = label_table(data.get("metainfo") or {}, info_path)
    if [table.get(k) for k in range(len(MMDET3D_NUSCENES_CLASSES))] != list(MMDET3D_NUSCENES_CLASSES):
        log.warning("%s: labels read through %s, which differs from mmdet3d's fixed nuScenes order (mmdet3d itself "
                    "reads bbox_label_3d in that order whatever the file says)", info_path, source)
    label_map = {k: DETECTION_CLASSES.index(n) for k, n in table.items() if n in DETECTION_CLASSES}

    cols: dict[str, list] = {k: [] for k in (
        "tokens", "timestamps", "lidar2ego", "ego2global", "cam_paths", "cam_wh", "cam_intrinsics", "cam2lidar",
        "lidar_count", "box_count", "lidar_paths", "lidar_sweep2lidar", "lidar_dt", "raw", "velocity", "labels")}
    seen: Counter = Counter()  # file label -> instances, over every sample read
    for info in data["data_list"]:
        token = str(info.get("token", info.get("sample_idx", ""))) if isinstance(info, dict) else ""
        try:
            row = _read_one(info, token, root, info_path, label_map, lidar_sweeps, seen)
        except (DataError, KeyError, TypeError, ValueError, IndexError) as exc:
            err = exc if isinstance(exc, DataError) else DataError(f"malformed info entry: {exc!r}",
                                                                    path=info_path, token=token)
            if not skip_bad_samples:
                raise err from None
            log.warning("skipping sample: %s", err)
            continue
        for k, v in row.items():
            if k in ("lidar_paths", "lidar_sweep2lidar", "lidar_dt", "raw", "velocity", "labels"):
                cols[k].extend(v)
            else:
                cols[k].append(v)

    n_inst = sum(seen.values())
    unknown = {k: c for k, c in seen.items() if k >= 0 and k not in label_map}
    if n_inst and len(unknown) == len([k for k in seen if k >= 0]):
        raise DataError(f"none of the {n_inst} instances has a label of our classes (labels {dict(sorted(seen.items()))} "
                        f"through {source}: {dict(sorted(table.items()))})", path=info_path)
    if unknown:
        log.warning("%s: %d instances with labels %s (not among our classes through %s) are left out", info_path,
                    sum(unknown.values()), sorted(unknown), source)

    raw = np.asarray(cols["raw"], np.float64).reshape(-1, 7)
    labels = np.asarray(cols["labels"], np.int64)
    convention = box_convention
    if convention == "auto":
        convention = detect_box_convention(raw, [DETECTION_CLASSES[k] for k in labels], info_path)
    log.info("%s: %d samples, %d boxes, labels through %s, %s box convention", info_path, len(cols["tokens"]),
             len(labels), source, convention)
    boxes = boxes_from_mmdet3d(raw, np.asarray(cols["velocity"], np.float64).reshape(-1, 2), convention, box_origin_z)

    S, C, B = len(cols["tokens"]), len(CAMERA_CHANNELS), len(labels)

    def offsets(counts):
        return np.concatenate([[0], np.cumsum(counts, dtype=np.int64)]).astype(np.int64)

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
        boxes=boxes.reshape(B, Boxes3D.DIM),
        labels=labels,
        attributes=np.full(B, -1, np.int64),
        box_tokens=np.array([""] * B, dtype=str),
    )


def _us(seconds) -> int:
    """Seconds (float, as the v2 files store them) -> integer microseconds (the tables' unit)."""
    return int(round(float(seconds) * 1e6))


def _read_one(info, token, root, info_path, label_map, lidar_sweeps, seen: Counter) -> dict:
    lp = info["lidar_points"]
    lidar2ego = _matrix(lp["lidar2ego"], (4, 4), "lidar_points.lidar2ego", info_path, token)
    ego2global = _matrix(info["ego2global"], (4, 4), "ego2global", info_path, token)
    check_rotation(lidar2ego[:3, :3], what="lidar_points.lidar2ego", path=info_path, token=token)
    check_rotation(ego2global[:3, :3], what="ego2global", path=info_path, token=token)
    t_key = _us(info["timestamp"])

    paths = [_resolve(root, lp["lidar_path"], f"samples/{LIDAR_CHANNEL}")]
    mats, dts = [np.eye(4)], [0.0]
    for sw in (info.get("lidar_sweeps") or [])[: max(0, lidar_sweeps - 1)]:
        slp = sw["lidar_points"]
        key = "lidar2sensor" if "lidar2sensor" in slp else "lidar2cam"
        l2s = _matrix(slp[key], (4, 4), f"lidar_sweeps[].lidar_points.{key}", info_path, token)
        check_rotation(l2s[:3, :3], what=f"lidar_sweeps[].lidar_points.{key}", path=info_path, token=token)
        paths.append(_resolve(root, slp["lidar_path"], f"sweeps/{LIDAR_CHANNEL}"))
        mats.append(invert_rigid(l2s))
        dts.append(max(0.0, 1e-6 * (t_key - _us(sw["timestamp"]))))

    cam_paths, cam_wh, cam_K, cam2lidar = [], [], [], []
    images = info["images"]
    for ch in CAMERA_CHANNELS:
        if ch not in images:
            raise DataError(f"images has no {ch} (every sample needs the 6 cameras)", path=info_path, token=token)
        im = images[ch]
        K = _matrix(im["cam2img"], (3, 3), f"images.{ch}.cam2img", info_path, token)
        l2c = _matrix(im["lidar2cam"], (4, 4), f"images.{ch}.lidar2cam", info_path, token)
        check_rotation(l2c[:3, :3], what=f"images.{ch}.lidar2cam", path=info_path, token=token)
        rel = _resolve(root, im["img_path"], f"samples/{ch}")
        cam_paths.append(rel)
        cam_wh.append(_image_wh(root / rel, token))
        cam_K.append(K)
        cam2lidar.append(invert_rigid(l2c))

    raw, vel, labels = [], [], []
    for inst in info.get("instances") or []:
        lab = int(inst.get("bbox_label_3d", inst.get("bbox_label", -1)))
        seen[lab] += 1
        if lab not in label_map or inst.get("num_lidar_pts", 1) + inst.get("num_radar_pts", 0) <= 0:
            continue
        box = [float(v) for v in inst["bbox_3d"][:7]]
        if len(box) != 7 or not all(math.isfinite(v) for v in box):
            raise DataError(f"instances[].bbox_3d: expected 7 finite numbers, got {inst['bbox_3d']!r}",
                            path=info_path, token=token)
        raw.append(box)
        v = inst.get("velocity")
        vel.append([float(v[0]), float(v[1])] if v is not None and len(v) >= 2 else [0.0, 0.0])
        labels.append(label_map[lab])
    return {
        "tokens": token, "timestamps": t_key, "lidar2ego": lidar2ego, "ego2global": ego2global,
        "cam_paths": cam_paths, "cam_wh": cam_wh, "cam_intrinsics": cam_K, "cam2lidar": cam2lidar,
        "lidar_count": len(paths), "box_count": len(labels), "lidar_paths": paths, "lidar_sweep2lidar": mats,
        "lidar_dt": dts, "raw": raw, "velocity": vel, "labels": labels,
    }


def info_sample_tokens(info_path: str | Path) -> list[str]:
    """The sample tokens of an info file, in its order (reads nothing else)."""
    info_path = Path(info_path)
    try:
        with open(info_path, "rb") as f:
            data = pickle.load(f)
        return [str(info["token"]) for info in data["data_list"]]
    except (OSError, pickle.UnpicklingError, EOFError, AttributeError, ImportError) as exc:
        raise DataError(f"cannot read mmdet3d info file: {exc}", path=info_path) from None
    except (KeyError, TypeError) as exc:
        raise DataError(f"not an mmdet3d v2 info file (data_list[].token: {exc!r})", path=info_path) from None


# ----------------------------------------------------------------------------------------------- writer


def write_mmdet3d_infos(dataroot: str | Path, version: str, split: str | None, out: str | Path, *,
                        max_sweeps: int = 10) -> Path:
    """Write a split of the devkit tables as an mmdet3d v2 info file, the way mmdet3d >= 1.1's
    `create_data.py nuscenes` does (`nuscenes_converter._fill_trainval_infos` then
    `update_infos_to_v2.update_nuscenes_infos`), computed with the devkit only:

      boxes from `nusc.get_sample_data(LIDAR_TOP keyframe)` (LIDAR_TOP frame): bbox_3d = [*box.center, l, w, h,
      box.orientation.yaw_pitch_roll[0]] (gravity centre, "current" convention); velocity = `nusc.box_velocity`
      rotated global -> ego -> LiDAR (`v @ inv(e2g_r).T @ inv(l2e_r).T`); every annotation (bbox_label_3d -1 for
      categories outside the 10 classes, mapped as the devkit's `category_to_detection_name`), with
      num_lidar_pts, num_radar_pts and bbox_3d_isvalid (their sum > 0);
      cameras and sweeps through mmdet3d's `obtain_sensor2top` (sensor -> its ego pose -> global -> the keyframe's
      ego -> LIDAR_TOP), stored as lidar2cam / lidar2sensor = [[R^T, -R^T t]];
      timestamps in seconds; keyframe file names bare, sweep paths as `<dataroot>/sweeps/...`.

    One difference: update_infos_to_v2 rounds lidar2cam and lidar2sensor to float32; they are kept in float64
    here, so that a file written from the tables describes exactly the tables' geometry. `cam_instances`
    (mmdet3d's monocular targets) are not written.

    Args: split: a devkit split name or a name in `<dataroot>/<version>/splits.json`; None for every scene.
    Returns: `out`.
    """
    from nuscenes import NuScenes  # heavy: the devkit takes ~1 s to import
    from nuscenes.eval.detection.utils import category_to_detection_name  # heavy: the devkit takes ~1 s to import

    scenes = split_scene_names(version, split, dataroot)
    nusc = NuScenes(version=version, dataroot=str(dataroot), verbose=False)

    def rt(rotation, translation) -> np.ndarray:  # mmdet3d's convert_quaternion_to_matrix
        m = np.eye(4)
        m[:3, :3] = Quaternion(rotation).rotation_matrix
        m[:3, 3] = translation
        return m

    def sensor2top(sd_token, l2e_t, l2e_r_mat, e2g_t, e2g_r_mat) -> tuple[dict, np.ndarray]:
        """mmdet3d's obtain_sensor2top: (the sample_data's records, lidar2sensor (4, 4))."""
        sd = nusc.get("sample_data", sd_token)
        cs = nusc.get("calibrated_sensor", sd["calibrated_sensor_token"])
        pose = nusc.get("ego_pose", sd["ego_pose_token"])
        l2e_r_s_mat = Quaternion(cs["rotation"]).rotation_matrix
        e2g_r_s_mat = Quaternion(pose["rotation"]).rotation_matrix
        inv_chain = np.linalg.inv(e2g_r_mat).T @ np.linalg.inv(l2e_r_mat).T
        R = (l2e_r_s_mat.T @ e2g_r_s_mat.T) @ inv_chain
        T = (np.asarray(cs["translation"]) @ e2g_r_s_mat.T + np.asarray(pose["translation"])) @ inv_chain
        T -= np.asarray(e2g_t) @ inv_chain + np.asarray(l2e_t) @ np.linalg.inv(l2e_r_mat).T
        sensor2lidar_rotation, sensor2lidar_translation = R.T, T  # points @ R.T + T
        lidar2sensor = np.eye(4)
        lidar2sensor[:3, :3] = sensor2lidar_rotation.T
        lidar2sensor[:3, 3] = -sensor2lidar_rotation.T @ sensor2lidar_translation
        return {"sd": sd, "cs": cs, "pose": pose}, lidar2sensor

    categories = {c: k for k, c in enumerate(MMDET3D_NUSCENES_CLASSES)}
    ignored: set[str] = set()
    data_list = []
    for sample in nusc.sample:
        if scenes is not None and nusc.get("scene", sample["scene_token"])["name"] not in scenes:
            continue
        lidar_token = sample["data"][LIDAR_CHANNEL]
        sd = nusc.get("sample_data", lidar_token)
        cs = nusc.get("calibrated_sensor", sd["calibrated_sensor_token"])
        pose = nusc.get("ego_pose", sd["ego_pose_token"])
        lidar_path, boxes, _ = nusc.get_sample_data(lidar_token)
        l2e_r_mat = Quaternion(cs["rotation"]).rotation_matrix
        e2g_r_mat = Quaternion(pose["rotation"]).rotation_matrix
        chain = (cs["translation"], l2e_r_mat, pose["translation"], e2g_r_mat)
        info = {
            "sample_idx": len(data_list), "token": sample["token"], "timestamp": sample["timestamp"] / 1e6,
            "ego2global": rt(pose["rotation"], pose["translation"]).tolist(),
            "lidar_points": {"num_pts_feats": 5, "lidar_path": Path(lidar_path).name,
                             "lidar2ego": rt(cs["rotation"], cs["translation"]).tolist()},
            "lidar_sweeps": [], "images": {}, "instances": [],
        }
        prev = sd["prev"]
        while prev and len(info["lidar_sweeps"]) < max_sweeps:
            rec, lidar2sensor = sensor2top(prev, *chain)
            info["lidar_sweeps"].append({
                "lidar_points": {"lidar2ego": rt(rec["cs"]["rotation"], rec["cs"]["translation"]).tolist(),
                                 "lidar2sensor": lidar2sensor.tolist(),
                                 "lidar_path": str(Path(nusc.dataroot) / rec["sd"]["filename"])},
                "ego2global": rt(rec["pose"]["rotation"], rec["pose"]["translation"]).tolist(),
                "timestamp": rec["sd"]["timestamp"] / 1e6, "sample_data_token": prev})
            prev = rec["sd"]["prev"]
        for ch in CAMERA_CHANNELS:
            rec, lidar2cam = sensor2top(sample["data"][ch], *chain)
            info["images"][ch] = {
                "img_path": Path(rec["sd"]["filename"]).name, "cam2img": rec["cs"]["camera_intrinsic"],
                "sample_data_token": rec["sd"]["token"], "timestamp": rec["sd"]["timestamp"] / 1e6,
                "cam2ego": rt(rec["cs"]["rotation"], rec["cs"]["translation"]).tolist(), "lidar2cam": lidar2cam.tolist()}
        anns = [nusc.get("sample_annotation", t) for t in sample["anns"]]
        for box, ann in zip(boxes, anns):
            vel = np.array([*nusc.box_velocity(ann["token"])[:2], 0.0])
            vel = vel @ np.linalg.inv(e2g_r_mat).T @ np.linalg.inv(l2e_r_mat).T
            name = category_to_detection_name(ann["category_name"])
            if name is None:
                ignored.add(ann["category_name"])
            w, l, h = box.wlh
            label = categories[name] if name is not None else -1
            info["instances"].append({
                "bbox_3d": [*map(float, box.center), float(l), float(w), float(h),
                            float(box.orientation.yaw_pitch_roll[0])],
                "bbox_label": label, "bbox_label_3d": label, "velocity": vel[:2].tolist(),
                "num_lidar_pts": int(ann["num_lidar_pts"]), "num_radar_pts": int(ann["num_radar_pts"]),
                "bbox_3d_isvalid": bool(ann["num_lidar_pts"] + ann["num_radar_pts"] > 0)})
        data_list.append(info)
    metainfo = {"categories": {**categories, **{n: -1 for n in sorted(ignored)}}, "dataset": "nuscenes",
                "version": version, "info_version": "1.1"}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "wb") as f:
        pickle.dump({"metainfo": metainfo, "data_list": data_list}, f)
    log.info("wrote %d samples of %s/%s to %s", len(data_list), version, split, out)
    return out
