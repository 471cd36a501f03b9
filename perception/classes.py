"""Detection class lists: every per-class fact in one table, read by the dataset, heads, decoding, evaluation,
tracking and GT sampling alike.

`NUSCENES` is the preset (the devkit's 10 detection classes and 8 attributes, with CenterPoint's NMS radii and
tracking distances and BEVFusion's paste counts); the config's ``classes:`` section
(`perception.config.ClassesConfig`) gives it or a list of the user's own. A class list travels in checkpoints and
export manifests as `ClassList.to_json`.

The category mapping replaces the devkit's `category_to_detection_name`: each class names the dataset categories
that become it, full names (``vehicle.car``) or bare ones (``car``); a category that no class names maps to
nothing, and `perception data check` reports it (`ClassList.unmapped`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

from perception.errors import ConfigError


@dataclass(frozen=True)
class DetectionClass:
    """One detection class.

    Attributes:
        name: the detection name (submissions' ``detection_name``).
        categories: dataset category names that become this class.
        eval_range_m: ground truth and predictions beyond this BEV distance from the ego are not scored (m).
        nms_radius_m: circle-NMS radius between two detections of this class (m).
        tracking_distance_m: greatest centre distance at which a detection joins a track (m); None: not tracked.
        score_velocity: the velocity error (mAVE) is scored for this class (the devkit: not for static classes).
        paste: GT-sampling target, boxes of this class per sample after pasting (0: never pasted).
        attributes: the attributes (names in `ClassList.attributes`) this class may carry; none: mAAE is not scored
            for the class.
        score_orientation: the orientation error (mAOE) is scored (nuScenes: not for traffic cones).
        orientation_period_rad: yaws are compared modulo this (pi for a class whose front is undefined).
        dropped_in_exclusion_boxes: boxes centred inside one of the sample's exclusion boxes are not scored
            (nuScenes: bicycles and motorcycles in a bicycle rack).
    """

    name: str
    categories: tuple[str, ...]
    eval_range_m: float = 50.0
    nms_radius_m: float = 1.0
    tracking_distance_m: float | None = None
    score_velocity: bool = True
    paste: int = 0
    attributes: tuple[str, ...] = ()
    score_orientation: bool = True
    orientation_period_rad: float = 2.0 * math.pi
    dropped_in_exclusion_boxes: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "categories": list(self.categories), "eval_range_m": self.eval_range_m,
                "nms_radius_m": self.nms_radius_m, "tracking_distance_m": self.tracking_distance_m,
                "score_velocity": self.score_velocity, "paste": self.paste, "attributes": list(self.attributes),
                "score_orientation": self.score_orientation, "orientation_period_rad": self.orientation_period_rad,
                "dropped_in_exclusion_boxes": self.dropped_in_exclusion_boxes}

    @staticmethod
    def from_json(c: dict[str, Any]) -> "DetectionClass":
        track = c.get("tracking_distance_m")
        return DetectionClass(
            name=str(c["name"]), categories=tuple(c["categories"]), eval_range_m=float(c["eval_range_m"]),
            nms_radius_m=float(c["nms_radius_m"]), tracking_distance_m=None if track is None else float(track),
            score_velocity=bool(c["score_velocity"]), paste=int(c["paste"]), attributes=tuple(c["attributes"]),
            score_orientation=bool(c.get("score_orientation", True)),
            orientation_period_rad=float(c.get("orientation_period_rad", 2.0 * math.pi)),
            dropped_in_exclusion_boxes=bool(c.get("dropped_in_exclusion_boxes", False)))


@dataclass(frozen=True)
class ClassList:
    """The detection classes in head order, and the attributes.

    Attributes:
        classes: the classes; a label is an index into this tuple.
        attributes: attribute names; an attribute label is an index into this tuple (empty: no attributes).
        preset: "nuscenes" for the devkit's list (scored by the devkit's DetectionEval), "" for a user's list.
    """

    classes: tuple[DetectionClass, ...]
    attributes: tuple[str, ...] = ()
    preset: str = ""
    _by_category: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.classes:
            raise ConfigError("classes: the class list is empty")
        names = self.names
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ConfigError(f"classes: duplicate class name(s) {dup}")
        by_category: dict[str, int] = {}
        for i, c in enumerate(self.classes):
            unknown = [a for a in c.attributes if a not in self.attributes]
            if unknown:
                raise ConfigError(f"classes.{c.name}.attributes: {unknown} not in classes.attributes {list(self.attributes)}")
            for cat in c.categories:
                if cat in by_category and by_category[cat] != i:
                    raise ConfigError(f"classes.{c.name}.categories: {cat!r} is also a category of "
                                      f"{self.classes[by_category[cat]].name!r}")
                by_category[cat] = i
        object.__setattr__(self, "_by_category", by_category)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.classes)

    def __len__(self) -> int:
        return len(self.classes)

    def __getitem__(self, i: int) -> DetectionClass:
        return self.classes[i]

    def index(self, name: str) -> int:
        """The label of the class called `name` (ValueError if there is none)."""
        return self.names.index(name)

    def label_of_category(self, category: str) -> int | None:
        """The label a dataset category becomes, or None when no class names it."""
        return self._by_category.get(category)

    def unmapped(self, categories: Iterable[str]) -> list[str]:
        """The categories among `categories` that no class names, sorted."""
        return sorted({c for c in categories if c not in self._by_category})

    def allowed_attributes(self) -> list[list[bool]]:
        """(len(classes), len(attributes)): which attributes each class may carry."""
        return [[a in c.attributes for a in self.attributes] for c in self.classes]

    def to_json(self) -> dict[str, Any]:
        return {"preset": self.preset, "attributes": list(self.attributes),
                "classes": [c.to_json() for c in self.classes]}

    @staticmethod
    def from_json(d: dict[str, Any]) -> "ClassList":
        if d.get("preset") == "nuscenes":
            return NUSCENES
        return ClassList(classes=tuple(DetectionClass.from_json(c) for c in d["classes"]),
                         attributes=tuple(d["attributes"]), preset=str(d.get("preset", "")))

    def same_as(self, other: "ClassList") -> bool:
        """Same names, order and attributes (what a checkpoint's heads are sized and trained for)."""
        return self.names == other.names and self.attributes == other.attributes


def _nuscenes() -> ClassList:
    vehicle = ("vehicle.moving", "vehicle.stopped", "vehicle.parked")
    cycle = ("cycle.with_rider", "cycle.without_rider")
    person = ("pedestrian.moving", "pedestrian.standing", "pedestrian.sitting_lying_down")

    def cls(name, categories, rng, nms, track, paste, attrs=(), **scoring):
        return DetectionClass(name=name, categories=tuple(categories), eval_range_m=rng, nms_radius_m=nms,
                              tracking_distance_m=track, paste=paste, attributes=attrs, **scoring)

    # Ranges: the devkit's detection_cvpr_2019 config. NMS radii: the square roots of CenterPoint's nuScenes
    # thresholds (configs/nusc/*: test_cfg min_radius=[4, 12, 10, 1, 0.85, 0.175] for the task groups car, truck +
    # construction_vehicle, bus + trailer, barrier, motorcycle + bicycle, pedestrian + traffic_cone), which its
    # circle_nms compares with the SQUARED centre distance (det3d/core/utils/circle_nms_jit.py), so they are m^2.
    # CenterPoint suppresses within a task group, we within a class.
    # Tracking distances: CenterPoint's nuScenes association thresholds; the devkit tracks these 7 classes.
    # Paste counts: BEVFusion's ObjectSample sample_groups. Categories: the devkit's category_to_detection_name.
    # Scoring (detection_cvpr_2019 and `DetectionEval.evaluate`): traffic cones score neither orientation, velocity
    # nor attributes; barriers no velocity or attributes, orientation modulo pi; bicycles and motorcycles in a
    # bicycle rack (`static_object.bicycle_rack`, the exclusion boxes) are not scored.
    return ClassList(classes=(
        cls("car", ["vehicle.car"], 50.0, 2.0, 4.0, 2, vehicle),
        cls("truck", ["vehicle.truck"], 50.0, 3.4641, 4.0, 3, vehicle),
        cls("bus", ["vehicle.bus.bendy", "vehicle.bus.rigid"], 50.0, 3.1623, 5.5, 4, vehicle),
        cls("trailer", ["vehicle.trailer"], 50.0, 3.1623, 3.0, 6, vehicle),
        cls("construction_vehicle", ["vehicle.construction"], 50.0, 3.4641, None, 7, vehicle),
        cls("pedestrian", ["human.pedestrian.adult", "human.pedestrian.child", "human.pedestrian.construction_worker",
                           "human.pedestrian.police_officer"], 40.0, 0.4183, 1.0, 2, person),
        cls("motorcycle", ["vehicle.motorcycle"], 40.0, 0.922, 13.0, 6, cycle, dropped_in_exclusion_boxes=True),
        cls("bicycle", ["vehicle.bicycle"], 40.0, 0.922, 3.0, 6, cycle, dropped_in_exclusion_boxes=True),
        cls("traffic_cone", ["movable_object.trafficcone"], 30.0, 0.4183, None, 2, score_velocity=False,
            score_orientation=False),
        cls("barrier", ["movable_object.barrier"], 30.0, 1.0, None, 2, score_velocity=False,
            orientation_period_rad=math.pi),
    ), attributes=(*vehicle, *cycle, *person), preset="nuscenes")


NUSCENES: ClassList = _nuscenes()


def class_list(classes: Sequence[DetectionClass], attributes: Sequence[str] = ()) -> ClassList:
    """A user's class list (not the preset, even when it has the same names: it is scored by our metric)."""
    return ClassList(classes=tuple(classes), attributes=tuple(attributes), preset="")
