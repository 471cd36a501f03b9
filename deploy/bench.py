"""`perception bench latency`: per-stage and end-to-end latency of one runtime, as a table and as JSON.

Every iteration, after the warm-up, runs one batch through
  1. the deployed path: pre-processing (host-to-device copy, normalisation, voxelisation, camera geometry from
     the rig cache) -> the whole core as one graph -> post-processing (decoding, NMS); its total is
     ``total_ms`` and the core alone ``core_ms``;
  2. the same core stage by stage (camera, BEV pooling, LiDAR, radar, fuse + heads), each stage its own
     module / ONNX graph / engine with a synchronisation after it: the per-stage figures.
Percentiles (median, p90, p99) are over the timed iterations; throughput is batch size / median total.

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
from deploy.runners import Executor, OnnxRuntimeExecutor, TorchExecutor, synchronize
from deploy.tensorrt import TensorRTExecutor, build_engine, import_tensorrt
from perception.config import ExperimentConfig
from perception.data.batch import Batch
from perception.data.build import build_dataset, default_splits
from perception.data.collate import collate_samples
from perception.errors import PerceptionError
from perception.model.bevfusion import BEVFusionModel
from perception.model.build import build_model
from perception.model.synthetic import make_synthetic_batch

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
                                    boxes_per_sample=20, background_points=points, seed=0)
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
