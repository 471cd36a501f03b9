"""How well `perception.model.lidar_velocity` measures velocity on ground-truth boxes, per class.

    python benchmarks/lidar_velocity_gt.py --data datasets/synthetic-mini --split mini_val [--noise]

For every annotated box within `--max-range` metres of the LiDAR in the split's samples (evaluation pipeline of
`--config`: its sweeps, no augmentation), measures the box's velocity from the sample's sweeps and prints, per
class, how many boxes, the share with a valid measurement and the mean error |v_measured - v_true| (m/s) of the
valid ones, beside the mean true speed (the error of predicting zero). `--noise` first perturbs each box as a
detector might (centre and z by N(0, 0.3 m), sizes by U(0.9, 1.1), yaw by N(0, 0.1 rad); seeded).
"""

from __future__ import annotations

import argparse
import ast

import numpy as np
import torch

from perception.config import load_config
from perception.data.build import build_dataset
from perception.model.lidar_velocity import LidarVelocityConfig, lidar_box_velocity
from perception.structures import DETECTION_CLASSES


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/tiny.yaml")
    ap.add_argument("--data", default="datasets/synthetic-mini")
    ap.add_argument("--version", default="v1.0-mini")
    ap.add_argument("--split", default="mini_val")
    ap.add_argument("--max-range", type=float, default=50.0)
    ap.add_argument("--noise", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="a LidarVelocityConfig field (Python literal), e.g. --set max_reverse_speed=1.0 "
                         "--set silhouette_classes=()")
    args = ap.parse_args()
    cfg = LidarVelocityConfig(**{k: ast.literal_eval(v) for k, v in (s.split("=", 1) for s in args.set)})

    ds = build_dataset(load_config(args.config), args.data, args.version, args.split, train=False)
    rng = np.random.default_rng(args.seed)
    rows: dict[str, list[tuple[float, bool, float]]] = {name: [] for name in DETECTION_CLASSES}
    for i in range(len(ds)):
        points = torch.from_numpy(ds.load_points_lidar(i))
        boxes, labels, _ = ds.index.boxes_of(i)
        measured_from = boxes.copy()
        if args.noise:
            n = len(boxes)
            measured_from[:, :3] += rng.normal(0, 0.3, (n, 3))
            measured_from[:, 3:6] *= rng.uniform(0.9, 1.1, (n, 3))
            measured_from[:, 6] += rng.normal(0, 0.1, n)
        velocity, valid = lidar_box_velocity(torch.from_numpy(measured_from), points, cfg, torch.from_numpy(labels))
        for k in np.flatnonzero(np.hypot(boxes[:, 0], boxes[:, 1]) <= args.max_range):
            err = float(np.hypot(*(velocity[k].numpy() - boxes[k, 7:9])))
            rows[DETECTION_CLASSES[labels[k]]].append((err, bool(valid[k]), float(np.hypot(*boxes[k, 7:9]))))

    print(f"{args.split}: {len(ds)} samples, boxes within {args.max_range:g} m{', perturbed' if args.noise else ''}")
    print(f"{'class':22s} {'boxes':>5s} {'valid':>6s} {'error m/s':>9s} {'speed m/s':>9s}")
    for name, r in rows.items():
        if not r:
            continue
        err, ok, speed = (np.array(c) for c in zip(*r))
        mean_err = f"{err[ok].mean():9.2f}" if ok.any() else f"{'-':>9s}"
        print(f"{name:22s} {len(r):5d} {ok.mean():6.2f} {mean_err} {speed.mean():9.2f}")


if __name__ == "__main__":
    main()
