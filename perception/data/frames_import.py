"""`import_frames`: a frames folder (perception/data/frames.py, docs/custom-data.md) as a nuScenes-format dataroot
that the stack and the devkit read: the 13 tables under `<out>/<version>/`, `<version>/splits.json`, the sensor
files under samples/ (keyframe records) and sweeps/ (the others), and maps/.

Sensor files are copied byte for byte when they are in the nuScenes format already (JPEG images; LiDAR `.bin` of
the columns x, y, z, intensity, ring with intensity_max 255) and converted otherwise:
  - PNG images -> JPEG (quality `JPEG_QUALITY`; lossy);
  - other LiDAR files -> N x 5 little-endian float32 `.pcd.bin` (x, y, z, intensity scaled to 0-255 by the format's
    intensity_max, ring; ring 0 when the format has none);
  - radar files -> the nuScenes binary PCD v0.7 `.pcd` (18 fields; the fields a file lacks get `RADAR_FILL`, which
    the devkit's default filters keep; an empty sweep is the nuScenes marker, one record with NaN coordinates).
File names keep the record's base name (with the nuScenes suffix) when it is unique in its folder, as a round trip of
`data frames` output needs; otherwise every file of that folder is named `<scene>__<sensor>__<timestamp><suffix>`.

Tokens are md5 hashes of what a record is (scene name, sensor, timestamp, ...), so the same frames give
byte-identical tables whatever the output path; a keyframe's `sample_token` is kept when given. A box without
`num_lidar_pts` / `num_radar_pts` gets them counted: the points inside it of the keyframe's reference-LiDAR record
and of its radar records (the devkit's default radar filters), as written.

Everything is written into a staging folder beside `out`, renamed into place when complete.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from pyquaternion import Quaternion

from perception.data.dataset import split_scene_names
from perception.data.frames import (
    MAPS_DIR,
    NAME_PATTERN,
    NUSCENES_LIDAR_COLUMNS,
    NUSCENES_LIDAR_INTENSITY_MAX,
    Box,
    Calibration,
    FrameSet,
    Scene,
    Sensor,
    SPLITS_FILE,
    SensorRecord,
    box_to_global,
    load_frames,
)
from perception.data.loading import RADAR_FIELDS, RADAR_PCD_DTYPE, RADAR_PCD_HEADER, read_lidar_bin, read_radar_pcd
from perception.errors import ConfigError, DataError
from perception.structures import CAMERA_CHANNELS, LIDAR_CHANNEL

TABLES: tuple[str, ...] = ("attribute", "calibrated_sensor", "category", "ego_pose", "instance", "log", "map",
                           "sample", "sample_annotation", "sample_data", "scene", "sensor", "visibility")
SPLITS_TABLE = "splits.json"  # <version>/splits.json: custom split names, read by the stack and the devkit
JPEG_QUALITY = 95  # PNG -> JPEG
# The visibility table as nuScenes has it. The frames format carries no visibility: annotations get "" (unknown).
VISIBILITY: tuple[tuple[str, str, str], ...] = (
    ("1", "v0-40", "visibility of whole object is between 0 and 40%"),
    ("2", "v40-60", "visibility of whole object is between 40 and 60%"),
    ("3", "v60-80", "visibility of whole object is between 60 and 80%"),
    ("4", "v80-100", "visibility of whole object is between 80 and 100%"),
)
# The semantic-prior PNG of each nuScenes map, by the name the devkit's map_expansion/bitmap.py looks it up with.
NUSCENES_PRIOR_PNG: dict[str, str] = {
    "singapore-onenorth": "53992ee3023e5494b90c316c183be829.png",
    "singapore-hollandvillage": "37819e65e09e5547b8a3ceaefba56bb2.png",
    "singapore-queenstown": "93406b464a165eaba6d9de76ca09f5da.png",
    "boston-seaport": "36092f0b03a857c6a3403e25b4b7aab3.png",
}
BLANK_MAP_SIZE = 16  # pixels per side of the blank semantic prior written for a location without one
# Values of the nuScenes radar fields that a radar file's columns lack: kept by the devkit's default filters
# (invalid_state 0: valid; dyn_prop 4: unknown, in 0..6; ambig_state 3: unambiguous), zero otherwise ("id" is the
# row number). vx, vy (not ego-motion compensated) are unknown and 0; the stack reads vx_comp, vy_comp.
RADAR_FILL: dict[str, float] = {"dyn_prop": 4.0, "is_quality_valid": 1.0, "ambig_state": 3.0, "invalid_state": 0.0}
_RADAR_FLOAT_FIELDS = tuple(n for n in RADAR_FIELDS if RADAR_PCD_DTYPE[n].kind == "f")
_SUFFIX = {"camera": ".jpg", "lidar": ".pcd.bin", "radar": ".pcd"}
_FILEFORMAT = {"camera": "jpg", "lidar": "pcd", "radar": "pcd"}


@dataclass(frozen=True)
class ImportSummary:
    """What `import_frames` wrote. converted_*: files converted (the others were copied byte for byte).
    counted_boxes: boxes whose num_lidar_pts / num_radar_pts were counted. map_expansions: locations whose
    maps/expansion/<location>.json the dataroot holds; blank_maps: locations given a blank semantic prior.
    missing_stack_sensors: the sensors the stack needs (six nuScenes cameras and LIDAR_TOP) that the rig lacks."""

    scenes: int
    samples: int
    sample_data: int
    annotations: int
    converted_images: int
    converted_lidar: int
    converted_radar: int
    counted_boxes: int
    splits: tuple[str, ...]
    map_expansions: tuple[str, ...]
    blank_maps: tuple[str, ...]
    missing_stack_sensors: tuple[str, ...]


def _token(*parts: Any) -> str:
    """A deterministic 32-hex token of what a record is."""
    return hashlib.md5("/".join(["frames-import", *map(str, parts)]).encode()).hexdigest()


# ------------------------------------------------------------------------------------------------- sensor files


def _strip(name: str, suffixes: tuple[str, ...]) -> str:
    """`name` without the first of `suffixes` (case-insensitive) that ends it."""
    for s in suffixes:
        if name.lower().endswith(s):
            return name[: -len(s)]
    return name


def _nuscenes_name(rec: SensorRecord, modality: str) -> str:
    """The record's file base name with its nuScenes suffix (.jpg/.jpeg kept; .png -> .jpg; .pcd.bin; .pcd)."""
    name = rec.file.name
    if modality == "camera":
        return name if name.lower().endswith((".jpg", ".jpeg")) else _strip(name, (".png",)) + ".jpg"
    return _strip(name, (".pcd.bin", ".bin", ".pcd.npy", ".npy")) + _SUFFIX[modality]


