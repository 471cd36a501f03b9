"""`perception bench latency`: per-stage and end-to-end latency of one runtime, as a table and as JSON.

Every iteration, after the warm-up, runs one batch through
  1. the deployed path: pre-processing (host-to-device copy, normalisation, voxelisation, camera geometry from
     the rig cache) -> the whole core as one graph -> post-processing (decoding, NMS); its total is
     ``total_ms`` and the core alone ``core_ms``;
  2. the same core stage by stage (camera, BEV pooling, LiDAR, radar, fuse + heads), each stage its own
     module / ONNX graph / engine with a synchronisation after it: the per-stage figures.
Percentiles (median, p90, p99) are over the timed iterations; throughput is batch size / median total.

`bench_frames` is the whole-frame mode: a trained model (a checkpoint, or an export directory) over every frame of a
split in scene order, each frame through reading, pre-processing, the core, post-processing and tracking
(`FRAME_PROTOCOL`; `format_frames` prints it).

Backends: ``torch`` (eager `ExportedCore` and stage modules, FP32, or FP16 / BF16 autocast on CUDA; with
``compile`` the core runs through `torch.compile`), ``onnx`` (onnxruntime on the
graphs `deploy.export` writes into a work directory), ``tensorrt`` (engines built from those graphs). The
model has the config's architecture with random weights unless a checkpoint is given; the input is a
synthetic batch on the nuScenes-like rig (``points`` LiDAR points per sample) or a sample of a dataroot.
"""

from __future__ import annotations

import json
import logging
import platform
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch

from deploy.core import ExportedCore, stages
from deploy.export import export_model, export_stage_graphs, load_checkpoint_model
from deploy.manifest import Manifest
from deploy.postprocess import Postprocessor, PostprocessSpec
from deploy.runners import Executor, OnnxRuntimeExecutor, Runner, TorchExecutor, load_runner, synchronize
from deploy.tensorrt import TensorRTExecutor, build_engine, import_tensorrt
from perception.config import ExperimentConfig
from perception.data.batch import Batch
from perception.data.build import build_dataset, default_splits
from perception.data.collate import collate_samples
from perception.errors import PerceptionError
from perception.evaluation import prediction_entries, scene_ordered_indices
from perception.model.bevfusion import BEVFusionModel
from perception.model.build import build_model
from perception.model.synthetic import make_synthetic_batch
from perception.model.temporal import TemporalState
from perception.tracking import StreamTracker, TrackerSettings

log = logging.getLogger(__name__)

STAGES: tuple[str, ...] = ("pre_process", "camera", "bev_pooling", "lidar", "radar", "fuse_heads", "post_process")


def percentiles(samples_ms: list[float]) -> dict[str, float]:
    a = np.asarray(samples_ms, np.float64)
    return {"median": float(np.median(a)), "p90": float(np.percentile(a, 90)), "p99": float(np.percentile(a, 99)),
            "mean": float(a.mean()), "min": float(a.min()), "max": float(a.max())}


@dataclass
class _Pipeline:
    core: Executor
    stages: list[tuple[str, Executor]]


def _torch_pipeline(model: BEVFusionModel, device: torch.device, precision: str, torch_compile: bool) -> _Pipeline:
    core = ExportedCore(model)
    staged = [(s.name, TorchExecutor(s.module, s.inputs, s.outputs, device=device, precision=precision)) for s in stages(model)]
    executor = TorchExecutor(core, core.input_names, core.output_names, device=device, precision=precision)
    if torch_compile:
        # The whole core as TorchInductor compiles it (static shapes: the timed batch never changes); the stage
        # figures stay eager. Compilation happens in the first warm-up run.
        executor.module = torch.compile(executor.module, dynamic=False)
    return _Pipeline(executor, staged)


