"""`perception data corrupt`: write a corrupted copy of a nuScenes dataroot, one corruption at one severity (1..5),
for the robustness benchmark (docs/robustness.md, which lists every corruption, its parameters and their sources).

The copy at `out` is a complete dataroot the devkit and the stack read as they read the source:
  - `out/<version>/*.json`: the tables, copied; a corruption that removes records, redirects them to other files or
    perturbs a calibration writes its changed tables (sample_annotation, the ground truth, is never changed);
  - sensor files the corruption changes are written fresh (to a temporary file, then `os.replace`); every other
    file (unchanged sensor files, maps/, anything else) is hard-linked to the source, or symlinked where a hard
    link is impossible (another file system). Nothing is ever written through a link: the source is only read.
  - `out/corruption.json`: what was done (corruption, severity, seed, split, parameters, counts).

With a split, only the records of that split's scenes are corrupted: all their files, LiDAR and radar sweeps and
camera sweeps included; the rest is linked unchanged. Randomness is per file (or per record, per calibration):
`np.random.default_rng([seed, crc32(corruption), crc32(file name)])`, so the same seed gives byte-identical output
whatever the order or number of worker processes, and two severities of one file draw the same numbers.

How lost data is written: a lost camera or radar record is removed from sample_data, its channel's prev/next
chain relinked around it (a lost keyframe leaves its sample without that channel); a lost LiDAR sweep is an empty
(0-byte) `.pcd.bin`, since the devkit and the stack need every LIDAR_TOP record.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import multiprocessing as mp
import os
import shutil
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import cv2
import numpy as np

from perception.data import corrupt_camera as cam
from perception.data import corrupt_lidar as lid
from perception.data.dataset import split_scene_names
from perception.errors import ConfigError, DataError
from perception.progress import progress_bar

SEVERITIES = (1, 2, 3, 4, 5)
REPORT_FILE = "corruption.json"

# Camera crash (RoboBEV crashes `severity` cameras): the number of cameras whose records are removed for whole
# scenes; the first is --camera (default DEFAULT_CRASH_CAMERA), the others drawn once per seed from the rest.
DEFAULT_CRASH_CAMERA = "CAM_FRONT"
CAMERA_CRASH_COUNT = (1, 2, 3, 4, 5)
# Frame lost (RoboBEV): each camera record is lost with probability severity / 6.
FRAME_LOST = tuple(s / 6 for s in SEVERITIES)
# Spatial misalignment (Dong et al. 2023 add N(0, sigma^2) to each entry of the 3x3 rotation, sigma per severity):
# we rotate each camera by the mean rotation angle of that noise, 2 sigma / sqrt(pi) (the antisymmetric part of the
# noise is a rotation vector of three N(0, sigma^2 / 2) components), about an axis drawn in the image plane.
SPATIAL_SIGMA = (0.004, 0.008, 0.012, 0.016, 0.020)
SPATIAL_ANGLE_RAD = tuple(2 * s / math.sqrt(math.pi) for s in SPATIAL_SIGMA)
# Temporal misalignment (Dong et al. 2023): the sensor's data is `k` records late in its channel chain.
TEMPORAL_DELAY = (2, 4, 6, 8, 10)

_LINK_FALLBACK = {errno.EXDEV, errno.EPERM, errno.EMLINK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EACCES}


@dataclass(frozen=True)
class Corruption:
    name: str
    sensor: str  # camera, lidar or radar: the modality whose files, records or calibration change
    action: str  # image / lidar / radar (files rewritten), remove (records), calibration, delay (records redirected)
    summary: str


CORRUPTIONS: dict[str, Corruption] = {c.name: c for c in (
    Corruption("brightness", "camera", "image", "brighter images (ImageNet-C)"),
    Corruption("low_light", "camera", "image", "darkened images with shot and read noise (RoboBEV)"),
    Corruption("fog_camera", "camera", "image", "fractal fog (ImageNet-C)"),
    Corruption("snow_camera", "camera", "image", "snowflakes and whitening (ImageNet-C)"),
    Corruption("motion_blur_camera", "camera", "image", "linear motion blur (ImageNet-C)"),
    Corruption("color_quant", "camera", "image", "colour bit-depth reduction (RoboBEV)"),
    Corruption("camera_crash", "camera", "remove", "cameras lost for whole scenes (RoboBEV)"),
    Corruption("frame_lost", "camera", "remove", "random camera frames lost (RoboBEV)"),
    Corruption("spatial_misalignment", "camera", "calibration", "camera-to-ego rotation perturbed (Dong et al.)"),
    Corruption("temporal_misalignment_camera", "camera", "delay", "camera data k records late (Dong et al.)"),
    Corruption("fog_lidar", "lidar", "lidar", "range-dependent loss and backscatter (Hahner et al., Robo3D)"),
    Corruption("snow_lidar", "lidar", "lidar", "returns lost to snowflakes, near flake echoes (Robo3D)"),
    Corruption("beam_reduction", "lidar", "lidar", "fewer beams: a subset of rings kept (Robo3D cross-sensor)"),
    Corruption("point_dropout", "lidar", "lidar", "random returns dropped (ModelNet-C)"),
    Corruption("crosstalk", "lidar", "lidar", "returns at random ranges (Robo3D)"),
    Corruption("incomplete_echo", "lidar", "lidar", "weakest echoes lost (Robo3D, simplified)"),
    Corruption("motion_blur_lidar", "lidar", "lidar", "returns smeared along the ego motion (Robo3D)"),
    Corruption("lidar_frame_lost", "lidar", "lidar", "random sweeps lost, written empty (RoboBEV)"),
    Corruption("temporal_misalignment", "lidar", "delay", "LiDAR data k sweeps late (Dong et al.)"),
    Corruption("radar_dropout", "radar", "radar", "random radar returns dropped"),
    Corruption("radar_clutter", "radar", "radar", "fake radar returns added"),
)}


def list_corruptions() -> list[str]:
    """`name  sensor` lines, one per corruption (the output of `perception data corrupt --list`)."""
    width = max(len(n) for n in CORRUPTIONS) + 2
    return [f"{c.name:<{width}}{c.sensor}" for c in CORRUPTIONS.values()]


def get_corruption(name: str) -> Corruption:
    if name not in CORRUPTIONS:
        raise ConfigError(f"unknown corruption {name!r}; one of: {', '.join(CORRUPTIONS)} (perception data corrupt --list)")
    return CORRUPTIONS[name]


def check_severity(severity: int) -> int:
    if isinstance(severity, bool) or not isinstance(severity, (int, np.integer)) or severity not in SEVERITIES:
        raise ConfigError(f"severity must be an integer 1..5, got {severity!r}")
    return int(severity)


def severity_parameters(name: str, severity: int) -> dict[str, Any]:
    """The parameters of `name` at `severity`, as docs/robustness.md tabulates them."""
    i = check_severity(severity) - 1
    return {
        "brightness": lambda: {"value_shift": cam.BRIGHTNESS[i]},
        "low_light": lambda: {"ceiling": cam.LOW_LIGHT_CEILING[i], "photons": cam.LOW_LIGHT_PHOTONS[i],
                              "read_noise": cam.LOW_LIGHT_READ_NOISE[i]},
        "fog_camera": lambda: dict(zip(("thickness", "decay"), cam.FOG[i])),
        "snow_camera": lambda: dict(zip(("mean", "std", "zoom", "threshold", "radius_px", "sigma_px", "image_weight"),
                                        cam.SNOW[i])),
        "motion_blur_camera": lambda: dict(zip(("radius_px", "sigma_px"), cam.MOTION_BLUR[i])),
        "color_quant": lambda: {"bits": cam.COLOR_QUANT_BITS[i]},
        "camera_crash": lambda: {"cameras": CAMERA_CRASH_COUNT[i]},
        "frame_lost": lambda: {"probability": FRAME_LOST[i]},
        "spatial_misalignment": lambda: {"angle_deg": math.degrees(SPATIAL_ANGLE_RAD[i]), "dong_sigma": SPATIAL_SIGMA[i]},
        "temporal_misalignment_camera": lambda: {"records_late": TEMPORAL_DELAY[i]},
        "fog_lidar": lambda: {"alpha_per_m": lid.FOG_ALPHA[i], "backscatter_share": lid.FOG_BACKSCATTER[i],
                              "backscatter_m": list(lid.FOG_BACKSCATTER_M)},
        "snow_lidar": lambda: {"flakes_per_m": lid.SNOW_RATE[i], "echo_m": list(lid.SNOW_ECHO_M)},
        "beam_reduction": lambda: {"beams": lid.BEAMS_KEPT[i], "rings": lid.kept_rings(i + 1).tolist()},
        "point_dropout": lambda: {"probability": lid.POINT_DROPOUT[i]},
        "crosstalk": lambda: {"share": lid.CROSSTALK[i], "range_m": list(lid.CROSSTALK_RANGE_M)},
        "incomplete_echo": lambda: {"probability": lid.INCOMPLETE_ECHO[i], "weakest_share": lid.INCOMPLETE_ECHO_SHARE},
        "motion_blur_lidar": lambda: {"sweeps": lid.MOTION_BLUR_SWEEPS[i], "trans_std_m": lid.MOTION_BLUR_TRANS_STD[i]},
        "lidar_frame_lost": lambda: {"probability": lid.LIDAR_FRAME_LOST[i]},
        "temporal_misalignment": lambda: {"records_late": TEMPORAL_DELAY[i]},
        "radar_dropout": lambda: {"probability": lid.RADAR_DROPOUT[i]},
        "radar_clutter": lambda: {"ratio": lid.RADAR_CLUTTER[i], "range_m": list(lid.RADAR_RANGE_M),
                                  "fov_deg": lid.RADAR_FOV_DEG},
    }[get_corruption(name).name]()


def file_rng(seed: int, corruption: str, key: str) -> np.random.Generator:
    """The generator of one file (or record, or calibration) `key`: independent of the order files are processed in
    and of the severity."""
    return np.random.default_rng([seed, zlib.crc32(corruption.encode()), zlib.crc32(key.encode())])


@dataclass
class CorruptReport:
    corruption: str
    severity: int
    seed: int
    split: str | None
    scenes: int  # scenes whose records were corrupted
    files_corrupted: int = 0  # sensor files written fresh
    files_linked: int = 0  # hard links to the source
    files_symlinked: int = 0  # symlinks to the source (no hard link possible)
    records_removed: int = 0  # sample_data records removed (lost camera/radar data)
    records_changed: int = 0  # sample_data or calibrated_sensor records changed (redirected, recalibrated)
    extra_bytes: int = 0  # bytes written fresh: corrupted files and the table copies
    seconds: float = 0.0

    def line(self, out: str | Path) -> str:
        return (f"wrote {out}: {self.corruption} severity {self.severity} (seed {self.seed}) on {self.scenes} scenes"
                f"{f' of {self.split}' if self.split else ''}: {self.files_corrupted} files corrupted, "
                f"{self.records_removed} records removed, {self.records_changed} records changed, "
                f"{self.files_linked + self.files_symlinked} files linked ({self.files_symlinked} as symlinks), "
                f"{self.extra_bytes / 1e6:.1f} MB written, {self.seconds:.1f} s")


# ---------------------------------------------------------------------------------------------------- the tables

class _Tables:
    """The tables `corrupt_dataroot` reads, as loaded from JSON (no devkit), with per-record lookups."""

    def __init__(self, table_dir: Path, need_ego_pose: bool):
        def load(name: str) -> list[dict]:
            path = table_dir / f"{name}.json"
            try:
                return json.loads(path.read_text())
            except (OSError, ValueError) as exc:
                raise DataError(f"cannot read table ({exc})", path=path) from None

        self.sample_data = load("sample_data")
        self.calibrated_sensor = load("calibrated_sensor")
        self.cs_by_token = {cs["token"]: cs for cs in self.calibrated_sensor}
        sensor = {s["token"]: s for s in load("sensor")}
        sample_scene = {s["token"]: s["scene_token"] for s in load("sample")}
        self.scene_name = {s["token"]: s["name"] for s in load("scene")}
        self.ego_pose = {e["token"]: e for e in load("ego_pose")} if need_ego_pose else {}
        self.by_token = {sd["token"]: sd for sd in self.sample_data}
        self.channel, self.modality, self.scene = {}, {}, {}
        cs_sensor = {cs["token"]: sensor.get(cs["sensor_token"]) for cs in self.calibrated_sensor}
        for sd in self.sample_data:
            s = cs_sensor.get(sd["calibrated_sensor_token"])
            if s is None:
                raise DataError(f"sample_data {sd['token']} names an unknown calibrated_sensor "
                                f"{sd['calibrated_sensor_token']}", path=table_dir / "sample_data.json")
            self.channel[sd["token"]], self.modality[sd["token"]] = s["channel"], s["modality"]
            self.scene[sd["token"]] = self.scene_name.get(sample_scene.get(sd["sample_token"], ""), "")

    def chains(self, channels: set[str]) -> Iterator[list[dict]]:
        """Each prev/next chain (one per channel and scene) of records of `channels`, in order."""
        for sd in self.sample_data:
            if not sd["prev"] and self.channel[sd["token"]] in channels:
                chain, seen = [sd], {sd["token"]}
                while chain[-1]["next"] and chain[-1]["next"] in self.by_token and chain[-1]["next"] not in seen:
                    chain.append(self.by_token[chain[-1]["next"]])
                    seen.add(chain[-1]["token"])
                yield chain


def quaternion_matrix(q) -> np.ndarray:
    """3x3 rotation matrix of a nuScenes quaternion [w, x, y, z] (normalised first)."""
    w, x, y, z = np.asarray(q, np.float64) / math.sqrt(float(np.dot(q, q)))
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
        [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
        [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)],
    ])


def quaternion_multiply(a, b) -> list[float]:
    """The Hamilton product a b of quaternions [w, x, y, z] (the rotation b, then a)."""
    aw, ax, ay, az = a
    bw, bx, by, bz = b
    return [aw * bw - ax * bx - ay * by - az * bz, aw * bx + ax * bw + ay * bz - az * by,
            aw * by - ax * bz + ay * bw + az * bx, aw * bz + ax * by - ay * bx + az * bw]


def misalignment_rotation(seed: int, cs_token: str, severity: int) -> list[float]:
    """The quaternion [w, x, y, z] of the spatial misalignment of one camera calibration: a rotation by
    SPATIAL_ANGLE_RAD[severity - 1] about a unit axis in the camera's image plane (x right, y down), its direction
    drawn from the calibration's generator. The corrupted sensor-to-ego rotation is the calibrated one times it."""
    phi = float(file_rng(seed, "spatial_misalignment", cs_token).uniform(0, 2 * math.pi))
    axis = np.array([math.cos(phi), math.sin(phi), 0.0])
    half = SPATIAL_ANGLE_RAD[severity - 1] / 2
    return [math.cos(half), *(math.sin(half) * axis).tolist()]


