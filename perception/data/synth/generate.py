"""`perception data synth`: a synthetic dataset in the exact nuScenes v1.0 on-disk format.

Each scene is generated independently (one process per scene) from `(seed, scene index)`, so the same seed
gives byte-identical tables and files whatever the number of workers.
"""

from __future__ import annotations

import json
import logging
import math
import multiprocessing as mp
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np

from perception.data.synth import camera as cam_mod
from perception.data.synth import lidar as lidar_mod
from perception.data.synth import radar as radar_mod
from perception.data.synth.mapexp import write_maps
from perception.data.synth.names import MAP_PNG, token  # noqa: F401 (re-exported)
from perception.data.synth.rig import KEYFRAME_OFFSET_US, KEYFRAME_PERIOD_US, SWEEP_PERIOD_US, build_rig, quat_from_matrix, rot_z, yaw_quat
from perception.data.synth.world import SIZES, World, build_world
from perception.errors import PerceptionError
from perception.progress import progress_bar
from perception.structures import ATTRIBUTES, CAMERA_CHANNELS, LIDAR_CHANNEL, RADAR_CHANNELS

log = logging.getLogger(__name__)

CHANNELS = CAMERA_CHANNELS + (LIDAR_CHANNEL,) + RADAR_CHANNELS
LOCATIONS = ("singapore-onenorth", "boston-seaport", "singapore-queenstown", "singapore-hollandvillage")
SLOT = 520.0  # metres between scene worlds on a map canvas
ANNOTATION_RANGE = 75.0  # objects within this distance of the ego get annotated

# The 23 nuScenes categories (names as in category.json), with short descriptions of our own.
CATEGORIES = {
    "animal": "Animals on or near the road.",
    "human.pedestrian.adult": "Adult pedestrian.",
    "human.pedestrian.child": "Child pedestrian.",
    "human.pedestrian.construction_worker": "Person working in a construction zone.",
    "human.pedestrian.personal_mobility": "Person on a scooter, skateboard or similar.",
    "human.pedestrian.police_officer": "Police officer.",
    "human.pedestrian.stroller": "Stroller.",
    "human.pedestrian.wheelchair": "Wheelchair.",
    "movable_object.barrier": "Temporary road barrier.",
    "movable_object.debris": "Debris on the road.",
    "movable_object.pushable_pullable": "Object pushed or pulled by a person, such as a trolley.",
    "movable_object.trafficcone": "Traffic cone.",
    "static_object.bicycle_rack": "Area with parked bicycles.",
    "vehicle.bicycle": "Bicycle, with or without rider.",
    "vehicle.bus.bendy": "Articulated bus.",
    "vehicle.bus.rigid": "Rigid bus.",
    "vehicle.car": "Passenger car, van or SUV.",
    "vehicle.construction": "Construction vehicle such as an excavator or crane.",
    "vehicle.emergency.ambulance": "Ambulance.",
    "vehicle.emergency.police": "Police vehicle.",
    "vehicle.motorcycle": "Motorcycle or scooter, with or without rider.",
    "vehicle.trailer": "Trailer pulled by a vehicle, or parked.",
    "vehicle.truck": "Truck for cargo.",
}
ATTRIBUTE_DESCRIPTIONS = {
    "vehicle.moving": "Vehicle is moving.",
    "vehicle.stopped": "Vehicle, with a driver, is stationary for now (waiting at a light).",
    "vehicle.parked": "Vehicle is stationary with no intent to move.",
    "cycle.with_rider": "There is a rider on the bicycle or motorcycle.",
    "cycle.without_rider": "There is no rider on the bicycle or motorcycle.",
    "pedestrian.moving": "The pedestrian is moving.",
    "pedestrian.standing": "The pedestrian is standing.",
    "pedestrian.sitting_lying_down": "The pedestrian is sitting or lying down.",
}
VISIBILITY = [("1", "v0-40", "visibility of whole object is between 0 and 40%"), ("2", "v40-60", "visibility of whole object is between 40 and 60%"), ("3", "v60-80", "visibility of whole object is between 60 and 80%"), ("4", "v80-100", "visibility of whole object is between 80 and 100%")]
TABLES = ("attribute", "calibrated_sensor", "category", "ego_pose", "instance", "log", "map", "sample", "sample_annotation", "sample_data", "scene", "sensor", "visibility")


