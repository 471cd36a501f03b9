"""`export_frames`: a nuScenes-format dataroot's split as a frames folder (perception/data/frames.py,
docs/custom-data.md), read through the devkit tables.

Every sample_data record of the exported scenes becomes one record (keyframes and sweeps). Camera images and LiDAR
`.pcd.bin` files are copied byte for byte; radar `.pcd` files become `.npy` of all 18 nuScenes radar fields
(every return, no filtering). Boxes are the sample_annotation records as written: global frame, the category name
of the tables, the instance token as track id. The scenes' map files (semantic-prior PNGs, map expansions) are copied
to maps/, which `data import` passes through.

Frames of a scene: each keyframe (sample) is one frame; the sweeps of a channel between two of its keyframe
records fill the frames just before the later keyframe, the latest sweep in the frame right before it (sweeps
after the scene's last keyframe fill frames after it, in order). So a channel's records keep their time order
along the frames, and a frame holds at most one record per channel.
"""

from __future__ import annotations

import bisect
import json
import shutil
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from perception.data.dataset import read_tables, split_scene_names
from perception.data.frames import (
    FRAMES_DIR,
    GLOBAL_FRAME,
    MAPS_DIR,
    MODALITIES,
    NUSCENES_LIDAR_COLUMNS,
    NUSCENES_LIDAR_INTENSITY_MAX,
    NUSCENES_RADAR_COLUMNS,
    RIG_FILE,
    SCENES_FILE,
    SPLITS_FILE,
)
from perception.data.loading import read_radar_pcd
from perception.errors import ConfigError, DataError
from perception.structures import CAMERA_CHANNELS, LIDAR_CHANNEL, RADAR_CHANNELS

# Every int8 state: the radar export keeps all returns (the devkit's default filters are left to the reader).
_ALL_STATES = tuple(range(-128, 128))
# Split names tried for each scene when exporting every scene, besides <version>/splits.json's.
_MINI_SPLITS = ("mini_train", "mini_val")
_FULL_SPLITS = ("train", "val", "test")
UNASSIGNED_SPLIT = "unassigned"


@dataclass(frozen=True)
class ExportSummary:
    """What `export_frames` wrote: counts over all exported scenes."""

    scenes: int
    frames: int
    keyframes: int
    records: int
    boxes: int
    map_files: int = 0


def _calibration_json(cs: dict, modality: str) -> dict:
    out: dict[str, Any] = {"translation": list(cs["translation"]), "rotation": list(cs["rotation"])}
    if modality == "camera":
        out["intrinsics"] = [list(row) for row in cs["camera_intrinsic"]]
    return out


def _frozen(value: Any) -> Any:
    """A hashable copy of a JSON value (to compare calibrations by value)."""
    if isinstance(value, dict):
        return tuple(sorted((k, _frozen(v)) for k, v in value.items()))
    if isinstance(value, list):
        return tuple(_frozen(v) for v in value)
    return value


def _sensor_order(sensor: dict) -> tuple:
    """Cameras, LiDARs, radars; within each, the nuScenes channel order, then other names alphabetically."""
    preset = {"camera": CAMERA_CHANNELS, "lidar": (LIDAR_CHANNEL,), "radar": RADAR_CHANNELS}[sensor["modality"]]
    channel = sensor["channel"]
    return (MODALITIES.index(sensor["modality"]), preset.index(channel) if channel in preset else len(preset), channel)


def _scene_samples(nusc, scene: dict) -> list[dict]:
    out, token = [], scene["first_sample_token"]
    while token:
        sample = nusc.get("sample", token)
        out.append(sample)
        token = sample["next"]
    return out


