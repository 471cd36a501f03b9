"""`perception.detection_metrics`: equal to the devkit's DetectionEval on the nuScenes list, and right by hand on
a class list of our own."""

from __future__ import annotations

import math

import numpy as np
import pytest
from nuscenes.eval.common.config import config_factory
from nuscenes.eval.common.data_classes import EvalBoxes
from nuscenes.eval.common.loaders import add_center_dist, filter_eval_boxes
from nuscenes.eval.detection.constants import TP_METRICS
from nuscenes.eval.detection.data_classes import DetectionBox
from nuscenes.eval.detection.evaluate import DetectionEval

from perception.detection_metrics import (NUSCENES_CLASS_SPECS, TP_ERRORS, DetectionClassSpec, EvalSample,
                                          SampleBoxes, average_precision, evaluate_detection, running_mean,
                                          scale_iou, yaw_difference, yaw_from_quaternion)
from perception.errors import PerceptionError
from perception.structures import CLASS_ATTRIBUTES, DETECTION_CLASSES

# ------------------------------------------------------------------------------- the devkit's equal

SIZES_WLH = {"car": (1.9, 4.6, 1.7), "truck": (2.5, 7.0, 3.0), "bus": (2.9, 11.0, 3.5), "trailer": (2.9, 12.0, 3.9),
             "construction_vehicle": (2.8, 6.5, 3.2), "pedestrian": (0.7, 0.7, 1.8), "motorcycle": (0.8, 2.1, 1.5),
             "bicycle": (0.6, 1.7, 1.3), "traffic_cone": (0.4, 0.4, 1.0), "barrier": (2.5, 0.5, 1.0)}
# GT boxes per sample, drawn from 0 .. n-1: trailers have none (predictions only), construction vehicles no
# predictions, buses only false positives.
GT_PER_SAMPLE = {"car": 14, "truck": 5, "bus": 3, "trailer": 0, "construction_vehicle": 3, "pedestrian": 10,
                 "motorcycle": 4, "bicycle": 4, "traffic_cone": 8, "barrier": 6}
RACK_WLH = (3.0, 8.0, 1.5)


def _quat(yaw: float) -> tuple[float, float, float, float]:
    return (math.cos(yaw / 2), 0.0, 0.0, math.sin(yaw / 2))


