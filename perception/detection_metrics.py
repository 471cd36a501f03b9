"""The nuScenes detection metrics for any class list: AP at centre-distance thresholds, the true-positive errors
(ATE, ASE, AOE, AVE, AAE) and NDS.

A second, independent implementation, over numpy arrays, of the devkit's detection_cvpr_2019 scoring
(nuscenes-devkit 1.1: `eval/detection/algo.py`, `data_classes.DetectionMetrics`, `evaluate.DetectionEval`,
`eval/common/loaders.filter_eval_boxes`), whose `DetectionConfig` accepts only the 10 nuScenes names. It does not
import the devkit. The devkit remains the scorer of nuScenes runs (`perception.evaluation`);
`tests/test_detection_metrics.py` holds the two equal to 1e-9 on the nuScenes class list.

Everything is in the global frame: metres, radians, metres per second. What is scored:

- **Filtering**, per sample, of ground truth and predictions alike: a box is kept when its centre is closer than
  its class's `range_m` to the ego translation, in x and y; a box whose `num_pts` is 0 is dropped (ground truth
  without LiDAR or radar points); a box of a class with `dropped_in_exclusion_boxes` whose centre lies inside one
  of the sample's exclusion boxes is dropped (nuScenes: bicycles and motorcycles in a bicycle rack).
- **Matching**, per class and distance threshold: predictions in descending score (ties: the later box, in sample
  then box order, first) each take the closest ground-truth box of their class and sample not taken yet (ties:
  the earlier box) when its centre is nearer than the threshold in x, y; else they are false positives.
- **AP**: precision interpolated at the 101 recalls 0, 0.01, ..., 1 (0 beyond the highest recall reached); the
  mean over the recalls above `min_recall` of max(precision - `min_precision`, 0), over 1 - `min_precision`.
  A class without ground truth, or without any match at a threshold, has AP 0 there.
- **TP errors**, at `dist_th_tp_m`: per match, ATE (centre distance in x, y), ASE (1 - IoU of the two sizes
  aligned), AOE (smallest yaw difference modulo the class's orientation period), AVE (L2 of the velocity
  difference), AAE (1 - attribute accuracy; NaN where the ground truth has no attribute). Each error's running
  mean over the matches in score order (NaN ignored, leading NaN 0, all NaN 1) is interpolated at the confidences
  of the recall points, and the class's error is its mean over the recall points above `min_recall` up to the
  highest recall reached; 1 where that recall is not above `min_recall` (nothing matched included). An error the
  class does not score is NaN.
- **Means**: mAP is the mean over classes of the mean over thresholds. Each mean TP error is the mean over the
  classes that score it, the classes without ground truth included (with error 1); its TP score is
  max(0, 1 - error). NDS = (`mean_ap_weight` * mAP + the sum of the TP scores) / (`mean_ap_weight` + their count).

One departure, where the devkit's answer is not defined: a TP error that no class of the list scores (a list
without attributes, say) is NaN, and NDS leaves it out of both sum and count; the devkit would take the mean of
all-NaN and count a score of 0. On the nuScenes list each TP error is scored by some class.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from perception.errors import PerceptionError
from perception.classes import NUSCENES, ClassList

# The TP errors, in the devkit's order and under its names (ATE, ASE, AOE, AVE, AAE).
TP_ERRORS: tuple[str, ...] = ("trans_err", "scale_err", "orient_err", "vel_err", "attr_err")
RECALL_POINTS = 101  # recalls 0, 0.01, ..., 1 at which precision, confidence and errors are interpolated
_RECALLS = np.linspace(0.0, 1.0, RECALL_POINTS)
_TRANS, _SCALE, _ORIENT, _VEL, _ATTR = range(len(TP_ERRORS))


@dataclass(frozen=True)
class DetectionClassSpec:
    """One class of the list: its name, its evaluation range and which TP errors it scores.

    `range_m`: boxes whose centre is this far from the ego translation (x, y) or farther are not scored.
    `orientation_period_rad`: yaws are compared modulo this (pi for a class whose front is undefined).
    `scores_orientation` / `scores_velocity` / `scores_attributes`: False makes AOE / AVE / AAE NaN for the class.
    `dropped_in_exclusion_boxes`: boxes of this class centred inside an exclusion box of their sample are dropped.
    """

    name: str
    range_m: float
    orientation_period_rad: float = 2.0 * math.pi
    scores_orientation: bool = True
    scores_velocity: bool = True
    scores_attributes: bool = True
    dropped_in_exclusion_boxes: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise PerceptionError(f"detection class spec: name must be a non-empty string, got {self.name!r}")
        if not (math.isfinite(self.range_m) and self.range_m > 0):
            raise PerceptionError(f"detection class {self.name}: range_m must be a positive number, got {self.range_m!r}")
        if not (0.0 < self.orientation_period_rad <= 2.0 * math.pi):
            raise PerceptionError(f"detection class {self.name}: orientation_period_rad must be in (0, 2 pi], "
                                  f"got {self.orientation_period_rad!r}")

    @property
    def scored_errors(self) -> np.ndarray:
        """(5,) bool, in `TP_ERRORS` order: which TP errors the class scores."""
        return np.array([True, True, self.scores_orientation, self.scores_velocity, self.scores_attributes])


def class_specs(classes: ClassList) -> tuple[DetectionClassSpec, ...]:
    """The scoring of each class of a class list (`perception.classes`): its range, which TP errors it scores (AAE
    only for a class with attributes) and its orientation period and exclusion-box rule."""
    return tuple(DetectionClassSpec(c.name, c.eval_range_m, orientation_period_rad=c.orientation_period_rad,
                                    scores_orientation=c.score_orientation, scores_velocity=c.score_velocity,
                                    scores_attributes=bool(c.attributes),
                                    dropped_in_exclusion_boxes=c.dropped_in_exclusion_boxes)
                 for c in classes.classes)


# The nuScenes list as the devkit scores it (detection_cvpr_2019 and `DetectionEval.evaluate`; the preset
# documents each rule).
NUSCENES_CLASS_SPECS: tuple[DetectionClassSpec, ...] = class_specs(NUSCENES)


@dataclass(frozen=True)
class DetectionMetricSettings:
    """The settings shared by all classes (defaults: the devkit's detection_cvpr_2019).

    `dist_ths_m`: centre-distance match thresholds of AP, metres. `dist_th_tp_m`: the one of them at which the TP
    errors are taken. `min_recall`, `min_precision`: the recall and precision below which AP and TP errors do not
    count. `max_boxes_per_sample`: more predictions in one sample are an error. `mean_ap_weight`: mAP's weight in NDS
    against 1 for each TP score.
    """

    dist_ths_m: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0)
    dist_th_tp_m: float = 2.0
    min_recall: float = 0.1
    min_precision: float = 0.1
    max_boxes_per_sample: int = 500
    mean_ap_weight: float = 5.0

    def __post_init__(self) -> None:
        if not self.dist_ths_m or any(not (math.isfinite(t) and t > 0) for t in self.dist_ths_m):
            raise PerceptionError(f"detection metrics: dist_ths_m must be positive distances, got {self.dist_ths_m!r}")
        if self.dist_th_tp_m not in self.dist_ths_m:
            raise PerceptionError(f"detection metrics: dist_th_tp_m {self.dist_th_tp_m} is not one of dist_ths_m {self.dist_ths_m}")
        if not 0.0 <= self.min_recall <= 1.0:
            raise PerceptionError(f"detection metrics: min_recall must be in [0, 1], got {self.min_recall}")
        if not 0.0 <= self.min_precision < 1.0:
            raise PerceptionError(f"detection metrics: min_precision must be in [0, 1), got {self.min_precision}")
        if self.max_boxes_per_sample < 1 or self.mean_ap_weight < 0:
            raise PerceptionError("detection metrics: max_boxes_per_sample must be >= 1 and mean_ap_weight >= 0")


@dataclass(frozen=True, eq=False)
class SampleBoxes:
    """N boxes of one sample, ground truth or predictions, in the global frame.

    translation: (N, 3) float64, box centre, m.
    size: (N, 3) float64, (width, length, height), m, all > 0 (length along the heading).
    yaw: (N,) float64, heading about +z from +x, rad (`yaw_from_quaternion` converts nuScenes rotations).
    velocity: (N, 2) float64, (vx, vy), m/s; NaN where unknown (such a pair is left out of AVE).
    names: N class names. attributes: N attribute names, "" for none (None: none for every box).
    scores: (N,) float64 detection scores, finite (predictions; None for ground truth).
    num_pts: (N,) int64, LiDAR + radar points in the box; a box with 0 is not scored (None: not known, all kept).
    Sequences are accepted and stored as arrays / tuples of these dtypes.
    """

    translation: np.ndarray
    size: np.ndarray
    yaw: np.ndarray
    velocity: np.ndarray
    names: tuple[str, ...]
    attributes: tuple[str, ...] | None = None
    scores: np.ndarray | None = None
    num_pts: np.ndarray | None = None

    def __post_init__(self) -> None:
        n = len(self.names)

        def arr(value, cols: int | None, what: str, dtype=np.float64) -> np.ndarray:
            a = np.asarray(value, dtype=dtype)
            if a.size == 0 and n == 0:
                a = a.reshape((0,) if cols is None else (0, cols))
            if a.shape != ((n,) if cols is None else (n, cols)):
                raise PerceptionError(f"boxes: {what} has shape {a.shape}, expected {(n,) if cols is None else (n, cols)} "
                                      f"for {n} names")
            return a

        set_ = object.__setattr__
        set_(self, "names", tuple(self.names))
        set_(self, "attributes", ("",) * n if self.attributes is None else tuple(a or "" for a in self.attributes))
        if len(self.attributes) != n:
            raise PerceptionError(f"boxes: {len(self.attributes)} attributes for {n} names")
        set_(self, "translation", arr(self.translation, 3, "translation"))
        set_(self, "size", arr(self.size, 3, "size"))
        set_(self, "yaw", arr(self.yaw, None, "yaw"))
        set_(self, "velocity", arr(self.velocity, 2, "velocity"))
        if self.scores is not None:
            set_(self, "scores", arr(self.scores, None, "scores"))
            if not np.isfinite(self.scores).all():
                raise PerceptionError("boxes: a detection score is not finite")
        if self.num_pts is not None:
            set_(self, "num_pts", arr(self.num_pts, None, "num_pts", np.int64))
        if not (np.isfinite(self.translation).all() and np.isfinite(self.yaw).all()):
            raise PerceptionError("boxes: a translation or yaw is not finite")
        if not (np.isfinite(self.size).all() and (self.size > 0).all()):
            raise PerceptionError("boxes: every size must be finite and > 0")

    def __len__(self) -> int:
        return len(self.names)

    @classmethod
    def empty(cls, predictions: bool = False) -> SampleBoxes:
        """No boxes (with an empty `scores` array when `predictions`)."""
        return cls(np.zeros((0, 3)), np.zeros((0, 3)), np.zeros(0), np.zeros((0, 2)), (),
                   scores=np.zeros(0) if predictions else None)


@dataclass(frozen=True, eq=False)
class EvalSample:
    """One sample to score.

    ego_translation: (2,) or (3,) float64, the ego pose's position at the sample (nuScenes: the LIDAR_TOP
        keyframe's ego pose), global, m; only x and y are used.
    gt: the ground truth; pred: the predictions (`scores` required).
    exclusion_boxes: (M, 7) float64 (x, y, z, width, length, height, yaw), global, m and rad: boxes of classes
        with `dropped_in_exclusion_boxes` whose centre lies inside one (boundary included) are not scored.
    token: names the sample in error messages.
    """

    ego_translation: np.ndarray
    gt: SampleBoxes
    pred: SampleBoxes
    exclusion_boxes: np.ndarray | None = None
    token: str = ""

    def __post_init__(self) -> None:
        ego = np.asarray(self.ego_translation, dtype=np.float64)
        if ego.shape not in ((2,), (3,)) or not np.isfinite(ego).all():
            raise PerceptionError(f"sample {self.token!r}: ego_translation must be 2 or 3 finite numbers, got {ego}")
        object.__setattr__(self, "ego_translation", ego)
        ex = np.zeros((0, 7)) if self.exclusion_boxes is None else np.asarray(self.exclusion_boxes, dtype=np.float64)
        if ex.size == 0:
            ex = ex.reshape(0, 7)
        if ex.ndim != 2 or ex.shape[1] != 7 or not np.isfinite(ex).all():
            raise PerceptionError(f"sample {self.token!r}: exclusion_boxes must be (M, 7) finite numbers, got shape {ex.shape}")
        object.__setattr__(self, "exclusion_boxes", ex)
        if self.pred.scores is None and len(self.pred):
            raise PerceptionError(f"sample {self.token!r}: predictions need scores")


@dataclass(frozen=True, eq=False)
class DetectionMetricsResult:
    """The metrics of one evaluation; C classes in the order of the class list, T distance thresholds.

    ap: (C, T) float64, AP per class and threshold. mean_dist_ap: (C,) its mean over thresholds. mean_ap: mAP.
    tp_errors: (C, 5) float64, columns in `TP_ERRORS` order (m, 1 - IoU, rad, m/s, 1 - accuracy); NaN where the
        class does not score the error, 1 for a class without ground truth or matches.
    mean_tp_errors: (5,) mean over the classes that score each error; NaN where none does.
    tp_scores: (5,) max(0, 1 - mean_tp_errors); NaN where no class scores the error.
    nds: the nuScenes detection score.
    """

    class_names: tuple[str, ...]
    dist_ths_m: tuple[float, ...]
    ap: np.ndarray
    mean_dist_ap: np.ndarray
    mean_ap: float
    tp_errors: np.ndarray
    mean_tp_errors: np.ndarray
    tp_scores: np.ndarray
    nds: float

    def devkit_dict(self) -> dict:
        """The keys of the devkit's `DetectionMetrics.serialize()` (without eval_time and cfg): label_aps,
        mean_dist_aps, mean_ap, label_tp_errors, tp_errors, tp_scores, nd_score; floats, NaN kept."""
        return {
            "label_aps": {c: {t: float(self.ap[i, k]) for k, t in enumerate(self.dist_ths_m)}
                          for i, c in enumerate(self.class_names)},
            "mean_dist_aps": {c: float(self.mean_dist_ap[i]) for i, c in enumerate(self.class_names)},
            "mean_ap": self.mean_ap,
            "label_tp_errors": {c: {m: float(self.tp_errors[i, j]) for j, m in enumerate(TP_ERRORS)}
                                for i, c in enumerate(self.class_names)},
            "tp_errors": {m: float(self.mean_tp_errors[j]) for j, m in enumerate(TP_ERRORS)},
            "tp_scores": {m: float(self.tp_scores[j]) for j, m in enumerate(TP_ERRORS)},
            "nd_score": self.nds,
        }


# ------------------------------------------------------------------------------------------ pieces


def yaw_from_quaternion(q: np.ndarray) -> np.ndarray:
    """(..., 4) float64 rotations as quaternions (w, x, y, z), any norm > 0 -> (...,) float64 rad in [-pi, pi]:
    the heading in the x, y plane of the rotated +x axis (the devkit's `quaternion_yaw`)."""
    q = np.asarray(q, dtype=np.float64)
    w, x, y, z = q[..., 0], q[..., 1], q[..., 2], q[..., 3]
    return np.arctan2(2.0 * (x * y + w * z), w * w + x * x - y * y - z * z)


def yaw_difference(yaw_gt: np.ndarray, yaw_pred: np.ndarray, period_rad: float = 2.0 * math.pi) -> np.ndarray:
    """(N,) float64 yaws, rad -> (N,) float64 in [0, pi]: the smallest absolute difference modulo `period_rad`."""
    d = np.mod(np.asarray(yaw_gt, np.float64) - np.asarray(yaw_pred, np.float64) + period_rad / 2, period_rad) - period_rad / 2
    return np.abs(np.where(d > math.pi, d - 2.0 * math.pi, d))


def scale_iou(size_a: np.ndarray, size_b: np.ndarray) -> np.ndarray:
    """(N, 3) float64 sizes (w, l, h), m, > 0 -> (N,) float64: the 3D IoU of the boxes centred and aligned."""
    a, b = np.asarray(size_a, np.float64), np.asarray(size_b, np.float64)
    inter = np.prod(np.minimum(a, b), axis=-1)
    return inter / (np.prod(a, axis=-1) + np.prod(b, axis=-1) - inter)


def centre_distance(xy_a: np.ndarray, xy_b: np.ndarray) -> np.ndarray:
    """(..., 2+) float64 centres, m (only x, y are used) -> (...,) float64 distance in x, y, m."""
    dx = xy_a[..., 0] - xy_b[..., 0]
    dy = xy_a[..., 1] - xy_b[..., 1]
    return np.sqrt(dx * dx + dy * dy)


def running_mean(errors: np.ndarray) -> np.ndarray:
    """(M, K) float64 -> (M, K): per column, the mean of rows 0..m ignoring NaN; 0 while only NaN has been seen,
    and 1 everywhere in a column that is all NaN (the devkit's `cummean`)."""
    valid = ~np.isnan(errors)
    counts = np.cumsum(valid, axis=0)
    sums = np.nancumsum(errors, axis=0)
    out = np.divide(sums, counts, out=np.zeros_like(sums), where=counts != 0)
    out[:, ~valid.any(axis=0)] = 1.0
    return out


def _first_scored_recall(min_recall: float) -> int:
    """Index of the first of the `RECALL_POINTS` recalls above `min_recall` (the point at it is excluded)."""
    return round((RECALL_POINTS - 1) * min_recall) + 1


def average_precision(precision: np.ndarray, min_recall: float, min_precision: float) -> float:
    """(101,) float64 precision at the recalls 0, 0.01, ..., 1 -> AP above `min_recall` and `min_precision`."""
    p = precision[_first_scored_recall(min_recall):] - min_precision
    p[p < 0] = 0.0
    return float(np.mean(p)) / (1.0 - min_precision)


# ---------------------------------------------------------------------------------------- evaluation


@dataclass(frozen=True)
class _Flat:
    """The kept boxes of all samples, flat, in sample then box order: sample (N,) int64 index into the samples,
    label (N,) int64 index into the class list, the `SampleBoxes` fields, and attribute (N,) object (str)."""

    sample: np.ndarray
    label: np.ndarray
    translation: np.ndarray
    size: np.ndarray
    yaw: np.ndarray
    velocity: np.ndarray
    attribute: np.ndarray
    score: np.ndarray


def _flatten(samples: Sequence[EvalSample], gt: bool, classes: Sequence[DetectionClassSpec],
             settings: DetectionMetricSettings) -> _Flat:
    index = {c.name: i for i, c in enumerate(classes)}
    ranges = np.array([c.range_m for c in classes], dtype=np.float64)
    excludable = np.array([c.dropped_in_exclusion_boxes for c in classes], dtype=bool)
    parts: list[tuple] = []
    for s, sample in enumerate(samples):
        boxes = sample.gt if gt else sample.pred
        if not gt and len(boxes) > settings.max_boxes_per_sample:
            raise PerceptionError(f"sample {sample.token!r}: {len(boxes)} predictions, at most "
                                  f"{settings.max_boxes_per_sample} are allowed")
        unknown = [n for n in boxes.names if n not in index]
        if unknown:
            raise PerceptionError(f"sample {sample.token!r}: {'ground truth' if gt else 'prediction'} of class "
                                  f"{unknown[0]!r}, which is not in the class list ({', '.join(index)})")
        label = np.array([index[n] for n in boxes.names], dtype=np.int64)
        keep = centre_distance(boxes.translation, sample.ego_translation) < ranges[label]
        if boxes.num_pts is not None:
            keep &= boxes.num_pts != 0
        if len(sample.exclusion_boxes):
            keep &= ~(excludable[label] & _inside_any(boxes.translation, sample.exclusion_boxes))
        scores = boxes.scores if boxes.scores is not None else np.full(len(boxes), np.nan)
        parts.append((np.full(int(keep.sum()), s, dtype=np.int64), label[keep], boxes.translation[keep],
                      boxes.size[keep], boxes.yaw[keep], boxes.velocity[keep],
                      np.array(boxes.attributes, dtype=object)[keep] if len(boxes) else np.zeros(0, dtype=object),
                      scores[keep]))
    if not parts:
        return _Flat(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, 3)), np.zeros((0, 3)), np.zeros(0),
                     np.zeros((0, 2)), np.zeros(0, dtype=object), np.zeros(0))
    return _Flat(*(np.concatenate(col) for col in zip(*parts)))


