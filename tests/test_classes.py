"""Class lists (`perception.classes`, the config's ``classes:`` section): the nuScenes preset against the devkit,
a user's list through the dataset and the model, and bad lists."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from perception.classes import NUSCENES
from perception.config import load_config
from perception.data.dataset import DatasetConfig, NuScenesDataset
from perception.data.submission import gt_submission
from perception.errors import ConfigError
from perception.model.build import build_model
from perception.model.synthetic import make_synthetic_batch

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["data.image_size=[64, 176]", "model.camera.blocks=1", "model.fuser.modality_dropout=0",
         "grid.x_min=-12.8", "grid.x_max=12.8", "grid.y_min=-12.8", "grid.y_max=12.8"]
# Three classes with bare and full category names, no attributes.
THREE = ["classes.preset=null",
         "classes.list=[{name: vehicle, categories: [vehicle.car, vehicle.truck, car]}, "
         "{name: person, categories: [human.pedestrian.adult, human.pedestrian.child], nms_radius_m: 0.5, "
         "eval_range_m: 40}, {name: cone, categories: [movable_object.trafficcone], score_velocity: false}]"]


def test_preset_maps_categories_as_the_devkit_does(synth_nusc):
    from nuscenes.eval.detection.utils import category_to_detection_name

    categories = [c["name"] for c in synth_nusc.category]  # the full nuScenes category list
    assert len(categories) == 23
    for cat in categories + ["car", "pedestrian", ""]:
        label = NUSCENES.label_of_category(cat)
        assert (None if label is None else NUSCENES.names[label]) == category_to_detection_name(cat), cat


def test_preset_is_the_devkit_detection_config():
    from nuscenes.eval.detection.config import config_factory

    cfg = config_factory("detection_cvpr_2019")
    assert set(NUSCENES.names) == set(cfg.class_names)
    assert {c.name: c.eval_range_m for c in NUSCENES.classes} == cfg.class_range


def test_user_classes_map_dataset_categories(synth_root, synth_nusc):
    classes = load_config(ROOT / "configs" / "tiny.yaml", THREE).classes.build()
    ds = NuScenesDataset(synth_root, "v1.0-mini", "mini_val", config=DatasetConfig(map="off", classes=classes))
    got = Counter(np.asarray(ds.index.labels).tolist())
    # The devkit's tables: annotations of the split's samples with those categories and at least one point.
    tokens = set(ds.index.tokens.tolist())
    want = Counter()
    for a in synth_nusc.sample_annotation:
        if a["sample_token"] in tokens and a["num_lidar_pts"] + a["num_radar_pts"] > 0:
            label = {"vehicle.car": 0, "vehicle.truck": 0, "human.pedestrian.adult": 1, "human.pedestrian.child": 1,
                     "movable_object.trafficcone": 2}.get(a["category_name"])
            if label is not None:
                want[label] += 1
    assert got == want and sum(got.values()) > 0
    assert (np.asarray(ds.index.attributes) == -1).all()  # the list has no attributes


def test_user_classes_size_the_heads_and_decode(tmp_path):
    cfg = load_config(ROOT / "configs" / "tiny.yaml", [*SMALL, *THREE])
    torch.manual_seed(0)
    model = build_model(cfg)
    batch = make_synthetic_batch(batch_size=2, image_size=cfg.data.image_size, grid=cfg.grid.build(), seed=2)
    batch.labels.remainder_(3)
    batch.attributes.fill_(-1)
    losses = model.loss(batch)
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    model.eval()
    with torch.no_grad():
        out = model(*model.prepare(batch).as_args())
        preds = model.predict(batch)
    assert out["heatmap"].shape[1] == 3
    for p in preds:
        assert (p.labels < 3).all() and (p.attributes == -1).all()


def test_gt_submission_names_the_user_classes(synth_root, tmp_path):
    classes = load_config(ROOT / "configs" / "tiny.yaml", THREE).classes.build()
    sub = json.loads(gt_submission(synth_root, "v1.0-mini", "mini_val", tmp_path / "gt.json", classes).read_text())
    names = {e["detection_name"] for entries in sub["results"].values() for e in entries}
    assert names <= {"vehicle", "person", "cone"} and "vehicle" in names
    assert all(e["attribute_name"] == "" for entries in sub["results"].values() for e in entries)


@pytest.mark.parametrize("overrides, message", [
    (["classes.list=[{name: a, categories: [car]}]"], "not both"),
    (["classes.preset=null"], "at least one class"),
    (["classes.preset=null", "classes.list=[{name: a, categories: [car]}, {name: a, categories: [bus]}]"], "duplicate"),
    (["classes.preset=null", "classes.list=[{name: a, categories: [car]}, {name: b, categories: [car]}]"], "also a category"),
    (["classes.preset=null", "classes.list=[{name: a, categories: [car], attributes: [moving]}]"], "not in classes.attributes"),
    (["classes.preset=null", "classes.list=[{name: a, categories: [car], colour: red}]"], "classes.list.0.colour"),
])
def test_bad_class_lists_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(ROOT / "configs" / "tiny.yaml", overrides)


def _perturbed(sub: dict, seed: int) -> dict:
    """A plausible detector's submission: the ground truth shifted, resized, turned, rescored, some dropped and
    some false positives added."""
    rng = np.random.default_rng(seed)
    out = {}
    for tok, entries in sub["results"].items():
        boxes = []
        for e in entries:
            if rng.random() < 0.2:
                continue
            e = dict(e)
            e["translation"] = [v + float(rng.normal(0, 0.6)) for v in e["translation"][:2]] + [e["translation"][2]]
            e["size"] = [v * float(rng.uniform(0.8, 1.2)) for v in e["size"]]
            e["velocity"] = [v + float(rng.normal(0, 0.5)) for v in e["velocity"]]
            e["detection_score"] = float(rng.uniform(0.05, 1.0))
            boxes.append(e)
            if rng.random() < 0.3:
                fp = dict(e)
                fp["translation"] = [e["translation"][0] + 6.0, e["translation"][1] - 3.0, e["translation"][2]]
                fp["detection_score"] = float(rng.uniform(0.05, 0.5))
                boxes.append(fp)
        out[tok] = boxes
    return {"meta": sub["meta"], "results": out}


def test_our_metric_on_the_preset_equals_the_devkit_on_real_tables(synth_root, tmp_path):
    """On the nuScenes list our class-list evaluation gives the devkit's DetectionEval numbers (1e-9)."""
    from perception.evaluation import class_list_detection_eval, detection_eval, shared_lean_nuscenes

    gt = json.loads(gt_submission(synth_root, "v1.0-mini", "mini_val", tmp_path / "gt.json").read_text())
    path = tmp_path / "pred.json"
    sub = _perturbed(gt, 0)
    path.write_text(json.dumps(sub))
    devkit = detection_eval(synth_root, "v1.0-mini", "mini_val", path, tmp_path / "devkit")
    ours = class_list_detection_eval(shared_lean_nuscenes("v1.0-mini", synth_root), list(sub["results"]), sub, NUSCENES)
    assert devkit["mean_ap"] > 0.05
    for key in ("nd_score", "mean_ap"):
        assert ours[key] == pytest.approx(devkit[key], abs=1e-9), key
    for name, err in devkit["tp_errors"].items():
        assert ours["tp_errors"][name] == pytest.approx(err, abs=1e-9, nan_ok=True), name
    for cls, ap in devkit["mean_dist_aps"].items():
        assert ours["mean_dist_aps"][cls] == pytest.approx(ap, abs=1e-9), cls