def _random_scene(seed: int, n_samples: int = 7) -> list[dict]:
    """Samples as dicts: token, ego (3,), racks [(x, y, z, w, l, h, yaw)], gt and pred lists of box dicts in the
    global frame (translation, size, yaw, velocity, name, attribute, num_pts / score)."""
    rng = np.random.default_rng(seed)
    scene = []
    for s in range(n_samples):
        ego = np.array([rng.uniform(300, 1500), rng.uniform(300, 1500), 0.0])
        sigma = float(rng.choice([0.15, 0.5, 1.2]))
        racks = []
        for _ in range(int(rng.integers(1, 3))):
            r, a = rng.uniform(5, 30), rng.uniform(-math.pi, math.pi)
            racks.append((ego[0] + r * math.cos(a), ego[1] + r * math.sin(a), rng.uniform(-0.5, 0.5), *RACK_WLH,
                          rng.uniform(-math.pi, math.pi)))
        gt = []
        for name in DETECTION_CLASSES:
            for _ in range(int(rng.integers(0, GT_PER_SAMPLE[name] + 1)) if GT_PER_SAMPLE[name] else 0):
                r, a = rng.uniform(0, 60), rng.uniform(-math.pi, math.pi)  # some beyond every class range
                if name == "bus":  # on the +x side; its predictions on the -x side, none within 4 m
                    r, a = rng.uniform(3, 45), rng.uniform(-1.2, 1.2)
                centre = ego + [r * math.cos(a), r * math.sin(a), rng.uniform(-1, 2)]
                attrs = CLASS_ATTRIBUTES[name]
                gt.append(dict(translation=centre, size=np.array(SIZES_WLH[name]) * rng.uniform(0.8, 1.2, 3),
                               yaw=rng.uniform(-math.pi, math.pi),
                               velocity=np.full(2, np.nan) if rng.random() < 0.07 else rng.normal(0, 3, 2),
                               name=name, attribute=str(rng.choice(attrs)) if attrs and rng.random() > 0.1 else "",
                               num_pts=0 if rng.random() < 0.1 else int(rng.integers(1, 200))))
            if name in ("bicycle", "motorcycle", "pedestrian"):  # some parked in a rack: cycles dropped, people not
                for _ in range(int(rng.integers(1, 3))):
                    x, y, z, w, l, h, yaw = racks[int(rng.integers(len(racks)))]
                    u, v = rng.uniform(-l / 2 + 0.2, l / 2 - 0.2), rng.uniform(-w / 2 + 0.2, w / 2 - 0.2)
                    centre = np.array([x + u * math.cos(yaw) - v * math.sin(yaw), y + u * math.sin(yaw) + v * math.cos(yaw),
                                       z + rng.uniform(-0.5, 0.5)])
                    gt.append(dict(translation=centre, size=np.array(SIZES_WLH[name]), yaw=rng.uniform(-3, 3),
                                   velocity=np.zeros(2), name=name, attribute=CLASS_ATTRIBUTES[name][-1], num_pts=5))
        pred = []
        for box in gt:
            if box["name"] in ("construction_vehicle", "bus") or rng.random() < 0.15:
                continue
            for dup in range(1 + int(rng.random() < 0.2)):  # duplicates: false positives once the original matches
                attrs = CLASS_ATTRIBUTES[box["name"]]
                vel = box["velocity"] + rng.normal(0, 0.5, 2)
                pred.append(dict(
                    translation=box["translation"] + rng.normal(0, [sigma, sigma, 0.2]),
                    size=box["size"] * np.exp(rng.normal(0, 0.1, 3)),
                    yaw=box["yaw"] + rng.normal(0, 0.2) + (math.pi if rng.random() < 0.1 else 0.0),
                    velocity=np.full(2, np.nan) if rng.random() < 0.03 else np.where(np.isnan(vel), rng.normal(0, 3, 2), vel),
                    name=box["name"],
                    attribute=(box["attribute"] if rng.random() < 0.7 else str(rng.choice(attrs))) if attrs else "",
                    score=round(float(rng.uniform(0.05, 1.0)) * (0.6 if dup else 1.0), 2)))  # 2 decimals: ties
        for _ in range(int(rng.integers(3, 20))):  # false positives of every class, trailers and buses included
            name = str(rng.choice(DETECTION_CLASSES))
            if name == "construction_vehicle":
                continue
            r, a = rng.uniform(0, 60), rng.uniform(-math.pi, math.pi)
            if name == "bus":
                r, a = rng.uniform(10, 45), rng.uniform(math.pi - 1.2, math.pi + 1.2)
            attrs = CLASS_ATTRIBUTES[name]
            pred.append(dict(translation=ego + [r * math.cos(a), r * math.sin(a), 0.5], size=np.array(SIZES_WLH[name]),
                             yaw=rng.uniform(-math.pi, math.pi), velocity=rng.normal(0, 2, 2), name=name,
                             attribute=str(rng.choice(attrs)) if attrs else "", score=round(float(rng.uniform(0, 0.7)), 2)))
        pred = [pred[k] for k in rng.permutation(len(pred))]
        scene.append(dict(token=f"sample{seed}_{s}", ego=ego, racks=racks, gt=gt, pred=pred))
    scene.insert(int(rng.integers(len(scene) + 1)), _edge_sample(seed))
    return scene


