"""Box velocities measured from the motion blur of the LiDAR sweeps (no learning): an option of the
post-processing (`DecodeSettings.lidar_velocity`).

A sample's sweeps are motion-compensated into the keyframe's LIDAR_TOP frame, so a static object's points from all
sweeps coincide, while a moving object's are smeared along its path: the sweep taken dt seconds before the
keyframe shows it v * dt behind. For each box, the points in a corridor along its length axis (within its width
and height, `pad_m` beyond each end) are moved forward by v * dt for trial speeds v, and the speed at which they
form the sharpest histogram along the axis (the sum of squared bin counts: contrast maximisation, as used for
motion estimation from event cameras) is the estimate. Its sign comes from the data, so a box predicted back to
front gets the right velocity. The direction is then searched within `max_turn_rad` of the box's yaw with the same
criterion on a 2D histogram in the box frame (a predicted yaw off by 0.1 rad would cost 0.7 m/s at 7 m/s).

For car, truck and trailer the box axis is first refitted to the keyframe points (L-shape fitting, `_fit_axes`):
a detector's yaw is often off by 0.3-0.5 rad on a 10 m trailer, and a corridor that slices diagonally through
the body measures nothing useful.

Measured on synthetic `mini_val` with the ground-truth boxes within 50 m (`benchmarks/lidar_velocity_gt.py`,
2026-12-01), mean error: car 0.52, bus 0.29, construction vehicle 0.23, pedestrian 0.19, motorcycle 0.23, bicycle
0.23, truck 1.25 and trailer 1.24 m/s (truck and trailer from their silhouettes; from the point counts they were
3.0 and 3.2). With boxes perturbed as a detector might (`--noise`): car 0.56, truck 1.68, trailer 1.80 m/s (0.62,
1.94, 2.72 without the axis refit). On the predicted boxes of three demo checkpoints mAVE is 0.74 +- 0.02 m/s
(README), and `configs/tiny.yaml` turns the measurement on.

All boxes are measured at once: tensor work over the (box, point) pairs, merged cells, trial speeds and turns,
with per-box offsets into flat histograms and no Python loop over boxes, on the boxes' device (the GPU when the
core runs there). On the demo checkpoint's 40 `mini_val` frames (about 95 boxes and 280,000 points each) it takes
0.11 s per frame on this 2-core CPU (median; mean 0.19 s, the heaviest 0.58 s), where the per-box loop it
replaced took 0.61 s (mean 0.71 s), with the same velocities (within 4e-9 m/s; `tests/lidar_velocity_reference.py`
keeps that loop for the tests).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class LidarVelocityConfig:
    """Search settings. Speeds in m/s, lengths in metres.

    classes: label indices whose velocity is replaced (others keep the head's); default: every detection class
        whose velocity the nuScenes metrics score (not barrier, traffic cone).
    max_turn_rad, turn_steps: the direction of motion is searched within this angle of the box's yaw (a predicted
        yaw is off by a few degrees, and 0.1 rad at 7 m/s is already 0.7 m/s of error); 0 steps: the yaw itself.
    min_keyframe_points, keyframe_margin_m: a box is measured only when it holds this many keyframe points, counted
        within this margin beyond each end of its length. A LiDAR sees a car ahead in its lane only on its rear face,
        which lies on the box's end: a predicted box a few centimetres too far forward or too short would hold none
        (without the margin, 46% of the matched cars of a demo checkpoint were not measured).
    silhouette_classes: label indices measured from each sweep's silhouette along the box axis rather than from its
        point counts (default `(1, 3)`: truck, trailer; `()`: none). A truck and its trailer make one long side
        face: its point density along the axis follows the beam pattern and the occlusion edges, which move with
        the sensor rather than the vehicle, and the counts align best at the sensor's speed or at rest. The
        silhouette (the bins that hold a point, dilated by `silhouette_dilate_m` to close the gaps between beam
        columns, in a corridor `silhouette_across_margin_m` wider than the box to tolerate a yaw error over a long
        body) keeps only the body's ends; its contrast is normalised by the coverage, since body parts enter and
        leave the window.
    merge_m: before the speed search, each sweep's points in a box's corridor are merged into cells of this size
        along the box axis, each cell a point weighted by its count at the cell centre. A point moves by at most
        half a cell (an eighth of `bin_m` by default: with a quarter, mAVE of a demo checkpoint moved by up to
        0.06 m/s); the search then costs the number of occupied cells rather than of points (a truck's side face
        holds tens of thousands).
    axis_fit_classes, axis_fit_margin_m, axis_fit_min_points, axis_fit_steps: label indices (default `(0, 1, 3)`:
        car, truck, trailer; `()`: none) whose box axis is refitted (`_fit_axes`, over `axis_fit_steps`
        orientations) to their keyframe points within `axis_fit_margin_m` of the box, when it holds at least
        `axis_fit_min_points` of them, before the speed is searched along it. A 1 m margin took in neighbours
        (car error on the ground-truth boxes 0.51 -> 0.56 m/s; 0.52 with 0.5 m). Bus and construction vehicle
        are left out: refitting them did not lower their error on demo checkpoints.
    max_reverse_speed: when set, a vehicle (a label of `forward_classes`) is not measured moving backwards along
        its box yaw faster than this (None: the sign comes from the points alone, so a box predicted back to front
        still gets the right velocity).
    """

    classes: tuple[int, ...] = (0, 1, 2, 3, 4, 5, 6, 7)
    max_speed: float = 16.0
    speed_step: float = 0.25
    bin_m: float = 0.25
    pad_m: float = 4.0
    min_keyframe_points: int = 3
    keyframe_margin_m: float = 0.5
    min_sweeps: int = 3
    across_margin_m: float = 0.2
    ground_clearance_m: float = 0.3
    top_margin_m: float = 0.2
    max_turn_rad: float = 0.3
    turn_steps: int = 25
    silhouette_classes: tuple[int, ...] = (1, 3)
    silhouette_dilate_m: float = 1.5
    silhouette_across_margin_m: float = 0.8
    merge_m: float = 0.03125
    axis_fit_classes: tuple[int, ...] = (0, 1, 3)
    axis_fit_margin_m: float = 0.5
    axis_fit_min_points: int = 10
    axis_fit_steps: int = 81
    max_reverse_speed: float | None = None
    forward_classes: tuple[int, ...] = (0, 1, 2, 3, 4, 6, 7)


# Memory: boxes go in chunks whose largest temporary (trial values x points or merged cells of the chunk's boxes,
# with their histograms) holds at most `_MAX_ELEMENTS` elements plus one box's (8 bytes each at most: 2^23 keeps
# each near 64 MiB); a box larger than that is processed alone. On the CPU chunks of `_CPU_CHUNK_ELEMENTS` are
# faster (their temporaries stay in the caches: 2^18 took the demo's heaviest frames from 0.65-0.8 to 0.47-0.56 s
# of CPU time). Candidate (box, point) pairs, before the exact window tests, go in chunks of `_MAX_CANDIDATES`.
_MAX_ELEMENTS = 1 << 23
_CPU_CHUNK_ELEMENTS = 1 << 18
_MAX_CANDIDATES = 1 << 22
_COLUMN_M = 0.5  # width of the x columns of `_PointIndex` (m)
_ROW_M = 0.0625  # and of its y rows within a column
_SLACK_M = 1e-3  # added to every bound that only narrows down candidates, against rounding (m)


def lidar_box_velocity(boxes: Tensor, points: Tensor, cfg: LidarVelocityConfig = LidarVelocityConfig(),
                       labels: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Velocities of `boxes` from the sweeps in `points`, all boxes at once on the boxes' device.

    Args:
        boxes: (K, 9) float, `Boxes3D` layout in the keyframe LIDAR_TOP frame (x, y, z centre, w, l, h, yaw, ...).
        points: (N, 5) float, the sample's motion-compensated LiDAR sweeps in the same frame: x, y, z, intensity,
            dt (s, >= 0; 0 for the keyframe sweep); moved to the boxes' device.
        labels: (K,) int class indices, for `cfg.silhouette_classes`, `cfg.axis_fit_classes` and
            `cfg.forward_classes` (None: every box is measured from its point counts along its own yaw, in either
            direction).

    Returns: velocity (K, 2) float32 m/s in that frame, and valid (K,) bool, both on the boxes' device: False where
    the box (lengthened by `keyframe_margin_m` at each end) holds fewer than `min_keyframe_points` keyframe points
    or its corridor has points from fewer than `min_sweeps` sweeps (its velocity is then 0 and should not be used).

    A box draws on the points of its x-window (x within its corridor's reach of its centre) strictly between its
    bottom plus `ground_clearance_m` and its top plus `top_margin_m`. Each step (axis fit, speed search, direction
    search) takes the (box, point) pairs it can use from a column index of the points (`_PointIndex`) and works on
    all pairs, or all merged cells, of all boxes at once, with per-box offsets into flat histograms.
    """
    dev = boxes.device
    K = boxes.shape[0]
    velocity = torch.zeros(K, 2, dtype=torch.float32, device=dev)
    valid = torch.zeros(K, dtype=torch.bool, device=dev)
    if K == 0 or points.shape[0] == 0:
        return velocity, valid
    b32 = boxes.detach()[:, :7].to(torch.float32)
    b64 = b32.double()  # the float32 values: thresholds are formed in float64 from them, then rounded to float32
    points = points.detach().to(dev, torch.float32)
    labels = torch.full((K,), -1, dtype=torch.long, device=dev) if labels is None else labels.detach().to(dev)
    silhouette = _isin(labels, cfg.silhouette_classes)
    dt_max = float(points[:, 4].max())
    max_shift = cfg.max_speed * dt_max  # no trial speed moves a point of the sample further (m)
    w, l = b64[:, 3], b64[:, 4]
    select_extent, margin = _corridor(b64, silhouette, max_shift, cfg)
    reach = select_extent + w / 2 + margin
    zero = torch.zeros_like(w)

    yaw = b64[:, 6]
    fit = _isin(labels, cfg.axis_fit_classes)
    if bool(fit.any()):
        keyframe = _PointIndex(points, b64, reach, cfg, keyframe_only=True)
        box, i = keyframe.pairs(fit, yaw, zero, l / 2 + cfg.axis_fit_margin_m, w / 2 + cfg.axis_fit_margin_m)
        yaw = _fit_axes(box, _take(keyframe.x, i) - _take(b32[:, 0].contiguous(), box),
                        _take(keyframe.y, i) - _take(b32[:, 1].contiguous(), box), b64, fit, cfg)
    c, s = torch.cos(yaw).float(), torch.sin(yaw).float()

    index = _PointIndex(points, b64, reach, cfg)
    box, i = index.pairs(torch.ones_like(fit), yaw, zero, select_extent, w / 2 + margin)
    along, across = _box_frame(box, _take(index.x, i), _take(index.y, i), b32, c, s)
    speed, valid = _search_speeds(box, along, across, _take(index.sweep, i), index.sweep_times, b64, silhouette,
                                  _isin(labels, cfg.forward_classes), max_shift, cfg)

    heading = yaw
    search = valid & (speed.double().abs() > cfg.speed_step)
    if cfg.turn_steps and bool(search.any()):
        # A point is moved into the box (within 0.5 m) from behind it, by up to shift = |speed| x dt_max turned by
        # up to max_turn_rad: along the axis from -(l / 2 + 0.5) - shift x (2 - cos max_turn) to l / 2 + 0.5 (for a
        # positive speed; further by shift x -cos max_turn beyond a quarter turn), across within w / 2 + 0.5 +
        # shift x sin max_turn (the bounds `_direction_offsets` tests).
        turned = min(cfg.max_turn_rad, math.pi)
        shift = speed.double().abs() * dt_max
        behind, ahead = shift * (2 - math.cos(turned)), shift * max(0.0, -math.cos(turned))
        across_reach = shift * math.sin(min(turned, math.pi / 2))
        box, i = index.pairs(search, yaw, -torch.sign(speed.double()) * (behind - ahead) / 2,
                             l / 2 + 0.5 + (behind + ahead) / 2, w / 2 + 0.5 + across_reach)
        along, across = _box_frame(box, _take(index.x, i), _take(index.y, i), b32, c, s)
        heading = yaw + _direction_offsets(box, along, across, _take(index.dt, i), b64, speed, search, cfg).double()
    v64 = speed.double()
    measured = torch.stack([v64 * torch.cos(heading), v64 * torch.sin(heading)], 1).float()
    return torch.where(valid[:, None], measured, velocity), valid


