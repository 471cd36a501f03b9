"""A static check that TensorRT 10's ONNX parser takes a graph without plugins.

Every node of the graph (and of its subgraphs) is checked for:
  - its domain: only the default ONNX domain; anything else is a custom op, which TensorRT only runs as a plugin;
  - its operator: in `SUPPORTED_OPS`, the operators that the ONNX-TensorRT support matrix marks as supported;
  - its attributes: each one known to the ONNX schema of the operator at the graph's opset, and the values
    the support matrix restricts (`_RULES`: pooling dilations, Resize modes, TopK, Q/DQ zero points, scatter
    reductions, constant axes ...);
and every tensor type in the graph is one TensorRT has.

One rule is not in the support matrix but in the parser's importer (``onnxOpImporters.cpp``, TensorRT 10.x):
``ScatterElements`` with a ``reduction`` other than ``none`` is imported through TensorRT's ``ScatterElements``
plugin (``scatterPluginHelper``), so it is reported here as needing a plugin. `deploy.core` exists because
``torch.Tensor.scatter_add`` exports to exactly that.

The operator list and the restrictions were copied from onnx/onnx-tensorrt ``docs/operators.md`` as of
`SOURCE_VERSION` (header: "TensorRT 10.15 supports operators in the inclusive range of opset 9 to opset 24").
Update both together when TensorRT moves.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

SOURCE = "https://github.com/onnx/onnx-tensorrt/blob/main/docs/operators.md"
SOURCE_VERSION = "TensorRT 10.15"
OPSET_RANGE = (9, 24)

# Operators marked "Y" in the support matrix of SOURCE_VERSION.
SUPPORTED_OPS: frozenset[str] = frozenset("""
Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh Attention AveragePool BatchNormalization BlackmanWindow
Cast CastLike Ceil Celu Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum DeformConv
DepthToSpace DequantizeLinear Div Dropout Einsum Elu Equal Erf Exp Expand EyeLike Flatten Floor Gather
GatherElements GatherND Gelu Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool Greater GreaterOrEqual GridSample
GroupNormalization GRU HammingWindow HannWindow HardSigmoid HardSwish Hardmax Identity If ImageScaler
InstanceNormalization IsInf IsNaN LayerNormalization LeakyRelu Less LessOrEqual Log LogSoftmax Loop LRN LSTM
LpNormalization LpPool MatMul Max MaxPool Mean MeanVarianceNormalization Min Mish Mod Mul Neg NonMaxSuppression
NonZero Not OneHot Or Pad ParametricSoftplus Pow PRelu QuantizeLinear RandomNormal RandomNormalLike RandomUniform
RandomUniformLike Range Reciprocal ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin
ReduceProd ReduceSum ReduceSumSquare Relu Reshape Resize ReverseSequence RMSNormalization RNN RoiAlign
RotaryEmbedding Round STFT ScaledTanh Scan Scatter ScatterElements ScatterND Selu Shape Shrink Sigmoid Sign Sin Sinh
Size Slice Softmax Softplus Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh TensorScatter ThresholdedRelu
Tile TopK Transpose Trilu Unsqueeze Upsample Where Xor
""".split())

# Operators marked "N" (kept to give a precise message).
UNSUPPORTED_OPS: frozenset[str] = frozenset("""
AffineGrid Bernoulli BitShift BitwiseAnd BitwiseNot BitwiseOr BitwiseXor Col2Im CenterCropPad Compress
ConcatFromSequence ConvInteger DFT Det DynamicQuantizeLinear ImageDecoder MatMulInteger MaxRoiPool MaxUnpool
MelWeightMatrix Multinomial NegativeLogLikelihoodLoss Optional OptionalGetElement OptionalHasElement QLinearConv
QLinearMatMul RegexFullMatch SequenceAt SequenceConstruct SequenceEmpty SequenceErase SequenceInsert SequenceLength
SequenceMap SoftmaxCrossEntropyLoss SplitToSequence StringConcat StringNormalizer StringSplit TfIdfVectorizer Unique
""".split())

# Tensor element types TensorRT has ("TensorRT supports the following ONNX data types"); UINT8 only as a
# network input or output; DOUBLE is cast down to FLOAT (a warning).
_TYPES_OK = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.INT32, TensorProto.INT64,
             TensorProto.INT8, TensorProto.BOOL, TensorProto.FLOAT8E4M3FN, TensorProto.INT4}
if hasattr(TensorProto, "FLOAT4E2M1"):
    _TYPES_OK.add(TensorProto.FLOAT4E2M1)
_QUANTIZED_TYPES = {TensorProto.INT8, TensorProto.FLOAT8E4M3FN, TensorProto.INT4} | (
    {TensorProto.FLOAT4E2M1} if hasattr(TensorProto, "FLOAT4E2M1") else set())
_CAST_TARGETS = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.INT32, TensorProto.INT64,
                 TensorProto.UINT8, TensorProto.BOOL}
_RESIZE_COORDINATES = {"half_pixel", "pytorch_half_pixel", "tf_half_pixel_for_nn", "asymmetric", "align_corners"}
_RESIZE_NEAREST = {"floor", "ceil", "round_prefer_floor", "round_prefer_ceil"}
_REDUCE_OPS = {"ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean", "ReduceMin",
               "ReduceProd", "ReduceSum", "ReduceSumSquare"}
_TOPK_MAX = 3840


@dataclass(frozen=True)
class Issue:
    """Something TensorRT's parser would refuse (``error``) or change (``warning``)."""

    node: str
    op_type: str
    message: str
    severity: str = "error"

    def __str__(self) -> str:
        return f"{self.severity}: {self.op_type} {self.node!r}: {self.message}"


