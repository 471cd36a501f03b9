"""The deployable core: `BEVFusionModel`'s parts, recomposed so that every BEV placement is a Gather.

Why not export `BEVFusionModel.forward` as it is: its BEV pooling (lift-splat) and pillar scatters are
``scatter_add``, which ONNX writes as ``ScatterElements(reduction="add")``. TensorRT 10's ONNX parser only
imports that through TensorRT's ``ScatterElements`` plugin (``onnxOpImporters.cpp``: a reduction other than
``none`` goes to ``scatterPluginHelper``), which is exactly the plugin dependency this package avoids.
Here the same sums are computed with a plan made in pre-processing (`deploy.preprocess`):

  - lift-splat pooling: the frustum points of the rig, sorted by BEV cell, are cut into segments of at most
    ``K`` points of one cell. ``Gather`` + ``ReduceSum`` sums every segment; a second ``Gather`` + ``ReduceSum``
    sums the segments of the cells that have several; a last ``Gather`` lays the cell sums out on the grid
    (empty cells read a zero row). The sums are exact in FP32 up to summation order.
  - pillar scatter: one pillar per BEV cell (`fusion.lidar.PillarVoxelizer`), so the grid is one ``Gather``
    from the pillar features plus a zero row, indexed by each cell's pillar.

The parts themselves (camera encoder, depth net, pillar feature nets and 2D backbones, fuser, decoder,
heads) are the model's own modules, with the model's weights. The core is split in stages that export (and
are timed, `deploy.bench`) separately or together: camera, BEV pooling, LiDAR, radar, fuse + heads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fusion.lidar import PillarEncoder
from perception.model.bevfusion import BEVFusionModel
from perception.model.camera import CameraEncoder
from perception.model.view_transform import BEVSample, LiftSplat, split_depth_net_output

# Head outputs of the deployed core, in graph order (`BEVFusionModel.forward` keys without the depth).
OUTPUT_NAMES: tuple[str, ...] = ("heatmap", "offset", "z", "log_size", "rot", "velocity", "attribute", "map", "scene")
PILLAR_INPUTS: tuple[str, ...] = ("features", "point_mask", "bev_index")
LIFT_SPLAT_GEOMETRY: tuple[str, ...] = ("pool_segments", "pool_merges", "pool_cells")
BEV_SAMPLE_GEOMETRY: tuple[str, ...] = ("lidar2img",)


def geometry_input_names(model: BEVFusionModel) -> tuple[str, ...]:
    """Names of the camera-geometry inputs of the deployed core for `model`'s view transform."""
    if isinstance(model.view_transform, LiftSplat):
        return LIFT_SPLAT_GEOMETRY
    if isinstance(model.view_transform, BEVSample):
        return BEV_SAMPLE_GEOMETRY
    raise TypeError(f"no deployable pooling for {type(model.view_transform).__name__}")


def core_input_names(model: BEVFusionModel) -> tuple[str, ...]:
    """The deployed core's inputs, in graph order (shapes and dtypes: `deploy.export` writes them to the manifest)."""
    return ("images", *geometry_input_names(model), *(f"lidar_{n}" for n in PILLAR_INPUTS),
            *(f"radar_{n}" for n in PILLAR_INPUTS), "modality_mask")


def gather_bev(rows: Tensor, bev_index: Tensor) -> Tensor:
    """Lay rows out on the BEV grid: rows (R, C), bev_index (B, H, W) int64 in [0, R] (R = empty cell)
    -> (B, C, H, W). A zero row is appended for the empty cells."""
    table = torch.cat([rows, rows.new_zeros(1, rows.shape[1])], 0)
    return table[bev_index].permute(0, 3, 1, 2).contiguous()


def segment_sum(rows: Tensor, segments: Tensor) -> Tensor:
    """rows (R, C), segments (S, K) int64 in [0, R] (R = padding) -> (S, C): the sum of each segment's rows."""
    table = torch.cat([rows, rows.new_zeros(1, rows.shape[1])], 0)
    return table[segments].sum(1)


class CameraStage(nn.Module):
    """Camera encoder, and for lift-splat the depth net: normalised images (B, N, 3, H, W) ->

    lift-splat: depth probabilities (B*N, D, h, w) (softmax over D) and context (B*N, C, h, w);
    Simple-BEV: image features (B, N, C, h, w).
    """

    def __init__(self, encoder: CameraEncoder, view_transform: LiftSplat | BEVSample):
        super().__init__()
        self.encoder = encoder
        self.depth_net = view_transform.depth_net if isinstance(view_transform, LiftSplat) else None
        self.num_bins = view_transform.num_bins if isinstance(view_transform, LiftSplat) else 0

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        features = self.encoder(images)
        if self.depth_net is None:
            return (features,)
        return split_depth_net_output(self.depth_net(features.flatten(0, 1)), self.num_bins)  # as `LiftSplat.forward`


