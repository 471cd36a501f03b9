"""The per-frame folder format ("frames"): a plain layout written from one's own logs, its typed records, and
`load_frames`, which validates a whole folder and raises `DataError` with one line naming the file and the key.

The format is documented for users in docs/custom-data.md; in short (DIR is the folder):
  DIR/rig.json                    the sensors: name, modality, calibration, image size, point format
  DIR/splits.json                 {split name: [scene names]}
  DIR/scenes.json                 optional: per-scene description, location, log and calibration overrides
  DIR/frames/<scene>/<n>.json     one file per frame, in the order of the integer n
  DIR/maps/                       optional: nuScenes map files, copied as they are by `data import`
  sensor files anywhere           each record's "file" is relative to DIR

Frames: global (map; z up), ego (x forward, y left, z up; a record's ego pose is ego -> global at its timestamp),
sensor (a calibration is sensor -> ego). Metres, m/s, microseconds; quaternions [w, x, y, z].
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from PIL import Image, UnidentifiedImageError
from pyquaternion import Quaternion

from perception.data.loading import QUATERNION_NORM_TOL, RADAR_FIELDS
from perception.errors import DataError

MODALITIES: tuple[str, ...] = ("camera", "lidar", "radar")
# Box frames besides the sensor names: the map frame, and the ego frame at the keyframe's reference-LiDAR record.
GLOBAL_FRAME = "global"
EGO_FRAME = "ego"
IMAGE_SUFFIXES: tuple[str, ...] = (".jpg", ".jpeg", ".png")
POINT_SUFFIXES: tuple[str, ...] = (".bin", ".npy")
# Columns a point format must name (more are allowed, e.g. ring or the other nuScenes radar fields).
LIDAR_REQUIRED_COLUMNS: tuple[str, ...] = ("x", "y", "z", "intensity")
RADAR_REQUIRED_COLUMNS: tuple[str, ...] = ("x", "y", "z", "rcs", "vx_comp", "vy_comp")
# The nuScenes files as `data frames` writes them: LiDAR .pcd.bin copied as is; radar .pcd as .npy of all 18 fields.
NUSCENES_LIDAR_COLUMNS: tuple[str, ...] = ("x", "y", "z", "intensity", "ring")
NUSCENES_LIDAR_INTENSITY_MAX = 255.0
NUSCENES_RADAR_COLUMNS: tuple[str, ...] = RADAR_FIELDS

RIG_FILE = "rig.json"
SPLITS_FILE = "splits.json"
SCENES_FILE = "scenes.json"
FRAMES_DIR = "frames"
MAPS_DIR = "maps"  # optional: nuScenes map files (semantic-prior PNGs, expansion/<location>.json), passed through
FRAME_FILE_PATTERN = re.compile(r"^(\d+)\.json$")
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")  # scene and sensor names (they become folder names)
_FLOAT32 = np.dtype("<f4")
_PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"


# ----------------------------------------------------------------------------------------------------------- records


@dataclass(frozen=True)
class Pose:
    """A rigid transform src -> dst: p_dst = R(rotation) p_src + translation.

    translation: (3,) metres, in dst. rotation: (4,) unit quaternion (w, x, y, z), float, as written.
    """

    translation: tuple[float, float, float]
    rotation: tuple[float, float, float, float]

    def matrix(self) -> np.ndarray:
        """(4, 4) float64 homogeneous src -> dst (the quaternion normalised)."""
        T = np.eye(4)
        T[:3, :3] = Quaternion(np.asarray(self.rotation, np.float64) / np.linalg.norm(self.rotation)).rotation_matrix
        T[:3, 3] = self.translation
        return T


@dataclass(frozen=True)
class Calibration:
    """One sensor's calibration.

    sensor2ego: the sensor frame -> the ego frame. intrinsics: (3, 3) rows, camera frame (OpenCV: x right, y down,
    z forward; metres) -> pixels (undistorted pinhole), for cameras; None for LiDAR and radar.
    """

    sensor2ego: Pose
    intrinsics: tuple[tuple[float, float, float], ...] | None = None


@dataclass(frozen=True)
class PointFormat:
    """How a LiDAR or radar file stores its points: float32, one row per point, these named columns.

    columns: column names; x, y, z are metres in the sensor frame. intensity_max: LiDAR intensity runs over
    [0, intensity_max] (nuScenes: 255); None for radar.
    """

    columns: tuple[str, ...]
    intensity_max: float | None = None

    @property
    def floats_per_point(self) -> int:
        return len(self.columns)

    def column(self, name: str) -> int:
        """Index of the column `name` (ValueError if the format has none)."""
        return self.columns.index(name)


@dataclass(frozen=True)
class Sensor:
    """A sensor the rig declares.

    modality: one of MODALITIES. calibration: the rig-level calibration (None: every scene or record gives its
    own). image_size: (width, height) pixels every image of this camera must have, or None (any size).
    points: the file format of a LiDAR or radar (None for cameras).
    """

    name: str
    modality: str
    calibration: Calibration | None = None
    image_size: tuple[int, int] | None = None
    points: PointFormat | None = None


@dataclass(frozen=True)
class Rig:
    """The declared sensors, in the order of rig.json (the camera order is the tensor order). The first LiDAR is
    the reference sensor: every keyframe has a record of it, and its timestamp is the keyframe's."""

    sensors: tuple[Sensor, ...]

    def sensor(self, name: str) -> Sensor:
        for s in self.sensors:
            if s.name == name:
                return s
        raise KeyError(name)

    def names(self, modality: str) -> tuple[str, ...]:
        return tuple(s.name for s in self.sensors if s.modality == modality)

    @property
    def cameras(self) -> tuple[str, ...]:
        return self.names("camera")

    @property
    def lidars(self) -> tuple[str, ...]:
        return self.names("lidar")

    @property
    def radars(self) -> tuple[str, ...]:
        return self.names("radar")

    @property
    def reference_lidar(self) -> str:
        return self.lidars[0]