def _edge_sample(seed: int) -> dict:
    """Exact ties: two cars at one centre (the earlier is matched), predictions exactly 0.5 and 1 m off (not
    matches at 0.5 and 1 m), equal scores (the later prediction goes first)."""
    ego = np.array([1000.0, 1000.0, 0.0])

    def car(x: float, size: tuple, attribute: str, velocity: tuple, **kw) -> dict:
        return dict(translation=np.array([x, 1000.0, 0.5]), size=np.array(size), yaw=0.25, velocity=np.array(velocity),
                    name="car", attribute=attribute, **kw)

    gt = [car(1010.0, (1.9, 4.6, 1.7), "vehicle.parked", (0.0, 0.0), num_pts=9),
          car(1010.0, (2.2, 5.0, 1.9), "vehicle.moving", (3.0, 1.0), num_pts=9),
          car(1020.0, (1.9, 4.6, 1.7), "vehicle.moving", (1.0, 1.0), num_pts=9),
          car(1030.0, (1.9, 4.6, 1.7), "vehicle.moving", (1.0, 1.0), num_pts=9)]
    pred = [car(1010.0, (2.0, 4.8, 1.8), "vehicle.moving", (1.0, 0.5), score=0.5),
            car(1021.0, (1.9, 4.6, 1.7), "vehicle.moving", (1.0, 1.0), score=0.5),
            car(1030.5, (1.9, 4.6, 1.7), "vehicle.stopped", (1.0, 1.0), score=0.5)]
    return dict(token=f"edge{seed}", ego=ego, racks=[], gt=gt, pred=pred)


class _FakeNuScenes:
    """The records `add_center_dist` and `filter_eval_boxes` read: samples, their LIDAR_TOP sample_data and ego
    pose, and the bicycle racks as sample annotations."""

    def __init__(self, scene: list[dict]):
        self.tables: dict[str, dict[str, dict]] = {"sample": {}, "sample_data": {}, "ego_pose": {}, "sample_annotation": {}}
        for sample in scene:
            t = sample["token"]
            anns = []
            for k, (x, y, z, w, l, h, yaw) in enumerate(sample["racks"]):
                anns.append(f"{t}_rack{k}")
                self.tables["sample_annotation"][anns[-1]] = dict(
                    category_name="static_object.bicycle_rack", translation=[x, y, z], size=[w, l, h], rotation=list(_quat(yaw)))
            self.tables["sample"][t] = dict(data={"LIDAR_TOP": f"{t}_sd"}, anns=anns)
            self.tables["sample_data"][f"{t}_sd"] = dict(ego_pose_token=f"{t}_pose")
            self.tables["ego_pose"][f"{t}_pose"] = dict(translation=[float(v) for v in sample["ego"]])

    def get(self, table: str, token: str) -> dict:
        return self.tables[table][token]


def _devkit_boxes(scene: list[dict], key: str) -> EvalBoxes:
    boxes = EvalBoxes()
    for sample in scene:
        boxes.add_boxes(sample["token"], [DetectionBox(
            sample_token=sample["token"], translation=tuple(float(v) for v in b["translation"]),
            size=tuple(float(v) for v in b["size"]), rotation=_quat(float(b["yaw"])),
            velocity=tuple(float(v) for v in b["velocity"]), num_pts=b.get("num_pts", -1), detection_name=b["name"],
            detection_score=b.get("score", -1.0), attribute_name=b["attribute"]) for b in sample[key]])
    return boxes


def _devkit_metrics(scene: list[dict]) -> tuple[dict, int]:
    """The devkit's DetectionEval, filtering included (centre distance, points, bicycle racks), on `scene`;
    also how many GT cycles the rack filter dropped."""
    nusc, cfg = _FakeNuScenes(scene), config_factory("detection_cvpr_2019")
    ev = DetectionEval.__new__(DetectionEval)  # __init__ reads files and a NuScenes; the rest as DetectionEval does
    ev.cfg, ev.verbose = cfg, False
    gt = add_center_dist(nusc, _devkit_boxes(scene, "gt"))
    n_cycles = sum(b.detection_name in ("bicycle", "motorcycle") and b.ego_dist < 40 and b.num_pts != 0 for b in gt.all)
    ev.gt_boxes = filter_eval_boxes(nusc, gt, cfg.class_range)
    ev.pred_boxes = filter_eval_boxes(nusc, add_center_dist(nusc, _devkit_boxes(scene, "pred")), cfg.class_range)
    ev.sample_tokens = ev.gt_boxes.sample_tokens
    metrics, _ = ev.evaluate()
    dropped = n_cycles - sum(b.detection_name in ("bicycle", "motorcycle") for b in ev.gt_boxes.all)
    return metrics.serialize(), dropped