def _new_token(*parts: Any) -> str:
    return hashlib.md5("/".join(str(p) for p in parts).encode()).hexdigest()


def _relink(tables: _Tables, removed: set[str], channels: set[str]) -> None:
    """Close each chain of `channels` over its removed records: prev/next of the kept neighbours skip them."""
    for chain in tables.chains(channels):
        if not any(sd["token"] in removed for sd in chain):
            continue
        kept = [sd for sd in chain if sd["token"] not in removed]
        for i, sd in enumerate(kept):
            sd["prev"] = kept[i - 1]["token"] if i else ""
            sd["next"] = kept[i + 1]["token"] if i + 1 < len(kept) else ""


def _velocity_in_sensor(tables: _Tables, sd: dict) -> list[float]:
    """The ego's velocity (m/s) at record `sd` from its ego pose and its chain neighbour's (the previous record, the
    next one for the first), rotated into the sensor frame of `sd`."""
    other = tables.by_token.get(sd["prev"]) or tables.by_token.get(sd["next"])
    pose = tables.ego_pose.get(sd["ego_pose_token"])
    if other is None or pose is None or other["ego_pose_token"] not in tables.ego_pose:
        return [0.0, 0.0, 0.0]
    dt = (sd["timestamp"] - other["timestamp"]) * 1e-6
    if abs(dt) < 1e-6:
        return [0.0, 0.0, 0.0]
    v = (np.asarray(pose["translation"], float) - np.asarray(tables.ego_pose[other["ego_pose_token"]]["translation"], float)) / dt
    cs = tables.cs_by_token[sd["calibrated_sensor_token"]]
    sensor_to_global = quaternion_matrix(pose["rotation"]) @ quaternion_matrix(cs["rotation"])
    return (sensor_to_global.T @ v).tolist()