@dataclass(frozen=True)
class SynthConfig:
    """What to generate. Defaults give a v1.0-mini-like set (10 scenes of 10 s)."""

    version: str = "v1.0-mini"
    num_scenes: int = 10
    seed: int = 0
    image_width: int = 1600
    image_height: int = 900
    samples_per_scene: int = 20
    lidar_sweeps: int = 6
    radar_sweeps: int = 6
    camera_sweeps: int = 0

    def validate(self) -> None:
        if self.version not in ("v1.0-mini", "v1.0-trainval"):
            raise PerceptionError(f"synth: --version must be v1.0-mini or v1.0-trainval, got {self.version!r}")
        if self.version == "v1.0-mini" and self.num_scenes > 10:
            raise PerceptionError(f"synth: v1.0-mini holds at most 10 scenes (the devkit's mini splits), got --scenes {self.num_scenes}; use --version v1.0-trainval")
        limits = {"lidar_sweeps": 9, "radar_sweeps": 6, "camera_sweeps": 5}
        for key, hi in limits.items():
            if not 0 <= getattr(self, key) <= hi:
                raise PerceptionError(f"synth: {key} must be in [0, {hi}] (sweeps between 2 Hz keyframes), got {getattr(self, key)}")
        if self.samples_per_scene < 2:
            raise PerceptionError("synth: samples_per_scene must be at least 2")


def scene_names(version: str, n: int) -> list[tuple[str, str]]:
    """(name, split) for n scenes, names taken from the devkit's real split lists."""
    from nuscenes.utils.splits import create_splits_scenes  # heavy: the devkit takes ~1 s to import

    splits = create_splits_scenes()
    if version.endswith("mini"):
        train, val = splits["mini_train"], splits["mini_val"]
        n_val = 1 if n == 1 else min(len(val), max(1, round(n * 0.2)))
    else:
        train, val = splits["train"], splits["val"]
        n_val = 1 if n == 1 else max(1, round(n * 0.15))
    n_train = n - n_val
    if n_train > len(train) or n_val > len(val):
        raise PerceptionError(f"synth: {n} scenes exceed the {version} split lists")
    pairs = [(s, "train") for s in train[:n_train]] + [(s, "val") for s in val[:n_val]]
    return sorted(pairs)


def _placement(num_scenes: int) -> list[tuple[str, np.ndarray]]:
    """(location, origin of the scene world on that map) per scene index, and per-location grid sizes."""
    per_loc: dict[str, int] = {}
    out = []
    counts = {loc: sum(1 for i in range(num_scenes) if LOCATIONS[i % 4] == loc) for loc in LOCATIONS}
    for i in range(num_scenes):
        loc = LOCATIONS[i % 4]
        j = per_loc.get(loc, 0)
        per_loc[loc] = j + 1
        cols = max(1, math.ceil(math.sqrt(counts[loc])))
        col, row = j % cols, j // cols
        out.append((loc, np.array([300.0 + SLOT * col, 300.0 + SLOT * row])))
    return out


def canvas_size(num_in_location: int) -> tuple[float, float]:
    cols = max(1, math.ceil(math.sqrt(num_in_location)))
    rows = max(1, math.ceil(num_in_location / cols))
    return SLOT * cols + 80.0, SLOT * rows + 80.0


# ---------------------------------------------------------------------------------------------------------
# One scene.


@dataclass
class _SceneJob:
    dataroot: str
    cfg: SynthConfig
    index: int
    name: str
    location: str
    origin: np.ndarray


_CAMERA_CACHE: dict[tuple, cam_mod.CameraModel] = {}


def _camera_model(sensor) -> cam_mod.CameraModel:
    key = (sensor.channel, sensor.width, sensor.height)
    if key not in _CAMERA_CACHE:
        _CAMERA_CACHE[key] = cam_mod.CameraModel.build(sensor, seed=CHANNELS.index(sensor.channel))
    return _CAMERA_CACHE[key]


def _pose_matrix(translation: np.ndarray, yaw: float) -> np.ndarray:
    T = np.eye(4)
    T[:3, :3] = rot_z(yaw)
    T[:3, 3] = translation
    return T