def _take(values: Tensor, index: Tensor) -> Tensor:
    """values[index] along the first dimension (`index_select`: on the CPU several times faster than indexing)."""
    return values.index_select(0, index)


def _isin(labels: Tensor, classes: tuple[int, ...]) -> Tensor:
    """(K,) bool: which of `labels` (K,) int are among `classes`."""
    return torch.isin(labels, torch.tensor(classes, dtype=labels.dtype, device=labels.device))


def _chunk_elements(device: torch.device) -> int:
    """The elements of the largest temporary of a chunk of boxes on `device`."""
    return _CPU_CHUNK_ELEMENTS if device.type == "cpu" else _MAX_ELEMENTS


def _chunks(cost: Tensor, limit: int) -> list[tuple[int, int]]:
    """Consecutive ranges [k0, k1) of rows whose summed `cost` ((K,) int, elements) is at most `limit` plus the
    cost of one row: a row starts a new chunk when its cumulative start offset crosses a multiple of `limit`.
    Rows of cost 0 at either end of a chunk are kept in it."""
    cost = cost.to("cpu", torch.int64)
    if cost.numel() == 0:
        return []
    group = (torch.cumsum(cost, 0) - cost) // max(int(limit), 1)
    edges = (torch.nonzero(group[1:] != group[:-1]).flatten() + 1).tolist()
    bounds = [0, *edges, cost.numel()]
    return list(zip(bounds[:-1], bounds[1:]))


