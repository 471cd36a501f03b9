"""Checkpoints: self-contained (the camera weights file may be gone), read with weights_only (pickled code is
refused, not run)."""

from __future__ import annotations

import collections
import hashlib
import io
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

from perception.checkpoint import (CHECKPOINT_FORMAT, init_from_checkpoint, load_checkpoint, model_from_checkpoint,
                                   rng_state, save_atomic, set_rng_state)
from perception.config import load_config
from perception.data.build import build_dataset
from perception.errors import PerceptionError
from perception.structures import DETECTION_CLASSES, MAP_CLASSES
from perception.training import RunSpec, Trainer
from tests.test_training import FAST, TINY

ROOT = Path(__file__).resolve().parent.parent
MEAN, STD = (0.1, 0.2, 0.3), (0.4, 0.5, 0.6)


def _hf_vit(folder: Path) -> None:
    """A timm ViT-Tiny saved as a Hugging Face folder whose config.json gives a non-default mean/std."""
    from timm.models import save_for_hf

    torch.manual_seed(1)
    source = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=(64, 176), depth=4)
    source.pretrained_cfg = {**source.pretrained_cfg, "mean": MEAN, "std": STD}
    save_for_hf(source, str(folder), safe_serialization=True)


def test_checkpoint_evaluates_after_its_pretrained_file_is_deleted(synth_root, tmp_path):
    from perception.data.collate import collate_samples
    from perception.evaluation import evaluate_checkpoint

    _hf_vit(tmp_path / "vit")
    cfg = load_config(TINY, FAST + [f"model.camera.pretrained={tmp_path / 'vit'}"])
    trainer = Trainer(cfg, RunSpec(data=synth_root, work_dir=tmp_path / "w", max_steps=1, device="cpu", progress=False))
    trainer.fit()
    trainer.close()
    last = tmp_path / "w" / "checkpoints" / "last.pt"
    vit_sha = hashlib.sha256((tmp_path / "vit" / "model.safetensors").read_bytes()).hexdigest()
    shutil.rmtree(tmp_path / "vit")
    metrics = evaluate_checkpoint(last, synth_root, "v1.0-mini", "mini_val", tmp_path / "eval", device="cpu", progress=False)
    assert 0.0 <= metrics["nds"] <= 1.0 and metrics["num_samples"] == 6

    # `--lidar-velocity` on a checkpoint trained without it: every sample's boxes go through the measurement
    import perception.model.bevfusion as bevfusion

    calls = []
    real = bevfusion.refine_velocities
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(bevfusion, "refine_velocities", lambda *a: calls.append(1) or real(*a))
        evaluate_checkpoint(last, synth_root, "v1.0-mini", "mini_val", tmp_path / "eval_lv", device="cpu",
                            progress=False, lidar_velocity=True)
    assert len(calls) == 6

    ckpt = load_checkpoint(last)
    assert ckpt["config"]["model"]["camera"]["pretrained"] is None
    assert ckpt["provenance"] == {"model.camera.pretrained": "vit", "model.camera.pretrained_sha256": vit_sha}
    card = ckpt["model_card"]
    np.testing.assert_allclose(card["normalization"]["pixel_mean"], np.array(MEAN) * 255, rtol=1e-6)
    np.testing.assert_allclose(card["normalization"]["pixel_std"], np.array(STD) * 255, rtol=1e-6)
    assert card["classes"]["detection"] == list(DETECTION_CLASSES) and card["classes"]["map"] == list(MAP_CLASSES)
    assert card["grid"] == {"x_min": -51.2, "x_max": 51.2, "y_min": -51.2, "y_max": 51.2, "z_min": -5.0, "z_max": 3.0,
                            "cell": 1.6}
    # the payload is plain data: torch.load(weights_only=True) alone reads it, RNG states included
    wrapped = torch.load(last, weights_only=True)
    payload = torch.load(io.BytesIO(wrapped["payload"]), weights_only=True)
    assert isinstance(payload["rng"]["numpy"]["keys"], torch.Tensor)

    # the rebuilt model is the trained one, normalisation included: the same outputs on a validation sample
    loaded = model_from_checkpoint(last)
    torch.testing.assert_close(torch.tensor(loaded.model.camera_encoder.pixel_mean), torch.tensor(MEAN) * 255)
    val = build_dataset(loaded.config, synth_root, "v1.0-mini", "mini_val", train=False, map_grid=loaded.model.map_grid)
    batch = collate_samples([val[0]])
    with torch.no_grad():
        expected = trainer.model.eval()(*trainer.model.prepare(batch).as_args())
        got = loaded.model(*loaded.model.prepare(batch).as_args())
    # another image size (export): position embeddings resampled, normalisation kept
    from timm.layers import resample_abs_pos_embed

    wide = model_from_checkpoint(last, image_size=(96, 176))
    assert wide.config.data.image_size == (96, 176) and wide.model.camera_encoder.feature_size == (6, 11)
    trained_pos = trainer.model.camera_encoder.backbone.pos_embed.detach()
    torch.testing.assert_close(wide.model.camera_encoder.backbone.pos_embed.detach(),
                               resample_abs_pos_embed(trained_pos, new_size=[6, 11], old_size=[4, 11], num_prefix_tokens=1))
    torch.testing.assert_close(torch.tensor(wide.model.camera_encoder.pixel_std), torch.tensor(STD) * 255)
    assert set(got) == set(expected) == {"heatmap", "offset", "z", "log_size", "rot", "velocity", "attribute", "map", "scene", "depth"}
    torch.testing.assert_close(got, expected)



