"""`perception export`: the model's core (`deploy.core.ExportedCore`: `BEVFusionModel.forward` itself) as ONNX,
and its ``manifest.json``.

An export directory holds:

  - ``core.onnx``: the whole core as one graph (opset >= 17, standard ONNX operators only; checked against
    TensorRT 10's ONNX parser by `deploy.trt_compat` at export time);
  - ``core.int8.onnx`` with ``--int8``: the same graph with INT8 Q/DQ nodes (`deploy.quantize`);
  - ``manifest.json``: the graphs, every input and output (name, dtype, shape with named dynamic axes,
    meaning), the dynamic axes' min/opt/max (TensorRT optimisation profiles), the pre- and post-processing
    settings (`perception.model.preprocess.PreprocessSpec`, `deploy.postprocess.PostprocessSpec`), the BEV and map grids,
    the class lists and the experiment config;
  - ``stages/*.onnx`` when asked for (`export_stage_graphs`): one graph per stage, for per-stage latency.

`Manifest` reads it back; every runtime builds its `Preprocessor` and `Postprocessor` from it.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import onnxruntime as ort
import torch
from torch import Tensor

from deploy.core import ExportedCore, history_feeds, stages
from deploy.manifest import CORE_GRAPH, MANIFEST_NAME, Manifest, TensorSpec  # noqa: F401 (re-exported)
from deploy.postprocess import PostprocessSpec
from deploy.quantize import quantize_export
from deploy.trt_compat import check_onnx
from perception.checkpoint import model_from_checkpoint
from perception.config import ExperimentConfig
from perception.data.batch import Batch
from perception.data.build import build_dataset, default_splits
from perception.data.collate import collate_samples
from perception.errors import PerceptionError
from perception.model.bevfusion import BEVFusionModel
from perception.model.preprocess import PreprocessSpec
from perception.model.synthetic import make_synthetic_batch
from perception.model.temporal import TemporalState

log = logging.getLogger(__name__)

DEFAULT_OPSET = 17

_DESCRIPTIONS = {
    "images": "normalised camera images (see preprocessing.normalization)",
    "pool_segments": "lift-splat pooling plan: frustum-volume rows per segment, B*P = zero row (fusion.bev_pool.PoolingPlan)",
    "pool_merges": "lift-splat pooling plan: segment rows per multi-segment cell, S = zero row",
    "pool_cells": "lift-splat pooling plan: table row of each BEV cell, S + M = empty",
    "lidar2img": "LIDAR_TOP -> augmented pixels, homogeneous (cam2img @ inverse(cam2lidar))",
    "features": "padded pillar points: selected columns, offsets to the pillar's point mean (3) and centre (2)",
    "point_mask": "1 for real points of a pillar, 0 for padding",
    "bev_index": "row of each pillar-grid cell's pillar (the BEV cells, or finer ones with pillar_stride), P = no pillar",
    "modality_mask": "camera, lidar, radar present",
    "heatmap": "class heatmap logits on the BEV grid (row along +y, column along +x)",
    "offset": "sub-cell centre offset (dx, dy), cells", "z": "box centre z, m", "log_size": "log(w, l, h), m",
    "rot": "(sin yaw, cos yaw)", "velocity": "(vx, vy), m/s", "attribute": "attribute logits",
    "map": "map segmentation logits on the map grid", "scene": "scene-tag logits",
    "prev_bev": "the previous keyframe's `bev` output (zeros without history)",
    "curr2prev": "current -> previous keyframe's LIDAR_TOP frame, after each one's BEV augmentation (identity without history)",
    "has_history": "the previous keyframe's `bev` is given",
    "bev": "fused BEV features before temporal fusion: the next keyframe's prev_bev",
}


def _numpy_dtype(t: Tensor) -> str:
    return str(t.detach().cpu().numpy().dtype)


def _axes_of(name: str) -> dict[int, str]:
    """Named dynamic axes of a core input or output."""
    if name == "pool_segments":
        return {0: "pool_segments"}
    if name in ("depth", "context"):  # per-camera stage outputs (B*N, ...)
        return {0: "batch_cameras"}
    if name == "pool_merges":
        return {0: "pool_merged_cells", 1: "pool_merge_width"}
    for sensor in ("lidar", "radar"):
        if name in (f"{sensor}_features", f"{sensor}_point_mask"):
            return {0: f"{sensor}_pillars"}
    return {0: "batch"}


def _dynamic_ranges(feeds: dict[str, Tensor], spec: PreprocessSpec, max_batch: int) -> dict[str, dict[str, int]]:
    """min / opt / max of every dynamic axis for TensorRT profiles, from the example's sizes.

    Pillar counts go up to the voxelisers' caps; the pooling plan's sizes depend on the rig only, so their
    maxima are the example's (a batch-1 rig) times the batch and a margin of 2 for other calibrations.
    """
    b = int(feeds["images"].shape[0])
    ranges: dict[str, dict[str, int]] = {"batch": {"min": 1, "opt": 1, "max": max_batch}}
    for sensor, pillars in (("lidar", spec.lidar), ("radar", spec.radar)):
        n = int(feeds[f"{sensor}_features"].shape[0])
        ranges[f"{sensor}_pillars"] = {"min": 1, "opt": max(1, min(n // b, pillars.max_pillars)),
                                       "max": pillars.max_pillars * max_batch}
    if "pool_segments" in feeds:
        s, (m, k2) = int(feeds["pool_segments"].shape[0]), feeds["pool_merges"].shape
        ranges["pool_segments"] = {"min": 1, "opt": math.ceil(s / b), "max": 2 * math.ceil(s / b) * max_batch}
        ranges["pool_merged_cells"] = {"min": 1, "opt": math.ceil(int(m) / b), "max": 2 * math.ceil(int(m) / b) * max_batch}
        ranges["pool_merge_width"] = {"min": 1, "opt": int(k2), "max": 2 * int(k2)}
    return ranges


def example_batch(model: BEVFusionModel, batch_size: int = 1, seed: int = 0) -> Batch:
    """A synthetic batch with a surround rig of the model's camera count (`perception.model.synthetic`) at the
    model's image size."""
    return make_synthetic_batch(batch_size=batch_size, image_size=model.camera_encoder.image_size, grid=model.grid,
                                boxes_per_sample=8, background_points=30000, seed=seed,
                                num_cameras=len(model.rig.cameras))