def _segment_starts(box: Tensor, n_boxes: int) -> Tensor:
    """(n_boxes + 1,) int64 on the device of `box`: where each box's run starts in `box` ((E,) int64, sorted)."""
    counts = torch.bincount(box, minlength=n_boxes)
    return torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])


def _compact_rank(present: Tensor) -> tuple[Tensor, int]:
    """For a (Kc,) bool mask, each row's index among the rows that are present ((Kc,) int64; meaningless for the
    others), and how many are present."""
    return torch.cumsum(present, 0) - 1, int(present.sum())


def _corridor(b64: Tensor, silhouette: Tensor, max_shift: float, cfg: LidarVelocityConfig) -> tuple[Tensor, Tensor]:
    """Each box's corridor: how far along its axis from its centre its points are taken (half its length plus
    `pad_m`, and for a silhouette `max_shift` more, so that any trial speed's window is filled) and how far
    across beyond its half width. b64: (K, 7) float64 boxes; silhouette: (K,) bool. Returns (K,) float64 m each."""
    select_extent = b64[:, 4] / 2 + cfg.pad_m + silhouette.double() * max_shift
    margin = torch.where(silhouette, b64.new_tensor(cfg.silhouette_across_margin_m),
                         b64.new_tensor(cfg.across_margin_m))
    return select_extent, margin