def _export_all(model: BEVFusionModel, cfg: ExperimentConfig, batch: Batch, work_dir: Path) -> tuple[Manifest, dict[str, Path], dict]:
    manifest = export_model(model, cfg, work_dir, example=batch)
    feeds = manifest.preprocessor()(batch).named()
    stage_paths = export_stage_graphs(model, feeds, work_dir / "stages")
    # Traced shapes of every stage input, for static TensorRT profiles of the stage graphs.
    values = dict(feeds)
    model.eval()
    with torch.no_grad():
        for stage in stages(model):
            out = stage.module(*(values[n] for n in stage.inputs))
            values.update(zip(stage.outputs, out if isinstance(out, tuple) else (out,)))
    shapes = {n: tuple(t.shape) for n, t in values.items()}
    return manifest, stage_paths, shapes


def _onnx_pipeline(model, cfg, batch, device, precision, work_dir: Path, threads: int | None) -> _Pipeline:
    if precision != "fp32":
        raise PerceptionError("--backend onnx runs the FP32 graph here (INT8: `perception export --int8` and eval)")
    manifest, stage_paths, _ = _export_all(model, cfg, batch, work_dir)
    stages = [(name, OnnxRuntimeExecutor(path, device=device, threads=threads)) for name, path in stage_paths.items()]
    return _Pipeline(OnnxRuntimeExecutor(manifest.graph_path(), device=device, threads=threads), stages)


def _tensorrt_pipeline(model, cfg, batch, device, precision, work_dir: Path) -> _Pipeline:
    import_tensorrt()
    if precision == "int8":
        raise PerceptionError("bench latency builds fp32 or fp16 engines; time INT8 engines of an --int8 export with "
                              "`perception build-engine --precision int8` and `perception eval --backend tensorrt`")
    manifest, stage_paths, shapes = _export_all(model, cfg, batch, work_dir)
    core = TensorRTExecutor(build_engine(manifest.graph_path(), work_dir / f"core.{precision}.engine", precision=precision,
                                         manifest=manifest), device=device)
    stages = []
    for name, path in stage_paths.items():
        inputs = [i.name for i in onnx.load(str(path), load_external_data=False).graph.input]
        static = {n: (shapes[n], shapes[n], shapes[n]) for n in inputs}
        engine = build_engine(path, path.with_suffix(f".{precision}.engine"), precision=precision, manifest=manifest,
                              profile_shapes=static)
        stages.append((name, TensorRTExecutor(engine, device=device)))
    return _Pipeline(core, stages)


def _bench_batch(cfg: ExperimentConfig, model: BEVFusionModel, batch_size: int, points: int, data: Path | None,
                 version: str, split: str | None, info: Path | None = None) -> Batch:
    if data is None:
        return make_synthetic_batch(batch_size=batch_size, image_size=cfg.data.image_size, grid=model.grid,
                                    boxes_per_sample=20, background_points=points, seed=0,
                                    num_cameras=len(model.rig.cameras))
    dataset = build_dataset(cfg, data, version, split or default_splits(version)[1], train=False, map_grid=model.map_grid,
                            info=info)
    return collate_samples([dataset[i % len(dataset)] for i in range(batch_size)])


