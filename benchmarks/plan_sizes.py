"""Lift-splat pooling-plan sizes of the real nuScenes rig against the synthetic example rig an export starts from.

    python benchmarks/plan_sizes.py

For configs/tiny.yaml and configs/base.yaml (random weights), prints the shapes of ``pool_segments`` (S, K) and
``pool_merges`` (M, K2) for `deploy.export.example_batch` (the synthetic rig whose plan, doubled, sizes the
TensorRT profiles of an export without --calib-data) and for the real sample of the mmdet3d info fixture
(tests/data/mmdet3d_nuscenes: one nuScenes keyframe's calibration).
"""

from __future__ import annotations

from pathlib import Path

from deploy.export import example_batch
from perception.config import load_config
from perception.data.build import build_dataset
from perception.data.collate import collate_samples
from perception.model.build import build_model

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "data" / "mmdet3d_nuscenes"


def main() -> None:
    for name in ("tiny", "base"):
        cfg = load_config(ROOT / "configs" / f"{name}.yaml")
        model = build_model(cfg).eval()
        synthetic = model.prepare(example_batch(model)).named()
        ds = build_dataset(cfg, FIXTURE, "v1.0-mini", None, train=False, info=FIXTURE / "nus_info.pkl")
        real = model.prepare(collate_samples([ds[0]])).named()
        for key in ("pool_segments", "pool_merges"):
            print(f"{name:5s} {key:14s} synthetic rig {tuple(synthetic[key].shape)}  real nuScenes rig {tuple(real[key].shape)}")


if __name__ == "__main__":
    main()
