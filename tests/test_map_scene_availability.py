"""Real dataroots as users have them: no map expansion, scene tags from free-text descriptions, map metrics
under both protocols, and the map / scene losses and metrics restricted to samples that have ground truth."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from perception.config import load_config
from perception.data.dataset import DatasetConfig, NuScenesDataset
from perception.data.transforms import ImageAugConfig
from perception.errors import DataError
from perception.evaluation import SEG_THRESHOLDS, SegmentationStats, resample_map
from perception.model.build import build_model
from perception.model.synthetic import make_synthetic_batch
from perception.structures import BEVFUSION_MAP_GRID, MAP_CLASSES, SCENE_TAGS, BEVGrid, parse_scene_tags

ROOT = Path(__file__).resolve().parent.parent
SMALL_IMG = ImageAugConfig(final_hw=(64, 176))

# Scene descriptions of real nuScenes v1.0-mini scenes (scene.json), with the tags a person reads in them.
REAL_DESCRIPTIONS = {
    "Parked truck, construction, intersection, turn left, following a van": {"construction", "intersection"},
    "Many peds right, wait for turning car, long bike rack left, cyclist": {"pedestrians"},
    "Parking lot, parked cars, jaywalker, bendy bus": {"parking lot", "pedestrians"},
    "Wait at intersection, bicycle, large truck, peds crossing crosswalk, ped with stroller": {"intersection", "pedestrians"},
    "Night, big street, bus stop, high speed, construction vehicle": {"night", "construction"},
    "Night, after rain, many peds, PMD, ped with bag, jaywalker, truck, scooter": {"night", "rain", "pedestrians"},
    "Arrive at busy intersection, bus, wait at intersection, bicycle, peds": {"intersection", "pedestrians"},
    "Rain, truck, bus, car overtaking": {"rain"},
    "Big street, painted lanes, high speed, overtaking": set(),
}


@pytest.mark.parametrize("description", list(REAL_DESCRIPTIONS))
def test_scene_tags_from_real_descriptions(description):
    tags = {t for t, v in zip(SCENE_TAGS, parse_scene_tags(description)) if v > 0}
    assert tags == REAL_DESCRIPTIONS[description]


def test_scene_tags_synthetic_descriptions_keep_their_words():
    # The generator writes "night|day, rain|clear, <tags>": each tag name sets its own tag and nothing else.
    for i, tag in enumerate(SCENE_TAGS):
        v = parse_scene_tags(f"day, clear, {tag}")
        assert v[i] == 1 and v.sum() == 1, tag
    assert parse_scene_tags("day, clear").sum() == 0


def _copy_without_expansion(src: Path, dst: Path) -> Path:
    """A dataroot without maps/expansion: tables and map PNGs copied, sensor folders linked."""
    dst.mkdir(parents=True)
    for item in src.iterdir():
        if item.name in ("samples", "sweeps"):
            (dst / item.name).symlink_to(item.resolve())
        elif item.name == "maps":
            shutil.copytree(item, dst / "maps", ignore=shutil.ignore_patterns("expansion"))
        elif item.is_dir():
            shutil.copytree(item, dst / item.name)
        else:
            shutil.copy2(item, dst / item.name)
    assert not (dst / "maps" / "expansion").exists()
    return dst


@pytest.fixture(scope="module")
def no_expansion_root(synth_root, tmp_path_factory):
    return _copy_without_expansion(synth_root, tmp_path_factory.mktemp("noexp") / "nuscenes")


def test_dataset_without_map_expansion_loads_with_map_auto(no_expansion_root):
    cfg = DatasetConfig(lidar_sweeps=1, radar_sweeps=1, image=SMALL_IMG)
    ds = NuScenesDataset(no_expansion_root, "v1.0-mini", "mini_val", config=cfg)
    sample = ds[0]
    assert not sample.has_map and sample.has_scene_tags
    assert sample.map_masks.shape == (len(MAP_CLASSES), *cfg.grid.shape) and int(sample.map_masks.sum()) == 0


def test_map_on_without_expansion_fails_before_loading_naming_the_file(no_expansion_root):
    cfg = DatasetConfig(lidar_sweeps=1, radar_sweeps=1, image=SMALL_IMG, map="on")
    with pytest.raises(DataError, match=r"expansion.*\.json"):
        NuScenesDataset(no_expansion_root, "v1.0-mini", "mini_val", config=cfg)


def test_map_auto_with_expansion_renders_on_both_grids(synth_root):
    cfg = DatasetConfig(lidar_sweeps=1, radar_sweeps=1, image=SMALL_IMG, eval_map_grid=BEVFUSION_MAP_GRID)
    s = NuScenesDataset(synth_root, "v1.0-mini", "mini_val", config=cfg)[0]
    assert s.has_map and s.map_masks_eval.shape == (len(MAP_CLASSES), 200, 200)
    # The drivable area on the 0.8 m grid and on BEVFusion's 0.5 m grid agree where the cells overlap: look up
    # each 0.5 m cell centre in the 0.8 m mask (nearest cell) and compare.
    g = cfg.grid
    xs, ys = BEVFUSION_MAP_GRID.cell_centers()
    cols = np.floor((xs - g.x_min) / g.cell).astype(int)
    rows = np.floor((ys - g.y_min) / g.cell).astype(int)
    coarse = s.map_masks[0].numpy()[np.ix_(rows, cols)].astype(bool)
    fine = s.map_masks_eval[0].numpy().astype(bool)
    iou = (coarse & fine).sum() / max((coarse | fine).sum(), 1)
    assert fine.any() and iou > 0.9


def test_map_and_scene_losses_leave_out_samples_without_ground_truth():
    cfg = load_config(ROOT / "configs" / "tiny.yaml", ["data.image_size=[64,176]", "grid.cell=1.6"])
    model = build_model(cfg).eval()  # eval: BatchNorm statistics fixed, so samples do not mix
    grid = cfg.grid.build()
    batch = make_synthetic_batch(grid=grid, batch_size=2, image_size=(64, 176), seed=1)
    batch.has_map = torch.tensor([True, False])
    batch.has_scene_tags = torch.tensor([False, True])
    full = model.loss(batch)
    changed = make_synthetic_batch(grid=grid, batch_size=2, image_size=(64, 176), seed=1)
    changed.has_map, changed.has_scene_tags = batch.has_map, batch.has_scene_tags
    changed.map_masks[1] = 1 - changed.map_masks[1]  # no ground truth there: must not matter
    changed.scene_tags[0] = 1 - changed.scene_tags[0]
    again = model.loss(changed)
    for key in ("map_focal", "map_dice", "scene"):
        assert torch.isfinite(full[key]) and full[key].dtype == torch.float32
        assert again[key].item() == pytest.approx(full[key].item(), rel=1e-6), key
    # ... and a flipped mask where there is ground truth does matter.
    changed.map_masks[0] = 1 - changed.map_masks[0]
    assert model.loss(changed)["map_focal"].item() != pytest.approx(full["map_focal"].item(), rel=1e-3)
    # No sample with ground truth: zero terms that still reach the heads (backward works).
    batch.has_map = torch.tensor([False, False])
    batch.has_scene_tags = torch.tensor([False, False])
    none = model.train().loss(batch)
    assert none["map_focal"].item() == 0 and none["map_dice"].item() == 0 and none["scene"].item() == 0
    sum(none.values()).backward()


def _brute_force_per_class_best(probs: list[np.ndarray], targets: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(per-class best IoU, per-class IoU at the one best-mean threshold), with plain numpy loops."""
    C = probs[0].shape[0]
    iou = np.zeros((len(SEG_THRESHOLDS), C))
    for k, thr in enumerate(SEG_THRESHOLDS):
        for c in range(C):
            inter = sum(int(((p[c] >= thr) & (t[c] > 0)).sum()) for p, t in zip(probs, targets))
            union = sum(int(((p[c] >= thr) | (t[c] > 0)).sum()) for p, t in zip(probs, targets))
            iou[k, c] = inter / max(union, 1)
    return iou.max(0), iou[int(np.argmax(iou.mean(1)))]