def _is_nuscenes_lidar(rec: SensorRecord, sensor: Sensor) -> bool:
    fmt = sensor.points
    return (rec.file.suffix.lower() == ".bin" and fmt is not None and fmt.columns == NUSCENES_LIDAR_COLUMNS
            and fmt.intensity_max == NUSCENES_LIDAR_INTENSITY_MAX)


def _read_points(rec: SensorRecord, sensor: Sensor) -> np.ndarray:
    """(N, K) float32 rows of a LiDAR or radar file, K its format's columns (validated by `load_frames`)."""
    assert sensor.points is not None
    K = sensor.points.floats_per_point
    try:
        if rec.file.suffix.lower() == ".npy":
            points = np.load(rec.file, allow_pickle=False)
        else:
            points = np.fromfile(rec.file, dtype="<f4")
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read points ({getattr(exc, 'strerror', None) or exc})", path=rec.file) from None
    points = np.asarray(points, np.float32).reshape(-1, K)
    if not np.isfinite(points).all():
        bad = int((~np.isfinite(points).all(axis=1)).sum())
        raise DataError(f"{bad} points have NaN or inf values", path=rec.file)
    return points


def _lidar_bin(points: np.ndarray, sensor: Sensor) -> np.ndarray:
    """(N, 5) little-endian float32 nuScenes LiDAR rows (x, y, z, intensity 0-255, ring) of `points` (N, K) in the
    sensor's point format (metres, sensor frame; intensity over [0, intensity_max]; ring 0 when absent)."""
    fmt = sensor.points
    assert fmt is not None and fmt.intensity_max is not None
    out = np.zeros((len(points), 5), "<f4")
    for j, name in enumerate(("x", "y", "z")):
        out[:, j] = points[:, fmt.column(name)]
    scale = NUSCENES_LIDAR_INTENSITY_MAX / fmt.intensity_max
    out[:, 3] = (points[:, fmt.column("intensity")].astype(np.float64) * scale).astype(np.float32)
    if "ring" in fmt.columns:
        out[:, 4] = points[:, fmt.column("ring")]
    return out


