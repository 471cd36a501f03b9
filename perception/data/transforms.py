"""Image and BEV augmentation, as matrices applied to every quantity that lives in the affected frame.

Image augmentation (per camera): one 3x3 matrix `img_aug` maps original pixel coordinates (u, v, 1) to
augmented ones; it is the composition resize -> crop -> horizontal flip -> rotation about the crop centre.
The image is warped with exactly this matrix (cv2.warpAffine; pixel centres at integer coordinates), and the
intrinsics become `cam2img = img_aug @ K`, so projections through the new intrinsics land where the warp
moved the pixels.

BEV augmentation (per sample): one 4x4 similarity `lidar_aug` maps the keyframe LIDAR_TOP frame to the
augmented LIDAR_TOP frame: p' = lidar_aug @ p, composed rotation about z -> uniform scaling -> flips ->
translation. It is applied to LiDAR and radar points, radar velocities, boxes (centre, size, yaw and velocity),
the camera extrinsics (`cam2lidar' = lidar_aug @ cam2lidar`, which is then a similarity, not a rigid
transform, when scaling or flipping) and the map masks (rendered directly in the augmented frame, see
`map_raster.py`). Because it is a similarity, every point inside a box stays inside it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from perception.errors import ConfigError


@dataclass(frozen=True)
class ImageAugConfig:
    """Per-camera image augmentation. Sizes are (height, width) in pixels; angles in degrees.

    At evaluation the resize is the middle of `resize_lim`, the crop is horizontally centred with the bottom
    fraction the middle of `bot_pct_lim`, and there is no flip or rotation.

    `fit_width`: `resize_lim` is relative to the scale that fits each camera's own width to the final width
    (``final_hw[1] / W0`` of that camera), so a rig of mixed image sizes gives every camera the same field of
    view in the model's input; else it is the absolute scale.
    """

    final_hw: tuple[int, int] = (256, 704)
    resize_lim: tuple[float, float] = (0.38, 0.55)
    bot_pct_lim: tuple[float, float] = (0.0, 0.0)
    rot_lim_deg: tuple[float, float] = (-5.4, 5.4)
    flip: bool = True
    fit_width: bool = False

    def __post_init__(self) -> None:
        if min(self.final_hw) < 1:
            raise ConfigError(f"ImageAugConfig.final_hw must be positive, got {self.final_hw}")
        if not 0 < self.resize_lim[0] <= self.resize_lim[1]:
            raise ConfigError(f"ImageAugConfig.resize_lim must be 0 < lo <= hi, got {self.resize_lim}")


@dataclass(frozen=True)
class BEVAugConfig:
    """Per-sample BEV augmentation: rotation (degrees, uniform), scale (uniform), flips (probabilities) and
    translation (normal, metres, std per axis)."""

    rot_lim_deg: tuple[float, float] = (-22.5, 22.5)
    scale_lim: tuple[float, float] = (0.9, 1.1)
    flip_x_prob: float = 0.5
    flip_y_prob: float = 0.5
    trans_std: tuple[float, float, float] = (0.0, 0.0, 0.0)

    def __post_init__(self) -> None:
        if not 0 < self.scale_lim[0] <= self.scale_lim[1]:
            raise ConfigError(f"BEVAugConfig.scale_lim must be 0 < lo <= hi, got {self.scale_lim}")


# ---------------------------------------------------------------------------------------------- image

def image_aug_matrix(
    resize: float,
    crop_xy: tuple[float, float],
    final_hw: tuple[int, int],
    flip: bool,
    rot_deg: float,
) -> np.ndarray:
    """(3, 3) float64 original pixels -> augmented pixels: resize, crop at `crop_xy` (top-left in resized
    pixels), horizontal flip, then rotation by `rot_deg` (counter-clockwise on screen) about the crop centre."""
    H, W = final_hw
    M = np.diag([resize, resize, 1.0])
    M = np.array([[1, 0, -crop_xy[0]], [0, 1, -crop_xy[1]], [0, 0, 1.0]]) @ M
    if flip:
        M = np.array([[-1.0, 0, W - 1], [0, 1, 0], [0, 0, 1]]) @ M
    if rot_deg:
        a = math.radians(rot_deg)
        c, s = math.cos(a), math.sin(a)
        cx, cy = (W - 1) / 2, (H - 1) / 2
        # Screen rotation (v points down): counter-clockwise on screen is clockwise in (u, v).
        R = np.array([[c, s, 0], [-s, c, 0], [0, 0, 1.0]])
        M = np.array([[1, 0, cx], [0, 1, cy], [0, 0, 1]]) @ R @ np.array([[1, 0, -cx], [0, 1, -cy], [0, 0, 1]]) @ M
    return M


def sample_image_aug(
    rng: np.random.Generator | None, in_wh: tuple[int, int], cfg: ImageAugConfig
) -> tuple[np.ndarray, float]:
    """Draw one camera's augmentation (rng None: the deterministic evaluation transform).

    Returns: (img_aug (3, 3) float64, resize factor).
    """
    W0, H0 = in_wh
    H, W = cfg.final_hw
    fit = W / W0 if cfg.fit_width else 1.0
    if rng is None:
        resize = fit * float(np.mean(cfg.resize_lim))
        bot = float(np.mean(cfg.bot_pct_lim))
        flip, rot = False, 0.0
    else:
        resize = fit * float(rng.uniform(*cfg.resize_lim))
        bot = float(rng.uniform(*cfg.bot_pct_lim))
        flip = bool(cfg.flip and rng.random() < 0.5)
        rot = float(rng.uniform(*cfg.rot_lim_deg))
    rw, rh = W0 * resize, H0 * resize
    crop_y = (1.0 - bot) * rh - H  # the crop's bottom edge sits at (1 - bot) of the resized height
    if rng is None:
        crop_x = (rw - W) / 2
    else:
        crop_x = float(rng.uniform(0, max(0.0, rw - W)))
    return image_aug_matrix(resize, (int(round(crop_x)), int(round(crop_y))), cfg.final_hw, flip, rot), resize


def warp_image(image: np.ndarray, decoded2out: np.ndarray, final_hw: tuple[int, int]) -> np.ndarray:
    """Warp an (h, w, 3) uint8 image with the (3, 3) matrix `decoded2out` into (H, W, 3) uint8; pixels with no
    source are 0."""
    H, W = final_hw
    return cv2.warpAffine(image, decoded2out[:2].astype(np.float64), (W, H), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=0)


def jpeg_reduction(resize: float) -> int:
    """The largest libjpeg decode reduction (1, 2, 4) that keeps the decoded image at least as large as the
    resized one, so the warp never upsamples."""
    for f in (4, 2):
        if resize <= 1.0 / f:
            return f
    return 1


def reduced_decode_matrix(factor: int) -> np.ndarray:
    """(3, 3) original pixels -> pixels of a libjpeg decode reduced by `factor` (pixel i averages original
    pixels factor*i .. factor*i + factor - 1)."""
    f = float(factor)
    return np.array([[1 / f, 0, -(f - 1) / (2 * f)], [0, 1 / f, -(f - 1) / (2 * f)], [0, 0, 1.0]])


# ---------------------------------------------------------------------------------------------- BEV

def bev_aug_matrix(rot_rad: float, scale: float, flip_x: bool, flip_y: bool, translation) -> np.ndarray:
    """(4, 4) float64 LIDAR_TOP -> augmented LIDAR_TOP: rotate about z, scale, flip (flip_x negates x,
    i.e. mirrors left/right; flip_y negates y), translate."""
    c, s = math.cos(rot_rad), math.sin(rot_rad)
    A = np.eye(4)
    A[:2, :2] = [[c, -s], [s, c]]
    A[:3, :3] *= scale
    F = np.diag([-1.0 if flip_x else 1.0, -1.0 if flip_y else 1.0, 1.0, 1.0])
    A = F @ A
    A[:3, 3] = np.asarray(translation, dtype=np.float64)
    return A


def sample_bev_aug(rng: np.random.Generator, cfg: BEVAugConfig) -> np.ndarray:
    """Draw one sample's (4, 4) float64 `lidar_aug`."""
    rot = math.radians(float(rng.uniform(*cfg.rot_lim_deg)))
    scale = float(rng.uniform(*cfg.scale_lim))
    fx = bool(rng.random() < cfg.flip_x_prob)
    fy = bool(rng.random() < cfg.flip_y_prob)
    t = rng.normal(0.0, 1.0, 3) * np.asarray(cfg.trans_std)
    return bev_aug_matrix(rot, scale, fx, fy, t)


