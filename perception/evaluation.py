"""Offline evaluation with the official nuScenes metrics, plus map segmentation and scene tags.

Detection numbers come from the devkit's `DetectionEval` itself (detection_cvpr_2019). To keep evaluation
within a 16-24 GB machine on v1.0-trainval, the devkit is handed a `LeanNuScenes`: the devkit's own class with
only what `DetectionEval` reads (samples, annotations, and the LIDAR_TOP keyframes' sample_data and ego poses;
the 2.6 M sweep records and their poses are dropped while loading, and the lean tables are cached in
``$PERCEPTION_CACHE``, so a second evaluation of the same dataroot skips the big tables). `tests/test_evaluation.py`
checks that it gives the same metrics as the full `NuScenes`.

Map segmentation IoU is accumulated per class at thresholds 0.35 ... 0.65 over the samples that have map
ground truth, under two protocols, each under its own keys:
  - ours (`seg_iou`, `seg_miou`, `seg_threshold`): on the model's map grid, at the one threshold that maximises
    the mean over classes;
  - BEVFusion's (`seg_iou_bevfusion`, `seg_miou_bevfusion`, `seg_thresholds_bevfusion`): the predicted
    probabilities bilinearly resampled onto its fixed 200 x 200 grid of 0.5 m (`BEVFUSION_MAP_GRID`), ground
    truth rasterised on that grid, each class at its own best threshold, then the mean.
Scene tags get average precision per tag (sklearn-free) over the samples whose tags are known. Metrics that
no sample can give (no map expansion, no scene tags) are None (`null` in metrics.json), never 0.

mmdet3d info files (`info=`): the samples are the file's, the detection ground truth is still the devkit's, read
from the tables of the same dataroot (the official filtering and attributes; the file's boxes are not used for
scoring). Every sample token of the file must be in the tables; a dataroot without tables is an error before
anything runs (`require_tables`), not null metrics: a null NDS would pass silently into best-checkpoint choice
and robustness ratios. Predictions alone can still be drawn with `perception viz --info`.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterable, Sequence
from unittest import mock

import numpy as np
import torch
import torch.distributed as dist

from perception.cache import atomic_write, cache_path, table_fingerprint
from perception.checkpoint import model_from_checkpoint
from perception.data.build import build_dataset
from perception.data.collate import collate_samples
from perception.data.loader import SampleLoader
from perception.data.dataset import split_scene_names
from perception.data.mmdet3d_info import info_sample_tokens
from perception.classes import NUSCENES, ClassList
from perception.data.submission import submission_entries, write_submission
from perception.detection_metrics import EvalSample, SampleBoxes, class_specs, evaluate_detection, yaw_from_quaternion
from perception.distributed import pick_device
from perception.errors import DataError, PerceptionError
from perception.model.bevfusion import Prediction
from perception.model.lidar_velocity import LidarVelocityConfig
from perception.model.temporal import TemporalState
from perception.progress import progress_bar
from perception.structures import BEVFUSION_MAP_GRID, DETECTION_CLASSES, LIDAR_CHANNEL, MAP_CLASSES, SCENE_TAGS, BEVGrid

log = logging.getLogger(__name__)

SEG_THRESHOLDS: tuple[float, ...] = (0.35, 0.40, 0.45, 0.50, 0.55, 0.60, 0.65)
METRIC_KEYS = ("nds", "map", "mate", "mase", "maoe", "mave", "maae", "per_class_ap", "seg_iou", "seg_miou",
               "seg_iou_bevfusion", "seg_miou_bevfusion", "scene_map")


# ------------------------------------------------------------------------------------------- devkit


_LEAN_TABLES = ("category", "attribute", "visibility", "instance", "sensor", "calibrated_sensor", "log", "scene",
                "sample", "sample_annotation", "map", "sample_data", "ego_pose")


def _read_table(table_root: Path, name: str) -> list[dict]:
    path = table_root / f"{name}.json"
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"cannot read table: {exc}", path=path) from None


def lean_eval_tables(version: str, dataroot: str | Path) -> dict[str, list[dict]]:
    """The records `DetectionEval` reads: every table but `sample_data` and `ego_pose`, of which only the
    LIDAR_TOP keyframes and their poses are kept. Cached as JSON in ``$PERCEPTION_CACHE/lean_eval_index``
    (`perception.cache`), keyed by the dataroot and the tables' sizes and mtimes; never in the dataroot. A
    cache that cannot be written is logged and skipped."""
    table_root = Path(dataroot) / version
    key = {"format": 1, "dataroot": str(Path(dataroot).resolve()), "version": version,
           "tables": table_fingerprint(dataroot, version)}
    path = cache_path("lean_eval_index", key, ".tables.json")  # the key goes beside it as <digest>.json
    if path.is_file():
        try:
            with open(path) as f:
                tables = json.load(f)
            if set(tables) == set(_LEAN_TABLES):
                log.info("lean evaluation index: cache hit %s", path)
                return tables
        except (OSError, json.JSONDecodeError) as exc:
            log.warning("lean evaluation index: unreadable cache file %s (%s); rebuilding", path, exc)
    tables = {name: _read_table(table_root, name) for name in _LEAN_TABLES[:-2]}
    sensors = {s["token"]: s["channel"] for s in tables["sensor"]}
    lidar_calibs = {c["token"] for c in tables["calibrated_sensor"] if sensors.get(c["sensor_token"]) == "LIDAR_TOP"}
    sample_data = _read_table(table_root, "sample_data")
    tables["sample_data"] = [sd for sd in sample_data if sd["is_key_frame"] and sd["calibrated_sensor_token"] in lidar_calibs]
    del sample_data
    gc.collect()
    poses = {sd["ego_pose_token"] for sd in tables["sample_data"]}
    ego_pose = _read_table(table_root, "ego_pose")
    tables["ego_pose"] = [p for p in ego_pose if p["token"] in poses]
    del ego_pose
    gc.collect()
    try:
        with atomic_write(path, key) as f:
            f.write(json.dumps(tables).encode())
        log.info("lean evaluation index: cached in %s", path)
    except PerceptionError as exc:
        log.warning("lean evaluation index: %s", exc)
    return tables


# This process's LeanNuScenes and filtered ground truth, shared by every evaluation (all robustness conditions,
# every validation of a training run); keyed by the dataroot and its tables' sizes and mtimes, so rewritten
# tables are read again. Nothing here is modified by an evaluation.
_SHARED_NUSC: dict[tuple, object] = {}
_SHARED_GT: dict[tuple, object] = {}


def _tables_key(version: str, dataroot: str | Path) -> tuple:
    return (str(Path(dataroot).resolve()), version, json.dumps(table_fingerprint(dataroot, version), sort_keys=True))


def shared_lean_nuscenes(version: str, dataroot: str | Path):
    """`load_lean_nuscenes`, loaded once per process and dataroot (tables unchanged) and then shared."""
    key = _tables_key(version, dataroot)
    if key not in _SHARED_NUSC:
        _SHARED_NUSC.clear()  # one dataroot at a time: a LeanNuScenes of trainval holds ~1 GB
        _SHARED_GT.clear()
        _SHARED_NUSC[key] = load_lean_nuscenes(version, dataroot)
    return _SHARED_NUSC[key]


def load_lean_nuscenes(version: str, dataroot: str | Path):
    """A `nuscenes.NuScenes` holding only what `DetectionEval` needs (see the module docstring)."""
    from nuscenes.nuscenes import NuScenes  # heavy: the devkit takes ~1 s to import

    class LeanNuScenes(NuScenes):
        def __init__(self, version: str, dataroot: str):
            self.version = version
            self.dataroot = dataroot
            self.verbose = False
            self.table_names = ["category", "attribute", "visibility", "instance", "sensor", "calibrated_sensor",
                                "ego_pose", "log", "scene", "sample", "sample_data", "sample_annotation", "map"]
            for name, records in lean_eval_tables(version, dataroot).items():
                setattr(self, name, records)
            self._token2ind = {t: {r["token"]: i for i, r in enumerate(getattr(self, t))} for t in self.table_names}
            for record in self.sample_annotation:
                inst = self.get("instance", record["instance_token"])
                record["category_name"] = self.get("category", inst["category_token"])["name"]
            for record in self.sample:
                record["data"] = {}
                record["anns"] = []
            for sd in self.sample_data:
                self.get("sample", sd["sample_token"])["data"]["LIDAR_TOP"] = sd["token"]
            for ann in self.sample_annotation:
                self.get("sample", ann["sample_token"])["anns"].append(ann["token"])
            missing = [s["token"] for s in self.sample if "LIDAR_TOP" not in s["data"]]
            if missing:
                raise DataError(f"{len(missing)} samples have no LIDAR_TOP keyframe, e.g. {missing[0]}", path=self.table_root)

    return LeanNuScenes(version, str(dataroot))


MAX_BOXES_PER_SAMPLE = 500  # the devkit's limit (detection_cvpr_2019)


def split_sample_tokens(dataroot: str | Path, version: str, split: str) -> set[str]:
    """Sample tokens of a split, read from the scene and sample tables (no devkit load)."""
    names = split_scene_names(version, split, dataroot)
    table = Path(dataroot) / version
    try:
        scenes = json.loads((table / "scene.json").read_text())
        samples = json.loads((table / "sample.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"cannot read the scene/sample tables: {exc}", path=table) from None
    keep = {s["token"] for s in scenes if names is None or s["name"] in names}
    return {s["token"] for s in samples if s["scene_token"] in keep}


def require_tables(dataroot: str | Path, version: str, why: str) -> None:
    """Raise DataError unless `<dataroot>/<version>/` holds the devkit tables (`why` says what needs them)."""
    table = Path(dataroot) / version
    if not (table / "sample.json").is_file():
        raise DataError(f"no {version} tables (sample.json, ...) under the dataroot: {why}", path=dataroot)


def check_tokens_in_tables(dataroot: str | Path, version: str, tokens: Iterable[str], source: str | Path) -> None:
    """Raise DataError naming `source` (e.g. an info file) unless every token is a sample of the tables."""
    require_tables(dataroot, version, f"detection metrics of {source} need them for the ground truth")
    path = Path(dataroot) / version / "sample.json"
    try:
        known = {s["token"] for s in json.loads(path.read_text())}
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise DataError(f"cannot read the sample table: {exc}", path=path) from None
    missing = sorted(set(tokens) - known)
    if missing:
        raise DataError(f"{len(missing)} sample token(s) are not in the {version} tables of {dataroot}, e.g. "
                        f"{missing[0]}: the detection ground truth comes from those tables", path=source)


def validate_submission(path: str | Path, expected_tokens: set[str], classes: ClassList = NUSCENES) -> dict:
    """Load a nuScenes detection submission and check it before any metric is computed.

    Rejects (PerceptionError naming the file, sample and box): unreadable JSON, missing meta keys, samples of
    the split that are missing or samples that are not in it, unknown class or attribute names, an attribute
    that the class cannot have, non-finite numbers, non-positive sizes, scores outside [0, 1], and more than
    500 boxes in a sample. Returns the parsed submission.
    """
    path = Path(path)
    try:
        sub = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PerceptionError(f"{path}: submission is not readable JSON ({exc})") from None
    if not isinstance(sub, dict) or not isinstance(sub.get("meta"), dict) or not isinstance(sub.get("results"), dict):
        raise PerceptionError(f"{path}: a submission is {{'meta': {{...}}, 'results': {{sample_token: [boxes]}}}}")
    missing_meta = [k for k in ("use_camera", "use_lidar", "use_radar", "use_map", "use_external") if k not in sub["meta"]]
    if missing_meta:
        raise PerceptionError(f"{path}: meta lacks {missing_meta}")
    results = sub["results"]
    missing = expected_tokens - set(results)
    extra = set(results) - expected_tokens
    if missing:
        raise PerceptionError(f"{path}: {len(missing)} sample(s) of the split have no entry (use [] for no boxes), e.g. {sorted(missing)[0]}")
    if extra:
        raise PerceptionError(f"{path}: {len(extra)} sample(s) are not in the split, e.g. {sorted(extra)[0]}")

    def bad(token: str, k: int, what: str) -> PerceptionError:
        return PerceptionError(f"{path}: sample {token}, box {k}: {what}")

    for token, boxes in results.items():
        if not isinstance(boxes, list):
            raise PerceptionError(f"{path}: sample {token}: expected a list of boxes")
        if len(boxes) > MAX_BOXES_PER_SAMPLE:
            raise PerceptionError(f"{path}: sample {token} has {len(boxes)} boxes; at most {MAX_BOXES_PER_SAMPLE} are allowed")
        for k, b in enumerate(boxes):
            if not isinstance(b, dict):
                raise bad(token, k, "not an object")
            for key, n in (("translation", 3), ("size", 3), ("rotation", 4), ("velocity", 2)):
                v = b.get(key)
                if not isinstance(v, list) or len(v) != n or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v):
                    raise bad(token, k, f"{key} must be {n} numbers, got {v!r}")
                if not all(math.isfinite(x) for x in v):
                    raise bad(token, k, f"{key} has a non-finite value: {v}")
            if min(b["size"]) <= 0:
                raise bad(token, k, f"size must be positive, got {b['size']}")
            name = b.get("detection_name")
            if name not in classes.names:
                raise bad(token, k, f"unknown detection_name {name!r} (expected one of {', '.join(classes.names)})")
            score = b.get("detection_score")
            if not isinstance(score, (int, float)) or not math.isfinite(score) or not 0.0 <= score <= 1.0:
                raise bad(token, k, f"detection_score must be a number in [0, 1], got {score!r}")
            attr = b.get("attribute_name", "")
            if attr and attr not in classes[classes.index(name)].attributes:
                raise bad(token, k, f"attribute_name {attr!r} is not valid for {name}")
            if b.get("sample_token") != token:
                raise bad(token, k, f"sample_token {b.get('sample_token')!r} differs from its key")
    return sub


def detection_eval(dataroot: str | Path, version: str, split: str, submission: str | Path, out_dir: str | Path,
                   nusc=None, sample_tokens: Iterable[str] | None = None, classes: ClassList = NUSCENES) -> dict:
    """Run the devkit's `DetectionEval` (detection_cvpr_2019) on a submission file; for a class list other than
    the nuScenes preset, our implementation of the same metrics (`class_list_detection_eval`).

    Returns the devkit's serialized metrics (keys nd_score, mean_ap, mean_dist_aps, tp_errors, label_tp_errors...).
    `nusc`: an already loaded `NuScenes` (default: a `LeanNuScenes`).
    `sample_tokens`: score exactly these samples of the tables (an mmdet3d info file's) instead of the devkit
        split `split`, which then only names them. They go through the devkit's own custom-split path
        (`load_prediction_of_sample_tokens`, `load_gt_of_sample_tokens`), whose one lookup of the split's samples
        (`get_samples_of_custom_split`) is answered with these tokens while `DetectionEval` is built.
    """
    if classes.preset != "nuscenes":
        tokens = set(sample_tokens) if sample_tokens is not None else split_sample_tokens(dataroot, version, split)
        if sample_tokens is not None:
            check_tokens_in_tables(dataroot, version, tokens, split)
        sub = validate_submission(submission, tokens, classes)
        return class_list_detection_eval(nusc if nusc is not None else shared_lean_nuscenes(version, dataroot),
                                         list(sub["results"]), sub, classes)
    import nuscenes.eval.detection.evaluate as devkit_evaluate  # heavy: the devkit takes ~1 s to import
    from nuscenes.eval.common.config import config_factory  # heavy: the devkit takes ~1 s to import

    if sample_tokens is not None:
        check_tokens_in_tables(dataroot, version, sample_tokens, split)
        # in the submission's order, as the split path loads predictions (it breaks ties in score)
        tokens = list(validate_submission(submission, set(sample_tokens))["results"])
        eval_set = "perception-sample-tokens"  # not a devkit split: DetectionEval takes its custom-split path
        scope = mock.patch.object(devkit_evaluate, "get_samples_of_custom_split", lambda split_name, nusc: tokens)
    else:
        validate_submission(submission, split_sample_tokens(dataroot, version, split))
        eval_set, scope = split, contextlib.nullcontext()
    shared = nusc is None
    if shared:
        nusc = shared_lean_nuscenes(version, dataroot)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = config_factory("detection_cvpr_2019")
    try:
        with scope:
            if shared:
                ev = _shared_gt_detection_eval(nusc, cfg, str(submission), eval_set, str(out_dir / "detection"),
                                               key=(*_tables_key(version, dataroot), eval_set,
                                                    None if sample_tokens is None else tuple(sorted(sample_tokens))))
            else:
                ev = devkit_evaluate.DetectionEval(nusc, cfg, result_path=str(submission), eval_set=eval_set,
                                                   output_dir=str(out_dir / "detection"), verbose=False)
    except AssertionError as exc:  # the devkit reports a bad submission with bare asserts
        raise PerceptionError(f"{submission}: not a valid submission for split {split}: {exc}") from None
    metrics, _ = ev.evaluate()
    return metrics.serialize()


def _shared_gt_detection_eval(nusc, cfg, result_path: str, eval_set: str, output_dir: str, key: tuple):
    """The devkit's `DetectionEval` as its `__init__` builds it (nuscenes-devkit 1.1: load predictions and ground
    truth of the split, add centre distances, filter both by class range, points and bike racks), except that
    the ground truth, the same for every submission of a split, is built once per process (`key`) and shared.
    `tests/test_evaluation.py` checks it against the devkit's own `DetectionEval`."""
    import nuscenes.eval.detection.evaluate as E  # heavy: the devkit takes ~1 s to import

    ev = E.DetectionEval.__new__(E.DetectionEval)
    ev.nusc, ev.result_path, ev.eval_set, ev.output_dir, ev.verbose, ev.cfg = nusc, result_path, eval_set, output_dir, False, cfg
    assert os.path.exists(result_path), "Error: The result file does not exist!"
    ev.plot_dir = os.path.join(output_dir, "plots")
    os.makedirs(ev.plot_dir, exist_ok=True)
    if E.is_predefined_split(split_name=eval_set):
        ev.pred_boxes, ev.meta = E.load_prediction(result_path, cfg.max_boxes_per_sample, E.DetectionBox, verbose=False)
        load_gt = lambda: E.load_gt(nusc, eval_set, E.DetectionBox, verbose=False)  # noqa: E731
    else:
        tokens = E.get_samples_of_custom_split(split_name=eval_set, nusc=nusc)
        ev.pred_boxes, ev.meta = E.load_prediction_of_sample_tokens(result_path, cfg.max_boxes_per_sample,
                                                                    E.DetectionBox, sample_tokens=tokens, verbose=False)
        load_gt = lambda: E.load_gt_of_sample_tokens(nusc, tokens, E.DetectionBox, verbose=False)  # noqa: E731
    if key not in _SHARED_GT:
        gt = load_gt()
        # keep the devkit's order of checks: an unfiltered split/prediction mismatch is reported first
        assert set(ev.pred_boxes.sample_tokens) == set(gt.sample_tokens), \
            "Samples in split doesn't match samples in predictions."
        gt = E.add_center_dist(nusc, gt)
        _SHARED_GT[key] = E.filter_eval_boxes(nusc, gt, cfg.class_range, verbose=False)
    ev.gt_boxes = _SHARED_GT[key]
    assert set(ev.pred_boxes.sample_tokens) == set(ev.gt_boxes.sample_tokens), \
        "Samples in split doesn't match samples in predictions."
    ev.pred_boxes = E.add_center_dist(nusc, ev.pred_boxes)
    ev.pred_boxes = E.filter_eval_boxes(nusc, ev.pred_boxes, cfg.class_range, verbose=False)
    ev.sample_tokens = ev.gt_boxes.sample_tokens
    return ev


