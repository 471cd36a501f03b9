"""Builders: typed config -> built modules -> `BEVFusionModel`.

One explicit builder per part; `build_model` is the builder of the shipped variants (tiny and base differ only
in sizes and the timm name). The view transform is chosen by the type of ``cfg.model.view_transform``.
"""

from __future__ import annotations

import logging
from typing import Any

from fusion.fuser import BEVFuser
from fusion.lidar import LidarEncoder
from fusion.radar import RadarEncoder
from fusion.temporal import TemporalFuser
from perception.config import BEVSampleConfig, CameraConfig, ExperimentConfig, LiftSplatConfig, PillarConfig
from perception.data.batch import MODALITIES
from perception.errors import ConfigError
from perception.model.bevfusion import BEVFusionModel, DecodeSettings
from perception.model.camera import CameraEncoder, SimpleFeaturePyramid, build_vit_backbone, load_backbone_checkpoint
from perception.model.decoder import BEVDecoder
from perception.model.lidar_velocity import LidarVelocityConfig
from perception.model.heads import BEVHeads, CenterHead, MapHead, SceneHead
from perception.model.view_transform import (
    BEVSample, BEVSampleGeometry, LiftSplat, LiftSplatGeometry, RigGeometry, ViewTransform)
from perception.model.weights import resolve_pretrained
from perception.structures import BEVGrid

logger = logging.getLogger(__name__)


def build_camera_encoder(cfg: CameraConfig, image_size: tuple[int, int]) -> CameraEncoder:
    """ViT backbone (+ optional pretrained weights, frozen blocks, gradient checkpointing) and its pyramid neck.

    ``cfg.pretrained`` is resolved by `perception.model.weights.resolve_pretrained` (a registered name is fetched
    into the cache on first use); registered weights need ``cfg.backbone`` to be their timm architecture.
    """
    backbone = build_vit_backbone(cfg.backbone, image_size, blocks=cfg.blocks, drop_path_rate=cfg.drop_path_rate)
    path, provenance = resolve_pretrained(cfg.pretrained)
    if "arch" in provenance and provenance["arch"] != cfg.backbone:
        raise ConfigError(f"model.camera.pretrained: {provenance['name']} are weights of {provenance['arch']}; set "
                          f"model.camera.backbone: {provenance['arch']} (it is {cfg.backbone})")
    loaded = load_backbone_checkpoint(backbone, path).loaded if path is not None else []
    encoder = CameraEncoder(backbone=backbone, neck=SimpleFeaturePyramid(backbone.embed_dim, cfg.out_channels, upsample=cfg.feature_upsample),
                            out_channels=cfg.out_channels, weights_provenance=provenance, pretrained_keys=loaded)
    encoder.freeze_blocks(cfg.freeze_blocks)
    encoder.set_grad_checkpointing(cfg.grad_checkpointing)
    return encoder


# The rig geometries an export manifest can name (``preprocessing.view_transform.kind``), one per view transform.
RIG_GEOMETRIES: tuple[type[RigGeometry], ...] = (LiftSplatGeometry, BEVSampleGeometry)


def build_view_transform(cfg: LiftSplatConfig | BEVSampleConfig, grid: BEVGrid, camera: CameraEncoder) -> ViewTransform:
    """The view transform of ``model.view_transform`` (its ``kind`` picks the class)."""
    if isinstance(cfg, LiftSplatConfig):
        return LiftSplat(grid=grid, in_channels=camera.out_channels, out_channels=cfg.out_channels,
                         image_size=camera.image_size, feature_stride=camera.feature_stride,
                         depth_min=cfg.depth_min, depth_step=cfg.depth_step, num_bins=cfg.num_depth_bins)
    return BEVSample(grid=grid, in_channels=camera.out_channels, out_channels=cfg.out_channels,
                     image_size=camera.image_size, z_levels=cfg.z_levels)


def rig_geometry_from_json(d: dict[str, Any], grid: BEVGrid, image_size: tuple[int, int]) -> RigGeometry:
    """The `RigGeometry` an export manifest's ``preprocessing.view_transform`` records."""
    kinds = {cls.kind: cls for cls in RIG_GEOMETRIES}
    if d.get("kind") not in kinds:
        raise ConfigError(f"preprocessing.view_transform.kind {d.get('kind')!r}: expected one of {sorted(kinds)}")
    return kinds[d["kind"]].from_json(d, grid, image_size)