def _count_in_box(points_global: np.ndarray, center: np.ndarray, size, yaw: float) -> int:
    d = points_global[:, :3] - center
    c, s = math.cos(yaw), math.sin(yaw)
    along = c * d[:, 0] + s * d[:, 1]
    across = -s * d[:, 0] + c * d[:, 1]
    w, l, h = size
    return int(((np.abs(along) <= l / 2) & (np.abs(across) <= w / 2) & (np.abs(d[:, 2]) <= h / 2)).sum())


def _visibility(first: int, through: int) -> str:
    ratio = first / through if through > 0 else 0.0
    return "4" if ratio >= 0.8 else "3" if ratio >= 0.6 else "2" if ratio >= 0.4 else "1"


def _scene(job: _SceneJob) -> dict:
    cfg, i, seed = job.cfg, job.index, job.cfg.seed
    root = Path(job.dataroot)
    S = cfg.samples_per_scene
    world = build_world(seed, i, job.origin, duration_s=(S - 1) * KEYFRAME_PERIOD_US / 1e6)
    rig = build_rig(cfg.image_width, cfg.image_height)
    categories = [a.category for a in world.agents]
    t0 = 1_531_000_000_000_000 + i * 7_200_000_000 + int(np.random.default_rng([seed, i, 7]).integers(0, 10**9))
    date = f"2018-07-{(i % 28) + 1:02d}"
    logfile = f"n015-{date}-{(8 + i % 10):02d}-{(i * 7) % 60:02d}-{(i * 13) % 60:02d}+0800"
    scene_tok, log_tok = token(seed, "scene", i), token(seed, "log", i)
    sample_toks = [token(seed, "sample", i, k) for k in range(S)]
    key_ts = [t0 + k * KEYFRAME_PERIOD_US for k in range(S)]

    rows: dict[str, list] = {t: [] for t in ("calibrated_sensor", "ego_pose", "sample", "sample_data", "sample_annotation", "instance")}
    for ch in CHANNELS:
        s = rig[ch]
        rows["calibrated_sensor"].append(
            {
                "token": token(seed, "calibrated_sensor", i, ch),
                "sensor_token": token(seed, "sensor", ch),
                "translation": [float(x) for x in s.translation],
                "rotation": quat_from_matrix(s.rotation),
                "camera_intrinsic": s.intrinsic.tolist() if s.intrinsic is not None else [],
            }
        )
    for k in range(S):
        rows["sample"].append({"token": sample_toks[k], "timestamp": key_ts[k], "prev": sample_toks[k - 1] if k else "", "next": sample_toks[k + 1] if k + 1 < S else "", "scene_token": scene_tok})

    pattern = lidar_mod.BeamPattern.hdl32()
    lidar_height = float(rig[LIDAR_CHANNEL].translation[2])
    key_lidar_global: list[np.ndarray] = []
    key_hits: list[lidar_mod.RayHits] = []
    key_radar_global: list[list[np.ndarray]] = [[] for _ in range(S)]
    sweeps_per = {"camera": cfg.camera_sweeps, "lidar": cfg.lidar_sweeps, "radar": cfg.radar_sweeps}
    for ch in CHANNELS:
        sensor = rig[ch]
        period = SWEEP_PERIOD_US[sensor.modality]
        timeline = []
        for k in range(S):
            key_t = key_ts[k] + KEYFRAME_OFFSET_US[ch]
            for j in range(sweeps_per[sensor.modality], 0, -1):
                timeline.append((key_t - j * period, False, k))
            timeline.append((key_t, True, k))
        sd_toks = [token(seed, "sample_data", i, ch, n) for n in range(len(timeline))]
        cs_tok = token(seed, "calibrated_sensor", i, ch)
        for n, (ts, is_key, k) in enumerate(timeline):
            t = (ts - t0) / 1e6
            pos, yaw = world.ego_pose(t)
            ego2global = _pose_matrix(pos, yaw)
            sensor2global = ego2global @ sensor.sensor2ego
            boxes = world.boxes_at(t)
            rng = np.random.default_rng([seed, i, CHANNELS.index(ch), n])
            folder = "samples" if is_key else "sweeps"
            base = f"{folder}/{ch}/{logfile}__{ch}__{ts}"
            if sensor.modality == "camera":
                filename = base + ".jpg"
                img = cam_mod.render(_camera_model(sensor), world, boxes, ego2global, categories, rng)
                cam_mod.write_jpeg(root / filename, img)
            elif sensor.modality == "lidar":
                filename = base + ".pcd.bin"
                pts, hits = lidar_mod.sweep(world, boxes, sensor2global, lidar_height, rng, pattern)
                lidar_mod.write_pcd_bin(root / filename, pts)
                if is_key:
                    p = pts[:, :3].astype(np.float64) @ sensor2global[:3, :3].T + sensor2global[:3, 3]
                    key_lidar_global.append(p)
                    key_hits.append(hits)
            else:
                filename = base + ".pcd"
                ret = radar_mod.scan(world, boxes, sensor2global, rng, t)
                radar_mod.write_radar_pcd(root / filename, ret)
                if is_key and len(ret):
                    p = np.stack([ret["x"], ret["y"], ret["z"]], 1).astype(np.float32).astype(np.float64)
                    key_radar_global[k].append(p @ sensor2global[:3, :3].T + sensor2global[:3, 3])
            rows["sample_data"].append(
                {
                    "token": sd_toks[n],
                    "sample_token": sample_toks[k],
                    "ego_pose_token": sd_toks[n],
                    "calibrated_sensor_token": cs_tok,
                    "timestamp": int(ts),
                    "fileformat": "jpg" if sensor.modality == "camera" else "pcd",
                    "is_key_frame": bool(is_key),
                    "height": sensor.height,
                    "width": sensor.width,
                    "filename": filename,
                    "prev": sd_toks[n - 1] if n else "",
                    "next": sd_toks[n + 1] if n + 1 < len(timeline) else "",
                }
            )
            rows["ego_pose"].append({"token": sd_toks[n], "timestamp": int(ts), "rotation": yaw_quat(yaw), "translation": [float(x) for x in pos]})

    # Annotations: every agent within range of the ego at each keyframe, in the global frame.
    per_instance: dict[int, list[dict]] = {}
    for k in range(S):
        t = (key_ts[k] - t0) / 1e6
        pos, _ = world.ego_pose(t)
        boxes = world.boxes_at(t)
        radar_pts = np.concatenate(key_radar_global[k]) if key_radar_global[k] else np.zeros((0, 3))
        hits = key_hits[k]
        for a_idx, agent in enumerate(world.agents):
            center = boxes.centers[a_idx]
            if np.hypot(*(center[:2] - pos[:2])) > ANNOTATION_RANGE:
                continue
            yaw = float(boxes.yaws[a_idx])
            rec = {
                "token": token(seed, "sample_annotation", i, a_idx, k),
                "sample_token": sample_toks[k],
                "instance_token": token(seed, "instance", i, a_idx),
                "visibility_token": _visibility(int(hits.rays_first[a_idx]), int(hits.rays_through[a_idx])),
                "attribute_tokens": [token(seed, "attribute", agent.attribute)] if agent.attribute else [],
                "translation": [float(x) for x in center],
                "size": [float(x) for x in agent.size],
                "rotation": yaw_quat(yaw),
                "prev": "",
                "next": "",
                "num_lidar_pts": _count_in_box(key_lidar_global[k], center, agent.size, yaw),
                "num_radar_pts": _count_in_box(radar_pts, center, agent.size, yaw),
            }
            per_instance.setdefault(a_idx, []).append(rec)
    for a_idx, recs in per_instance.items():
        for n, r in enumerate(recs):
            r["prev"] = recs[n - 1]["token"] if n else ""
            r["next"] = recs[n + 1]["token"] if n + 1 < len(recs) else ""
        rows["sample_annotation"] += recs
        rows["instance"].append(
            {
                "token": token(seed, "instance", i, a_idx),
                "category_token": token(seed, "category", world.agents[a_idx].category),
                "nbr_annotations": len(recs),
                "first_annotation_token": recs[0]["token"],
                "last_annotation_token": recs[-1]["token"],
            }
        )
    words = ["night" if world.night else "day", "rain" if world.rain else "clear"]
    words += [t for t in world.tags if t not in ("night", "rain")]
    description = ", ".join(words)
    scene = {
        "token": scene_tok,
        "log_token": log_tok,
        "nbr_samples": S,
        "first_sample_token": sample_toks[0],
        "last_sample_token": sample_toks[-1],
        "name": job.name,
        "description": description,
    }
    log_row = {"token": log_tok, "logfile": logfile, "vehicle": "n015", "date_captured": date, "location": job.location}
    return {"index": i, "scene": scene, "log": log_row, "rows": rows, "map": _map_geometry(world), "tags": world.tags, "num_agents": len(world.agents)}