@dataclass
class CompatReport:
    """The result of `check_model`: operators seen and issues found."""

    name: str
    opset: int
    num_nodes: int = 0
    op_types: Counter = field(default_factory=Counter)
    issues: list[Issue] = field(default_factory=list)

    @property
    def errors(self) -> list[Issue]:
        return [i for i in self.issues if i.severity == "error"]

    @property
    def ok(self) -> bool:
        return not self.errors

    def summary(self) -> dict:
        return {"checked_against": f"{SOURCE_VERSION} ONNX parser ({SOURCE})", "ok": self.ok, "opset": self.opset,
                "nodes": self.num_nodes, "op_types": dict(sorted(self.op_types.items())),
                "issues": [str(i) for i in self.issues]}

    def format(self) -> str:
        head = (f"{self.name}: {self.num_nodes} nodes, {len(self.op_types)} operator types, opset {self.opset}: "
                f"{'OK' if self.ok else f'{len(self.errors)} errors'} for {SOURCE_VERSION} without plugins")
        return "\n".join([head, *(f"  {i}" for i in self.issues)])


class _Graph:
    """What the rules need to know about the graph around a node."""

    def __init__(self, graph: onnx.GraphProto, outer: "_Graph | None" = None):
        self.initializers = {t.name: t for t in graph.initializer}
        self.constants: dict[str, onnx.TensorProto] = dict(outer.constants) if outer else {}
        self.constants.update(self.initializers)
        for node in graph.node:
            if node.op_type == "Constant" and node.output:
                for a in node.attribute:
                    if a.name == "value":
                        self.constants[node.output[0]] = a.t
        self.ranks: dict[str, int] = dict(outer.ranks) if outer else {}
        for vi in (*graph.input, *graph.value_info, *graph.output):
            if vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape"):
                self.ranks[vi.name] = len(vi.type.tensor_type.shape.dim)
        self.used = {name for node in graph.node for name in node.input}

    def constant(self, name: str) -> np.ndarray | None:
        t = self.constants.get(name)
        return None if t is None else numpy_helper.to_array(t)


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _input(node: onnx.NodeProto, i: int) -> str:
    return node.input[i] if len(node.input) > i else ""


# --------------------------------------------------------------------------------------------- rules


def _pool(node, g) -> Iterable[str]:
    kernel = _attr(node, "kernel_shape")
    if kernel is not None and len(kernel) not in (2, 3):
        yield f"{len(kernel)}D pooling: only 2D or 3D pooling is supported"
    dilations = _attr(node, "dilations")
    if dilations is not None and any(d != 1 for d in dilations):
        yield f"dilations {list(dilations)}: must be empty or all ones"
    if node.op_type == "MaxPool" and len(node.output) > 1 and node.output[1]:
        yield "the Indices output is not supported"


def _constant(node, g) -> Iterable[str]:
    for name in ("sparse_value", "value_string", "value_strings"):
        if _attr(node, name) is not None:
            yield f"attribute {name} is not supported"


