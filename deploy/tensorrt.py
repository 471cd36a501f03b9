"""TensorRT engines from the exported ONNX graphs, and the TensorRT executor (TensorRT 10 Python API).

TensorRT is an optional extra (``pip install -e ".[tensorrt]"`` on a machine with CUDA; PyPI's ``tensorrt``
fetches its libraries from NVIDIA's index). Nothing here imports it until it is used, so the rest of the
package works without it.

  - `build_engine`: parse the ONNX graph with TensorRT's own ONNX parser (no plugin library is loaded: the
    graphs are plugin-free, `deploy.trt_compat`), one optimisation profile from the manifest's dynamic-axis
    ranges, FP32 / FP16 / INT8 (INT8 needs the Q/DQ graph of ``perception export --int8``: explicit
    quantisation, layers without Q/DQ run in FP16), and serialise the engine. An engine written inside the
    export directory is recorded in its manifest under its precision.
  - `TensorRTExecutor`: deserialise an engine; per call, set the input shapes, bind torch CUDA tensors as the
    device buffers of every input and output, enqueue on its own CUDA stream (``execute_async_v3``) and wait.
"""

from __future__ import annotations

import logging
from pathlib import Path

import onnx
import torch
from torch import Tensor

from deploy.manifest import Manifest
from deploy.executor import Executor
from perception.errors import PerceptionError

log = logging.getLogger(__name__)

PRECISIONS: tuple[str, ...] = ("fp32", "fp16", "int8")


def import_tensorrt():
    """The ``tensorrt`` module, or a `PerceptionError` saying how to get it."""
    try:
        import tensorrt as trt  # optional: only on GPU machines (NVIDIA's wheels), so imported on use
    except ImportError as exc:
        raise PerceptionError(
            "TensorRT is not installed: on a machine with an NVIDIA GPU, `pip install -e \".[tensorrt]\"` "
            f"(TensorRT 10 Python wheels from pypi.nvidia.com) ({exc})"
        ) from None
    major = int(str(trt.__version__).split(".")[0])
    if major < 10:
        raise PerceptionError(f"TensorRT {trt.__version__}: TensorRT 10 or later is needed (execute_async_v3, named tensors)")
    return trt


def _trt_logger(trt):
    return trt.Logger(trt.Logger.WARNING)


def _has_qdq(onnx_path: Path) -> bool:
    model = onnx.load(str(onnx_path), load_external_data=False)
    return any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node)