# ---------------------------------------------------------------------------------------------------- the files

def _check_out(src: Path, out: Path) -> None:
    s, o = src.resolve(), out.resolve()
    if s == o or s in o.parents or o in s.parents:
        raise ConfigError(f"--out {out} must lie outside the source dataroot {src} (and not contain it)")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--out {out} must not exist or be an empty folder")


def _link(src: Path, dst: Path, report: CorruptReport) -> None:
    """Hard-link `dst` to `src`; a symlink to the source's real path where no hard link can be made."""
    try:
        os.link(src, dst)
        report.files_linked += 1
    except OSError as exc:
        if exc.errno not in _LINK_FALLBACK:
            raise
        os.symlink(os.path.realpath(src), dst)
        report.files_symlinked += 1


def _link_tree(src: Path, out: Path, skip_dir: Path, skip_files: set[str], report: CorruptReport) -> None:
    """Link every file under `src` into `out` (same relative paths), except those under `skip_dir` and the relative
    paths in `skip_files` (written fresh later)."""
    for root, dirs, files in os.walk(src, followlinks=True):
        here = Path(root)
        if here == skip_dir:
            dirs[:] = []
            continue
        rel_dir = here.relative_to(src)
        (out / rel_dir).mkdir(parents=True, exist_ok=True)
        dirs.sort()
        for name in sorted(files):
            rel = (rel_dir / name).as_posix()
            if rel not in skip_files:
                _link(here / name, out / rel_dir / name, report)