def _box_frame(box: Tensor, x: Tensor, y: Tensor, b32: Tensor, c: Tensor, s: Tensor) -> tuple[Tensor, Tensor]:
    """The pairs' points along and across their box's axis, relative to its centre: (E,) float32 m each.
    box: (E,) int64; x, y: (E,) float32 m (LIDAR_TOP); b32: (K, 7) float32 boxes; c, s: (K,) float32 cos and sin
    of the axis' yaw."""
    dx, dy = x - _take(b32[:, 0].contiguous(), box), y - _take(b32[:, 1].contiguous(), box)
    return dx * _take(c, box) + dy * _take(s, box), -dx * _take(s, box) + dy * _take(c, box)


class _PointIndex:
    """The points the boxes draw on, sorted by x column (`_COLUMN_M` wide) and by y row within a column (`_ROW_M`),
    so that the points in a rectangle are found by one binary search per column it crosses.

    points: (N, 5) float32 (LIDAR_TOP); b64: (K, 7) float64 boxes; reach: (K,) float64 m, how far along x from its
    centre a box draws points: its x-window is [x - reach, x + reach) (bounds rounded to float32), and its height
    window (z - h / 2 + `ground_clearance_m`, z + h / 2 + `top_margin_m`) (open; float32). keyframe_only: index only
    the points with dt 0. Points outside every box's height window are left out.

    Attributes: x, y, z, dt (M,) float32 of the indexed points (m, s); sweep (M,) int64, each point's index into
    sweep_times (S,) float32, the sorted distinct dt."""

    def __init__(self, points: Tensor, b64: Tensor, reach: Tensor, cfg: LidarVelocityConfig,
                 keyframe_only: bool = False):
        x, z, h = b64[:, 0], b64[:, 2], b64[:, 5]
        self.b64 = b64
        self.x_lo, self.x_hi = (x - reach).float(), (x + reach).float()
        self.z_lo, self.z_hi = (z - h / 2 + cfg.ground_clearance_m).float(), (z + h / 2 + cfg.top_margin_m).float()
        keep = (points[:, 2] > self.z_lo.min()) & (points[:, 2] < self.z_hi.max())
        if keyframe_only:
            keep &= points[:, 4] == 0
        points = _take(points, torch.nonzero(keep).flatten())
        self.x0 = self.y0 = 0.0
        self.n_columns = self.n_rows = 1
        if points.shape[0]:
            px, py = points[:, 0].double(), points[:, 1].double()
            self.x0, self.y0 = float(px.min()), float(py.min())
            self.n_columns = int(torch.floor((px.max() - self.x0) / _COLUMN_M)) + 1
            self.n_rows = int(torch.floor((py.max() - self.y0) / _ROW_M)) + 1
            key = (torch.floor((px - self.x0) / _COLUMN_M).long() * self.n_rows
                   + torch.floor((py - self.y0) / _ROW_M).long())
        else:
            key = torch.zeros(0, dtype=torch.long, device=points.device)
        self.key, order = torch.sort(key)
        points = _take(points, order)
        self.x, self.y, self.z, self.dt = (points[:, j].contiguous() for j in (0, 1, 2, 4))
        self.sweep_times, self.sweep = torch.unique(self.dt, return_inverse=True)

    def pairs(self, select: Tensor, yaw: Tensor, offset: Tensor, half_along: Tensor,
              half_across: Tensor) -> tuple[Tensor, Tensor]:
        """The (box, point) pairs of the boxes `select` ((K,) bool) whose point lies inside the box's x-window and
        height window and in a rectangle about the box: yaw (K,) float64 rad, centred `offset` (K,) float64 m
        along that axis from the box centre, `half_along` and `half_across` (K,) float64 m. Points near the
        rectangle may come too (within `_SLACK_M`, or in a column it crosses, in the rows of the y range it spans
        there): a caller tests its own bounds.

        Returns box (E,) int64, sorted, and the pairs' point indices (E,) int64 into this index."""
        dev = self.key.device
        ks = torch.nonzero(select).flatten()
        c, s = torch.cos(_take(yaw, ks)), torch.sin(_take(yaw, ks))
        cx, cy = self.b64[ks, 0] + _take(offset, ks) * c, self.b64[ks, 1] + _take(offset, ks) * s
        a, b = _take(half_along, ks) + _SLACK_M, _take(half_across, ks) + _SLACK_M
        corner_x = cx[:, None] + torch.stack([a * c - b * s, a * c + b * s, -a * c + b * s, -a * c - b * s], 1)
        corner_y = cy[:, None] + torch.stack([a * s + b * c, a * s - b * c, -a * s - b * c, -a * s + b * c], 1)
        first = torch.floor((corner_x.amin(1) - self.x0) / _COLUMN_M).clamp(0, self.n_columns - 1).long()
        n_cols = torch.floor((corner_x.amax(1) - self.x0) / _COLUMN_M).clamp(0, self.n_columns - 1).long() - first + 1
        owner = torch.repeat_interleave(torch.arange(ks.numel(), device=dev), n_cols)  # one range per (box, column)
        column = (_take(first, owner) + torch.arange(owner.numel(), device=dev)
                  - _take(torch.cumsum(n_cols, 0) - n_cols, owner))
        x_a = self.x0 + column.double() * _COLUMN_M - _SLACK_M
        y_lo, y_hi = _strip_y_range(_take(corner_x, owner), _take(corner_y, owner), x_a, x_a + _COLUMN_M + 2 * _SLACK_M)
        base = column * self.n_rows
        row_lo = torch.floor((y_lo - self.y0) / _ROW_M).clamp(0, self.n_rows).long()
        row_hi = torch.floor((y_hi - self.y0) / _ROW_M).clamp(-1, self.n_rows - 1).long()
        lo = torch.searchsorted(self.key, base + row_lo)
        hi = torch.searchsorted(self.key, base + row_hi, right=True)
        counts = (hi - lo).clamp_min(0)
        range_box = _take(ks, owner)
        boxes_out, points_out = [], []
        for j0, j1 in _chunks(counts, _MAX_CANDIDATES):
            n_range = counts[j0:j1]
            n = int(n_range.sum())
            if n == 0:
                continue
            which = torch.repeat_interleave(torch.arange(j0, j1, device=dev), n_range, output_size=n)
            i = _take(lo, which) + torch.arange(n, device=dev) - _take(torch.cumsum(n_range, 0) - n_range, which - j0)
            box = _take(range_box, which)
            x, z = _take(self.x, i), _take(self.z, i)
            keep = torch.nonzero((x >= _take(self.x_lo, box)) & (x < _take(self.x_hi, box))
                                 & (z > _take(self.z_lo, box)) & (z < _take(self.z_hi, box))).flatten()
            boxes_out.append(_take(box, keep))
            points_out.append(_take(i, keep))
        if not boxes_out:
            return torch.zeros(0, dtype=torch.long, device=dev), torch.zeros(0, dtype=torch.long, device=dev)
        return torch.cat(boxes_out), torch.cat(points_out)