def build_engine(onnx_path: str | Path, out: str | Path, *, precision: str = "fp16", workspace_gib: float = 4.0,
                 manifest: Manifest | None = None,
                 profile_shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]] | None = None) -> Path:
    """Build and serialise a TensorRT engine from an exported graph.

    Args:
        onnx_path: a graph of an export directory (``core.onnx``, ``core.int8.onnx``, or a stage graph).
        out: the engine file to write.
        precision: fp32, fp16, or int8 (the graph must carry Q/DQ nodes).
        workspace_gib: builder workspace limit.
        manifest: the export's manifest (default: read from the graph's directory, or its parent for stages).
        profile_shapes: (min, opt, max) shapes of inputs, replacing the manifest's (stage graphs' intermediate
            inputs are only known this way).

    Returns: `out`. Raises `PerceptionError` when TensorRT is missing, the parser rejects a node, or the build fails.
    """
    if precision not in PRECISIONS:
        raise PerceptionError(f"--precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    onnx_path, out = Path(onnx_path), Path(out)
    if not onnx_path.is_file():
        raise PerceptionError(f"{onnx_path}: no such ONNX graph")
    if precision == "int8" and not _has_qdq(onnx_path):
        raise PerceptionError(f"{onnx_path}: --precision int8 needs the Q/DQ graph that `perception export --int8` writes (core.int8.onnx)")
    if manifest is None:
        directory = onnx_path.parent if (onnx_path.parent / "manifest.json").is_file() else onnx_path.parent.parent
        manifest = Manifest.read(directory)
    trt = import_tensorrt()
    logger = _trt_logger(trt)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "\n".join(f"  {parser.get_error(i)}" for i in range(parser.num_errors))
        raise PerceptionError(f"{onnx_path}: TensorRT's ONNX parser rejected the graph:\n{errors}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    if precision in ("fp16", "int8"):
        config.set_flag(trt.BuilderFlag.FP16)
    if precision == "int8" and hasattr(trt.BuilderFlag, "INT8"):
        config.set_flag(trt.BuilderFlag.INT8)  # explicit quantisation: the Q/DQ scales are used, no calibrator
    specs = {t.name: t for t in manifest.inputs}
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        if all(d >= 0 for d in tensor.shape):
            continue
        if profile_shapes and tensor.name in profile_shapes:
            lo, opt, hi = profile_shapes[tensor.name]
        elif tensor.name in specs:
            lo, opt, hi = manifest.profile(specs[tensor.name])
        else:
            raise PerceptionError(f"{onnx_path}: input {tensor.name!r} is dynamic and has no profile (not in the manifest)")
        profile.set_shape(tensor.name, lo, opt, hi)
    config.add_optimization_profile(profile)
    log.info("building a %s TensorRT %s engine from %s (this takes minutes)", precision, trt.__version__, onnx_path)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise PerceptionError(f"{onnx_path}: TensorRT could not build a {precision} engine (see the log above)")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(bytes(serialized))
    if manifest.directory is not None and out.resolve().parent == Path(manifest.directory).resolve():
        manifest.engines[precision] = out.name
        manifest.write(manifest.directory)
    log.info("wrote %s (%.1f MB)", out, out.stat().st_size / 1e6)
    return out


def _torch_dtype(trt, dtype) -> torch.dtype:
    table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int32: torch.int32, trt.int64: torch.int64,
             trt.int8: torch.int8, trt.bool: torch.bool, trt.uint8: torch.uint8}
    if hasattr(trt, "bfloat16"):
        table[trt.bfloat16] = torch.bfloat16
    if dtype not in table:
        raise PerceptionError(f"TensorRT tensor type {dtype} has no torch equivalent here")
    return table[dtype]


class TensorRTExecutor(Executor):
    """A serialized TensorRT engine on one GPU; torch CUDA tensors are its device buffers.

    Inputs are cast to the engine's types and made contiguous on the GPU; outputs are allocated per call with
    the shapes the execution context infers. The call enqueues on the executor's CUDA stream (after the work
    already queued on torch's current stream) and returns once the stream is done.
    """

    def __init__(self, engine_path: str | Path, *, device: torch.device | str = "cuda"):
        trt = import_tensorrt()
        self.trt = trt
        self.device = torch.device(device)
        if self.device.type != "cuda" or not torch.cuda.is_available():
            raise PerceptionError("the TensorRT executor needs a CUDA device")
        path = Path(engine_path)
        if not path.is_file():
            raise PerceptionError(f"{path}: no such TensorRT engine")
        with torch.cuda.device(self.device):
            self.runtime = trt.Runtime(_trt_logger(trt))
            self.engine = self.runtime.deserialize_cuda_engine(path.read_bytes())
            if self.engine is None:
                raise PerceptionError(f"{path}: cannot deserialize the engine (built by another TensorRT version or GPU?)")
            self.context = self.engine.create_execution_context()
            self.stream = torch.cuda.Stream(self.device)
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input_names = tuple(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT)
        self.output_names = tuple(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT)
        self.path = path

    def _check_profile(self, name: str, shape: tuple[int, ...]) -> None:
        lo, _, hi = self.engine.get_tensor_profile_shape(name, 0)
        if len(lo) and any(s < a or s > b for s, a, b in zip(shape, lo, hi)):
            raise PerceptionError(f"{self.path}: input {name!r} of shape {shape} is outside the engine's profile "
                                  f"{tuple(lo)} .. {tuple(hi)}; re-export with a larger --max-batch, or with --calib-data of this "
                                  "dataset (its camera rig sizes the pooling-plan axes), and rebuild")

    def run(self, inputs: dict[str, Tensor]) -> dict[str, Tensor]:
        trt = self.trt
        bound: dict[str, Tensor] = {}
        for name in self.input_names:
            t = inputs[name].to(self.device, dtype=_torch_dtype(trt, self.engine.get_tensor_dtype(name))).contiguous()
            self._check_profile(name, tuple(t.shape))
            self.context.set_input_shape(name, tuple(t.shape))
            self.context.set_tensor_address(name, t.data_ptr())
            bound[name] = t
        outputs: dict[str, Tensor] = {}
        for name in self.output_names:
            shape = tuple(self.context.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise PerceptionError(f"{self.path}: output {name!r} has an unresolved shape {shape}")
            t = torch.empty(shape, dtype=_torch_dtype(trt, self.engine.get_tensor_dtype(name)), device=self.device)
            self.context.set_tensor_address(name, t.data_ptr())
            outputs[name] = t
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise PerceptionError(f"{self.path}: TensorRT execution failed")
        self.stream.synchronize()
        return {n: (t.float() if t.is_floating_point() else t) for n, t in outputs.items()}
