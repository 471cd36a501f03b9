"""Training ground truth is not range-filtered like the evaluation: the index keeps every box the devkit's
ground-truth filters keep without their per-class range, targets and the GT database keep the boxes whose
centre is on the BEV grid, and the devkit's evaluation still applies its ranges (`test_submission`)."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch

from perception.data.dataset import DatasetConfig, NuScenesDataset
from perception.data.gt_sampling import GTDatabase
from perception.model.heads import build_detection_targets
from perception.structures import CLASS_RANGE_M, DETECTION_CLASSES, BEVGrid

SPLIT_SCENES = ("scene-0103", "scene-0916")  # the devkit's mini_val


def _devkit_gt(nusc, max_dist: dict[str, float]) -> set[tuple]:
    """(sample token, class, rounded global centre) of the devkit's mini_val ground truth after its own filters."""
    from nuscenes.eval.common.loaders import add_center_dist, filter_eval_boxes, load_gt
    from nuscenes.eval.detection.data_classes import DetectionBox

    gt = filter_eval_boxes(nusc, add_center_dist(nusc, load_gt(nusc, "mini_val", DetectionBox)), max_dist)
    return {(b.sample_token, b.detection_name, tuple(np.round(b.translation, 3))) for b in gt.all}


def test_index_keeps_boxes_beyond_the_evaluation_range(synth_root, synth_nusc):
    ds = NuScenesDataset(synth_root, "v1.0-mini", "mini_val", config=DatasetConfig(map="off"))
    idx = ds.index
    ours = set()
    for i in range(len(idx)):
        a, b = idx.box_offsets[i], idx.box_offsets[i + 1]
        for token, label in zip(idx.box_tokens[a:b], idx.labels[a:b]):
            ann = synth_nusc.get("sample_annotation", str(token))
            ours.add((str(idx.tokens[i]), DETECTION_CLASSES[label], tuple(np.round(ann["translation"], 3))))
    # The devkit's points and bicycle-rack filters without a range give exactly the index's boxes ...
    assert ours == _devkit_gt(synth_nusc, {c: math.inf for c in DETECTION_CLASSES})
    # ... which include boxes the evaluation drops for their range.
    assert len(ours - _devkit_gt(synth_nusc, CLASS_RANGE_M)) > 0


@pytest.fixture()
def far_pedestrian_root(synth_root, synth_nusc, tmp_path):
    """A copy of the synthetic dataroot (tables copied, sensor folders linked) in which one annotation of a
    mini_val keyframe is a pedestrian at (45.2, 0.4, -0.9) m in its LIDAR_TOP frame: beyond the evaluation's
    40 m, inside the default +-51.2 m grid. Returns (root, sample token, annotation token)."""
    root = tmp_path / "nuscenes"
    root.mkdir()
    for entry in synth_root.iterdir():
        if entry.name == "v1.0-mini":
            shutil.copytree(entry, root / entry.name)
        else:
            (root / entry.name).symlink_to(entry)
    scene = next(s for s in synth_nusc.scene if s["name"] in SPLIT_SCENES)
    sample = synth_nusc.get("sample", scene["first_sample_token"])
    sd = synth_nusc.get("sample_data", sample["data"]["LIDAR_TOP"])
    cs = synth_nusc.get("calibrated_sensor", sd["calibrated_sensor_token"])
    pose = synth_nusc.get("ego_pose", sd["ego_pose_token"])

    def rigid(rotation, translation) -> np.ndarray:
        from pyquaternion import Quaternion

        m = np.eye(4)
        m[:3, :3] = Quaternion(rotation).rotation_matrix
        m[:3, 3] = translation
        return m

    lidar2global = rigid(pose["rotation"], pose["translation"]) @ rigid(cs["rotation"], cs["translation"])
    centre = (lidar2global @ [45.2, 0.4, -0.9, 1.0])[:3]
    assert np.hypot(*(centre[:2] - np.asarray(pose["translation"][:2]))) > CLASS_RANGE_M["pedestrian"] + 3

    tables = root / "v1.0-mini"
    anns = json.loads((tables / "sample_annotation.json").read_text())
    pedestrian = next(c["token"] for c in synth_nusc.category if c["name"] == "human.pedestrian.adult")
    moved = next(a for a in anns if a["sample_token"] == sample["token"])
    instance_token = moved["instance_token"]
    moved.update(translation=centre.tolist(), size=[0.7, 0.7, 1.8], rotation=[1.0, 0.0, 0.0, 0.0],
                 attribute_tokens=[], num_lidar_pts=12, num_radar_pts=0)
    (tables / "sample_annotation.json").write_text(json.dumps(anns))
    instances = json.loads((tables / "instance.json").read_text())
    next(i for i in instances if i["token"] == instance_token)["category_token"] = pedestrian
    (tables / "instance.json").write_text(json.dumps(instances))
    return root, sample["token"], moved["token"]


