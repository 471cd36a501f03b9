"""`NuScenesDataset`: multi-sensor nuScenes samples (real or synthetic) in the keyframe's LIDAR_TOP frame.

Construction reads a `SampleIndex`: a handful of numpy arrays (fixed-width string arrays for tokens and file
paths, float arrays for calibration, boxes and sweep transforms, offsets into flat per-sweep and per-box
arrays). It is built from the devkit tables once (`index_from_tables`; the `NuScenes` object is dropped right
after) and cached memory-mapped under ``$PERCEPTION_CACHE/sample_index`` (`perception.data.index_cache`): later
constructions, DataLoader workers and the other ranks of a job map the same files. A numpy array is one Python
object, so reading the index does not touch the reference counts of millions of small dicts and lists (which is
what makes per-worker copies of the devkit tables grow, pytorch issue #13246). Map expansions are
loaded lazily in the process that renders them (see `map_raster.py`).

Everything an item holds is in the keyframe's LIDAR_TOP frame (x right, y forward, z up; metres), after the
BEV augmentation `meta["lidar_aug"]` when training, unless its name says otherwise.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable

import cv2
import numpy as np
import torch
from pyquaternion import Quaternion
from torch import Tensor
from torch.utils.data import Dataset

from perception.data.loading import (
    invert_rigid,
    kept_counts,
    pose_matrix,
    read_jpeg,
    read_lidar_bin,
    read_radar_pcds,
)
from perception.data.index_cache import cached_index_arrays, index_cache_key
from perception.data.map_raster import MapRasterizer
from perception.data.shm_pool import output_array
from perception.data.transforms import (
    BEVAugConfig,
    ImageAugConfig,
    jpeg_reduction,
    point_affine,
    reduced_decode_matrix,
    sample_bev_aug,
    sample_image_aug,
    transform_boxes,
    transform_points,
    transform_radar,
    warp_image,
)
from perception.classes import NUSCENES, ClassList
from perception.distributed import DistInfo
from perception.rig import NUSCENES as NUSCENES_RIG, Rig
from perception.errors import ConfigError, DataError
from perception.structures import (
    MAP_CLASSES,
    SCENE_TAGS,
    BEVGrid,
    Boxes3D,
    parse_scene_tags,
)

log = logging.getLogger(__name__)
_WARNED_NO_MAP: set[tuple[str, tuple[str, ...]]] = set()  # (dataroot, locations) already warned about
# The radar fields a sample keeps (then dt): the devkit's motion-compensated velocities, as in BEVFusion.
_RADAR_COLUMNS = ("x", "y", "z", "rcs", "vx_comp", "vy_comp")


@dataclass(frozen=True)
class DatasetConfig:
    """What one item holds and how it is made.

    lidar_sweeps / radar_sweeps count the keyframe sweep too (the devkit's `nsweeps`); sweeps are followed
    back through `prev` links within the scene. `min_distance` drops returns within |x| < d and |y| < d of the
    sensor, as `from_file_multisweep` does. `bev_aug` None means no BEV augmentation; `train` False gives the
    deterministic image transform and ignores `bev_aug` and ground-truth sampling. `map`: map masks from the
    map expansion where the sample's location has one ("auto"), for every sample (required: "on", a missing
    file raises DataError at construction), or never ("off"); a sample without them has `has_map` False.
    `eval_map_grid`: when set and not `train`, samples with a map also carry `map_masks_eval` rendered on it
    (the fixed grid of BEVFusion's map-segmentation protocol, `structures.BEVFUSION_MAP_GRID`).
    `map_cache`: with `train`, map masks come from each location's raster cached at construction
    (`MapRasterizer.render_cached`, ~1 ms) instead of the exact per-sample rendering (~20 ms); evaluation
    targets are always exact. `classes`: the class list; an annotation whose category no class names is left out
    (`perception data check` reports such categories). `rig`: the channels read (cameras in order, the reference
    LiDAR, the radars); a camera a sample lacks is masked (`Sample.camera_mask`).
    """

    grid: BEVGrid = field(default_factory=BEVGrid)
    image: ImageAugConfig = field(default_factory=ImageAugConfig)
    bev_aug: BEVAugConfig | None = None
    train: bool = False
    lidar_sweeps: int = 10
    radar_sweeps: int = 6
    min_distance: float = 1.0
    map: str = "auto"
    eval_map_grid: BEVGrid | None = None
    map_cache: bool = True
    skip_bad_samples: bool = False
    max_skip: int = 16
    seed: int = 0
    classes: ClassList = NUSCENES
    rig: Rig = NUSCENES_RIG

    def __post_init__(self) -> None:
        if self.lidar_sweeps < 1:
            raise ConfigError(f"DatasetConfig.lidar_sweeps must be >= 1 (it includes the keyframe), got {self.lidar_sweeps}")
        if self.radar_sweeps < 0:
            raise ConfigError(f"DatasetConfig.radar_sweeps must be >= 0, got {self.radar_sweeps}")
        if self.map not in ("auto", "on", "off"):
            raise ConfigError(f"data.map must be auto, on or off, got {self.map!r}")


@dataclass
class SampleIndex:
    """Everything needed to load the samples, as flat numpy arrays (S samples, C = 6 cameras).

    Frames: `*2lidar` map into the keyframe's LIDAR_TOP frame; float64; metres.
      tokens (S,) str; timestamps (S,) int64 us; scene_tags (S, len(SCENE_TAGS)) float32; has_scene_tags (S,)
      bool (False: the tags are unknown, e.g. mmdet3d infos, and `scene_tags` is zeros); locations (S,) str
      (map name, "" when unknown); lidar2ego, ego2global (S, 4, 4);
      cam_paths (S, C) str relative to dataroot; cam_wh (S, C, 2) int64; cam_intrinsics (S, C, 3, 3);
      cam2lidar (S, C, 4, 4) (through the camera's own ego pose);
      lidar_offsets (S + 1,) into lidar_paths (L,), lidar_sweep2lidar (L, 4, 4), lidar_dt (L,) s >= 0;
      radar_offsets (S + 1,) into radar_paths (R,), radar_sweep2lidar (R, 4, 4), radar_dt (R,);
      box_offsets (S + 1,) into boxes (B, 9) float32 `Boxes3D` layout in LIDAR_TOP, labels (B,) int64,
      attributes (B,) int64 (-1: none), box_tokens (B,) str (sample_annotation token, "" when unknown);
      scene_tokens (S,) str and prev_tokens (S,) str (the scene's previous keyframe, "" for its first), or None
      when the source does not say (mmdet3d infos): then no sample has a temporal history.
    """

    dataroot: str
    tokens: np.ndarray
    timestamps: np.ndarray
    scene_tags: np.ndarray
    has_scene_tags: np.ndarray
    locations: np.ndarray
    lidar2ego: np.ndarray
    ego2global: np.ndarray
    cam_paths: np.ndarray
    cam_wh: np.ndarray
    cam_intrinsics: np.ndarray
    cam2lidar: np.ndarray
    lidar_offsets: np.ndarray
    lidar_paths: np.ndarray
    lidar_sweep2lidar: np.ndarray
    lidar_dt: np.ndarray
    radar_offsets: np.ndarray
    radar_paths: np.ndarray
    radar_sweep2lidar: np.ndarray
    radar_dt: np.ndarray
    box_offsets: np.ndarray
    boxes: np.ndarray
    labels: np.ndarray
    attributes: np.ndarray
    box_tokens: np.ndarray
    scene_tokens: np.ndarray | None = None
    prev_tokens: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.tokens)

    def boxes_of(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        a, b = self.box_offsets[i], self.box_offsets[i + 1]
        return self.boxes[a:b], self.labels[a:b], self.attributes[a:b]

    def classes_of_samples(self) -> list[set[int]]:
        """(S,) per sample, the distinct labels (ids into the class list) of its boxes (from the index: nothing
        is loaded)."""
        off = self.box_offsets
        return [set(self.labels[a:b].tolist()) for a, b in zip(off[:-1], off[1:])]

    def subset(self, keep: np.ndarray) -> "SampleIndex":
        """A new index over the samples where `keep` (S,) bool is True."""
        keep = np.asarray(keep, bool)
        per = {k: getattr(self, k)[keep] for k in (
            "tokens", "timestamps", "scene_tags", "has_scene_tags", "locations", "lidar2ego", "ego2global", "cam_paths",
            "cam_wh", "cam_intrinsics", "cam2lidar")}
        for k in ("scene_tokens", "prev_tokens"):
            if getattr(self, k) is not None:
                per[k] = getattr(self, k)[keep]
        ragged = {}
        for prefix, names in (("lidar", ("paths", "sweep2lidar", "dt")), ("radar", ("paths", "sweep2lidar", "dt")),
                              ("box", ())):
            off = getattr(self, f"{prefix}_offsets")
            idx = np.concatenate([np.arange(off[i], off[i + 1]) for i in np.flatnonzero(keep)] + [np.zeros(0, int)])
            counts = (off[1:] - off[:-1])[keep]
            ragged[f"{prefix}_offsets"] = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
            for n in names:
                ragged[f"{prefix}_{n}"] = getattr(self, f"{prefix}_{n}")[idx]
            if prefix == "box":
                for n in ("boxes", "labels", "attributes", "box_tokens"):
                    ragged[n] = getattr(self, n)[idx]
        return SampleIndex(dataroot=self.dataroot, **per, **ragged)


INDEX_ARRAYS = tuple(f.name for f in fields(SampleIndex) if f.name != "dataroot")


def index_settings(cfg: DatasetConfig) -> dict:
    """The `DatasetConfig` fields the index depends on (`build_index` reads no others), for cache keys."""
    return {"lidar_sweeps": cfg.lidar_sweeps, "radar_sweeps": cfg.radar_sweeps, "skip_bad_samples": cfg.skip_bad_samples,
            "classes": cfg.classes.to_json(), "rig": cfg.rig.to_json()}


def read_tables(dataroot: str | Path, version: str):
    """The devkit's `NuScenes` over the tables of `version` under `dataroot` (minutes and gigabytes for
    v1.0-trainval: `cached_sample_index` calls it only when its cache misses). Raises DataError when they are
    missing."""
    from nuscenes import NuScenes  # heavy: the devkit takes ~1 s to import

    if not (Path(dataroot) / version).is_dir():
        raise DataError(f"no {version} tables under the dataroot", path=dataroot)
    return NuScenes(version=version, dataroot=str(dataroot), verbose=False)


def index_from_tables(dataroot: str | Path, version: str, split: str | None, cfg: DatasetConfig,
                      nusc=None) -> tuple[SampleIndex, list[tuple[str, str]]]:
    """Build the index of `split` (`build_index`) from the devkit tables of `version` under `dataroot`
    (`read_tables`; or from `nusc`, those tables already read).

    Raises DataError when the tables are missing, ConfigError for an unknown split."""
    scenes = split_scene_names(version, split, dataroot)
    nusc = nusc if nusc is not None else read_tables(dataroot, version)
    return build_index(nusc, scenes, cfg)  # read here, the tables are dropped on return: workers must not inherit them


def cached_sample_index(dataroot: str | Path, version: str, split: str | None, cfg: DatasetConfig,
                        dist_info: DistInfo | None = None, *,
                        tables: Callable[[], Any] | None = None) -> tuple[SampleIndex, list[tuple[str, str]]]:
    """The index of `split` from the memory-mapped cache (`perception.data.index_cache`), parsing the tables only
    when it misses (on rank 0 alone under torchrun: every rank calls this together). `tables`: returns the
    devkit `NuScenes` to build from on a miss (to read them once for several splits; default `read_tables`).
    Returns (index, bad samples as (sample token, reason))."""
    if not (Path(dataroot) / version).is_dir():
        raise DataError(f"no {version} tables under the dataroot", path=dataroot)
    key = index_cache_key(dataroot, version, split, split_scene_names(version, split, dataroot), index_settings(cfg))

    def build() -> tuple[dict, dict]:
        index, bad = index_from_tables(dataroot, version, split, cfg, None if tables is None else tables())
        return {k: getattr(index, k) for k in INDEX_ARRAYS}, {"bad_samples": [list(b) for b in bad]}

    arrays, meta = cached_index_arrays(key, build, dist_info)
    return (SampleIndex(dataroot=str(dataroot), **{k: arrays[k] for k in INDEX_ARRAYS}),
            [tuple(b) for b in meta["bad_samples"]])


def _str_array(values: list[str]) -> np.ndarray:
    return np.array(values if values else [""], dtype=str)[: len(values)]


def split_scene_names(version: str, split: str | None, dataroot: str | Path) -> set[str] | None:
    """Scene names of a split: the devkit's standard splits, else `<dataroot>/<version>/splits.json`.
    None (split None or "all") means every scene."""
    if split in (None, "all"):
        return None
    from nuscenes.utils.splits import create_splits_scenes  # heavy: the devkit takes ~1 s to import

    standard = create_splits_scenes()
    if split in standard:
        if split.startswith("mini") and not version.endswith("mini"):
            raise ConfigError(f"split {split!r} needs a mini version, got {version!r}")
        return set(standard[split])
    path = Path(dataroot) / version / "splits.json"
    if path.exists():
        custom = json.loads(path.read_text())
        if split in custom:
            return set(custom[split])
    raise ConfigError(f"unknown split {split!r} (not a devkit split and not in {path})")


def build_index(nusc, split_scenes: set[str] | None, cfg: DatasetConfig) -> tuple[SampleIndex, list[tuple[str, str]]]:
    """Walk the devkit tables once and return the compact index plus (sample token, reason) for every sample
    whose records are bad (only when `cfg.skip_bad_samples`; otherwise the first DataError is raised).

    Boxes are filtered as the devkit's detection evaluation filters ground truth, except for its per-class
    range: categories that map to no detection class, boxes with num_lidar_pts + num_radar_pts == 0, and
    bicycles/motorcycles whose centre is in a bicycle_rack box are dropped. Boxes beyond the evaluation range
    (`CLASS_RANGE_M`, 30-50 m) are kept: they are real objects that the BEV grid still covers (to ~72 m in its
    corners), and training them as background would teach the heads to miss them; the training targets keep the
    boxes whose centre is on the grid (`build_detection_targets`), and the devkit's DetectionEval applies the
    range to ground truth and predictions itself.

    Velocities are `nusc.box_velocity` (global, centred difference) rotated into LIDAR_TOP; NaN (a single
    annotation or a gap) becomes 0.
    """
    from nuscenes.utils.data_classes import Box  # heavy: the devkit takes ~1 s to import
    from nuscenes.utils.geometry_utils import points_in_box  # heavy: the devkit takes ~1 s to import

    attr_name = {a["token"]: a["name"] for a in nusc.attribute}
    rows: dict[str, list] = {k: [] for k in (
        "tokens", "timestamps", "scene_tags", "locations", "lidar2ego", "ego2global", "cam_paths", "cam_wh",
        "cam_intrinsics", "cam2lidar", "lidar_count", "radar_count", "box_count", "scene_tokens", "prev_tokens")}
    flat: dict[str, list] = {k: [] for k in (
        "lidar_paths", "lidar_sweep2lidar", "lidar_dt", "radar_paths", "radar_sweep2lidar", "radar_dt",
        "boxes", "labels", "attributes", "box_tokens")}
    bad: list[tuple[str, str]] = []

    scenes = [s for s in nusc.scene if split_scenes is None or s["name"] in split_scenes]
    for scene in scenes:
        location = nusc.get("log", scene["log_token"])["location"]
        tags = parse_scene_tags(scene["description"])
        token = scene["first_sample_token"]
        while token:
            sample = nusc.get("sample", token)
            token = sample["next"]
            try:
                item = _index_sample(nusc, sample, cfg, attr_name, Box, points_in_box, Quaternion)
            except DataError as exc:
                if not cfg.skip_bad_samples:
                    raise
                log.warning("skipping sample: %s", exc)
                bad.append((sample["token"], str(exc)))
                continue
            rows["tokens"].append(sample["token"])
            rows["scene_tokens"].append(scene["token"])
            rows["prev_tokens"].append(sample["prev"])
            rows["timestamps"].append(sample["timestamp"])
            rows["scene_tags"].append(tags)
            rows["locations"].append(location)
            for k in ("lidar2ego", "ego2global", "cam_paths", "cam_wh", "cam_intrinsics", "cam2lidar"):
                rows[k].append(item[k])
            for prefix in ("lidar", "radar"):
                rows[f"{prefix}_count"].append(len(item[f"{prefix}_paths"]))
                for n in ("paths", "sweep2lidar", "dt"):
                    flat[f"{prefix}_{n}"].extend(item[f"{prefix}_{n}"])
            rows["box_count"].append(len(item["labels"]))
            flat["boxes"].extend(item["boxes"])
            flat["labels"].extend(item["labels"])
            flat["attributes"].extend(item["attributes"])
            flat["box_tokens"].extend(item["box_tokens"])

    def offsets(counts):
        return np.concatenate([[0], np.cumsum(counts, dtype=np.int64)]).astype(np.int64)

    S = len(rows["tokens"])
    index = SampleIndex(
        dataroot=str(nusc.dataroot),
        tokens=_str_array(rows["tokens"]),
        timestamps=np.asarray(rows["timestamps"], np.int64),
        scene_tags=np.asarray(rows["scene_tags"], np.float32).reshape(S, len(SCENE_TAGS)),
        has_scene_tags=np.ones(S, bool),
        locations=_str_array(rows["locations"]),
        lidar2ego=np.asarray(rows["lidar2ego"], np.float64).reshape(S, 4, 4),
        ego2global=np.asarray(rows["ego2global"], np.float64).reshape(S, 4, 4),
        cam_paths=np.array(rows["cam_paths"], dtype=str).reshape(S, len(cfg.rig.cameras)),
        cam_wh=np.asarray(rows["cam_wh"], np.int64).reshape(S, len(cfg.rig.cameras), 2),
        cam_intrinsics=np.asarray(rows["cam_intrinsics"], np.float64).reshape(S, len(cfg.rig.cameras), 3, 3),
        cam2lidar=np.asarray(rows["cam2lidar"], np.float64).reshape(S, len(cfg.rig.cameras), 4, 4),
        lidar_offsets=offsets(rows["lidar_count"]),
        lidar_paths=_str_array(flat["lidar_paths"]),
        lidar_sweep2lidar=np.asarray(flat["lidar_sweep2lidar"], np.float64).reshape(-1, 4, 4),
        lidar_dt=np.asarray(flat["lidar_dt"], np.float32),
        radar_offsets=offsets(rows["radar_count"]),
        radar_paths=_str_array(flat["radar_paths"]),
        radar_sweep2lidar=np.asarray(flat["radar_sweep2lidar"], np.float64).reshape(-1, 4, 4),
        radar_dt=np.asarray(flat["radar_dt"], np.float32),
        box_offsets=offsets(rows["box_count"]),
        boxes=np.asarray(flat["boxes"], np.float32).reshape(-1, Boxes3D.DIM),
        labels=np.asarray(flat["labels"], np.int64),
        attributes=np.asarray(flat["attributes"], np.int64),
        box_tokens=_str_array(flat["box_tokens"]),
        scene_tokens=_str_array(rows["scene_tokens"]),
        prev_tokens=_str_array(rows["prev_tokens"]),
    )
    return index, bad


def _index_sample(nusc, sample, cfg, attr_name, Box, points_in_box, Quaternion) -> dict:
    """One sample's rows of the index (see `build_index`). Raises DataError for bad calibration or poses."""
    tok = sample["token"]

    def sensor_pose(sd_token: str) -> tuple[np.ndarray, np.ndarray, dict]:
        sd = nusc.get("sample_data", sd_token)
        cs = nusc.get("calibrated_sensor", sd["calibrated_sensor_token"])
        ep = nusc.get("ego_pose", sd["ego_pose_token"])
        s2e = pose_matrix(cs["rotation"], cs["translation"], what=f"calibrated_sensor {cs['token']}",
                          path=sd["filename"], token=tok)
        e2g = pose_matrix(ep["rotation"], ep["translation"], what=f"ego_pose {ep['token']}",
                          path=sd["filename"], token=tok)
        return s2e, e2g, sd

    rig = cfg.rig
    if rig.reference_lidar not in sample["data"]:
        raise DataError(f"sample has no {rig.reference_lidar} keyframe", token=tok)
    lidar2ego, ego2global, lidar_sd = sensor_pose(sample["data"][rig.reference_lidar])
    global2lidar = invert_rigid(lidar2ego) @ invert_rigid(ego2global)
    ref_time = lidar_sd["timestamp"]

    out: dict[str, Any] = {"lidar2ego": lidar2ego, "ego2global": ego2global}
    cam_paths, cam_wh, cam_K, cam2lidar = [], [], [], []
    for ch in rig.camera_names:
        if ch not in sample["data"]:  # the camera is absent from this sample (masked in the model)
            cam_paths.append("")
            cam_wh.append((0, 0))
            cam_K.append(np.eye(3))
            cam2lidar.append(np.eye(4))
            continue
        s2e, e2g, sd = sensor_pose(sample["data"][ch])
        cs = nusc.get("calibrated_sensor", sd["calibrated_sensor_token"])
        K = np.asarray(cs["camera_intrinsic"], np.float64)
        if K.shape != (3, 3) or not np.isfinite(K).all():
            raise DataError(f"calibrated_sensor {cs['token']}: camera_intrinsic is not a finite 3x3 matrix",
                            path=sd["filename"], token=tok)
        cam_paths.append(sd["filename"])
        cam_wh.append((sd["width"], sd["height"]))
        cam_K.append(K)
        cam2lidar.append(global2lidar @ e2g @ s2e)
    out.update(cam_paths=cam_paths, cam_wh=cam_wh, cam_intrinsics=cam_K, cam2lidar=cam2lidar)

    for prefix, channels, nsweeps in (("lidar", (rig.reference_lidar,), cfg.lidar_sweeps),
                                      ("radar", rig.radars, cfg.radar_sweeps)):
        paths, mats, dts = [], [], []
        for ch in channels:
            sd_token = sample["data"].get(ch, "")
            for _ in range(nsweeps):
                if not sd_token:
                    break
                s2e, e2g, sd = sensor_pose(sd_token)
                paths.append(sd["filename"])
                mats.append(global2lidar @ e2g @ s2e)
                dts.append(1e-6 * (ref_time - sd["timestamp"]))
                sd_token = sd["prev"]
        out[f"{prefix}_paths"], out[f"{prefix}_sweep2lidar"], out[f"{prefix}_dt"] = paths, mats, dts

    # Boxes, filtered like the detection evaluation's ground truth but without its range (see `build_index`).
    anns = [nusc.get("sample_annotation", t) for t in sample["anns"]]
    racks = [Box(a["translation"], a["size"], Quaternion(a["rotation"])) for a in anns
             if a["category_name"] == "static_object.bicycle_rack"]
    boxes, labels, attrs, box_tokens = [], [], [], []
    classes = cfg.classes
    for a in anns:
        label = classes.label_of_category(a["category_name"])
        if label is None:
            continue
        if len(a["attribute_tokens"]) > 1:
            raise DataError(f"sample_annotation {a['token']} has more than one attribute", token=tok)
        centre_g = np.asarray(a["translation"], np.float64)
        if a["num_lidar_pts"] + a["num_radar_pts"] == 0:
            continue
        if classes[label].dropped_in_exclusion_boxes and any(
                points_in_box(r, centre_g[:, None]).any() for r in racks):
            continue
        R_box_g = pose_matrix(a["rotation"], a["translation"], what=f"sample_annotation {a['token']}",
                              token=tok)
        box2lidar = global2lidar @ R_box_g
        yaw = np.arctan2(box2lidar[1, 0], box2lidar[0, 0])
        vel_g = nusc.box_velocity(a["token"])
        vel_g = np.where(np.isfinite(vel_g), vel_g, 0.0)
        vel_l = global2lidar[:3, :3] @ np.array([vel_g[0], vel_g[1], 0.0])
        w, l, h = a["size"]
        boxes.append([*box2lidar[:3, 3], w, l, h, yaw, vel_l[0], vel_l[1]])
        labels.append(label)
        box_tokens.append(a["token"])
        attr = attr_name[a["attribute_tokens"][0]] if a["attribute_tokens"] else None
        attrs.append(classes.attributes.index(attr) if attr in classes[label].attributes else -1)
    out.update(boxes=boxes, labels=labels, attributes=attrs, box_tokens=box_tokens)
    return out


@dataclass
class Sample:
    """One item. Frame: the keyframe's LIDAR_TOP after `meta["lidar_aug"]` (x right, y forward, z up; m).

    images: (N, 3, H, W) uint8 RGB, the rig's N cameras in its order (`DatasetConfig.rig`).
    cam2img: (6, 3, 3) float32, camera frame -> augmented pixels (`img_aug @ K`).
    cam2lidar: (6, 4, 4) float32, camera frame -> this frame (a similarity when the BEV aug scales/flips).
    img_aug: (6, 3, 3) float32, original pixels -> augmented pixels.
    points_lidar: (N, 5) float32: x, y, z (m), intensity, dt (s, >= 0).
    points_radar: (M, 7) float32: x, y, z (m), rcs (dBsm), vx_comp, vy_comp (m/s, this frame), dt (s).
    boxes_lidar: Boxes3D (K boxes); labels: (K,) int64 into the class list (`DatasetConfig.classes`);
        attributes: (K,) int64 into its attributes or -1.
    map_masks: (len(MAP_CLASSES), H_bev, W_bev) uint8 in {0, 1} on the BEVGrid.
    scene_tags: (len(SCENE_TAGS),) float32 multi-hot.
    has_map: the sample has map ground truth (else `map_masks` is zeros and is not trained or scored).
    has_scene_tags: the scene tags are known (else `scene_tags` is zeros and is not trained or scored).
    map_masks_eval: (len(MAP_CLASSES), H_e, W_e) uint8 on `DatasetConfig.eval_map_grid`, or None.
    camera_mask: (N,) bool, the cameras the sample has (an absent one's image is zeros), or None: all of them.
    meta: sample_token, timestamp (us), lidar2ego, ego2global, lidar_aug ((4, 4) float64 numpy), location,
        scene_token and prev_token (the scene's previous keyframe; "" when first or unknown), skipped (tokens
        skipped before this one with skip_bad_samples).
    """

    images: Tensor
    cam2img: Tensor
    cam2lidar: Tensor
    img_aug: Tensor
    points_lidar: Tensor
    points_radar: Tensor
    boxes_lidar: Boxes3D
    labels: Tensor
    attributes: Tensor
    map_masks: Tensor
    scene_tags: Tensor
    meta: dict[str, Any]
    has_radar: bool = True
    has_map: bool = True
    has_scene_tags: bool = True
    map_masks_eval: Tensor | None = None
    camera_mask: Tensor | None = None


class NuScenesDataset(Dataset):
    """Multi-sensor nuScenes samples. See the module docstring for the memory model and frames.

    Args:
        dataroot: the nuScenes dataroot.
        version: e.g. "v1.0-mini", "v1.0-trainval".
        split: a devkit split name ("mini_train", "mini_val", "train", "val", ...), a name in splits.json, or
            None for every scene.
        config: see `DatasetConfig`.
        gt_sampler: optional `perception.data.gt_sampling.GTSampler`, used when `config.train`.
        index: a prebuilt index (e.g. from `mmdet3d_info.read_mmdet3d_infos`) instead of the split's, which is
            otherwise read from the index cache or, when it misses, built from the tables and cached
            (`cached_sample_index`).
        dist_info: under torchrun, every rank builds its dataset together: rank 0 alone parses the tables.
        bad_samples: (sample token, reason) of samples left out of `index` (`with_config` carries them).
    """

    def __init__(self, dataroot: str | Path, version: str = "v1.0-mini", split: str | None = None, *,
                 config: DatasetConfig | None = None, gt_sampler=None, index: SampleIndex | None = None,
                 dist_info: DistInfo | None = None, bad_samples: list[tuple[str, str]] | None = None):
        self.config = config or DatasetConfig()
        self.dataroot = str(dataroot)
        self.version = version
        self.split = split
        self.gt_sampler = gt_sampler
        self.bad_samples: list[tuple[str, str]] = list(bad_samples or [])
        if index is None:
            index, self.bad_samples = cached_sample_index(dataroot, version, split, self.config, dist_info)
        self.index = index
        self.map_rasterizer = None if self.config.map == "off" else MapRasterizer(self.dataroot, self.config.grid)
        # Locations whose map masks this dataset renders (the others' samples have has_map False).
        self.map_locations = frozenset()
        if self.map_rasterizer is not None:
            locations = {str(loc) for loc in np.unique(index.locations)}
            self.map_locations = frozenset(loc for loc in locations if self.map_rasterizer.has(loc))
            missing = sorted(locations - self.map_locations)
            if missing and self.config.map == "on":
                where = self.map_rasterizer.path_of(missing[0]) if missing[0] else self.dataroot
                raise DataError("data.map=on but there is no map expansion for "
                                f"{', '.join(repr(m) for m in missing)} (use data.map=auto to train without map "
                                "targets where it is missing)", path=where)
            if missing and (self.dataroot, tuple(missing)) not in _WARNED_NO_MAP:
                _WARNED_NO_MAP.add((self.dataroot, tuple(missing)))
                log.warning("no map expansion for %s under %s: those samples train and score no map segmentation "
                            "(data.map=auto)", ", ".join(repr(m) for m in missing), Path(self.dataroot) / "maps/expansion")
        if self.config.train and self.config.map_cache:
            for loc in sorted(self.map_locations):  # built (or mapped) here, once, not in every worker
                self.map_rasterizer.raster(loc)
        self.num_skipped = 0
        self._epoch = 0
        log.info("NuScenesDataset %s/%s: %d samples (%d bad skipped at indexing)", version, split, len(index),
                 len(self.bad_samples))

    def __len__(self) -> int:
        return len(self.index)

    def with_config(self, **changes) -> "NuScenesDataset":
        """The same index with a changed config (no table reading)."""
        return NuScenesDataset(self.dataroot, self.version, self.split, config=replace(self.config, **changes),
                               gt_sampler=self.gt_sampler, index=self.index, bad_samples=self.bad_samples)

    def set_epoch(self, epoch: int) -> None:
        """The training epoch of the items loaded from now on: the augmentation draws are seeded by (seed, epoch,
        index), and GT sampling stops at its `GTSamplerConfig.stop_epoch`. DataLoader workers hold a copy of the
        dataset made when they start: set the epoch before iterating a loader whose workers are not persistent
        (as `perception.data.loader.make_loader` makes them)."""
        self._epoch = int(epoch)

    def __getitem__(self, i: int) -> Sample:
        if not self.config.skip_bad_samples:
            return self.load(i)
        skipped, reasons = [], {}
        for attempt in range(self.config.max_skip + 1):
            j = (i + attempt) % len(self)
            try:
                s = self.load(j)
                s.meta["skipped"] = skipped
                s.meta["skipped_reasons"] = reasons
                return s
            except DataError as exc:
                self.num_skipped += 1
                skipped.append(str(self.index.tokens[j]))
                reasons[str(self.index.tokens[j])] = str(exc)
                log.warning("skipping bad sample (%d so far in this process): %s", self.num_skipped, exc)
        raise DataError(f"{self.config.max_skip + 1} consecutive bad samples starting at index {i}",
                        token=str(self.index.tokens[i]))

    # ------------------------------------------------------------------------------------------ loading

    def _path(self, rel: str) -> str:
        return os.path.join(self.dataroot, rel)  # a str: pathlib's parsing costs ~50 us per file here

    def load_points_lidar(self, i: int, lidar_aug: np.ndarray | None = None) -> np.ndarray:
        """(N, 5) float32 in the keyframe LIDAR_TOP frame (after `lidar_aug`, (4, 4), when given: composed into
        each sweep's transform, so the points are transformed once): x, y, z, intensity, dt; the K sweeps
        motion-compensated through their ego poses, as `LidarPointCloud.from_file_multisweep`."""
        idx, tok = self.index, str(self.index.tokens[i])
        sweeps = range(idx.lidar_offsets[i], idx.lidar_offsets[i + 1])
        raws = [read_lidar_bin(self._path(idx.lidar_paths[k]), tok) for k in sweeps]
        d = self.config.min_distance  # applied in each sweep's own sensor frame, as the devkit does
        keeps = [~((np.abs(raw[:, 0]) < d) & (np.abs(raw[:, 1]) < d)) for raw in raws]
        counts = [int(keep.sum()) for keep in keeps]
        out = output_array((sum(counts), 5), np.float32)  # written once: no concatenation, no final compaction
        a = 0
        for k, raw, keep, n in zip(sweeps, raws, keeps, counts):
            src = raw if n == len(raw) else np.compress(keep, raw, axis=0)
            # One product per sweep maps (x, y, z, intensity, 1) to (x', y', z', intensity, dt): the ring column
            # (unused) of this private buffer becomes the homogeneous 1 that carries translation and dt.
            src[:, 4] = 1.0
            T = idx.lidar_sweep2lidar[k] if lidar_aug is None else lidar_aug @ idx.lidar_sweep2lidar[k]
            M, b = point_affine(T, 5)
            M[4] = b
            M[4, 4] = idx.lidar_dt[k]
            np.matmul(src, M, out=out[a:a + n])
            a += n
        return out

    def load_points_radar(self, i: int, lidar_aug: np.ndarray | None = None) -> np.ndarray:
        """(M, 7) float32 in the keyframe LIDAR_TOP frame (after `lidar_aug` when given, as for LiDAR): x, y, z,
        rcs, vx_comp, vy_comp (rotated into this frame), dt; from all radars and K sweeps each, devkit default
        filters."""
        idx, tok = self.index, str(self.index.tokens[i])
        files = range(idx.radar_offsets[i], idx.radar_offsets[i + 1])
        raw, counts = read_radar_pcds([self._path(idx.radar_paths[k]) for k in files], tok, columns=_RADAR_COLUMNS)
        d = self.config.min_distance  # each return in its own sensor frame, as the devkit filters
        keep = ~((np.abs(raw[:, 0]) < d) & (np.abs(raw[:, 1]) < d))
        if not keep.all():
            counts = kept_counts(keep, counts)
            raw = np.compress(keep, raw, axis=0)
        out = np.empty((len(raw), 7), np.float32)
        a = 0
        for k, n in zip(files, counts.tolist()):
            T = idx.radar_sweep2lidar[k] if lidar_aug is None else lidar_aug @ idx.radar_sweep2lidar[k]
            # One product per file maps (x, y, z, rcs, vx_comp, vy_comp) to the 7 output columns, dt by the offset.
            M, b = point_affine(T, 7, velocity_col=4)
            b[6] = idx.radar_dt[k]
            np.matmul(raw[a:a + n], M[:6], out=out[a:a + n])
            out[a:a + n] += b
            a += n
        return out

    def load_images(self, i: int, rng: np.random.Generator | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Images after the image augmentation (rng None: evaluation transform).

        Returns: images (6, 3, H, W) uint8, cam2img (6, 3, 3) float64, img_aug (6, 3, 3) float64.
        """
        idx, tok, cfg = self.index, str(self.index.tokens[i]), self.config.image
        H, W = cfg.final_hw
        n = idx.cam_paths.shape[1]
        images = output_array((n, 3, H, W), np.uint8)
        cam2img = np.empty((n, 3, 3))
        img_aug = np.empty((n, 3, 3))
        for c in range(n):
            if not idx.cam_paths[i, c]:  # absent: zeros, never seen by the model (`Sample.camera_mask`)
                images[c] = 0
                img_aug[c] = np.eye(3)
                cam2img[c] = idx.cam_intrinsics[i, c]
                continue
            wh = tuple(int(v) for v in idx.cam_wh[i, c])
            path = self._path(idx.cam_paths[i, c])
            if min(wh) > 0:
                aug, resize = sample_image_aug(rng, wh, cfg)
                f = jpeg_reduction(resize)
                img = read_jpeg(path, tok, expected_wh=wh, reduce=f, rgb=False)
            else:  # size not in the index (mmdet3d infos): decode fully, then draw the augmentation
                f = 1
                img = read_jpeg(path, tok, rgb=False)
                aug, _ = sample_image_aug(rng, (img.shape[1], img.shape[0]), cfg)
            out = warp_image(img, aug @ np.linalg.inv(reduced_decode_matrix(f)), cfg.final_hw)
            cv2.split(out, [images[c, 2], images[c, 1], images[c, 0]])  # BGR (libjpeg's order) into RGB planes
            img_aug[c] = aug
            cam2img[c] = aug @ idx.cam_intrinsics[i, c]
        return images, cam2img, img_aug

    def load_map_masks(self, i: int, lidar_aug: np.ndarray) -> np.ndarray:
        """(len(MAP_CLASSES), H, W) uint8 map targets of sample `i` on the config's grid, in the frame augmented by
        `lidar_aug` (4, 4): from the cached raster in training with `map_cache`, else rendered exactly; zeros when
        the sample's location has no map expansion."""
        cfg, idx = self.config, self.index
        location = str(idx.locations[i])
        if location not in self.map_locations:
            return np.zeros((len(MAP_CLASSES), cfg.grid.height, cfg.grid.width), np.uint8)
        lidar2global = idx.ego2global[i] @ idx.lidar2ego[i]
        render = self.map_rasterizer.render_cached if (cfg.train and cfg.map_cache) else self.map_rasterizer.render
        return render(location, lidar2global, lidar_aug, token=str(idx.tokens[i]))

    def _rng(self, i: int) -> np.random.Generator:
        return np.random.default_rng([self.config.seed, self._epoch, i])

    def load(self, i: int) -> Sample:
        """Load and augment sample `i` (raises DataError on bad input; no skipping)."""
        idx, cfg = self.index, self.config
        tok = str(idx.tokens[i])
        rng = self._rng(i) if cfg.train else None
        images, cam2img, img_aug = self.load_images(i, rng)
        boxes, labels, attrs = (a.copy() for a in idx.boxes_of(i))
        augment = cfg.train and cfg.bev_aug is not None
        if cfg.train and self.gt_sampler is not None and self.gt_sampler.active(self._epoch):
            # Objects are pasted in the sample's own LiDAR frame, then everything is augmented.
            points_lidar = self.load_points_lidar(i)
            points_radar = self.load_points_radar(i)
            points_lidar, boxes, labels, attrs = self.gt_sampler.paste(points_lidar, boxes, labels, attrs, rng)
            lidar_aug = sample_bev_aug(rng, cfg.bev_aug) if augment else np.eye(4)
            if augment:
                points_lidar = transform_points(points_lidar, lidar_aug)
                points_radar = transform_radar(points_radar, lidar_aug)
        else:
            # Same draws in the same order; the augmentation is composed into each sweep's transform.
            lidar_aug = sample_bev_aug(rng, cfg.bev_aug) if augment else np.eye(4)
            points_lidar = self.load_points_lidar(i, lidar_aug if augment else None)
            points_radar = self.load_points_radar(i, lidar_aug if augment else None)
        cam2lidar = idx.cam2lidar[i]
        if augment:
            boxes = transform_boxes(boxes, lidar_aug)
            cam2lidar = lidar_aug @ cam2lidar

        lidar2global = idx.ego2global[i] @ idx.lidar2ego[i]
        location = str(idx.locations[i])
        has_map = location in self.map_locations
        map_masks = self.load_map_masks(i, lidar_aug)
        map_masks_eval = None
        if cfg.eval_map_grid is not None and not cfg.train:
            eg = cfg.eval_map_grid
            map_masks_eval = torch.from_numpy(
                self.map_rasterizer.render(location, lidar2global, lidar_aug, token=tok, grid=eg) if has_map
                else np.zeros((len(MAP_CLASSES), eg.height, eg.width), np.uint8))

        meta = {
            "sample_token": tok,
            "timestamp": int(idx.timestamps[i]),
            "lidar2ego": idx.lidar2ego[i].copy(),
            "ego2global": idx.ego2global[i].copy(),
            "lidar_aug": lidar_aug,
            "location": location,
            "scene_token": "" if idx.scene_tokens is None else str(idx.scene_tokens[i]),
            "prev_token": "" if idx.prev_tokens is None else str(idx.prev_tokens[i]),
        }
        return Sample(
            images=torch.from_numpy(images),
            cam2img=torch.from_numpy(cam2img.astype(np.float32)),
            cam2lidar=torch.from_numpy(cam2lidar.astype(np.float32)),
            img_aug=torch.from_numpy(img_aug.astype(np.float32)),
            points_lidar=torch.from_numpy(np.ascontiguousarray(points_lidar, np.float32)),
            points_radar=torch.from_numpy(np.ascontiguousarray(points_radar, np.float32)),
            boxes_lidar=Boxes3D(boxes),
            labels=torch.from_numpy(np.asarray(labels, np.int64)),
            attributes=torch.from_numpy(np.asarray(attrs, np.int64)),
            map_masks=torch.from_numpy(np.ascontiguousarray(map_masks)),
            scene_tags=torch.from_numpy(idx.scene_tags[i].copy()),
            meta=meta,
            has_radar=cfg.radar_sweeps > 0 and bool(idx.radar_offsets[i + 1] > idx.radar_offsets[i]),
            has_map=has_map,
            has_scene_tags=bool(idx.has_scene_tags[i]),
            map_masks_eval=map_masks_eval,
            camera_mask=torch.from_numpy(idx.cam_paths[i] != ""),
        )
