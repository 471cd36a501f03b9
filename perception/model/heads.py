"""Heads on the decoded BEV features, their training targets and the detection decoder.

  - `CenterHead` (CenterPoint): class heatmap, sub-cell offset, z, log size, yaw as (sin, cos), velocity and
    attribute logits, all dense on the BEV grid.
  - `MapHead`: multi-label BEV map segmentation over MAP_CLASSES on its own grid, sampled from the features.
  - `SceneHead`: multi-label scene tags over SCENE_TAGS from average- and max-pooled BEV features.

Decoding (`decode_detections`, post-processing, outside the exportable core): 3x3 max-pool peak picking,
top-k over all classes, score threshold, then per-class *circle* NMS (CenterPoint's nuScenes choice): a box is
suppressed when a higher-scoring box of the same class has its centre within that class's radius in BEV.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from perception.classes import NUSCENES, ClassList
from perception.structures import ATTRIBUTES, DETECTION_CLASSES, MAP_CLASSES, SCENE_TAGS, BEVGrid, wrap_angle

# Circle-NMS radius per class of the nuScenes preset, metres (`perception.classes.NUSCENES` documents where they
# come from). Decoding reads the radii of its class list (`decode_detections(classes=...)`), not this table.
CIRCLE_NMS_RADIUS_M: dict[str, float] = {c.name: c.nms_radius_m for c in NUSCENES.classes}

# Regression target layout: box geometry (L1 weight 1), then velocity (weight `loss.velocity`, CenterPoint's
# code_weights).
REGRESSION_COLUMNS: tuple[str, ...] = ("dx", "dy", "z", "log_w", "log_l", "log_h", "sin_yaw", "cos_yaw", "vx", "vy")

# The velocity branch predicts in this unit (its output is multiplied by it), so road speeds of 5-15 m/s are
# outputs of order 1 like every other regression column: with Adam a weight moves about lr per step, and a head
# in m/s needed thousands of steps to leave 0 (mAVE stayed at 2-5 m/s after 600 CPU steps).
VELOCITY_UNIT_MPS = 10.0

# Gaussian radius settings for the heatmap (CenterPoint).
GAUSSIAN_MIN_OVERLAP = 0.1
GAUSSIAN_MIN_RADIUS = 2


def _allowed_attributes(classes: ClassList) -> Tensor:
    """(len(classes), len(classes.attributes)) bool: which attributes each class may carry."""
    return torch.tensor(classes.allowed_attributes(), dtype=torch.bool).view(len(classes), len(classes.attributes))


def _branch(cin: int, hidden: int, cout: int, bias_init: float | None = None) -> nn.Sequential:
    final = nn.Conv2d(hidden, cout, 1)
    if bias_init is not None:
        nn.init.constant_(final.bias, bias_init)
    return nn.Sequential(nn.Conv2d(cin, hidden, 3, padding=1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU(inplace=True), final)


class CenterHead(nn.Module):
    """CenterPoint head on the BEV grid. Output channels per key: see `CenterHead.channels`.

    All outputs are (B, C_key, H, W) float on the BEV grid (row along +y, column along +x), raw (no
    activation): heatmap logits, offset (dx, dy) in cells from the cell's corner, z (m, box centre), log of
    (w, l, h) in m, (sin yaw, cos yaw), (vx, vy) m/s (the branch's output times `VELOCITY_UNIT_MPS`), attribute
    logits.
    """

    def __init__(self, *, in_channels: int, hidden: int, num_classes: int = len(DETECTION_CLASSES),
                 num_attributes: int = len(ATTRIBUTES)):
        super().__init__()
        self.channels = {"heatmap": num_classes, "offset": 2, "z": 1, "log_size": 3, "rot": 2, "velocity": 2,
                         "attribute": num_attributes}
        self.shared = nn.Sequential(nn.Conv2d(in_channels, hidden, 3, padding=1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU(inplace=True))
        prior = -math.log((1 - 0.1) / 0.1)  # sigmoid = 0.1 at init (-2.19), as CenterNet
        self.branches = nn.ModuleDict({
            key: _branch(hidden, hidden, c, prior if key == "heatmap" else None) for key, c in self.channels.items()
        })

    def forward(self, bev: Tensor) -> dict[str, Tensor]:
        x = self.shared(bev)
        out = {key: branch(x) for key, branch in self.branches.items()}
        out["velocity"] = out["velocity"] * VELOCITY_UNIT_MPS
        return out


class MapHead(nn.Module):
    """Multi-label map segmentation on `map_grid`, sampled (bilinear) from features on `feature_grid`.

    When the two grids are the same the sampling is skipped. Output: (B, len(MAP_CLASSES), H_map, W_map) logits.
    """

    def __init__(self, *, in_channels: int, hidden: int, feature_grid: BEVGrid, map_grid: BEVGrid,
                 num_classes: int = len(MAP_CLASSES)):
        super().__init__()
        self.map_grid = map_grid
        self.resample = feature_grid != map_grid
        self.register_buffer("sample_grid", torch.from_numpy(feature_grid.sampling_grid(map_grid))[None], persistent=False)
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, hidden, 3, padding=1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, padding=1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU(inplace=True),
            nn.Conv2d(hidden, num_classes, 1),
        )

    def forward(self, bev: Tensor) -> Tensor:
        if self.resample:
            grid = self.sample_grid.expand(bev.shape[0], -1, -1, -1)
            bev = F.grid_sample(bev, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        return self.net(bev)


class SceneHead(nn.Module):
    """Scene tags from pooled BEV features: (B, C, H, W) -> (B, len(SCENE_TAGS)) logits."""

    def __init__(self, *, in_channels: int, hidden: int, num_tags: int = len(SCENE_TAGS)):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(2 * in_channels, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, num_tags))

    def forward(self, bev: Tensor) -> Tensor:
        pooled = torch.cat([bev.mean(dim=(2, 3)), bev.amax(dim=(2, 3))], 1)
        return self.mlp(pooled)


class BEVHeads(nn.Module):
    """All heads. `forward` returns the CenterHead keys plus ``map`` (B, 6, H_map, W_map) and ``scene`` (B, 6)."""

    def __init__(self, *, detection: CenterHead, map_segmentation: MapHead, scene: SceneHead):
        super().__init__()
        self.detection = detection
        self.map_segmentation = map_segmentation
        self.scene = scene

    def forward(self, bev: Tensor, map_extra: Tensor | None = None) -> dict[str, Tensor]:
        """bev: (B, C, H, W) decoded BEV features; map_extra: (B, C_x, H, W) more features on the same grid for
        the map head only (concatenated after `bev`; the map head was built for C + C_x channels), or None."""
        out = self.detection(bev)
        out["map"] = self.map_segmentation(bev if map_extra is None else torch.cat([bev, map_extra], 1))
        out["scene"] = self.scene(bev)
        return out


# ----------------------------------------------------------------------------------------------- targets


def gaussian_radius(length: float, width: float, min_overlap: float = GAUSSIAN_MIN_OVERLAP) -> float:
    """CornerNet/CenterPoint radius (in the units of `length`, `width`) keeping IoU >= min_overlap."""
    b1 = length + width
    c1 = width * length * (1 - min_overlap) / (1 + min_overlap)
    r1 = (b1 + math.sqrt(b1**2 - 4 * c1)) / 2
    b2 = 2 * (length + width)
    c2 = (1 - min_overlap) * width * length
    r2 = (b2 + math.sqrt(b2**2 - 16 * c2)) / 2
    a3 = 4 * min_overlap
    b3 = -2 * min_overlap * (length + width)
    c3 = (min_overlap - 1) * width * length
    r3 = (b3 + math.sqrt(b3**2 - 4 * a3 * c3)) / 2
    return min(r1, r2, r3)


@dataclass
class DetectionTargets:
    """CenterPoint targets for a batch (K = boxes whose centre lies on the grid).

    Attributes:
        heatmap: (B, num_classes, H, W) float32 in [0, 1], 1 exactly at box centres.
        batch_index: (K,) int64, sample of each box.
        cell_index: (K,) int64, flat ``row * W + col`` of each box's centre cell.
        regression: (K, 10) float32 in `REGRESSION_COLUMNS` order.
        attributes: (K,) int64 index into ATTRIBUTES, -1 to ignore.
    """

    heatmap: Tensor
    batch_index: Tensor
    cell_index: Tensor
    regression: Tensor
    attributes: Tensor


@torch.no_grad()
def build_detection_targets(boxes_lidar: Tensor, labels: Tensor, attributes: Tensor, num_boxes: Tensor, grid: BEVGrid,
                            num_classes: int = len(DETECTION_CLASSES)) -> DetectionTargets:
    """Targets from concatenated boxes (sum K_b, 9) in `Boxes3D` layout (LIDAR_TOP), labels, attributes, counts.

    A box is a target when its centre lies on the grid in x and y (x in [x_min, x_max), y in [y_min, y_max)),
    however far from the ego it is (the evaluation's per-class range is not applied: an object at 45 m is trained
    as an object, not as background) and whatever its centre's z (z is regressed, not binned: the centre of a box
    on a ramp or a tall vehicle may leave [z_min, z_max) and it is still an object in that cell).
    """
    device = boxes_lidar.device
    b = int(num_boxes.shape[0])
    h, w = grid.shape
    heatmap = torch.zeros(b, num_classes, h, w, device=device)
    batch_index = torch.repeat_interleave(torch.arange(b, device=device), num_boxes.to(device))
    col_f = (boxes_lidar[:, 0] - grid.x_min) / grid.cell
    row_f = (boxes_lidar[:, 1] - grid.y_min) / grid.cell
    # Clamped: a centre a hair below x_max can round up to column w in float32.
    col, row = torch.floor(col_f).long().clamp(0, w - 1), torch.floor(row_f).long().clamp(0, h - 1)
    on_grid = grid.contains_xy(boxes_lidar[:, 0], boxes_lidar[:, 1])

    boxes_np = boxes_lidar.detach().cpu().numpy()
    for k in torch.nonzero(on_grid).flatten().tolist():
        width_cells, length_cells = boxes_np[k, 3] / grid.cell, boxes_np[k, 4] / grid.cell
        radius = max(GAUSSIAN_MIN_RADIUS, int(gaussian_radius(length_cells, width_cells)))
        sigma = (2 * radius + 1) / 6
        ci, ri = int(col[k]), int(row[k])
        x0, x1 = max(0, ci - radius), min(w, ci + radius + 1)
        y0, y1 = max(0, ri - radius), min(h, ri + radius + 1)
        ys = torch.arange(y0, y1, device=device, dtype=torch.float32)[:, None] - ri
        xs = torch.arange(x0, x1, device=device, dtype=torch.float32)[None, :] - ci
        gauss = torch.exp(-(xs**2 + ys**2) / (2 * sigma**2))
        region = heatmap[int(batch_index[k]), int(labels[k]), y0:y1, x0:x1]
        torch.maximum(region, gauss, out=region)

    sel = on_grid
    boxes = boxes_lidar[sel]
    regression = torch.stack([
        col_f[sel] - col[sel], row_f[sel] - row[sel], boxes[:, 2],
        boxes[:, 3].clamp(min=1e-3).log(), boxes[:, 4].clamp(min=1e-3).log(), boxes[:, 5].clamp(min=1e-3).log(),
        torch.sin(boxes[:, 6]), torch.cos(boxes[:, 6]), boxes[:, 7], boxes[:, 8],
    ], -1) if boxes.shape[0] else boxes_lidar.new_zeros(0, len(REGRESSION_COLUMNS))
    return DetectionTargets(
        heatmap=heatmap, batch_index=batch_index[sel], cell_index=row[sel] * w + col[sel],
        regression=regression, attributes=attributes[sel].to(device),
    )


def gather_regression(outputs: dict[str, Tensor], batch_index: Tensor, cell_index: Tensor) -> tuple[Tensor, Tensor]:
    """Head outputs at given cells: (K, 10) regression in `REGRESSION_COLUMNS` order and (K, A) attribute logits."""
    reg = torch.cat([outputs["offset"], outputs["z"], outputs["log_size"], outputs["rot"], outputs["velocity"]], 1)
    reg = reg.flatten(2)[batch_index, :, cell_index]
    attr = outputs["attribute"].flatten(2)[batch_index, :, cell_index]
    return reg, attr


# ---------------------------------------------------------------------------------------------- decoding


@dataclass
class Detections:
    """Decoded boxes of one sample: boxes (K, 9) `Boxes3D` layout in LIDAR_TOP, scores (K,) in [0, 1],
    labels (K,) int64 into DETECTION_CLASSES, attributes (K,) int64 into ATTRIBUTES or -1."""

    boxes: Tensor
    scores: Tensor
    labels: Tensor
    attributes: Tensor


def circle_nms(centres_xy: Tensor, scores: Tensor, labels: Tensor, radius_per_class: Tensor) -> Tensor:
    """Greedy per-class circle NMS. centres_xy (K, 2) m, scores (K,), labels (K,), radius_per_class (C,) m.

    Returns: indices (into the inputs) of the kept boxes, by descending score.
    """
    order = torch.argsort(scores, descending=True)
    centres, labels_sorted = centres_xy[order], labels[order]
    dist = torch.cdist(centres, centres)
    same = labels_sorted[:, None] == labels_sorted[None, :]
    close = same & (dist <= radius_per_class[labels_sorted][:, None])
    suppressed = torch.zeros(order.shape[0], dtype=torch.bool, device=scores.device)
    keep: list[int] = []
    close_list = close.cpu()
    for i in range(order.shape[0]):
        if suppressed[i]:
            continue
        keep.append(i)
        suppressed |= close_list[i].to(suppressed.device)
    return order[torch.tensor(keep, dtype=torch.long, device=scores.device)]


@torch.no_grad()
def decode_detections(outputs: dict[str, Tensor], grid: BEVGrid, *, top_k: int, score_threshold: float,
                      max_detections: int, classes: ClassList = NUSCENES) -> list[Detections]:
    """Boxes from the CenterHead outputs of a batch (post-processing). See the module docstring."""
    heat = outputs["heatmap"].sigmoid()  # (B, C, H, W)
    b, num_classes, h, w = heat.shape
    peaks = heat * (F.max_pool2d(heat, 3, stride=1, padding=1) == heat)
    scores, flat = peaks.flatten(1).topk(min(top_k, num_classes * h * w), dim=1)
    labels, cells = flat // (h * w), flat % (h * w)
    if num_classes != len(classes):
        raise ValueError(f"the heatmap has {num_classes} classes but the class list {len(classes)} ({', '.join(classes.names)})")
    allowed = _allowed_attributes(classes).to(heat.device)
    radius = torch.tensor([c.nms_radius_m for c in classes.classes], device=heat.device)
    results = []
    for i in range(b):
        keep = scores[i] >= score_threshold
        s, lab, cell = scores[i][keep], labels[i][keep], cells[i][keep]
        bi = torch.full_like(cell, i)
        reg, attr_logits = gather_regression(outputs, bi, cell)
        col, row = (cell % w).float(), (cell // w).float()
        x = grid.x_min + (col + reg[:, 0]) * grid.cell
        y = grid.y_min + (row + reg[:, 1]) * grid.cell
        size = reg[:, 3:6].clamp(max=8.0).exp()
        yaw = wrap_angle(torch.atan2(reg[:, 6], reg[:, 7]))
        boxes = torch.cat([x[:, None], y[:, None], reg[:, 2:3], size, yaw[:, None], reg[:, 8:10]], 1)
        if allowed.shape[1]:
            attr_logits = attr_logits.masked_fill(~allowed[lab], float("-inf"))
            attributes = torch.where(allowed[lab].any(1), attr_logits.argmax(1), torch.full_like(lab, -1))
        else:  # a class list without attributes
            attributes = torch.full_like(lab, -1)
        kept = circle_nms(boxes[:, :2], s, lab, radius)[:max_detections]
        results.append(Detections(boxes=boxes[kept], scores=s[kept], labels=lab[kept], attributes=attributes[kept]))
    return results
