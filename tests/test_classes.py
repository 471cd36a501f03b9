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