def class_list_detection_eval(nusc, tokens: Sequence[str], submission: dict, classes: ClassList) -> dict:
    """The nuScenes detection metrics of a validated `submission` over the samples `tokens`, for any class list
    (`perception.detection_metrics`, equal to the devkit's `DetectionEval` on the nuScenes list). Ground truth
    from the tables as the devkit's `load_gt` reads it, each category mapped by the class list: global centre,
    size, yaw, velocity (`box_velocity`), attribute (when the class has it) and LiDAR + radar points; the ego
    position is the reference LiDAR keyframe's ego pose (`add_center_dist`); bicycle racks are the exclusion
    boxes. Returns the devkit's serialized keys (`DetectionMetricsResult.devkit_dict`)."""
    samples = []
    for tok in tokens:
        sample = nusc.get("sample", tok)
        lidar = nusc.get("sample_data", sample["data"][LIDAR_CHANNEL])
        ego = np.asarray(nusc.get("ego_pose", lidar["ego_pose_token"])["translation"], np.float64)
        rows, racks = [], []
        for ann_token in sample["anns"]:
            a = nusc.get("sample_annotation", ann_token)
            yaw = float(yaw_from_quaternion(np.asarray(a["rotation"], np.float64)))
            if a["category_name"] == "static_object.bicycle_rack":
                racks.append([*a["translation"], *a["size"], yaw])
            label = classes.label_of_category(a["category_name"])
            if label is None:
                continue
            attr = nusc.get("attribute", a["attribute_tokens"][0])["name"] if len(a["attribute_tokens"]) == 1 else ""
            rows.append((classes.names[label], a["translation"], a["size"], yaw, nusc.box_velocity(ann_token)[:2],
                         attr if attr in classes[label].attributes else "", a["num_lidar_pts"] + a["num_radar_pts"]))
        gt = SampleBoxes(translation=[r[1] for r in rows], size=[r[2] for r in rows], yaw=[r[3] for r in rows],
                         velocity=[r[4] for r in rows], names=[r[0] for r in rows], attributes=[r[5] for r in rows],
                         num_pts=[r[6] for r in rows])
        boxes = submission["results"][tok]
        pred = SampleBoxes(translation=[b["translation"] for b in boxes], size=[b["size"] for b in boxes],
                           yaw=[float(yaw_from_quaternion(np.asarray(b["rotation"], np.float64))) for b in boxes],
                           velocity=[b["velocity"] for b in boxes], names=[b["detection_name"] for b in boxes],
                           attributes=[b.get("attribute_name", "") for b in boxes],
                           scores=[b["detection_score"] for b in boxes])
        samples.append(EvalSample(ego_translation=ego, gt=gt, pred=pred, exclusion_boxes=np.asarray(racks).reshape(-1, 7),
                                  token=tok))
    return evaluate_detection(samples, class_specs(classes)).devkit_dict()


