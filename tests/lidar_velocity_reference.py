"""The per-box implementation of `perception.model.lidar_velocity` as it stood before the measurement was batched
(issue 38): a Python loop over the boxes, each box's points found by a binary search over the points sorted by x.
Test-only: `tests/test_lidar_velocity.py` checks that the batched product gives the same velocities on its built
scenes and on random many-box scenes. Same signatures as the product's `lidar_box_velocity` and
`refine_velocities`; CPU only."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from perception.model.lidar_velocity import LidarVelocityConfig


def lidar_box_velocity(boxes: Tensor, points: Tensor, cfg: LidarVelocityConfig = LidarVelocityConfig(),
                       labels: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Velocities of `boxes` from the sweeps in `points`.

    Args:
        boxes: (K, 9) float, `Boxes3D` layout in the keyframe LIDAR_TOP frame (x, y, z centre, w, l, h, yaw, ...).
        points: (N, 5) float, the sample's motion-compensated LiDAR sweeps in the same frame: x, y, z, intensity,
            dt (s, >= 0; 0 for the keyframe sweep).
        labels: (K,) int class indices, for `cfg.silhouette_classes` and `cfg.forward_classes` (None: every box is
            measured from its point counts, in either direction).

    Returns: velocity (K, 2) float32 m/s in that frame, and valid (K,) bool: False where the box (lengthened by
    `keyframe_margin_m` at each end) holds fewer than `min_keyframe_points` keyframe points or its corridor has
    points from fewer than `min_sweeps` sweeps (its velocity is then 0 and should not be used).
    """
    K = boxes.shape[0]
    velocity = torch.zeros(K, 2, dtype=torch.float32)
    valid = torch.zeros(K, dtype=torch.bool)
    if K == 0 or points.shape[0] == 0:
        return velocity, valid
    boxes = boxes.detach().to("cpu", torch.float32)
    points = points.detach().to("cpu", torch.float32)
    label_list = [-1] * K if labels is None else labels.detach().cpu().tolist()
    order = torch.argsort(points[:, 0])
    pts = points[order]
    xs = pts[:, 0].contiguous()
    # A silhouette window takes in the points that any trial speed can move into it.
    max_shift = cfg.max_speed * float(points[:, 4].max())
    n_speeds = int(round(2 * cfg.max_speed / cfg.speed_step)) + 1
    speeds = torch.linspace(-cfg.max_speed, cfg.max_speed, n_speeds)
    # Ties (e.g. every trial speed pushes the same points out) go to the slowest speed.
    tie_break = speeds.abs() * 1e-6
    for k in range(K):
        x, y, z, w, l, h, yaw = boxes[k, :7].tolist()
        silhouette = label_list[k] in cfg.silhouette_classes
        half_extent = l / 2 + cfg.pad_m
        select_extent = half_extent + (max_shift if silhouette else 0.0)
        margin = cfg.silhouette_across_margin_m if silhouette else cfg.across_margin_m
        reach = select_extent + w / 2 + margin
        lo, hi = torch.searchsorted(xs, torch.tensor([x - reach, x + reach])).tolist()
        p = pts[lo:hi]
        dx, dy = p[:, 0] - x, p[:, 1] - y
        z_ok = (p[:, 2] > z - h / 2 + cfg.ground_clearance_m) & (p[:, 2] < z + h / 2 + cfg.top_margin_m)
        if label_list[k] in cfg.axis_fit_classes:
            yaw = _fit_axis(torch.stack([dx, dy], 1)[z_ok & (p[:, 4] == 0)], w, l, yaw, cfg)
        c, s = math.cos(yaw), math.sin(yaw)
        along_all = along = dx * c + dy * s
        across_all = across = -dx * s + dy * c
        m = (across.abs() < w / 2 + margin) & (along.abs() < select_extent) & z_ok
        along, dt = along[m], p[m, 4]
        keyframe = dt == 0
        if int((keyframe & (along.abs() < l / 2 + cfg.keyframe_margin_m)).sum()) < cfg.min_keyframe_points:
            continue
        if torch.unique(dt[along.abs() < half_extent]).numel() < cfg.min_sweeps:
            continue
        along_cell, dt_cell, count = _merge(along, dt, cfg.merge_m)
        moved = along_cell[None, :] + speeds[:, None] * dt_cell[None, :]  # (V, P): cells at keyframe time per speed
        n_bins = int(2 * half_extent / cfg.bin_m) + 1
        bins = torch.floor((moved + half_extent) / cfg.bin_m).long()
        inside = (bins >= 0) & (bins < n_bins)
        if silhouette:
            sharpness = _silhouette_contrast(bins, inside, dt_cell, n_bins, round(cfg.silhouette_dilate_m / cfg.bin_m))
        else:
            flat = (torch.arange(n_speeds)[:, None] * n_bins + bins.clamp(0, n_bins - 1))[inside]
            weight = count[None, :].expand(n_speeds, -1)[inside]
            hist = torch.zeros(n_speeds * n_bins, dtype=torch.float64).index_add_(0, flat, weight)
            sharpness = (hist.view(n_speeds, n_bins) ** 2).sum(1).float()
        score = sharpness / sharpness.max().clamp_min(1e-12) - tie_break
        if cfg.max_reverse_speed is not None and label_list[k] in cfg.forward_classes:
            score = torch.where(speeds < -cfg.max_reverse_speed, score - 2.0, score)
        v = float(speeds[int(torch.argmax(score))])
        heading = yaw
        if cfg.turn_steps and abs(v) > cfg.speed_step:
            heading += _direction_offset(torch.stack([along_all, across_all], 1)[z_ok], p[z_ok, 4], w, l, v, cfg)
        velocity[k] = torch.tensor([v * math.cos(heading), v * math.sin(heading)])
        valid[k] = True
    return velocity, valid