def bench_latency(cfg: ExperimentConfig, backend: str, *, device: str = "cpu", precision: str = "fp32",
                  iterations: int = 50, warmup: int = 5, batch_size: int = 1, points: int = 200_000,
                  checkpoint: str | Path | None = None, data: str | Path | None = None, version: str = "v1.0-mini",
                  split: str | None = None, threads: int | None = None, work_dir: str | Path | None = None,
                  config_name: str = "", info: str | Path | None = None, torch_compile: bool = False) -> dict[str, Any]:
    """Measure one backend (see the module docstring); returns the JSON-ready result (`info`: time samples of
    this mmdet3d v2 info file, paths relative to `data`; `torch_compile`: the torch core through `torch.compile`, whose
    compilation time is reported as ``first_run_s``)."""
    if iterations < 1 or warmup < 0:
        raise PerceptionError("--iterations must be >= 1 and --warmup >= 0")
    if torch_compile and backend != "torch":
        raise PerceptionError("--compile applies to --backend torch")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise PerceptionError("--device cuda: no CUDA device is available")
    if threads:
        torch.set_num_threads(threads)
    if checkpoint is not None:
        model, cfg, _ = load_checkpoint_model(checkpoint, tuple(cfg.data.image_size))
    else:
        torch.manual_seed(cfg.train.seed)
        model = build_model(cfg)
    model.eval()
    batch = _bench_batch(cfg, model, batch_size, points, None if data is None else Path(data), version, split,
                         None if info is None else Path(info))
    pre = model.preprocessor
    post = Postprocessor(PostprocessSpec(grid=model.grid, decode=model.decode))

    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        work = Path(work_dir) if work_dir is not None else Path(tmp)
        if backend == "torch":
            pipeline = _torch_pipeline(model, dev, precision, torch_compile)
        elif backend == "onnx":
            pipeline = _onnx_pipeline(model, cfg, batch, dev, precision, work, threads)
        elif backend == "tensorrt":
            pipeline = _tensorrt_pipeline(model, cfg, batch, dev, precision, work)
        else:
            raise PerceptionError(f"--backend {backend!r}: expected torch, onnx or tensorrt")

        times: dict[str, list[float]] = {k: [] for k in (*STAGES, "core", "total")}
        first_run_s = 0.0
        no_history = ExportedCore(model).empty_history(batch.batch_size, dev)  # a temporal core's state inputs
        example_inputs = pre(batch.to(dev)).named()
        for i in range(warmup + iterations):
            t0 = time.perf_counter()
            inputs = pre(batch.to(dev)).named() | no_history
            synchronize(dev)
            t1 = time.perf_counter()
            outputs = pipeline.core.run(inputs)
            t2 = time.perf_counter()
            post(outputs)
            synchronize(dev)
            t3 = time.perf_counter()
            if i == 0:
                first_run_s = t3 - t0
            values = dict(inputs)
            stage_ms = {}
            for name, executor in pipeline.stages:
                s0 = time.perf_counter()
                values.update(executor.run(values))
                stage_ms[name] = (time.perf_counter() - s0) * 1e3
            if i < warmup:
                continue
            for key, value in (("pre_process", t1 - t0), ("core", t2 - t1), ("post_process", t3 - t2), ("total", t3 - t0)):
                times[key].append(value * 1e3)
            for name, ms in stage_ms.items():
                times[name].append(ms)

    total = percentiles(times["total"])
    return {
        "config": config_name, "backend": backend, "device": str(dev), "precision": precision, "compile": torch_compile,
        "batch_size": batch_size, "first_run_s": first_run_s,
        "iterations": iterations, "warmup": warmup, "threads": threads or torch.get_num_threads(),
        "checkpoint": None if checkpoint is None else str(checkpoint),
        "input": {"source": str(info or data) if data is not None else "synthetic",
                  "image_size": list(cfg.data.image_size), "lidar_points": int(batch.points_lidar.shape[0]),
                  "lidar_pillars": int(example_inputs["lidar_features"].shape[0]),
                  "radar_points": int(batch.points_radar.shape[0]),
                  "radar_pillars": int(example_inputs["radar_features"].shape[0])},
        "stages_ms": {k: percentiles(times[k]) for k in STAGES},
        "core_ms": percentiles(times["core"]),
        "total_ms": total,
        "throughput_samples_per_s": 1000.0 * batch_size / total["median"],
        "environment": _environment(dev),
    }