@dataclass(frozen=True)
class SensorRecord:
    """One capture of one sensor.

    timestamp: int microseconds. file: the sensor file (DIR joined with `file_rel`, the value written in the frame).
    ego2global: the ego pose at `timestamp`. calibration: resolved (the record's own, else its scene's, else the
    rig's). image_size: (width, height) pixels read from the image header (cameras), else None. num_points: the
    number of points in the file (LiDAR, radar), else None.
    """

    sensor: str
    timestamp: int
    file: Path
    file_rel: str
    ego2global: Pose
    calibration: Calibration
    image_size: tuple[int, int] | None = None
    num_points: int | None = None

    def sensor2global(self) -> np.ndarray:
        """(4, 4) float64: this record's sensor frame -> global."""
        return self.ego2global.matrix() @ self.calibration.sensor2ego.matrix()


@dataclass(frozen=True)
class Box:
    """One annotated object of a keyframe, in the frame named by `frame` (GLOBAL_FRAME, EGO_FRAME or a sensor).

    category: the dataset's own category name. center: (3,) geometric centre, metres. size: (3,) w, l, h metres
    (> 0; l along the box's local x). rotation: (4,) unit quaternion (w, x, y, z), box -> frame (a `yaw` in the
    file is stored as the rotation about the frame's z). velocity: (2,) vx, vy or (3,) vx, vy, vz m/s in the
    same frame, or None (unknown). track_id: the object's identity within its scene, or None. attribute: a name
    such as "vehicle.parked", or None. num_lidar_pts / num_radar_pts: points inside the box, or None (unknown).
    """

    category: str
    center: tuple[float, float, float]
    size: tuple[float, float, float]
    rotation: tuple[float, float, float, float]
    frame: str
    velocity: tuple[float, ...] | None = None
    track_id: str | None = None
    attribute: str | None = None
    num_lidar_pts: int | None = None
    num_radar_pts: int | None = None

    @property
    def yaw(self) -> float:
        """Heading of the box's local x axis about the frame's z, radians (counter-clockwise from +x)."""
        R = Quaternion(np.asarray(self.rotation, np.float64) / np.linalg.norm(self.rotation)).rotation_matrix
        return float(math.atan2(R[1, 0], R[0, 0]))


@dataclass(frozen=True)
class Frame:
    """One frame file: at most one record per sensor, in rig order; a sensor without a record is absent here.

    path: the frame file. index: the integer of its name. sample_token: a keyframe's token, or None (an importer
    makes one). boxes: only on keyframes.
    """

    path: Path
    index: int
    keyframe: bool
    records: Mapping[str, SensorRecord]
    boxes: tuple[Box, ...] = ()
    sample_token: str | None = None

    def frame2global(self, frame: str, rig: Rig) -> np.ndarray:
        """(4, 4) float64: the named frame -> global at this frame (EGO_FRAME: the reference LiDAR's ego pose)."""
        if frame == GLOBAL_FRAME:
            return np.eye(4)
        if frame == EGO_FRAME:
            return self.records[rig.reference_lidar].ego2global.matrix()
        return self.records[frame].sensor2global()


