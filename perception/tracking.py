"""3D multi-object tracking of detections, scored by the devkit's `TrackingEval`.

The tracker is CenterPoint's greedy scheme (Yin et al., "Center-based 3D Object Detection and Tracking", CVPR
2021): every keyframe of a scene in time order, each detection's centre is moved back by its predicted velocity
times the time since the previous keyframe and matched to a live track of the same class within that class's
distance, greedily closest pair first (CenterPoint goes detection by detection in score order; closest-first
keeps two nearby objects of equal score from swapping ids). A matched track keeps its id; an unmatched detection
starts a track; a track left unmatched is kept, coasting on its last velocity, for up to `max_age` keyframes and
is not reported while it coasts.

Everything is in the global frame (metres, seconds), on the nuScenes submission dicts of
`perception.data.submission` (``translation``, ``velocity``, ``detection_name``, ``detection_score`` ...).
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping
from unittest import mock

import numpy as np

from perception.classes import NUSCENES
from perception.errors import PerceptionError
from perception.evaluation import load_lean_nuscenes, lean_eval_tables, split_sample_tokens, validate_submission

log = logging.getLogger(__name__)

# The devkit's tracking classes (tracking_nips_2019), the nuScenes classes with a tracking distance, and
# CenterPoint's association distances (metres) between a back-moved detection centre and a track
# (`perception.classes.NUSCENES`). The other detection classes are not tracked.
TRACKING_CLASSES: tuple[str, ...] = tuple(sorted(c.name for c in NUSCENES.classes if c.tracking_distance_m is not None))
MAX_DISTANCE: Mapping[str, float] = {c.name: c.tracking_distance_m for c in NUSCENES.classes
                                     if c.tracking_distance_m is not None}


@dataclass(frozen=True)
class TrackerSettings:
    """max_age: keyframes a track survives unmatched (CenterPoint: 3). min_score: detections below it are
    ignored. max_distance: per class, metres."""

    max_age: int = 3
    min_score: float = 0.0
    max_distance: Mapping[str, float] = field(default_factory=lambda: dict(MAX_DISTANCE))


@dataclass
class _Track:
    track_id: int
    name: str
    xy: np.ndarray  # (2,) global, metres
    velocity: np.ndarray  # (2,) global, m/s
    age: int = 0  # keyframes since the last match


class CenterPointTracker:
    """Tracks one scene at a time: call `reset` at a scene's first keyframe, then `step` per keyframe."""

    def __init__(self, settings: TrackerSettings = TrackerSettings()):
        self.settings = settings
        self.tracks: list[_Track] = []
        self._next_id = 0

    def reset(self) -> None:
        self.tracks = []

    def step(self, detections: list[dict], dt: float) -> list[dict]:
        """One keyframe: `detections` (submission dicts, global frame), `dt` seconds since the previous keyframe
        of the scene (ignored after `reset`). Returns the tracked boxes of this keyframe in the devkit's tracking
        format (``tracking_id``, ``tracking_name``, ``tracking_score``), one per tracked detection, in order of
        score."""
        ids = self.assign(detections, dt)
        order = sorted((i for i, t in enumerate(ids) if t is not None), key=lambda i: -detections[i]["detection_score"])
        return [{
            "sample_token": detections[i]["sample_token"], "translation": list(detections[i]["translation"]),
            "size": list(detections[i]["size"]), "rotation": list(detections[i]["rotation"]),
            "velocity": list(detections[i]["velocity"][:2]), "tracking_id": str(ids[i]),
            "tracking_name": detections[i]["detection_name"], "tracking_score": float(detections[i]["detection_score"]),
        } for i in order]

    def assign(self, detections: list[dict], dt: float) -> list[int | None]:
        """`step`'s association: the track id of each detection, in the order given (None for a detection that is
        not tracked: not a tracking class, or below ``min_score``)."""
        s = self.settings
        index = [i for i, d in enumerate(detections)
                 if d["detection_name"] in TRACKING_CLASSES and d["detection_score"] >= s.min_score]
        index.sort(key=lambda i: -detections[i]["detection_score"])
        dets = [detections[i] for i in index]
        # Tracks coast forward on their last velocity to this keyframe.
        for t in self.tracks:
            t.xy = t.xy + t.velocity * dt
        n, m = len(dets), len(self.tracks)
        matched_track = [-1] * n
        if n and m:
            det_xy = np.array([d["translation"][:2] for d in dets], dtype=np.float64)
            det_v = np.array([d["velocity"][:2] for d in dets], dtype=np.float64)
            # The detection's position one keyframe ago, from its own velocity, against each track's position
            # one keyframe ago (its last match, or where it had coasted to).
            back = det_xy - det_v * dt
            last = np.array([t.xy - t.velocity * dt for t in self.tracks])
            dist = np.linalg.norm(back[:, None, :] - last[None, :, :], axis=2)
            same = np.array([[d["detection_name"] == t.name for t in self.tracks] for d in dets])
            limit = np.array([s.max_distance[d["detection_name"]] for d in dets])[:, None]
            dist = np.where(same & (dist <= limit), dist, np.inf)
            # Greedy, closest pair first (ties by detection score: `dets` is sorted by score and the sort is stable).
            flat = np.argsort(dist, axis=None, kind="stable")
            det_taken, track_taken = np.zeros(n, dtype=bool), np.zeros(m, dtype=bool)
            for k in flat[: int(np.isfinite(dist).sum())]:
                i, j = divmod(int(k), m)
                if not det_taken[i] and not track_taken[j]:
                    matched_track[i] = j
                    det_taken[i] = track_taken[j] = True
        ids: list[int | None] = [None] * len(detections)
        kept, used = [], set()
        for k, d in enumerate(dets):
            j = matched_track[k]
            xy = np.asarray(d["translation"][:2], dtype=np.float64)
            v = np.asarray(d["velocity"][:2], dtype=np.float64)
            if j >= 0:
                track = self.tracks[j]
                track.xy, track.velocity, track.age = xy, v, 0
                used.add(j)
            else:
                track = _Track(self._next_id, d["detection_name"], xy, v)
                self._next_id += 1
            kept.append(track)
            ids[index[k]] = track.track_id
        for j, t in enumerate(self.tracks):
            if j not in used and t.age + 1 <= s.max_age:
                t.age += 1
                kept.append(t)
        self.tracks = kept
        return ids