def _environment(device: torch.device) -> dict[str, str]:
    env = {"torch": torch.__version__, "python": platform.python_version(), "cpu": platform.processor() or platform.machine()}
    env["onnxruntime"] = ort.__version__
    try:
        import tensorrt as trt  # noqa: PLC0415 - optional: only on GPU machines with TensorRT

        env["tensorrt"] = trt.__version__
    except ImportError:
        pass
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def format_latency(result: dict[str, Any]) -> str:
    """The result as a table (milliseconds)."""
    backend = result["backend"] + (" + torch.compile" if result.get("compile") else "")
    title = (f"latency: {result['config'] or 'config'}  backend {backend} ({result['precision']}) on "
             f"{result['device']}, batch {result['batch_size']}, {result['iterations']} runs after {result['warmup']} warm-up")
    lines = [title, f"{'stage':<16}{'median':>10}{'p90':>10}{'p99':>10}"]
    rows = [(k, result["stages_ms"][k]) for k in STAGES] + [("core (1 graph)", result["core_ms"]), ("total", result["total_ms"])]
    for name, s in rows:
        if name == "core (1 graph)":
            lines.append("-" * 46)
        lines.append(f"{name:<16}{s['median']:>10.2f}{s['p90']:>10.2f}{s['p99']:>10.2f}")
    lines.append(f"throughput {result['throughput_samples_per_s']:.2f} samples/s; stages run one by one, total = "
                 "pre-process + core as one graph + post-process")
    return "\n".join(lines)