def radar_pcd_bytes(points: np.ndarray, columns: tuple[str, ...]) -> bytes:
    """A radar sweep as the bytes of a nuScenes binary PCD v0.7 file: the 11-line header, N packed 43-byte records
    (`RADAR_FIELDS` order) and one trailing newline (the devkit's reader needs a byte after the last record).

    points: (N, len(columns)) float32 in the radar frame (x, y, z m; rcs dBsm; velocities m/s); columns: their names.
    Fields not in `columns` get `RADAR_FILL` (0 when not listed; "id" the row number); integer fields are rounded
    and clipped to their type. N = 0 gives the nuScenes empty-sweep marker: one record with NaN float fields.
    """
    n = len(points)
    if n == 0:
        rec = np.zeros(1, RADAR_PCD_DTYPE)
        for name in _RADAR_FLOAT_FIELDS:
            rec[name] = np.nan
    else:
        rec = np.zeros(n, RADAR_PCD_DTYPE)
        for name in RADAR_FIELDS:
            if name in columns:
                values = points[:, columns.index(name)].astype(np.float64)
            elif name == "id":
                values = np.arange(n, dtype=np.float64)
            else:
                values = np.full(n, RADAR_FILL.get(name, 0.0))
            kind = RADAR_PCD_DTYPE[name]
            if kind.kind == "i":
                info = np.iinfo(kind)
                values = np.clip(np.round(values), info.min, info.max)
            rec[name] = values
    return RADAR_PCD_HEADER.format(n=len(rec)).encode("ascii") + rec.tobytes() + b"\n"


