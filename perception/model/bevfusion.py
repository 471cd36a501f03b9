"""The fused camera + LiDAR + radar BEV model.

Three layers, kept apart, each one implementation shared by training, evaluation and every deploy runtime:
  - pre-processing (`BEVFusionModel.prepare`, `perception.model.preprocess.Preprocessor`): uint8 images ->
    normalised floats, calibration -> the view transform's geometry, point clouds -> pillars. Plain torch, not
    exported.
  - the core (`BEVFusionModel.forward`): tensors in, head output tensors out; this is the graph `deploy`
    exports, as it is (Gather / ReduceSum BEV pooling, `fusion.bev_pool`; no plugin).
  - post-processing (`outputs_to_predictions`: decoding, NMS) and training (`loss`: targets, losses).

`forward` returns the same dict of tensors in training and eval mode.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor, nn

from fusion.fuser import BEVFuser, drop_modalities
from fusion.lidar import LidarEncoder, Pillars
from fusion.radar import RadarEncoder
from fusion.temporal import TemporalFuser
from perception.classes import NUSCENES, ClassList
from perception.rig import NUSCENES as NUSCENES_RIG, Rig
from perception.config import LossConfig
from perception.data.batch import MODALITIES, Batch
from perception.errors import ConfigError
from perception.model.camera import CameraEncoder
from perception.model.decoder import BEVDecoder
from perception.model.lidar_velocity import LidarVelocityConfig, refine_velocities
from perception.model.heads import (
    REGRESSION_COLUMNS, BEVHeads, DetectionTargets, build_detection_targets, decode_detections, gather_regression,
)
from perception.model.losses import (
    depth_loss, dice_loss, gaussian_focal_loss, masked_cross_entropy, sigmoid_focal_loss, weighted_l1,
)
from perception.model.preprocess import CoreInputs, Preprocessor, PreprocessSpec
from perception.model.temporal import History, TemporalState
from perception.model.view_transform import LiftSplat, ViewTransform
from perception.structures import Boxes3D, BEVGrid


@dataclass
class Prediction:
    """What the model predicts for one sample.

    Attributes:
        boxes_lidar: K boxes in the keyframe's LIDAR_TOP frame (`Boxes3D` layout, metres, radians, m/s).
        scores: (K,) float32 in [0, 1].
        labels: (K,) int64 into DETECTION_CLASSES.
        attributes: (K,) int64 into ATTRIBUTES, -1 for classes without attributes.
        map_probs: (len(MAP_CLASSES), H_map, W_map) float32 in [0, 1] on `BEVFusionModel.map_grid` (the BEV
            grid unless ``model.heads.map_grid`` sets another), row i along +y, column j along +x.
        scene_probs: (len(SCENE_TAGS),) float32 in [0, 1].
    """

    boxes_lidar: Boxes3D
    scores: Tensor
    labels: Tensor
    attributes: Tensor
    map_probs: Tensor
    scene_probs: Tensor


@dataclass(frozen=True)
class DecodeSettings:
    """Detection post-processing: peaks kept before NMS, score threshold, boxes kept after NMS (per sample), and
    whether box velocities are measured from the LiDAR sweeps (`perception.model.lidar_velocity`; None: the
    head's), and the class list (its NMS radii and which attributes each class may carry)."""

    top_k: int = 100
    score_threshold: float = 0.1
    max_detections: int = 100
    lidar_velocity: LidarVelocityConfig | None = None
    classes: ClassList = NUSCENES


class BEVFusionModel(nn.Module):
    """Camera + LiDAR + radar BEV perception with detection, map segmentation and scene-tag heads.

    Args:
        camera_encoder: images -> features at the patch stride (16, or 14 for DINOv2).
        view_transform: image features -> camera BEV features on `grid`.
        lidar_encoder, radar_encoder: pillars -> BEV features on `grid` (each carries its voxeliser).
        fuser: masked fusion of the three BEV feature maps.
        bev_decoder: 2D backbone + neck on the fused BEV.
        heads: detection, map and scene heads.
        grid: the BEV grid every part was built for.
        loss_weights: weight of each loss term (0 = not computed).
        decode: detection post-processing settings.
        modality_dropout: per-sample, per-modality drop probability applied by `loss` in training mode (0 = off);
            a sample always keeps one of the modalities it has.
        paired_drop: one (3,) bool per paired pass, True = removed (`MODALITIES` order): in training mode `loss`
            sends the same encoded batch through fuser, decoder and heads once more per pass without those
            modalities (the encoders run once) and adds its losses, times `paired_weight`, under keys ending in
            ``_no_<modalities>`` (``heatmap_no_radar``). Empty = no paired pass.
        temporal: fuses the previous keyframe's fused BEV into the current one (None: the single-frame model);
            `loss` and `predict` then take a `TemporalState` that carries the history between calls.
        map_camera: the map head also takes the camera BEV (masked like the fuser's input) next to the decoder's
            output; its `MapHead` must have been built for decoder + view-transform channels.
        rig: the sensors (`perception.rig.Rig`): the camera axis of the images is its camera count, in its order.
    """

    def __init__(self, *, camera_encoder: CameraEncoder, view_transform: ViewTransform, lidar_encoder: LidarEncoder,
                 radar_encoder: RadarEncoder, fuser: BEVFuser, bev_decoder: BEVDecoder, heads: BEVHeads, grid: BEVGrid,
                 loss_weights: LossConfig, decode: DecodeSettings,
                 modality_dropout: float | tuple[float, float, float] = 0.0,
                 paired_drop: tuple[tuple[bool, bool, bool], ...] = (), paired_weight: float = 1.0,
                 temporal: TemporalFuser | None = None, map_camera: bool = False, rig: Rig = NUSCENES_RIG):
        super().__init__()
        for name, part in (("view_transform", view_transform), ("lidar_encoder", lidar_encoder), ("radar_encoder", radar_encoder)):
            if part.grid != grid:
                raise ValueError(f"BEVFusionModel: {name} was built for {part.grid}, not {grid}")
        if loss_weights.depth > 0 and not isinstance(view_transform, LiftSplat):
            raise ValueError("BEVFusionModel: depth supervision needs a LiftSplat view transform")
        self.camera_encoder = camera_encoder
        self.view_transform = view_transform
        self.lidar_encoder = lidar_encoder
        self.radar_encoder = radar_encoder
        self.fuser = fuser
        self.bev_decoder = bev_decoder
        self.heads = heads
        self.grid = grid
        self.rig = rig
        self.loss_weights = loss_weights
        self.decode = decode
        self.modality_dropout = modality_dropout
        for drop in paired_drop:
            if len(drop) != 3 or not any(drop) or all(drop):
                raise ValueError(f"BEVFusionModel: paired_drop {paired_drop}: each pass removes one or two of the 3 modalities")
        self.paired_drop = tuple(tuple(bool(d) for d in drop) for drop in paired_drop)
        self.paired_weight = paired_weight
        if temporal is not None and temporal.grid != grid:
            raise ValueError(f"BEVFusionModel: temporal fuser was built for {temporal.grid}, not {grid}")
        self.temporal = temporal
        self.map_camera = map_camera
        reg_weights = [loss_weights.velocity if c in ("vx", "vy") else 1.0 for c in REGRESSION_COLUMNS]
        self.register_buffer("regression_weights", torch.tensor(reg_weights), persistent=False)

    @property
    def camera_unused(self) -> bool:
        """Training with the cameras hidden from every sample (camera modality dropout 1.0) and no depth loss."""
        return self.training and self._camera_hidden_by_config

    @property
    def _camera_hidden_by_config(self) -> bool:
        """Camera modality dropout 1.0 and no depth loss: training never needs the camera branch."""
        camera_drop = torch.as_tensor(self.modality_dropout).reshape(-1)[0].item()
        return camera_drop >= 1.0 and not (self.loss_weights.depth > 0 and isinstance(self.view_transform, LiftSplat))

    @property
    def may_leave_parameters_unused(self) -> bool:
        """Whether a training-mode `loss` can leave a trainable parameter (``requires_grad``) without a gradient
        (``grad`` None, not zeros), which DDP must be told (``find_unused_parameters=True``): the camera branch
        skipped (the config's `camera_unused`, with any trainable camera parameter), or a head whose loss terms
        all have weight 0 (heatmap, regression, attribute, map focal + dice, scene). Modality dropout and paired
        passes are not: masked branches still run, multiplied by 0, and their gradients are zeros."""
        w = self.loss_weights
        camera_skipped = self._camera_hidden_by_config
        camera_trainable = any(p.requires_grad for m in (self.camera_encoder, self.view_transform) for p in m.parameters())
        unused_head = min(w.heatmap, w.regression, w.attribute, max(w.map_focal, w.map_dice), w.scene) <= 0
        return (camera_skipped and camera_trainable) or unused_head

    @property
    def map_grid(self) -> BEVGrid:
        """The grid of the map segmentation output (and of `Batch.map_masks`)."""
        return self.heads.map_segmentation.map_grid

    # ------------------------------------------------------------------------------------ pre-processing

    def preprocess_spec(self) -> PreprocessSpec:
        """The pre-processing this model takes (what an export's manifest records)."""
        enc = self.camera_encoder
        return PreprocessSpec(image_size=tuple(enc.image_size), pixel_mean=enc.pixel_mean, pixel_std=enc.pixel_std,
                              grid=self.grid, lidar=self.lidar_encoder.voxelizer, radar=self.radar_encoder.voxelizer,
                              geometry=self.view_transform.rig_geometry, rig=self.rig)

    @property
    def preprocessor(self) -> Preprocessor:
        """The model's `Preprocessor` (made again when the spec changed, e.g. a checkpoint's normalisation)."""
        spec = self.preprocess_spec()
        cached = self.__dict__.get("_preprocessor")
        if cached is None or cached.spec != spec:
            cached = Preprocessor(spec)
            self.__dict__["_preprocessor"] = cached
        return cached

    @property
    def classes(self) -> ClassList:
        """The detection class list (head order)."""
        return self.decode.classes

    def prepare(self, batch: Batch, modality_mask: Tensor | None = None) -> CoreInputs:
        """Pre-processing: a `Batch` -> `CoreInputs` on the batch's device (`Preprocessor`; in training mode the
        rig-geometry cache is skipped, augmentation makes every rig new).

        Args:
            batch: the data pipeline's batch.
            modality_mask: (B, 3) bool replacing the batch's (e.g. after modality dropout).
        """
        return self.preprocessor(batch, modality_mask, cache=not self.training)

    # -------------------------------------------------------------------------------------------- core

    def forward(self, images: Tensor, geometry: tuple[Tensor, ...], lidar: Pillars, radar: Pillars,
                modality_mask: Tensor, history: History | None = None) -> dict[str, Tensor]:
        """The core; arguments as in `CoreInputs` (``model(*inputs.as_args())``), and for a temporal model the
        `History` (None: no sample has one).

        Returns (all float32 outside autocast, on the BEV grid where spatial):
            heatmap (B, 10, H, W) logits; offset (B, 2, H, W); z (B, 1, H, W); log_size (B, 3, H, W);
            rot (B, 2, H, W) sin/cos; velocity (B, 2, H, W); attribute (B, 8, H, W) logits;
            map (B, 6, H_map, W_map) logits; scene (B, 6) logits; and, for `LiftSplat`, depth (B, N, D, h, w)
            probabilities; for a temporal model, bev (B, C, H, W): the fused BEV before temporal fusion, the next
            keyframe's ``History.prev_bev``.
        """
        camera_bev, depth, lidar_bev, radar_bev = self.encode(images, geometry, lidar, radar)
        out = self.fuse_heads(camera_bev, lidar_bev, radar_bev, modality_mask, history)
        if depth is not None:
            out["depth"] = depth
        return out

    def encode(self, images: Tensor, geometry: tuple[Tensor, ...], lidar: Pillars, radar: Pillars
               ) -> tuple[Tensor, Tensor | None, Tensor, Tensor]:
        """The three encoders (arguments as in `CoreInputs`) -> camera_bev, depth (None unless `LiftSplat`),
        lidar_bev, radar_bev: (B, C_m, H, W) BEV features on the grid, unmasked. In training, when the config hides
        the cameras from every sample and no depth is supervised (`camera_unused`: a LiDAR-only stage), the camera
        branch does not run: its BEV is zeros and its parameters get no gradient."""
        if self.camera_unused:
            h, w = self.grid.shape
            camera_bev = images.new_zeros(images.shape[0], self.view_transform.out_channels, h, w)
            return camera_bev, None, self.lidar_encoder(*lidar.as_tuple()), self.radar_encoder(*radar.as_tuple())
        camera_bev, depth = self.encode_camera(images, geometry)
        return camera_bev, depth, self.lidar_encoder(*lidar.as_tuple()), self.radar_encoder(*radar.as_tuple())

    def encode_camera(self, images: Tensor, geometry: tuple[Tensor, ...]) -> tuple[Tensor, Tensor | None]:
        """Backbone and view transform -> camera_bev (B, C, H, W), depth (None unless `LiftSplat`)."""
        return self.view_transform(self.camera_encoder(images), geometry)

    def fuse_heads(self, camera_bev: Tensor, lidar_bev: Tensor, radar_bev: Tensor, modality_mask: Tensor,
                   history: History | None = None) -> dict[str, Tensor]:
        """Fuser (under the (B, 3) bool modality mask), temporal fusion with `history` (temporal models), BEV
        decoder and heads -> the head outputs of `forward`."""
        bev = self.fuser(camera_bev, lidar_bev, radar_bev, modality_mask)
        map_extra = camera_bev * modality_mask[:, :1, None, None].to(camera_bev.dtype) if self.map_camera else None
        if self.temporal is None:
            return self.heads(self.bev_decoder(bev), map_extra)
        if history is None:
            history = History.empty(bev.shape[0], bev.shape[1], self.grid, bev.device, bev.dtype)
        out = self.heads(self.bev_decoder(self.temporal(bev, *history.as_tuple())), map_extra)
        out["bev"] = bev
        return out

    def history(self, batch: Batch, state: TemporalState | None) -> History | None:
        """The batch's `History` from `state` (None for a single-frame model or without a state)."""
        if self.temporal is None or state is None:
            return None
        return state.history(batch.meta, self.fuser.out_channels, self.grid, batch.images.device)

    def _remember(self, batch: Batch, out: dict[str, Tensor], state: TemporalState | None) -> None:
        if self.temporal is not None and state is not None:
            state.update(batch.meta, out["bev"])

    # --------------------------------------------------------------------------------------- training

    def loss(self, batch: Batch, state: TemporalState | None = None) -> dict[str, Tensor]:
        """Weighted loss terms: 0-dim float32 tensors, attached to the graph; sum them for the total. A temporal
        model reads the batch's history from `state` and leaves this batch's fused BEV in it (detached).

        Keys (a term whose weight is 0 is left out): ``heatmap`` (Gaussian focal), ``regression`` (L1 on offset,
        z, log size, sin/cos yaw, velocity at the box centres), ``attribute`` (cross-entropy), ``map_focal`` and
        ``map_dice`` (multi-label map segmentation, over the samples with `has_map`), ``scene`` (BCE on scene tags,
        over the samples with `has_scene_tags`), ``depth`` (BEVDepth-style, from
        the LiDAR points projected into the images, for samples that have both; `LiftSplat` only). Empty scenes
        and empty point clouds give finite values. In training mode, modality dropout
        (``model.fuser.modality_dropout``) is applied to the batch's modality mask first, and with
        ``model.fuser.paired_drop`` the detection, map and scene terms of each paired pass are added as
        ``heatmap_no_radar``, ``regression_no_radar``, etc.
        """
        mask = batch.modality_mask
        if self.training and max(torch.as_tensor(self.modality_dropout).reshape(-1).tolist()) > 0:
            mask = drop_modalities(mask, self.modality_dropout)
        inputs = self.prepare(batch, mask)
        history = self.history(batch, state)
        passes = self.paired_drop if self.training and self.paired_weight > 0 else ()
        paired_outs = []
        if passes:
            # One fuser/decoder/heads call over the batch repeated once per pass, each copy with its own mask.
            camera_bev, depth, lidar_bev, radar_bev = self.encode(*inputs.as_args()[:-1])
            masks = [inputs.modality_mask] + [self._paired_mask(batch.modality_mask, drop) for drop in passes]
            repeat = len(masks)
            stacked = [t.repeat(repeat, *([1] * (t.dim() - 1))) for t in (camera_bev, lidar_bev, radar_bev)]
            out_all = self.fuse_heads(*stacked, torch.cat(masks), None if history is None else history.repeat(repeat))
            outs = [{k: v.chunk(repeat)[i] for k, v in out_all.items()} for i in range(repeat)]
            out, paired_outs = outs[0], outs[1:]
            if depth is not None:
                out["depth"] = depth
        else:
            out = self(*inputs.as_args(), history)
        self._remember(batch, out, state)
        # Under autocast the head outputs are in its dtype: the losses get them upcast (they run in float32).
        out, paired_outs = _float32_outputs(out), [_float32_outputs(o) for o in paired_outs]
        targets = build_detection_targets(batch.boxes, batch.labels, batch.attributes, batch.num_boxes, self.grid,
                                          num_classes=out["heatmap"].shape[1])
        losses = self._task_losses(out, batch, targets)
        for drop, out_paired in zip(passes, paired_outs):
            suffix = "_no_" + "_".join(name for name, d in zip(MODALITIES, drop) if d)
            for key, value in self._task_losses(out_paired, batch, targets).items():
                losses[key + suffix] = self.paired_weight * value
        w = self.loss_weights
        if w.depth > 0 and isinstance(self.view_transform, LiftSplat):
            depth_bins = self.view_transform.depth_target(batch.points_lidar, batch.num_points_lidar, batch.cam2img, batch.cam2lidar)
            # Only samples whose images and LiDAR are real (the batch's own mask; dropout only hides them from the fuser).
            real = (batch.modality_mask[:, 0] & batch.modality_mask[:, 1])[:, None]  # (B, 1)
            if batch.camera_mask is not None:  # and the camera itself present
                real = real & batch.camera_mask.to(real.device)
            real = real[:, :, None, None]
            depth_bins = torch.where(real, depth_bins, torch.full_like(depth_bins, -1))
            losses["depth"] = w.depth * depth_loss(out["depth"], depth_bins)
        return losses

    @staticmethod
    def _paired_mask(modality_mask: Tensor, drop: tuple[bool, bool, bool]) -> Tensor:
        """(B, 3) bool: the batch's modalities without `drop`; a sample left with none keeps its own."""
        drop = torch.tensor(drop, dtype=torch.bool, device=modality_mask.device)
        kept = modality_mask & ~drop
        return torch.where(kept.any(1, keepdim=True), kept, modality_mask)

    def _task_losses(self, out: dict[str, Tensor], batch: Batch, targets: DetectionTargets) -> dict[str, Tensor]:
        """Detection, map and scene loss terms of one pass (`loss` documents the keys)."""
        w = self.loss_weights
        reg, attr_logits = gather_regression(out, targets.batch_index, targets.cell_index)
        losses: dict[str, Tensor] = {}
        if w.heatmap > 0:
            losses["heatmap"] = w.heatmap * gaussian_focal_loss(out["heatmap"], targets.heatmap)
        if w.regression > 0:
            losses["regression"] = w.regression * weighted_l1(reg, targets.regression, self.regression_weights)
        if w.attribute > 0:
            losses["attribute"] = w.attribute * masked_cross_entropy(attr_logits, targets.attributes)
        if (w.map_focal > 0 or w.map_dice > 0) and batch.map_masks.shape != out["map"].shape:
            raise ConfigError(
                f"model.heads.map_grid: the batch's map_masks are {tuple(batch.map_masks.shape)} but the map head "
                f"predicts {tuple(out['map'].shape)} on {self.map_grid}; rasterise the maps on the map head's grid"
            )
        # Map and scene terms only over the samples that have that ground truth (`Batch.has_map`,
        # `has_scene_tags`); with none in the batch the term is a zero that keeps the head in the graph.
        has_map = batch.has_map.to(out["map"].device)
        map_logits, map_target = out["map"][has_map], batch.map_masks[has_map]
        if w.map_focal > 0:
            losses["map_focal"] = w.map_focal * (
                sigmoid_focal_loss(map_logits, map_target, alpha=w.map_focal_alpha) if has_map.any()
                else out["map"].float().sum() * 0.0)
        if w.map_dice > 0:
            losses["map_dice"] = w.map_dice * (
                dice_loss(map_logits, map_target, empty_maps=w.map_dice_empty) if has_map.any()
                else out["map"].float().sum() * 0.0)
        if w.scene > 0:
            has_tags = batch.has_scene_tags.to(out["scene"].device)
            losses["scene"] = w.scene * (
                nn.functional.binary_cross_entropy_with_logits(out["scene"][has_tags].float(), batch.scene_tags[has_tags])
                if has_tags.any() else out["scene"].float().sum() * 0.0)
        return losses

    # -------------------------------------------------------------------------------------- inference

    @torch.no_grad()
    def predict(self, batch: Batch, state: TemporalState | None = None) -> list[Prediction]:
        """Per-sample predictions: decoded boxes (top-k, score threshold, per-class circle NMS), map and scene-tag
        probabilities. Call `eval()` first, or BatchNorm uses the batch's statistics. A temporal model reads the
        history from `state` and leaves this batch's fused BEV in it (no state: no history)."""
        out = self(*self.prepare(batch).as_args(), self.history(batch, state))
        self._remember(batch, out, state)
        return outputs_to_predictions(out, self.grid, self.decode, lidar_points_per_sample(batch))

    @torch.no_grad()
    def predict_many(self, batches: list[Batch], states: list[TemporalState | None] | None = None) -> list[list[Prediction]]:
        """`predict` of each batch, running each encoder once per distinct input: batches whose sensor inputs are
        the same tensor objects (variants made with `dataclasses.replace`, as robustness conditions are) share
        that sensor's BEV features. Gives what `predict` gives for each batch (the encoders are unmasked; the
        modality mask acts in the fuser). `states`: one `TemporalState` (or None) per batch, as for `predict`."""
        features: dict[tuple, tuple] = {}
        out = []
        # `batches` keeps every keyed tensor alive, so ids are not reused meanwhile.
        for batch, state in zip(batches, states or [None] * len(batches)):
            inputs = self.prepare(batch)
            keys = (("image", id(batch.images)),
                    ("camera", id(batch.images), id(batch.cam2img), id(batch.cam2lidar), id(batch.img_aug),
                     id(batch.camera_mask)),
                    ("lidar", id(batch.points_lidar), id(batch.num_points_lidar)),
                    ("radar", id(batch.points_radar), id(batch.num_points_radar)))
            if keys[1] not in features:  # the backbone once per image tensor, the view transform per rig and mask
                if keys[0] not in features:
                    features[keys[0]] = self.camera_encoder(inputs.images)
                features[keys[1]] = self.view_transform(features[keys[0]], inputs.geometry)
            if keys[2] not in features:
                features[keys[2]] = self.lidar_encoder(*inputs.lidar.as_tuple())
            if keys[3] not in features:
                features[keys[3]] = self.radar_encoder(*inputs.radar.as_tuple())
            camera_bev, _ = features[keys[1]]
            heads = self.fuse_heads(camera_bev, features[keys[2]], features[keys[3]], inputs.modality_mask,
                                    self.history(batch, state))
            self._remember(batch, heads, state)
            out.append(outputs_to_predictions(heads, self.grid, self.decode, lidar_points_per_sample(batch)))
        return out


def outputs_to_predictions(out: dict[str, Tensor], grid: BEVGrid, decode: DecodeSettings,
                           points_lidar: Sequence[Tensor | None] | None = None) -> list[Prediction]:
    """Post-processing shared by `BEVFusionModel.predict` and every deploy runner: the core's output tensors
    (batch first) -> one `Prediction` per sample (detections decoded by top-k and per-class NMS, map and scene
    probabilities).

    points_lidar: per sample, its (N, 5) LiDAR points (`Batch.points_lidar` layout) or None where LiDAR is missing;
        used only with `decode.lidar_velocity`, which replaces box velocities measured from them."""
    detections = decode_detections(out, grid, top_k=decode.top_k, score_threshold=decode.score_threshold,
                                   max_detections=decode.max_detections, classes=decode.classes)
    map_probs = out["map"].sigmoid()
    scene_probs = out["scene"].sigmoid()
    preds = []
    for i, d in enumerate(detections):
        boxes = d.boxes
        if decode.lidar_velocity is not None and points_lidar is not None and points_lidar[i] is not None:
            boxes = refine_velocities(boxes, d.labels, points_lidar[i], decode.lidar_velocity)
        preds.append(Prediction(boxes_lidar=Boxes3D(boxes), scores=d.scores, labels=d.labels,
                                attributes=d.attributes, map_probs=map_probs[i], scene_probs=scene_probs[i]))
    return preds


def lidar_points_per_sample(batch: Batch) -> list[Tensor | None]:
    """Each sample's LiDAR points, None where the modality mask says LiDAR is missing."""
    present = batch.modality_mask[:, 1].tolist()
    return [p if ok else None for p, ok in zip(batch.split_points("points_lidar"), present)]


def _float32_outputs(out: dict[str, Tensor]) -> dict[str, Tensor]:
    """Head outputs with float16 / bfloat16 tensors upcast to float32 (others as they are)."""
    return {k: v.float() if v.dtype in (torch.float16, torch.bfloat16) else v for k, v in out.items()}
