"""Shared fixtures: one small synthetic nuScenes set per test session."""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # as perception/__init__ does, before numpy loads

import matplotlib  # noqa: E402

matplotlib.use("Agg")

import pytest  # noqa: E402

SMALL = dict(num_scenes=3, samples_per_scene=6, image_width=400, image_height=225, lidar_sweeps=2, radar_sweeps=2)


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory):
    """A small synthetic v1.0-mini dataroot: 3 scenes (2 mini_train, 1 mini_val), 6 samples each, 400x225
    images, 2 LiDAR and 2 radar sweeps per keyframe. Shared by every test; do not modify it."""
    from perception.data.synth.generate import SynthConfig, generate

    root = tmp_path_factory.mktemp("synth") / "nuscenes"
    generate(root, SynthConfig(**SMALL), workers=min(2, os.cpu_count() or 1), progress=False)
    return root


@pytest.fixture(scope="session")
def synth_nusc(synth_root):
    """The devkit's NuScenes over `synth_root` (shared, read-only)."""
    from nuscenes.nuscenes import NuScenes

    return NuScenes("v1.0-mini", str(synth_root), verbose=False)


@pytest.fixture(scope="session", autouse=True)
def _perception_cache_in_tmp(tmp_path_factory):
    """Caches (GT databases, ...) of the tests go to a temporary folder, never to ~/.cache/perception."""
    patch = pytest.MonkeyPatch()
    patch.setenv("PERCEPTION_CACHE", str(tmp_path_factory.mktemp("perception_cache")))
    yield
    patch.undo()
