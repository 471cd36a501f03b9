"""Camera-to-BEV view transforms.

A view transform is three pieces, each used by training, evaluation and every runtime alike:

  - its rig geometry (`RigGeometry`, pre-processing, no weights): the calibration -> the geometry tensors
    the core takes. Plain torch outside the exported core (it may sort or invert matrices); `Preprocessor`
    (`perception.model.preprocess`) builds it from the export manifest
    (`perception.model.build.rig_geometry_from_json`).
  - `lift`: image features -> the per-image tensors that are pooled (the camera stage of the core).
  - `splat`: those tensors and the geometry -> BEV features (the pooling stage).

Two transforms:

  - `LiftSplat` (LSS / BEVDet / BEVDepth): a per-pixel categorical depth distribution over D bins times
    context features, summed into the BEV grid with a pooling plan made from the rig (`LiftSplatGeometry`,
    `fusion.bev_pool.PoolingPlan`): ``Gather`` and ``ReduceSum`` only.
  - `BEVSample` (Simple-BEV): BEV voxel centres projected into every camera with ``lidar2img = cam2img @
    inverse(cam2lidar)`` (`BEVSampleGeometry`) and image features bilinearly sampled there (``GridSample``),
    averaged over the cameras that see the voxel, and the Z layers folded into channels.

A new transform: a module with a `ViewTransform` subclass and its `RigGeometry`, and its entry in
`perception.model.build` (its config in `build_view_transform`, its geometry in `RIG_GEOMETRIES`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fusion.bev_pool import DEFAULT_SEGMENT_SIZE, bev_flat_index, make_pooling_plan, pool_with_plan
from perception.structures import BEVGrid


class RigGeometry(ABC):
    """Pre-processing of a view transform: calibration -> its geometry inputs (no weights, not exported).

    Attributes:
        kind: the name the manifest records (``preprocessing.view_transform.kind``).
        input_names: names of the geometry tensors, in the core's input order.
    """

    kind: ClassVar[str]
    input_names: ClassVar[tuple[str, ...]]

    @abstractmethod
    def __call__(self, cam2img: Tensor, cam2lidar: Tensor, camera_mask: Tensor | None = None) -> tuple[Tensor, ...]:
        """cam2img: (B, N, 3, 3) float32, camera frame -> augmented pixels; cam2lidar: (B, N, 4, 4) float32,
        camera frame -> LIDAR_TOP; camera_mask: (B, N) bool, the cameras present (None: all). Returns the
        `input_names` tensors on the calibration's device. An absent camera's features never reach the BEV: the
        geometry routes none of them into a cell, so the exported core needs no mask input."""

    @abstractmethod
    def to_json(self) -> dict[str, Any]:
        """The manifest's ``preprocessing.view_transform`` (with ``kind``)."""

    @staticmethod
    @abstractmethod
    def from_json(d: dict[str, Any], grid: BEVGrid, image_size: tuple[int, int]) -> "RigGeometry":
        """The geometry `to_json` wrote, on `grid` for images of `image_size` (H, W)."""