def summarise_detection(devkit: dict) -> dict:
    """The devkit's metrics -> our flat keys (nds, map, mATE..., per_class_ap, per_class_tp_errors)."""
    tp = devkit["tp_errors"]
    return {
        "nds": float(devkit["nd_score"]),
        "map": float(devkit["mean_ap"]),
        "mate": float(tp["trans_err"]),
        "mase": float(tp["scale_err"]),
        "maoe": float(tp["orient_err"]),
        "mave": float(tp["vel_err"]),
        "maae": float(tp["attr_err"]),
        "per_class_ap": {k: float(v) for k, v in devkit["mean_dist_aps"].items()},
        "per_class_tp_errors": {k: {m: (None if np.isnan(v) else float(v)) for m, v in d.items()} for k, d in devkit["label_tp_errors"].items()},
    }


# ------------------------------------------------------------------------------------ seg and scenes


@dataclass
class SegmentationStats:
    """Per-class intersection / union pixel counts at each threshold of `SEG_THRESHOLDS`, summed over the
    `samples` updated so far."""

    intersection: np.ndarray = field(default_factory=lambda: np.zeros((len(SEG_THRESHOLDS), len(MAP_CLASSES)), np.int64))
    union: np.ndarray = field(default_factory=lambda: np.zeros((len(SEG_THRESHOLDS), len(MAP_CLASSES)), np.int64))
    samples: int = 0

    def update(self, probs: torch.Tensor, target: torch.Tensor) -> None:
        """probs (C, H, W) float in [0, 1]; target (C, H, W) {0, 1}."""
        t = target.bool()
        for k, thr in enumerate(SEG_THRESHOLDS):
            p = probs >= thr
            self.intersection[k] += (p & t).flatten(1).sum(1).cpu().numpy()
            self.union[k] += (p | t).flatten(1).sum(1).cpu().numpy()
        self.samples += 1

    def merge(self, other: "SegmentationStats") -> None:
        self.intersection += other.intersection
        self.union += other.union
        self.samples += other.samples

    def _iou(self) -> np.ndarray:
        return self.intersection / np.maximum(self.union, 1)

    def result(self) -> dict:
        """Ours: every class at the one threshold that maximises the mean IoU (None without samples)."""
        if self.samples == 0:
            return {"seg_iou": None, "seg_miou": None, "seg_threshold": None}
        iou = self._iou()
        best = int(np.argmax(iou.mean(axis=1)))
        return {
            "seg_iou": {c: float(iou[best, i]) for i, c in enumerate(MAP_CLASSES)},
            "seg_miou": float(iou[best].mean()),
            "seg_threshold": SEG_THRESHOLDS[best],
        }

    def result_per_class_best(self, suffix: str = "_bevfusion") -> dict:
        """BEVFusion's: each class at its own best threshold, then the mean (None without samples)."""
        keys = (f"seg_iou{suffix}", f"seg_miou{suffix}", f"seg_thresholds{suffix}")
        if self.samples == 0:
            return dict.fromkeys(keys)
        iou = self._iou()
        best = iou.argmax(axis=0)
        per_class = iou[best, np.arange(len(MAP_CLASSES))]
        return {keys[0]: {c: float(per_class[i]) for i, c in enumerate(MAP_CLASSES)},
                keys[1]: float(per_class.mean()),
                keys[2]: {c: SEG_THRESHOLDS[int(best[i])] for i, c in enumerate(MAP_CLASSES)}}


