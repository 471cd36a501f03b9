"""How much of each map class the LiDAR can see: the ceiling that occlusion puts on map segmentation IoU.

    python benchmarks/map_visibility.py --data datasets/synthetic-mini --split mini_val [--config configs/tiny.yaml]

For each sample of the split (the config's evaluation pipeline: map targets on its map grid, no augmentation), a
map cell counts as *seen* when the keyframe LiDAR sweep's ray towards the cell's centre, on the ground, is not
stopped earlier: the sweep is binned by azimuth (`--azimuth-deg`), the nearest return more than
`--obstacle-height` metres above the ground (the 2nd percentile of point heights) sets how far that bin sees,
and a cell within `--max-range` metres and nearer than that is seen. Prints, per class, the target cells, the share
seen, the median range of its target cells from the LiDAR, and the share seen in each sample that has the class,
so a class that one scene hides shows as such. A cell that no sensor sees can only be segmented from priors
(layout, context), so the share seen bounds what a model that reads its sensors can reach: a prediction of exactly
the seen target cells scores IoU = the share seen, and the last line gives the mean of those over the classes.
"""

from __future__ import annotations

import argparse

import numpy as np

from perception.config import load_config
from perception.data.build import build_dataset
from perception.structures import MAP_CLASSES


def seen_cells(points_lidar: np.ndarray, centres_xy: np.ndarray, azimuth_deg: float, obstacle_height: float,
               max_range: float) -> np.ndarray:
    """(H, W) bool: the cells whose centre `centres_xy` (H, W, 2; LIDAR_TOP frame, m) the keyframe sweep
    `points_lidar` (N, >= 3; x, y, z in that frame) sees on the ground."""
    n_bins = int(round(360.0 / azimuth_deg))
    ground_z = np.percentile(points_lidar[:, 2], 2)
    tall = points_lidar[points_lidar[:, 2] > ground_z + obstacle_height]
    reach = np.full(n_bins, max_range)
    if len(tall):
        b = (np.degrees(np.arctan2(tall[:, 1], tall[:, 0])) % 360.0 / azimuth_deg).astype(int) % n_bins
        np.minimum.at(reach, b, np.hypot(tall[:, 0], tall[:, 1]))
    r = np.hypot(centres_xy[..., 0], centres_xy[..., 1])
    cb = (np.degrees(np.arctan2(centres_xy[..., 1], centres_xy[..., 0])) % 360.0 / azimuth_deg).astype(int) % n_bins
    return (r <= max_range) & (r < reach[cb])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/tiny.yaml")
    ap.add_argument("--data", default="datasets/synthetic-mini")
    ap.add_argument("--version", default="v1.0-mini")
    ap.add_argument("--split", default="mini_val")
    ap.add_argument("--azimuth-deg", type=float, default=0.5)
    ap.add_argument("--obstacle-height", type=float, default=0.5)
    ap.add_argument("--max-range", type=float, default=80.0)
    args = ap.parse_args()

    cfg = load_config(args.config)
    ds = build_dataset(cfg, args.data, args.version, args.split, train=False)
    grid = cfg.grid.build() if cfg.model.heads.map_grid is None else cfg.model.heads.map_grid.build("model.heads.map_grid", even=False)
    xs, ys = grid.cell_centers()
    centres = np.stack(np.meshgrid(xs, ys, indexing="xy"), -1)  # (H, W, 2): rows along y, columns along x
    total = np.zeros(len(MAP_CLASSES))
    seen = np.zeros(len(MAP_CLASSES))
    per_sample: list[list[float]] = [[] for _ in MAP_CLASSES]
    ranges: list[list[np.ndarray]] = [[] for _ in MAP_CLASSES]
    cell_range = np.hypot(centres[..., 0], centres[..., 1])
    for i in range(len(ds)):
        sample = ds[i]
        if not sample.has_map:
            continue
        points = sample.points_lidar.numpy()
        keyframe = points[points[:, 4] == 0] if points.shape[1] > 4 else points
        visible = seen_cells(keyframe, centres, args.azimuth_deg, args.obstacle_height, args.max_range)
        masks = sample.map_masks.numpy().astype(bool)
        for c in range(len(MAP_CLASSES)):
            n = int(masks[c].sum())
            if n:
                total[c] += n
                seen[c] += int((masks[c] & visible).sum())
                per_sample[c].append((masks[c] & visible).sum() / n)
                ranges[c].append(cell_range[masks[c]])
    print(f"{args.split}: {len(ds)} samples, map grid {grid.height}x{grid.width} at {grid.cell:g} m; a cell is seen when "
          f"the keyframe sweep's ray reaches its ground ({args.azimuth_deg:g} deg bins, obstacles > {args.obstacle_height:g} m)")
    print(f"{'class':15s} {'cells':>7s} {'seen':>6s} {'range m':>7s} {'samples':>7s} "
          f"{'seen per sample: min / median / max':>36s}")
    for c, name in enumerate(MAP_CLASSES):
        if not per_sample[c]:
            print(f"{name:15s} {0:7d}      -       -       0")
            continue
        q = np.percentile(per_sample[c], [0, 50, 100])
        print(f"{name:15s} {int(total[c]):7d} {seen[c] / total[c]:6.3f} {np.median(np.concatenate(ranges[c])):7.1f} "
              f"{len(per_sample[c]):7d} {q[0]:12.3f} / {q[1]:.3f} / {q[2]:.3f}")
    present = total > 0
    print(f"mIoU of a prediction of exactly the seen target cells, over the {int(present.sum())} classes present: "
          f"{float(np.mean(seen[present] / total[present])):.3f}")


if __name__ == "__main__":
    main()
