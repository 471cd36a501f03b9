"""`perception data check` on a good and a deliberately broken dataroot."""

from __future__ import annotations

import json
import shutil

import pytest
from typer.testing import CliRunner

from perception.cli import app
from perception.data.check import check_dataroot


def test_check_clean_dataroot(synth_root):
    report = check_dataroot(synth_root, "v1.0-mini", progress=False)
    assert report.errors == [], report.format()
    s = report.summary
    assert s["scenes"] == 3 and s["samples"] == 18
    assert s["sensors"]["LIDAR_TOP"][0] == 18 and len(s["sensors"]) == 12
    assert set(s["annotations_per_class"]) >= {"car", "pedestrian", "traffic_cone", "barrier"}
    assert all(layers["drivable_area"] > 0 for layers in s["map_layers"].values())
    assert s["files_decoded"] == 18 * 12
    text = report.format()
    assert "OK: 0 error(s)" in text and "LIDAR_TOP" in text


@pytest.fixture()
def broken_root(synth_root, tmp_path):
    root = tmp_path / "broken"
    shutil.copytree(synth_root, root)
    table = root / "v1.0-mini"
    sd = json.loads((table / "sample_data.json").read_text())
    keyframes = [r for r in sd if r["is_key_frame"]]
    lidar = [r for r in keyframes if "LIDAR_TOP" in r["filename"]]
    radar = [r for r in keyframes if "RADAR_FRONT/" in r["filename"]]
    cams = [r for r in keyframes if "CAM_FRONT/" in r["filename"]]
    broken = {}
    # 1. a missing LiDAR file
    (root / lidar[0]["filename"]).unlink()
    broken["missing"] = lidar[0]["filename"]
    # 2. a truncated LiDAR file (not a multiple of 20 bytes)
    p = root / lidar[1]["filename"]
    p.write_bytes(p.read_bytes()[:-7])
    broken["truncated"] = lidar[1]["filename"]
    # 3. a radar file without its trailing byte
    p = root / radar[0]["filename"]
    p.write_bytes(p.read_bytes()[:-1])
    broken["radar"] = radar[0]["filename"]
    # 4. a truncated JPEG
    p = root / cams[0]["filename"]
    p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 3])
    broken["jpeg"] = cams[0]["filename"]
    # 5. a broken next link
    sd[5]["next"] = "f" * 32
    broken["link"] = sd[5]["token"]
    (table / "sample_data.json").write_text(json.dumps(sd))
    # 6. a non-unit calibration rotation
    cs = json.loads((table / "calibrated_sensor.json").read_text())
    cs[0]["rotation"] = [1.0, 0.5, 0.0, 0.0]
    broken["calib"] = cs[0]["token"]
    (table / "calibrated_sensor.json").write_text(json.dumps(cs))
    return root, broken


def test_check_broken_dataroot_names_every_problem(broken_root):
    root, broken = broken_root
    report = check_dataroot(root, "v1.0-mini", progress=False)
    text = report.format()
    assert "FAILED" in text
    by_where = {(f.kind, f.where) for f in report.errors}
    assert ("missing_file", str(root / broken["missing"])) in by_where
    assert ("unreadable_file", str(root / broken["truncated"])) in by_where
    assert ("unreadable_file", str(root / broken["radar"])) in by_where
    assert ("unreadable_file", str(root / broken["jpeg"])) in by_where
    assert any(f.kind == "broken_link" and broken["link"] in f.where for f in report.errors)
    assert any(f.kind == "bad_rotation" and broken["calib"] in f.where for f in report.errors)
    assert len(report.errors) == 6, text


def test_check_cli_exit_codes(synth_root, broken_root, tmp_path):
    runner = CliRunner()
    ok = runner.invoke(app, ["data", "check", str(synth_root)])
    assert ok.exit_code == 0, ok.output
    assert "annotations per detection class" in ok.output
    root, broken = broken_root
    out = tmp_path / "report.json"
    bad = runner.invoke(app, ["data", "check", str(root), "--report", str(out)])
    assert bad.exit_code == 1
    assert broken["missing"] in bad.output
    assert len(json.loads(out.read_text())["errors"]) == 6
    missing = runner.invoke(app, ["data", "check", str(root), "--version", "v1.0-trainval"])
    assert missing.exit_code == 1 and "v1.0-trainval" in missing.output