def resample_map(probs: torch.Tensor, src: BEVGrid, dst: BEVGrid) -> torch.Tensor:
    """Bilinearly resample map probabilities (C, H_src, W_src) on grid `src` to (C, H_dst, W_dst) on `dst`
    (0 outside `src`)."""
    if src == dst:
        return probs
    grid = torch.from_numpy(src.sampling_grid(dst)).to(probs.device)[None]
    return torch.nn.functional.grid_sample(probs[None].float(), grid, mode="bilinear", padding_mode="zeros",
                                           align_corners=False)[0]


def average_precision(scores: np.ndarray, labels: np.ndarray) -> float | None:
    """Average precision of binary `labels` ranked by `scores` (None when there is no positive)."""
    labels = np.asarray(labels, bool)
    if not labels.any():
        return None
    order = np.argsort(-np.asarray(scores), kind="stable")
    hits = labels[order]
    precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    return float((precision * hits).sum() / hits.sum())


def scene_metrics(scores: np.ndarray, tags: np.ndarray) -> dict:
    """scores, tags (S, len(SCENE_TAGS)) -> per-tag AP (tags with a positive) and their mean."""
    per_tag = {}
    for i, name in enumerate(SCENE_TAGS):
        ap = average_precision(scores[:, i], tags[:, i] > 0.5) if len(scores) else None
        if ap is not None:
            per_tag[name] = ap
    return {"scene_ap": per_tag, "scene_map": float(np.mean(list(per_tag.values()))) if per_tag else None}


