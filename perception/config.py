"""Typed, frozen experiment configuration, loaded from YAML with dotted ``key=value`` overrides.

Every section is a pydantic v2 model with ``extra="forbid"``: an unknown or mistyped key fails at load time
with a `ConfigError` naming the key's dotted path (``model.camera.backbone``). Derived values are computed
once here (`GridConfig.build` gives the one `BEVGrid` that the voxelisers, view transform and heads share).

Example::

    cfg = load_config("configs/tiny.yaml", ["model.camera.freeze_blocks=2", "train.lr=1e-4"])
    grid = cfg.grid.build()
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Sequence, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from perception.classes import NUSCENES, ClassList, DetectionClass, class_list
from perception.errors import ConfigError
from perception.rig import NUSCENES as NUSCENES_RIG, CameraSpec, Rig
from perception.structures import BEVGrid


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataConfig(_Section):
    """What the data pipeline feeds the model."""

    image_size: tuple[int, int] = Field((128, 352), description="(H, W) of the augmented camera images, pixels: "
                                        "multiples of the camera backbone's patch size (16; 14 for DINOv2), checked "
                                        "when the model is built.")
    lidar_sweeps: int = Field(9, ge=0, le=9, description="LiDAR sweeps before each keyframe that are merged in.")
    radar_sweeps: int = Field(6, ge=0, le=6, description="Radar sweeps before each keyframe that are merged in.")
    resize_lim: tuple[float, float] = Field((0.94, 1.1), description="Training image resize range, relative to the scale that fits the camera width to image_size (evaluation: the middle).")
    bot_pct_lim: tuple[float, float] = Field((0.0, 0.0), description="Fraction of the resized image height cut from the bottom (range).")
    rot_lim_deg: tuple[float, float] = Field((-5.4, 5.4), description="Training image rotation range, degrees.")
    image_flip: bool = Field(True, description="Random horizontal image flips in training.")
    bev_aug: bool = Field(True, description="Global BEV augmentation (rotation, scale, flips, translation) in training.")
    bev_rot_lim_deg: tuple[float, float] = (-22.5, 22.5)
    bev_scale_lim: tuple[float, float] = (0.9, 1.1)
    bev_flip_prob: float = Field(0.5, ge=0.0, le=1.0, description="Probability of each of the x and y BEV flips.")
    bev_trans_std: tuple[float, float, float] = (0.0, 0.0, 0.0)
    skip_bad_samples: bool = Field(False, description="Log, count and skip unreadable samples instead of failing.")
    map: Literal["auto", "on", "off"] = Field(
        "auto", description="Map segmentation ground truth from the map expansion (maps/expansion/<location>.json): "
                            "auto: where the location's file exists (other samples train and score no map), on: "
                            "required (a missing file is an error before training starts), off: never.")
    map_cache: bool = Field(True, description="Training map targets from each location's raster, built once into the "
                            "cache ($PERCEPTION_CACHE/map_raster) at 1/4 of a BEV cell, instead of exact polygon "
                            "rendering per sample (about 20x faster; evaluation targets are always exact).")

    @model_validator(mode="after")
    def _check_image_size(self) -> "DataConfig":
        h, w = self.image_size
        if h <= 0 or w <= 0:
            raise ValueError(f"image_size {self.image_size} must be positive (H, W)")
        return self


class GridConfig(_Section):
    """The BEV grid in the LIDAR_TOP frame (metres); see `perception.structures.BEVGrid`."""

    # Defaults are BEVGrid's own, so the default grid is written in one place.
    x_min: float = BEVGrid.x_min
    x_max: float = BEVGrid.x_max
    y_min: float = BEVGrid.y_min
    y_max: float = BEVGrid.y_max
    z_min: float = BEVGrid.z_min
    z_max: float = BEVGrid.z_max
    cell: float = BEVGrid.cell

    def build(self, path: str = "grid", *, even: bool = True) -> BEVGrid:
        """The `BEVGrid` of this section (``grid``: the one BEV grid of the experiment).

        Args:
            path: the section's dotted config path, for error messages.
            even: require an even number of rows and columns (the BEV decoder's stride-2 stage needs it).

        Raises `ConfigError` naming `path` if the grid is inconsistent.
        """
        try:
            grid = BEVGrid(**self.model_dump())
        except ValueError as exc:
            raise ConfigError(f"{path}: {exc}") from exc
        if even and (grid.height % 2 or grid.width % 2):
            raise ConfigError(f"{path}: the BEV decoder needs an even number of rows and columns, got {grid.shape}")
        return grid


class CameraConfig(_Section):
    """The timm ViT camera backbone with a ViTDet-style simple feature pyramid."""

    backbone: str = Field("vit_tiny_patch16_224", description="timm model name of a plain ViT (square patches: "
                          "16, or 14 for vit_small_patch14_dinov2).")
    blocks: Optional[int] = Field(None, ge=1, description="Number of transformer blocks (None: timm's default).")
    pretrained: Optional[str] = Field(
        None, description="Initial backbone weights: a registered name (dinov2-small; fetched into $PERCEPTION_CACHE "
                          "on first use, see `perception weights list`), timm:<model name> (timm's hub download), or "
                          "a local timm/Hugging Face checkpoint (.pth, .bin, .safetensors, or a folder). Resolved "
                          "when the model is built (perception.model.weights.resolve_pretrained).")
    out_channels: int = Field(64, ge=1, description="Channels of the feature map (at the patch stride) given to the view transform.")
    feature_upsample: Literal[1, 2] = Field(1, description="The feature pyramid's output at the patch stride (1) or at "
                                            "half of it (2: stride 8, or 7 for patch 14; 4x the pixels the view "
                                            "transform lifts).")
    drop_path_rate: float = Field(0.0, ge=0.0, lt=1.0)
    freeze_blocks: int = Field(0, ge=0, description="Freeze the patch embedding and the first N blocks.")
    grad_checkpointing: bool = False

    @field_validator("pretrained", mode="before")
    @classmethod
    def _pretrained_text(cls, value: Any) -> Any:
        if isinstance(value, os.PathLike):
            return os.fspath(value)
        if isinstance(value, str):
            if not value.strip():
                raise ValueError("is empty: give null, a registered name, timm:<model name> or a path")
            if value.strip() == "timm:":
                raise ValueError("timm: needs a model name (timm:vit_small_patch14_dinov2.lvd142m)")
        return value


class LiftSplatConfig(_Section):
    """Lift-splat-shoot: per-pixel depth distribution times context, pooled into the BEV grid."""

    kind: Literal["lift_splat"] = "lift_splat"
    depth_min: float = Field(1.0, gt=0.0, description="Centre of the first depth bin, metres along the optical axis.")
    depth_max: float = Field(60.0, gt=0.0, description="Depth bins cover [depth_min, depth_max).")
    depth_step: float = Field(1.0, gt=0.0)
    out_channels: int = Field(64, ge=1, description="Context channels splatted into the BEV grid.")

    @property
    def num_depth_bins(self) -> int:
        return int(round((self.depth_max - self.depth_min) / self.depth_step))

    @model_validator(mode="after")
    def _check_bins(self) -> "LiftSplatConfig":
        if self.num_depth_bins < 2:
            raise ValueError("depth_max - depth_min must hold at least 2 depth_step bins")
        return self


class BEVSampleConfig(_Section):
    """Simple-BEV: bilinear sampling of image features at projections of BEV voxel centres."""

    kind: Literal["bev_sample"] = "bev_sample"
    z_levels: int = Field(8, ge=1, description="Voxel layers between grid.z_min and grid.z_max.")
    out_channels: int = Field(64, ge=1)


ViewTransformConfig = Annotated[Union[LiftSplatConfig, BEVSampleConfig], Field(discriminator="kind")]


class PillarConfig(_Section):
    """A PointPillars-style encoder (LiDAR or radar) on the experiment's BEV grid."""

    max_points_per_pillar: int = Field(20, ge=1)
    max_pillars: int = Field(30000, ge=1, description="Per sample; extra pillars are dropped. Finer pillars "
                             "(pillar_stride > 1) need more: up to pillar_stride**2 as many non-empty ones.")
    pfn_channels: int = Field(64, ge=1, description="Pillar feature net output channels.")
    out_channels: int = Field(64, ge=1, description="Channels after the small 2D BEV backbone.")
    backbone_layers: int = Field(2, ge=0, description="3x3 conv layers of the small 2D backbone.")
    keyframe_pool: bool = Field(False, description="LiDAR only: max-pool each pillar's keyframe-sweep points "
                                "separately too (2 x pfn_channels into the BEV), so a moving object's current "
                                "position is not blurred with its past sweeps.")
    pillar_stride: int = Field(1, ge=1, description="LiDAR only: pillars are (grid.cell / pillar_stride) metres on "
                               "a side over the grid's extent; the encoder's 2D backbone starts with a stride-"
                               "pillar_stride conv back to the BEV grid. 1: the pillars are the BEV cells.")


class FuserConfig(_Section):
    out_channels: int = Field(64, ge=1)
    modality_dropout: Union[float, tuple[float, float, float]] = Field(
        0.0, description="Per-sample drop probability in `loss()`: one for every modality, or (camera, lidar, radar); at "
                         "least one modality is kept. 1.0 always hides that modality from the fuser (the camera-only "
                         "recipe: LiDAR is still read for depth supervision).")

    paired_drop: tuple[tuple[Literal["camera", "lidar", "radar"], ...], ...] = Field(
        (), description="Paired passes in `loss()`, one per listed set of modalities (e.g. [[radar], [lidar]]): "
                        "the same encoded batch goes through fuser, decoder and heads again without those "
                        "modalities (the encoders run once), and each pass's detection, map and scene losses are "
                        "added with weight `paired_weight`. A sample that would be left with no modality keeps "
                        "its own.")
    paired_weight: float = Field(1.0, ge=0.0)

    @model_validator(mode="after")
    def _check_dropout(self) -> "FuserConfig":
        probs = self.modality_dropout if isinstance(self.modality_dropout, tuple) else (self.modality_dropout,)
        if not all(0.0 <= p <= 1.0 for p in probs) or (len(probs) == 1 and probs[0] == 1.0) or min(probs) == 1.0:
            raise ValueError(f"modality_dropout {self.modality_dropout}: each must be in [0, 1], and not every one 1")
        for names in self.paired_drop:
            if len(set(names)) != len(names) or not 1 <= len(names) <= 2:
                raise ValueError(f"paired_drop: each pass must drop one or two different modalities, not {list(names)}")
        if len(set(frozenset(n) for n in self.paired_drop)) != len(self.paired_drop):
            raise ValueError(f"paired_drop: {[list(n) for n in self.paired_drop]} lists a pass twice")
        return self


class DecoderConfig(_Section):
    """SECOND-style two-stage 2D backbone plus FPN neck, back at the BEV grid's resolution."""

    channels: tuple[int, int] = (64, 128)
    layers: tuple[int, int] = (2, 2)
    out_channels: int = Field(128, ge=1)
    position_channels: bool = Field(False, description="Append each BEV cell's grid position (two channels, "
                                    "[-1, 1]) to the decoder's input (`BEVDecoder`).")


class HeadsConfig(_Section):
    det_channels: int = Field(64, ge=1)
    map_channels: int = Field(64, ge=1)
    scene_channels: int = Field(64, ge=1)
    top_k: int = Field(100, ge=1, description="Peaks kept per sample before NMS.")
    score_threshold: float = Field(0.1, ge=0.0, le=1.0)
    max_detections: int = Field(100, ge=1, description="Boxes kept per sample after NMS.")
    map_camera: bool = Field(False, description="Also give the map head the camera BEV features (masked like the "
                             "fuser's input) next to the decoder's output: the painted classes only a camera sees "
                             "reach the map head without passing the fuser and decoder.")
    lidar_velocity: bool = Field(False, description="Replace box velocities by ones measured from the motion blur "
                                 "of the LiDAR sweeps (`perception.model.lidar_velocity`), where LiDAR is present.")
    map_grid: Optional[GridConfig] = Field(
        None, description="Grid of the map segmentation output, bilinearly sampled from the BEV features (None: "
                          "the BEV grid). The data pipeline must rasterise `map_masks` on the same grid.")


class TemporalConfig(_Section):
    """Temporal BEV fusion: the previous keyframe's fused BEV, warped into the current frame by the ego motion,
    fused with the current one (`fusion.temporal.TemporalFuser`). Trained on consecutive keyframes of each scene
    (`SequenceSampler`), evaluated scene by scene with the history as state."""

    frames: int = Field(0, ge=0, le=1, description="Past keyframes fused: 0 (off: the single-frame model) or 1.")
    kind: Literal["concat"] = Field("concat", description="concat: [current, warped previous, valid mask] -> 3x3 conv "
                                                          "block, added to the current BEV.")


class ModelConfig(_Section):
    camera: CameraConfig = CameraConfig()
    view_transform: ViewTransformConfig = LiftSplatConfig()
    lidar: PillarConfig = PillarConfig()
    radar: PillarConfig = PillarConfig(max_points_per_pillar=8, max_pillars=4000, pfn_channels=32, out_channels=32, backbone_layers=1)
    fuser: FuserConfig = FuserConfig()
    decoder: DecoderConfig = DecoderConfig()
    heads: HeadsConfig = HeadsConfig()
    temporal: TemporalConfig = TemporalConfig()


class LossConfig(_Section):
    """Loss weights; 0 turns a term off (it is then not computed)."""

    heatmap: float = Field(1.0, ge=0.0)
    regression: float = Field(0.25, ge=0.0)
    velocity: float = Field(0.2, ge=0.0, description="Weight of the two velocity columns inside the regression L1, "
                            "relative to 1 for the box geometry (CenterPoint's code_weights).")
    attribute: float = Field(0.2, ge=0.0)
    map_focal: float = Field(1.0, ge=0.0)
    map_focal_alpha: Optional[float] = Field(
        0.25, gt=0.0, lt=1.0, description="Class-balance weight of the map focal term: positive cells weigh alpha, "
        "negative ones 1 - alpha (RetinaNet's 0.25); null weighs both 1, as BEVFusion's map head does.")
    map_dice: float = Field(1.0, ge=0.0)
    map_dice_empty: bool = Field(True, description="Average the map Dice term over every (sample, class) map (true) "
                                 "or only over the maps with target cells (false: an empty map is left to the focal "
                                 "term, so a class that most samples lack is not pushed to zero everywhere).")
    scene: float = Field(0.2, ge=0.0)
    depth: float = Field(0.0, ge=0.0, description="BEVDepth-style depth supervision from LiDAR (lift_splat only).")


class TrainConfig(_Section):
    """Optimisation settings (used by the trainer)."""

    lr: float = Field(2e-4, gt=0.0)
    weight_decay: float = Field(0.01, ge=0.0)
    layer_decay: float = Field(0.75, gt=0.0, le=1.0, description="Layer-wise lr decay over the pretrained blocks of "
                               "the camera backbone (a backbone from random weights, and every new layer, learns at "
                               "train.lr).")
    batch_size: int = Field(4, ge=1)
    max_steps: int = Field(20000, ge=1, description="Optimizer steps of the run, unless train.epochs is set.")
    epochs: Optional[int] = Field(None, ge=1, description="Length of the run in epochs (one pass over the training "
                                  "split, or over its class-balanced expansion with train.cbgs); replaces max_steps "
                                  "when set. --epochs / --max-steps on the command line override both.")
    lr_batch: Optional[int] = Field(None, ge=1, description="The global batch (batch_size x ranks x accumulate_steps) "
                                    "that lr and warmup_steps are given for. Set, the run uses lr x global batch / "
                                    "lr_batch (the linear scaling rule) and warmup_steps x lr_batch / global batch "
                                    "steps of warm-up, so one GPU and eight see the same schedule per sample. null: "
                                    "lr and warmup_steps as given, whatever the global batch.")
    warmup_steps: int = Field(500, ge=0)
    grad_clip: float = Field(35.0, gt=0.0)
    seed: int = 0
    accumulate_steps: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    amp: Union[Literal["auto"], bool] = Field(
        "auto", description="Mixed precision (autocast; losses and BEV pooling stay float32). auto: on for CUDA, off "
                            "elsewhere. On CUDA bf16 where supported, else fp16 with loss scaling; true on CPU runs bf16.")
    ema_decay: float = Field(0.0, ge=0.0, lt=1.0, description="EMA of the weights (0: off); evaluation uses the EMA.")
    checkpoint_every: int = Field(500, ge=1, description="Steps between checkpoints (last.pt and step_N.pt).")
    keep_checkpoints: int = Field(3, ge=0, description="How many of the newest step_N.pt are kept (older ones are "
                                  "deleted after each checkpoint); last.pt and best.pt are always kept; 0 keeps no "
                                  "step_N.pt.")
    max_bad_steps: int = Field(20, ge=1, description="Consecutive bad steps (a non-finite loss or gradient norm on "
                               "any rank: the optimizer step is skipped on every rank) that stop the run with an "
                               "error, after last.pt is written.")
    val_every: int = Field(0, ge=0, description="Steps between validations on the val split, plus one at the end (0: none).")
    val_every_epochs: Optional[int] = Field(None, ge=1, description="Epochs between validations on the val split "
                                            "(instead of train.val_every), plus one at the end.")
    dist_timeout_min: float = Field(60.0, gt=0.0, description="DDP: how long a rank waits for the others in a collective, minutes (must outlast rank 0's evaluation of the val split).")
    sync_bn: bool = Field(False, description="DDP with more than one rank: the BEV modules' BatchNorm (every part but "
                          "the camera backbone) becomes SyncBatchNorm, statistics over the global batch. CUDA (NCCL) "
                          "only; ignored in one process.")
    log_every: int = Field(10, ge=1)
    num_workers: int = Field(2, ge=0, description="DataLoader worker processes per rank.")
    deterministic: bool = Field(False, description="torch.use_deterministic_algorithms (exact resume on CPU).")
    gt_sampling: bool = Field(False, description="Paste ground-truth objects' LiDAR points from a train-split database.")
    gt_sampling_stop_epoch: Optional[int] = Field(
        None, ge=0, description="With gt_sampling: no pasting from this (0-based) epoch on, as BEVFusion's "
                                "gt_paste_stop_epoch (null: paste until the end).")
    cbgs: bool = Field(False, description="Class-balanced grouping and sampling (CBGS, as mmdet3d's CBGSDataset): each "
                                          "class's samples repeated toward balance; an epoch is one pass over the "
                                          "expanded list (`perception.data.loader.CBGSSampler`). Not with "
                                          "model.temporal.frames.")

    @model_validator(mode="after")
    def _check_validation_interval(self) -> "TrainConfig":
        if self.val_every and self.val_every_epochs:
            raise ValueError("set train.val_every (steps) or train.val_every_epochs, not both")
        return self


class ClassConfig(_Section):
    """One detection class of a user's list (`perception.classes.DetectionClass` documents each field)."""

    name: str = Field(min_length=1)
    categories: tuple[str, ...] = Field(min_length=1, description="Dataset category names that become this class, "
                                        "full (vehicle.car) or bare (car).")
    eval_range_m: float = Field(50.0, gt=0)
    nms_radius_m: float = Field(1.0, gt=0)
    tracking_distance_m: Optional[float] = Field(None, gt=0, description="None: the class is not tracked.")
    score_velocity: bool = True
    score_orientation: bool = True
    orientation_period_deg: float = Field(360.0, gt=0, le=360, description="180 for a class whose front is undefined.")
    paste: int = Field(0, ge=0, description="GT-sampling target per sample (0: never pasted).")
    attributes: tuple[str, ...] = ()
    dropped_in_exclusion_boxes: bool = False


class ClassesConfig(_Section):
    """The detection classes: ``preset: nuscenes`` (the devkit's 10 classes and 8 attributes, the default), or
    ``preset: null`` with ``list`` (and optional ``attributes``). `build` gives the one `ClassList` that the
    dataset, heads, decoding, evaluation, tracking and GT sampling share."""

    preset: Optional[Literal["nuscenes"]] = "nuscenes"
    attributes: tuple[str, ...] = ()
    list: tuple[ClassConfig, ...] = ()

    @model_validator(mode="after")
    def _check(self) -> "ClassesConfig":
        if self.preset is not None and (self.list or self.attributes):
            raise ValueError("set classes.preset or classes.list (with classes.preset: null), not both")
        if self.preset is None and not self.list:
            raise ValueError("classes.preset is null: classes.list must name at least one class")
        if self.preset is None:
            try:
                self.build()  # duplicate names, categories of two classes, unknown attributes
            except ConfigError as exc:
                raise ValueError(str(exc)) from None
        return self

    def build(self) -> ClassList:
        if self.preset == "nuscenes":
            return NUSCENES
        return class_list([DetectionClass(
            name=c.name, categories=c.categories, eval_range_m=c.eval_range_m, nms_radius_m=c.nms_radius_m,
            tracking_distance_m=c.tracking_distance_m, score_velocity=c.score_velocity, paste=c.paste,
            attributes=c.attributes, score_orientation=c.score_orientation,
            orientation_period_rad=math.radians(c.orientation_period_deg),
            dropped_in_exclusion_boxes=c.dropped_in_exclusion_boxes) for c in self.list], self.attributes)


class RigCameraConfig(_Section):
    """One camera of a user's rig."""

    name: str = Field(min_length=1)
    width: int = Field(gt=0, description="Recorded image width, pixels.")
    height: int = Field(gt=0, description="Recorded image height, pixels.")


class RigConfig(_Section):
    """The sensors: ``preset: nuscenes`` (six cameras, LIDAR_TOP, five radars; the default), or ``preset: null``
    with ``cameras`` (in tensor and export order), ``lidars`` (the first is the reference frame) and ``radars``
    (empty: no radar). `build` gives the one `Rig` the dataset, model export and runners share."""

    preset: Optional[Literal["nuscenes"]] = "nuscenes"
    cameras: tuple[RigCameraConfig, ...] = ()
    lidars: tuple[str, ...] = ()
    radars: tuple[str, ...] = ()

    @model_validator(mode="after")
    def _check(self) -> "RigConfig":
        if self.preset is not None and (self.cameras or self.lidars or self.radars):
            raise ValueError("set rig.preset or the rig's sensors (with rig.preset: null), not both")
        if self.preset is None:
            if not self.lidars:
                raise ValueError("rig.preset is null: rig.lidars must name the reference LiDAR")
            try:
                self.build()
            except ConfigError as exc:
                raise ValueError(str(exc)) from None
        return self

    def build(self) -> Rig:
        if self.preset == "nuscenes":
            return NUSCENES_RIG
        return Rig(cameras=tuple(CameraSpec(c.name, c.width, c.height) for c in self.cameras), lidars=self.lidars,
                   radars=self.radars)


class ExperimentConfig(_Section):
    data: DataConfig = DataConfig()
    rig: RigConfig = RigConfig()
    classes: ClassesConfig = ClassesConfig()
    grid: GridConfig = GridConfig()
    model: ModelConfig = ModelConfig()
    loss: LossConfig = LossConfig()
    train: TrainConfig = TrainConfig()

    @model_validator(mode="after")
    def _check_cross_section(self) -> "ExperimentConfig":
        if self.loss.depth > 0 and not isinstance(self.model.view_transform, LiftSplatConfig):
            raise ValueError("loss.depth > 0 needs model.view_transform.kind=lift_splat (bev_sample predicts no depth)")
        if self.train.cbgs and self.model.temporal.frames:
            raise ValueError("train.cbgs cannot be combined with model.temporal.frames > 0: temporal training streams "
                             "each scene's keyframes in time order (SequenceSampler), CBGS repeats and reorders "
                             "samples; set train.cbgs=false or model.temporal.frames=0")
        return self


def _set_dotted(raw: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node: Any = raw
    for i, key in enumerate(keys[:-1]):
        if not isinstance(node, dict):
            raise ConfigError(f"{'.'.join(keys[:i])}: is not a section, cannot set {dotted}")
        node = node.setdefault(key, {})
    if not isinstance(node, dict):
        raise ConfigError(f"{'.'.join(keys[:-1])}: is not a section, cannot set {dotted}")
    node[keys[-1]] = value


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """A copy of `raw` with each ``a.b.c=value`` applied; values are parsed as YAML (``1e-4``, ``[1, 2]``, ``null``)."""
    out = yaml.safe_load(yaml.safe_dump(raw)) or {}
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected KEY.PATH=VALUE")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{key}: cannot parse value {text!r}: {exc}") from exc
        _set_dotted(out, key, value)
    return out


def _error_path(loc: tuple[Any, ...], raw: Any) -> str:
    """Dotted key path for a pydantic error location, without the union tags pydantic inserts."""
    parts: list[str] = []
    node = raw
    for item in loc:
        if isinstance(node, dict) and item not in node and node.get("kind") == item:
            continue  # discriminated-union tag, not a key
        parts.append(str(item))
        node = node.get(item) if isinstance(node, dict) else None
    return ".".join(parts) or "<root>"


def config_from_dict(raw: dict[str, Any], source: str = "config") -> ExperimentConfig:
    """Validate a plain dict. Raises `ConfigError` naming every bad key path."""
    try:
        return ExperimentConfig.model_validate(raw)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            path = _error_path(tuple(err["loc"]), raw)
            got = f" (got {err['input']!r})" if err["type"] != "missing" and not isinstance(err.get("input"), dict) else ""
            lines.append(f"{path}: {err['msg']}{got}")
        raise ConfigError(f"{source}: " + "; ".join(lines)) from None


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """Load a YAML config file and apply dotted overrides."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    return config_from_dict(apply_overrides(raw, overrides), source=str(path))
