"""Runners: one interface over PyTorch, ONNX Runtime and TensorRT.

A `Runner` is the shared pre-processing (`perception.model.preprocess.Preprocessor`), an `Executor` that runs the core
on one runtime, and the shared post-processing (`deploy.postprocess.Postprocessor`). ``runner.predict(batch)``
returns the `Prediction`s that `BEVFusionModel.predict` returns, so `perception.evaluation.run_inference`
evaluates any runtime unchanged (``runner.eval()`` is there for it and does nothing). Its three steps, `prepare`,
`infer` and `finish`, are public so that `deploy.bench.bench_frames` times each of them on the same code.

Executors take and return ``{name: torch.Tensor}``:
  - `TorchExecutor`: a module (the `ExportedCore`, or one of its stages) in eager PyTorch, FP32 or FP16 autocast;
  - `OnnxRuntimeExecutor`: an ONNX graph in an ``onnxruntime.InferenceSession`` (CPU, or CUDA where the
    installed onnxruntime has it);
  - `deploy.tensorrt.TensorRTExecutor`: a serialized TensorRT engine.

`load_runner(backend, path)` opens a checkpoint (torch) or an export directory / graph / engine.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import onnxruntime as ort
import torch
from torch import Tensor, nn

from deploy.executor import Executor, synchronize  # noqa: F401 (re-exported)
from deploy.core import ExportedCore, history_feeds
from deploy.export import load_checkpoint_model
from deploy.manifest import Manifest, TensorSpec
from deploy.postprocess import Postprocessor, PostprocessSpec
from deploy.tensorrt import TensorRTExecutor
from perception.data.batch import Batch
from perception.errors import PerceptionError
from perception.evaluation import evaluate_predictor, write_metrics
from perception.model.bevfusion import Prediction, lidar_points_per_sample
from perception.model.preprocess import Preprocessor
from perception.model.temporal import History, TemporalState

log = logging.getLogger(__name__)

BACKENDS: tuple[str, ...] = ("torch", "onnx", "tensorrt")


# Precision name -> the CUDA autocast dtype of a TorchExecutor (None: plain FP32).
AUTOCAST_DTYPES: dict[str, torch.dtype | None] = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


class TorchExecutor(Executor):
    """A module in PyTorch (eager, or as `torch.compile` made it). `precision` ``fp16`` / ``bf16`` runs it under CUDA
    autocast to that dtype (outputs cast back to FP32)."""

    def __init__(self, module: nn.Module, input_names: Sequence[str], output_names: Sequence[str], *,
                 device: torch.device | str = "cpu", precision: str = "fp32"):
        if precision not in AUTOCAST_DTYPES:
            raise PerceptionError(f"torch precision {precision!r}: expected one of {', '.join(AUTOCAST_DTYPES)}")
        self.device = torch.device(device)
        if precision != "fp32" and self.device.type != "cuda":
            raise PerceptionError(f"torch {precision} runs under CUDA autocast: use --device cuda")
        self.module = module.to(self.device).eval()
        self.input_names = tuple(input_names)
        self.output_names = tuple(output_names)
        self.precision = precision

    @torch.no_grad()
    def run(self, inputs: dict[str, Tensor]) -> dict[str, Tensor]:
        args = [inputs[n].to(self.device, non_blocking=True) for n in self.input_names]
        dtype = AUTOCAST_DTYPES[self.precision]
        with torch.autocast("cuda", dtype=dtype or torch.float16, enabled=dtype is not None):
            out = self.module(*args)
        out = out if isinstance(out, tuple) else (out,)
        result = {n: (t.float() if t.is_floating_point() else t) for n, t in zip(self.output_names, out)}
        synchronize(self.device)
        return result


def onnxruntime_providers(device: torch.device) -> list[str]:
    available = ort.get_available_providers()
    if device.type == "cuda":
        if "CUDAExecutionProvider" not in available:
            raise PerceptionError(f"onnxruntime {ort.__version__} has no CUDA execution provider (install onnxruntime-gpu "
                                  "in an environment of its own), use --device cpu")
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class OnnxRuntimeExecutor(Executor):
    """An ONNX graph in onnxruntime with all graph optimisations; `threads` intra-op threads (default: torch's)."""

    def __init__(self, path: str | Path, *, device: torch.device | str = "cpu", threads: int | None = None):
        self.device = torch.device(device)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads or torch.get_num_threads()
        # Idle intra-op threads would otherwise spin after each run and take the cores from the pre- and
        # post-processing (torch) and from the other sessions of a staged pipeline.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(path), options, providers=onnxruntime_providers(self.device))
        except Exception as exc:  # onnxruntime raises its own exception types for unreadable graphs
            raise PerceptionError(f"{path}: onnxruntime cannot load the graph: {exc}") from None
        self.path = Path(path)
        self.input_names = tuple(i.name for i in self.session.get_inputs())
        self.output_names = tuple(o.name for o in self.session.get_outputs())

    def run(self, inputs: dict[str, Tensor]) -> dict[str, Tensor]:
        feeds = {n: np.ascontiguousarray(inputs[n].detach().cpu().numpy()) for n in self.input_names}
        out = self.session.run(list(self.output_names), feeds)
        return {n: torch.from_numpy(a).to(self.device) for n, a in zip(self.output_names, out)}


class Runner:
    """Pre-processing, a core `Executor`, post-processing. ``predict(batch, state)`` as `BEVFusionModel.predict`.

    Attributes:
        backend: "torch", "onnx" or "tensorrt".
        manifest: the export's manifest (for torch, one made in memory from the model).
        device: where inputs are prepared and outputs returned.
        temporal: the core takes the history (`deploy.core.TEMPORAL_INPUTS`): `predict` feeds it from a
            `TemporalState` and leaves the core's `bev` output in it, so the runner carries the state.
    """

    def __init__(self, backend: str, manifest: Manifest, executor: Executor, *, description: str = ""):
        self.backend = backend
        self.manifest = manifest
        self.executor = executor
        self.device = executor.device
        self.preprocessor: Preprocessor = manifest.preprocessor()
        self.postprocessor: Postprocessor = manifest.postprocessor()
        self.description = description or backend
        self.temporal = manifest.temporal
        self._bev_channels = manifest.experiment_config().model.fuser.out_channels if self.temporal else 0

    def __repr__(self) -> str:
        return f"Runner({self.description} on {self.device})"

    @property
    def classes(self):
        """The detection class list (`perception.classes.ClassList`) the manifest records."""
        return self.postprocessor.spec.decode.classes

    @property
    def map_grid(self):
        """The `BEVGrid` of the predicted map probabilities (as `BEVFusionModel.map_grid`)."""
        return self.manifest.map_grid

    def eval(self) -> "Runner":
        """Nothing to switch (inference only); here so that code written for a model runs a runner."""
        return self

    def infer(self, inputs: dict[str, Tensor]) -> dict[str, Tensor]:
        """The core's outputs for prepared inputs."""
        return self.executor.run(inputs)

    def history(self, batch: Batch, state: TemporalState | None) -> History:
        """A temporal core's history inputs for `batch` from `state` (None: no history)."""
        channels, grid = self._bev_channels, self.manifest.postprocessing.grid
        if state is None:
            return History.empty(batch.batch_size, channels, grid, self.device)
        return state.history(batch.meta, channels, grid, self.device)

    @torch.no_grad()
    def prepare(self, batch: Batch, state: TemporalState | None = None) -> dict[str, Tensor]:
        """Pre-processing: the core's named inputs for `batch` (already on `device`, see `predict`): normalised
        images, rig geometry, pillars, and a temporal core's history from `state`."""
        inputs = self.preprocessor(batch).named()
        if self.temporal:
            inputs.update(history_feeds(self.history(batch, state)))
        return inputs

    @torch.no_grad()
    def finish(self, batch: Batch, out: dict[str, Tensor], state: TemporalState | None = None) -> list[Prediction]:
        """Post-processing of the core's outputs `out` for `batch`: decoding, NMS and, where the manifest says so,
        LiDAR-measured velocities; a temporal core's `bev` is left in `state`."""
        if self.temporal and state is not None:
            state.update(batch.meta, out["bev"])
        return self.postprocessor(out, lidar_points_per_sample(batch))

    @torch.no_grad()
    def predict(self, batch: Batch, state: TemporalState | None = None) -> list[Prediction]:
        """Per-sample predictions of a batch: `prepare` (pre-processing), `infer` (the core), `finish` (decoding and
        NMS); a temporal core reads its history from `state` and leaves this batch's `bev` in it."""
        batch = batch.to(self.device)
        return self.finish(batch, self.infer(self.prepare(batch, state)), state)


def _resolve_export(path: Path, suffixes: tuple[str, ...]) -> tuple[Manifest, Path | None]:
    """(manifest, file) for an export directory or a file inside one (None: use the manifest's default)."""
    path = Path(path)
    if path.is_dir():
        return Manifest.read(path), None
    if path.is_file() and path.suffix in suffixes:
        return Manifest.read(path.parent), path
    raise PerceptionError(f"{path}: expected an export directory (with manifest.json) or a {'/'.join(suffixes)} file in one")


def torch_runner(model, config, *, device: torch.device | str = "cpu", precision: str = "fp32") -> Runner:
    """A runner over a `BEVFusionModel` in eager PyTorch (its `ExportedCore`), with the shared pre/post-processing."""
    core = ExportedCore(model.eval())
    spec = model.preprocess_spec()
    manifest = Manifest(
        graphs={}, opset=0, inputs=[TensorSpec(n, "", ()) for n in core.input_names],
        outputs=[TensorSpec(n, "", ()) for n in core.output_names], dynamic_axes={}, preprocessing=spec,
        postprocessing=PostprocessSpec(grid=model.grid, decode=model.decode), map_grid=model.map_grid,
        config=config.model_dump(mode="json") if hasattr(config, "model_dump") else dict(config),
    )
    executor = TorchExecutor(core, core.input_names, core.output_names, device=device, precision=precision)
    return Runner("torch", manifest, executor, description=f"PyTorch eager {precision}")


def load_runner(backend: str, path: str | Path, *, device: str | torch.device | None = None, precision: str | None = None,
                threads: int | None = None) -> Runner:
    """Open a runner.

    Args:
        backend: "torch" (path: a training checkpoint .pt), "onnx" (an export directory, whose FP32 graph is
            used, or a .onnx file in one, e.g. ``core.int8.onnx``), "tensorrt" (an export directory with a built
            engine, or a .engine / .plan file in one).
        device: "cpu" or "cuda" (default: cuda for tensorrt, cpu otherwise).
        precision: torch: fp32 or fp16 (CUDA autocast); onnx: the manifest's graph to use (fp32, int8).
        threads: onnxruntime intra-op threads.
    """
    if backend not in BACKENDS:
        raise PerceptionError(f"--backend {backend!r}: expected one of {', '.join(BACKENDS)}")
    path = Path(path)
    if backend == "torch":
        if path.is_dir() or path.suffix not in (".pt", ".pth"):
            raise PerceptionError(f"{path}: the torch backend takes a training checkpoint (.pt)")
        model, cfg, _ = load_checkpoint_model(path)
        return torch_runner(model, cfg, device=device or "cpu", precision=precision or "fp32")
    if backend == "onnx":
        manifest, graph = _resolve_export(path, (".onnx",))
        graph = graph or manifest.graph_path(precision or "fp32")
        executor = OnnxRuntimeExecutor(graph, device=device or "cpu", threads=threads)
        if executor.input_names != manifest.input_names:
            raise PerceptionError(f"{graph}: inputs {executor.input_names} differ from the manifest's {manifest.input_names}")
        return Runner("onnx", manifest, executor, description=f"onnxruntime {graph.name}")
    manifest, engine = _resolve_export(path, (".engine", ".plan"))
    if engine is None:
        if not manifest.engines:
            raise PerceptionError(f"{path}: no TensorRT engine in the export; build one with `perception build-engine`")
        key = precision or next(iter(manifest.engines))
        if key not in manifest.engines:
            raise PerceptionError(f"{path}: no {key} engine (has {sorted(manifest.engines)})")
        engine = Path(manifest.directory) / manifest.engines[key]
    executor = TensorRTExecutor(engine, device=device or "cuda")
    return Runner("tensorrt", manifest, executor, description=f"TensorRT {engine.name}")


def evaluate_export(backend: str, path: str | Path, dataroot: str | Path, version: str, split: str | None,
                    out: str | Path, *, device: str | None = None, **kwargs) -> dict:
    """`perception eval --backend onnx|tensorrt --checkpoint EXPORT`: the export's runner (`load_runner`: onnx
    takes an export directory or a .onnx graph in one, tensorrt an export directory with an engine or the engine
    file) evaluated like a model (`perception.evaluation.evaluate_predictor`; `kwargs` as there), with
    ``metrics["backend"]`` naming it."""
    runner = load_runner(backend, path, device=device)
    metrics = evaluate_predictor(runner, runner.manifest.experiment_config(), dataroot, version, split, out,
                                 device=runner.device, **kwargs)
    metrics["backend"] = runner.description
    write_metrics(Path(out) / "metrics.json", metrics)
    return metrics