class LiftSplatGeometry(RigGeometry):
    """The frustum of a lift-splat transform and its pooling plan (`fusion.bev_pool.PoolingPlan`).

    Args:
        grid: the BEV grid (also bounds z: frustum points outside [z_min, z_max) are dropped).
        image_size: (H, W) of the input images, pixels.
        feature_stride: image pixels per feature cell.
        depth_min, depth_step, num_bins: bin i is centred at ``depth_min + i * depth_step`` metres.
        segment_size: K of the pooling plan.
    """

    kind = "lift_splat"
    input_names = ("pool_segments", "pool_merges", "pool_cells")

    def __init__(self, *, grid: BEVGrid, image_size: tuple[int, int], feature_stride: int, depth_min: float,
                 depth_step: float, num_bins: int, segment_size: int = DEFAULT_SEGMENT_SIZE):
        self.grid = grid
        self.image_size = tuple(image_size)
        self.feature_stride = feature_stride
        self.depth_min, self.depth_step, self.num_bins = float(depth_min), float(depth_step), int(num_bins)
        self.segment_size = segment_size
        h, w = image_size[0] // feature_stride, image_size[1] // feature_stride
        self.depth_bins = self.depth_min + self.depth_step * torch.arange(num_bins, dtype=torch.float32)  # (D,) m
        # Pixel centre of feature cell (i, j), in the OpenCV convention (pixel centres at integers).
        v = torch.arange(h, dtype=torch.float32) * feature_stride + (feature_stride - 1) / 2
        u = torch.arange(w, dtype=torch.float32) * feature_stride + (feature_stride - 1) / 2
        d, vv, uu = torch.meshgrid(self.depth_bins, v, u, indexing="ij")
        self._frustum_img = {torch.device("cpu"): torch.stack([uu * d, vv * d, d], -1)}  # (D, h, w, 3) per device

    def frustum_img(self, device: torch.device) -> Tensor:
        """(D, h, w, 3) float32: homogeneous pixel (u, v, 1) of each feature cell times each bin's depth."""
        if device not in self._frustum_img:
            self._frustum_img[device] = self._frustum_img[torch.device("cpu")].to(device)
        return self._frustum_img[device]

    @torch.no_grad()
    def frustum_bev_index(self, cam2img: Tensor, cam2lidar: Tensor) -> Tensor:
        """Flat BEV index of every frustum point: (B, N*D*h*w) int64 in [0, H*W], in (n, d, h, w) order; H*W
        means dropped (outside the grid or its z range). Computed in float32 under autocast too (a bfloat16
        einsum would move far frustum points by metres)."""
        with torch.autocast(cam2img.device.type, enabled=False):
            return self._frustum_bev_index(cam2img, cam2lidar)

    def _frustum_bev_index(self, cam2img: Tensor, cam2lidar: Tensor) -> Tensor:
        img2cam = torch.linalg.inv(cam2img.float())  # (B, N, 3, 3)
        points_cam = torch.einsum("bnij,dhwj->bndhwi", img2cam, self.frustum_img(cam2img.device))
        rot, trans = cam2lidar[..., :3, :3].float(), cam2lidar[..., :3, 3].float()
        points_lidar = torch.einsum("bnij,bndhwj->bndhwi", rot, points_cam) + trans[:, :, None, None, None, :]
        index = bev_flat_index(points_lidar[..., 0], points_lidar[..., 1], points_lidar[..., 2], self.grid)
        return index.flatten(1)

    def __call__(self, cam2img: Tensor, cam2lidar: Tensor, camera_mask: Tensor | None = None
                 ) -> tuple[Tensor, Tensor, Tensor]:
        """The pooling plan's (segments, merges, cells) for the rig; an absent camera's frustum points are dropped
        (index H*W), as points outside the grid are."""
        index = self.frustum_bev_index(cam2img, cam2lidar)
        if camera_mask is not None:
            b, n = cam2img.shape[:2]
            absent = ~camera_mask.to(device=index.device, dtype=torch.bool).view(b, n, 1)
            index = index.view(b, n, -1).masked_fill(absent, self.grid.height * self.grid.width).flatten(1)
        return make_pooling_plan(index, self.grid, self.segment_size).as_tuple()

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "depth_min": self.depth_min, "depth_step": self.depth_step, "num_bins": self.num_bins,
                "feature_stride": self.feature_stride, "segment_size": self.segment_size}

    @staticmethod
    def from_json(d: dict[str, Any], grid: BEVGrid, image_size: tuple[int, int]) -> "LiftSplatGeometry":
        return LiftSplatGeometry(grid=grid, image_size=image_size, feature_stride=int(d["feature_stride"]),
                                 depth_min=float(d["depth_min"]), depth_step=float(d["depth_step"]),
                                 num_bins=int(d["num_bins"]), segment_size=int(d["segment_size"]))