# ------------------------------------------------------------------------------------------ inference


@dataclass
class InferenceOutput:
    """Everything an evaluation needs from one pass over a split (merged across ranks)."""

    results: dict[str, list[dict]]
    seg: SegmentationStats
    scene_scores: list[np.ndarray]
    scene_tags: list[np.ndarray]
    seg_bevfusion: SegmentationStats = field(default_factory=SegmentationStats)

    def merge(self, other: "InferenceOutput") -> None:
        self.results.update(other.results)
        self.seg.merge(other.seg)
        self.seg_bevfusion.merge(other.seg_bevfusion)
        self.scene_scores += other.scene_scores
        self.scene_tags += other.scene_tags


def prediction_entries(pred: Prediction, meta: dict, classes: ClassList = NUSCENES) -> list[dict]:
    """One sample's `Prediction` -> its submission entries in the global frame (`submission_entries`, with the
    sample's token and poses from its `meta`, names from the predictor's class list): what evaluation writes and
    tracking reads."""
    return submission_entries(meta["sample_token"], pred.boxes_lidar, pred.labels.cpu(), pred.scores.cpu(),
                              pred.attributes.cpu(), meta["lidar2ego"], meta["ego2global"], classes)


def run_inference(model, loader: Iterable, device: torch.device, modality_mask: Sequence[bool] | None = None,
                  progress: bool = True, desc: str = "eval", batch_transform=None) -> InferenceOutput:
    """Predict every batch of `loader` and collect the submission entries (global frame), segmentation
    counts and scene scores.

    modality_mask: (camera, lidar, radar) to force for every sample (None: the batches' own).
    batch_transform: optional `Batch -> Batch` applied before prediction (sensor corruptions); targets
        (map masks, scene tags) and the submission's frames are taken from the untransformed batch.
    Map IoU counts only samples with `has_map`, scene scores only samples with `has_scene_tags`.
    """
    return run_inference_conditions(model, loader, device, {desc: batch_transform}, modality_mask, progress, desc)[desc]


