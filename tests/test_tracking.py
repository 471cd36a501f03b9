"""The CenterPoint-style tracker (`perception.tracking`) and its scoring by the devkit's `TrackingEval`.

Oracles: hand-built detections of objects moving at constant velocity (ids are known), and the devkit's own
instance tokens and `TrackingEval` on the ground truth of a synthetic split.
"""

from __future__ import annotations

import json
from collections import defaultdict

import numpy as np
import pytest
from typer.testing import CliRunner

from perception.cli import app
from perception.data.submission import gt_submission
from perception.tracking import CenterPointTracker, TrackerSettings, scene_order, track_submission


def _det(name: str, xy, v, score: float = 0.9, token: str = "s") -> dict:
    return {"sample_token": token, "translation": [float(xy[0]), float(xy[1]), 1.0], "size": [1.8, 4.5, 1.6],
            "rotation": [1.0, 0.0, 0.0, 0.0], "velocity": [float(v[0]), float(v[1])], "detection_name": name,
            "detection_score": score, "attribute_name": ""}


def test_constant_velocity_objects_keep_their_ids_and_coasting_bridges_a_gap():
    # Two cars 3 m apart driving side by side at 10 m/s (5 m per 0.5 s keyframe: more than their spacing, so
    # matching without the velocity would swap or break them), and a pedestrian that is missed for 2 keyframes.
    tracker = CenterPointTracker(TrackerSettings(max_age=3))
    ids = defaultdict(set)
    for k in range(10):
        t = 0.5 * k
        dets = [_det("car", (10 * t, 0.0), (10, 0)), _det("car", (10 * t, 3.0), (10, 0), score=0.8)]
        if k not in (4, 5):
            dets.append(_det("pedestrian", (1.2 * t, 20.0), (1.2, 0.0), score=0.7))
        out = tracker.step(dets, 0.0 if k == 0 else 0.5)
        assert len(out) == len(dets)
        for o in out:
            ids[(o["tracking_name"], round(o["translation"][1]))].add(o["tracking_id"])
    assert all(len(v) == 1 for v in ids.values()), ids
    assert len({next(iter(v)) for v in ids.values()}) == 3


def test_tracks_die_after_max_age_and_classes_never_match():
    tracker = CenterPointTracker(TrackerSettings(max_age=1))
    first = tracker.step([_det("car", (0, 0), (0, 0))], 0.0)[0]["tracking_id"]
    tracker.step([], 0.5)
    tracker.step([], 0.5)  # unmatched twice: gone
    again = tracker.step([_det("car", (0, 0), (0, 0))], 0.5)[0]["tracking_id"]
    assert again != first
    truck = tracker.step([_det("truck", (0, 0), (0, 0))], 0.5)[0]["tracking_id"]
    assert truck != again
    assert tracker.step([_det("barrier", (0, 0), (0, 0))], 0.5) == []  # not a tracking class


@pytest.fixture(scope="module")
def gt_file(synth_root, tmp_path_factory):
    return gt_submission(synth_root, "v1.0-mini", "mini_val", tmp_path_factory.mktemp("gt") / "gt.json")


def test_ground_truth_detections_keep_one_id_per_instance(synth_root, gt_file):
    """Every ground-truth instance (the devkit's instance token) keeps its tracking id while it is seen, and gets a
    new id only after it was out of sight for more than max_age keyframes."""
    submission = json.loads(gt_file.read_text())
    tracked = track_submission(submission, synth_root, "v1.0-mini")
    assert set(tracked["results"]) == set(submission["results"])
    anns = json.loads((synth_root / "v1.0-mini" / "sample_annotation.json").read_text())
    anns_of = defaultdict(list)
    for a in anns:
        anns_of[a["sample_token"]].append(a)
    # Scenes come in time order; frames are numbered over the split.
    order = scene_order(synth_root, "v1.0-mini", set(submission["results"]))
    assert all(a[1] < b[1] for scene in order for a, b in zip(scene, scene[1:]))
    frame = {token: 1000 * s + k for s, scene in enumerate(order) for k, (token, _) in enumerate(scene)}
    ids_of_instance, instances_of_id = defaultdict(list), defaultdict(set)
    for token, boxes in tracked["results"].items():
        for b in boxes:  # the annotation this box came from: the same centre, up to the float32 round trip
            dist = [np.linalg.norm(np.subtract(a["translation"], b["translation"])) for a in anns_of[token]]
            assert min(dist) < 0.01
            inst = anns_of[token][int(np.argmin(dist))]["instance_token"]
            ids_of_instance[inst].append((frame[token], b["tracking_id"]))
            instances_of_id[b["tracking_id"]].add(inst)
    assert ids_of_instance
    max_age = TrackerSettings().max_age
    for inst, seen in ids_of_instance.items():
        seen.sort()
        for (f0, id0), (f1, id1) in zip(seen, seen[1:]):
            assert id0 == id1 or f1 - f0 > max_age + 1, (inst, seen)
    # An id follows one object at a time: it passes to another only after the first is no longer seen (a greedy
    # tracker hands a lost track to an object that appears where it would have been).
    for tid, insts in instances_of_id.items():
        spans = sorted((min(f for f, t in ids_of_instance[x] if t == tid), max(f for f, t in ids_of_instance[x] if t == tid))
                       for x in insts)
        assert all(a[1] < b[0] for a, b in zip(spans, spans[1:])), (tid, spans)
    assert sum(len(v) - 1 for v in instances_of_id.values()) <= 0.05 * len(ids_of_instance)