def test_rng_state_round_trip_is_exact(tmp_path):
    random.seed(3)
    np.random.seed(4)
    torch.manual_seed(5)
    np.random.normal()  # a cached Gaussian in numpy's legacy state
    save_atomic({"rng": rng_state()}, tmp_path / "r.pt")
    expected = (random.random(), np.random.normal(size=3).tolist(), torch.rand(3).tolist())
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    set_rng_state(load_checkpoint(tmp_path / "r.pt")["rng"])
    assert (random.random(), np.random.normal(size=3).tolist(), torch.rand(3).tolist()) == expected
    # what save_atomic cannot store as plain data is refused before anything is written
    with pytest.raises(TypeError, match=r"checkpoint\.hook: a .*object is not plain data"):
        save_atomic({"hook": object()}, tmp_path / "bad.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.pt"]


# ---------------------------------------------------------------------------------------- pickled code


class _RunsCode:
    """Unpickling this calls ``shutil.copyfile(source, marker)``: code execution on load (a harmless one)."""

    def __init__(self, marker: Path):
        self.source = marker.with_name("payload.txt")
        self.source.write_text("pickled code ran")
        self.marker = marker

    def __reduce__(self):
        return (shutil.copyfile, (str(self.source), str(self.marker)))


class _Weights(collections.OrderedDict):
    """An OrderedDict subclass: unpickling it imports and instantiates a foreign class."""


def _wrap(payload: dict, path: Path, version: int = 2) -> None:
    """A checkpoint file as save_atomic writes it (valid checksum), around an arbitrary payload."""
    buf = io.BytesIO()
    torch.save(payload, buf)
    data = buf.getvalue()
    torch.save({"format": CHECKPOINT_FORMAT, "format_version": version, "sha256": hashlib.sha256(data).hexdigest(),
                "payload": data}, path)


def test_pickled_objects_are_refused_and_not_run(tmp_path):
    marker = tmp_path / "ran"
    weights = {"w": torch.ones(3)}
    for version in (1, 2):
        _wrap({"step": 1, "model": weights, "hook": _RunsCode(marker)}, tmp_path / f"wrapped{version}.pt", version)
    torch.save({"model": weights, "hook": _RunsCode(marker)}, tmp_path / "plain.pt")
    torch.save({"model": _Weights(weights)}, tmp_path / "subclass.pt")

    def init_from(path):
        return init_from_checkpoint(torch.nn.Linear(3, 1), path)

    for name, entry, pickled in (("wrapped1.pt", load_checkpoint, "shutil.copyfile"),
                                 ("wrapped2.pt", load_checkpoint, "shutil.copyfile"),
                                 ("plain.pt", load_checkpoint, "shutil.copyfile"),
                                 ("subclass.pt", load_checkpoint, "_Weights"),
                                 ("plain.pt", init_from, "shutil.copyfile"),
                                 ("wrapped1.pt", model_from_checkpoint, "shutil.copyfile")):
        with pytest.raises(PerceptionError) as info:
            entry(tmp_path / name)
        message = str(info.value)
        assert message.startswith(f"{tmp_path / name}: refused") and "\n" not in message, message
        assert pickled in message, message
        assert not marker.exists(), f"{name}: the pickled code ran"
    # format-1 files (numpy RNG states and metric values in the payload) still load
    legacy = {"step": 2, "model": weights, "best_nds": np.float64(0.5),
              "rng": {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}}
    _wrap(legacy, tmp_path / "v1.pt", version=1)
    old = load_checkpoint(tmp_path / "v1.pt")
    assert old["step"] == 2 and old["best_nds"] == 0.5 and torch.equal(old["model"]["w"], weights["w"])
    set_rng_state(old["rng"])


def test_cli_eval_refuses_a_checkpoint_with_pickled_code_in_one_line(synth_root, tmp_path):
    marker = tmp_path / "ran"
    _wrap({"step": 1, "config": {}, "model": {}, "hook": _RunsCode(marker)}, tmp_path / "evil.pt", version=1)
    env = dict(os.environ, PYTHONPATH=str(ROOT))  # this checkout's code, also from a clean clone
    res = subprocess.run([sys.executable, "-m", "perception", "eval", "--checkpoint", str(tmp_path / "evil.pt"),
                          "--data", str(synth_root), "--split", "mini_val", "--out", str(tmp_path / "out")],
                         capture_output=True, text=True, cwd=ROOT, env=env)
    assert res.returncode != 0
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "evil.pt: refused" in lines[0], res.stderr[-2000:]
    assert not marker.exists(), "the pickled code ran"
