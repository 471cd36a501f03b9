"""`perception data synth --tables-only`: a trainval-format dataroot of tables (and maps) without sensor files."""

from __future__ import annotations

import json
import math
from pathlib import Path
from statistics import median

import pytest
from nuscenes.nuscenes import NuScenes
from nuscenes.utils.splits import create_splits_scenes
from typer.testing import CliRunner

from perception.cli import app
from perception.data.check import check_dataroot
from perception.data.synth.generate import TABLES, default_samples_per_scene, is_tables_only, scene_names

SCENES, SAMPLES = 3, 4


@pytest.fixture(scope="module")
def tables_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tables_only")
    result = CliRunner().invoke(app, ["data", "synth", "--out", str(root), "--version", "v1.0-trainval", "--scenes", str(SCENES),
                                      "--samples-per-scene", str(SAMPLES), "--workers", "1", "--tables-only"])
    assert result.exit_code == 0, result.output
    return root


def test_tables_only_writes_tables_and_maps_but_no_sensor_file(tables_root):
    root = tables_root
    assert is_tables_only(root) and json.loads((root / "synth_config.json").read_text())["tables_only"] is True
    assert sorted(p.name for p in root.iterdir()) == ["maps", "synth_config.json", "v1.0-trainval"]
    assert sorted(p.name for p in (root / "v1.0-trainval").iterdir()) == sorted(f"{t}.json" for t in TABLES)
    sample_data = json.loads((root / "v1.0-trainval" / "sample_data.json").read_text())
    assert sample_data and all(r["filename"].startswith(("samples/", "sweeps/")) for r in sample_data)
    assert not any((root / r["filename"]).exists() for r in sample_data)
    assert {Path(r["filename"]).name.split(".", 1)[1] for r in sample_data} == {"jpg", "pcd.bin", "pcd"}
    # The coarse semantic prior stays small (a few kB for 3 scenes at 2 m per pixel).
    assert all(p.stat().st_size < 100_000 for p in (root / "maps").glob("*.png"))


def test_devkit_loads_the_tables_with_plausible_annotations(tables_root):
    nusc = NuScenes("v1.0-trainval", str(tables_root), verbose=False)
    assert len(nusc.scene) == SCENES and len(nusc.sample) == SCENES * SAMPLES
    visibility = {r["token"] for r in nusc.visibility}
    assert nusc.sample_annotation
    for ann in nusc.sample_annotation:
        assert ann["num_lidar_pts"] >= 1 and ann["num_radar_pts"] >= 0, ann["token"]
        assert ann["visibility_token"] in visibility, ann["token"]
    # Near objects carry many points and full visibility, far ones few.
    ego_xy = {s["token"]: nusc.get("ego_pose", nusc.get("sample_data", s["data"]["LIDAR_TOP"])["ego_pose_token"])["translation"][:2] for s in nusc.sample}
    near = [a for a in nusc.sample_annotation if _dist(a, ego_xy) < 15]
    far = [a for a in nusc.sample_annotation if _dist(a, ego_xy) > 61]
    assert near and far
    assert median(a["num_lidar_pts"] for a in near) > 5 * median(a["num_lidar_pts"] for a in far)
    assert {a["visibility_token"] for a in near} == {"4"} and {a["visibility_token"] for a in far} == {"1"}
    assert any(a["num_radar_pts"] > 0 for a in nusc.sample_annotation)
    # Scene names split as the devkit splits them.
    splits = create_splits_scenes()
    names = sorted(s["name"] for s in nusc.scene)
    assert names == sorted(n for n, _ in scene_names("v1.0-trainval", SCENES))
    assert len(set(names) & set(splits["train"])) == 2 and len(set(names) & set(splits["val"])) == 1


def _dist(ann: dict, ego_xy: dict) -> float:
    """Ground-plane distance (m) of an annotation from the ego at its sample's LiDAR keyframe."""
    x, y = ego_xy[ann["sample_token"]]
    return math.hypot(ann["translation"][0] - x, ann["translation"][1] - y)


def test_full_trainval_uses_every_devkit_train_and_val_name():
    # 850 scenes of 40 keyframes (the tables-only trainval default) give real nuScenes' ~34,000 samples.
    assert default_samples_per_scene("v1.0-trainval", tables_only=True) == 40
    assert default_samples_per_scene("v1.0-trainval", tables_only=False) == default_samples_per_scene("v1.0-mini", tables_only=True) == 20
    splits = create_splits_scenes()
    pairs = scene_names("v1.0-trainval", 850)
    assert {n for n, s in pairs if s == "train"} == set(splits["train"])
    assert {n for n, s in pairs if s == "val"} == set(splits["val"])


def test_check_skips_the_missing_files_of_a_tables_only_dataroot(tables_root):
    report = check_dataroot(tables_root, "v1.0-trainval", progress=False)
    assert report.errors == [], report.format()
    assert [w.kind for w in report.warnings if w.kind == "tables_only"] == ["tables_only"]
    assert "files_checked" not in report.summary and "no sensor files" in report.format()


def test_the_demo_refuses_a_tables_only_set(tmp_path):
    from perception.data.synth.generate import SynthConfig, generate
    from perception.demo import ensure_synthetic
    from perception.errors import PerceptionError

    root = tmp_path / "tables"
    generate(root, SynthConfig(version="v1.0-mini", num_scenes=2, samples_per_scene=2, tables_only=True),
             workers=1, progress=False)
    with pytest.raises(PerceptionError, match="tables-only"):
        ensure_synthetic(root)