def _fit_axis(xy: Tensor, w: float, l: float, yaw: float, cfg: LidarVelocityConfig) -> float:
    """The box axis refitted to its keyframe points: the orientation within pi/4 of `yaw` whose bounding rectangle
    the points hug most closely (L-shape fitting with the closeness criterion of Zhang et al., "Efficient L-Shape
    Fitting for Vehicle Detection Using Laser Scanners", IV 2017), from the points within `axis_fit_margin_m` of
    the box. A rectangle has four such orientations a quarter turn apart; the one nearest `yaw` keeps the box's
    length axis, and a face seen alone (a rear face, a side) gives the axis as well as a corner does.

    xy: (M, 2) keyframe points above the ground: x, y in the boxes' frame (metres), relative to the box centre.
    Returns `yaw` itself when fewer than `axis_fit_min_points` points are near the box."""
    c, s = math.cos(yaw), math.sin(yaw)
    along, across = xy[:, 0] * c + xy[:, 1] * s, -xy[:, 0] * s + xy[:, 1] * c
    near = (along.abs() < l / 2 + cfg.axis_fit_margin_m) & (across.abs() < w / 2 + cfg.axis_fit_margin_m)
    if int(near.sum()) < cfg.axis_fit_min_points:
        return yaw
    xy = xy[near].double()
    offsets = torch.linspace(-math.pi / 4, math.pi / 4, cfg.axis_fit_steps, dtype=torch.float64)
    theta = yaw + offsets
    e1 = xy[None, :, 0] * torch.cos(theta)[:, None] + xy[None, :, 1] * torch.sin(theta)[:, None]  # (T, M)
    e2 = -xy[None, :, 0] * torch.sin(theta)[:, None] + xy[None, :, 1] * torch.cos(theta)[:, None]
    d1 = torch.minimum(e1.amax(1, keepdim=True) - e1, e1 - e1.amin(1, keepdim=True))
    d2 = torch.minimum(e2.amax(1, keepdim=True) - e2, e2 - e2.amin(1, keepdim=True))
    closeness = (1.0 / torch.minimum(d1, d2).clamp_min(0.01)).sum(1)
    best = torch.nonzero(closeness >= closeness.max() * (1 - 1e-9)).flatten()
    return yaw + float(offsets[best[torch.argmin(offsets[best].abs())]])


