"""INT8 post-training quantisation of the exported core into a Q/DQ ONNX graph.

The quantiser is NVIDIA ModelOpt's ONNX PTQ (``modelopt.onnx.quantization.quantize``), run on the CPU with the
plain onnxruntime package: it calibrates activation ranges on real samples (``entropy`` or ``max``) and
writes symmetric INT8 QuantizeLinear/DequantizeLinear pairs in the places TensorRT fuses them (convolutions,
matrix products and their inputs), FP32 elsewhere. Where ModelOpt cannot be imported, onnxruntime's own
static QDQ quantiser (symmetric, per-channel weights) does the job and the manifest says so.

Layers that hold the accuracy stay in FP32 (`SENSITIVE_NODES`, regular expressions over the exported node
names of `deploy.core.ExportedCore`, i.e. the model's module paths under ``/model/``):
  - the pillar feature nets' first linear layer: its input is raw metres, m/s, dBsm and seconds in one
    tensor, and one INT8 scale over +-51 m is a 0.4 m step;
  - the depth net's last convolution: the logits of a softmax over the depth bins;
  - the last convolution of every detection branch and of the map head, and the scene MLP: they regress
    offsets, heights, log sizes, yaw and velocity in physical units, or are the logits themselves;
  - the ViT attention's two activation-by-activation products (q k^T and attention x v).
"""

from __future__ import annotations

import importlib.metadata
import logging
import re
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import onnx
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process

from deploy.manifest import Manifest
from deploy.trt_compat import check_onnx
from perception.errors import PerceptionError

log = logging.getLogger(__name__)

INT8_GRAPH = "core.int8.onnx"
SENSITIVE_NODES: tuple[str, ...] = (
    r"^/model/(lidar|radar)_encoder/pfn/",
    r"^/model/view_transform/depth_net/depth_net\.1/",
    r"^/model/heads/detection/[a-z_]+/[a-z_]+\.3/",
    r"^/model/heads/map_segmentation/net/net\.6/",
    r"^/model/heads/scene/",
    r"^/model/camera_encoder/blocks\.\d+/attn/MatMul(_1)?$",
)


class FeedReader:
    """An onnxruntime `CalibrationDataReader` over a list of feeds (one sample each, shapes may differ)."""

    def __init__(self, feeds: Sequence[dict[str, np.ndarray]]):
        self.feeds = list(feeds)
        self._next = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._next >= len(self.feeds):
            return None
        self._next += 1
        return self.feeds[self._next - 1]

    def get_first(self) -> dict[str, np.ndarray]:
        """The first feed, without advancing (ModelOpt runs it once to learn intermediate shapes)."""
        return self.feeds[0]

    def rewind(self) -> None:
        self._next = 0

    def __len__(self) -> int:
        return len(self.feeds)


def modelopt_available() -> bool:
    try:
        import modelopt.onnx.quantization  # noqa: F401 - optional and slow to import (seconds): probed on use
    except Exception:  # ImportError, or its own error when an optional dependency is missing
        return False
    return True


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "?"


def _quantize_modelopt(src: Path, dst: Path, feeds, method: str, exclude: Sequence[str]) -> None:
    from modelopt.onnx.quantization import quantize  # optional and slow to import: only when it quantises

    # onnxruntime's calibration subclasses expect the reader interface; ModelOpt takes it as is.

    class _Reader(FeedReader, CalibrationDataReader):
        pass

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # ModelOpt logs a warning per folded Conv bias on the root logger
    try:
        quantize(str(src), quantize_mode="int8", calibration_data_reader=_Reader(feeds), calibration_method=method,
                 calibration_eps=["cpu"], high_precision_dtype="fp32", nodes_to_exclude=list(exclude),
                 output_path=str(dst), log_level="WARNING")
    finally:
        root.setLevel(level)


def _quantize_onnxruntime(src: Path, dst: Path, feeds, method: str, exclude: Sequence[str]) -> None:
    class _Reader(FeedReader, CalibrationDataReader):
        pass

    # onnxruntime's calibrator needs the type and shape of every tensor it observes: infer them first.
    prepared = dst.with_name(dst.stem + ".prepared.onnx")
    quant_pre_process(str(src), str(prepared), skip_optimization=True, skip_symbolic_shape=True)
    names = [n.name for n in onnx.load(str(prepared), load_external_data=False).graph.node]
    excluded = [n for n in names if any(re.match(p, n) for p in exclude)]
    try:
        quantize_static(str(prepared), str(dst), _Reader(feeds), quant_format=QuantFormat.QDQ, activation_type=QuantType.QInt8,
                        weight_type=QuantType.QInt8, per_channel=True, nodes_to_exclude=excluded,
                        op_types_to_quantize=["Conv", "ConvTranspose", "MatMul", "Gemm"],
                        calibrate_method=CalibrationMethod.Entropy if method == "entropy" else CalibrationMethod.MinMax,
                        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True,
                                       "QuantizeBias": False})  # TensorRT has no INT32 DequantizeLinear
    finally:
        prepared.unlink(missing_ok=True)