@dataclass(frozen=True)
class Scene:
    """An ordered run of frames. description, location (a map name, or ""), vehicle, date_captured
    ("YYYY-MM-DD" or ""), logfile: from scenes.json ("" when not given). calibration: per-sensor overrides of
    the rig's calibration for this scene."""

    name: str
    frames: tuple[Frame, ...]
    description: str = ""
    location: str = ""
    vehicle: str = ""
    date_captured: str = ""
    logfile: str = ""
    calibration: Mapping[str, Calibration] = field(default_factory=dict)

    @property
    def keyframes(self) -> tuple[Frame, ...]:
        return tuple(f for f in self.frames if f.keyframe)


@dataclass(frozen=True)
class FrameSet:
    """A validated frames folder: root (DIR), the rig, the scenes (sorted by name) and the splits."""

    root: Path
    rig: Rig
    scenes: tuple[Scene, ...]
    splits: Mapping[str, tuple[str, ...]]

    def scene(self, name: str) -> Scene:
        for s in self.scenes:
            if s.name == name:
                return s
        raise KeyError(name)

    def split(self, name: str) -> tuple[Scene, ...]:
        """The scenes of a split, in splits.json order (DataError for an unknown split)."""
        if name not in self.splits:
            raise DataError(f"unknown split {name!r} (splits.json has: {', '.join(self.splits)})",
                            path=self.root / SPLITS_FILE)
        return tuple(self.scene(n) for n in self.splits[name])


def box_to_global(box: Box, frame: Frame, rig: Rig) -> Box:
    """`box` (of keyframe `frame`) in the global frame: centre and rotation by frame -> global, velocity rotated
    (a 2-vector is taken with vz = 0 in its frame and comes out as global (vx, vy)). Exact for GLOBAL_FRAME."""
    if box.frame == GLOBAL_FRAME:
        return box
    T = frame.frame2global(box.frame, rig)
    center = T[:3, :3] @ np.asarray(box.center, np.float64) + T[:3, 3]
    R_box = Quaternion(np.asarray(box.rotation, np.float64) / np.linalg.norm(box.rotation)).rotation_matrix
    rotation = Quaternion(matrix=T[:3, :3] @ R_box, atol=1e-6).elements
    velocity = None
    if box.velocity is not None:
        v = np.zeros(3)
        v[: len(box.velocity)] = box.velocity
        v_global = T[:3, :3] @ v
        velocity = tuple(float(x) for x in v_global[: len(box.velocity)])
    return Box(category=box.category, center=tuple(float(x) for x in center), size=box.size,
               rotation=tuple(float(x) for x in rotation), frame=GLOBAL_FRAME, velocity=velocity,
               track_id=box.track_id, attribute=box.attribute, num_lidar_pts=box.num_lidar_pts,
               num_radar_pts=box.num_radar_pts)


# ------------------------------------------------------------------------------------------- validation helpers


class _At:
    """Where a value sits, for one-line errors: the file and the key path inside it (`boxes[3].size`)."""

    __slots__ = ("path", "key")

    def __init__(self, path: Path, key: str = ""):
        self.path = path
        self.key = key

    def __truediv__(self, name: str) -> "_At":
        return _At(self.path, f"{self.key}.{name}" if self.key else name)

    def __getitem__(self, i: int) -> "_At":
        return _At(self.path, f"{self.key}[{i}]")

    def error(self, what: str) -> DataError:
        return DataError(f"{self.key}: {what}" if self.key else what, path=self.path)


