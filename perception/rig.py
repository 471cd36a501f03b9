"""The sensor rig: which cameras (in tensor and export order), which LiDAR is the reference frame, which radars.

`NUSCENES` is the preset (the six nuScenes cameras at 1600x900, LIDAR_TOP, the five radars); the config's ``rig:``
section (`perception.config.RigConfig`) gives it or a rig of the user's own. The dataset reads its channels only
through the rig, the model's camera axis is its camera count, and export manifests record it (`Rig.to_json`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from perception.errors import ConfigError, PerceptionError

_NUSCENES_CAMERAS = ("CAM_FRONT", "CAM_FRONT_RIGHT", "CAM_FRONT_LEFT", "CAM_BACK", "CAM_BACK_LEFT", "CAM_BACK_RIGHT")
_NUSCENES_RADARS = ("RADAR_FRONT", "RADAR_FRONT_LEFT", "RADAR_FRONT_RIGHT", "RADAR_BACK_LEFT", "RADAR_BACK_RIGHT")


@dataclass(frozen=True)
class CameraSpec:
    """One camera: its channel name and its image size in pixels (as recorded; each camera is resized to the
    model's input by its own width)."""

    name: str
    width: int
    height: int


@dataclass(frozen=True)
class Rig:
    """The sensors a model is trained and run on.

    Attributes:
        cameras: the cameras, in the order of the images axis (B, N, 3, H, W) and of the export.
        lidars: LiDAR channel names; the first is the reference frame of every sample (boxes, BEV grid).
        radars: radar channel names; empty: no radar (the radar modality is off).
        preset: "nuscenes" for the nuScenes rig, "" for a user's.
    """

    cameras: tuple[CameraSpec, ...]
    lidars: tuple[str, ...]
    radars: tuple[str, ...] = ()
    preset: str = ""

    def __post_init__(self) -> None:
        if not self.lidars:
            raise ConfigError("rig.lidars: name at least the reference LiDAR")
        names = [*self.camera_names, *self.lidars, *self.radars]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ConfigError(f"rig: channel name(s) {dup} appear more than once")
        bad = [c.name for c in self.cameras if c.width <= 0 or c.height <= 0]
        if bad:
            raise ConfigError(f"rig.cameras: {bad} need a positive width and height")

    @property
    def camera_names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.cameras)

    @property
    def reference_lidar(self) -> str:
        return self.lidars[0]

    def to_json(self) -> dict[str, Any]:
        return {"preset": self.preset, "cameras": [{"name": c.name, "width": c.width, "height": c.height}
                                                   for c in self.cameras],
                "lidars": list(self.lidars), "radars": list(self.radars)}

    @staticmethod
    def from_json(d: dict[str, Any]) -> "Rig":
        if d.get("preset") == "nuscenes":
            return NUSCENES
        return Rig(cameras=tuple(CameraSpec(str(c["name"]), int(c["width"]), int(c["height"])) for c in d["cameras"]),
                   lidars=tuple(d["lidars"]), radars=tuple(d.get("radars", ())), preset=str(d.get("preset", "")))

    def check_cameras(self, names: tuple[str, ...] | list[str], where: str) -> None:
        """Raise PerceptionError (one line, naming `where`) unless `names` are this rig's cameras in its order."""
        if tuple(names) != self.camera_names:
            raise PerceptionError(f"{where}: cameras {list(names)} ({len(names)}) differ from the model's rig "
                                  f"{list(self.camera_names)} ({len(self.cameras)}), in order")


NUSCENES: Rig = Rig(cameras=tuple(CameraSpec(n, 1600, 900) for n in _NUSCENES_CAMERAS), lidars=("LIDAR_TOP",),
                    radars=_NUSCENES_RADARS, preset="nuscenes")