def run_inference_conditions(model, loader: Iterable, device: torch.device, transforms: dict[str, object],
                             modality_mask: Sequence[bool] | None = None, progress: bool = True,
                             desc: str = "eval") -> dict[str, InferenceOutput]:
    """`run_inference` for several conditions in one pass over `loader`: each batch is loaded once and predicted
    under every `transforms[name]` (a `Batch -> Batch`, or None for the batch as loaded)."""
    outs = {name: InferenceOutput({}, SegmentationStats(), [], []) for name in transforms}
    map_grid = model.map_grid
    model.eval()
    # A temporal model carries its history from batch to batch, one state per condition (the loader must then
    # give each scene's keyframes in time order: `scene_ordered_indices`).
    states = [TemporalState() if is_temporal(model) else None for _ in transforms]
    it = loader
    if progress:
        it = progress_bar(loader, desc=desc, unit="batch", leave=False)
    for batch in it:
        batch = batch.to(device)
        for meta in batch.meta:
            if "lidar_aug" in meta and not np.allclose(meta["lidar_aug"], np.eye(4)):
                raise PerceptionError("run_inference: the evaluation loader must not apply BEV augmentation")
        variants = []
        for transform in transforms.values():
            inputs = batch if transform is None else transform(batch)
            if modality_mask is not None:
                forced = torch.tensor(modality_mask, dtype=torch.bool, device=device).expand_as(inputs.modality_mask)
                inputs = replace(inputs, modality_mask=inputs.modality_mask & forced)
            variants.append(inputs)
        with torch.no_grad():
            if hasattr(model, "predict_many"):  # a torch model: encoders shared by conditions with equal inputs
                predictions = model.predict_many(variants, states)
            else:
                predictions = [model.predict(inputs) if state is None else model.predict(inputs, state)
                               for inputs, state in zip(variants, states)]
        for name, preds in zip(transforms, predictions):
            out = outs[name]
            for b, (pred, meta) in enumerate(zip(preds, batch.meta)):
                out.results[meta["sample_token"]] = prediction_entries(pred, meta, model.classes)
                if bool(batch.has_map[b]):
                    out.seg.update(pred.map_probs, batch.map_masks[b])
                    if batch.map_masks_eval is not None:
                        out.seg_bevfusion.update(resample_map(pred.map_probs, map_grid, BEVFUSION_MAP_GRID),
                                                 batch.map_masks_eval[b])
                if bool(batch.has_scene_tags[b]):
                    out.scene_scores.append(pred.scene_probs.float().cpu().numpy())
                    out.scene_tags.append(batch.scene_tags[b].float().cpu().numpy())
    return outs


def metrics_from(devkit: dict, out: InferenceOutput) -> dict:
    """Our flat metrics from the devkit's and one inference pass's (unavailable ones are None)."""
    metrics = summarise_detection(devkit)
    metrics.update(out.seg.result())
    metrics.update(out.seg_bevfusion.result_per_class_best())
    metrics["seg_samples"] = out.seg.samples
    if out.scene_scores:
        metrics.update(scene_metrics(np.stack(out.scene_scores), np.stack(out.scene_tags)))
    else:
        metrics.update({"scene_ap": {}, "scene_map": None})
    metrics["scene_samples"] = len(out.scene_scores)
    return metrics