def test_ground_truth_of_a_user_class_list_scores_nds_one(synth_root, tmp_path):
    from perception.evaluation import evaluate_results_file

    classes = load_config(ROOT / "configs" / "tiny.yaml", THREE).classes.build()
    path = gt_submission(synth_root, "v1.0-mini", "mini_val", tmp_path / "gt.json", classes)
    m = evaluate_results_file(path, synth_root, "v1.0-mini", "mini_val", tmp_path / "eval", classes=classes)
    assert m["nds"] == pytest.approx(1.0) and m["map"] == pytest.approx(1.0)
    assert set(m["per_class_ap"]) == {"vehicle", "person", "cone"}
    assert np.isnan(m["maae"])  # the list has no attributes: not scored
    # The devkit itself refuses these names; a nuScenes name is refused under this list.
    sub = json.loads(path.read_text())
    next(e for entries in sub["results"].values() for e in entries)["detection_name"] = "car"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(sub))
    from perception.errors import PerceptionError
    with pytest.raises(PerceptionError, match="unknown detection_name 'car'"):
        evaluate_results_file(bad, synth_root, "v1.0-mini", "mini_val", tmp_path / "eval2", classes=classes)


def test_data_check_reports_what_a_user_list_leaves_unmapped(synth_root, tmp_path):
    from typer.testing import CliRunner

    from perception.cli import app
    from perception.data.check import check_dataroot

    cfg = tmp_path / "three.yaml"
    raw = {"classes": {"preset": None, "list": [
        {"name": "vehicle", "categories": ["vehicle.car", "vehicle.truck"]},
        {"name": "person", "categories": ["human.pedestrian.adult", "human.pedestrian.child"]}]}}
    import yaml
    cfg.write_text(yaml.safe_dump(raw))
    res = CliRunner().invoke(app, ["data", "check", str(synth_root), "--max-files", "1", "--config", str(cfg)])
    assert res.exit_code == 0, res.output
    assert "unmapped_category" in res.output and "vehicle.bus.rigid" in res.output
    # The preset lists its unmapped categories in the summary without a warning per category.
    report = check_dataroot(synth_root, "v1.0-mini", max_files_per_channel=1, progress=False)
    assert not [w for w in report.warnings if w.kind == "unmapped_category"]
    assert "vehicle.construction" not in report.summary["unmapped_categories"]
    counted = sum(n for _, n in report.summary["annotations_per_class"].values())
    assert counted == len(json.loads((synth_root / "v1.0-mini" / "sample_annotation.json").read_text()))
