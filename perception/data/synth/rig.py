"""The sensor rig of the synthetic car: the 12 nuScenes channels with calibrations close to the real car's.

Frames (nuScenes conventions): ego x forward, y left, z up; cameras OpenCV (x right, y down, z forward);
LIDAR_TOP x right, y forward, z up; radars x forward, y left, z up.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from pyquaternion import Quaternion

from perception.structures import CAMERA_CHANNELS, LIDAR_CHANNEL, RADAR_CHANNELS

# Real nuScenes intrinsics at 1600x900 (fx = fy, principal point), and mount poses (translation in the ego
# frame in metres, yaw of the optical axis / x axis about ego +z in degrees).
_CAMERAS = {
    #                 translation               yaw     fx        cx       cy
    "CAM_FRONT": ((1.700, 0.016, 1.511), 0.0, 1266.417, 816.267, 491.507),
    "CAM_FRONT_RIGHT": ((1.550, -0.493, 1.496), -55.0, 1260.845, 807.968, 495.335),
    "CAM_FRONT_LEFT": ((1.522, 0.494, 1.509), 55.0, 1272.598, 826.616, 479.751),
    "CAM_BACK": ((0.033, 0.003, 1.576), 180.0, 809.221, 829.219, 481.771),
    "CAM_BACK_LEFT": ((1.036, 0.485, 1.566), 110.0, 1256.748, 817.789, 451.954),
    "CAM_BACK_RIGHT": ((1.028, -0.486, 1.567), -110.0, 1259.514, 807.252, 501.196),
}
_LIDAR = ((0.943, 0.0, 1.841), -90.0)
_RADARS = {
    "RADAR_FRONT": ((3.412, 0.0, 0.500), 0.0),
    "RADAR_FRONT_LEFT": ((2.422, 0.800, 0.780), 90.0),
    "RADAR_FRONT_RIGHT": ((2.422, -0.800, 0.770), -90.0),
    "RADAR_BACK_LEFT": ((-0.562, 0.628, 0.530), 178.0),
    "RADAR_BACK_RIGHT": ((-0.562, -0.618, 0.530), -178.0),
}
_REF_WIDTH, _REF_HEIGHT = 1600, 900

# Optical frame -> "looking along ego +x" frame: cam z -> ego x, cam x -> ego -y, cam y -> ego -z.
_OPTICAL2FORWARD = np.array([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])


def rot_z(yaw: float) -> np.ndarray:
    """(3, 3) rotation by `yaw` radians about +z."""
    c, s = math.cos(yaw), math.sin(yaw)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def quat_from_matrix(R: np.ndarray) -> list[float]:
    """Unit quaternion [w, x, y, z] of a rotation matrix, w >= 0."""
    q = Quaternion(matrix=R, rtol=1e-6, atol=1e-6).normalised
    v = [q.w, q.x, q.y, q.z]
    if v[0] < 0:
        v = [-x for x in v]
    return [float(x) for x in v]


def yaw_quat(yaw: float) -> list[float]:
    """[w, x, y, z] of a rotation by `yaw` radians about +z."""
    return [math.cos(yaw / 2), 0.0, 0.0, math.sin(yaw / 2)]


@dataclass(frozen=True)
class Sensor:
    """One calibrated channel. `sensor2ego` maps sensor-frame points into the ego frame."""

    channel: str
    modality: str  # "camera" | "lidar" | "radar"
    translation: np.ndarray  # (3,) metres, sensor origin in the ego frame
    rotation: np.ndarray  # (3, 3) sensor -> ego
    intrinsic: np.ndarray | None  # (3, 3) cam2img for cameras, else None
    width: int = 0
    height: int = 0

    @property
    def sensor2ego(self) -> np.ndarray:
        T = np.eye(4)
        T[:3, :3] = self.rotation
        T[:3, 3] = self.translation
        return T


def build_rig(image_width: int = 1600, image_height: int = 900) -> dict[str, Sensor]:
    """The 12 channels, cameras' intrinsics scaled to `image_width` x `image_height`."""
    sx, sy = image_width / _REF_WIDTH, image_height / _REF_HEIGHT
    rig: dict[str, Sensor] = {}
    for ch in CAMERA_CHANNELS:
        t, yaw, f, cx, cy = _CAMERAS[ch]
        K = np.array([[f * sx, 0.0, cx * sx], [0.0, f * sy, cy * sy], [0.0, 0.0, 1.0]])
        R = rot_z(math.radians(yaw)) @ _OPTICAL2FORWARD
        rig[ch] = Sensor(ch, "camera", np.array(t), R, K, image_width, image_height)
    t, yaw = _LIDAR
    rig[LIDAR_CHANNEL] = Sensor(LIDAR_CHANNEL, "lidar", np.array(t), rot_z(math.radians(yaw)), None)
    for ch in RADAR_CHANNELS:
        t, yaw = _RADARS[ch]
        rig[ch] = Sensor(ch, "radar", np.array(t), rot_z(math.radians(yaw)), None)
    return rig


# Time offsets of each channel's keyframe relative to the LIDAR_TOP keyframe (microseconds); cameras fire as
# the spinning LiDAR passes their field of view.
KEYFRAME_OFFSET_US: dict[str, int] = {
    "LIDAR_TOP": 0,
    "CAM_FRONT": 12_000,
    "CAM_FRONT_RIGHT": 20_000,
    "CAM_FRONT_LEFT": 4_000,
    "CAM_BACK": 37_000,
    "CAM_BACK_LEFT": 45_000,
    "CAM_BACK_RIGHT": 29_000,
    "RADAR_FRONT": -9_000,
    "RADAR_FRONT_LEFT": 14_000,
    "RADAR_FRONT_RIGHT": -21_000,
    "RADAR_BACK_LEFT": 26_000,
    "RADAR_BACK_RIGHT": -3_000,
}
# Sweep period per modality (microseconds): LiDAR 20 Hz, cameras 12 Hz, radar 13 Hz.
SWEEP_PERIOD_US = {"lidar": 50_000, "camera": 83_333, "radar": 76_923}
KEYFRAME_PERIOD_US = 500_000