def _ours(scene: list[dict], classes=NUSCENES_CLASS_SPECS):
    def boxes(items: list[dict], gt: bool) -> SampleBoxes:
        if not items:
            return SampleBoxes.empty(predictions=not gt)
        return SampleBoxes(translation=[b["translation"] for b in items], size=[b["size"] for b in items],
                           yaw=[b["yaw"] for b in items], velocity=[b["velocity"] for b in items],
                           names=[b["name"] for b in items], attributes=[b["attribute"] for b in items],
                           scores=None if gt else [b["score"] for b in items],
                           num_pts=[b["num_pts"] for b in items] if gt else None)

    return evaluate_detection([EvalSample(ego_translation=s["ego"], gt=boxes(s["gt"], True), pred=boxes(s["pred"], False),
                                          exclusion_boxes=s["racks"], token=s["token"]) for s in scene], classes)


def _same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or abs(a - b) <= 1e-9


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_equals_the_devkit_on_the_nuscenes_classes(seed):
    scene = _random_scene(seed)
    devkit, dropped = _devkit_metrics(scene)
    ours = _ours(scene).devkit_dict()
    assert dropped > 0, "the scene should put cycles in bicycle racks"
    assert list(ours["label_aps"]) == list(DETECTION_CLASSES) and tuple(TP_METRICS) == TP_ERRORS
    for name in DETECTION_CLASSES:
        for th in (0.5, 1.0, 2.0, 4.0):
            assert _same(ours["label_aps"][name][th], devkit["label_aps"][name][th]), (name, th)
        for metric in TP_METRICS:
            assert _same(ours["label_tp_errors"][name][metric], devkit["label_tp_errors"][name][metric]), (name, metric)
        assert _same(ours["mean_dist_aps"][name], devkit["mean_dist_aps"][name]), name
    for metric in TP_METRICS:
        assert _same(ours["tp_errors"][metric], devkit["tp_errors"][metric]), metric
        assert _same(ours["tp_scores"][metric], devkit["tp_scores"][metric]), metric
    assert _same(ours["mean_ap"], devkit["mean_ap"]) and _same(ours["nd_score"], devkit["nd_score"])
    # the scene covers what it should: classes without GT / predictions / matches, partial APs, NaN errors
    assert all(ours["label_aps"][c][4.0] == 0.0 for c in ("trailer", "construction_vehicle", "bus"))
    assert ours["label_tp_errors"]["trailer"]["trans_err"] == 1.0
    assert 0.0 < ours["label_aps"]["car"][0.5] < ours["label_aps"]["car"][4.0] < 1.0
    assert math.isnan(ours["label_tp_errors"]["traffic_cone"]["orient_err"])
    assert math.isnan(ours["label_tp_errors"]["barrier"]["vel_err"]) and not math.isnan(ours["label_tp_errors"]["barrier"]["orient_err"])
    assert 0.0 < ours["nd_score"] < 1.0


# ----------------------------------------------------------------------------- a class list of our own

OWN = (DetectionClassSpec("car", 50.0), DetectionClassSpec("van", 50.0), DetectionClassSpec("person", 40.0),
       DetectionClassSpec("cyclist", 40.0),
       DetectionClassSpec("cone", 30.0, scores_orientation=False, scores_velocity=False, scores_attributes=False))
OWN_SIZES = {"car": (1.8, 4.5, 1.6), "van": (2.0, 5.2, 2.2), "person": (0.6, 0.6, 1.8), "cyclist": (0.7, 1.8, 1.6),
             "cone": (0.4, 0.4, 0.8)}