def export_onnx(module: torch.nn.Module, args: Sequence[Tensor], path: Path, input_names: Sequence[str],
                output_names: Sequence[str], opset: int = DEFAULT_OPSET) -> Path:
    """TorchScript-based ONNX export of a core module with the named dynamic axes of `_axes_of`."""
    axes = {n: _axes_of(n) for n in (*input_names, *output_names)}
    torch.onnx.export(module, tuple(args), str(path), opset_version=opset, dynamo=False, input_names=list(input_names),
                      output_names=list(output_names), dynamic_axes=axes, do_constant_folding=True)
    return path


def export_model(model: BEVFusionModel, config: ExperimentConfig | dict[str, Any], out_dir: str | Path, *,
                 example: Batch | None = None, opset: int = DEFAULT_OPSET, max_batch: int = 4,
                 source: dict[str, Any] | None = None) -> Manifest:
    """Export `model`'s plugin-free core to ``out_dir/core.onnx`` and write ``out_dir/manifest.json``.

    Args:
        model: the model (its weights; the export runs in eval mode and restores the mode).
        config: the experiment config the model was built from (recorded for evaluation).
        example: a batch that fixes the static shapes (default: `example_batch`).
        opset: ONNX opset (>= 17).
        max_batch: largest batch of the TensorRT profiles the manifest records.
        source: provenance recorded in the manifest (checkpoint path, step).

    Returns: the written `Manifest`. Raises `PerceptionError` if the graph fails the TensorRT check.
    """
    if opset < 17:
        raise PerceptionError(f"opset {opset}: the export needs opset 17 or later")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg_json = config.model_dump(mode="json") if isinstance(config, ExperimentConfig) else dict(config)
    was_training = model.training
    model.eval()
    try:
        spec = model.preprocess_spec()
        feeds = model.prepare(example if example is not None else example_batch(model)).named()
        core = ExportedCore(model).eval()
        feeds.update(core.empty_history(int(feeds["images"].shape[0]), feeds["images"].device))
        with torch.no_grad():
            outputs = dict(zip(core.output_names, core(*feeds.values())))
        export_onnx(core, tuple(feeds.values()), out_dir / CORE_GRAPH, tuple(feeds), core.output_names, opset)
    finally:
        model.train(was_training)

    report = check_onnx(out_dir / CORE_GRAPH)
    if not report.ok:
        raise PerceptionError(f"{out_dir / CORE_GRAPH}: not parseable by TensorRT without plugins:\n{report.format()}")

    def tensor_specs(values: dict[str, Tensor]) -> list[TensorSpec]:
        specs = []
        for name, t in values.items():
            axes = _axes_of(name)
            shape = tuple(axes.get(i, int(d)) for i, d in enumerate(t.shape))
            key = name.split("_", 1)[1] if name.startswith(("lidar_", "radar_")) else name
            specs.append(TensorSpec(name, _numpy_dtype(t), shape, _DESCRIPTIONS.get(key, "")))
        return specs

    manifest = Manifest(
        graphs={"fp32": CORE_GRAPH}, opset=opset, inputs=tensor_specs(feeds), outputs=tensor_specs(outputs),
        dynamic_axes=_dynamic_ranges(feeds, spec, max_batch), preprocessing=spec,
        postprocessing=PostprocessSpec(grid=model.grid, decode=model.decode), map_grid=model.map_grid,
        config=cfg_json, source=dict(source or {}), compatibility={"fp32": report.summary()},
    )
    manifest.write(out_dir)
    log.info("exported %s (%d inputs, %d outputs, opset %d) and %s", out_dir / CORE_GRAPH, len(manifest.inputs),
             len(manifest.outputs), opset, MANIFEST_NAME)
    return manifest