def _write_fresh(path: Path, data: bytes) -> None:
    """Write `data` as a new file at `path` (a temporary file renamed over it: never through an existing link)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


@dataclass(frozen=True)
class _Job:
    src: str
    dst: str
    rel: str
    corruption: str
    action: str
    severity: int
    seed: int
    ctx: dict


def _run_job(job: _Job) -> int:
    """Corrupt one sensor file; returns the bytes written."""
    try:
        raw = Path(job.src).read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read sensor file ({exc.strerror or exc})", path=job.src) from None
    rng = file_rng(job.seed, job.corruption, job.rel)
    if job.action == "image":
        data = cam.corrupt_jpeg(job.corruption, raw, job.severity, rng, path=job.src)
    elif job.action == "lidar":
        data = lid.corrupt_lidar_file(job.corruption, raw, job.severity, rng, job.ctx, path=job.src)
    else:
        data = lid.corrupt_radar_file(job.corruption, raw, job.severity, rng, path=job.src)
    _write_fresh(Path(job.dst), data)
    return len(data)


@contextlib.contextmanager
def _single_threaded_opencv() -> Iterator[None]:
    """OpenCV on one thread here and in the workers forked inside (they inherit it; setting it in a forked child
    whose parent ran OpenCV's pool can deadlock); the parallelism is the worker processes."""
    threads = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        yield
    finally:
        cv2.setNumThreads(threads)


def _run_jobs(jobs: list[_Job], workers: int, progress: bool, name: str) -> int:
    bar = progress_bar(total=len(jobs), desc=f"corrupt {name}", unit="file", disable=not progress)
    written = 0
    with _single_threaded_opencv():
        if workers <= 1 or len(jobs) < 2:
            for job in jobs:
                written += _run_job(job)
                bar.update()
        else:
            with mp.get_context("fork").Pool(min(workers, len(jobs))) as pool:
                for n in pool.imap_unordered(_run_job, jobs, chunksize=4):
                    written += n
                    bar.update()
    bar.close()
    return written


def _file_jobs(tables: _Tables, selected: list[dict], src: Path, dst: Path, spec: Corruption, severity: int,
               seed: int) -> dict[str, _Job]:
    """One job per sensor file of the `selected` records (relative file name -> job)."""
    jobs: dict[str, _Job] = {}
    for sd in selected:
        rel = sd["filename"]
        if rel in jobs:
            continue
        if not (src / rel).is_file():
            raise DataError("sensor file is missing", path=src / rel, token=sd["sample_token"])
        ctx = {"velocity": _velocity_in_sensor(tables, sd)} if spec.name == "motion_blur_lidar" else {}
        jobs[rel] = _Job(str(src / rel), str(dst / rel), rel, spec.name, spec.action, severity, seed, ctx)
    return jobs


def _misalign(tables: _Tables, selected: list[dict], severity: int, seed: int,
              report: CorruptReport) -> dict[str, list[dict]]:
    """Spatial misalignment: the calibration of each `selected` camera record rotated (`misalignment_rotation`);
    a calibration that records outside the selection share is copied under a new token for the selected ones.
    Returns the changed tables."""
    users: dict[str, int] = {}
    for sd in tables.sample_data:
        users[sd["calibrated_sensor_token"]] = users.get(sd["calibrated_sensor_token"], 0) + 1
    mine: dict[str, list[dict]] = {}
    for sd in selected:
        mine.setdefault(sd["calibrated_sensor_token"], []).append(sd)
    rows = list(tables.calibrated_sensor)
    index = {cs["token"]: i for i, cs in enumerate(rows)}
    changed: dict[str, list[dict]] = {"calibrated_sensor": rows}
    for token, records in sorted(mine.items()):
        old = rows[index[token]]
        delta = misalignment_rotation(seed, token, severity)
        new = dict(old, rotation=quaternion_multiply(old["rotation"], delta))
        if users[token] > len(records):  # shared with records outside the split: a new calibration for these
            new["token"] = _new_token(token, "spatial_misalignment", severity, seed)
            rows.append(new)
            for sd in records:
                sd["calibrated_sensor_token"] = new["token"]
            report.records_changed += len(records)
            changed["sample_data"] = tables.sample_data
        else:
            rows[index[token]] = new
        report.records_changed += 1
    return changed


def _delay(tables: _Tables, selected: list[dict], k: int) -> int:
    """Temporal misalignment: each `selected` record points at the file of the record `k` places earlier in its
    channel chain (the chain's first file for the first k); timestamps and poses stay. Returns the records changed."""
    chosen = {sd["token"] for sd in selected}
    changed = 0
    for chain in tables.chains({tables.channel[t] for t in chosen}):
        files = [sd["filename"] for sd in chain]
        for i, sd in enumerate(chain):
            if sd["token"] in chosen and files[max(i - k, 0)] != files[i]:
                sd["filename"] = files[max(i - k, 0)]
                changed += 1
    return changed


# ---------------------------------------------------------------------------------------------------- entry point

def corrupt_dataroot(data: str | Path, version: str, out: str | Path, corruption: str, severity: int, *,
                     split: str | None = None, seed: int = 0, camera: str | None = None, workers: int = 1,
                     progress: bool = False) -> CorruptReport:
    """Write the dataroot `data` (tables `data/version`) corrupted by `corruption` at `severity` 1..5 as a new
    dataroot at `out` (module docstring). `split` limits the corruption to that split's scenes (a devkit split or
    one of `<version>/splits.json`); `camera` names the camera a camera corruption applies to (default: all; for
    camera_crash the first crashed camera, default CAM_FRONT); `workers` processes corrupt the files (0: one
    per core).

    Raises ConfigError for an unknown corruption, a severity outside 1..5, an unknown split or camera, or an `out`
    that is not empty; DataError for missing or unreadable tables or sensor files."""
    start = time.perf_counter()
    spec = get_corruption(corruption)
    severity = check_severity(severity)
    if int(seed) < 0:
        raise ConfigError(f"seed must be >= 0, got {seed}")
    seed = int(seed)
    src, dst = Path(data), Path(out)
    table_dir = src / version
    if not (table_dir / "sample_data.json").is_file():
        raise DataError(f"no {version} tables (sample_data.json) under the dataroot", path=src)
    _check_out(src, dst)
    tables = _Tables(table_dir, need_ego_pose=corruption == "motion_blur_lidar")
    split_scenes = split_scene_names(version, split, src)
    present = set(tables.scene_name.values())
    scenes = present if split_scenes is None else present & set(split_scenes)
    if not scenes:
        raise ConfigError(f"split {split!r} has none of the {len(present)} scenes of {table_dir}")

    cameras_present = sorted({tables.channel[t] for t, m in tables.modality.items() if m == "camera"})
    if camera is not None:
        if spec.sensor != "camera":
            raise ConfigError(f"--camera applies to camera corruptions only, not to {corruption} ({spec.sensor})")
        if camera not in cameras_present:
            raise ConfigError(f"unknown camera {camera!r}; the dataroot has {', '.join(cameras_present)}")
    channels = set(cameras_present) if camera is None else {camera}
    if corruption == "camera_crash":
        first = camera or DEFAULT_CRASH_CAMERA
        if first not in cameras_present:
            raise ConfigError(f"camera_crash: the dataroot has no {first}; name one of "
                              f"{', '.join(cameras_present)} with --camera")
        rest = [c for c in cameras_present if c != first]
        order = file_rng(seed, corruption, "cameras").permutation(len(rest))
        channels = {first, *(rest[k] for k in order[:CAMERA_CRASH_COUNT[severity - 1] - 1])}
    selected = [sd for sd in tables.sample_data
                if tables.modality[sd["token"]] == spec.sensor and tables.scene[sd["token"]] in scenes
                and (spec.sensor != "camera" or tables.channel[sd["token"]] in channels)]
    report = CorruptReport(corruption, severity, seed, split, len(scenes))
    changed_tables: dict[str, list[dict]] = {}
    jobs: dict[str, _Job] = {}
    if spec.action in ("image", "lidar", "radar"):
        jobs = _file_jobs(tables, selected, src, dst, spec, severity, seed)
    elif spec.action == "remove":
        if corruption == "camera_crash":
            removed = {sd["token"] for sd in selected}
        else:  # frame_lost
            removed = {sd["token"] for sd in selected
                       if file_rng(seed, corruption, sd["filename"]).random() < FRAME_LOST[severity - 1]}
        _relink(tables, removed, {tables.channel[t] for t in removed})
        changed_tables["sample_data"] = [sd for sd in tables.sample_data if sd["token"] not in removed]
        report.records_removed = len(removed)
    elif spec.action == "calibration":
        changed_tables.update(_misalign(tables, selected, severity, seed, report))
    else:  # delay
        report.records_changed = _delay(tables, selected, TEMPORAL_DELAY[severity - 1])
        changed_tables["sample_data"] = tables.sample_data

    # Write: links first (everything but the tables and the files corrupted), then the tables, then the files.
    dst.mkdir(parents=True, exist_ok=True)
    _link_tree(src, dst, table_dir, set(jobs), report)
    (dst / version).mkdir(parents=True, exist_ok=True)
    for path in sorted(table_dir.iterdir()):
        target = dst / version / path.name
        if path.is_dir():
            shutil.copytree(path, target)
        elif path.suffix == ".json" and path.stem in changed_tables:
            data_bytes = (json.dumps(changed_tables[path.stem], indent=0) + "\n").encode()
            _write_fresh(target, data_bytes)
            report.extra_bytes += len(data_bytes)
        else:
            shutil.copyfile(path, target)
            report.extra_bytes += target.stat().st_size
    report.extra_bytes += _run_jobs(list(jobs.values()), workers or os.cpu_count() or 1, progress, corruption)
    report.files_corrupted = len(jobs)
    summary = {k: v for k, v in asdict(report).items() if k != "seconds"}
    summary.update(version=version, source=str(src.resolve()), parameters=severity_parameters(corruption, severity),
                   scene_names=sorted(scenes),
                   cameras=sorted(channels) if spec.sensor == "camera" else None)
    _write_fresh(dst / REPORT_FILE, (json.dumps(summary, indent=2) + "\n").encode())
    report.seconds = time.perf_counter() - start
    return report
