"""The exported graphs: `BEVFusionModel.forward` itself, with flat named inputs and outputs.

No arithmetic lives here. `ExportedCore` unflattens the graph's inputs into `CoreInputs`, calls the model's
forward (the same code training and `perception eval` run) and returns the head outputs in `OUTPUT_NAMES`
order (the depth probabilities, which only the training loss reads, are left out). `stages` cuts the same
forward into the graphs `perception bench latency` times one by one (camera, BEV pooling, LiDAR, radar,
fuse + heads), each a call of the model's own methods.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import Tensor, nn

from perception.model.bevfusion import BEVFusionModel
from perception.model.preprocess import PILLAR_INPUTS, CoreInputs, core_input_names

# Head outputs of the exported core, in graph order (`BEVFusionModel.forward` keys without the depth).
OUTPUT_NAMES: tuple[str, ...] = ("heatmap", "offset", "z", "log_size", "rot", "velocity", "attribute", "map", "scene")


class ExportedCore(nn.Module):
    """``forward(*inputs)``: the `core_input_names` tensors in order -> the `OUTPUT_NAMES` tensors of
    ``model(*CoreInputs.as_args())``: heatmap (B, 10, H, W) logits, offset (B, 2, H, W), z (B, 1, H, W),
    log_size (B, 3, H, W), rot (B, 2, H, W), velocity (B, 2, H, W), attribute (B, 8, H, W) logits,
    map (B, 6, H_map, W_map) logits, scene (B, 6) logits. Shares the model's modules and weights."""

    def __init__(self, model: BEVFusionModel):
        super().__init__()
        self.model = model
        self.geometry_names = model.view_transform.rig_geometry.input_names
        self.input_names = core_input_names(self.geometry_names)

    def forward(self, *inputs: Tensor) -> tuple[Tensor, ...]:
        return _in_output_order(self.model(*CoreInputs.from_flat(inputs, self.geometry_names).as_args()))


class _Stage(nn.Module):
    """One stage: ``call(model, *inputs)``, returning a tensor or a tuple of them."""

    def __init__(self, model: BEVFusionModel, call: Callable[..., Tensor | tuple[Tensor, ...]]):
        super().__init__()
        self.model = model
        self.call = call

    def forward(self, *inputs: Tensor) -> Tensor | tuple[Tensor, ...]:
        return self.call(self.model, *inputs)


@dataclass(frozen=True)
class StageSpec:
    """One stage of the core as a graph of its own: its module and its input and output names."""

    name: str
    module: nn.Module
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


def _in_output_order(out: dict[str, Tensor]) -> tuple[Tensor, ...]:
    return tuple(out[name] for name in OUTPUT_NAMES)


def stages(model: BEVFusionModel) -> tuple[StageSpec, ...]:
    """The stages of ``model.forward`` in execution order, for timing and per-stage export."""
    vt = model.view_transform
    pillars = lambda s: tuple(f"{s}_{n}" for n in PILLAR_INPUTS)  # noqa: E731
    return (
        StageSpec("camera", _Stage(model, lambda m, images: m.view_transform.lift(m.camera_encoder(images))),
                  ("images",), vt.lift_names),
        StageSpec("bev_pooling", _Stage(model, lambda m, *x: m.view_transform.splat(*x)),
                  (*vt.lift_names, *vt.rig_geometry.input_names), ("camera_bev",)),
        StageSpec("lidar", _Stage(model, lambda m, *x: m.lidar_encoder(*x)), pillars("lidar"), ("lidar_bev",)),
        StageSpec("radar", _Stage(model, lambda m, *x: m.radar_encoder(*x)), pillars("radar"), ("radar_bev",)),
        StageSpec("fuse_heads", _Stage(model, lambda m, *x: _in_output_order(m.fuse_heads(*x))),
                  ("camera_bev", "lidar_bev", "radar_bev", "modality_mask"), OUTPUT_NAMES),
    )