def _constant_input(index: int, what: str):
    def rule(node, g) -> Iterable[str]:
        name = _input(node, index)
        if name and name not in g.constants:
            yield f"{what} (input {index}, {name!r}) must be a build-time constant (initializer or Constant)"
    return rule


def _reduce(node, g) -> Iterable[str]:
    if _input(node, 1):
        yield from _constant_input(1, "axes")(node, g)


def _zero_point(index: int, quantized: bool):
    def rule(node, g) -> Iterable[str]:
        name = _input(node, index)
        if not name:
            return
        zp = g.constant(name)
        if zp is None:
            yield f"zero point {name!r} must be an initializer"
        elif np.any(zp != 0):
            yield f"zero point {name!r} must be zero (symmetric quantisation)"
        elif quantized and g.constants[name].data_type not in _QUANTIZED_TYPES:
            yield f"quantised type {TensorProto.DataType.Name(g.constants[name].data_type)} is not INT8, FP8, FP4 or INT4"
    return rule


def _resize(node, g) -> Iterable[str]:
    coord = _text(_attr(node, "coordinate_transformation_mode", "half_pixel"))
    if coord not in _RESIZE_COORDINATES:
        yield f"coordinate_transformation_mode {coord!r} is not supported"
    mode = _text(_attr(node, "mode", "nearest"))
    if mode not in ("nearest", "linear"):
        yield f"mode {mode!r}: only nearest and linear are supported"
    nearest = _text(_attr(node, "nearest_mode", "round_prefer_floor"))
    if mode == "nearest" and nearest not in _RESIZE_NEAREST:
        yield f"nearest_mode {nearest!r} is not supported"
    if _attr(node, "antialias", 0):
        yield "antialiasing is not supported"
    policy = _text(_attr(node, "keep_aspect_ratio_policy", "stretch"))
    if policy != "stretch":
        yield f"keep_aspect_ratio_policy {policy!r}: only stretch is supported"


def _scatter_elements(node, g) -> Iterable[str]:
    reduction = _text(_attr(node, "reduction", "none"))
    if reduction != "none":
        yield (f"reduction {reduction!r} is imported through TensorRT's ScatterElements plugin "
               "(onnxOpImporters.cpp scatterPluginHelper): not plugin-free")


def _scatter_nd(node, g) -> Iterable[str]:
    reduction = _text(_attr(node, "reduction", "none"))
    if reduction != "none":
        yield f"reduction {reduction!r}: only none is supported"


def _topk(node, g) -> Iterable[str]:
    if _attr(node, "sorted", 1) != 1:
        yield "sorted must be 1"
    k = g.constant(_input(node, 1)) if _input(node, 1) else None
    if k is not None and int(np.asarray(k).reshape(-1)[0]) >= _TOPK_MAX:
        yield f"K = {int(np.asarray(k).reshape(-1)[0])} must be less than {_TOPK_MAX}"


def _grid_sample(node, g) -> Iterable[str]:
    rank = g.ranks.get(_input(node, 0))
    if rank is not None and rank != 4:
        yield f"input of rank {rank}: only 4D input is supported"


def _cast(node, g) -> Iterable[str]:
    to = _attr(node, "to")
    if to is not None and to not in _CAST_TARGETS:
        yield f"cast to {TensorProto.DataType.Name(to)} is not supported"


def _dropout(node, g) -> Iterable[str]:
    name = _input(node, 2)
    if name:
        value = g.constant(name)
        if value is None or bool(np.asarray(value)):
            yield "is_training must be an initializer that is False"


def _layer_norm(node, g) -> Iterable[str]:
    if any(o and o in g.used for o in node.output[1:]):
        yield "only the first output Y is supported"


def _lstm(node, g) -> Iterable[str]:
    if _attr(node, "input_forget", 0) != 0:
        yield "input_forget must be 0"
    if _attr(node, "layout", 0) != 0:
        yield "layout must be 0"