def _silhouette_contrast(bins: Tensor, inside: Tensor, dt: Tensor, n_bins: int, dilate: int) -> Tensor:
    """Per trial speed, the mean over covered (bin, sweep) pairs of how many sweeps' dilated silhouettes cover that
    bin (sum of squared coverage over its sum): largest when every sweep's body ends line up. bins, inside: (V, M)
    from the trial speeds; dt: (M,)."""
    n_speeds = bins.shape[0]
    sweep = torch.unique(dt, return_inverse=True)[1]
    n_sweeps = int(sweep.max()) + 1
    flat = ((torch.arange(n_speeds)[:, None] * n_sweeps + sweep[None, :]) * n_bins + bins.clamp(0, n_bins - 1))[inside]
    occupied = torch.zeros(n_speeds * n_sweeps * n_bins)
    occupied[flat] = 1.0
    occupied = F.max_pool1d(occupied.view(n_speeds * n_sweeps, 1, n_bins), 2 * dilate + 1, 1, dilate)
    covered = occupied.view(n_speeds, n_sweeps, n_bins).sum(1)
    return (covered ** 2).sum(1) / covered.sum(1).clamp_min(1)


def _direction_offset(box_xy: Tensor, dt: Tensor, w: float, l: float, v: float, cfg: LidarVelocityConfig) -> float:
    """The angle (rad, within `max_turn_rad`) to add to the box's yaw so that the points `box_xy` (M, 2: along,
    across the box axis, relative to its centre), moved by speed `v` for their `dt` in that direction, form the
    sharpest 2D histogram in the box frame (within 0.5 m of the box); ties go to the smallest turn."""
    half_l, half_w = l / 2 + 0.5, w / 2 + 0.5
    reach = abs(v) * float(dt.max()) if dt.numel() else 0.0  # no turn moves a point further than this
    near = (box_xy[:, 0].abs() < half_l + reach) & (box_xy[:, 1].abs() < half_w + reach)
    along0, across0, dt = box_xy[near, 0], box_xy[near, 1], dt[near]
    turns = torch.linspace(-cfg.max_turn_rad, cfg.max_turn_rad, cfg.turn_steps)
    along = along0[None, :] + v * dt[None, :] * torch.cos(turns)[:, None]  # (T, P) in the box frame
    across = across0[None, :] + v * dt[None, :] * torch.sin(turns)[:, None]
    keep = (along.abs() < half_l) & (across.abs() < half_w)
    n_along = int(2 * half_l / cfg.bin_m) + 1
    n_cells = (int(2 * half_w / cfg.bin_m) + 1) * n_along
    cells = (torch.floor((across + half_w) / cfg.bin_m).long() * n_along
             + torch.floor((along + half_l) / cfg.bin_m).long()).clamp(0, n_cells - 1)
    flat = (torch.arange(len(turns))[:, None] * n_cells + cells)[keep]
    hist = torch.bincount(flat, minlength=len(turns) * n_cells).double()
    score = (hist.view(len(turns), n_cells) ** 2).sum(1)  # integer-valued: ties are exact
    best = torch.nonzero(score == score.max()).flatten()
    return float(turns[best[torch.argmin(turns[best].abs())]])


def _merge(along: Tensor, dt: Tensor, cell_m: float) -> tuple[Tensor, Tensor, Tensor]:
    """Each sweep's points merged into cells of `cell_m` along the axis (one point per occupied cell, at its
    centre). along, dt: (M,) metres and sweep times. Returns the cells' along (P,), dt (P,) and point counts (P,)
    float64."""
    if along.numel() == 0:
        return along, dt, torch.zeros(0, dtype=torch.float64)
    lo = float(along.min())
    cell = torch.floor((along - lo) / cell_m).long()  # >= 0
    n_cells = int(cell.max()) + 1
    sweep_times, sweep = torch.unique(dt, return_inverse=True)
    key, count = torch.unique(sweep * n_cells + cell, return_counts=True)
    return lo + ((key % n_cells).float() + 0.5) * cell_m, sweep_times[key // n_cells], count.to(torch.float64)


def refine_velocities(boxes: Tensor, labels: Tensor, points: Tensor, cfg: LidarVelocityConfig) -> Tensor:
    """`boxes` (K, 9) with vx, vy replaced by `lidar_box_velocity` where it is valid and the label is one of
    `cfg.classes` (a new tensor on the boxes' device and dtype)."""
    velocity, valid = lidar_box_velocity(boxes, points, cfg, labels)
    use = valid & torch.isin(labels.cpu(), torch.tensor(cfg.classes, dtype=labels.dtype))
    out = boxes.clone()
    out[use.to(boxes.device), 7:9] = velocity[use].to(boxes.device, boxes.dtype)
    return out