def _strip_y_range(corner_x: Tensor, corner_y: Tensor, x_a: Tensor, x_b: Tensor) -> tuple[Tensor, Tensor]:
    """The y range of a convex quadrilateral within the strip x_a <= x <= x_b: over its corners inside the strip
    and the points where its edges cross the strip's sides, widened by `_SLACK_M`. corner_x, corner_y: (R, 4)
    float64 m, the corners in order around it; x_a, x_b: (R,) float64 m. Returns y_lo, y_hi (R,) float64 (y_lo >
    y_hi: the strip misses it)."""
    next_x, next_y = corner_x.roll(-1, 1), corner_y.roll(-1, 1)
    xs, ys = [corner_x], [corner_y]
    for side in (x_a, x_b):
        t = (side[:, None] - corner_x) / (next_x - corner_x)  # where each edge crosses the side (inf, nan: never)
        xs.append(torch.where((t >= 0) & (t <= 1), side[:, None].expand_as(t), math.nan))
        ys.append(corner_y + t.clamp(0, 1) * (next_y - corner_y))
    x, y = torch.cat(xs, 1), torch.cat(ys, 1)
    inside = (x >= x_a[:, None]) & (x <= x_b[:, None])
    return (torch.where(inside, y, math.inf).amin(1) - _SLACK_M, torch.where(inside, y, -math.inf).amax(1) + _SLACK_M)