_RULES: dict[str, list[Callable]] = {
    "AveragePool": [_pool], "MaxPool": [_pool], "LpPool": [_pool],
    "Constant": [_constant],
    "CumSum": [_constant_input(1, "axis")],
    "OneHot": [_constant_input(1, "depth")],
    "Squeeze": [_constant_input(1, "axes")], "Unsqueeze": [_constant_input(1, "axes")],
    "STFT": [_constant_input(1, "frame_step"), _constant_input(2, "window")],
    "QuantizeLinear": [_zero_point(2, quantized=True)], "DequantizeLinear": [_zero_point(2, quantized=True)],
    "Resize": [_resize],
    "ScatterElements": [_scatter_elements], "Scatter": [_scatter_elements], "ScatterND": [_scatter_nd],
    "TopK": [_topk], "GridSample": [_grid_sample], "Cast": [_cast], "Dropout": [_dropout],
    "LayerNormalization": [_layer_norm], "LSTM": [_lstm],
    **{op: [_reduce] for op in _REDUCE_OPS},
}


# ------------------------------------------------------------------------------------------- checker


def _schema(op_type: str, opset: int):
    try:
        return onnx.defs.get_schema(op_type, opset, "")
    except onnx.defs.SchemaError:
        return None


def _check_types(graph: onnx.GraphProto, report: CompatReport, top: bool) -> None:
    io = {vi.name for vi in (*graph.input, *graph.output)} if top else set()
    typed = [(vi.name, vi.type.tensor_type.elem_type) for vi in (*graph.input, *graph.output, *graph.value_info)
             if vi.type.HasField("tensor_type")]
    typed += [(t.name, t.data_type) for t in graph.initializer]
    for name, elem in typed:
        if elem == TensorProto.UNDEFINED or elem in _TYPES_OK:
            continue
        type_name = TensorProto.DataType.Name(elem)
        if elem == TensorProto.UINT8 and name in io:
            continue
        if elem == TensorProto.DOUBLE:
            report.issues.append(Issue(name, "tensor", "DOUBLE is cast down to FLOAT by TensorRT", "warning"))
        else:
            where = "inside the network" if elem == TensorProto.UINT8 else "at all"
            report.issues.append(Issue(name, "tensor", f"type {type_name} is not supported {where}"))


def _check_graph(graph: onnx.GraphProto, opset: int, report: CompatReport, outer: _Graph | None = None) -> None:
    g = _Graph(graph, outer)
    _check_types(graph, report, top=outer is None)
    for node in graph.node:
        report.num_nodes += 1
        name = node.name or (node.output[0] if node.output else "?")
        domain = node.domain or "ai.onnx"
        report.op_types[node.op_type if domain == "ai.onnx" else f"{domain}::{node.op_type}"] += 1
        if domain != "ai.onnx":
            report.issues.append(Issue(name, node.op_type, f"custom operator of domain {domain!r}: TensorRT needs a plugin"))
            continue
        if node.op_type in UNSUPPORTED_OPS or node.op_type not in SUPPORTED_OPS:
            report.issues.append(Issue(name, node.op_type, f"not supported by the {SOURCE_VERSION} ONNX parser"))
            continue
        schema = _schema(node.op_type, opset)
        known = set(schema.attributes) if schema is not None else None
        for a in node.attribute:
            if known is not None and a.name not in known:
                report.issues.append(Issue(name, node.op_type, f"attribute {a.name!r} is not in the ONNX schema at opset {opset}"))
            if a.type == onnx.AttributeProto.GRAPH:
                _check_graph(a.g, opset, report, g)
            elif a.type == onnx.AttributeProto.GRAPHS:
                for sub in a.graphs:
                    _check_graph(sub, opset, report, g)
        for rule in _RULES.get(node.op_type, ()):
            report.issues.extend(Issue(name, node.op_type, msg) for msg in rule(node, g))


def check_model(model: onnx.ModelProto, name: str = "model") -> CompatReport:
    """Check an in-memory model (shape inference is run on a copy to learn tensor ranks and types)."""
    opsets = {o.domain or "ai.onnx": o.version for o in model.opset_import}
    opset = opsets.get("ai.onnx", 0)
    report = CompatReport(name=name, opset=opset)
    if not OPSET_RANGE[0] <= opset <= OPSET_RANGE[1]:
        report.issues.append(Issue(name, "model", f"opset {opset} is outside {SOURCE_VERSION}'s range {OPSET_RANGE}"))
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:  # shape inference is only an aid; unknown ranks are not checked
        inferred = model
    _check_graph(inferred.graph, opset, report)
    return report


def check_onnx(path: str | Path) -> CompatReport:
    """Check an ONNX file (external data is not loaded: only the graph is read)."""
    model = onnx.load(str(path), load_external_data=False)
    return check_model(model, name=str(path))
