"""Camera-to-BEV view transforms.

Two interchangeable transforms, each split into a pre-processing step (`geometry`: calibration -> tensors,
may use `torch.linalg.inv` and runs outside the exportable core) and an exportable `forward`:

  - `LiftSplat` (LSS / BEVDet / BEVDepth): a per-pixel categorical depth distribution over D bins times
    context features, summed into the BEV grid with scatter-add. `geometry` gives, for the camera rig of each
    sample, the flat BEV index of every frustum point; for a fixed rig it can be computed once and reused.
  - `BEVSample` (Simple-BEV): BEV voxel centres projected into every camera with ``lidar2img = cam2img @
    inverse(cam2lidar)`` and image features bilinearly sampled there (``grid_sample``), averaged over the
    cameras that see the voxel, and the Z layers folded into channels.

Both export to ONNX with opset >= 17 (ScatterElements(add) / GridSample).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fusion.bev_pool import bev_flat_index, scatter_add_rows
from perception.structures import BEVGrid


def _conv_bn_relu(cin: int, cout: int, kernel: int = 3) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class ViewTransform(nn.Module, ABC):
    """Image features (B, N, C, h, w) + geometry tensor -> BEV features (B, out_channels, H, W) on `grid`."""

    grid: BEVGrid
    out_channels: int

    @abstractmethod
    def geometry(self, cam2img: Tensor, cam2lidar: Tensor) -> Tensor:
        """Pre-processing: calibration -> the geometry tensor `forward` takes.

        Args:
            cam2img: (B, N, 3, 3) float32, camera frame -> augmented pixels.
            cam2lidar: (B, N, 4, 4) float32, camera frame -> LIDAR_TOP.
        """

    @abstractmethod
    def forward(self, features: Tensor, geometry: Tensor) -> tuple[Tensor, Tensor | None]:
        """Returns BEV features (B, out_channels, H, W) and depth probabilities (B, N, D, h, w) or None."""


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
    """

    def __init__(self, *, grid: BEVGrid, in_channels: int, out_channels: int, image_size: tuple[int, int],
                 feature_stride: int, depth_min: float, depth_step: float, num_bins: int):
        super().__init__()
        self.grid = grid
        self.out_channels = out_channels
        self.num_bins = num_bins
        self.image_size = image_size
        self.feature_stride = feature_stride
        self.feature_size = (image_size[0] // feature_stride, image_size[1] // feature_stride)
        self.depth_net = nn.Sequential(
            _conv_bn_relu(in_channels, in_channels), nn.Conv2d(in_channels, num_bins + out_channels, 1)
        )
        depth_bins = depth_min + depth_step * torch.arange(num_bins, dtype=torch.float32)
        self.register_buffer("depth_bins", depth_bins, persistent=False)  # (D,) metres
        h, w = self.feature_size
        # Pixel centre of feature cell (i, j), in the OpenCV convention (pixel centres at integers).
        v = torch.arange(h, dtype=torch.float32) * feature_stride + (feature_stride - 1) / 2
        u = torch.arange(w, dtype=torch.float32) * feature_stride + (feature_stride - 1) / 2
        d, vv, uu = torch.meshgrid(depth_bins, v, u, indexing="ij")
        frustum_img = torch.stack([uu * d, vv * d, d], -1)  # (D, h, w, 3): homogeneous pixel * depth
        self.register_buffer("frustum_img", frustum_img, persistent=False)

    def geometry(self, cam2img: Tensor, cam2lidar: Tensor) -> Tensor:
        """Flat BEV index of every frustum point: (B, N*D*h*w) int64 in [0, H*W]; H*W means dropped."""
        img2cam = torch.linalg.inv(cam2img.float())  # (B, N, 3, 3)
        points_cam = torch.einsum("bnij,dhwj->bndhwi", img2cam, self.frustum_img)
        rot, trans = cam2lidar[..., :3, :3], cam2lidar[..., :3, 3]
        points_lidar = torch.einsum("bnij,bndhwj->bndhwi", rot, points_cam) + trans[:, :, None, None, None, :]
        index = bev_flat_index(points_lidar[..., 0], points_lidar[..., 1], points_lidar[..., 2], self.grid)
        return index.flatten(1)

    def depth_and_context(self, features: Tensor) -> tuple[Tensor, Tensor]:
        """The depth net on features (B*N, C, h, w), split by `split_depth_net_output`."""
        return split_depth_net_output(self.depth_net(features), self.num_bins)

    def forward(self, features: Tensor, geometry: Tensor) -> tuple[Tensor, Tensor]:
        """features: (B, N, C, h, w); geometry: (B, N*D*h*w) int64 from `geometry`.

        Returns: BEV (B, out_channels, H, W) float32 (pooled in float32 under autocast too, `bev_pool`) and depth
        probabilities (B, N, D, h, w) float32, softmax over D.
        """
        b, n, c, h, w = features.shape
        depth, context = self.depth_and_context(features.flatten(0, 1))
        volume = depth[:, :, None] * context[:, None]  # (B*N, D, C', h, w), float32 (depth is)
        volume = volume.view(b, n, self.num_bins, self.out_channels, h, w).permute(0, 1, 2, 4, 5, 3)
        volume = volume.reshape(-1, self.out_channels)  # (B*N*D*h*w, C') in geometry's order
        cells = self.grid.height * self.grid.width
        offsets = torch.arange(b, device=geometry.device, dtype=geometry.dtype)[:, None] * (cells + 1)
        bev = scatter_add_rows(volume, (geometry + offsets).flatten(), b * (cells + 1))
        bev = bev.view(b, cells + 1, self.out_channels)[:, :cells]
        bev = bev.view(b, self.grid.height, self.grid.width, self.out_channels).permute(0, 3, 1, 2).contiguous()
        return bev, depth.view(b, n, self.num_bins, h, w)

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
        step = float(self.depth_bins[1] - self.depth_bins[0])
        lo = float(self.depth_bins[0]) - step / 2
        hi = float(self.depth_bins[-1]) + step / 2
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
            bins = torch.round((nearest - float(self.depth_bins[0])) / step).clamp(0, self.num_bins - 1).long()
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

    def __init__(self, *, grid: BEVGrid, in_channels: int, out_channels: int, image_size: tuple[int, int], z_levels: int):
        super().__init__()
        self.grid = grid
        self.out_channels = out_channels
        self.image_size = image_size
        self.z_levels = z_levels
        xs, ys = grid.cell_centers()
        dz = (grid.z_max - grid.z_min) / z_levels
        zs = grid.z_min + dz * (torch.arange(z_levels, dtype=torch.float64) + 0.5)
        zz, yy, xx = torch.meshgrid(zs, torch.from_numpy(ys), torch.from_numpy(xs), indexing="ij")
        voxels_lidar = torch.stack([xx, yy, zz, torch.ones_like(xx)], -1).float()  # (Z, H, W, 4) homogeneous
        self.register_buffer("voxels_lidar", voxels_lidar.view(-1, 4), persistent=False)
        self.reduce = nn.Sequential(_conv_bn_relu(in_channels * z_levels, out_channels, 1), _conv_bn_relu(out_channels, out_channels, 3))

    def geometry(self, cam2img: Tensor, cam2lidar: Tensor) -> Tensor:
        """lidar2img = cam2img @ inverse(cam2lidar), homogeneous: (B, N, 4, 4) float32."""
        cam2img_h = torch.zeros(*cam2img.shape[:-2], 4, 4, dtype=torch.float32, device=cam2img.device)
        cam2img_h[..., :3, :3] = cam2img
        cam2img_h[..., 3, 3] = 1.0
        return cam2img_h @ torch.linalg.inv(cam2lidar.float())

    def forward(self, features: Tensor, geometry: Tensor) -> tuple[Tensor, None]:
        """features: (B, N, C, h, w); geometry: lidar2img (B, N, 4, 4). Returns BEV (B, out_channels, H, W), None."""
        b, n, c, h, w = features.shape
        img_h, img_w = self.image_size
        points_img = self.voxels_lidar @ geometry.transpose(-1, -2)  # (B, N, Z*H*W, 4)
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
        return self.reduce(volume), None