def _show(value: Any, limit: int = 60) -> str:
    """A JSON value as it would be written, cut to `limit` characters."""
    text = json.dumps(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    out: dict = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def _read_json(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError("missing file", path=path) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read ({getattr(exc, 'strerror', None) or exc})", path=path) from None
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates)
    except json.JSONDecodeError as exc:
        raise DataError(f"malformed JSON at line {exc.lineno} column {exc.colno}: {exc.msg}", path=path) from None
    except ValueError as exc:  # a duplicate key
        raise DataError(f"malformed JSON: {exc}", path=path) from None


def _object(value: Any, at: _At, required: tuple[str, ...], optional: tuple[str, ...] = ()) -> dict:
    """`value` as a dict with every `required` key and no key outside `required` + `optional`."""
    if not isinstance(value, dict):
        raise at.error(f"expected an object, got {_show(value)}")
    for k in required:
        if k not in value:
            raise (at / k).error("missing required key")
    for k in value:
        if k not in required and k not in optional:
            raise (at / k).error(f"unknown key (expected: {', '.join(required + optional)})")
    return value


def _string(value: Any, at: _At, *, empty: bool = False) -> str:
    if not isinstance(value, str) or (not empty and not value):
        raise at.error(f"expected a {'' if empty else 'non-empty '}string, got {_show(value)}")
    return value


def _name(value: Any, at: _At) -> str:
    if not isinstance(value, str) or not NAME_PATTERN.match(value):
        raise at.error(f"expected a name of letters, digits, '.', '_' or '-', got {_show(value)}")
    return value


def _bool(value: Any, at: _At) -> bool:
    if not isinstance(value, bool):
        raise at.error(f"expected true or false, got {_show(value)}")
    return value


def _integer(value: Any, at: _At, *, minimum: int | None = None, what: str = "an integer") -> int:
    if isinstance(value, bool) or not isinstance(value, int) or (minimum is not None and value < minimum):
        bound = "" if minimum is None else f" >= {minimum}"
        raise at.error(f"expected {what}{bound}, got {_show(value)}")
    return value


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _number(value: Any, at: _At, *, positive: bool = False) -> float:
    if not _is_number(value) or (positive and value <= 0):
        raise at.error(f"expected a {'positive' if positive else 'finite'} number, got {_show(value)}")
    return float(value)


def _numbers(value: Any, at: _At, n: int | tuple[int, ...], *, positive: bool = False) -> tuple[float, ...]:
    counts = (n,) if isinstance(n, int) else n
    ok = (isinstance(value, list) and len(value) in counts
          and all(_is_number(v) and (not positive or v > 0) for v in value))
    if not ok:
        kind = "positive" if positive else "finite"
        raise at.error(f"expected {' or '.join(map(str, counts))} {kind} numbers, got {_show(value)}")
    return tuple(float(v) for v in value)


def _quaternion(value: Any, at: _At) -> tuple[float, float, float, float]:
    q = _numbers(value, at, 4)
    norm = math.sqrt(sum(v * v for v in q))
    if abs(norm - 1.0) > QUATERNION_NORM_TOL:
        raise at.error(f"expected a unit quaternion [w, x, y, z], got norm {norm:.6f}")
    return q  # type: ignore[return-value]


def _pose(value: Any, at: _At) -> Pose:
    obj = _object(value, at, ("translation", "rotation"))
    translation = _numbers(obj["translation"], at / "translation", 3)
    return Pose(translation, _quaternion(obj["rotation"], at / "rotation"))  # type: ignore[arg-type]


def _calibration(value: Any, at: _At, modality: str) -> Calibration:
    camera = modality == "camera"
    obj = _object(value, at, ("translation", "rotation") + (("intrinsics",) if camera else ()))
    sensor2ego = _pose({"translation": obj["translation"], "rotation": obj["rotation"]}, at)
    intrinsics = None
    if camera:
        K = obj["intrinsics"]
        if not (isinstance(K, list) and len(K) == 3):
            raise (at / "intrinsics").error(f"expected a 3x3 matrix (3 rows of 3 numbers), got {_show(K)}")
        intrinsics = tuple(_numbers(row, (at / "intrinsics")[i], 3) for i, row in enumerate(K))
        if intrinsics[0][0] <= 0 or intrinsics[1][1] <= 0:
            raise (at / "intrinsics").error(f"expected positive focal lengths fx, fy, got {_show(K)}")
    return Calibration(sensor2ego, intrinsics)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------------- rig.json


def _sensor(value: Any, at: _At) -> Sensor:
    if not isinstance(value, dict):
        raise at.error(f"expected an object, got {_show(value)}")
    modality = value.get("modality")
    if modality not in MODALITIES:
        raise (at / "modality").error(f"expected one of {', '.join(MODALITIES)}, got {_show(modality)}")
    extra = ("image_size",) if modality == "camera" else ()
    obj = _object(value, at, ("name", "modality") + (("points",) if modality != "camera" else ()),
                  ("calibration",) + extra)
    name = _name(obj["name"], at / "name")
    calibration = None if "calibration" not in obj else _calibration(obj["calibration"], at / "calibration", modality)
    image_size = None
    if "image_size" in obj:
        wh = obj["image_size"]
        if not (isinstance(wh, list) and len(wh) == 2 and all(isinstance(v, int) and not isinstance(v, bool) and v > 0
                                                              for v in wh)):
            raise (at / "image_size").error(f"expected [width, height], 2 positive integers, got {_show(wh)}")
        image_size = (wh[0], wh[1])
    points = None
    if modality != "camera":
        points = _point_format(obj["points"], at / "points", modality)
    return Sensor(name=name, modality=modality, calibration=calibration, image_size=image_size, points=points)


def _point_format(value: Any, at: _At, modality: str) -> PointFormat:
    lidar = modality == "lidar"
    obj = _object(value, at, ("columns",) + (("intensity_max",) if lidar else ()))
    cols = obj["columns"]
    if not (isinstance(cols, list) and cols and all(isinstance(c, str) and c for c in cols)):
        raise (at / "columns").error(f"expected a list of column names, got {_show(cols)}")
    if len(set(cols)) != len(cols):
        raise (at / "columns").error(f"column names repeat: {_show(cols)}")
    need = LIDAR_REQUIRED_COLUMNS if lidar else RADAR_REQUIRED_COLUMNS
    missing = [c for c in need if c not in cols]
    if missing:
        raise (at / "columns").error(f"a {modality} needs columns {', '.join(need)}; missing {', '.join(missing)}")
    intensity_max = _number(obj["intensity_max"], at / "intensity_max", positive=True) if lidar else None
    return PointFormat(tuple(cols), intensity_max)


def load_rig(path: Path) -> Rig:
    """Read and validate rig.json (see docs/custom-data.md). Raises DataError naming the key."""
    obj = _object(_read_json(path), _At(path), ("sensors",))
    at = _At(path, "sensors")
    if not isinstance(obj["sensors"], list) or not obj["sensors"]:
        raise at.error(f"expected a non-empty list of sensors, got {_show(obj['sensors'])}")
    sensors = []
    for i, value in enumerate(obj["sensors"]):
        s = _sensor(value, at[i])
        if any(s.name == t.name for t in sensors):
            raise (at[i] / "name").error(f"sensor {s.name!r} is declared twice")
        sensors.append(s)
    rig = Rig(tuple(sensors))
    if not rig.lidars:
        raise at.error("the rig declares no lidar (the first lidar is the reference sensor of every keyframe)")
    return rig


# ------------------------------------------------------------------------------------------------ sensor files


def _check_image(path: Path, sensor: Sensor, at: _At) -> tuple[int, int]:
    """(width, height) from the header of a JPEG/PNG; DataError if it is not one, is truncated, or its size
    differs from the rig's."""
    want = "PNG" if path.suffix.lower() == ".png" else "JPEG"
    try:
        with Image.open(path) as img:
            fmt, size = img.format, img.size
    except UnidentifiedImageError:
        raise at.error(f"unreadable image {path}: not a JPEG or PNG") from None
    except (OSError, ValueError) as exc:
        raise at.error(f"unreadable image {path}: {getattr(exc, 'strerror', None) or exc}") from None
    if fmt != want:
        raise at.error(f"{path} is a {fmt} image, its suffix says {want}")
    with open(path, "rb") as f:
        f.seek(max(0, path.stat().st_size - 64))
        tail = f.read()
    complete = tail.rstrip(b"\x00").endswith(b"\xff\xd9") if want == "JPEG" else tail.endswith(_PNG_END)
    if not complete:
        raise at.error(f"image {path} is truncated (no {want} end marker)")
    if sensor.image_size is not None and size != sensor.image_size:
        raise at.error(f"image {path} is {size[0]}x{size[1]}, rig.json says {sensor.name} is "
                       f"{sensor.image_size[0]}x{sensor.image_size[1]}")
    return size


def _check_points(path: Path, fmt: PointFormat, at: _At) -> int:
    """The number of points of a `.bin` (raw little-endian float32, N x K) or `.npy` (float32, (N, K)) file, K the
    format's column count, from its size or header; DataError if it does not match or is truncated."""
    K = fmt.floats_per_point
    nbytes = path.stat().st_size
    if path.suffix.lower() == ".bin":
        if nbytes % (4 * K):
            raise at.error(f"{path} has {nbytes} bytes, not a multiple of {4 * K} ({K} float32 per point)")
        return nbytes // (4 * K)
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            if version not in ((1, 0), (2, 0)):
                raise ValueError(f"unsupported .npy version {version}")
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, dtype = read_header(f)
            start = f.tell()
    except (OSError, ValueError) as exc:
        raise at.error(f"unreadable .npy file {path}: {exc}") from None
    if dtype != _FLOAT32 or len(shape) != 2 or shape[1] != K:
        raise at.error(f"{path} holds {dtype} {shape}, expected float32 (N, {K}) for columns {', '.join(fmt.columns)}")
    if nbytes < start + shape[0] * K * 4:
        raise at.error(f"{path} is truncated: {nbytes - start} data bytes for {shape[0]} x {K} float32")
    return int(shape[0])


def _check_file(root: Path, rel: str, sensor: Sensor, at: _At) -> tuple[Path, tuple[int, int] | None, int | None]:
    path = root / rel
    suffixes = IMAGE_SUFFIXES if sensor.modality == "camera" else POINT_SUFFIXES
    if path.suffix.lower() not in suffixes:
        raise at.error(f"a {sensor.modality} file must end in {' or '.join(suffixes)}, got {rel!r}")
    if not path.is_file():
        raise at.error(f"missing file {path}")
    try:
        if sensor.modality == "camera":
            return path, _check_image(path, sensor, at), None
        assert sensor.points is not None
        return path, None, _check_points(path, sensor.points, at)
    except PermissionError as exc:
        raise at.error(f"unreadable file {path}: {exc.strerror}") from None


# ------------------------------------------------------------------------------------------------------ frames


def _record(value: Any, at: _At, sensor: Sensor, scene_calibration: Mapping[str, Calibration], root: Path) -> SensorRecord:
    obj = _object(value, at, ("timestamp", "file", "ego_pose"), ("calibration",))
    timestamp = _integer(obj["timestamp"], at / "timestamp", minimum=0, what="an integer (microseconds)")
    rel = _string(obj["file"], at / "file")
    ego2global = _pose(obj["ego_pose"], at / "ego_pose")
    if "calibration" in obj:
        calibration = _calibration(obj["calibration"], at / "calibration", sensor.modality)
    elif sensor.name in scene_calibration:
        calibration = scene_calibration[sensor.name]
    elif sensor.calibration is not None:
        calibration = sensor.calibration
    else:
        raise at.error(f"no calibration for sensor {sensor.name!r} (give one in rig.json, in scenes.json for this "
                       "scene, or in this record)")
    file, image_size, num_points = _check_file(root, rel, sensor, at / "file")
    return SensorRecord(sensor=sensor.name, timestamp=timestamp, file=file, file_rel=rel, ego2global=ego2global,
                        calibration=calibration, image_size=image_size, num_points=num_points)


def _box(value: Any, at: _At, rig: Rig, records: Mapping[str, SensorRecord]) -> Box:
    if isinstance(value, dict) and "yaw" in value and "rotation" in value:
        raise (at / "yaw").error("give yaw or rotation, not both")
    angle = ("rotation",) if isinstance(value, dict) and "rotation" in value else ("yaw",)
    obj = _object(value, at, ("category", "center", "size", "frame") + angle,
                  ("velocity", "track_id", "attribute", "num_lidar_pts", "num_radar_pts"))
    frame = _string(obj["frame"], at / "frame")
    if frame not in (GLOBAL_FRAME, EGO_FRAME):
        try:
            sensor = rig.sensor(frame)
        except KeyError:
            raise (at / "frame").error(f"unknown frame {frame!r} (expected global, ego or a sensor of rig.json)") from None
        if frame not in records:
            raise (at / "frame").error(f"sensor {frame!r} has no record in this frame")
        z_up = sensor.modality != "camera"
    else:
        z_up = True
    if "yaw" in obj:
        if not z_up:
            raise (at / "yaw").error(f"yaw turns about z, but camera {frame!r} has z forward: give rotation instead")
        yaw = _number(obj["yaw"], at / "yaw")
        rotation = (math.cos(yaw / 2), 0.0, 0.0, math.sin(yaw / 2))
    else:
        rotation = _quaternion(obj["rotation"], at / "rotation")
    velocity = None
    if "velocity" in obj:
        velocity = _numbers(obj["velocity"], at / "velocity", (2, 3))
        if len(velocity) == 2 and not z_up:
            raise (at / "velocity").error(f"camera {frame!r} has z forward: give [vx, vy, vz]")
    track_id = None
    if "track_id" in obj:
        tid = obj["track_id"]
        if isinstance(tid, bool) or not isinstance(tid, (str, int)) or tid == "":
            raise (at / "track_id").error(f"expected a non-empty string or an integer, got {_show(tid)}")
        track_id = str(tid)
    return Box(
        category=_string(obj["category"], at / "category"),
        center=_numbers(obj["center"], at / "center", 3),  # type: ignore[arg-type]
        size=_numbers(obj["size"], at / "size", 3, positive=True),  # type: ignore[arg-type]
        rotation=rotation,  # type: ignore[arg-type]
        frame=frame,
        velocity=velocity,
        track_id=track_id,
        attribute=_string(obj["attribute"], at / "attribute") if "attribute" in obj else None,
        num_lidar_pts=_integer(obj["num_lidar_pts"], at / "num_lidar_pts", minimum=0) if "num_lidar_pts" in obj else None,
        num_radar_pts=_integer(obj["num_radar_pts"], at / "num_radar_pts", minimum=0) if "num_radar_pts" in obj else None,
    )


def load_frame(path: Path, index: int, rig: Rig, scene_calibration: Mapping[str, Calibration], root: Path) -> Frame:
    """Read and validate one frame file (its sensor files included). Raises DataError naming the key."""
    at = _At(path)
    value = _read_json(path)
    keyframe = _bool(_object(value, at, ("keyframe", "records"), ("sample_token", "boxes"))["keyframe"],
                     at / "keyframe")
    if not keyframe:
        for k in ("sample_token", "boxes"):
            if k in value:
                raise (at / k).error("only a keyframe (\"keyframe\": true) has this key")
    raw = value["records"]
    if not isinstance(raw, dict) or not raw:
        raise (at / "records").error(f"expected an object of at least one {{sensor name: record}}, got {_show(raw)}")
    by_name = {s.name: s for s in rig.sensors}
    for name in raw:
        if name not in by_name:
            raise (at / "records" / name).error(f"unknown sensor {name!r} (rig.json declares: {', '.join(by_name)})")
    records = {s.name: _record(raw[s.name], at / "records" / s.name, s, scene_calibration, root)
               for s in rig.sensors if s.name in raw}
    if keyframe and rig.reference_lidar not in records:
        raise (at / "records").error(f"a keyframe needs a record of the reference lidar {rig.reference_lidar!r} "
                                     "(the rig's first lidar)")
    token = _string(value["sample_token"], at / "sample_token") if "sample_token" in value else None
    boxes: list[Box] = []
    if "boxes" in value:
        if not isinstance(value["boxes"], list):
            raise (at / "boxes").error(f"expected a list, got {_show(value['boxes'])}")
        boxes = [_box(b, (at / "boxes")[i], rig, records) for i, b in enumerate(value["boxes"])]
        seen: dict[str, int] = {}
        for i, b in enumerate(boxes):
            if b.track_id is not None:
                if b.track_id in seen:
                    raise ((at / "boxes")[i] / "track_id").error(
                        f"track {b.track_id!r} appears twice in this frame (also boxes[{seen[b.track_id]}])")
                seen[b.track_id] = i
    return Frame(path=path, index=index, keyframe=keyframe, records=records, boxes=tuple(boxes), sample_token=token)


def _frame_files(scene_dir: Path) -> list[tuple[int, Path]]:
    files: dict[int, Path] = {}
    for p in scene_dir.iterdir():
        if p.name.startswith("."):
            continue
        m = FRAME_FILE_PATTERN.match(p.name)
        if not m or not p.is_file():
            raise DataError("unexpected entry: a scene folder holds only frame files named <integer>.json", path=p)
        n = int(m.group(1))
        if n in files:
            raise DataError(f"frame number {n} is also {files[n].name}", path=p)
        files[n] = p
    if not files:
        raise DataError("scene folder has no frame files (<integer>.json)", path=scene_dir)
    return sorted(files.items())


def _check_scene(scene: Scene) -> None:
    """Per sensor, timestamps strictly increase in frame order; a scene has a keyframe; a track keeps its category."""
    last: dict[str, tuple[int, Path]] = {}
    categories: dict[str, tuple[str, Path]] = {}
    for frame in scene.frames:
        for name, rec in frame.records.items():
            if name in last and rec.timestamp <= last[name][0]:
                raise DataError(f"records.{name}.timestamp: {rec.timestamp} is not after {last[name][0]} "
                                f"(the previous {name} record, {last[name][1]}); timestamps must increase in frame order",
                                path=frame.path)
            last[name] = (rec.timestamp, frame.path)
        for i, box in enumerate(frame.boxes):
            if box.track_id is None:
                continue
            seen = categories.setdefault(box.track_id, (box.category, frame.path))
            if seen[0] != box.category:
                raise DataError(f"boxes[{i}].category: track {box.track_id!r} is {box.category!r} here but "
                                f"{seen[0]!r} in {seen[1]}", path=frame.path)
    if not scene.keyframes:
        raise DataError("scene has no keyframe (\"keyframe\": true)", path=scene.frames[0].path.parent)


def _scene_meta(root: Path, rig: Rig, names: set[str]) -> dict[str, dict]:
    """scenes.json as {scene: {description, location, vehicle, date_captured, logfile, calibration}}, validated."""
    path = root / SCENES_FILE
    if not path.exists():
        return {}
    at = _At(path)
    value = _read_json(path)
    if not isinstance(value, dict):
        raise at.error(f"expected an object {{scene name: {{...}}}}, got {_show(value)}")
    out = {}
    for name, meta in value.items():
        if name not in names:
            raise (at / name).error(f"unknown scene {name!r} (no folder {FRAMES_DIR}/{name})")
        obj = _object(meta, at / name, (), ("description", "location", "vehicle", "date_captured", "logfile",
                                            "calibration"))
        entry: dict[str, Any] = {k: _string(obj[k], at / name / k, empty=True)
                                 for k in ("description", "location", "vehicle", "date_captured", "logfile") if k in obj}
        if "date_captured" in entry and entry["date_captured"] and not re.match(r"^\d{4}-\d{2}-\d{2}$",
                                                                                 entry["date_captured"]):
            raise (at / name / "date_captured").error(f"expected YYYY-MM-DD, got {_show(entry['date_captured'])}")
        calibration = {}
        if "calibration" in obj:
            cal = obj["calibration"]
            if not isinstance(cal, dict):
                raise (at / name / "calibration").error(f"expected an object {{sensor name: calibration}}, got {_show(cal)}")
            for sensor_name, c in cal.items():
                try:
                    sensor = rig.sensor(sensor_name)
                except KeyError:
                    raise (at / name / "calibration" / sensor_name).error(
                        f"unknown sensor {sensor_name!r} (rig.json declares: {', '.join(s.name for s in rig.sensors)})"
                    ) from None
                calibration[sensor_name] = _calibration(c, at / name / "calibration" / sensor_name, sensor.modality)
        entry["calibration"] = calibration
        out[name] = entry
    return out


def _splits(root: Path, names: list[str]) -> dict[str, tuple[str, ...]]:
    path = root / SPLITS_FILE
    at = _At(path)
    value = _read_json(path)
    if not isinstance(value, dict) or not value:
        raise at.error(f"expected an object {{split name: [scene names]}} with at least one split, got {_show(value)}")
    out = {}
    for split, scenes in value.items():
        if not split:
            raise at.error("a split name is empty")
        if not isinstance(scenes, list):
            raise (at / split).error(f"expected a list of scene names, got {_show(scenes)}")
        for i, s in enumerate(scenes):
            if s not in names:
                raise (at / split)[i].error(f"unknown scene {_show(s)} (no folder {FRAMES_DIR}/{s})")
            if s in scenes[:i]:
                raise (at / split)[i].error(f"scene {s!r} is listed twice")
        out[split] = tuple(scenes)
    unsplit = [n for n in names if not any(n in v for v in out.values())]
    if unsplit:
        raise at.error(f"scene {unsplit[0]!r} is in no split ({len(unsplit)} scenes are in none)")
    return out


def load_frames(root: str | Path) -> FrameSet:
    """Read and validate a frames folder (docs/custom-data.md): rig.json, splits.json, scenes.json (optional) and
    every frame file under frames/<scene>/, with each record's sensor file (present, the right suffix, a readable
    header: JPEG/PNG size, .bin length, .npy dtype and shape; the pixels and points are not decoded).

    Raises: DataError, one line naming the file and the key, at the first problem found.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError("not a folder", path=root)
    rig = load_rig(root / RIG_FILE)
    frames_dir = root / FRAMES_DIR
    if not frames_dir.is_dir():
        raise DataError("missing folder (one sub-folder per scene)", path=frames_dir)
    scene_dirs = sorted(p for p in frames_dir.iterdir() if not p.name.startswith("."))
    if not scene_dirs:
        raise DataError("no scene folders", path=frames_dir)
    for p in scene_dirs:
        if not p.is_dir() or not NAME_PATTERN.match(p.name):
            raise DataError("unexpected entry: frames/ holds one folder per scene, named with letters, digits, "
                            "'.', '_' or '-'", path=p)
    names = [p.name for p in scene_dirs]
    splits = _splits(root, names)
    meta = _scene_meta(root, rig, set(names))
    scenes = []
    tokens: dict[str, Path] = {}
    for scene_dir in scene_dirs:
        m = meta.get(scene_dir.name, {"calibration": {}})
        frames = tuple(load_frame(path, n, rig, m["calibration"], root) for n, path in _frame_files(scene_dir))
        scene = Scene(name=scene_dir.name, frames=frames, **m)
        _check_scene(scene)
        for f in scene.keyframes:
            if f.sample_token is not None:
                if f.sample_token in tokens:
                    raise DataError(f"sample_token: {f.sample_token!r} is also the token of {tokens[f.sample_token]}",
                                    path=f.path)
                tokens[f.sample_token] = f.path
        scenes.append(scene)
    return FrameSet(root=root, rig=rig, scenes=tuple(scenes), splits=splits)