class StreamTracker:
    """A `CenterPointTracker` fed keyframe by keyframe over several scenes, as a vehicle would: `step` resets it at a
    new scene and takes the time since the scene's previous keyframe from the timestamps (microseconds)."""

    def __init__(self, settings: TrackerSettings = TrackerSettings()):
        self.tracker = CenterPointTracker(settings)
        self._scene: str | None = None
        self._prev_us: int | None = None

    def step(self, scene: str, timestamp_us: int, detections: list[dict]) -> list[dict]:
        """One keyframe of `scene` at `timestamp_us`: `CenterPointTracker.step`'s tracked boxes."""
        if scene != self._scene:
            self.tracker.reset()
            self._scene, self._prev_us = scene, None
        dt = 0.0 if self._prev_us is None else (timestamp_us - self._prev_us) / 1e6
        self._prev_us = timestamp_us
        return self.tracker.step(detections, dt)


def scene_order(dataroot: str | Path, version: str, sample_tokens: set[str]) -> list[list[tuple[str, int]]]:
    """The samples of `sample_tokens` grouped by scene, each scene in time order: [[(token, timestamp_us)]]."""
    samples = lean_eval_tables(version, dataroot)["sample"]
    by_scene: dict[str, list[tuple[str, int]]] = defaultdict(list)
    for s in samples:
        if s["token"] in sample_tokens:
            by_scene[s["scene_token"]].append((s["token"], int(s["timestamp"])))
    return [sorted(v, key=lambda x: x[1]) for _, v in sorted(by_scene.items(), key=lambda kv: min(t for _, t in kv[1]))]