def point_affine(T: np.ndarray, width: int, dtype=np.float32, velocity_col: int | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:
    """(width, width) matrix M and (width,) row b with `points @ M + b` = (N, width) points with the (4, 4)
    transform T applied to columns 0-2, T's linear part to the planar velocity in columns velocity_col,
    velocity_col + 1 (z velocity taken as 0), and every other column kept. One matrix product per point cloud
    (BLAS), instead of a product on a strided 3-column view and separate copies of the other columns."""
    M = np.eye(width, dtype=np.float64)
    M[:3, :3] = T[:3, :3].T
    if velocity_col is not None:
        v = slice(velocity_col, velocity_col + 2)
        M[v, v] = T[:2, :2].T
    b = np.zeros(width)
    b[:3] = T[:3, 3]
    return M.astype(dtype), b.astype(dtype)


def transform_points(points: np.ndarray, T: np.ndarray, out: np.ndarray | None = None,
                     velocity_col: int | None = None) -> np.ndarray:
    """Apply a (4, 4) transform to the first 3 columns of (N, >=3) points (and its linear part to the planar
    velocity at `velocity_col`, see `point_affine`); other columns are kept. `out`: an (N, points' width) array
    (e.g. rows of a larger one) to write into instead of a new array."""
    M, b = point_affine(T, points.shape[1], points.dtype, velocity_col=velocity_col)
    out = np.matmul(points, M, out=out)
    out += b
    return out


def transform_radar(points_radar: np.ndarray, T: np.ndarray) -> np.ndarray:
    """(M, 7) radar points (x, y, z, rcs, vx, vy, dt): positions by T, velocities by T's linear part."""
    return transform_points(points_radar, T, velocity_col=4)


def transform_boxes(boxes: np.ndarray, A: np.ndarray) -> np.ndarray:
    """Boxes (K, 9) in `Boxes3D` layout under a (4, 4) similarity A = [s Q | t] with Q orthogonal (rotation
    about z, possibly with reflections in x/y): centre by A, sizes times s, heading and velocity by A's linear
    part (velocity also scales by s, as in mmdet3d's GlobalRotScaleTrans)."""
    out = boxes.copy()
    L = A[:3, :3]
    scale = float(np.cbrt(abs(np.linalg.det(L))))
    out[:, 0:3] = boxes[:, 0:3] @ L.T + A[:3, 3]
    out[:, 3:6] = boxes[:, 3:6] * scale
    heading = np.stack([np.cos(boxes[:, 6]), np.sin(boxes[:, 6])], 1) @ L[:2, :2].T
    yaw = np.arctan2(heading[:, 1], heading[:, 0])
    out[:, 6] = np.remainder(yaw + math.pi, 2 * math.pi) - math.pi
    out[:, 7:9] = boxes[:, 7:9] @ L[:2, :2].T
    return out.astype(boxes.dtype)
