"""`perception eval --results` against the devkit's own DetectionEval."""

from __future__ import annotations

import json

import pytest
from nuscenes.eval.common.config import config_factory
from nuscenes.eval.detection.evaluate import DetectionEval
from typer.testing import CliRunner

from perception.cli import app
from perception.evaluation import SegmentationStats, average_precision, evaluate_results_file


@pytest.fixture(scope="module")
def gt_file(synth_root, tmp_path_factory):
    from perception.data.submission import gt_submission

    return gt_submission(synth_root, "v1.0-mini", "mini_val", tmp_path_factory.mktemp("gt") / "gt.json")


@pytest.fixture(scope="module")
def shifted_file(gt_file, tmp_path_factory):
    sub = json.loads(gt_file.read_text())
    for entries in sub["results"].values():
        for e in entries:
            e["translation"][0] += 1.0  # 1 m east
    path = tmp_path_factory.mktemp("shifted") / "shifted.json"
    path.write_text(json.dumps(sub))
    return path


def test_eval_results_cli_on_gt_submission(synth_root, gt_file, tmp_path):
    res = CliRunner().invoke(app, ["eval", "--results", str(gt_file), "--data", str(synth_root), "--split", "mini_val",
                                   "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["nds"] >= 0.99
    for key in ("nds", "map", "mate", "mase", "maoe", "mave", "maae", "per_class_ap", "seg_iou", "seg_miou", "scene_map"):
        assert key in metrics
    assert "NDS" in res.output and "traffic_cone" in res.output


def test_shifted_boxes_give_expected_mate_and_match_devkit(synth_root, synth_nusc, shifted_file, tmp_path):
    metrics = evaluate_results_file(shifted_file, synth_root, "v1.0-mini", "mini_val", tmp_path / "ours")
    # every box is matched within the 2 m TP threshold at exactly 1 m: mATE 1
    assert metrics["mate"] == pytest.approx(1.0, abs=1e-3)
    # AP: the 2 m and 4 m thresholds match everything; 0.5 m nothing; 1 m is the boundary (float rounding)
    assert 0.45 < metrics["map"] < 0.8
    # the same file through the devkit's full NuScenes and DetectionEval directly
    ev = DetectionEval(synth_nusc, config_factory("detection_cvpr_2019"), str(shifted_file), "mini_val",
                       str(tmp_path / "direct"), verbose=False)
    direct = ev.evaluate()[0].serialize()
    assert metrics["nds"] == pytest.approx(direct["nd_score"], abs=1e-9)
    assert metrics["map"] == pytest.approx(direct["mean_ap"], abs=1e-9)
    assert metrics["mate"] == pytest.approx(direct["tp_errors"]["trans_err"], abs=1e-9)
    assert metrics["per_class_ap"] == pytest.approx(direct["mean_dist_aps"], abs=1e-9)


def test_eval_rejects_a_submission_missing_samples(synth_root, gt_file, tmp_path):
    sub = json.loads(gt_file.read_text())
    sub["results"].pop(next(iter(sub["results"])))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(sub))
    res = CliRunner().invoke(app, ["eval", "--results", str(bad), "--data", str(synth_root), "--split", "mini_val",
                                   "--out", str(tmp_path / "o")])
    assert res.exit_code != 0


def test_segmentation_iou_and_scene_ap():
    import torch

    stats = SegmentationStats()
    target = torch.zeros(6, 4, 4)
    target[:, :2] = 1
    probs = torch.zeros(6, 4, 4)
    probs[:, :2] = 0.9
    probs[:, 2, :2] = 0.5  # above 0.35..0.45 only: the best threshold (>= 0.5) gives IoU 1
    stats.update(probs, target)
    r = stats.result()
    assert r["seg_miou"] == pytest.approx(1.0) and r["seg_threshold"] >= 0.5
    assert average_precision([0.9, 0.8, 0.1], [1, 0, 1]) == pytest.approx((1 + 2 / 3) / 2)
    assert average_precision([0.1, 0.2], [0, 0]) is None


def test_lean_index_is_cached_outside_the_dataroot_and_scores_the_same(synth_root, shifted_file, tmp_path, monkeypatch):
    import perception.evaluation as ev

    monkeypatch.setenv("PERCEPTION_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(ev, "_SHARED_NUSC", {})  # nothing loaded in this process yet
    monkeypatch.setattr(ev, "_SHARED_GT", {})
    reads = []
    read_table = ev._read_table
    monkeypatch.setattr(ev, "_read_table", lambda root, name: reads.append(name) or read_table(root, name))
    before = sorted(p.name for p in synth_root.rglob("*"))
    first = evaluate_results_file(shifted_file, synth_root, "v1.0-mini", "mini_val", tmp_path / "first")
    assert "sample_data" in reads and list((tmp_path / "cache" / "lean_eval_index").glob("*.tables.json"))
    reads.clear()
    second = evaluate_results_file(shifted_file, synth_root, "v1.0-mini", "mini_val", tmp_path / "second")
    assert reads == []  # the cache hit: no table read
    for key in ("nds", "map", "mate", "mase", "maoe", "mave", "maae", "per_class_ap"):
        assert second[key] == first[key], key
    assert sorted(p.name for p in synth_root.rglob("*")) == before


def test_ground_truth_is_built_once_per_process_and_scores_as_the_devkit(synth_root, synth_nusc, gt_file, shifted_file,
                                                                         tmp_path, monkeypatch):
    """Several submissions of one split (robustness conditions, validations) share the LeanNuScenes and the
    filtered ground truth; each still scores exactly as the devkit's own DetectionEval on the full NuScenes."""
    import nuscenes.eval.detection.evaluate as devkit_evaluate

    import perception.evaluation as ev

    monkeypatch.setattr(ev, "_SHARED_NUSC", {})
    monkeypatch.setattr(ev, "_SHARED_GT", {})
    calls = []
    load_gt = devkit_evaluate.load_gt
    monkeypatch.setattr(devkit_evaluate, "load_gt", lambda *a, **k: calls.append(1) or load_gt(*a, **k))
    sub = json.loads(gt_file.read_text())
    for entries in sub["results"].values():  # a third submission: scores reversed, sizes off by 10 %
        for k, e in enumerate(entries):
            e["detection_score"] = 1.0 / (k + 2)
            e["size"] = [v * 1.1 for v in e["size"]]
    third = tmp_path / "third.json"
    third.write_text(json.dumps(sub))
    for n, path in enumerate((shifted_file, gt_file, third, shifted_file)):
        ours = evaluate_results_file(path, synth_root, "v1.0-mini", "mini_val", tmp_path / f"ours{n}")
        direct = DetectionEval(synth_nusc, config_factory("detection_cvpr_2019"), str(path), "mini_val",
                               str(tmp_path / f"direct{n}"), verbose=False).evaluate()[0].serialize()
        assert ours["nds"] == pytest.approx(direct["nd_score"], abs=1e-12), path
        assert ours["per_class_ap"] == pytest.approx(direct["mean_dist_aps"], abs=1e-12)
        assert ours["mase"] == pytest.approx(direct["tp_errors"]["scale_err"], abs=1e-12)
    assert len(calls) == 1 + 4  # ours once; the direct devkit runs once per submission