def _fit_axes(box: Tensor, dx: Tensor, dy: Tensor, b64: Tensor, fit: Tensor, cfg: LidarVelocityConfig) -> Tensor:
    """Each box's axis refitted to its keyframe points: the orientation within pi/4 of its yaw whose bounding
    rectangle the points hug most closely (L-shape fitting with the closeness criterion of Zhang et al.,
    "Efficient L-Shape Fitting for Vehicle Detection Using Laser Scanners", IV 2017), from the points within
    `axis_fit_margin_m` of the box. A rectangle has four such orientations a quarter turn apart; the one nearest the
    yaw keeps the box's length axis, and a face seen alone (a rear face, a side) gives the axis as well as a corner
    does. Ties (closeness within 1e-9 of the best) go to the smallest turn.

    box: (E,) int64 sorted; dx, dy: (E,) float32 m, the pairs' keyframe points relative to their box centre
    (LIDAR_TOP axes); b64: (K, 7) float64 boxes; fit: (K,) bool, the boxes to refit (the others, and boxes with
    fewer than `axis_fit_min_points` keyframe points near them, keep their yaw). Returns the yaw (K,) float64 rad."""
    K = b64.shape[0]
    yaw = b64[:, 6]
    w, l = b64[:, 3], b64[:, 4]
    c0, s0 = torch.cos(yaw).float(), torch.sin(yaw).float()
    along, across = dx * _take(c0, box) + dy * _take(s0, box), -dx * _take(s0, box) + dy * _take(c0, box)
    near = (_take(fit, box) & (along.abs() < _take((l / 2 + cfg.axis_fit_margin_m).float(), box))
            & (across.abs() < _take((w / 2 + cfg.axis_fit_margin_m).float(), box)))
    use = fit & (torch.bincount(box[near], minlength=K) >= cfg.axis_fit_min_points)
    i = torch.nonzero(near & _take(use, box)).flatten()
    if i.numel() == 0:
        return yaw
    fb, fx, fy = _take(box, i), _take(dx, i).double()[:, None], _take(dy, i).double()[:, None]
    offsets = torch.linspace(-math.pi / 4, math.pi / 4, cfg.axis_fit_steps, dtype=torch.float64).to(yaw.device)
    T = offsets.numel()
    theta = yaw[:, None] + offsets[None, :]  # (K, T)
    cos_t, sin_t = torch.cos(theta), torch.sin(theta)
    starts = _segment_starts(fb, K)
    pick = torch.zeros(K, dtype=torch.long, device=yaw.device)
    for k0, k1 in _chunks((starts[1:] - starts[:-1]) * T, _chunk_elements(yaw.device) // 4):  # float64, 4 at once
        i0, i1 = int(starts[k0]), int(starts[k1])
        if i0 == i1:
            continue
        local = fb[i0:i1] - k0
        x, y, ct, st = fx[i0:i1], fy[i0:i1], _take(cos_t, fb[i0:i1]), _take(sin_t, fb[i0:i1])  # (M, 1), (M, T)
        index = local[:, None].expand(-1, T)
        d = None
        for e in (x * ct + y * st, -x * st + y * ct):  # (M, T): along and across each trial axis
            hi = e.new_full((k1 - k0, T), -math.inf).scatter_reduce_(0, index, e, "amax")
            lo = e.new_full((k1 - k0, T), math.inf).scatter_reduce_(0, index, e, "amin")
            gap = torch.minimum(_take(hi, local) - e, e - _take(lo, local))
            d = gap if d is None else torch.minimum(d, gap)
        closeness = torch.zeros(k1 - k0, T, dtype=torch.float64, device=d.device).index_add_(
            0, local, 1.0 / d.clamp_min(0.01))
        best = closeness >= closeness.amax(1, keepdim=True) * (1 - 1e-9)
        pick[k0:k1] = torch.where(best, offsets.abs()[None, :], math.inf).argmin(1)
    return torch.where(use, yaw + offsets[pick], yaw)


def _merge(box: Tensor, along: Tensor, sweep: Tensor, n_sweeps: int,
           cell_m: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Each box's points of each sweep merged into cells of `cell_m` along its axis, counted from the box's lowest
    point (one point per occupied cell, at its centre).

    box: (M,) int64; along: (M,) float32 m; sweep: (M,) int64 sweep indices in [0, n_sweeps).
    Returns the occupied cells' box (P,) int64, along (P,) float32 m, sweep (P,) int64 and point counts (P,)
    float64, sorted by box, sweep, along."""
    if along.numel() == 0:
        return box, along, sweep, torch.zeros(0, dtype=torch.float64, device=along.device)
    K = int(box.max()) + 1
    lo = torch.full((K,), math.inf, dtype=along.dtype, device=along.device).scatter_reduce_(0, box, along, "amin")
    cell = torch.floor((along - _take(lo, box)) / cell_m).long()  # >= 0
    n_cells = torch.zeros(K, dtype=torch.long, device=along.device).scatter_reduce_(0, box, cell, "amax") + 1
    size = n_cells * n_sweeps  # each box's (sweep, cell) slots
    end = torch.cumsum(size, 0)
    start = end - size
    counts = torch.bincount(_take(start, box) + sweep * _take(n_cells, box) + cell, minlength=int(end[-1]))
    key = torch.nonzero(counts).flatten()
    cell_box = torch.searchsorted(end, key, right=True)
    rest = key - _take(start, cell_box)
    cells = _take(n_cells, cell_box)
    return (cell_box, _take(lo, cell_box) + ((rest % cells).float() + 0.5) * cell_m, rest // cells,
            _take(counts, key).double())


def _search_speeds(box: Tensor, along: Tensor, across: Tensor, sweep: Tensor, sweep_times: Tensor, b64: Tensor,
                   silhouette: Tensor, forward: Tensor, max_shift: float,
                   cfg: LidarVelocityConfig) -> tuple[Tensor, Tensor]:
    """The speed along each box's axis whose motion un-smears its corridor's points best, and which boxes can be
    measured.

    box: (E,) int64 sorted; along, across: (E,) float32 m, the pairs' points in their box's frame; sweep: (E,)
    int64 index into sweep_times (S,) float32 s; b64: (K, 7) float64 boxes; silhouette, forward: (K,) bool
    (`cfg.silhouette_classes`, `cfg.forward_classes`); max_shift: the furthest a trial speed moves a point of the
    sample (m).

    The corridor holds a box's points within its width plus `across_margin_m` (`silhouette_across_margin_m`) and
    within `pad_m` beyond each end (for a silhouette, further by max_shift). Each sweep's corridor points are
    merged into cells (`_merge`) and moved by speed x dt for every trial speed; the score of a speed is the sum of
    squared bin counts of their histogram along the axis (or the silhouette contrast, `_silhouette_contrast`),
    normalised by the box's best, less 1e-6 per m/s so that ties go to the slowest.

    Returns speed (K,) float32 m/s (signed, along the axis; 0 where not valid) and valid (K,) bool."""
    dev = along.device
    K = b64.shape[0]
    w, l = b64[:, 3], b64[:, 4]
    n_speeds = int(round(2 * cfg.max_speed / cfg.speed_step)) + 1
    speeds = torch.linspace(-cfg.max_speed, cfg.max_speed, n_speeds)
    tie_break = (speeds.abs() * 1e-6).to(dev)
    speeds = speeds.to(dev)
    half_extent = l / 2 + cfg.pad_m
    select_extent, margin = _corridor(b64, silhouette, max_shift, cfg)
    i = torch.nonzero((across.abs() < _take((w / 2 + margin).float(), box))
                      & (along.abs() < _take(select_extent.float(), box))).flatten()
    box, along, sweep = _take(box, i), _take(along, i), _take(sweep, i)
    distance = along.abs()
    S = max(sweep_times.numel(), 1)
    key_points = (_take(sweep_times, sweep) == 0) & (distance < _take((l / 2 + cfg.keyframe_margin_m).float(), box))
    enough = torch.bincount(box, weights=key_points.double(), minlength=K) >= cfg.min_keyframe_points
    in_half = distance < _take(half_extent.float(), box)
    seen = torch.bincount(box * S + sweep, weights=in_half.double(), minlength=K * S).view(K, S) > 0
    valid = enough & (seen.sum(1) >= cfg.min_sweeps)

    # The boxes that are not valid hold few points: merged with the others, and left out below.
    cell_box, cell_along, cell_sweep, count = _merge(box, along, sweep, S, cfg.merge_m)
    cell_dt = _take(sweep_times, cell_sweep)
    n_bins = (torch.floor(2 * half_extent / cfg.bin_m) + 1).long()  # (K,)
    half_extent32 = half_extent.float()
    dilate = round(cfg.silhouette_dilate_m / cfg.bin_m)
    starts = _segment_starts(cell_box, K)
    n_cells = starts[1:] - starts[:-1]
    score = torch.zeros(K, n_speeds, dtype=torch.float32, device=dev)
    for kind in (False, True):  # counted, then silhouette boxes
        of_kind = valid & (silhouette == kind) & (n_cells > 0)
        cost = n_speeds * (n_cells + (S if kind else 1) * n_bins) * of_kind
        for k0, k1 in _chunks(cost, _chunk_elements(dev)):
            present = of_kind[k0:k1]
            rank, n = _compact_rank(present)
            if n == 0:
                continue
            j = torch.nonzero(_take(of_kind, cell_box[starts[k0]:starts[k1]])).flatten() + starts[k0]
            b = _take(cell_box, j)
            nb = _take(n_bins, b)[None, :]
            bins = speeds[:, None] * _take(cell_dt, j)[None, :]  # (V, P): the cells at keyframe time per trial speed
            bins += _take(cell_along, j)[None, :]
            bins += _take(half_extent32, b)[None, :]
            bins /= cfg.bin_m
            bins.floor_()
            inside = (bins >= 0) & (bins < nb)
            bins = bins.long().clamp_(min=0)
            bins = torch.minimum(bins, nb - 1)
            n_max = int(n_bins[k0:k1][present].max())
            if kind:
                slot = (_take(rank, b - k0) * S + _take(cell_sweep, j)) * n_max
                bins += slot[None, :]
                sharpness = _silhouette_contrast(bins.masked_fill_(inside.logical_not_(), n * S * n_max), n, S, n_max,
                                                 n_bins[k0:k1][present], dilate)
            else:
                bins += (_take(rank, b - k0) * n_max)[None, :]
                hist = torch.zeros(n_speeds, n * n_max + 1, dtype=torch.float64, device=dev).scatter_add_(
                    1, bins.masked_fill_(inside.logical_not_(), n * n_max),
                    _take(count, j)[None, :].expand(n_speeds, -1))
                sharpness = (hist[:, :-1].view(n_speeds, n, n_max) ** 2).sum(2).float().T
            score[k0:k1][present] = sharpness
    score = score / score.amax(1, keepdim=True).clamp_min(1e-12) - tie_break
    if cfg.max_reverse_speed is not None:
        score = torch.where(forward[:, None] & (speeds < -cfg.max_reverse_speed)[None, :], score - 2.0, score)
    speed = torch.where(valid, speeds[torch.argmax(score, 1)], 0.0)
    return speed, valid


def _silhouette_contrast(slot: Tensor, n_boxes: int, n_sweeps: int, n_max: int, n_bins: Tensor,
                         dilate: int) -> Tensor:
    """Per box and trial speed, the mean over covered (bin, sweep) pairs of how many sweeps' dilated silhouettes
    cover that bin (sum of squared coverage over its sum): largest when every sweep's body ends line up.

    slot: (V, P) int64, per trial speed the occupied (box, sweep, bin) of each merged cell in a (n_boxes,
    n_sweeps, n_max) layout, or n_boxes * n_sweeps * n_max for none; n_bins: (n_boxes,) int64, each box's number
    of bins (<= n_max; the padding beyond is dropped after the dilation by `dilate` bins each way).
    Returns (n_boxes, V) float32."""
    V = slot.shape[0]
    occupied = torch.zeros(V, n_boxes * n_sweeps * n_max + 1, dtype=torch.float32, device=slot.device)
    occupied.scatter_(1, slot, 1.0)
    occupied = F.max_pool1d(occupied[:, :-1].reshape(-1, 1, n_max), 2 * dilate + 1, 1, dilate)
    occupied = occupied.view(V, n_boxes, n_sweeps, n_max)
    occupied *= (torch.arange(n_max, device=slot.device) < n_bins[:, None])[None, :, None, :]
    covered = occupied.sum(2)  # (V, boxes, bins)
    return ((covered ** 2).sum(2) / covered.sum(2).clamp_min(1)).T


def _direction_offsets(box: Tensor, along: Tensor, across: Tensor, dt: Tensor, b64: Tensor, speed: Tensor,
                       search: Tensor, cfg: LidarVelocityConfig) -> Tensor:
    """The angle (rad, within `max_turn_rad`, over `turn_steps` trial turns) to add to each box's axis so that its
    points, moved by its speed for their dt in that direction, form the sharpest 2D histogram in the box frame
    (within 0.5 m of the box; sum of squared bin counts); ties go to the smallest turn.

    box: (E,) int64 sorted; along, across: (E,) float32 m, the pairs' points in their (refitted) box frame; dt:
    (E,) float32 s; b64: (K, 7) float64 boxes; speed: (K,) float32 m/s; search: (K,) bool, the boxes to search
    (the others get 0). Returns (K,) float32 rad."""
    dev = along.device
    K = b64.shape[0]
    turns = torch.linspace(-cfg.max_turn_rad, cfg.max_turn_rad, cfg.turn_steps)
    cos_turn, sin_turn, turns = torch.cos(turns).to(dev), torch.sin(turns).to(dev), turns.to(dev)
    T = turns.numel()
    w, l = b64[:, 3], b64[:, 4]
    half_l, half_w = l / 2 + 0.5, w / 2 + 0.5
    half_l32, half_w32 = half_l.float(), half_w.float()
    # Only a point that some turn moves into the box counts: it lies shift = speed x dt behind the box, give or
    # take shift x (1 - cos max_turn) along and shift x sin max_turn across.
    turned = min(cfg.max_turn_rad, math.pi)
    shift = _take(speed, box) * dt
    along_slack, across_slack = 1 - math.cos(turned), math.sin(min(turned, math.pi / 2))
    i = torch.nonzero(_take(search, box)
                      & ((along + shift).abs() < _take(half_l32, box) + shift.abs() * along_slack + _SLACK_M)
                      & (across.abs() < _take(half_w32, box) + shift.abs() * across_slack + _SLACK_M)).flatten()
    box, along, across, shift = _take(box, i), _take(along, i), _take(across, i), _take(shift, i)
    n_along = (torch.floor(2 * half_l / cfg.bin_m) + 1).long()
    n_cells = (torch.floor(2 * half_w / cfg.bin_m) + 1).long() * n_along
    starts = _segment_starts(box, K)
    turn = torch.zeros(K, dtype=torch.float32, device=dev)
    points = starts[1:] - starts[:-1]
    cost = T * (points + n_cells) * (points > 0)
    for k0, k1 in _chunks(cost, _chunk_elements(dev)):
        i0, i1 = int(starts[k0]), int(starts[k1])
        if i0 == i1:
            continue
        present = points[k0:k1] > 0
        rank, n = _compact_rank(present)
        b = box[i0:i1]
        hl, hw = _take(half_l32, b)[None, :], _take(half_w32, b)[None, :]
        al = shift[None, i0:i1] * cos_turn[:, None]  # (T, M) in the box frame
        al += along[None, i0:i1]
        ac = shift[None, i0:i1] * sin_turn[:, None]
        ac += across[None, i0:i1]
        keep = (al.abs() < hl) & (ac.abs() < hw)
        al += hl
        al /= cfg.bin_m
        ac += hw
        ac /= cfg.bin_m
        n_max = int(n_cells[k0:k1][present].max())
        small = torch.int32 if T * (n * n_max + 1) < 2 ** 31 else torch.int64  # int32: cheaper on the CPU
        cells = ac.floor_().to(small)  # the points are near the box: their bins are small
        cells *= _take(n_along, b).to(small)[None, :]
        cells += al.floor_().to(small)
        cells = torch.minimum(cells.clamp_(min=0), (_take(n_cells, b) - 1).to(small)[None, :])
        cells += (_take(rank, b - k0) * n_max).to(small)[None, :]
        cells.masked_fill_(keep.logical_not_(), n * n_max)
        cells += (torch.arange(T, device=dev) * (n * n_max + 1)).to(small)[:, None]
        hist = torch.bincount(cells.view(-1), minlength=T * (n * n_max + 1)).view(T, n * n_max + 1)[:, :-1]
        score = (hist.double().view(T, n, n_max) ** 2).sum(2).T  # (n, T), integer-valued: ties are exact
        best = score == score.amax(1, keepdim=True)
        pick = torch.where(best, turns.abs()[None, :], math.inf).argmin(1)
        turn[k0:k1][present] = turns[pick]
    return torch.where(search, turn, 0.0)


def refine_velocities(boxes: Tensor, labels: Tensor, points: Tensor, cfg: LidarVelocityConfig) -> Tensor:
    """`boxes` (K, 9) with vx, vy replaced by `lidar_box_velocity` where it is valid and the label is one of
    `cfg.classes` (a new tensor on the boxes' device and dtype; the measurement runs on that device).

    labels: (K,) int class indices; points: (N, 5) float LiDAR sweeps as in `lidar_box_velocity`."""
    velocity, valid = lidar_box_velocity(boxes, points, cfg, labels)
    use = valid & _isin(labels.to(boxes.device), cfg.classes)
    out = boxes.clone()
    out[:, 7:9] = torch.where(use[:, None], velocity.to(boxes.dtype), boxes[:, 7:9])
    return out