def _scene_frames(samples: list[dict], by_channel: dict[str, list[dict]],
                  scene_name: str) -> list[tuple[dict | None, dict[str, dict]]]:
    """The frames of one scene in order, each (its sample or None, {channel: sample_data record}); `samples` in
    scene order, `by_channel` the scene's records per channel in time order (the grouping: module docstring)."""
    K = len(samples)
    by_token = {r["token"]: r for records in by_channel.values() for r in records}
    segments: list[dict[str, list[dict]]] = [defaultdict(list) for _ in range(K + 1)]
    for channel, records in by_channel.items():
        key_tokens = {s["data"][channel] for s in samples if channel in s["data"]}
        # Where this channel's keyframes split its sweeps: its own keyframe record's time, else the sample's.
        bounds = [by_token[s["data"][channel]]["timestamp"] if channel in s["data"] else s["timestamp"]
                  for s in samples]
        if any(b >= c for b, c in zip(bounds, bounds[1:])):
            raise DataError(f"scene {scene_name}: {channel} keyframe timestamps do not increase")
        for r in records:
            if r["token"] not in key_tokens:
                segments[bisect.bisect_right(bounds, r["timestamp"])][channel].append(r)
    frames: list[tuple[dict | None, dict[str, dict]]] = []
    for k in range(K + 1):
        depth = max((len(v) for v in segments[k].values()), default=0)
        sweeps: list[dict[str, dict]] = [{} for _ in range(depth)]
        for channel, records in segments[k].items():
            first = depth - len(records) if k < K else 0  # before a keyframe: aligned to it; after the last: from it
            for j, r in enumerate(records):
                sweeps[first + j][channel] = r
        frames.extend((None, s) for s in sweeps)
        if k < K:
            sample = samples[k]
            frames.append((sample, {ch: by_token[tok] for ch, tok in sample["data"].items()}))
    return frames


def _box_json(nusc, ann: dict, attr_name: dict[str, str]) -> dict:
    if len(ann["attribute_tokens"]) > 1:
        raise DataError(f"sample_annotation {ann['token']} has {len(ann['attribute_tokens'])} attributes; the frames "
                        "format holds at most one")
    box: dict[str, Any] = {
        "category": ann["category_name"],
        "frame": GLOBAL_FRAME,
        "center": list(ann["translation"]),
        "size": list(ann["size"]),
        "rotation": list(ann["rotation"]),
    }
    velocity_global = nusc.box_velocity(ann["token"])
    if np.isfinite(velocity_global[:2]).all():
        box["velocity"] = [float(velocity_global[0]), float(velocity_global[1])]
    box["track_id"] = ann["instance_token"]
    if ann["attribute_tokens"]:
        box["attribute"] = attr_name[ann["attribute_tokens"][0]]
    box["num_lidar_pts"] = int(ann["num_lidar_pts"])
    box["num_radar_pts"] = int(ann["num_radar_pts"])
    return box


def _has_dict(value: Any) -> bool:
    return isinstance(value, dict) and bool(value) or isinstance(value, list) and any(_has_dict(v) for v in value)


def _dumps(value: Any, level: int = 0) -> str:
    """JSON with an object or list that holds no object on one line (a box, a pose, a 3x3 matrix), others indented."""
    children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
    if not any(_has_dict(v) for v in children):
        return json.dumps(value)
    pad = " " * (level + 1)
    if isinstance(value, dict):
        body = ",\n".join(f"{pad}{json.dumps(k)}: {_dumps(v, level + 1)}" for k, v in value.items())
        return "{\n" + body + "\n" + " " * level + "}"
    return "[\n" + ",\n".join(pad + _dumps(v, level + 1) for v in value) + "\n" + " " * level + "]"