def test_seg_metrics_both_protocols_against_brute_force():
    rng = np.random.default_rng(0)
    C = len(MAP_CLASSES)
    probs, targets = [], []
    stats = SegmentationStats()
    for _ in range(3):
        t = (rng.random((C, 20, 20)) < 0.4).astype(np.float32)
        # Class c is over- or under-confident by a different amount, so their best thresholds differ.
        bias = np.linspace(-0.25, 0.25, C)[:, None, None]
        p = np.clip(0.5 * t + 0.25 + bias + rng.normal(0, 0.1, t.shape), 0, 1).astype(np.float32)
        probs.append(p), targets.append(t)
        stats.update(torch.from_numpy(p), torch.from_numpy(t))
    per_class_best, at_mean_best = _brute_force_per_class_best(probs, targets)
    ours, bevfusion = stats.result(), stats.result_per_class_best()
    assert ours["seg_miou"] == pytest.approx(at_mean_best.mean())
    assert bevfusion["seg_miou_bevfusion"] == pytest.approx(per_class_best.mean())
    assert [bevfusion["seg_iou_bevfusion"][c] for c in MAP_CLASSES] == pytest.approx(list(per_class_best))
    assert bevfusion["seg_miou_bevfusion"] > ours["seg_miou"]  # the thresholds differ per class here
    assert len(set(bevfusion["seg_thresholds_bevfusion"].values())) > 1
    empty = SegmentationStats()
    assert empty.result()["seg_miou"] is None and empty.result_per_class_best()["seg_miou_bevfusion"] is None