def _write_sensor_file(rec: SensorRecord, sensor: Sensor, dst: Path) -> bool:
    """Write `rec`'s file at `dst` in the nuScenes format; True when it was converted, False when copied."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if sensor.modality == "camera":
        if rec.file.suffix.lower() in (".jpg", ".jpeg"):
            shutil.copyfile(rec.file, dst)
            return False
        bgr = cv2.imread(str(rec.file), cv2.IMREAD_COLOR)  # gray, alpha and 16-bit PNGs become 8-bit BGR
        if bgr is None:
            raise DataError("cannot decode the PNG image", path=rec.file)
        ok, jpeg = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
        if not ok:
            raise DataError("cannot encode the image as JPEG", path=rec.file)
        dst.write_bytes(jpeg.tobytes())
        return True
    if sensor.modality == "lidar":
        if _is_nuscenes_lidar(rec, sensor):
            shutil.copyfile(rec.file, dst)
            return False
        _lidar_bin(_read_points(rec, sensor), sensor).tofile(dst)
        return True
    assert sensor.points is not None
    dst.write_bytes(radar_pcd_bytes(_read_points(rec, sensor), sensor.points.columns))
    return True


def _file_names(fs: FrameSet) -> dict[tuple[str, int, str], str]:
    """{(scene, frame index, sensor): path relative to the dataroot} of every record: samples/<sensor>/ for a
    keyframe's records, sweeps/<sensor>/ for the others; the base name kept where it is unique in its folder
    (module docstring)."""
    modality = {s.name: s.modality for s in fs.rig.sensors}
    folders: dict[str, list[tuple[tuple[str, int, str], str, str]]] = {}
    for scene in fs.scenes:
        for frame in scene.frames:
            for name, rec in frame.records.items():
                folder = f"{'samples' if frame.keyframe else 'sweeps'}/{name}"
                fallback = f"{scene.name}__{name}__{rec.timestamp}{_SUFFIX[modality[name]]}"
                folders.setdefault(folder, []).append(((scene.name, frame.index, name),
                                                       _nuscenes_name(rec, modality[name]), fallback))
    out = {}
    for folder, entries in folders.items():
        unique = len({base for _, base, _ in entries}) == len(entries)
        for key, base, fallback in entries:
            out[key] = f"{folder}/{base if unique else fallback}"
    return out


# ------------------------------------------------------------------------------------------------ annotations


def count_points_in_box(points_global: np.ndarray, box_global: Box) -> int:
    """How many of `points_global` (N, 3) float64, global frame, metres, lie inside `box_global` (global frame;
    size w, l, h with l along the box's x), boundary included (as the devkit's `points_in_box`)."""
    if not len(points_global):
        return 0
    q = np.asarray(box_global.rotation, np.float64)
    R = Quaternion(q / np.linalg.norm(q)).rotation_matrix  # box -> global
    local = (points_global - np.asarray(box_global.center, np.float64)) @ R  # rows: R^T (p - c), box frame
    w, l, h = box_global.size
    inside = (np.abs(local[:, 0]) <= l / 2) & (np.abs(local[:, 1]) <= w / 2) & (np.abs(local[:, 2]) <= h / 2)
    return int(inside.sum())


def _points_global(out: Path, rel: str, rec: SensorRecord, modality: str) -> np.ndarray:
    """(N, 3) float64 global-frame points of a written LiDAR (every point) or radar file (devkit default filters)."""
    try:
        if modality == "lidar":
            points_sensor = read_lidar_bin(out / rel)[:, :3]
        else:
            points_sensor = read_radar_pcd(out / rel, columns=("x", "y", "z"))
    except DataError as exc:
        raise DataError(exc.what, path=rec.file) from None
    T = rec.sensor2global()
    return points_sensor.astype(np.float64) @ T[:3, :3].T + T[:3, 3]


# ------------------------------------------------------------------------------------------------------ tables


def _calibration_key(sensor: str, c: Calibration) -> tuple:
    return (sensor, c.sensor2ego.translation, c.sensor2ego.rotation, c.intrinsics)


def _nearest(timestamps: list[int], t: int) -> int:
    """Index of the entry of the sorted `timestamps` nearest to `t` (the earlier one on a tie)."""
    i = bisect.bisect_left(timestamps, t)
    if i == 0:
        return 0
    if i == len(timestamps):
        return len(timestamps) - 1
    return i - 1 if t - timestamps[i - 1] <= timestamps[i] - t else i


def _sample_tokens(scene: Scene) -> list[str]:
    return [f.sample_token if f.sample_token is not None else _token("sample", scene.name, f.index)
            for f in scene.keyframes]


class _Tables:
    """The rows of the 13 tables as they are built (each list in its final, deterministic order)."""

    def __init__(self) -> None:
        self.rows: dict[str, list[dict]] = {t: [] for t in TABLES}
        self.calibrated: dict[tuple, str] = {}

    def calibrated_sensor(self, sensor: Sensor, c: Calibration) -> str:
        key = _calibration_key(sensor.name, c)
        if key not in self.calibrated:
            tok = _token("calibrated_sensor", json.dumps(key))
            self.calibrated[key] = tok
            self.rows["calibrated_sensor"].append({
                "token": tok,
                "sensor_token": _token("sensor", sensor.name),
                "translation": list(c.sensor2ego.translation),
                "rotation": list(c.sensor2ego.rotation),
                "camera_intrinsic": [list(r) for r in c.intrinsics] if c.intrinsics is not None else [],
            })
        return self.calibrated[key]


def _scene_rows(t: _Tables, fs: FrameSet, scene: Scene, out: Path, names: dict[tuple[str, int, str], str],
                converted: dict[str, int]) -> tuple[int, int]:
    """Write one scene's sensor files and add its rows (log, scene, sample, sample_data, ego_pose, instance,
    sample_annotation). Returns (annotations, boxes whose points were counted)."""
    sensors = {s.name: s for s in fs.rig.sensors}
    log_token, scene_token = _token("log", scene.name), _token("scene", scene.name)
    t.rows["log"].append({"token": log_token, "logfile": scene.logfile or scene.name, "vehicle": scene.vehicle,
                          "date_captured": scene.date_captured, "location": scene.location})
    keyframes = scene.keyframes
    sample_tokens = _sample_tokens(scene)
    sample_times = [f.records[fs.rig.reference_lidar].timestamp for f in keyframes]
    t.rows["scene"].append({"token": scene_token, "log_token": log_token, "nbr_samples": len(keyframes),
                            "first_sample_token": sample_tokens[0], "last_sample_token": sample_tokens[-1],
                            "name": scene.name, "description": scene.description})
    for k, tok in enumerate(sample_tokens):
        t.rows["sample"].append({"token": tok, "timestamp": sample_times[k],
                                 "prev": sample_tokens[k - 1] if k else "",
                                 "next": sample_tokens[k + 1] if k + 1 < len(sample_tokens) else "",
                                 "scene_token": scene_token})

    # sample_data and ego_pose: one per record; prev/next per sensor in frame order. A keyframe's records belong to
    # its sample; a sweep to the sample nearest in time (as nuScenes links them).
    key_of_frame = {f.index: sample_tokens[k] for k, f in enumerate(keyframes)}
    per_sensor: dict[str, list[dict]] = {}
    for frame in scene.frames:
        for name, rec in frame.records.items():
            sensor = sensors[name]
            rel = names[(scene.name, frame.index, name)]
            if _write_sensor_file(rec, sensor, out / rel):
                converted[sensor.modality] += 1
            sd_token = _token("sample_data", scene.name, name, rec.timestamp)
            sample_token = (key_of_frame[frame.index] if frame.keyframe
                            else sample_tokens[_nearest(sample_times, rec.timestamp)])
            width, height = rec.image_size if rec.image_size is not None else (0, 0)
            per_sensor.setdefault(name, []).append({
                "token": sd_token,
                "sample_token": sample_token,
                "ego_pose_token": sd_token,
                "calibrated_sensor_token": t.calibrated_sensor(sensor, rec.calibration),
                "timestamp": rec.timestamp,
                "fileformat": _FILEFORMAT[sensor.modality],
                "is_key_frame": frame.keyframe,
                "height": height,
                "width": width,
                "filename": rel,
                "prev": "",
                "next": "",
            })
            t.rows["ego_pose"].append({"token": sd_token, "timestamp": rec.timestamp,
                                       "rotation": list(rec.ego2global.rotation),
                                       "translation": list(rec.ego2global.translation)})
    for name in sensors:  # rig order
        rows = per_sensor.get(name, [])
        for n, row in enumerate(rows):
            row["prev"] = rows[n - 1]["token"] if n else ""
            row["next"] = rows[n + 1]["token"] if n + 1 < len(rows) else ""
        t.rows["sample_data"] += rows

    # Annotations in the global frame, in keyframe and box order; one instance per track (per box without one);
    # prev/next per instance.
    annotations: list[dict] = []
    per_instance: dict[str, list[dict]] = {}
    category_of: dict[str, str] = {}
    counted = 0
    for k, frame in enumerate(keyframes):
        lidar_global: np.ndarray | None = None
        radar_global: np.ndarray | None = None
        for b, box in enumerate(frame.boxes):
            g = box_to_global(box, frame, fs.rig)
            num_lidar, num_radar = g.num_lidar_pts, g.num_radar_pts
            if num_lidar is None:
                if lidar_global is None:
                    ref = fs.rig.reference_lidar
                    lidar_global = _points_global(out, names[(scene.name, frame.index, ref)], frame.records[ref],
                                                  "lidar")
                num_lidar = count_points_in_box(lidar_global, g)
            if num_radar is None:
                if radar_global is None:
                    parts = [_points_global(out, names[(scene.name, frame.index, r)], frame.records[r], "radar")
                             for r in fs.rig.radars if r in frame.records]
                    radar_global = np.concatenate(parts) if parts else np.zeros((0, 3))
                num_radar = count_points_in_box(radar_global, g)
            counted += int(g.num_lidar_pts is None or g.num_radar_pts is None)
            instance = (_token("instance", scene.name, "track", g.track_id) if g.track_id is not None
                        else _token("instance", scene.name, "box", frame.index, b))
            category_of.setdefault(instance, g.category)
            row = {
                "token": _token("sample_annotation", scene.name, frame.index, b),
                "sample_token": sample_tokens[k],
                "instance_token": instance,
                "visibility_token": "",
                "attribute_tokens": [_token("attribute", g.attribute)] if g.attribute is not None else [],
                "translation": list(g.center),
                "size": list(g.size),
                "rotation": list(g.rotation),
                "prev": "",
                "next": "",
                "num_lidar_pts": int(num_lidar),
                "num_radar_pts": int(num_radar),
            }
            annotations.append(row)
            per_instance.setdefault(instance, []).append(row)
    for instance, recs in per_instance.items():  # in order of first appearance
        for n, r in enumerate(recs):
            r["prev"] = recs[n - 1]["token"] if n else ""
            r["next"] = recs[n + 1]["token"] if n + 1 < len(recs) else ""
        t.rows["instance"].append({"token": instance, "category_token": _token("category", category_of[instance]),
                                   "nbr_annotations": len(recs), "first_annotation_token": recs[0]["token"],
                                   "last_annotation_token": recs[-1]["token"]})
    t.rows["sample_annotation"] += annotations
    return len(annotations), counted


def _prior_png(maps_dir: Path, location: str) -> str | None:
    """The semantic-prior PNG of `location` in the dataroot's maps/ (a name relative to it): the devkit's name for a
    nuScenes map, else `<location>.png`; None when neither is there."""
    candidates = [NUSCENES_PRIOR_PNG.get(location), f"{location}.png" if NAME_PATTERN.match(location) else None]
    return next((c for c in candidates if c is not None and (maps_dir / c).is_file()), None)


def _map_rows(fs: FrameSet, root: Path) -> tuple[list[dict], tuple[str, ...], tuple[str, ...]]:
    """The map table (one record per location, every log listed; its PNG under root/maps/, a blank one written
    where the frames' maps/ has none) and the locations with a map expansion and with a blank prior."""
    logs: dict[str, list[str]] = {}
    for scene in fs.scenes:
        logs.setdefault(scene.location, []).append(_token("log", scene.name))
    maps_dir = root / MAPS_DIR
    rows, expansions, blanks = [], [], []
    for location in sorted(logs):
        png = _prior_png(maps_dir, location)
        if png is None:
            png = f"{_token('map', location)}.png"
            maps_dir.mkdir(parents=True, exist_ok=True)
            ok, data = cv2.imencode(".png", np.zeros((BLANK_MAP_SIZE, BLANK_MAP_SIZE), np.uint8))
            assert ok
            (maps_dir / png).write_bytes(data.tobytes())
            blanks.append(location)
        if location and (maps_dir / "expansion" / f"{location}.json").is_file():
            expansions.append(location)
        rows.append({"token": _token("map", location), "log_tokens": logs[location], "category": "semantic_prior",
                     "filename": f"{MAPS_DIR}/{png}"})
    return rows, tuple(expansions), tuple(blanks)


def _check_split_names(fs: FrameSet, version: str, root: Path) -> None:
    """Raise DataError unless every split resolves to its own scenes in the dataroot at `root` (whose
    <version>/splits.json is written): the stack and the devkit's evaluation look a devkit split name (train, val,
    mini_val, ...) up in the devkit's lists first, and read "all" as every scene."""
    names = {s.name for s in fs.scenes}
    where = fs.root / SPLITS_FILE
    for split, scenes in fs.splits.items():
        try:
            members = split_scene_names(version, split, root)
        except ConfigError:
            raise DataError(f"{split}: this devkit split name needs a mini --version (got {version!r}): rename the "
                            "split or import with --version v1.0-mini", path=where) from None
        resolved = names if members is None else members & names
        if resolved != set(scenes):
            what = "means every scene" if members is None else "is a devkit split name"
            raise DataError(f"{split}: this name {what}, which the stack and the devkit's evaluation read instead of "
                            f"splits.json ({len(resolved)} scenes here, the split lists {len(scenes)}): rename the "
                            f"split, e.g. 'my_{split}'", path=where)


def _write_json(path: Path, value: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=0) + "\n")