def _write_json(path: Path, value: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(_dumps(value) + "\n")


def _split_names(version: str, split: str | None, dataroot: Path, scene_names: list[str]) -> dict[str, list[str]]:
    """splits.json of the export: the one split asked for; for every scene, the version's standard splits and the
    dataroot's custom ones that hold exported scenes, and UNASSIGNED_SPLIT for scenes in none."""
    if split not in (None, "all"):
        return {split: scene_names}
    names = list(_MINI_SPLITS if version.endswith("mini") else _FULL_SPLITS)
    custom = dataroot / version / "splits.json"
    if custom.exists():
        names += [n for n in json.loads(custom.read_text()) if n not in names]
    out: dict[str, list[str]] = {}
    for name in names:
        try:
            members = split_scene_names(version, name, dataroot) or set()
        except ConfigError:  # a split this version cannot have (a mini split of a full version): skipped
            continue
        kept = [s for s in scene_names if s in members]
        if kept:
            out[name] = kept
    rest = [s for s in scene_names if not any(s in v for v in out.values())]
    if rest:
        out[UNASSIGNED_SPLIT] = rest
    return out


def _copy_maps(dataroot: Path, nusc, scenes: list[dict], out: Path) -> int:
    """Copy the map files of the exported scenes from <dataroot>/maps/ to <out>/maps/, keeping their names: the
    semantic-prior PNG of each map record that lists one of their logs, and expansion/<location>.json and
    basemap/<location>.png of their locations where present. Returns how many files were copied."""
    logs = {s["log_token"] for s in scenes}
    locations = sorted({nusc.get("log", t)["location"] for t in logs} - {""})
    rels = [m["filename"] for m in nusc.map
            if logs & set(m.get("log_tokens", [])) and m.get("filename", "").startswith(f"{MAPS_DIR}/")]
    rels += [f"{MAPS_DIR}/{sub}/{loc}{ext}" for loc in locations for sub, ext in (("expansion", ".json"),
                                                                                ("basemap", ".png"))]
    n = 0
    for rel in dict.fromkeys(rels):
        src = dataroot / rel
        if src.is_file():
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            try:
                shutil.copyfile(src, out / rel)
            except OSError as exc:
                raise DataError(f"cannot copy map file ({exc.strerror or exc})", path=src) from None
            n += 1
    return n


def export_frames(dataroot: str | Path, version: str, split: str | None, out: str | Path, *, nusc=None,
                  maps: bool = True) -> ExportSummary:
    """Write the scenes of `split` (None or "all": every scene) of the nuScenes-format dataroot as a frames folder.

    Args:
        dataroot, version: the tables (`read_tables`); `nusc`: those tables already read (the devkit `NuScenes`).
        split: a devkit split or one of <dataroot>/<version>/splits.json.
        out: the folder to write; it must not exist or be empty.
        maps: also copy the scenes' map files to maps/ (`_copy_maps`), which `import_frames` passes through.

    Writes rig.json (every sensor of the sensor table; a calibration or image size only where one value holds for
    all exported records), scenes.json (log fields; a scene's calibration where one value holds for the scene and
    differs from the rig's), splits.json, frames/<scene>/<n:06d>.json and sensors/<scene>/<channel>/<file>.
    Raises DataError for a missing or unreadable sensor file or an inconsistent table, ConfigError for an unknown
    split.
    """
    dataroot, out = Path(dataroot), Path(out)
    wanted = split_scene_names(version, split, dataroot)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError("output folder exists and is not empty", path=out)
    nusc = nusc if nusc is not None else read_tables(dataroot, version)
    scenes = [s for s in nusc.scene if wanted is None or s["name"] in wanted]
    if not scenes:
        raise DataError(f"split {split!r} names no scene of the {version} tables", path=dataroot)
    sensors = sorted(({"channel": s["channel"], "modality": s["modality"]} for s in nusc.sensor), key=_sensor_order)
    modality_of = {s["channel"]: s["modality"] for s in sensors}
    attr_name = {a["token"]: a["name"] for a in nusc.attribute}

    # The scenes' sample_data records per channel, in time order.
    scene_of_sample = {}
    for scene in scenes:
        for sample in _scene_samples(nusc, scene):
            scene_of_sample[sample["token"]] = scene["token"]
    records: dict[str, dict[str, list[dict]]] = {s["token"]: defaultdict(list) for s in scenes}
    for sd in nusc.sample_data:
        if sd["sample_token"] in scene_of_sample:
            records[scene_of_sample[sd["sample_token"]]][sd["channel"]].append(sd)
    for by_channel in records.values():
        for recs in by_channel.values():
            recs.sort(key=lambda r: r["timestamp"])

    # Calibration levels: the rig's where one value holds everywhere, a scene's where one holds in it, else per record.
    calib_of: dict[str, dict] = {}  # calibrated_sensor token -> its JSON
    per_scene: dict[str, dict[str, set]] = {s["token"]: defaultdict(set) for s in scenes}
    sizes: dict[str, set] = defaultdict(set)
    for scene_token, by_channel in records.items():
        for channel, recs in by_channel.items():
            for sd in recs:
                tok = sd["calibrated_sensor_token"]
                if tok not in calib_of:
                    calib_of[tok] = _calibration_json(nusc.get("calibrated_sensor", tok), modality_of[channel])
                per_scene[scene_token][channel].add(_frozen(calib_of[tok]))
                if modality_of[channel] == "camera":
                    sizes[channel].add((sd["width"], sd["height"]))
    calib_by_value = {_frozen(c): c for c in calib_of.values()}
    rig_calib: dict[str, Any] = {}
    for channel in modality_of:
        values = set().union(*(per_scene[s["token"]].get(channel, set()) for s in scenes))
        if len(values) == 1:
            rig_calib[channel] = next(iter(values))

    rig_sensors = []
    for s in sensors:
        entry: dict[str, Any] = {"name": s["channel"], "modality": s["modality"]}
        if s["modality"] == "camera" and len(sizes[s["channel"]]) == 1 and min(next(iter(sizes[s["channel"]]))) > 0:
            entry["image_size"] = list(next(iter(sizes[s["channel"]])))
        if s["modality"] == "lidar":
            entry["points"] = {"columns": list(NUSCENES_LIDAR_COLUMNS), "intensity_max": NUSCENES_LIDAR_INTENSITY_MAX}
        if s["modality"] == "radar":
            entry["points"] = {"columns": list(NUSCENES_RADAR_COLUMNS)}
        if s["channel"] in rig_calib:
            entry["calibration"] = calib_by_value[rig_calib[s["channel"]]]
        rig_sensors.append(entry)

    # Written into a staging folder beside `out`, renamed when complete: a failed export leaves no partial folder.
    staging = out.parent / f".{out.name}.partial"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    try:
        _write_json(staging / RIG_FILE, {"sensors": rig_sensors})
        scene_meta: dict[str, dict] = {}
        n_frames = n_keyframes = n_records = n_boxes = 0
        for scene in scenes:
            name = scene["name"]
            log = nusc.get("log", scene["log_token"])
            scene_calib = {ch: v for ch, v in per_scene[scene["token"]].items() if len(v) == 1 and ch not in rig_calib}
            meta: dict[str, Any] = {"description": scene["description"], "location": log["location"],
                                    "vehicle": log["vehicle"], "date_captured": log["date_captured"],
                                    "logfile": log["logfile"]}
            if scene_calib:
                meta["calibration"] = {ch: calib_by_value[next(iter(v))] for ch, v in scene_calib.items()}
            scene_meta[name] = meta
            frames = _scene_frames(_scene_samples(nusc, scene), records[scene["token"]], name)
            for i, (sample, channel_records) in enumerate(frames):
                frame: dict[str, Any] = {"keyframe": sample is not None}
                if sample is not None:
                    frame["sample_token"] = sample["token"]
                recs = {}
                for s in sensors:
                    channel = s["channel"]
                    if channel not in channel_records:
                        continue
                    sd = channel_records[channel]
                    recs[channel] = _record_json(dataroot, staging, nusc, sd, name, channel, s["modality"])
                    if channel not in rig_calib and channel not in scene_calib:
                        recs[channel]["calibration"] = calib_of[sd["calibrated_sensor_token"]]
                frame["records"] = recs
                if sample is not None:
                    frame["boxes"] = [_box_json(nusc, nusc.get("sample_annotation", t), attr_name) for t in sample["anns"]]
                    n_keyframes += 1
                    n_boxes += len(frame["boxes"])
                n_records += len(recs)
                _write_json(staging / FRAMES_DIR / name / f"{i:06d}.json", frame)
            n_frames += len(frames)
        _write_json(staging / SCENES_FILE, scene_meta)
        _write_json(staging / SPLITS_FILE, _split_names(version, split, dataroot, [s["name"] for s in scenes]))
        n_maps = _copy_maps(dataroot, nusc, scenes, staging) if maps else 0
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if out.exists():
        out.rmdir()
    staging.rename(out)
    return ExportSummary(scenes=len(scenes), frames=n_frames, keyframes=n_keyframes, records=n_records, boxes=n_boxes,
                         map_files=n_maps)


def _record_json(dataroot: Path, out: Path, nusc, sd: dict, scene: str, channel: str, modality: str) -> dict:
    """Copy (or, for radar, convert) one sample_data file under out/sensors/<scene>/<channel>/ and return its
    record JSON (timestamp, file, ego_pose)."""
    src = dataroot / sd["filename"]
    name = Path(sd["filename"]).name
    if modality == "radar":
        name = name[: -len(".pcd")] + ".npy" if name.endswith(".pcd") else name + ".npy"
    rel = f"sensors/{scene}/{channel}/{name}"
    dst = out / rel
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists():
        raise DataError(f"two {channel} records of scene {scene} have the file name {name}", path=src)
    if modality == "radar":
        points_radar = read_radar_pcd(src, invalid_states=_ALL_STATES, dynprop_states=_ALL_STATES,
                                      ambig_states=_ALL_STATES)  # (N, 18) float32, RADAR_FIELDS, radar frame
        np.save(dst, np.ascontiguousarray(points_radar, dtype="<f4"))
    else:
        try:
            shutil.copyfile(src, dst)
        except OSError as exc:
            raise DataError(f"cannot copy sample_data {sd['token']} file ({exc.strerror or exc})", path=src) from None
    ep = nusc.get("ego_pose", sd["ego_pose_token"])
    return {"timestamp": int(sd["timestamp"]), "file": rel,
            "ego_pose": {"translation": list(ep["translation"]), "rotation": list(ep["rotation"])}}