def _map_geometry(world: World) -> dict:
    """The world's map layers in global coordinates (lists of (P, 2) arrays)."""
    out = {layer: [world.to_global(p) for p in polys] for layer, polys in world.polygons.items()}
    out.update({layer: [world.to_global(seg) for seg in segs] for layer, segs in world.lines.items()})
    out["road_segment_is_intersection"] = [True] + [False] * (len(world.polygons["road_segment"]) - 1)
    out["theta"] = world.theta
    return out


# ---------------------------------------------------------------------------------------------------------
# The whole dataset.


def generate(dataroot: str | Path, cfg: SynthConfig, workers: int = 0, progress: bool = True) -> Path:
    """Write the dataset under `dataroot`; returns the table folder (`dataroot/version`)."""
    cfg.validate()
    root = Path(dataroot)
    table_dir = root / cfg.version
    for ch in CHANNELS:
        (root / "samples" / ch).mkdir(parents=True, exist_ok=True)
        (root / "sweeps" / ch).mkdir(parents=True, exist_ok=True)
    (root / "maps" / "expansion").mkdir(parents=True, exist_ok=True)
    table_dir.mkdir(parents=True, exist_ok=True)

    names = scene_names(cfg.version, cfg.num_scenes)
    places = _placement(cfg.num_scenes)
    jobs = [_SceneJob(str(root), cfg, i, names[i][0], places[i][0], places[i][1]) for i in range(cfg.num_scenes)]
    n_workers = min(len(jobs), workers or os.cpu_count() or 1)
    log.info("synth: %d scenes (%s) into %s with %d worker(s)", cfg.num_scenes, cfg.version, root, n_workers)
    results = []
    bar = progress_bar(total=len(jobs), desc="synth scenes", unit="scene", disable=not progress)
    if n_workers <= 1:
        for job in jobs:
            results.append(_scene(job))
            bar.update()
    else:
        with mp.get_context("fork").Pool(n_workers) as pool:
            for res in pool.imap(_scene, jobs):
                results.append(res)
                bar.update()
    bar.close()
    results.sort(key=lambda r: r["index"])
    seed = cfg.seed

    tables: dict[str, list] = {t: [] for t in TABLES}
    tables["category"] = [{"token": token(seed, "category", n), "name": n, "description": d} for n, d in CATEGORIES.items()]
    tables["attribute"] = [{"token": token(seed, "attribute", n), "name": n, "description": ATTRIBUTE_DESCRIPTIONS[n]} for n in ATTRIBUTES]
    tables["visibility"] = [{"token": t, "level": lv, "description": d} for t, lv, d in VISIBILITY]
    rig = build_rig(cfg.image_width, cfg.image_height)
    tables["sensor"] = [{"token": token(seed, "sensor", ch), "channel": ch, "modality": rig[ch].modality} for ch in CHANNELS]
    for r in results:
        tables["scene"].append(r["scene"])
        tables["log"].append(r["log"])
        for t, rows in r["rows"].items():
            tables[t] += rows
    by_location: dict[str, list] = {}
    for r, (loc, _) in zip(results, places):
        by_location.setdefault(loc, []).append(r)
    for loc, rs in by_location.items():
        png = write_maps(root, loc, [r["map"] for r in rs], canvas_size(len(rs)), seed)
        tables["map"].append({"token": token(seed, "map", loc), "log_tokens": [r["log"]["token"] for r in rs], "category": "semantic_prior", "filename": f"maps/{png}"})
    for name in TABLES:
        tmp = table_dir / f".{name}.json.tmp"
        with open(tmp, "w") as f:
            json.dump(tables[name], f, indent=0)
        os.replace(tmp, table_dir / f"{name}.json")
    (root / "synth_config.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")
    log.info(
        "synth: wrote %d scenes, %d samples, %d sample_data, %d annotations",
        len(tables["scene"]), len(tables["sample"]), len(tables["sample_data"]), len(tables["sample_annotation"]),
    )
    return table_dir


def dataset_exists(dataroot: str | Path, version: str = "v1.0-mini") -> bool:
    root = Path(dataroot) / version
    return all((root / f"{t}.json").is_file() for t in TABLES)