class LiftSplatPooling(nn.Module):
    """Lift (depth x context) and splat into the BEV grid with a pooling plan (see the module docstring).

    Inputs: depth (B*N, D, h, w), context (B*N, C, h, w) from `CameraStage`; the plan of
    `deploy.preprocess.PoolingPlan`: pool_segments (S, K), pool_merges (M, K2), pool_cells (B, H, W), int64.
    Output: camera BEV (B, C, H, W).
    """

    def __init__(self, view_transform: LiftSplat):
        super().__init__()
        self.num_bins = view_transform.num_bins
        self.channels = view_transform.out_channels

    def forward(self, depth: Tensor, context: Tensor, pool_segments: Tensor, pool_merges: Tensor, pool_cells: Tensor) -> Tensor:
        volume = depth.float()[:, :, None] * context[:, None]  # (B*N, D, C, h, w) float32: sums in float32, as `bev_pool`
        volume = volume.permute(0, 1, 3, 4, 2).reshape(-1, self.channels)  # rows in (b, n, d, h, w) order
        segments = segment_sum(volume, pool_segments)  # (S, C)
        merged = segment_sum(segments, pool_merges)  # (M, C)
        return gather_bev(torch.cat([segments, merged], 0), pool_cells)


class BEVSamplePooling(nn.Module):
    """Simple-BEV's projection and bilinear sampling (``GridSample``, plugin-free as it is):
    features (B, N, C, h, w), lidar2img (B, N, 4, 4) -> camera BEV (B, C', H, W)."""

    def __init__(self, view_transform: BEVSample):
        super().__init__()
        self.view_transform = view_transform

    def forward(self, features: Tensor, lidar2img: Tensor) -> Tensor:
        return self.view_transform(features, lidar2img)[0]


class PillarStage(nn.Module):
    """A pillar encoder with a Gather in place of its scatter: features (P, M, F), point_mask (P, M),
    bev_index (B, H, W) int64 in [0, P] (P = no pillar) -> BEV features (B, C, H, W).
    Same arithmetic as `fusion.lidar.PillarEncoder.forward`."""

    def __init__(self, encoder: PillarEncoder):
        super().__init__()
        self.encoder = encoder

    def forward(self, features: Tensor, point_mask: Tensor, bev_index: Tensor) -> Tensor:
        return self.encoder.backbone(gather_bev(self.encoder.pool(features, point_mask), bev_index))


class FuseHeadsStage(nn.Module):
    """Fuser, BEV decoder and heads: the three BEV maps and the modality mask (B, 3) bool -> `OUTPUT_NAMES`."""

    def __init__(self, model: BEVFusionModel):
        super().__init__()
        self.fuser = model.fuser
        self.bev_decoder = model.bev_decoder
        self.heads = model.heads

    def forward(self, camera_bev: Tensor, lidar_bev: Tensor, radar_bev: Tensor, modality_mask: Tensor) -> tuple[Tensor, ...]:
        out = self.heads(self.bev_decoder(self.fuser(camera_bev, lidar_bev, radar_bev, modality_mask)))
        return tuple(out[name] for name in OUTPUT_NAMES)


@dataclass(frozen=True)
class StageSpec:
    """One stage of the core as a graph of its own: its module and its input and output names."""

    name: str
    module: nn.Module
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


class DeployCore(nn.Module):
    """The plugin-free core of a `BEVFusionModel` (shares its modules and weights; call `eval()` on it).

    ``forward(*inputs)`` takes `core_input_names(model)` in order and returns the `OUTPUT_NAMES` tensors:
    heatmap (B, 10, H, W) logits, offset (B, 2, H, W), z (B, 1, H, W), log_size (B, 3, H, W), rot (B, 2, H, W),
    velocity (B, 2, H, W), attribute (B, 8, H, W) logits, map (B, 6, H_map, W_map) logits, scene (B, 6) logits,
    equal to `BEVFusionModel.forward`'s up to FP32 summation order.
    """

    def __init__(self, model: BEVFusionModel):
        super().__init__()
        self.input_names = core_input_names(model)
        self.geometry_names = geometry_input_names(model)
        self.camera = CameraStage(model.camera_encoder, model.view_transform)
        if isinstance(model.view_transform, LiftSplat):
            self.pooling: nn.Module = LiftSplatPooling(model.view_transform)
        else:
            self.pooling = BEVSamplePooling(model.view_transform)
        self.lidar = PillarStage(model.lidar_encoder)
        self.radar = PillarStage(model.radar_encoder)
        self.fuse_heads = FuseHeadsStage(model)

    @property
    def camera_outputs(self) -> tuple[str, ...]:
        return ("depth", "context") if isinstance(self.pooling, LiftSplatPooling) else ("image_features",)

    def stages(self) -> tuple[StageSpec, ...]:
        """The stages in execution order, for timing and per-stage export."""
        pillar = lambda s: tuple(f"{s}_{n}" for n in PILLAR_INPUTS)  # noqa: E731
        return (
            StageSpec("camera", self.camera, ("images",), self.camera_outputs),
            StageSpec("bev_pooling", self.pooling, (*self.camera_outputs, *self.geometry_names), ("camera_bev",)),
            StageSpec("lidar", self.lidar, pillar("lidar"), ("lidar_bev",)),
            StageSpec("radar", self.radar, pillar("radar"), ("radar_bev",)),
            StageSpec("fuse_heads", self.fuse_heads, ("camera_bev", "lidar_bev", "radar_bev", "modality_mask"), OUTPUT_NAMES),
        )

    def forward(self, *inputs: Tensor) -> tuple[Tensor, ...]:
        if len(inputs) != len(self.input_names):
            raise TypeError(f"DeployCore takes {len(self.input_names)} inputs {self.input_names}, got {len(inputs)}")
        values: dict[str, Tensor] = dict(zip(self.input_names, inputs))
        for stage in self.stages():
            out = stage.module(*(values[n] for n in stage.inputs))
            values.update(zip(stage.outputs, out if isinstance(out, tuple) else (out,)))
        return tuple(values[n] for n in OUTPUT_NAMES)