def export_stage_graphs(model: BEVFusionModel, feeds: dict[str, Tensor], out_dir: str | Path,
                        opset: int = DEFAULT_OPSET) -> dict[str, Path]:
    """One ONNX graph per stage of the core (`deploy.core.stages`: camera, bev_pooling, lidar, radar, fuse_heads) in ``out_dir``,
    traced with the intermediate tensors of `feeds` (the core's inputs). Returns {stage: path}."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.eval()
    values = dict(feeds)
    paths = {}
    with torch.no_grad():
        for stage in stages(model):
            args = tuple(values[n] for n in stage.inputs)
            out = stage.module(*args)
            values.update(zip(stage.outputs, out if isinstance(out, tuple) else (out,)))
            paths[stage.name] = export_onnx(stage.module, args, out_dir / f"{stage.name}.onnx", stage.inputs, stage.outputs, opset)
    return paths


# -------------------------------------------------------------------------------------- checkpoints


def load_checkpoint_model(checkpoint: str | Path, image_size: tuple[int, int] | None = None
                          ) -> tuple[BEVFusionModel, ExperimentConfig, dict[str, Any]]:
    """A training checkpoint's model (EMA weights when present, CPU, eval mode) and config; `image_size` (H, W)
    rebuilds the model for another image size (position embeddings resampled). Returns (model, config,
    provenance); see `perception.checkpoint.model_from_checkpoint`."""
    loaded = model_from_checkpoint(checkpoint, image_size=image_size)
    return loaded.model, loaded.config, loaded.source


# Head-room of the TensorRT profile maxima over the largest pooling plan seen on real samples: the plan's
# sizes move with the ego's pitch and the calibration from sample to sample.
PROFILE_MARGIN = 1.25


def cover_feeds(manifest: Manifest, feeds: Sequence[dict[str, np.ndarray]], margin: float = PROFILE_MARGIN) -> dict[str, int]:
    """Widen the manifest's dynamic-axis maxima (TensorRT profiles) to `margin` times the sizes of `feeds` (real
    samples: their rig, not the synthetic example's, sizes the pooling plan) and write it. Returns the largest
    size seen per axis."""
    seen: dict[str, int] = {}
    for spec in manifest.inputs:
        for axis, dim in enumerate(spec.shape):
            if isinstance(dim, str):
                seen[dim] = max(seen.get(dim, 0), max(int(f[spec.name].shape[axis]) for f in feeds))
    for dim, size in seen.items():
        manifest.dynamic_axes[dim]["max"] = max(manifest.dynamic_axes[dim]["max"], math.ceil(size * margin))
    manifest.write(manifest.directory or ".")
    return seen


def _previous_keyframe_feeds(manifest: Manifest, dataset, pre):
    """For a temporal export: ``batch -> history feeds`` (`deploy.core.TEMPORAL_INPUTS`) from the FP32 graph's `bev` of each sample's previous
    keyframe (run without history), or no history where the split does not hold it; None for a single-frame core."""
    if not manifest.temporal:
        return None
    session = ort.InferenceSession(str(manifest.graph_path("fp32")), providers=["CPUExecutionProvider"])
    position = {str(t): k for k, t in enumerate(dataset.index.tokens)}
    channels, grid = int(manifest.input_spec("prev_bev").shape[1]), manifest.postprocessing.grid

    def feeds(batch):
        state = TemporalState()
        k = position.get(batch.meta[0].get("prev_token", ""))
        if k is not None:
            prev = collate_samples([dataset[k]])
            inputs = {n: v.cpu().numpy() for n, v in pre(prev).named().items()}
            inputs.update({n: v.numpy() for n, v in history_feeds(state.history(prev.meta, channels, grid, "cpu")).items()})
            bev = session.run(["bev"], inputs)[0]
            state.update(prev.meta, torch.from_numpy(bev))
        return history_feeds(state.history(batch.meta, channels, grid, "cpu"))

    return feeds


def calibration_feeds(manifest: Manifest, dataroot: str | Path, num_samples: int, *, version: str = "v1.0-mini",
                      split: str | None = None, info: str | Path | None = None) -> list[dict[str, np.ndarray]]:
    """Core inputs of `num_samples` samples of a training split (or of the mmdet3d info file `info`; evenly
    spaced, evaluation transforms), for INT8 calibration."""
    cfg = manifest.experiment_config()
    split = split or default_splits(version)[0]
    dataset = build_dataset(cfg, dataroot, version, split, train=False, map_grid=manifest.map_grid, info=info)
    n = min(num_samples, len(dataset))
    indices = np.linspace(0, len(dataset) - 1, n).round().astype(int).tolist()
    pre = manifest.preprocessor()
    previous = _previous_keyframe_feeds(manifest, dataset, pre)
    feeds = []
    for i in indices:
        batch = collate_samples([dataset[i]])
        feeds.append({k: v.cpu().numpy() for k, v in pre(batch).named().items()})
        if previous is not None:  # a temporal core: calibrated with the history it gets in use
            feeds[-1].update({k: v.numpy() for k, v in previous(batch).items()})
    log.info("calibration: %d samples of %s", len(feeds), info or f"{dataroot}/{split}")
    return feeds


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path, *, image_size: tuple[int, int] | None = None,
                      int8: bool = False, calib_data: str | Path | None = None, calib_samples: int = 32,
                      calib_version: str = "v1.0-mini", calib_split: str | None = None, opset: int = DEFAULT_OPSET,
                      max_batch: int = 4, calib_info: str | Path | None = None) -> Manifest:
    """`perception export`: a checkpoint -> an export directory (FP32 graph, and with `int8` a Q/DQ graph).

    With `calib_data`, `calib_samples` samples of its training split (or of the mmdet3d info file `calib_info`,
    paths relative to `calib_data`) size the TensorRT profiles (`cover_feeds`: the pooling plan of the
    dataset's own rig, times `PROFILE_MARGIN`) and calibrate `int8`; without it the profiles come from the
    synthetic example rig alone (twice its plan), and ``manifest.source["profiles"]`` says which."""
    if int8 and calib_data is None:
        raise PerceptionError("--int8 needs --calib-data DIR (a nuScenes dataroot whose training split calibrates)")
    model, cfg, source = load_checkpoint_model(checkpoint, image_size)
    manifest = export_model(model, cfg, out_dir, opset=opset, max_batch=max_batch, source=source)
    manifest.source["profiles"] = "synthetic example rig, twice its pooling plan"
    if calib_data is None:
        manifest.write(manifest.directory or ".")
        return manifest
    feeds = calibration_feeds(manifest, calib_data, calib_samples, version=calib_version, split=calib_split,
                              info=calib_info)
    where = f"{calib_data} {calib_split or 'train split'}" if calib_info is None else str(calib_info)
    seen = cover_feeds(manifest, feeds)
    manifest.source["profiles"] += (f"; widened to {PROFILE_MARGIN} x the largest of {len(feeds)} samples of {where} "
                                    f"(seen: {', '.join(f'{k} {v}' for k, v in sorted(seen.items()))})")
    manifest.write(manifest.directory or ".")
    if int8:
        quantize_export(manifest, feeds, source={"calib_data": str(calib_data), "split": calib_split or "train split"}
                        if calib_info is None else {"calib_data": str(calib_data), "info": str(calib_info)})
    return manifest