class BEVSampleGeometry(RigGeometry):
    """lidar2img = cam2img @ inverse(cam2lidar), homogeneous (B, N, 4, 4) float32, for `BEVSample`."""

    kind = "bev_sample"
    input_names = ("lidar2img",)

    def __init__(self, *, z_levels: int):
        self.z_levels = z_levels  # recorded for the manifest; the projection does not depend on it

    @torch.no_grad()
    def __call__(self, cam2img: Tensor, cam2lidar: Tensor, camera_mask: Tensor | None = None) -> tuple[Tensor]:
        """lidar2img; an absent camera's is all zeros, which puts every voxel at depth 0, behind it: `BEVSample`
        samples nothing from it and leaves it out of each voxel's mean."""
        with torch.autocast(cam2img.device.type, enabled=False):  # float32 projection under autocast too
            (lidar2img,) = self._lidar2img(cam2img, cam2lidar)
        if camera_mask is not None:
            present = camera_mask.to(device=lidar2img.device, dtype=lidar2img.dtype)
            lidar2img = lidar2img * present[..., None, None]
        return (lidar2img,)

    def _lidar2img(self, cam2img: Tensor, cam2lidar: Tensor) -> tuple[Tensor]:
        cam2img_h = torch.zeros(*cam2img.shape[:-2], 4, 4, dtype=torch.float32, device=cam2img.device)
        cam2img_h[..., :3, :3] = cam2img
        cam2img_h[..., 3, 3] = 1.0
        return (cam2img_h @ torch.linalg.inv(cam2lidar.float()),)

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "z_levels": self.z_levels}

    @staticmethod
    def from_json(d: dict[str, Any], grid: BEVGrid, image_size: tuple[int, int]) -> "BEVSampleGeometry":
        return BEVSampleGeometry(z_levels=int(d["z_levels"]))


def _conv_bn_relu(cin: int, cout: int, kernel: int = 3) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class ViewTransform(nn.Module, ABC):
    """Image features (B, N, C, h, w) + geometry tensors -> BEV features (B, out_channels, H, W) on `grid`.

    Attributes:
        grid: the BEV grid.
        out_channels: channels of the BEV output.
        rig_geometry: the pre-processing that makes the geometry tensors (`RigGeometry`).
        lift_names: names of `lift`'s outputs (the camera stage's outputs in a staged export).
    """

    grid: BEVGrid
    out_channels: int
    rig_geometry: RigGeometry
    lift_names: tuple[str, ...]

    @abstractmethod
    def lift(self, features: Tensor) -> tuple[Tensor, ...]:
        """Image features (B, N, C, h, w) -> the per-image tensors `splat` pools."""

    @abstractmethod
    def splat(self, *lifted_and_geometry: Tensor) -> Tensor:
        """`lift`'s outputs, then the geometry tensors (`rig_geometry.input_names`) -> BEV (B, out_channels, H, W)."""

    def forward(self, features: Tensor, geometry: tuple[Tensor, ...]) -> tuple[Tensor, Tensor | None]:
        """features (B, N, C, h, w), geometry from `rig_geometry` -> BEV (B, out_channels, H, W) and depth
        probabilities (B, N, D, h, w) float32 (softmax over D) or None for a transform without depth."""
        lifted = self.lift(features)
        bev = self.splat(*lifted, *geometry)
        return bev, self.depth_of(lifted, features.shape[:2])

    def depth_of(self, lifted: tuple[Tensor, ...], batch_cameras: tuple[int, int]) -> Tensor | None:
        """The depth probabilities among `lift`'s outputs, (B, N, D, h, w), or None."""
        return None


def split_depth_net_output(x: Tensor, num_bins: int) -> tuple[Tensor, Tensor]:
    """The lift-splat depth net's output (B*N, D + C', h, w) -> depth probabilities (B*N, D, h, w) float32 (softmax
    over D of the logits upcast to float32, whatever the autocast dtype) and context (B*N, C', h, w) as it is."""
    return x[:, :num_bins].float().softmax(dim=1), x[:, num_bins:]