def write_json(result: dict[str, Any], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    return path


# ------------------------------------------------------------------------------------------ whole frames

# Stages of one frame in `bench_frames`, in the order they run.
FRAME_STAGES: tuple[str, ...] = ("read", "pre_process", "core", "post_process", "tracking")
FRAME_STAGE_CONTENTS: dict[str, str] = {
    "read": "reading and decoding: the dataset's evaluation item (images decoded and resized, LiDAR sweeps "
            "motion-compensated, radar), no augmentation, no map ground truth; collated to a batch of 1",
    "pre_process": "host-to-device copy, image normalisation, voxelisation (LiDAR and radar pillars), camera geometry "
                   "(pooling plan, from the rig cache when the calibration repeats), a temporal core's history",
    "core": "the core on the backend's runtime (one graph / module / engine)",
    "post_process": "decoding (peaks, top-k, score threshold), per-class circle NMS, LiDAR-measured velocities when "
                    "the model's config turns them on, boxes to the global frame (submission entries)",
    "tracking": "CenterPoint's greedy tracker (`perception track`'s), fed frame by frame, reset at each new scene",
}
MIN_PASSES = 5
FRAME_PROTOCOL: tuple[str, ...] = (
    "every frame of the split, in scene order (each scene's keyframes in time order), one frame at a time (batch 1)",
    "stages run one after another, with no loader prefetch overlap; each stage is timed with time.perf_counter, "
    "after torch.cuda.synchronize on CUDA",
    "stages: " + "; ".join(f"{k}: {v}" for k, v in FRAME_STAGE_CONTENTS.items()),
    f"one untimed warm-up pass over the frames, then at least {MIN_PASSES} timed passes; each pass starts with an "
    "empty tracker and temporal state",
    "median, p90 and p99 (ms) over every frame of every timed pass, per stage and for the whole frame, with reading "
    "(read through tracking) and without (pre-processing through tracking)",
    "boxes per frame (mean over the frames, after post-processing; tracked boxes too), and frames/s = 1000 / median "
    "whole frame (ms), with and without reading",
)


def bench_frames(checkpoint: str | Path, data: str | Path, split: str | None, backend: str = "torch", *,
                 device: str = "cpu", precision: str | None = None, passes: int = MIN_PASSES,
                 version: str = "v1.0-mini", threads: int | None = None, info: str | Path | None = None,
                 tracker: TrackerSettings = TrackerSettings()) -> dict[str, Any]:
    """Whole-frame latency of a trained model over a split (`FRAME_PROTOCOL`); returns the JSON-ready result.

    Args:
        checkpoint: a training checkpoint (.pt) for ``torch``; an export directory (or a graph / engine in one)
            for ``onnx`` and ``tensorrt``, as `perception eval --backend` takes it. The config is the checkpoint's.
        data, version, split: the dataroot and the split whose frames run (`info`: an mmdet3d info file's samples
            instead, `split` None).
        backend, device, precision, threads: the runner (`deploy.runners.load_runner`); precision None is the
            runner's default (torch fp32, the export's FP32 graph, the export's first engine).
        passes: timed passes over the frames after one warm-up pass; fewer than `MIN_PASSES` is allowed (quick
            checks) with a warning, and ``protocol_met`` is then false.
        tracker: the tracker's settings (`perception track`'s defaults).

    Returns: ``stages_ms[stage]`` and ``frame_ms`` (without reading) / ``frame_with_read_ms``, each the median, p90,
    p99, mean, min and max in milliseconds; ``samples_ms[stage]``: per timed pass, per frame (ms, scene order);
    ``per_frame``: each frame's token, scene, boxes and tracked boxes; ``boxes_per_frame``, ``frames_per_s`` and
    ``frames_per_s_with_read``; ``frame_over_pre_core``: median whole frame without reading over the sum of the
    pre-processing and core medians; the protocol, device, backend, threads, checkpoint, split, frames and passes.
    """
    if passes < 1:
        raise PerceptionError("--passes must be >= 1")
    if passes < MIN_PASSES:
        log.warning("%d timed pass(es): the protocol asks for at least %d; figures are indicative only", passes, MIN_PASSES)
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise PerceptionError("--device cuda: no CUDA device is available")
    if backend == "tensorrt" and dev.type != "cuda":
        raise PerceptionError("--backend tensorrt runs on --device cuda")
    if threads:
        torch.set_num_threads(threads)
    runner = load_runner(backend, checkpoint, device=dev, precision=precision, threads=threads)
    cfg = runner.manifest.experiment_config()
    # What a vehicle reads: sensors only (no map ground truth to rasterise; the boxes come with the index).
    dataset = build_dataset(cfg, data, version, split, train=False, map_grid=runner.map_grid,
                            info=info).with_config(map="off", eval_map_grid=None)
    order = scene_ordered_indices(dataset.index)

    samples: dict[str, list[list[float]]] = {k: [] for k in (*FRAME_STAGES, "frame", "frame_with_read")}
    per_frame: list[dict[str, Any]] = []
    for p in range(1 + passes):
        frame_rows, per_frame = _run_pass(runner, dataset, order, dev, tracker)
        if p == 0:
            continue  # the warm-up pass
        for key in samples:
            samples[key].append([row[key] for row in frame_rows])

    def stats(key: str) -> dict[str, float]:
        return percentiles([v for series in samples[key] for v in series])

    stages_ms = {k: stats(k) for k in FRAME_STAGES}
    frame_ms, frame_with_read_ms = stats("frame"), stats("frame_with_read")
    lidar_velocity = runner.postprocessor.spec.decode.lidar_velocity is not None
    scenes = len({f["scene_token"] for f in per_frame})
    return {
        "mode": "frames", "protocol": list(FRAME_PROTOCOL), "stage_contents": dict(FRAME_STAGE_CONTENTS),
        "protocol_met": passes >= MIN_PASSES,
        "backend": backend, "runner": runner.description, "device": str(dev), "precision": precision,
        "threads": threads or torch.get_num_threads(), "checkpoint": str(checkpoint),
        "data": str(data), "version": version, "split": str(info) if info is not None else split,
        "frames": len(order), "scenes": scenes, "passes": passes, "warmup_passes": 1,
        "lidar_velocity": lidar_velocity, "tracker": {"max_age": tracker.max_age, "min_score": tracker.min_score},
        "stages_ms": stages_ms, "frame_ms": frame_ms, "frame_with_read_ms": frame_with_read_ms,
        "frame_over_pre_core": frame_ms["median"] / max(stages_ms["pre_process"]["median"] + stages_ms["core"]["median"], 1e-9),
        "frames_per_s": 1000.0 / frame_ms["median"], "frames_per_s_with_read": 1000.0 / frame_with_read_ms["median"],
        "boxes_per_frame": float(np.mean([f["boxes"] for f in per_frame])),
        "tracked_boxes_per_frame": float(np.mean([f["tracked"] for f in per_frame])),
        "per_frame": per_frame,
        "samples_ms": {k: [[round(v, 4) for v in series] for series in samples[k]] for k in samples},
        "environment": _environment(dev),
    }


def _run_pass(runner: Runner, dataset, order: list[int], device: torch.device, settings: TrackerSettings
              ) -> tuple[list[dict[str, float]], list[dict[str, Any]]]:
    """One pass over the frames `order` of `dataset`: per frame, each stage's milliseconds (`FRAME_STAGES`, and
    ``frame`` / ``frame_with_read``), and its token, scene, boxes and tracked boxes."""
    state = TemporalState() if runner.temporal else None
    tracker = StreamTracker(settings)
    rows: list[dict[str, float]] = []
    frames: list[dict[str, Any]] = []
    for i in order:
        t0 = time.perf_counter()
        batch = collate_samples([dataset[i]])
        t1 = time.perf_counter()
        batch = batch.to(device)
        inputs = runner.prepare(batch, state)
        synchronize(device)
        t2 = time.perf_counter()
        out = runner.infer(inputs)
        synchronize(device)
        t3 = time.perf_counter()
        meta = batch.meta[0]
        entries = prediction_entries(runner.finish(batch, out, state)[0], meta, runner.classes)
        synchronize(device)
        t4 = time.perf_counter()
        tracked = tracker.step(meta["scene_token"], meta["timestamp"], entries)
        t5 = time.perf_counter()
        rows.append({"read": (t1 - t0) * 1e3, "pre_process": (t2 - t1) * 1e3, "core": (t3 - t2) * 1e3,
                     "post_process": (t4 - t3) * 1e3, "tracking": (t5 - t4) * 1e3, "frame": (t5 - t1) * 1e3,
                     "frame_with_read": (t5 - t0) * 1e3})
        frames.append({"sample_token": meta["sample_token"], "scene_token": meta["scene_token"],
                       "boxes": len(entries), "tracked": len(tracked)})
    return rows, frames


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else ("es" if word.endswith("s") else "s"))