def test_resample_map_to_bevfusion_grid_is_exact_for_a_linear_field():
    src = BEVGrid()  # 128 x 128 cells of 0.8 m, +-51.2 m
    xs, ys = src.cell_centers()
    field = torch.from_numpy((0.01 * xs[None, :] + 0.002 * ys[:, None] + 0.5).astype(np.float32))[None]
    out = resample_map(field, src, BEVFUSION_MAP_GRID)
    dx, dy = BEVFUSION_MAP_GRID.cell_centers()
    expected = 0.01 * dx[None, :] + 0.002 * dy[:, None] + 0.5
    # Bilinear interpolation reproduces a linear function between cell centres (all of [-50, 50) is inside).
    assert out.shape == (1, 200, 200)
    np.testing.assert_allclose(out[0].numpy(), expected, atol=1e-5)


def test_evaluation_without_map_expansion_reports_null_seg_metrics(no_expansion_root, tmp_path):
    import json

    from perception.evaluation import evaluate_model
    from perception.data.build import build_dataset

    cfg = load_config(ROOT / "configs" / "tiny.yaml", ["data.image_size=[64,176]", "grid.cell=1.6",
                                                      "data.lidar_sweeps=1", "data.radar_sweeps=1"])
    model = build_model(cfg)
    ds = build_dataset(cfg, no_expansion_root, "v1.0-mini", "mini_val", train=False, map_grid=model.map_grid)
    m = evaluate_model(model, ds, no_expansion_root, "v1.0-mini", "mini_val", tmp_path, device=torch.device("cpu"),
                       progress=False)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    for key in ("seg_miou", "seg_iou", "seg_miou_bevfusion", "seg_iou_bevfusion"):
        assert m[key] is None and saved[key] is None, key
    assert saved["seg_samples"] == 0 and saved["scene_samples"] == len(ds)


def _tree_state(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under `root` (links not followed) -> (size, mtime_ns): what must not change."""
    out = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        out[str(p.relative_to(root))] = (st.st_size, st.st_mtime_ns)
    return out


@pytest.mark.slow
def test_train_eval_viz_on_a_read_only_dataroot_without_map_expansion(no_expansion_root, tmp_path, monkeypatch):
    """Day one with a real dataroot: no map expansion, read-only. train (with GT sampling), eval and viz
    succeed, seg metrics are null, nothing is written into the dataroot (caches go to $PERCEPTION_CACHE)."""
    import json
    import os

    from typer.testing import CliRunner

    from perception.cli import app

    monkeypatch.setenv("PERCEPTION_CACHE", str(tmp_path / "cache"))
    before = _tree_state(no_expansion_root)
    os.chmod(no_expansion_root, 0o555)  # read-only where it can be (root ignores it: the tree check decides)
    try:
        fast = ["data.image_size=[64,176]", "grid.cell=1.6", "data.lidar_sweeps=1", "data.radar_sweeps=1",
                "train.num_workers=0", "train.batch_size=1", "train.gt_sampling=true"]
        runner = CliRunner()
        work = tmp_path / "run"
        res = runner.invoke(app, ["train", "--config", str(ROOT / "configs" / "tiny.yaml"), "--data", str(no_expansion_root),
                                  "--work-dir", str(work), "--max-steps", "2", "--device", "cpu", *fast])
        assert res.exit_code == 0, res.output
        ckpt = work / "checkpoints" / "last.pt"
        res = runner.invoke(app, ["eval", "--checkpoint", str(ckpt), "--data", str(no_expansion_root), "--split", "mini_val",
                                  "--out", str(tmp_path / "eval"), "--workers", "0", "--device", "cpu"])
        assert res.exit_code == 0, res.output
        metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
        assert metrics["seg_miou"] is None and metrics["seg_miou_bevfusion"] is None
        assert "not available" in res.output
        token = json.loads((no_expansion_root / "v1.0-mini" / "sample.json").read_text())[0]["token"]
        res = runner.invoke(app, ["viz", "--data", str(no_expansion_root), "--sample", token, "--checkpoint", str(ckpt),
                                  "--out", str(tmp_path / "viz"), "--device", "cpu"])
        assert res.exit_code == 0, res.output
        assert any((tmp_path / "viz").iterdir())
    finally:
        os.chmod(no_expansion_root, 0o755)
    assert _tree_state(no_expansion_root) == before


def test_data_check_says_which_heads_train_and_counts_scene_tags(synth_root, no_expansion_root):
    import json

    from perception.data.check import check_dataroot

    scenes = json.loads((synth_root / "v1.0-mini" / "scene.json").read_text())
    expected = {t: sum(parse_scene_tags(s["description"])[i] > 0 for s in scenes) for i, t in enumerate(SCENE_TAGS)}
    full = check_dataroot(synth_root, progress=False)
    assert full.summary["scene_tags"] == expected
    assert full.summary["heads"]["map segmentation"].startswith("trained and scored on all")
    bare = check_dataroot(no_expansion_root, progress=False)
    assert not bare.errors
    assert bare.summary["heads"]["map segmentation"].startswith("not trained, metrics null: no map expansion")
    assert "heads:" in bare.format() and "scenes per scene tag" in bare.format()
