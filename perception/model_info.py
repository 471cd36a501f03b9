"""Parameters and FLOPs of the fused BEV model, per top-level module and in total (`perception model-info`).

FLOPs come from `torch.utils.flop_counter.FlopCounterMode` on one forward pass of the exportable core for a
single synthetic sample at the config's image and grid size (batch size 1, 6 cameras). FlopCounterMode counts
matmuls, convolutions and attention (1 multiply-add = 2 FLOPs); element-wise ops, scatter-add BEV pooling,
grid_sample and the pre-processing (voxelisation, normalisation) are not counted.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from perception.config import ExperimentConfig, load_config
from perception.model.build import build_model
from perception.model.synthetic import make_synthetic_batch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModuleFigures:
    name: str
    params: int
    trainable_params: int
    flops: int


@dataclass(frozen=True)
class ModelInfo:
    config: str
    rows: tuple[ModuleFigures, ...]
    total: ModuleFigures
    camera: str = ""  # which backbone the camera starts from (`camera_line`)

    def format_table(self) -> str:
        lines = [f"model-info: {self.config}", f"{'module':<18}{'params (M)':>12}{'trainable (M)':>15}{'GFLOPs':>10}"]
        for r in (*self.rows, self.total):
            if r is self.total:
                lines.append("-" * 55)
            lines.append(f"{r.name:<18}{r.params / 1e6:>12.3f}{r.trainable_params / 1e6:>15.3f}{r.flops / 1e9:>10.2f}")
        lines.append("GFLOPs: one forward of the exportable core for 1 sample (6 cameras); matmuls, convolutions and")
        lines.append("attention only (scatter-add pooling, grid_sample, voxelisation and decoding are not counted).")
        if self.camera:
            lines.append(self.camera)
        return "\n".join(lines)


def camera_line(backbone: str, blocks: int | None, provenance: dict) -> str:
    """``camera: <backbone>[, first N blocks], pretrained <name> (sha256 <hex>)`` or ``..., random initialisation``
    from the encoder's `weights_provenance` (`perception.model.weights.resolve_pretrained`)."""
    head = f"camera: {backbone}" + (f", first {blocks} blocks" if blocks else "")
    if not provenance:
        return head + ", random initialisation (model.camera.pretrained: null)"
    name = provenance.get("name") or provenance.get("path") or "a checkpoint"
    sha = provenance.get("sha256")
    return head + f", pretrained {name}" + (f" (sha256 {sha})" if sha else "")


def _cpu_attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of CPU fused attention, which FlopCounterMode does not count by itself (it does on GPU)."""
    return sdpa_flop_count(query_shape, key_shape, value_shape)


_CPU_ATTENTION = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops}


def compute_model_info(cfg: ExperimentConfig, name: str = "config") -> ModelInfo:
    """Per-module parameter counts and forward FLOPs of `cfg`'s model for one sample."""
    model = build_model(cfg).eval()
    grid = cfg.grid.build()
    batch = make_synthetic_batch(batch_size=1, image_size=cfg.data.image_size, grid=grid, boxes_per_sample=8,
                                 background_points=20000, seed=0, num_cameras=len(model.rig.cameras))
    inputs = model.prepare(batch)
    counter = FlopCounterMode(display=False, custom_mapping=_CPU_ATTENTION)
    with torch.no_grad(), counter:
        model(*inputs.as_args())
    counts = counter.get_flop_counts()
    root = type(model).__name__
    rows = []
    for child_name, child in model.named_children():
        params = sum(p.numel() for p in child.parameters())
        trainable = sum(p.numel() for p in child.parameters() if p.requires_grad)
        flops = sum(counts.get(f"{root}.{child_name}", {}).values())
        rows.append(ModuleFigures(child_name, params, trainable, int(flops)))
    total = ModuleFigures(
        "total", sum(p.numel() for p in model.parameters()), sum(p.numel() for p in model.parameters() if p.requires_grad),
        int(sum(counts.get("Global", {}).values())),
    )
    camera = camera_line(cfg.model.camera.backbone, cfg.model.camera.blocks, model.camera_encoder.weights_provenance)
    return ModelInfo(config=name, rows=tuple(rows), total=total, camera=camera)


def model_info_for_file(path: Path, overrides: Sequence[str] = ()) -> ModelInfo:
    return compute_model_info(load_config(path, overrides), name=str(path))
