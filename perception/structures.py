"""Names and types shared by the whole stack: class lists, the BEV grid, the 3D box layout.

Every module that needs a class order, a grid shape or a box layout imports it from here, so each of
those facts is written once.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from perception.classes import NUSCENES
from perception.rig import NUSCENES as NUSCENES_RIG

# The nuScenes class list (`perception.classes.NUSCENES`), as plain tables for the code that scores with the
# devkit, which knows only these: the 10 detection classes in the devkit's order (detection_cvpr_2019), the 8
# attributes, which attributes each class may carry, and each class's evaluation range (m; the evaluation applies
# it, the training index does not: see `perception.data.dataset.build_index`).
DETECTION_CLASSES: tuple[str, ...] = NUSCENES.names
ATTRIBUTES: tuple[str, ...] = NUSCENES.attributes
CLASS_ATTRIBUTES: dict[str, tuple[str, ...]] = {c.name: c.attributes for c in NUSCENES.classes}
CLASS_RANGE_M: dict[str, float] = {c.name: c.eval_range_m for c in NUSCENES.classes}

# BEV map segmentation classes; `divider` is road_divider or lane_divider.
MAP_CLASSES: tuple[str, ...] = (
    "drivable_area",
    "ped_crossing",
    "walkway",
    "stop_line",
    "carpark_area",
    "divider",
)

# Scene-understanding tags, read from the free-text `scene.description` through SCENE_TAG_KEYWORDS.
SCENE_TAGS: tuple[str, ...] = (
    "night",
    "rain",
    "intersection",
    "parking lot",
    "pedestrians",
    "construction",
)

# The words that set each tag, matched case-insensitively as whole words (or whole phrases) anywhere in the
# description. Real nuScenes descriptions are short comma-separated notes written by the annotators, e.g.
# "Wait at intersection, peds, turn right", "Night, after rain, many peds, PMD", "Parking lot, parked cars,
# jaywalker", "Construction zone, nature"; the synthetic generator writes the tag names themselves. "rain"
# also counts "after rain" (wet roads), as the community's nuScenes rain split does ('rain' in the text).
SCENE_TAG_KEYWORDS: dict[str, tuple[str, ...]] = {
    "night": ("night", "nighttime", "night time"),
    "rain": ("rain", "rainy", "raining", "drizzle"),
    "intersection": ("intersection", "intersections", "int.", "junction", "crossroad", "crossroads"),
    "parking lot": ("parking lot", "parking lots", "parking area", "parking garage", "car park", "carpark",
                    "parked cars"),
    "pedestrians": ("ped", "peds", "pedestrian", "pedestrians", "jaywalker", "jaywalkers", "jaywalking"),
    "construction": ("construction", "construction zone", "construction site", "roadworks", "road work"),
}
assert tuple(SCENE_TAG_KEYWORDS) == SCENE_TAGS

# The nuScenes rig's channels (`perception.rig.NUSCENES`); the data pipeline reads a config's rig instead.
CAMERA_CHANNELS: tuple[str, ...] = NUSCENES_RIG.camera_names
LIDAR_CHANNEL: str = NUSCENES_RIG.reference_lidar
RADAR_CHANNELS: tuple[str, ...] = NUSCENES_RIG.radars


def _keyword_pattern(words: Sequence[str]) -> "re.Pattern[str]":
    # A word boundary before each keyword; after it, one unless the keyword ends in punctuation ("int.").
    alts = [re.escape(w) + (r"\b" if w[-1].isalnum() else "") for w in sorted(words, key=len, reverse=True)]
    return re.compile(r"\b(?:" + "|".join(alts) + ")", re.IGNORECASE)


_SCENE_TAG_PATTERNS = tuple(_keyword_pattern(SCENE_TAG_KEYWORDS[t]) for t in SCENE_TAGS)


def parse_scene_tags(description: str) -> np.ndarray:
    """Multi-hot vector over SCENE_TAGS from a free-text scene description (`SCENE_TAG_KEYWORDS`).

    Returns: (len(SCENE_TAGS),) float32 in {0, 1}.
    """
    return np.array([1.0 if p.search(description or "") else 0.0 for p in _SCENE_TAG_PATTERNS], dtype=np.float32)


@dataclass(frozen=True)
class BEVGrid:
    """The bird's-eye-view grid in the LIDAR_TOP frame of the keyframe (x right, y forward, z up; metres).

    Cell (row i, col j) covers x in [x_min + j*cell, x_min + (j+1)*cell), y in [y_min + i*cell, ...):
    rows run along +y, columns along +x. One object of this type gives the voxeliser, the view
    transform, the heads and the map rasteriser their shapes.
    """

    x_min: float = -51.2
    x_max: float = 51.2
    y_min: float = -51.2
    y_max: float = 51.2
    z_min: float = -5.0
    z_max: float = 3.0
    cell: float = 0.8

    def __post_init__(self) -> None:
        for lo, hi, name in ((self.x_min, self.x_max, "x"), (self.y_min, self.y_max, "y"), (self.z_min, self.z_max, "z")):
            if not hi > lo:
                raise ValueError(f"BEVGrid: {name}_max ({hi}) must exceed {name}_min ({lo})")
        if self.cell <= 0:
            raise ValueError(f"BEVGrid: cell must be positive, got {self.cell}")
        for span, name in ((self.x_max - self.x_min, "x"), (self.y_max - self.y_min, "y")):
            n = span / self.cell
            if abs(n - round(n)) > 1e-6:
                raise ValueError(f"BEVGrid: {name} span {span} m is not a whole number of {self.cell} m cells")

    @property
    def width(self) -> int:
        """Number of columns (along x)."""
        return int(round((self.x_max - self.x_min) / self.cell))

    @property
    def height(self) -> int:
        """Number of rows (along y)."""
        return int(round((self.y_max - self.y_min) / self.cell))

    @property
    def shape(self) -> tuple[int, int]:
        """(H, W) = (rows along y, columns along x)."""
        return self.height, self.width

    def cell_centers(self) -> tuple[np.ndarray, np.ndarray]:
        """x (W,) and y (H,) coordinates of the cell centres, metres, float64."""
        xs = self.x_min + (np.arange(self.width) + 0.5) * self.cell
        ys = self.y_min + (np.arange(self.height) + 0.5) * self.cell
        return xs, ys

    def contains_xy(self, x, y):
        """Bool mask (numpy or torch, as `x`): x in [x_min, x_max) and y in [y_min, y_max), metres. The one
        on-grid test of training targets and the GT-sampling database."""
        return (x >= self.x_min) & (x < self.x_max) & (y >= self.y_min) & (y < self.y_max)

    def sampling_grid(self, dst: "BEVGrid") -> np.ndarray:
        """(H_dst, W_dst, 2) float32: the cell centres of `dst` in this grid's normalised (x, y) coordinates,
        as `torch.nn.functional.grid_sample(..., align_corners=False)` reads them (-1 and 1 are this grid's
        outer edges), for resampling a map on this grid onto `dst`."""
        xs, ys = dst.cell_centers()
        gx = (xs - self.x_min) / (self.x_max - self.x_min) * 2 - 1
        gy = (ys - self.y_min) / (self.y_max - self.y_min) * 2 - 1
        yy, xx = np.meshgrid(gy, gx, indexing="ij")
        return np.stack([xx, yy], -1).astype(np.float32)


# BEVFusion's map-segmentation evaluation grid: 200 x 200 cells of 0.5 m, x and y in [-50, 50) m.
BEVFUSION_MAP_GRID = BEVGrid(x_min=-50.0, x_max=50.0, y_min=-50.0, y_max=50.0, z_min=-5.0, z_max=3.0, cell=0.5)


class Boxes3D:
    """A set of 3D boxes in one frame, stored as a (N, 9) float tensor.

    Layout: x, y, z, w, l, h, yaw, vx, vy.
      - (x, y, z): the box's geometric centre (not the bottom face), metres.
      - (w, l, h): width across the heading, length along it, height; metres (nuScenes' `size` order).
      - yaw: heading of the length axis, radians, counter-clockwise about +z from the frame's +x axis,
        wrapped to [-pi, pi).
      - (vx, vy): velocity in the same frame, m/s.

    The frame is whatever the holder says (`boxes_lidar`, `boxes_global`); nuScenes annotations are converted
    into this type once, where data enters.
    """

    DIM = 9

    def __init__(self, tensor: Tensor | np.ndarray | Sequence[Sequence[float]]):
        t = torch.as_tensor(tensor, dtype=torch.float32)
        if t.numel() == 0:
            t = t.reshape(0, self.DIM)
        if t.ndim != 2 or t.shape[1] != self.DIM:
            raise ValueError(f"Boxes3D expects shape (N, {self.DIM}), got {tuple(t.shape)}")
        self.tensor = t

    def __len__(self) -> int:
        return self.tensor.shape[0]

    def __getitem__(self, idx) -> "Boxes3D":
        t = self.tensor[idx]
        return Boxes3D(t.reshape(-1, self.DIM))

    def __repr__(self) -> str:
        return f"Boxes3D(n={len(self)})"

    @property
    def center(self) -> Tensor:
        return self.tensor[:, 0:3]

    @property
    def size(self) -> Tensor:
        return self.tensor[:, 3:6]

    @property
    def yaw(self) -> Tensor:
        return self.tensor[:, 6]

    @property
    def velocity(self) -> Tensor:
        return self.tensor[:, 7:9]

    def corners(self) -> Tensor:
        """(N, 8, 3) corners. Order: the devkit's `Box.corners()` (first 4 face forward, last 4 backward)."""
        w, l, h = self.size.unbind(-1)
        x = torch.tensor([1, 1, 1, 1, -1, -1, -1, -1], dtype=w.dtype)
        y = torch.tensor([1, -1, -1, 1, 1, -1, -1, 1], dtype=w.dtype)
        z = torch.tensor([1, 1, -1, -1, 1, 1, -1, -1], dtype=w.dtype)
        local = torch.stack([x[None] * l[:, None] / 2, y[None] * w[:, None] / 2, z[None] * h[:, None] / 2], -1)
        c, s = torch.cos(self.yaw), torch.sin(self.yaw)
        rx = c[:, None] * local[..., 0] - s[:, None] * local[..., 1]
        ry = s[:, None] * local[..., 0] + c[:, None] * local[..., 1]
        return torch.stack([rx, ry, local[..., 2]], -1) + self.center[:, None, :]

    def points_inside(self, points: Tensor, margin: float = 0.0) -> Tensor:
        """(N, P) bool: which of `points` (P, >=3, same frame) lie inside each box (inclusive faces)."""
        p = torch.as_tensor(points, dtype=torch.float32)[:, :3]
        d = p[None, :, :] - self.center[:, None, :]
        c, s = torch.cos(self.yaw)[:, None], torch.sin(self.yaw)[:, None]
        along = c * d[..., 0] + s * d[..., 1]
        across = -s * d[..., 0] + c * d[..., 1]
        w, l, h = (self.size[:, i : i + 1] / 2 + margin for i in range(3))
        return (along.abs() <= l) & (across.abs() <= w) & (d[..., 2].abs() <= h)

    def transform(self, rotation: Tensor | np.ndarray, translation: Tensor | np.ndarray) -> "Boxes3D":
        """Boxes in a new frame: p' = R p + t. R is a rotation about z only (frames here share 'up')
        up to numerical noise; yaw gains R's angle about z, velocity is rotated (not translated)."""
        R = torch.as_tensor(rotation, dtype=torch.float32)
        t = torch.as_tensor(translation, dtype=torch.float32)
        out = self.tensor.clone()
        out[:, 0:3] = self.center @ R.T + t
        out[:, 7:9] = self.velocity @ R[:2, :2].T
        out[:, 6] = wrap_angle(self.yaw + math.atan2(float(R[1, 0]), float(R[0, 0])))
        return Boxes3D(out)

    @staticmethod
    def cat(boxes: Sequence["Boxes3D"]) -> "Boxes3D":
        if not boxes:
            return Boxes3D(torch.zeros(0, Boxes3D.DIM))
        return Boxes3D(torch.cat([b.tensor for b in boxes], 0))


def wrap_angle(a: Tensor) -> Tensor:
    """Wrap radians to [-pi, pi)."""
    return torch.remainder(a + math.pi, 2 * math.pi) - math.pi