class LiftSplat(ViewTransform):
    """Lift-splat with D depth bins; see the module docstring.

    Args:
        grid: the BEV grid (also bounds z: frustum points outside [z_min, z_max) are dropped).
        in_channels: channels of the image features.
        out_channels: context channels splatted into the BEV grid.
        image_size: (H, W) of the input images, pixels.
        feature_stride: image pixels per feature cell.
        depth_min, depth_step, num_bins: bin i is centred at ``depth_min + i * depth_step`` metres.
        segment_size: K of the pooling plan (`fusion.bev_pool.PoolingPlan`).
    """

    lift_names = ("depth", "context")

    def __init__(self, *, grid: BEVGrid, in_channels: int, out_channels: int, image_size: tuple[int, int],
                 feature_stride: int, depth_min: float, depth_step: float, num_bins: int,
                 segment_size: int = DEFAULT_SEGMENT_SIZE):
        super().__init__()
        self.grid = grid
        self.out_channels = out_channels
        self.num_bins = num_bins
        self.image_size = image_size
        self.feature_stride = feature_stride
        self.feature_size = (image_size[0] // feature_stride, image_size[1] // feature_stride)
        self.rig_geometry = LiftSplatGeometry(grid=grid, image_size=image_size, feature_stride=feature_stride,
                                              depth_min=depth_min, depth_step=depth_step, num_bins=num_bins,
                                              segment_size=segment_size)
        self.depth_net = nn.Sequential(
            _conv_bn_relu(in_channels, in_channels), nn.Conv2d(in_channels, num_bins + out_channels, 1)
        )

    def lift(self, features: Tensor) -> tuple[Tensor, Tensor]:
        """features (B, N, C, h, w) -> depth probabilities (B*N, D, h, w) float32 and context (B*N, C', h, w)."""
        return split_depth_net_output(self.depth_net(features.flatten(0, 1)), self.num_bins)

    def splat(self, depth: Tensor, context: Tensor, pool_segments: Tensor, pool_merges: Tensor, pool_cells: Tensor) -> Tensor:
        """depth (B*N, D, h, w), context (B*N, C', h, w) and the pooling plan -> BEV (B, C', H, W) float32 (the
        frustum volume depth x context and its sums in float32 under autocast too)."""
        volume = depth.float()[:, :, None] * context[:, None]  # (B*N, D, C', h, w)
        volume = volume.permute(0, 1, 3, 4, 2).reshape(-1, self.out_channels)  # rows in (b, n, d, h, w) order
        return pool_with_plan(volume, pool_segments, pool_merges, pool_cells)

    def depth_of(self, lifted: tuple[Tensor, ...], batch_cameras: tuple[int, int]) -> Tensor:
        depth = lifted[0]
        return depth.view(*batch_cameras, *depth.shape[1:])

    @torch.no_grad()
    def depth_target(self, points_lidar: Tensor, num_points_lidar: Tensor, cam2img: Tensor, cam2lidar: Tensor) -> Tensor:
        """BEVDepth-style depth labels: LiDAR points projected into each camera, nearest depth per feature cell.

        Args:
            points_lidar: (sum N_b, >=3) float32, x, y, z first.
            num_points_lidar: (B,) int64.
            cam2img: (B, N, 3, 3); cam2lidar: (B, N, 4, 4).

        Returns:
            (B, N, h, w) int64 depth-bin index, -1 where no point lands (or outside the bins).
        """
        b, n = cam2img.shape[:2]
        h, w = self.feature_size
        stride = self.feature_stride
        geo = self.rig_geometry
        step = geo.depth_step
        lo = geo.depth_min - step / 2
        hi = geo.depth_min + (geo.num_bins - 1) * step + step / 2
        out = torch.full((b, n, h, w), -1, dtype=torch.long, device=cam2img.device)
        lidar2cam = torch.linalg.inv(cam2lidar.float())
        for i, pts in enumerate(torch.split(points_lidar[:, :3], num_points_lidar.tolist())):
            if pts.shape[0] == 0:
                continue
            pts_cam = torch.einsum("nij,pj->npi", lidar2cam[i, :, :3, :3], pts) + lidar2cam[i, :, None, :3, 3]  # (N, P, 3)
            z = pts_cam[..., 2]
            uvw = torch.einsum("nij,npj->npi", cam2img[i], pts_cam)
            u = uvw[..., 0] / z.clamp(min=1e-3)
            v = uvw[..., 1] / z.clamp(min=1e-3)
            col = torch.floor((u + 0.5) / stride).long()
            row = torch.floor((v + 0.5) / stride).long()
            valid = (z >= lo) & (z < hi) & (col >= 0) & (col < w) & (row >= 0) & (row < h)
            cam = torch.arange(n, device=pts.device)[:, None].expand_as(z)
            flat = (cam * h * w + row * w + col)[valid]
            nearest = torch.full((n * h * w,), float("inf"), device=pts.device)
            nearest = nearest.scatter_reduce(0, flat, z[valid], reduce="amin")
            bins = torch.round((nearest - geo.depth_min) / step).clamp(0, self.num_bins - 1).long()
            out[i] = torch.where(torch.isfinite(nearest), bins, torch.full_like(bins, -1)).view(n, h, w)
        return out


class BEVSample(ViewTransform):
    """Simple-BEV: bilinear sampling of image features at projections of BEV voxel centres.

    Args:
        grid: the BEV grid; `z_levels` voxel layers evenly split [z_min, z_max).
        in_channels: channels of the image features.
        out_channels: BEV channels after folding the Z layers into channels and a 1x1 + 3x3 conv.
        image_size: (H, W) of the input images, pixels (the feature map spans the whole image).
        z_levels: number of voxel layers.
    """

    lift_names = ("image_features",)

    def __init__(self, *, grid: BEVGrid, in_channels: int, out_channels: int, image_size: tuple[int, int], z_levels: int):
        super().__init__()
        self.grid = grid
        self.out_channels = out_channels
        self.image_size = image_size
        self.z_levels = z_levels
        self.rig_geometry = BEVSampleGeometry(z_levels=z_levels)
        xs, ys = grid.cell_centers()
        dz = (grid.z_max - grid.z_min) / z_levels
        zs = grid.z_min + dz * (torch.arange(z_levels, dtype=torch.float64) + 0.5)
        zz, yy, xx = torch.meshgrid(zs, torch.from_numpy(ys), torch.from_numpy(xs), indexing="ij")
        voxels_lidar = torch.stack([xx, yy, zz, torch.ones_like(xx)], -1).float()  # (Z, H, W, 4) homogeneous
        self.register_buffer("voxels_lidar", voxels_lidar.view(-1, 4), persistent=False)
        self.reduce = nn.Sequential(_conv_bn_relu(in_channels * z_levels, out_channels, 1), _conv_bn_relu(out_channels, out_channels, 3))

    def lift(self, features: Tensor) -> tuple[Tensor]:
        """The image features themselves (B, N, C, h, w)."""
        return (features,)

    def splat(self, features: Tensor, lidar2img: Tensor) -> Tensor:
        """features: (B, N, C, h, w); lidar2img (B, N, 4, 4) from `BEVSampleGeometry` -> BEV (B, out_channels, H, W)."""
        b, n, c, h, w = features.shape
        img_h, img_w = self.image_size
        points_img = self.voxels_lidar @ lidar2img.transpose(-1, -2)  # (B, N, Z*H*W, 4)
        depth = points_img[..., 2]
        safe_depth = torch.where(depth > 1e-3, depth, torch.ones_like(depth))
        u = points_img[..., 0] / safe_depth
        v = points_img[..., 1] / safe_depth
        valid = (depth > 1e-3) & (u > -0.5) & (u < img_w - 0.5) & (v > -0.5) & (v < img_h - 0.5)
        # Pixel centres sit at integers, so the image spans [-0.5, W - 0.5]: align_corners=False coordinates.
        grid_xy = torch.stack([(u + 0.5) / img_w * 2 - 1, (v + 0.5) / img_h * 2 - 1], -1)
        grid_xy = torch.where(valid[..., None], grid_xy, torch.full_like(grid_xy, -2.0))
        num_voxels = self.voxels_lidar.shape[0]
        sampled = F.grid_sample(
            features.flatten(0, 1), grid_xy.view(b * n, 1, num_voxels, 2), mode="bilinear",
            padding_mode="zeros", align_corners=False,
        )  # (B*N, C, 1, Z*H*W)
        sampled = sampled.view(b, n, c, num_voxels)
        valid_f = valid.to(sampled.dtype)[:, :, None, :]  # (B, N, 1, Z*H*W)
        volume = (sampled * valid_f).sum(1) / valid_f.sum(1).clamp(min=1.0)  # (B, C, Z*H*W)
        volume = volume.view(b, c * self.z_levels, self.grid.height, self.grid.width)
        return self.reduce(volume)