def quantize_graph(src: str | Path, dst: str | Path, feeds: Sequence[dict[str, np.ndarray]], *, method: str = "max",
                   exclude: Sequence[str] = SENSITIVE_NODES, tool: str = "auto") -> dict[str, Any]:
    """Quantise the ONNX graph `src` to INT8 Q/DQ at `dst`, calibrated on `feeds` (one dict per sample).

    Args:
        method: ``max`` (absolute maximum) or ``entropy`` (KL-divergence histogram) calibration.
        exclude: node-name patterns kept in FP32 (see the module docstring).
        tool: ``modelopt``, ``onnxruntime``, or ``auto`` (ModelOpt when it imports). ModelOpt patches
            onnxruntime's quantisation modules when it runs, so use ``onnxruntime`` in a process where ModelOpt
            has not run.

    Returns: what the manifest records about the quantisation.
    """
    if not feeds:
        raise PerceptionError("INT8 calibration needs at least one sample")
    if method not in ("max", "entropy"):
        raise PerceptionError(f"calibration method {method!r}: expected max or entropy")
    src, dst = Path(src), Path(dst)
    if tool not in ("auto", "modelopt", "onnxruntime"):
        raise PerceptionError(f"quantisation tool {tool!r}: expected auto, modelopt or onnxruntime")
    fallback = tool == "auto" and not modelopt_available()
    chosen = "onnxruntime" if fallback else ("modelopt" if tool == "auto" else tool)
    if chosen == "modelopt" and not modelopt_available():
        raise PerceptionError("nvidia-modelopt's ONNX quantisation does not import; install the project's dependencies")
    t0 = time.time()
    if chosen == "modelopt":
        _quantize_modelopt(src, dst, feeds, method, exclude)
        tool_name = f"nvidia-modelopt {_version('nvidia-modelopt')} (modelopt.onnx.quantization.quantize, CPU)"
    else:
        if fallback:
            log.warning("nvidia-modelopt is not importable: quantising with onnxruntime.quantization.quantize_static (QDQ)")
        _quantize_onnxruntime(src, dst, feeds, method, exclude)
        tool_name = f"onnxruntime {_version('onnxruntime')} quantize_static (QDQ)" + (
            ", fallback: nvidia-modelopt not importable" if fallback else "")
    graph = onnx.load(str(dst), load_external_data=False).graph
    quantized = sorted({n.name.rsplit("/", 1)[0] for n in graph.node if n.op_type == "DequantizeLinear"})
    info = {
        "tool": tool_name, "precision": "int8 Q/DQ, symmetric", "calibration_method": method,
        "calibration_samples": len(feeds), "kept_in_fp32_patterns": list(exclude),
        "quantize_linear_nodes": sum(n.op_type == "QuantizeLinear" for n in graph.node),
        "dequantize_linear_nodes": sum(n.op_type == "DequantizeLinear" for n in graph.node),
        "seconds": round(time.time() - t0, 1),
    }
    log.info("INT8 graph %s: %d Q/DQ sites (%s) in %.0f s", dst, len(quantized), tool_name, info["seconds"])
    return info


def quantize_export(manifest: Manifest, feeds: Sequence[dict[str, np.ndarray]], *, method: str = "max",
                    exclude: Sequence[str] = SENSITIVE_NODES, tool: str = "auto",
                    source: dict[str, Any] | None = None) -> Path:
    """Quantise an export directory's FP32 graph into ``core.int8.onnx``, check it for TensorRT and record
    it in the manifest (``graphs.int8``, ``quantization``, ``compatibility.int8``). Returns the graph's path."""
    if manifest.directory is None:
        raise PerceptionError("quantize_export needs a manifest read from or written to an export directory")
    dst = Path(manifest.directory) / INT8_GRAPH
    info = quantize_graph(manifest.graph_path("fp32"), dst, feeds, method=method, exclude=exclude, tool=tool)
    report = check_onnx(dst)
    if not report.ok:
        raise PerceptionError(f"{dst}: the Q/DQ graph is not parseable by TensorRT without plugins:\n{report.format()}")
    manifest.graphs["int8"] = INT8_GRAPH
    manifest.quantization = {**info, **({"calibration_data": source} if source else {})}
    manifest.compatibility["int8"] = report.summary()
    manifest.write(manifest.directory)
    return dst
