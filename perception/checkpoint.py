"""Checkpoints: one format, written atomically, read without running pickled code, self-contained.

File format (``format_version`` 2): a ``torch.save``d dict ``{"format": "perception-checkpoint",
"format_version": 2, "sha256": hex digest of the payload, "payload": bytes}``, where the payload is a
``torch.save``d dict of plain data only: tensors, bools, ints, floats, strings, bytes, None, and lists, tuples
and dicts of those (`to_plain` converts numpy values and refuses anything else). Every file is read with
``torch.load(weights_only=True)``: a file that holds any other pickled object (which could run code when
unpickled) is refused with a `PerceptionError` naming the file. Version-1 files (same wrapping, numpy RNG
states inside) and plain ``torch.save``d dicts still load, with numpy arrays as the only extra types allowed.

A training checkpoint's payload (`perception.training.Trainer.state_dict`) holds: ``model``, ``optimizer``,
``scheduler``, ``scaler``, ``ema``, ``step`` (global batches consumed, skipped bad steps included), ``total_steps``,
``bad_steps`` (optimizer steps skipped), ``best_nds``, ``history``, ``skipped``, ``rng`` (`rng_state`),
``version`` and what rebuilds and runs the model anywhere:
  - ``config``: the resolved experiment config without machine-local weight paths (`portable_config`:
    ``model.camera.pretrained`` is null: those weights are in ``model`` already);
  - ``provenance``: what those weights were: ``{"model.camera.pretrained": "vit.pth" (a file name), "dinov2-small"
    (a registered name) or "timm:NAME", "model.camera.pretrained_sha256": SHA-256 of the tensors file}``, and for
    registered weights ``..._arch``, ``..._licence``, ``..._source`` (``package==version``);
  - ``model_card`` (`model_card`): the image normalisation, the class lists, the BEV and map grids.

`model_from_checkpoint` is the one "checkpoint -> model" path of evaluation, robustness, viz and export.
`prune_checkpoints` deletes the periodic ``step_N.pt`` beyond ``train.keep_checkpoints``.
"""

from __future__ import annotations

import collections
import hashlib
import io
import logging
import os
import random
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from timm.layers import resample_abs_pos_embed
from torch import Tensor, nn

from perception.config import ExperimentConfig, config_from_dict
from perception.errors import PerceptionError
from perception.model.build import build_model
from perception.structures import MAP_CLASSES, SCENE_TAGS

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "perception-checkpoint"
CHECKPOINT_VERSION = 2


# ----------------------------------------------------------------------------------------- plain data


def to_plain(obj: Any, where: str = "checkpoint") -> Any:
    """`obj` as data that ``torch.load(weights_only=True)`` reads: numpy scalars become Python numbers, numpy
    arrays tensors, paths strings, tensor subclasses (``nn.Parameter``) plain tensors; dicts (OrderedDict kept,
    with a state dict's ``_metadata``), lists and tuples are converted item by item.

    Raises TypeError naming the key path (`where`) of anything else (a class instance, a function, a set).
    """
    if obj is None or type(obj) in (bool, int, float, str, bytes):
        return obj
    if isinstance(obj, (bool, int, float, str, bytes)):  # subclasses (enums, ...): their base value
        return next(t for t in (bool, int, float, str, bytes) if isinstance(obj, t))(obj)
    if isinstance(obj, Tensor):
        return obj if type(obj) is Tensor else obj.detach().as_subclass(Tensor)
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind in "biufc":
            return torch.from_numpy(np.array(obj))
        if obj.dtype.kind in "US":
            return obj.tolist()
        raise TypeError(f"{where}: a numpy array of dtype {obj.dtype} is not plain data")
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, dict):
        out = collections.OrderedDict() if isinstance(obj, collections.OrderedDict) else {}
        for k, v in obj.items():
            if not isinstance(k, (str, int)):
                raise TypeError(f"{where}: key {k!r} of type {type(k).__name__} is not a string or integer")
            out[to_plain(k)] = to_plain(v, f"{where}.{k}")
        metadata = getattr(obj, "_metadata", None)  # nn.Module.state_dict's per-module versions
        if isinstance(out, collections.OrderedDict) and metadata is not None:
            out._metadata = to_plain(dict(metadata), f"{where}._metadata")  # type: ignore[attr-defined]
        return out
    if isinstance(obj, (list, tuple)):
        items = [to_plain(v, f"{where}[{i}]") for i, v in enumerate(obj)]
        return items if isinstance(obj, list) else tuple(items)
    raise TypeError(f"{where}: a {type(obj).__module__}.{type(obj).__qualname__} is not plain data "
                    "(tensors, numbers, strings, bytes, lists, tuples, dicts)")