def _inside_any(centres: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """(N, 3) points and (M, 7) boxes (x, y, z, w, l, h, yaw), global, m / rad -> (N,) bool: inside one of them,
    boundary included."""
    d = centres[:, None, :] - boxes[None, :, :3]  # (N, M, 3)
    c, s = np.cos(boxes[:, 6]), np.sin(boxes[:, 6])
    along = c * d[..., 0] + s * d[..., 1]  # along the length
    across = -s * d[..., 0] + c * d[..., 1]  # along the width
    inside = ((np.abs(along) <= boxes[:, 4] / 2) & (np.abs(across) <= boxes[:, 3] / 2)
              & (np.abs(d[..., 2]) <= boxes[:, 5] / 2))
    return inside.any(axis=1)


def _greedy_matches(gt: _Flat, g_idx: np.ndarray, pred: _Flat, p_ranked: np.ndarray,
                    dist_ths: Sequence[float]) -> np.ndarray:
    """Greedy matching of one class at each threshold.

    g_idx: (G,) int64 the class's ground-truth rows of `gt`, in order; p_ranked: (P,) int64 its prediction rows
    of `pred`, best first. Returns (T, P) int64: the matched row of `gt` per threshold and ranked prediction, -1 for
    a false positive. Samples do not interact: each sample's predictions are matched in rank order against its own
    ground truth, the closest free box first (ties: the earlier box), if nearer than the threshold."""
    out = np.full((len(dist_ths), len(p_ranked)), -1, dtype=np.int64)
    ps, gs = pred.sample[p_ranked], gt.sample[g_idx]
    p_order = np.argsort(ps, kind="stable")  # by sample, rank order kept within one
    g_order = np.argsort(gs, kind="stable")
    p_samples, p_start = np.unique(ps[p_order], return_index=True)
    g_samples, g_start = np.unique(gs[g_order], return_index=True)
    p_bounds = dict(zip(p_samples.tolist(), zip(p_start.tolist(), [*p_start[1:].tolist(), len(p_order)])))
    g_bounds = dict(zip(g_samples.tolist(), zip(g_start.tolist(), [*g_start[1:].tolist(), len(g_order)])))
    for s, (p0, p1) in p_bounds.items():
        if s not in g_bounds:
            continue
        g0, g1 = g_bounds[s]
        ranks = p_order[p0:p1]  # positions in p_ranked, ascending
        rows = g_idx[g_order[g0:g1]]  # gt rows, ascending
        dist = centre_distance(pred.translation[p_ranked[ranks]][:, None, :], gt.translation[rows][None, :, :])
        order = np.argsort(dist, axis=1, kind="stable")
        dist_sorted = np.take_along_axis(dist, order, axis=1)
        nearest = dist_sorted[:, 0]
        for t, th in enumerate(dist_ths):
            taken = np.zeros(len(rows), dtype=bool)
            for r in np.flatnonzero(nearest < th).tolist():
                for j, k in enumerate(order[r].tolist()):
                    if dist_sorted[r, j] >= th:
                        break
                    if not taken[k]:
                        taken[k] = True
                        out[t, ranks[r]] = rows[k]
                        break
    return out


def _class_metrics(gt: _Flat, pred: _Flat, c: int, spec: DetectionClassSpec,
                   settings: DetectionMetricSettings) -> tuple[np.ndarray, np.ndarray]:
    """(T,) AP per threshold and (5,) TP errors (NaN where not scored) of class `c`."""
    n_th = len(settings.dist_ths_m)
    ap = np.zeros(n_th)
    errors = np.where(spec.scored_errors, 1.0, np.nan)  # no ground truth, or no match: error 1
    g_idx = np.flatnonzero(gt.label == c)
    p_idx = np.flatnonzero(pred.label == c)
    if len(g_idx) == 0 or len(p_idx) == 0:
        return ap, errors
    scores = pred.score[p_idx]
    p_ranked = p_idx[np.lexsort((-np.arange(len(p_idx)), -scores))]  # score descending, then the later box first
    conf = pred.score[p_ranked]
    matches = _greedy_matches(gt, g_idx, pred, p_ranked, settings.dist_ths_m)
    for t, th in enumerate(settings.dist_ths_m):
        is_tp = matches[t] >= 0
        if not is_tp.any():
            continue  # AP 0; TP errors 1 at dist_th_tp_m
        tp = np.cumsum(is_tp).astype(np.float64)
        fp = np.cumsum(~is_tp).astype(np.float64)
        recall = tp / float(len(g_idx))
        precision = np.interp(_RECALLS, recall, tp / (fp + tp), right=0)
        ap[t] = average_precision(precision, settings.min_recall, settings.min_precision)
        if th != settings.dist_th_tp_m:
            continue
        conf_at_recall = np.interp(_RECALLS, recall, conf, right=0)
        p_rows, g_rows = p_ranked[is_tp], matches[t][is_tp]
        err = np.full((len(p_rows), len(TP_ERRORS)), np.nan)
        err[:, _TRANS] = centre_distance(pred.translation[p_rows], gt.translation[g_rows])
        err[:, _SCALE] = 1.0 - scale_iou(gt.size[g_rows], pred.size[p_rows])
        err[:, _ORIENT] = yaw_difference(gt.yaw[g_rows], pred.yaw[p_rows], spec.orientation_period_rad)
        dv = pred.velocity[p_rows] - gt.velocity[g_rows]
        err[:, _VEL] = np.sqrt(dv[:, 0] * dv[:, 0] + dv[:, 1] * dv[:, 1])
        gt_attr = gt.attribute[g_rows]
        err[:, _ATTR] = np.where(gt_attr == "", np.nan, 1.0 - (gt_attr == pred.attribute[p_rows]).astype(np.float64))
        means = running_mean(err)
        match_conf = pred.score[p_rows]
        first = _first_scored_recall(settings.min_recall)
        nonzero = np.flatnonzero(conf_at_recall)
        last = int(nonzero[-1]) if len(nonzero) else 0  # the highest recall reached
        for j in np.flatnonzero(spec.scored_errors):
            if last < first:
                errors[j] = 1.0
            else:  # the running means at the recall points' confidences (np.interp needs ascending abscissae)
                at_recall = np.interp(conf_at_recall[::-1], match_conf[::-1], means[::-1, j])[::-1]
                errors[j] = float(np.mean(at_recall[first:last + 1]))
    return ap, errors


def evaluate_detection(samples: Sequence[EvalSample], classes: Sequence[DetectionClassSpec],
                       settings: DetectionMetricSettings = DetectionMetricSettings()) -> DetectionMetricsResult:
    """Score predictions against ground truth over `samples` for the class list `classes` (see the module
    docstring for the algorithm). Boxes of a class not in the list, or more than `max_boxes_per_sample`
    predictions in a sample, raise PerceptionError naming the sample."""
    classes = tuple(classes)
    names = tuple(c.name for c in classes)
    if not classes or len(set(names)) != len(names):
        raise PerceptionError(f"detection metrics: the class list must be non-empty names without repeats, got {names}")
    gt = _flatten(samples, True, classes, settings)
    pred = _flatten(samples, False, classes, settings)
    per_class = [_class_metrics(gt, pred, c, spec, settings) for c, spec in enumerate(classes)]
    ap = np.array([a for a, _ in per_class]).reshape(len(classes), len(settings.dist_ths_m))
    tp_errors = np.array([e for _, e in per_class]).reshape(len(classes), len(TP_ERRORS))
    mean_dist_ap = np.array([float(np.mean(row)) for row in ap])
    mean_ap = float(np.mean(mean_dist_ap))
    scored = np.array([spec.scored_errors for spec in classes]).any(axis=0)  # (5,) some class scores the error
    mean_tp = np.full(len(TP_ERRORS), np.nan)
    mean_tp[scored] = [float(np.nanmean(tp_errors[:, j])) for j in np.flatnonzero(scored)]
    tp_scores = np.where(scored, np.maximum(0.0, 1.0 - mean_tp), np.nan)
    nds = float(settings.mean_ap_weight * mean_ap + np.sum(tp_scores[scored])) / float(settings.mean_ap_weight + scored.sum())
    return DetectionMetricsResult(class_names=names, dist_ths_m=tuple(settings.dist_ths_m), ap=ap,
                                  mean_dist_ap=mean_dist_ap, mean_ap=mean_ap, tp_errors=tp_errors,
                                  mean_tp_errors=mean_tp, tp_scores=tp_scores, nds=nds)
