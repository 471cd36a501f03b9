"""Ground-truth sampling ("copy-paste" augmentation): paste objects' LiDAR points from a database built on the
training split into other samples.

Objects are pasted where they were recorded, in their source sample's keyframe LIDAR_TOP frame (as
mmdetection3d's ObjectSample does): nuScenes keyframes share the sensor height and the sweeps' dt, so points
and boxes stay physically plausible. A candidate is rejected if its BEV footprint circle overlaps an existing
or already accepted box (conservative, cheap). Existing points inside a pasted box are removed. The images are
not changed: pasted objects are LiDAR-only, like the BEVFusion recipe's ObjectPaste.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from perception.classes import NUSCENES, ClassList
from perception.errors import ConfigError
from perception.structures import BEVGrid, Boxes3D

log = logging.getLogger(__name__)


# The nuScenes classes in the order BEVFusion's ObjectSample lists its sample_groups, the order in which objects
# are drawn (their counts: `perception.classes.NUSCENES`).
BEVFUSION_PASTE_ORDER: tuple[str, ...] = ("car", "truck", "construction_vehicle", "bus", "trailer", "barrier",
                                          "motorcycle", "bicycle", "pedestrian", "traffic_cone")


@dataclass
class GTDatabase:
    """D objects: boxes (D, 9) float32 `Boxes3D` layout (source LIDAR_TOP frame), labels (D,) int64,
    attributes (D,) int64, point_offsets (D + 1,) int64 into points (P, 5) float32 (x, y, z, intensity, dt in
    the same frame)."""

    boxes: np.ndarray
    labels: np.ndarray
    attributes: np.ndarray
    point_offsets: np.ndarray
    points: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def points_of(self, d: int) -> np.ndarray:
        return self.points[self.point_offsets[d]:self.point_offsets[d + 1]]

    @classmethod
    def build(cls, dataset, min_points: int = 5, grid: BEVGrid | None = None) -> "GTDatabase":
        """Collect every box with at least `min_points` LiDAR points and its centre on `grid` in x and y (the
        model's BEV grid, where `build_detection_targets` keeps targets; None: the dataset's grid) from a
        `NuScenesDataset` (no augmentation is applied: its index and LiDAR loader are used directly)."""
        boxes, labels, attrs, pts, counts = [], [], [], [], []
        idx = dataset.index
        grid = grid if grid is not None else dataset.config.grid
        for i in range(len(idx)):
            b, l, a = idx.boxes_of(i)
            on_grid = grid.contains_xy(b[:, 0], b[:, 1])
            b, l, a = b[on_grid], l[on_grid], a[on_grid]
            if not len(b):
                continue
            points = dataset.load_points_lidar(i)
            inside = Boxes3D(b).points_inside(points).numpy()
            for k in range(len(b)):
                sel = points[inside[k]]
                if len(sel) < min_points:
                    continue
                boxes.append(b[k])
                labels.append(l[k])
                attrs.append(a[k])
                pts.append(sel)
                counts.append(len(sel))
        db = cls(
            boxes=np.asarray(boxes, np.float32).reshape(-1, Boxes3D.DIM),
            labels=np.asarray(labels, np.int64),
            attributes=np.asarray(attrs, np.int64),
            point_offsets=np.concatenate([[0], np.cumsum(counts, dtype=np.int64)]).astype(np.int64),
            points=np.concatenate(pts, 0).astype(np.float32) if pts else np.zeros((0, 5), np.float32),
        )
        log.info("GT database: %d objects, %d points", len(db), len(db.points))
        return db

    def save(self, file) -> None:
        """Write the arrays as an uncompressed ``.npz`` to `file`: a path (used exactly as given: numpy would
        append ``.npz`` to a name without it) or a binary file object."""
        if isinstance(file, (str, Path)):
            with open(file, "wb") as f:
                self.save(f)
            return
        np.savez(file, boxes=self.boxes, labels=self.labels, attributes=self.attributes,
                 point_offsets=self.point_offsets, points=self.points)

    @classmethod
    def load(cls, path: str | Path) -> "GTDatabase":
        with np.load(path) as z:
            return cls(**{k: z[k] for k in ("boxes", "labels", "attributes", "point_offsets", "points")})


@dataclass(frozen=True)
class GTSamplerConfig:
    """`targets`: number of boxes per class after pasting (classes not named: no pasting). `stop_epoch`: no
    pasting from this (0-based) training epoch on (None: never stop), as BEVFusion's ``gt_paste_stop_epoch``."""

    targets: dict[str, int] = field(default_factory=lambda: {
        n: NUSCENES[NUSCENES.index(n)].paste for n in BEVFUSION_PASTE_ORDER})
    stop_epoch: int | None = None


class GTSampler:
    """Pastes database objects into one sample (see the module docstring)."""

    def __init__(self, database: GTDatabase, config: GTSamplerConfig | None = None, classes: ClassList = NUSCENES):
        self.db = database
        self.config = config or GTSamplerConfig()
        self.classes = classes
        unknown = [c for c in self.config.targets if c not in classes.names]
        if unknown:
            raise ConfigError(f"GT sampling targets {unknown} are not in the class list {list(classes.names)}")
        self._by_class = {c: np.flatnonzero(database.labels == classes.index(c)) for c in self.config.targets}

    def active(self, epoch: int) -> bool:
        """Whether objects are pasted in training epoch `epoch` (before `config.stop_epoch`)."""
        return self.config.stop_epoch is None or epoch < self.config.stop_epoch

    def paste(self, points_lidar: np.ndarray, boxes: np.ndarray, labels: np.ndarray, attributes: np.ndarray,
              rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Args/returns: points (N, 5) float32, boxes (K, 9) float32, labels (K,), attributes (K,), all in the
        sample's LIDAR_TOP frame; the returned arrays include the pasted objects."""
        centres = [boxes[:, :2]]
        radii = [0.5 * np.hypot(boxes[:, 3], boxes[:, 4])]
        new = []
        for cname, target in self.config.targets.items():
            pool = self._by_class[cname]
            need = target - int((labels == self.classes.index(cname)).sum())
            if need <= 0 or not len(pool):
                continue
            for d in rng.choice(pool, size=min(len(pool), need * 2), replace=False):
                if need <= 0:
                    break
                b = self.db.boxes[d]
                c_all, r_all = np.concatenate(centres), np.concatenate(radii)
                r = 0.5 * np.hypot(b[3], b[4])
                if len(c_all) and (np.hypot(*(c_all - b[:2]).T) < r_all + r).any():
                    continue
                centres.append(b[None, :2])
                radii.append(np.array([r]))
                new.append(d)
                need -= 1
        if not new:
            return points_lidar, boxes, labels, attributes
        new = np.asarray(new)
        new_boxes = self.db.boxes[new]
        inside = Boxes3D(new_boxes).points_inside(points_lidar).numpy().any(0)
        pasted = [self.db.points_of(d) for d in new]
        points_lidar = np.concatenate([points_lidar[~inside], *pasted], 0)
        return (points_lidar, np.concatenate([boxes, new_boxes], 0),
                np.concatenate([labels, self.db.labels[new]]), np.concatenate([attributes, self.db.attributes[new]]))