def _own_gt(k: int) -> tuple[np.ndarray, SampleBoxes]:
    """Sample k: ego at (100 k, -50, 0); one box of each class 6 m apart along +x, all in range, plus a car with no
    points and a car 70 m away (both not scored)."""
    ego = np.array([100.0 * k, -50.0, 0.0])
    names = [*OWN_SIZES, "car", "car"]
    xs = [4.0 + 6.0 * i for i in range(len(OWN_SIZES))] + [-10.0, 70.0]
    return ego, SampleBoxes(translation=[ego + [x, 2.0, 1.0] for x in xs], size=[OWN_SIZES[n] for n in names],
                            yaw=np.linspace(-3.0, 3.0, len(names)), velocity=[[1.0, -0.5 * i] for i in range(len(names))],
                            names=names, attributes=["moving" if n != "cone" else "" for n in names],
                            num_pts=[10] * len(OWN_SIZES) + [0, 10])


def _as_predictions(gt: SampleBoxes, shift_cars_m: float = 0.0) -> SampleBoxes:
    keep = np.asarray(gt.num_pts) != 0  # the car with no points is not scored: predicting it would be a false positive
    shift = np.array([[shift_cars_m if n == "car" else 0.0, 0.0, 0.0] for n in gt.names])
    return SampleBoxes(translation=(gt.translation + shift)[keep], size=gt.size[keep], yaw=gt.yaw[keep],
                       velocity=gt.velocity[keep], names=[n for n, k in zip(gt.names, keep) if k],
                       attributes=[a for a, k in zip(gt.attributes, keep) if k], scores=np.ones(int(keep.sum())))


def _own_scene(shift_cars_m: float = 0.0) -> list[EvalSample]:
    out = []
    for k in range(3):
        ego, gt = _own_gt(k)
        out.append(EvalSample(ego_translation=ego, gt=gt, pred=_as_predictions(gt, shift_cars_m), token=f"own{k}"))
    return out


def test_ground_truth_as_predictions_scores_one_on_a_class_list_of_our_own():
    m = evaluate_detection(_own_scene(), OWN)
    assert m.class_names == tuple(OWN_SIZES)
    np.testing.assert_allclose(m.ap, np.ones((5, 4)), rtol=0, atol=1e-12)  # 0.9 / 0.9
    cone = list(m.class_names).index("cone")
    expected = np.zeros((5, 5))
    expected[cone, 2:] = np.nan  # the cone scores neither orientation, velocity nor attributes
    np.testing.assert_allclose(m.tp_errors, expected, atol=1e-12)
    np.testing.assert_allclose(m.mean_tp_errors, np.zeros(5), atol=1e-12)
    assert m.mean_ap == pytest.approx(1.0, abs=1e-12) and m.nds == pytest.approx(1.0, abs=1e-12)


def test_a_shift_of_1_5_m_matches_at_2_and_4_m_only():
    m = evaluate_detection(_own_scene(shift_cars_m=1.5), OWN)
    car = list(m.class_names).index("car")
    np.testing.assert_allclose(m.ap[car], [0.0, 0.0, 1.0, 1.0], rtol=0, atol=1e-12)
    np.testing.assert_allclose(m.tp_errors[car], [1.5, 0.0, 0.0, 0.0, 0.0], atol=1e-12)
    assert m.mean_dist_ap[car] == pytest.approx(0.5, abs=1e-12)
    # by hand: mAP (4 + 0.5) / 5; mATE 1.5 / 5, so its score 0.7; the other four TP scores 1
    assert m.mean_ap == pytest.approx(0.9, abs=1e-12)
    assert m.mean_tp_errors[0] == pytest.approx(0.3, abs=1e-12)
    assert m.nds == pytest.approx((5 * 0.9 + 0.7 + 4.0) / 10, abs=1e-12)


