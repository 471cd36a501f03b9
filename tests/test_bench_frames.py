"""`perception bench latency --checkpoint CKPT --data D --split S`: whole-frame latency of a model over a split
(`deploy.bench.bench_frames`).

One random tiny checkpoint (small sizes, as tests/test_deploy.py makes them; LiDAR-measured velocities on, as
configs/tiny.yaml has them) runs `mini_val` (one scene of 6 frames) with 1 timed pass. Oracles: the split's frame
count, `perception eval`'s submission of the same checkpoint (boxes per frame) and `perception track`'s tracker on
that submission (tracked boxes per frame).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from deploy.bench import FRAME_STAGES, MIN_PASSES, bench_frames, format_frames
from perception.checkpoint import save_atomic
from perception.cli import app
from perception.config import load_config
from perception.evaluation import split_sample_tokens
from perception.model.build import build_model
from perception.tracking import track_submission

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["data.image_size=[64, 176]", "grid.cell=1.6", "model.fuser.modality_dropout=0"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A random tiny checkpoint in the trainer's format, whose heatmap logits are spread so that boxes come out."""
    torch.manual_seed(0)
    cfg = load_config(ROOT / "configs" / "tiny.yaml", SMALL)
    assert cfg.model.heads.lidar_velocity, "tiny measures velocities from the LiDAR sweeps: post-processing runs it"
    model = build_model(cfg).eval()
    with torch.no_grad():
        model.heads.detection.branches["heatmap"][3].weight.mul_(30.0)
    path = tmp_path_factory.mktemp("bench_frames") / "random.pt"
    save_atomic({"model": model.state_dict(), "ema": None, "config": cfg.model_dump(mode="json"), "step": 0}, path)
    return path


@pytest.fixture(scope="module")
def torch_frames(checkpoint, synth_root, tmp_path_factory) -> tuple[dict, str]:
    """The CLI's whole-frame run on the torch backend: (its JSON, its printed output)."""
    out = tmp_path_factory.mktemp("bench_frames_torch") / "frames.json"
    res = CliRunner().invoke(app, ["bench", "latency", "--checkpoint", str(checkpoint), "--data", str(synth_root),
                                   "--split", "mini_val", "--passes", "1", "--threads", "1", "--out", str(out)])
    assert res.exit_code == 0, res.output + repr(res.exception)
    return json.loads(out.read_text()), res.output


def test_every_stage_is_timed_for_every_frame_of_the_split(torch_frames, synth_root):
    result, printed = torch_frames
    frames = len(split_sample_tokens(synth_root, "v1.0-mini", "mini_val"))
    assert result["frames"] == frames == 6 and result["scenes"] == 1 and result["passes"] == 1
    assert {f["sample_token"] for f in result["per_frame"]} == split_sample_tokens(synth_root, "v1.0-mini", "mini_val")
    for stage in (*FRAME_STAGES, "frame", "frame_with_read"):
        series = result["samples_ms"][stage]
        assert len(series) == 1 and len(series[0]) == frames and all(v > 0 for v in series[0]), stage
    for stage in FRAME_STAGES:
        s = result["stages_ms"][stage]
        assert s["max"] >= s["p99"] >= s["p90"] >= s["median"] >= s["min"] > 0, stage
    # Per frame, the whole frame is its stages end to end (nothing overlaps, nothing is left out).
    for k in range(frames):
        stages = sum(result["samples_ms"][stage][0][k] for stage in FRAME_STAGES[1:])
        frame, with_read = result["samples_ms"]["frame"][0][k], result["samples_ms"]["frame_with_read"][0][k]
        assert stages <= frame * 1.001 + 1e-3 and frame <= stages * 1.05 + 0.1
        assert with_read == pytest.approx(frame + result["samples_ms"]["read"][0][k], rel=1e-3, abs=1e-2)
    assert result["frames_per_s"] == pytest.approx(1000.0 / result["frame_ms"]["median"])
    assert result["frames_per_s_with_read"] < result["frames_per_s"]
    assert result["lidar_velocity"] is True
    for line in ("read + decode", "pre-process", "core", "post-process", "tracking", "frame without reading",
                 "frame with reading", "frames/s"):
        assert line in printed, line


def test_the_json_states_the_protocol(torch_frames, checkpoint):
    result, printed = torch_frames
    protocol = " ".join(result["protocol"])
    for words in ("one after another", "no loader prefetch overlap", "warm-up pass", f"at least {MIN_PASSES}",
                  "median, p90 and p99", "with reading", "boxes per frame", "frames/s", "LiDAR-measured velocities",
                  "voxelisation", "pooling plan", "NMS", "tracker"):
        assert words in protocol, words
    assert result["protocol_met"] is False and "not the protocol's figures" in printed
    for key, value in (("backend", "torch"), ("device", "cpu"), ("threads", 1), ("checkpoint", str(checkpoint)),
                       ("split", "mini_val"), ("warmup_passes", 1)):
        assert result[key] == value, key
    assert "torch" in result["environment"]


def test_boxes_per_frame_are_those_of_eval_and_tracking(torch_frames, checkpoint, synth_root, tmp_path):
    """The same post-processing as `perception eval` (LiDAR velocities included) and the same tracker as
    `perception track`, frame by frame."""
    result, _ = torch_frames
    res = CliRunner().invoke(app, ["eval", "--checkpoint", str(checkpoint), "--data", str(synth_root), "--split",
                                   "mini_val", "--out", str(tmp_path), "--workers", "0", "--batch-size", "1"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    submission = json.loads((tmp_path / "submission.json").read_text())
    boxes = {f["sample_token"]: f["boxes"] for f in result["per_frame"]}
    assert boxes == {token: len(entries) for token, entries in submission["results"].items()}
    assert sum(boxes.values()) > 0, "the random checkpoint detects nothing: the comparison would be empty"
    assert result["boxes_per_frame"] == pytest.approx(sum(boxes.values()) / len(boxes))
    tracked = track_submission(submission, synth_root, "v1.0-mini")["results"]
    assert {f["sample_token"]: f["tracked"] for f in result["per_frame"]} == {t: len(v) for t, v in tracked.items()}


def test_onnx_backend_on_an_export(checkpoint, synth_root, torch_frames, tmp_path, caplog):
    export = tmp_path / "export"
    res = CliRunner().invoke(app, ["export", "--checkpoint", str(checkpoint), "--out", str(export)])
    assert res.exit_code == 0, res.output + repr(res.exception)
    with caplog.at_level(logging.WARNING, logger="deploy.bench"):
        result = bench_frames(export, synth_root, "mini_val", "onnx", passes=1, threads=1)
    assert f"at least {MIN_PASSES}" in caplog.text
    assert result["backend"] == "onnx" and "onnxruntime" in result["runner"] and result["frames"] == 6
    assert all(len(result["samples_ms"][s][0]) == 6 for s in FRAME_STAGES)
    assert [f["boxes"] for f in result["per_frame"]] == [f["boxes"] for f in torch_frames[0]["per_frame"]]
    assert "onnxruntime" in format_frames(result)


def test_whole_frame_mode_needs_checkpoint_data_and_split(checkpoint, synth_root):
    runner = CliRunner()
    res = runner.invoke(app, ["bench", "latency", "--checkpoint", str(checkpoint), "--data", str(synth_root)])
    assert res.exit_code != 0 and "--split" in res.output
    res = runner.invoke(app, ["bench", "latency", "--checkpoint", str(checkpoint), "--data", str(synth_root),
                              "--split", "mini_val", "--compile"])
    assert res.exit_code != 0 and "whole-frame mode" in res.output