def format_metrics(metrics: dict, title: str = "") -> str:
    """A readable table of the metrics."""
    lines = [title] if title else []
    lines.append(f"NDS {metrics['nds']:.4f}   mAP {metrics['map']:.4f}")
    lines.append(f"mATE {metrics['mate']:.3f}  mASE {metrics['mase']:.3f}  mAOE {metrics['maoe']:.3f}  "
                 f"mAVE {metrics['mave']:.3f}  mAAE {metrics['maae']:.3f}")
    lines.append("")
    lines.append(f"{'class':<22}{'AP':>8}{'ATE':>8}{'ASE':>8}{'AOE':>8}{'AVE':>8}{'AAE':>8}")
    for name in metrics.get("per_class_ap") or DETECTION_CLASSES:
        tp = metrics.get("per_class_tp_errors", {}).get(name, {})
        cells = [tp.get(k) for k in ("trans_err", "scale_err", "orient_err", "vel_err", "attr_err")]
        fmt = "".join(f"{v:>8.3f}" if v is not None else f"{'-':>8}" for v in cells)
        lines.append(f"{name:<22}{metrics['per_class_ap'].get(name, 0.0):>8.3f}{fmt}")
    lines.append("")
    if metrics.get("seg_iou"):
        lines.append(f"map segmentation mIoU {metrics['seg_miou']:.4f} (ours: model's map grid, one threshold "
                     f"{metrics['seg_threshold']:.2f})")
        lines.append("  " + "  ".join(f"{k} {v:.3f}" for k, v in metrics["seg_iou"].items()))
    else:
        lines.append("map segmentation: not available (no sample with map ground truth)")
    if metrics.get("seg_iou_bevfusion"):
        lines.append(f"map segmentation mIoU {metrics['seg_miou_bevfusion']:.4f} (BEVFusion's protocol: 200x200 at "
                     "0.5 m, best threshold per class)")
        lines.append("  " + "  ".join(f"{k} {v:.3f}" for k, v in metrics["seg_iou_bevfusion"].items()))
    if metrics.get("scene_map") is not None:
        lines.append(f"scene tags mAP {metrics['scene_map']:.4f}  " + "  ".join(f"{k} {v:.2f}" for k, v in metrics.get("scene_ap", {}).items()))
    else:
        lines.append("scene tags: not available (no sample with known scene tags)")
    return "\n".join(lines)


def write_metrics(path: str | Path, metrics: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(metrics, indent=1))
    tmp.replace(path)
    return path


def evaluate_results_file(submission: str | Path, dataroot: str | Path, version: str, split: str | None, out: str | Path,
                          *, info: str | Path | None = None, classes: ClassList = NUSCENES) -> dict:
    """`perception eval --results`: score an existing submission (detection only) and write O/metrics.json.
    `info`: score the samples of this mmdet3d info file (`split` None) instead of a devkit split. `classes`: the
    class list the submission names (a config's ``classes:``)."""
    t0 = time.time()
    out = Path(out)
    if info is not None:
        devkit = detection_eval(dataroot, version, str(info), submission, out, sample_tokens=info_sample_tokens(info),
                                classes=classes)
    else:
        devkit = detection_eval(dataroot, version, split, submission, out, classes=classes)
    metrics = summarise_detection(devkit)
    metrics.update({**SegmentationStats().result(), **SegmentationStats().result_per_class_best(), "scene_map": None,
                    "submission": str(submission)})
    write_metrics(out / "metrics.json", metrics)
    log.info("evaluated %s in %.1f s", submission, time.time() - t0)
    return metrics


# ------------------------------------------------------------------------------------------- drivers


def is_temporal(model) -> bool:
    """The model (its `temporal` module) or runner (its `temporal` flag) fuses the previous keyframe and takes a
    `TemporalState` in `predict`."""
    temporal = getattr(model, "temporal", None)
    return temporal is not None and temporal is not False