def test_a_class_without_ground_truth_and_a_list_without_attributes():
    with_truck = (*OWN, DetectionClassSpec("truck", 50.0))
    m = evaluate_detection(_own_scene(), with_truck)
    assert m.mean_dist_ap[-1] == 0.0 and m.mean_ap == pytest.approx(5 / 6, abs=1e-12)
    np.testing.assert_array_equal(m.tp_errors[-1], np.ones(5))
    # translation and scale over 6 classes (the truck's error 1), the others over the 5 that score them (no cone)
    np.testing.assert_allclose(m.tp_scores, [5 / 6, 5 / 6, 0.8, 0.8, 0.8], atol=1e-12)
    assert m.nds == pytest.approx((5 * 5 / 6 + 5 / 6 + 5 / 6 + 3 * 0.8) / 10, abs=1e-12)

    no_attrs = tuple(DetectionClassSpec(c.name, c.range_m, scores_orientation=c.scores_orientation,
                                        scores_velocity=c.scores_velocity, scores_attributes=False) for c in OWN)
    m = evaluate_detection(_own_scene(shift_cars_m=1.5), no_attrs)
    assert math.isnan(m.mean_tp_errors[4]) and math.isnan(m.tp_scores[4])
    assert m.nds == pytest.approx((5 * 0.9 + 0.7 + 3.0) / 9, abs=1e-12)  # AAE is left out of NDS, not scored 0


def test_bad_input_is_named():
    ego, gt = _own_gt(0)
    truck = SampleBoxes(translation=[[1.0, 2.0, 0.0]], size=[[2.0, 6.0, 3.0]], yaw=[0.0], velocity=[[0.0, 0.0]],
                        names=["truck"], scores=[0.5])
    with pytest.raises(PerceptionError, match="own0.*'truck'"):
        evaluate_detection([EvalSample(ego, gt, truck, token="own0")], OWN)
    many = SampleBoxes(translation=np.zeros((501, 3)), size=np.ones((501, 3)), yaw=np.zeros(501),
                       velocity=np.zeros((501, 2)), names=["car"] * 501, scores=np.ones(501))
    with pytest.raises(PerceptionError, match="501 predictions"):
        evaluate_detection([EvalSample(ego, gt, many, token="own0")], OWN)
    with pytest.raises(PerceptionError, match="size"):
        SampleBoxes(translation=[[0.0, 0.0, 0.0]], size=[[0.0, 1.0, 1.0]], yaw=[0.0], velocity=[[0.0, 0.0]], names=["car"])


# ------------------------------------------------------------------------------------------ pieces


def test_yaw_difference_wraps_around():
    np.testing.assert_allclose(yaw_difference([math.pi - 0.1], [-math.pi + 0.1]), [0.2], atol=1e-12)
    np.testing.assert_allclose(yaw_difference([0.3, -2.0], [-0.3, 2.0]), [0.6, 2 * math.pi - 4.0], atol=1e-12)
    np.testing.assert_allclose(yaw_difference([0.0, 0.1], [math.pi, math.pi - 0.1], math.pi), [0.0, 0.2], atol=1e-12)
    np.testing.assert_allclose(yaw_difference([0.0], [math.pi / 2]), [math.pi / 2], atol=1e-12)
    yaws = np.array([-3.0, -1.0, 0.0, 2.5])
    np.testing.assert_allclose(yaw_from_quaternion(np.array([_quat(y) for y in yaws])), yaws, atol=1e-12)


def test_scale_iou_closed_forms():
    sizes = np.array([[2.0, 4.0, 1.5], [2.0, 2.0, 2.0], [2.0, 4.0, 2.0]])
    np.testing.assert_allclose(scale_iou(sizes, sizes), np.ones(3))
    others = np.array([[1.0, 4.0, 1.5], [1.0, 1.0, 1.0], [4.0, 2.0, 2.0]])
    # half the width; one eighth of the volume inside; crossed footprints: 8 / (16 + 16 - 8)
    np.testing.assert_allclose(scale_iou(sizes, others), [0.5, 1 / 8, 1 / 3])


def test_running_mean_and_average_precision_closed_forms():
    x = np.array([[np.nan, np.nan], [1.0, np.nan], [3.0, np.nan], [np.nan, np.nan]])
    np.testing.assert_array_equal(running_mean(x), [[0.0, 1.0], [1.0, 1.0], [2.0, 1.0], [2.0, 1.0]])
    assert average_precision(np.ones(101), 0.1, 0.1) == pytest.approx(1.0)
    assert average_precision(np.full(101, 0.55), 0.1, 0.1) == pytest.approx(0.5)
    assert average_precision(np.r_[np.ones(51), np.zeros(50)], 0.1, 0.1) == pytest.approx(40 / 90)