def import_frames(frames_dir: str | Path, out: str | Path, version: str = "v1.0-trainval") -> ImportSummary:
    """Write the frames folder `frames_dir` (validated by `load_frames`) as a nuScenes-format dataroot at `out`.

    Writes `out/<version>/` (the 13 tables and splits.json, the frames' splits), `out/samples/<sensor>/` and
    `out/sweeps/<sensor>/` (the sensor files: module docstring) and `out/maps/` (the frames' maps/ copied when
    present; a blank 16 x 16 semantic-prior PNG for each location it has none for). Tables: sensor (rig order;
    channel = sensor name), calibrated_sensor (one per distinct value), ego_pose and sample_data (one per record),
    sample (one per keyframe; the timestamp of its reference-LiDAR record), scene and log (one each per scene, from
    scenes.json; logfile defaults to the scene name), category and attribute (the boxes' names), visibility (the
    nuScenes levels; annotations get ""), instance (one per scene and track id, else per box), sample_annotation
    (boxes in the global frame; a box's velocity is not stored: the devkit derives it from the positions), map.

    Raises: DataError (one line) for a frames folder `load_frames` rejects, a non-empty `out`, a split whose name
    the devkit reads as its own list, an unreadable sensor file or a failed write; ConfigError for a bad version.
    """
    frames_dir, out = Path(frames_dir), Path(out)
    if not NAME_PATTERN.match(version):
        raise ConfigError(f"--version must be a folder name of letters, digits, '.', '_' or '-', got {version!r}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError("output folder exists and is not empty", path=out)
    fs = load_frames(frames_dir)
    staging = out.parent / f".{out.name}.partial"
    if staging.exists():
        shutil.rmtree(staging)
    table_dir = staging / version
    try:
        table_dir.mkdir(parents=True)
        _write_json(table_dir / SPLITS_TABLE, {split: list(scenes) for split, scenes in fs.splits.items()})
        _check_split_names(fs, version, staging)
        if (fs.root / MAPS_DIR).is_dir():
            shutil.copytree(fs.root / MAPS_DIR, staging / MAPS_DIR)
        t = _Tables()
        names = _file_names(fs)
        converted = {"camera": 0, "lidar": 0, "radar": 0}
        annotations = counted = 0
        for scene in fs.scenes:
            a, c = _scene_rows(t, fs, scene, staging, names, converted)
            annotations, counted = annotations + a, counted + c
        boxes = [b for scene in fs.scenes for f in scene.keyframes for b in f.boxes]
        t.rows["sensor"] = [{"token": _token("sensor", s.name), "channel": s.name, "modality": s.modality}
                            for s in fs.rig.sensors]
        t.rows["category"] = [{"token": _token("category", c), "name": c, "description": ""}
                              for c in sorted({b.category for b in boxes})]
        t.rows["attribute"] = [{"token": _token("attribute", a), "name": a, "description": ""}
                               for a in sorted({b.attribute for b in boxes if b.attribute is not None})]
        t.rows["visibility"] = [{"token": tok, "level": level, "description": d} for tok, level, d in VISIBILITY]
        t.rows["map"], expansions, blanks = _map_rows(fs, staging)
        for name in TABLES:
            _write_json(table_dir / f"{name}.json", t.rows[name])
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise DataError(f"cannot copy or write a file ({exc.strerror or exc})",
                        path=exc.filename or staging) from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if out.exists():
        out.rmdir()
    staging.rename(out)
    present = {s.name for s in fs.rig.sensors}
    return ImportSummary(
        scenes=len(fs.scenes), samples=len(t.rows["sample"]), sample_data=len(t.rows["sample_data"]),
        annotations=annotations, converted_images=converted["camera"], converted_lidar=converted["lidar"],
        converted_radar=converted["radar"], counted_boxes=counted, splits=tuple(fs.splits),
        map_expansions=expansions, blank_maps=blanks,
        missing_stack_sensors=tuple(s for s in CAMERA_CHANNELS + (LIDAR_CHANNEL,) if s not in present))