def test_pedestrian_beyond_its_evaluation_range_is_a_training_target(far_pedestrian_root):
    root, sample_token, ann_token = far_pedestrian_root
    ds = NuScenesDataset(root, "v1.0-mini", "mini_val", config=DatasetConfig(map="off"))
    idx = ds.index
    i = list(idx.tokens).index(sample_token)
    boxes, labels, attributes = idx.boxes_of(i)
    tokens = list(idx.box_tokens[idx.box_offsets[i]:idx.box_offsets[i + 1]])
    assert ann_token in tokens
    k = tokens.index(ann_token)
    assert DETECTION_CLASSES[labels[k]] == "pedestrian"
    np.testing.assert_allclose(boxes[k, :3], [45.2, 0.4, -0.9], atol=1e-3)

    grid = BEVGrid()  # x, y in [-51.2, 51.2), 0.8 m cells
    targets = build_detection_targets(torch.from_numpy(boxes), torch.from_numpy(labels), torch.from_numpy(attributes),
                                      torch.tensor([len(boxes)]), grid)
    row, col = math.floor((0.4 + 51.2) / 0.8), math.floor((45.2 + 51.2) / 0.8)  # 64, 120
    ped = DETECTION_CLASSES.index("pedestrian")
    assert float(targets.heatmap[0, ped, row, col]) == 1.0
    assert (row * grid.width + col) in targets.cell_index.tolist()


def test_targets_and_gt_database_keep_boxes_centred_on_the_grid(synth_root):
    grid = BEVGrid(x_min=-20.0, x_max=20.0, y_min=-16.0, y_max=16.0, cell=0.8)
    # Targets: centres just inside each bound are kept, just outside dropped, whatever z.
    xy = [(-19.99, 0.0), (19.99, 0.0), (0.0, -15.99), (0.0, 15.99), (-20.01, 0.0), (20.0, 0.0), (0.0, -16.01), (0.0, 16.0)]
    boxes = torch.tensor([[x, y, z, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0] for (x, y), z in zip(xy, [-9.0, 0.0, 9.0, 0.0] * 2)])
    t = build_detection_targets(boxes, torch.zeros(8, dtype=torch.long), torch.full((8,), -1), torch.tensor([8]), grid)
    assert t.regression.shape[0] == 4 and int((t.heatmap == 1).sum()) == 4
    assert t.regression[:, 2].tolist() == [-9.0, 0.0, 9.0, 0.0]

    # The GT database holds the boxes centred on the grid it is given, and the index has others.
    train = NuScenesDataset(synth_root, "v1.0-mini", "mini_train", config=DatasetConfig(lidar_sweeps=1, radar_sweeps=0, map="off"))
    db = GTDatabase.build(train, grid=grid)
    assert len(db) > 0
    x, y = db.boxes[:, 0], db.boxes[:, 1]
    assert ((x >= grid.x_min) & (x < grid.x_max) & (y >= grid.y_min) & (y < grid.y_max)).all()
    off = train.index.boxes
    assert ((np.abs(off[:, 0]) > 20) | (np.abs(off[:, 1]) > 16)).any()