def build_lidar_encoder(cfg: PillarConfig, grid: BEVGrid) -> LidarEncoder:
    """The LiDAR pillar encoder; its output is on `grid` whatever ``cfg.pillar_stride`` (pillars grid.cell / stride)."""
    voxelizer = LidarEncoder.make_voxelizer(grid, max_points_per_pillar=cfg.max_points_per_pillar, max_pillars=cfg.max_pillars,
                                            pillar_stride=cfg.pillar_stride)
    return LidarEncoder(voxelizer=voxelizer, pfn_channels=cfg.pfn_channels, out_channels=cfg.out_channels,
                        backbone_layers=cfg.backbone_layers,
                        keyframe_feature=LidarEncoder.DT_FEATURE if cfg.keyframe_pool else None)


def build_radar_encoder(cfg: PillarConfig, grid: BEVGrid) -> RadarEncoder:
    if cfg.keyframe_pool:
        raise ConfigError("model.radar.keyframe_pool: only the LiDAR encoder pools its keyframe sweep apart (the "
                          "5 radars' keyframe scans are not at the LiDAR's time)")
    if cfg.pillar_stride != 1:
        raise ConfigError("model.radar.pillar_stride: only the LiDAR encoder has pillars finer than the BEV cell "
                          "(radar returns are too sparse for them); leave it at 1")
    voxelizer = RadarEncoder.make_voxelizer(grid, max_points_per_pillar=cfg.max_points_per_pillar, max_pillars=cfg.max_pillars)
    return RadarEncoder(voxelizer=voxelizer, pfn_channels=cfg.pfn_channels, out_channels=cfg.out_channels,
                        backbone_layers=cfg.backbone_layers)


def build_model(cfg: ExperimentConfig) -> BEVFusionModel:
    """The fused BEV model of `cfg` (random weights except a configured camera checkpoint)."""
    grid = cfg.grid.build()
    classes = cfg.classes.build()
    m = cfg.model
    camera_encoder = build_camera_encoder(m.camera, cfg.data.image_size)
    view_transform = build_view_transform(m.view_transform, grid, camera_encoder)
    lidar_encoder = build_lidar_encoder(m.lidar, grid)
    radar_encoder = build_radar_encoder(m.radar, grid)
    fuser = BEVFuser(in_channels=(view_transform.out_channels, lidar_encoder.out_channels, radar_encoder.out_channels),
                     out_channels=m.fuser.out_channels)
    bev_decoder = BEVDecoder(in_channels=fuser.out_channels, channels=m.decoder.channels, layers=m.decoder.layers,
                             out_channels=m.decoder.out_channels, position_channels=m.decoder.position_channels)
    map_grid = grid if m.heads.map_grid is None else m.heads.map_grid.build("model.heads.map_grid", even=False)
    heads = BEVHeads(
        detection=CenterHead(in_channels=bev_decoder.out_channels, hidden=m.heads.det_channels,
                             num_classes=len(classes), num_attributes=max(len(classes.attributes), 1)),
        map_segmentation=MapHead(in_channels=bev_decoder.out_channels + (view_transform.out_channels if m.heads.map_camera else 0),
                                 hidden=m.heads.map_channels, feature_grid=grid,
                                 map_grid=map_grid),
        scene=SceneHead(in_channels=bev_decoder.out_channels, hidden=m.heads.scene_channels),
    )
    model = BEVFusionModel(
        camera_encoder=camera_encoder, view_transform=view_transform, lidar_encoder=lidar_encoder,
        radar_encoder=radar_encoder, fuser=fuser, bev_decoder=bev_decoder, heads=heads, grid=grid,
        loss_weights=cfg.loss,
        decode=DecodeSettings(top_k=m.heads.top_k, score_threshold=m.heads.score_threshold, max_detections=m.heads.max_detections,
                              lidar_velocity=LidarVelocityConfig() if m.heads.lidar_velocity else None,
                              classes=classes),
        modality_dropout=m.fuser.modality_dropout,
        paired_drop=tuple(tuple(name in names for name in MODALITIES) for names in m.fuser.paired_drop),
        paired_weight=m.fuser.paired_weight,
        map_camera=m.heads.map_camera,
        temporal=TemporalFuser(m.fuser.out_channels, grid) if m.temporal.frames else None,
        rig=cfg.rig.build(),
    )
    logger.info("built %s with %s view transform: %.2fM parameters", m.camera.backbone, type(view_transform).__name__,
                sum(p.numel() for p in model.parameters()) / 1e6)
    return model