def test_track_cli_scores_ground_truth_with_the_devkit(synth_root, gt_file, tmp_path):
    res = CliRunner().invoke(app, ["track", "--results", str(gt_file), "--data", str(synth_root), "--split", "mini_val",
                                   "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    metrics = json.loads((tmp_path / "tracking_metrics.json").read_text())
    assert {"amota", "amotp", "recall", "mota", "ids", "per_class"} <= set(metrics)
    assert metrics["amota"] >= 0.9 and metrics["ids"] == 0
    assert "car" in metrics["per_class"]["amota"]
    sub = json.loads((tmp_path / "tracking_submission.json").read_text())
    box = next(b for boxes in sub["results"].values() for b in boxes)
    assert {"tracking_id", "tracking_name", "tracking_score"} <= set(box)


def test_track_cli_needs_exactly_one_source(synth_root, tmp_path):
    res = CliRunner().invoke(app, ["track", "--data", str(synth_root), "--split", "mini_val", "--out", str(tmp_path)])
    assert res.exit_code != 0 and "exactly one" in res.output


def test_video_frames_get_track_ids_and_trails_in_the_current_lidar_frame():
    """`perception viz --video`: one car driving at 5 m/s along global +x while the ego drives at 2 m/s along +x;
    its trail, drawn in each frame's LIDAR_TOP frame, is where the car was, seen from where the ego is now."""
    import torch

    from perception.model.bevfusion import Prediction
    from perception.structures import Boxes3D
    from perception.viz import _track_frame

    tracker, trails_global, prev = CenterPointTracker(), {}, None
    yaw = np.pi / 2  # lidar2ego turns by +90 deg: the ego's forward is LIDAR_TOP's -y
    lidar2ego = np.eye(4)
    lidar2ego[:2, :2] = [[np.cos(yaw), -np.sin(yaw)], [np.sin(yaw), np.cos(yaw)]]
    for k in range(4):
        t = 0.5 * k
        ego2global = np.eye(4)
        ego2global[:3, 3] = [100.0 + 2.0 * t, 50.0, 0.0]
        car_global = np.array([110.0 + 5.0 * t, 50.0, 1.0])
        global2lidar = np.linalg.inv(ego2global @ lidar2ego)
        car_lidar = global2lidar[:3, :3] @ car_global + global2lidar[:3, 3]
        v_lidar = global2lidar[:3, :3] @ np.array([5.0, 0.0, 0.0])
        box = torch.tensor([[*car_lidar, 1.8, 4.5, 1.6, 0.0, v_lidar[0], v_lidar[1]]], dtype=torch.float32)
        pred = Prediction(boxes_lidar=Boxes3D(box), scores=torch.tensor([0.9]), labels=torch.tensor([0]),
                          attributes=torch.tensor([-1]), map_probs=torch.zeros(6, 4, 4), scene_probs=torch.zeros(6))
        sample = type("S", (), {"meta": {"sample_token": f"s{k}", "timestamp": int(t * 1e6), "lidar2ego": lidar2ego,
                                         "ego2global": ego2global}})()
        ids, trails = _track_frame(tracker, trails_global, sample, pred, prev)
        prev = sample.meta["timestamp"]
        assert ids == [0]
        # The car at frame j was 10 + 2.5 j - 2 t m ahead of the ego now: on LIDAR_TOP's -y axis (lidar2ego +90 deg).
        expected = [(0.0, -(10.0 + 2.5 * j - 2.0 * t)) for j in range(k + 1)]
        np.testing.assert_allclose(trails[0], np.array(expected), atol=1e-3)