def rng_state() -> dict:
    """Every RNG state (Python, numpy, torch, CUDA) as plain data: ints, floats, strings and tensors."""
    version, internal, gauss_next = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state = {
        "python": {"version": version, "state": torch.tensor(internal, dtype=torch.int64), "gauss_next": gauss_next},
        "numpy": {"bit_generator": str(name), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what `rng_state` returned (or the tuples of format-1 checkpoints)."""
    py, npy = state["python"], state["numpy"]
    if isinstance(py, dict):
        py = (py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss_next"])
    if isinstance(npy, dict):
        npy = (npy["bit_generator"], npy["keys"].cpu().numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
               npy["cached_gaussian"])
    random.setstate(py)
    np.random.set_state(npy)
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


# ------------------------------------------------------------------------------------------ the file


def save_atomic(obj: dict, path: Path) -> None:
    """Write a checkpoint: `obj` (converted by `to_plain`; TypeError naming the key for anything that is not
    plain data) serialised with torch.save, wrapped with a format version and its SHA-256, written to a temp
    file in the same folder, fsynced, then renamed over `path`. On any failure (disk full, ...) the temp file
    is removed and `path` keeps its previous content."""
    path = Path(path)
    buf = io.BytesIO()
    torch.save(to_plain(obj), buf)
    payload = buf.getvalue()
    wrapped = {"format": CHECKPOINT_FORMAT, "format_version": CHECKPOINT_VERSION,
               "sha256": hashlib.sha256(payload).hexdigest(), "payload": payload}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(wrapped, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise PerceptionError(f"{path}: cannot write checkpoint ({exc.strerror or exc}); the previous one is kept") from None


def _legacy_globals() -> list:
    """The numpy types format-1 checkpoints hold (RNG states, metric values): arrays and scalars are data (an
    object array's items go through the same restricted unpickler). Named as numpy 1 and numpy 2 pickle them."""
    reconstruct, scalar = np.ndarray.__reduce__(np.zeros(1))[0], np.float64(0).__reduce__()[0]
    found = [np.ndarray, np.dtype, *{type(np.dtype(t)) for t in (np.uint32, np.int64, np.float64, np.float32, np.bool_)}]
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        found += [(reconstruct, f"{module}._reconstruct"), (scalar, f"{module}.scalar")]
    return found


def _safe_load(source, path: Path, map_location, what: str, *, legacy: bool) -> Any:
    """``torch.load(weights_only=True)`` of `source`, with one-line PerceptionErrors naming `path`."""
    try:
        if legacy:
            with torch.serialization.safe_globals(_legacy_globals()):
                return torch.load(source, map_location=map_location, weights_only=True)
        return torch.load(source, map_location=map_location, weights_only=True)
    except Exception as exc:  # truncated or foreign file: pickle, zip and torch errors of many types
        text = str(exc)
        if "Weights only load failed" in text:
            found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
            reason = f"a pickled {found.group(1)}" if found else re.sub(r"\s+", " ", text.split("WeightsUnpickler error:")[-1]).strip()[:200]
            raise PerceptionError(f"{path}: refused: the {what} holds {reason}, not only tensors and plain data "
                                  "(unpickling it could run code)") from None
        first = re.sub(r"\s+", " ", text).strip()[:300]
        raise PerceptionError(f"{path}: {what} is truncated or corrupt ({type(exc).__name__}: {first})") from None


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    """Read a checkpoint written by `save_atomic` (checking format version and checksum), or a plain
    `torch.save`d dict (older files, other tools), with ``weights_only=True``. Raises PerceptionError naming
    the file for a missing, truncated or corrupt file, and for one holding pickled objects other than plain
    data (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise PerceptionError(f"{path}: checkpoint not found")
    obj = _safe_load(path, path, map_location, "checkpoint", legacy=True)
    if not isinstance(obj, dict):
        raise PerceptionError(f"{path}: not a checkpoint (a {type(obj).__name__}, expected a dict)")
    if obj.get("format") != CHECKPOINT_FORMAT:
        return obj
    version = obj.get("format_version", 0)
    if version > CHECKPOINT_VERSION:
        raise PerceptionError(f"{path}: checkpoint format version {version} is newer than this code reads "
                              f"({CHECKPOINT_VERSION}); upgrade perception-stack")
    payload = obj.get("payload", b"")
    if not isinstance(payload, bytes) or hashlib.sha256(payload).hexdigest() != obj.get("sha256"):
        raise PerceptionError(f"{path}: checkpoint is corrupt (SHA-256 of its payload does not match)")
    state = _safe_load(io.BytesIO(payload), path, map_location, "checkpoint payload", legacy=version < 2)
    if not isinstance(state, dict):
        raise PerceptionError(f"{path}: checkpoint payload is a {type(state).__name__}, expected a dict")
    return state


def newest_valid_checkpoint(ckpt_dir: Path, map_location="cpu") -> tuple[Path, dict] | None:
    """`last.pt` if it reads, else the valid checkpoint with the highest step (step_*.pt, best.pt); None if
    there is none. Every unreadable file is logged."""
    candidates = [ckpt_dir / "last.pt"] + sorted(ckpt_dir.glob("step_*.pt"), reverse=True) + [ckpt_dir / "best.pt"]
    best: tuple[Path, dict] | None = None
    for path in candidates:
        if not path.is_file():
            continue
        try:
            ckpt = load_checkpoint(path, map_location)
        except PerceptionError as exc:
            log.warning("skipping unreadable checkpoint: %s", exc)
            continue
        if path.name == "last.pt":
            return path, ckpt
        if best is None or ckpt.get("step", -1) > best[1].get("step", -1):
            best = (path, ckpt)
    return best


STEP_CHECKPOINT = re.compile(r"step_(\d+)\.pt")


def prune_checkpoints(ckpt_dir: Path, keep: int, current_step: int) -> list[Path]:
    """Delete the periodic checkpoints of `ckpt_dir` that ``train.keep_checkpoints`` no longer keeps; returns
    the deleted paths.

    Only files named ``step_<digits>.pt`` directly in `ckpt_dir` are candidates (``last.pt``, ``best.pt``, temp
    files of `save_atomic` and anything else are never touched). The kept ones are the `keep` newest with a step
    <= `current_step` (the run's step, whose ``step_N.pt`` was just written when ``keep >= 1``); files of a later
    step (left by a run resumed from an older checkpoint) are left alone: the run overwrites them when it gets
    there. The newest step file thus always survives, so `newest_valid_checkpoint` still finds it. A file that
    cannot be deleted is logged, not raised (disk use is no reason to stop a run).
    """
    steps = []
    for path in Path(ckpt_dir).iterdir():
        found = STEP_CHECKPOINT.fullmatch(path.name)
        if found and path.is_file() and int(found.group(1)) <= current_step:
            steps.append((int(found.group(1)), path))
    steps.sort(reverse=True)
    deleted = []
    for _, path in steps[keep:]:
        try:
            path.unlink()
            deleted.append(path)
        except OSError as exc:
            log.warning("%s: cannot delete old checkpoint (%s)", path, exc.strerror or exc)
    return deleted


# -------------------------------------------------------------------------------- model <-> checkpoint


def portable_config(cfg: ExperimentConfig, camera_weights: dict | None = None) -> tuple[dict, dict]:
    """(config, provenance): `cfg` as JSON data without machine-local weight paths (``model.camera.pretrained``
    null: the weights it loaded are in the checkpoint's state dict), and what was removed.

    Args:
        cfg: the experiment config.
        camera_weights: the built model's ``camera_encoder.weights_provenance`` (`resolve_pretrained`'s:
            ``name``, ``sha256``, ...); without it only the file name (or registered name) is recorded.
    """
    raw = cfg.model_dump(mode="json")
    provenance: dict[str, Any] = {}
    if cfg.model.camera.pretrained is not None:
        weights = dict(camera_weights or {})
        provenance["model.camera.pretrained"] = weights.pop("name", None) or Path(cfg.model.camera.pretrained).name
        for key, value in sorted(weights.items()):
            provenance[f"model.camera.pretrained_{key}"] = value
        raw["model"]["camera"]["pretrained"] = None
    return raw, provenance


def model_card(model: nn.Module) -> dict:
    """What running a `BEVFusionModel` needs beyond its config and weights: the camera normalisation
    (``(image_uint8 - pixel_mean) / pixel_std`` per RGB channel, uint8 units), the class lists in output order
    and the BEV and map grids (metres, `BEVGrid` fields)."""
    enc = model.camera_encoder
    classes = model.decode.classes
    return {
        "normalization": {"pixel_mean": list(enc.pixel_mean), "pixel_std": list(enc.pixel_std)},
        "classes": {"detection": list(classes.names), "attributes": list(classes.attributes), "map": list(MAP_CLASSES),
                    "scene_tags": list(SCENE_TAGS)},
        "grid": asdict(model.grid),
        "map_grid": asdict(model.map_grid),
    }


def model_state_from(ckpt: dict, prefer_ema: bool = True) -> dict:
    """The model weights of a training checkpoint: the EMA's when present (and `prefer_ema`)."""
    if prefer_ema and ckpt.get("ema") is not None:
        return ckpt["ema"]["shadow"]
    return ckpt["model"]


def resample_pos_embed(state: dict[str, Tensor], model: nn.Module, trained_size: tuple[int, int]) -> None:
    """Resample the camera ViT's position embedding in `state`, made for images of `trained_size` (H, W), to
    `model`'s patch grid in place (bicubic, timm's `resample_abs_pos_embed`)."""
    key = "camera_encoder.backbone.pos_embed"
    backbone = model.camera_encoder.backbone
    if key not in state or state[key].shape == backbone.pos_embed.shape:
        return
    prefix = 0 if backbone.no_embed_class else backbone.num_prefix_tokens
    patch = backbone.patch_embed.patch_size[0]
    old_grid = (trained_size[0] // patch, trained_size[1] // patch)
    new_grid = tuple(backbone.patch_embed.grid_size)
    state[key] = resample_abs_pos_embed(state[key], new_size=list(new_grid), old_size=list(old_grid), num_prefix_tokens=prefix)
    log.info("resampled the camera position embedding %dx%d -> %dx%d for image size %s", *old_grid, *new_grid,
             tuple(model.camera_encoder.image_size))


@dataclass
class CheckpointModel:
    """A model rebuilt from a training checkpoint.

    Attributes:
        model: the `BEVFusionModel` in eval mode, on the requested device, with the checkpoint's weights (EMA
            when present) and normalisation.
        config: the config it was built from (the checkpoint's, portable; another ``data.image_size`` if asked).
        source: provenance: ``{"checkpoint": path, "step": int, "ema": bool}``.
    """

    model: nn.Module
    config: ExperimentConfig
    source: dict[str, Any]


def _check_card(card: dict, model: nn.Module, path: Path) -> None:
    """Refuse a checkpoint whose class lists or grids differ from what this code and its config build."""
    built = model_card(model)
    for what in ("detection", "attributes", "map", "scene_tags"):
        if list(card.get("classes", {}).get(what, built["classes"][what])) != built["classes"][what]:
            raise PerceptionError(f"{path}: trained for {what} classes {card['classes'][what]}, but this code has "
                                  f"{built['classes'][what]}")
    for what in ("grid", "map_grid"):
        if what in card and card[what] != built[what]:
            raise PerceptionError(f"{path}: model_card {what} {card[what]} differs from the {what} its config "
                                  f"builds ({built[what]})")


def model_from_checkpoint(checkpoint: str | Path, *, device: torch.device | str | None = None,
                          image_size: tuple[int, int] | None = None, prefer_ema: bool = True) -> CheckpointModel:
    """Rebuild the model of a training checkpoint (any machine: no file besides the checkpoint is read).

    Args:
        checkpoint: a training checkpoint (.pt) of this stack.
        device: where the model goes (default CPU).
        image_size: (H, W) to rebuild the model for another camera image size (multiples of the backbone's patch
            size, 16 or 14; the ViT position embeddings are resampled); None keeps the trained ``data.image_size``.
        prefer_ema: use the EMA weights when the checkpoint has them.

    Format-1 checkpoints (no ``model_card``) get their normalisation from ``model.camera.pretrained``'s
    ``config.json`` while that file exists; otherwise the backbone's default, with a warning.

    Raises PerceptionError naming the file for an unreadable or foreign checkpoint, or weights that do not fit.
    """
    path = Path(checkpoint)
    ckpt = load_checkpoint(path)
    if "config" not in ckpt:
        raise PerceptionError(f"{path}: not a training checkpoint of this stack (no 'config' key)")
    trained = config_from_dict(ckpt["config"], source=f"{path} config")
    card = ckpt.get("model_card")
    raw = trained.model_dump(mode="json")
    pretrained = trained.model.camera.pretrained
    if card is None and pretrained is not None and Path(pretrained).exists():
        log.info("%s: format-1 checkpoint: image normalisation from %s", path, pretrained)
    else:
        if card is None and pretrained is not None:
            log.warning("%s: format-1 checkpoint and %s is gone: the camera normalisation falls back to the "
                        "backbone's default", path, pretrained)
        raw["model"]["camera"]["pretrained"] = None
    if image_size is not None:
        raw["data"]["image_size"] = list(image_size)
    cfg = config_from_dict(raw, source=f"{path} config" + (f" with image size {image_size}" if image_size else ""))
    model = build_model(cfg)
    state = dict(model_state_from(ckpt, prefer_ema))
    resample_pos_embed(state, model, tuple(trained.data.image_size))
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise PerceptionError(f"{path}: weights do not fit the model its config builds ({len(result.missing_keys)} "
                              f"missing, e.g. {result.missing_keys[:2]}; {len(result.unexpected_keys)} unexpected, "
                              f"e.g. {result.unexpected_keys[:2]})")
    if card is not None:
        _check_card(card, model, path)
        norm = card["normalization"]
        enc = model.camera_encoder
        enc.pixel_mean = tuple(float(v) for v in norm["pixel_mean"])
        enc.pixel_std = tuple(float(v) for v in norm["pixel_std"])
    model = model.to(device or "cpu").eval()
    return CheckpointModel(model, cfg, {"checkpoint": str(path), "step": ckpt.get("step"), "ema": prefer_ema and ckpt.get("ema") is not None})


def init_from_checkpoint(model: nn.Module, path: str | Path) -> tuple[list[str], list[str]]:
    """Load model weights only (fine-tuning); returns and logs (missing, unexpected) keys. Keys whose shapes
    differ (e.g. another head size) are skipped and reported as missing."""
    ckpt = load_checkpoint(path)
    state = ckpt["model"] if isinstance(ckpt, dict) and "model" in ckpt else ckpt
    own = model.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    mismatched = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    result = model.load_state_dict(usable, strict=False)
    missing, unexpected = list(result.missing_keys), list(result.unexpected_keys) + [k for k in state if k not in own]
    log.info("init from %s: %d tensors loaded, %d missing%s, %d unexpected%s, %d with other shapes%s", path, len(usable),
             len(missing), f" (e.g. {missing[:3]})" if missing else "", len(unexpected), f" (e.g. {unexpected[:3]})" if unexpected else "",
             len(mismatched), f" (e.g. {mismatched[:3]})" if mismatched else "")
    return missing, sorted(set(unexpected))