def track_submission(submission: dict, dataroot: str | Path, version: str,
                     settings: TrackerSettings = TrackerSettings()) -> dict:
    """A detection submission (its ``results``, one list per sample) -> a devkit tracking submission of the same
    samples, each scene tracked in time order by `CenterPointTracker`."""
    results = submission["results"]
    tracker = StreamTracker(settings)
    tracked: dict[str, list[dict]] = {}
    for k, scene in enumerate(scene_order(dataroot, version, set(results))):
        for token, t in scene:
            tracked[token] = tracker.step(str(k), t, results[token])
    meta = dict(submission.get("meta", {}))
    return {"meta": meta, "results": tracked}


def tracking_eval(submission_path: str | Path, dataroot: str | Path, version: str, split: str, out_dir: str | Path) -> dict:
    """The devkit's `TrackingEval` (tracking_nips_2019) on a tracking submission of a devkit split -> our summary:
    ``amota``, ``amotp``, ``recall``, ``motar``, ``mota``, ``motp``, ``ids``, ``frag``, ``tp``, ``fp``, ``fn``, ``gt``,
    and ``per_class`` ({metric: {class: value}}). The devkit's own index is replaced by the lean one
    (`perception.evaluation.lean_eval_tables`)."""
    import nuscenes.eval.tracking.evaluate as devkit_tracking  # heavy: the devkit and motmetrics take ~2 s to import
    from nuscenes.eval.common.config import config_factory  # heavy: the devkit takes ~1 s to import

    lean = load_lean_nuscenes(version, dataroot)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        with mock.patch.object(devkit_tracking, "NuScenes", lambda **kwargs: lean):
            ev = devkit_tracking.TrackingEval(config_factory("tracking_nips_2019"), result_path=str(submission_path),
                                              eval_set=split, output_dir=str(out_dir / "tracking"),
                                              nusc_version=version, nusc_dataroot=str(dataroot), verbose=False)
    except AssertionError as exc:  # the devkit reports a bad submission with bare asserts
        raise PerceptionError(f"{submission_path}: not a valid tracking submission for split {split}: {exc}") from None
    metrics, _ = ev.evaluate()
    raw = metrics.serialize()
    keys = ("amota", "amotp", "recall", "motar", "mota", "motp", "ids", "frag", "tp", "fp", "fn", "gt", "mt", "ml", "faf")
    summary = {k: _number(raw[k]) for k in keys if k in raw}
    summary["per_class"] = {metric: {name: _number(v) for name, v in per.items()}
                            for metric, per in raw["label_metrics"].items()}
    return summary


def format_tracking(m: dict) -> str:
    """One line of `tracking_eval`'s summary: AMOTA, AMOTP (m), recall, MOTA, ID switches."""
    def fmt(v):
        return "n/a" if v is None else f"{v:.3f}"
    return (f"AMOTA {fmt(m.get('amota'))}, AMOTP {fmt(m.get('amotp'))} m, recall {fmt(m.get('recall'))}, "
            f"MOTA {fmt(m.get('mota'))}, ID switches {m.get('ids')}")


def _number(v):
    """A devkit metric as a JSON number (NaN -> None)."""
    v = float(v)
    return None if np.isnan(v) else v


def run_tracking(submission_path: str | Path, dataroot: str | Path, version: str, split: str, out: str | Path,
                 settings: TrackerSettings = TrackerSettings()) -> dict:
    """`perception track --results`: tracks a detection submission of `split`, writes
    ``out/tracking_submission.json`` and ``out/tracking_metrics.json`` (`tracking_eval`'s summary) and returns it."""
    submission = validate_submission(submission_path, split_sample_tokens(dataroot, version, split))
    tracked = track_submission(submission, dataroot, version, settings)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sub_path = out / "tracking_submission.json"
    sub_path.write_text(json.dumps(tracked))
    metrics = tracking_eval(sub_path, dataroot, version, split, out)
    (out / "tracking_metrics.json").write_text(json.dumps(metrics, indent=1))
    log.info("tracking %s: AMOTA %.3f AMOTP %.3f recall %.3f IDS %s", split, metrics.get("amota") or float("nan"),
             metrics.get("amotp") or float("nan"), metrics.get("recall") or float("nan"), metrics.get("ids"))
    return metrics
