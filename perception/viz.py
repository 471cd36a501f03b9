"""Pictures a person would rather look at than read: the BEV of one sample with ground truth and predictions."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from perception.structures import DETECTION_CLASSES, MAP_CLASSES, BEVGrid

# One colour per detection class (matplotlib tab10), shared by every picture.
CLASS_COLOURS = {name: f"C{i}" for i, name in enumerate(DETECTION_CLASSES)}


def _box_outline(box: np.ndarray) -> np.ndarray:
    """(5, 2) closed BEV outline of one box (x, y, z, w, l, h, yaw, ...), LIDAR_TOP frame; length along yaw."""
    x, y, w, l, yaw = box[0], box[1], box[3], box[4], box[6]
    c, s = np.cos(yaw), np.sin(yaw)
    local = np.array([[l / 2, w / 2], [l / 2, -w / 2], [-l / 2, -w / 2], [-l / 2, w / 2], [l / 2, w / 2]])
    return local @ np.array([[c, s], [-s, c]]) + np.array([x, y])


def plot_bev(path: str | Path, sample, prediction=None, grid: BEVGrid | None = None, score_threshold: float = 0.3) -> Path:
    """Two panels over the BEV grid (LIDAR_TOP frame, x right, y forward):
    left: LiDAR points, ground-truth boxes and the ground-truth map (drivable area, crossings, walkways, dividers);
    right: the same points, predicted boxes with score >= `score_threshold` (heading tick, velocity arrow) and
    the predicted map probabilities.

    sample: a `perception.data.dataset.Sample`; prediction: a `perception.model.bevfusion.Prediction` or None.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = grid or BEVGrid()
    extent = (grid.x_min, grid.x_max, grid.y_min, grid.y_max)
    pts = sample.points_lidar.numpy()
    keep = (pts[:, 0] > grid.x_min) & (pts[:, 0] < grid.x_max) & (pts[:, 1] > grid.y_min) & (pts[:, 1] < grid.y_max)
    pts = pts[keep][::3]
    panels = [("ground truth", sample.boxes_lidar.tensor.numpy(), sample.labels.numpy(), None, sample.map_masks.float().numpy())]
    if prediction is not None:
        keep = prediction.scores.cpu().numpy() >= score_threshold
        panels.append(("prediction", prediction.boxes_lidar.tensor.cpu().numpy()[keep], prediction.labels.cpu().numpy()[keep],
                       prediction.scores.cpu().numpy()[keep], prediction.map_probs.float().cpu().numpy()))
    fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 7), squeeze=False)
    map_colours = {"drivable_area": (0.55, 0.55, 0.55), "ped_crossing": (0.9, 0.6, 0.1), "walkway": (0.3, 0.6, 0.3),
                   "stop_line": (0.8, 0.1, 0.1), "carpark_area": (0.6, 0.4, 0.7), "divider": (0.1, 0.3, 0.9)}
    for ax, (title, boxes, labels, scores, masks) in zip(axes[0], panels):
        rgb = np.ones((*masks.shape[1:], 3))
        for name in MAP_CLASSES:
            m = np.clip(masks[MAP_CLASSES.index(name)], 0, 1)[..., None] * 0.6
            rgb = rgb * (1 - m) + np.array(map_colours.get(name, (0.5, 0.5, 0.5))) * m
        ax.imshow(rgb, origin="lower", extent=extent, interpolation="nearest")
        ax.scatter(pts[:, 0], pts[:, 1], s=0.2, c="k", alpha=0.4, linewidths=0)
        for k, box in enumerate(boxes):
            name = DETECTION_CLASSES[int(labels[k])]
            outline = _box_outline(box)
            ax.plot(outline[:, 0], outline[:, 1], color=CLASS_COLOURS[name], lw=1.2)
            head = np.array([box[0], box[1]]) + 0.5 * box[4] * np.array([np.cos(box[6]), np.sin(box[6])])
            ax.plot([box[0], head[0]], [box[1], head[1]], color=CLASS_COLOURS[name], lw=1.0)
            if np.hypot(box[7], box[8]) > 0.5:
                ax.arrow(box[0], box[1], box[7], box[8], color=CLASS_COLOURS[name], width=0.05, head_width=0.6, alpha=0.7)
            if scores is not None:
                ax.text(box[0], box[1], f"{scores[k]:.2f}", fontsize=5)
        ax.plot([0], [0], marker="^", color="r", ms=8)
        ax.set_xlim(grid.x_min, grid.x_max)
        ax.set_ylim(grid.y_min, grid.y_max)
        ax.set_aspect("equal")
        ax.set_title(f"{title}: {len(boxes)} boxes")
        ax.set_xlabel("x (m, LIDAR_TOP)")
        ax.set_ylabel("y (m)")
    handles = [plt.Line2D([], [], color=c, label=n) for n, c in CLASS_COLOURS.items()]
    fig.legend(handles=handles, loc="lower center", ncol=5, fontsize=8)
    token = sample.meta.get("sample_token", "")
    fig.suptitle(f"sample {token}")
    fig.tight_layout(rect=(0, 0.05, 1, 0.97))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
