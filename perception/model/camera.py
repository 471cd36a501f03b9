"""Camera encoder: a timm ViT backbone with a ViTDet-style simple feature pyramid, and its fine-tuning tools.

What is here:
  - `build_vit_backbone`: a timm ViT (any plain `vit_*` with square patches: 16, or 14 for DINOv2) built for our
    image size, no classifier.
  - `load_backbone_checkpoint`: loads a local timm / Hugging Face checkpoint (``weights_only=True``), resamples
    the position embeddings to our patch grid, filters foreign keys and logs missing/unexpected ones.
  - `SimpleFeaturePyramid`, `CameraEncoder`: features at the patch stride (16 or 14) for the view transform.
  - `layer_decay_param_groups`: optimizer parameter groups with layer-wise lr decay over the ViT blocks.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import timm
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from perception.errors import ConfigError
from perception.model.weights import POS_EMBED_ANTIALIAS_KEY, safetensors_metadata, weights_file

logger = logging.getLogger(__name__)

# Prefixes that wrappers put in front of the backbone's own keys (DDP, our encoder, mmdet/detectron2 exports).
_WRAPPER_PREFIXES = ("module.", "model.", "backbone.", "camera_encoder.backbone.", "encoder.")


def build_vit_backbone(name: str, image_size: tuple[int, int], *, blocks: int | None = None,
                       drop_path_rate: float = 0.0) -> VisionTransformer:
    """A randomly initialised timm ViT for `image_size` (H, W) pixels, without classifier or pooling.

    Raises `ConfigError` if `name` is not a timm model or not a plain ViT with square patches, or (naming
    ``data.image_size``) if H or W is not a multiple of its patch size.
    """
    kwargs: dict = {"img_size": image_size, "num_classes": 0, "global_pool": "", "drop_path_rate": drop_path_rate}
    if blocks is not None:
        kwargs["depth"] = blocks
    try:
        model = timm.create_model(name, pretrained=False, **kwargs)
    except (RuntimeError, TypeError) as exc:  # timm raises RuntimeError for unknown names
        raise ConfigError(f"model.camera.backbone: cannot build timm model {name!r}: {exc}") from exc
    if not isinstance(model, VisionTransformer):
        raise ConfigError(f"model.camera.backbone: {name!r} is a {type(model).__name__}, expected a timm VisionTransformer")
    ph, pw = model.patch_embed.patch_size
    if ph != pw:
        raise ConfigError(f"model.camera.backbone: {name!r} has patch size {model.patch_embed.patch_size}, expected square patches")
    if image_size[0] % ph or image_size[1] % pw:
        raise ConfigError(f"data.image_size {tuple(image_size)}: H and W must be multiples of the patch size {ph} of "
                          f"model.camera.backbone {name!r}")
    return model


@dataclass
class CheckpointReport:
    """What happened when a checkpoint was loaded into a backbone (key names are the backbone's own).

    Attributes:
        path: the weights file that was read.
        loaded: keys copied into the backbone.
        missing: backbone keys the checkpoint did not provide (they keep their random initialisation).
        unexpected: checkpoint keys the backbone does not have (classifier heads, blocks beyond `blocks`).
        shape_mismatch: ``"key (checkpoint shape) != (backbone shape)"`` for keys skipped for their shape.
        resampled: keys resampled to the backbone's patch grid (``pos_embed``), with the grids.
        normalization: (mean, std) in [0, 1] units taken from the checkpoint's ``config.json``, or None.
    """

    path: Path
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    shape_mismatch: list[str] = field(default_factory=list)
    resampled: list[str] = field(default_factory=list)
    normalization: tuple[tuple[float, ...], tuple[float, ...]] | None = None


def read_state_dict(path: Path) -> dict[str, Tensor]:
    """Tensors of a local checkpoint: ``.safetensors``, a torch file (``.pth``/``.pt``/``.bin``, read with
    ``weights_only=True``), or a Hugging Face model folder holding ``model.safetensors`` or ``pytorch_model.bin``.
    Nested ``state_dict`` / ``model`` / ``state_dict_ema`` entries are unwrapped.
    """
    path = weights_file(path)
    if path.suffix == ".safetensors":
        try:
            state = load_file(str(path), device="cpu")
        except SafetensorError as exc:
            raise ConfigError(f"model.camera.pretrained: cannot read {path}: {exc}") from exc
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # pickle errors have many types; report them as bad input
            raise ConfigError(f"model.camera.pretrained: cannot read {path} with weights_only=True: {exc}") from exc
    for key in ("state_dict", "model", "state_dict_ema", "module"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
            break
    if not isinstance(state, dict):
        raise ConfigError(f"model.camera.pretrained: {path} does not hold a state dict")
    return {k: v for k, v in state.items() if isinstance(v, Tensor)}


def read_hf_config(path: Path) -> dict:
    """The ``pretrained_cfg`` of the timm / Hugging Face ``config.json`` beside the weights (or in the folder),
    with ``model_args`` merged in under the key ``model_args``; {} when there is none."""
    weights = weights_file(path)
    config_file = weights.parent / "config.json"
    if not config_file.is_file():
        return {}
    try:
        raw = json.loads(config_file.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"model.camera.pretrained: cannot read {config_file}: {exc}") from exc
    if not isinstance(raw, dict):
        return {}
    cfg = dict(raw.get("pretrained_cfg") or {})
    cfg["model_args"] = dict(raw.get("model_args") or {})
    return cfg


def _strip_prefixes(state: dict[str, Tensor], own_keys: set[str]) -> dict[str, Tensor]:
    for prefix in _WRAPPER_PREFIXES:
        if not any(k in own_keys for k in state) and any(k.startswith(prefix) for k in state):
            state = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}
    return state


def _source_patch_grid(num_tokens: int, hf_config: dict, patch_size: int, target: tuple[int, int]) -> tuple[int, int]:
    """(rows, cols) of the patch grid a checkpoint's position embedding was made for.

    In order: the image size recorded in the checkpoint's ``config.json`` (``model_args.img_size`` or
    ``input_size``); a square grid when `num_tokens` is a perfect square (every timm ImageNet checkpoint);
    otherwise the factorisation whose aspect ratio is closest to the `target` grid's.
    """
    size = hf_config.get("model_args", {}).get("img_size") or hf_config.get("input_size")
    if size is not None:
        size = [size, size] if isinstance(size, int) else list(size)[-2:]
        rows, cols = size[0] // patch_size, size[1] // patch_size
        if rows * cols == num_tokens:
            return rows, cols
    side = math.isqrt(num_tokens)
    if side * side == num_tokens:
        return side, side
    pairs = [(r, num_tokens // r) for r in range(1, num_tokens + 1) if num_tokens % r == 0]
    aspect = target[0] / target[1]
    return min(pairs, key=lambda rc: abs(math.log(rc[0] / rc[1] / aspect)))


def load_backbone_checkpoint(backbone: VisionTransformer, path: Path) -> CheckpointReport:
    """Load a local checkpoint into `backbone` in place; log and return a `CheckpointReport`.

    Accepts what timm writes (``torch.save(model.state_dict())`` as ``.pth``, ``safetensors`` files,
    `timm.models.save_for_hf` folders with ``config.json``) and the same wrapped in ``state_dict``/``model``
    entries or ``module.``/``backbone.`` prefixes. Torch files are read with ``weights_only=True``.

    Position embeddings made for another image size are resampled (bicubic, timm's `resample_abs_pos_embed`) to
    the backbone's patch grid (the source grid: see `_source_patch_grid`), with antialiasing unless the file's
    safetensors metadata says ``pos_embed_antialias: false`` (weights converted by `perception.model.weights`,
    whose source model resamples that way; their metadata ``img_size`` gives the source grid too). Keys of
    another shape are skipped and reported; classifier heads and blocks beyond the backbone's depth show as
    unexpected. When ``config.json`` gives the checkpoint's pixel mean/std, they replace the backbone's
    ``pretrained_cfg`` mean/std, so that `CameraEncoder` normalises images as the weights expect.

    Raises `ConfigError` if the file cannot be read or none of its tensors belongs to the backbone.
    """
    report = CheckpointReport(path=weights_file(path))
    own = backbone.state_dict()
    state = _strip_prefixes(read_state_dict(path), set(own))
    hf_config = read_hf_config(path)
    metadata = safetensors_metadata(report.path)
    if "img_size" in metadata and not hf_config.get("model_args", {}).get("img_size"):
        hf_config = {**hf_config, "model_args": {**hf_config.get("model_args", {}),
                                                 "img_size": [int(v) for v in metadata["img_size"].split(",")]}}
    antialias = metadata.get(POS_EMBED_ANTIALIAS_KEY, "true") != "false"

    if "pos_embed" in state and "pos_embed" in own and state["pos_embed"].shape != own["pos_embed"].shape:
        prefix = 0 if backbone.no_embed_class else backbone.num_prefix_tokens
        old_tokens = state["pos_embed"].shape[1] - prefix
        new_grid = tuple(backbone.patch_embed.grid_size)
        old_grid = _source_patch_grid(old_tokens, hf_config, backbone.patch_embed.patch_size[0], new_grid)
        state["pos_embed"] = resample_abs_pos_embed(
            state["pos_embed"], new_size=list(new_grid), old_size=list(old_grid), num_prefix_tokens=prefix,
            antialias=antialias,
        )
        report.resampled.append(f"pos_embed {old_grid[0]}x{old_grid[1]} -> {new_grid[0]}x{new_grid[1]}"
                                + ("" if antialias else " (no antialias)"))

    filtered: dict[str, Tensor] = {}
    for key, value in state.items():
        if key in own and own[key].shape != value.shape:
            report.shape_mismatch.append(f"{key} {tuple(value.shape)} != {tuple(own[key].shape)}")
        else:
            filtered[key] = value
    if not any(k in own for k in filtered):
        raise ConfigError(
            f"model.camera.pretrained: none of the {len(state)} tensors of {report.path} belongs to a timm "
            f"{type(backbone).__name__} (first keys: {', '.join(list(state)[:3])})"
        )
    result = backbone.load_state_dict(filtered, strict=False)
    report.missing = sorted(result.missing_keys)
    report.unexpected = sorted(result.unexpected_keys)
    report.loaded = sorted(k for k in filtered if k in own)
    if "mean" in hf_config and "std" in hf_config:
        report.normalization = (tuple(hf_config["mean"]), tuple(hf_config["std"]))
        backbone.pretrained_cfg = {**(backbone.pretrained_cfg or {}), "mean": report.normalization[0],
                                   "std": report.normalization[1]}
    logger.info(
        "loaded %s: %d tensors, %d missing, %d unexpected, %d shape-mismatched, resampled %s",
        report.path, len(report.loaded), len(report.missing), len(report.unexpected),
        len(report.shape_mismatch), report.resampled or "nothing",
    )
    for name, keys in (("missing", report.missing), ("unexpected", report.unexpected), ("shape-mismatched", report.shape_mismatch)):
        if keys:
            logger.warning("%s keys (%d): %s", name, len(keys), ", ".join(keys[:20]) + (" ..." if len(keys) > 20 else ""))
    return report


def _conv_norm_act(cin: int, cout: int, kernel: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
    )


class SimpleFeaturePyramid(nn.Module):
    """ViTDet's simple feature pyramid from the last ViT map (stride s = the patch size, 16 or 14), fused back to
    one map at stride s (``upsample=1``) or s/2 (``upsample=2``).

    Builds strides s/2 (2x2 transposed conv), s (identity) and 2s (max-pool, ceil mode: odd maps keep their
    last row), each with a 1x1 + 3x3 conv, then sums the three at the output stride (finer maps average-pooled,
    coarser ones bilinearly upsampled) and applies a 3x3 conv. Any map size (h, w) works.
    """

    def __init__(self, in_channels: int, out_channels: int, upsample: int = 1):
        super().__init__()
        if upsample not in (1, 2):
            raise ValueError(f"SimpleFeaturePyramid: upsample must be 1 or 2, not {upsample}")
        self.upsample = upsample
        self.up = nn.Sequential(
            nn.ConvTranspose2d(in_channels, in_channels // 2, 2, stride=2), nn.BatchNorm2d(in_channels // 2), nn.GELU()
        )
        self.down = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.lateral = nn.ModuleList([
            nn.Sequential(_conv_norm_act(c, out_channels, 1), _conv_norm_act(out_channels, out_channels, 3))
            for c in (in_channels // 2, in_channels, in_channels)
        ])
        self.out = _conv_norm_act(out_channels, out_channels, 3)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, C_in, h, w) ViT map at the patch stride -> (B, C_out, h * upsample, w * upsample)."""
        h, w = x.shape[-2:]
        p8 = self.lateral[0](self.up(x))
        p16 = self.lateral[1](x)
        p32 = self.lateral[2](self.down(x))
        if self.upsample == 2:
            fused = p8 + F.interpolate(p16, size=(2 * h, 2 * w), mode="bilinear", align_corners=False) \
                + F.interpolate(p32, size=(2 * h, 2 * w), mode="bilinear", align_corners=False)
        else:
            fused = p16 + F.avg_pool2d(p8, 2) + F.interpolate(p32, size=(h, w), mode="bilinear", align_corners=False)
        return self.out(fused)


class CameraEncoder(nn.Module):
    """Multi-camera image encoder: ViT backbone -> simple feature pyramid -> features at the patch stride (or half
    of it, ``neck.upsample == 2``).

    Args:
        backbone: a timm `VisionTransformer` built for the image size the encoder will see.
        neck: maps (B*N, embed_dim, H/p, W/p), p the patch size, to (B*N, out_channels, H/s, W/s), s =
            `feature_stride` (p divided by the neck's ``upsample``, 1 if it has none).
        out_channels: channels of `neck`'s output.
        weights_provenance: where the backbone's initial weights came from (`resolve_pretrained`'s provenance:
            ``name``, ``sha256``, ...; {} for random weights); checkpoints record it.
        pretrained_keys: names of the backbone's parameters that pretrained weights initialised
            (`CheckpointReport.loaded`); the rest start from random weights. Layer decay
            (`layer_decay_param_groups`) applies to the pretrained ones only.
    """

    def __init__(self, *, backbone: VisionTransformer, neck: nn.Module, out_channels: int,
                 weights_provenance: dict | None = None, pretrained_keys: Iterable[str] = ()):
        super().__init__()
        self.backbone = backbone
        self.neck = neck
        self.out_channels = out_channels
        self.weights_provenance: dict = dict(weights_provenance or {})
        self.pretrained_keys: frozenset[str] = frozenset(pretrained_keys)
        cfg = backbone.pretrained_cfg or {}
        # The backbone's normalisation in uint8 units, per RGB channel: pre-processing
        # (`perception.model.preprocess.Preprocessor`) feeds ``(image - pixel_mean) / pixel_std``.
        self.pixel_mean: tuple[float, float, float] = tuple(255.0 * float(v) for v in cfg.get("mean", (0.5, 0.5, 0.5)))
        self.pixel_std: tuple[float, float, float] = tuple(255.0 * float(v) for v in cfg.get("std", (0.5, 0.5, 0.5)))

    @property
    def feature_stride(self) -> int:
        """Image pixels per feature cell: the backbone's patch size (16; 14 for DINOv2) over the neck's upsampling."""
        return int(self.backbone.patch_embed.patch_size[0]) // self.upsample

    @property
    def upsample(self) -> int:
        return int(getattr(self.neck, "upsample", 1))

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(self.backbone.patch_embed.img_size)  # type: ignore[return-value]

    @property
    def feature_size(self) -> tuple[int, int]:
        """(h, w) of the output feature map."""
        h, w = self.backbone.patch_embed.grid_size
        return (h * self.upsample, w * self.upsample)

    @property
    def num_blocks(self) -> int:
        return len(self.backbone.blocks)

    def forward(self, images: Tensor) -> Tensor:
        """images: (B, N, 3, H, W) float, normalised -> (B, N, C, H/s, W/s) float, s = `feature_stride`."""
        b, n = images.shape[:2]
        x = images.flatten(0, 1)
        (feats,) = self.backbone.forward_intermediates(x, indices=[self.num_blocks - 1], norm=True, intermediates_only=True)
        feats = self.neck(feats)
        return feats.view(b, n, *feats.shape[1:])

    def freeze_blocks(self, num_blocks: int) -> None:
        """Stop gradients to the patch embedding, prefix tokens, position embedding and the first `num_blocks` blocks."""
        if num_blocks <= 0:
            return
        if num_blocks > self.num_blocks:
            raise ConfigError(f"model.camera.freeze_blocks: {num_blocks} exceeds the backbone's {self.num_blocks} blocks")
        bb = self.backbone
        frozen: list[nn.Module | nn.Parameter | None] = [bb.patch_embed, bb.cls_token, bb.reg_token, bb.pos_embed, *bb.blocks[:num_blocks]]
        for item in frozen:
            if isinstance(item, nn.Parameter):
                item.requires_grad_(False)
            elif isinstance(item, nn.Module):
                item.requires_grad_(False)
        logger.info("froze patch embedding and %d of %d ViT blocks", num_blocks, self.num_blocks)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.backbone.set_grad_checkpointing(enable)

    def layer_id(self, backbone_param_name: str) -> int:
        """Depth of a backbone parameter for layer decay: 0 for embeddings, i + 1 for block i, L + 1 after."""
        if backbone_param_name.startswith(("cls_token", "reg_token", "pos_embed", "patch_embed")):
            return 0
        if backbone_param_name.startswith("blocks."):
            return int(backbone_param_name.split(".")[1]) + 1
        return self.num_blocks + 1


def layer_decay_param_groups(model: nn.Module, *, lr: float, weight_decay: float, layer_decay: float,
                             camera_prefix: str = "camera_encoder.") -> list[dict]:
    """Optimizer parameter groups with layer-wise lr decay over the pretrained part of the camera ViT (BEiT/MAE
    recipe).

    A backbone parameter that pretrained weights initialised (`CameraEncoder.pretrained_keys`) at depth ``i``
    (see `CameraEncoder.layer_id`, L blocks) gets ``lr * layer_decay ** (L + 1 - i)``. Every new parameter, in the
    backbone (all of it when it starts from random weights) or outside it, learns at `lr`. Biases, norms (1-D
    parameters) and position/prefix tokens get no weight decay. Frozen parameters are left out.

    Returns: a list of ``{"params", "lr", "weight_decay", "lr_scale", "name"}`` dicts for `torch.optim`.
    """
    encoder = model.get_submodule(camera_prefix.rstrip(".")) if camera_prefix else None
    if encoder is not None and not isinstance(encoder, CameraEncoder):
        raise TypeError(f"{camera_prefix!r} is a {type(encoder).__name__}, not a CameraEncoder")
    backbone_prefix = camera_prefix + "backbone."
    num_layers = encoder.num_blocks + 1 if encoder is not None else 0
    groups: dict[tuple[int, bool], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if encoder is not None and name.startswith(backbone_prefix):
            sub = name[len(backbone_prefix):]
            layer = encoder.layer_id(sub) if sub in encoder.pretrained_keys else num_layers
            no_decay = param.ndim <= 1 or sub in ("cls_token", "reg_token", "pos_embed")
        else:
            layer = num_layers
            no_decay = param.ndim <= 1
        scale = layer_decay ** (num_layers - layer)
        key = (layer, no_decay)
        if key not in groups:
            groups[key] = {"params": [], "lr": lr * scale, "lr_scale": scale,
                           "weight_decay": 0.0 if no_decay else weight_decay,
                           "name": f"layer{layer}_{'no_decay' if no_decay else 'decay'}"}
        groups[key]["params"].append(param)
    return [groups[k] for k in sorted(groups)]