def scene_ordered_indices(index, rank: int = 0, world: int = 1) -> list[int]:
    """Sample indices of this rank for a temporal model: whole scenes (scene j to rank j mod world), each in the
    index's order (time order: `build_index` walks every scene from its first keyframe). Without scene tokens
    (mmdet3d infos), a contiguous 1/world share."""
    n = len(index.tokens)
    if index.scene_tokens is None:
        return list(range(rank * n // world, (rank + 1) * n // world))
    scenes: dict[str, list[int]] = {}
    for i, scene in enumerate(index.scene_tokens):
        scenes.setdefault(str(scene), []).append(i)
    return [i for j, members in enumerate(scenes.values()) if j % world == rank for i in members]


def _shard_loader(dataset, batch_size: int, workers: int, rank: int, world: int, temporal: bool = False):
    """This rank's share of `dataset`; for a temporal model whole scenes in time order, one sample per batch
    (its history is the batch before)."""
    if temporal:
        indices, batch_size = scene_ordered_indices(dataset.index, rank, world), 1
    else:
        indices = list(range(rank, len(dataset), world))
    return SampleLoader(dataset, batch_size=batch_size, sampler=indices, num_workers=workers, collate_fn=collate_samples)


def gather_inference(out: InferenceOutput, dist_info) -> InferenceOutput | None:
    """Merge every rank's `InferenceOutput` on rank 0 (None on the other ranks)."""
    if dist_info is None or not dist_info.enabled:
        return out
    gathered = [None] * dist_info.world_size if dist_info.is_main else None
    dist.gather_object(out, gathered, dst=0)
    if not dist_info.is_main:
        return None
    merged = gathered[0]
    for other in gathered[1:]:
        merged.merge(other)
    return merged


def evaluate_model(model, dataset, dataroot: str | Path, version: str, split: str, out_dir: str | Path, *,
                   device: torch.device, dist_info=None, batch_size: int = 2, workers: int = 0,
                   modality_mask: Sequence[bool] | None = None, progress: bool = True, nusc=None,
                   batch_transform=None, info: str | Path | None = None) -> dict | None:
    """Predict a split, write `out_dir/submission.json` and `out_dir/metrics.json`, return the metrics
    (rank 0; None on other ranks). Every sample of the split gets an entry ([] when nothing is detected).
    `info`: the dataset holds this mmdet3d info file's samples; detection is scored on exactly those (`split`
    only names them in messages)."""
    metrics = evaluate_model_conditions(model, dataset, dataroot, version, split, {"": Path(out_dir)},
                                        {"": batch_transform}, device=device, dist_info=dist_info,
                                        batch_size=batch_size, workers=workers, modality_mask=modality_mask,
                                        progress=progress, nusc=nusc, info=info)
    return None if metrics is None else metrics[""]


def evaluate_model_conditions(model, dataset, dataroot: str | Path, version: str, split: str,
                              out_dirs: dict[str, Path], transforms: dict[str, object], *, device: torch.device,
                              dist_info=None, batch_size: int = 2, workers: int = 0,
                              modality_mask: Sequence[bool] | None = None, progress: bool = True, nusc=None,
                              info: str | Path | None = None) -> dict[str, dict] | None:
    """`evaluate_model` under several input conditions (`transforms[name]`, written to `out_dirs[name]`) with one
    pass of data loading; the devkit index and ground truth are shared by all (`shared_lean_nuscenes`)."""
    rank, world = (dist_info.rank, dist_info.world_size) if dist_info is not None else (0, 1)
    loader = _shard_loader(dataset, batch_size, workers, rank, world, temporal=is_temporal(model))
    outs = run_inference_conditions(model, loader, device, transforms, modality_mask, progress=progress and rank == 0)
    results = {}
    for name in transforms:
        out = gather_inference(outs[name], dist_info)
        if out is None:
            continue
        results[name] = _score(out, dataset, dataroot, version, split, Path(out_dirs[name]), modality_mask, nusc, info)
    return results if rank == 0 else None


def _score(out: InferenceOutput, dataset, dataroot, version: str, split: str, out_dir: Path,
           modality_mask: Sequence[bool] | None, nusc, info) -> dict:
    """Write the submission of one inference pass, score it and write `out_dir/metrics.json`."""
    use = modality_mask if modality_mask is not None else (True, True, True)
    if dataset.index.radar_offsets[-1] == 0:  # no radar file at all (e.g. an mmdet3d info file): none was used
        use = (use[0], use[1], False)
    expected = {str(t) for t in dataset.index.tokens}
    missing = expected - set(out.results)
    if missing:
        raise PerceptionError(f"evaluation: {len(missing)} samples of {split} got no prediction (e.g. {next(iter(missing))})")
    sub = write_submission(out_dir / "submission.json", out.results, use_camera=bool(use[0]), use_lidar=bool(use[1]),
                           use_radar=bool(use[2]), use_map=False)
    classes = dataset.config.classes
    if sum(map(len, out.results.values())) == 0:
        log.warning("no boxes predicted on %s: detection metrics are zero", split)
        devkit = _empty_detection_metrics(classes)
    else:
        devkit = detection_eval(dataroot, version, split, sub, out_dir, nusc=nusc,
                                sample_tokens=expected if info is not None else None, classes=classes)
    metrics = metrics_from(devkit, out)
    metrics["modalities"] = {"camera": bool(use[0]), "lidar": bool(use[1]), "radar": bool(use[2])}
    metrics["num_samples"] = len(out.results)
    write_metrics(out_dir / "metrics.json", metrics)
    return metrics


def _empty_detection_metrics(classes: ClassList = NUSCENES) -> dict:
    """The devkit's serialized metrics for a submission without any box (it refuses to evaluate one)."""
    nan_tp = {k: 1.0 for k in ("trans_err", "scale_err", "orient_err", "vel_err", "attr_err")}
    return {"nd_score": 0.0, "mean_ap": 0.0, "tp_errors": nan_tp, "mean_dist_aps": {c: 0.0 for c in classes.names},
            "label_tp_errors": {c: dict(nan_tp) for c in classes.names}}


def evaluate_predictor(predictor, cfg, dataroot: str | Path, version: str, split: str | None, out: str | Path, *,
                       device: torch.device, modalities: Sequence[bool] | None = None, batch_size: int = 2,
                       workers: int = 0, progress: bool = True, info: str | Path | None = None) -> dict:
    """Evaluate any predictor (a `BEVFusionModel`, or a deploy runner: an object with ``predict(batch)``,
    ``eval()`` and ``map_grid``) on a split (or the samples of an mmdet3d info file, `split` None) of the
    dataset that the experiment config `cfg` describes; writes and returns the metrics (`evaluate_model`)."""
    if info is not None:
        split = str(info)
        check_tokens_in_tables(dataroot, version, info_sample_tokens(info), info)  # before any inference
    dataset = build_dataset(cfg, dataroot, version, split, train=False, map_grid=predictor.map_grid, info=info)
    t0 = time.time()
    metrics = evaluate_model(predictor, dataset, dataroot, version, split, out, device=device, batch_size=batch_size,
                             workers=workers, modality_mask=modalities, progress=progress, info=info)
    log.info("evaluated %d samples of %s with %r in %.1f s", len(dataset), split, type(predictor).__name__,
             time.time() - t0)
    return metrics


def evaluate_checkpoint(checkpoint: str | Path, dataroot: str | Path, version: str, split: str | None, out: str | Path, *,
                        device: str | None = None, modalities: Sequence[bool] | None = None, batch_size: int = 2,
                        workers: int = 0, progress: bool = True, info: str | Path | None = None,
                        lidar_velocity: bool | None = None) -> dict:
    """`perception eval --checkpoint CKPT.pt`: evaluate a training checkpoint with the torch model (exports are
    evaluated by `deploy.runners.evaluate_export` with the same metrics).
    `info`: evaluate the samples of this mmdet3d v2 info file instead (`split` None); see the module docstring.
    `lidar_velocity`: measure box velocities from the LiDAR sweeps (True) or take the head's (False) whatever the
    checkpoint's `model.heads.lidar_velocity` says (None: as it says)."""
    dev = pick_device(device)
    loaded = model_from_checkpoint(checkpoint, device=dev)
    if lidar_velocity is not None:
        loaded.model.decode = replace(loaded.model.decode,
                                      lidar_velocity=LidarVelocityConfig() if lidar_velocity else None)
    return evaluate_predictor(loaded.model, loaded.config, dataroot, version, split, out, device=dev,
                              modalities=modalities, batch_size=batch_size, workers=workers, progress=progress,
                              info=info)