def format_frames(result: dict[str, Any]) -> str:
    """`bench_frames`'s result as a table (milliseconds)."""
    title = (f"whole-frame latency: {result['checkpoint']}  backend {result['backend']} ({result['runner']}) on "
             f"{result['device']}, {result['threads']} threads; {result['split']}: {result['frames']} frames "
             f"({_plural(result['scenes'], 'scene')}), {_plural(result['passes'], 'pass')} after "
             f"{_plural(result['warmup_passes'], 'warm-up pass')}")
    lines = [title]
    if not result["protocol_met"]:
        lines.append(f"(fewer than {MIN_PASSES} passes: not the protocol's figures)")
    lines.append(f"{'stage (ms)':<30}{'median':>10}{'p90':>10}{'p99':>10}")
    names = {"read": "read + decode", "pre_process": "pre-process", "core": "core",
             "post_process": "post-process" + (" (+LiDAR vel.)" if result["lidar_velocity"] else ""),
             "tracking": "tracking"}
    rows = [(names[k], result["stages_ms"][k]) for k in FRAME_STAGES]
    rows += [("frame without reading", result["frame_ms"]), ("frame with reading", result["frame_with_read_ms"])]
    for k, (name, s) in enumerate(rows):
        if k == len(FRAME_STAGES):
            lines.append("-" * 60)
        lines.append(f"{name:<30}{s['median']:>10.2f}{s['p90']:>10.2f}{s['p99']:>10.2f}")
    lines.append(f"boxes per frame {result['boxes_per_frame']:.1f} (tracked {result['tracked_boxes_per_frame']:.1f}); "
                 f"{result['frames_per_s']:.2f} frames/s without reading, {result['frames_per_s_with_read']:.2f} with; "
                 f"frame / (pre-process + core) medians = {result['frame_over_pre_core']:.2f}")
    lines.append("stages run one after another, one frame at a time, no prefetch overlap (protocol in the JSON)")
    return "\n".join(lines)
