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
from perception.model.temporal import History

# Head outputs of the exported core, in graph order (`BEVFusionModel.forward` keys without the depth).
OUTPUT_NAMES: tuple[str, ...] = ("heatmap", "offset", "z", "log_size", "rot", "velocity", "attribute", "map", "scene")
# A temporal model's core also takes the history (`perception.model.temporal.History`, after the sensor inputs)
# and returns the fused BEV that is the next keyframe's `prev_bev` (after the head outputs): the runner carries it.
TEMPORAL_INPUTS: tuple[str, ...] = ("prev_bev", "curr2prev", "has_history")
STATE_OUTPUT = "bev"


def history_feeds(history: History) -> dict[str, Tensor]:
    """``{TEMPORAL_INPUTS name: tensor}`` of a `History`."""
    return dict(zip(TEMPORAL_INPUTS, history.as_tuple()))


class ExportedCore(nn.Module):
    """``forward(*inputs)``: the `input_names` tensors in order -> the `output_names` tensors of
    ``model(*CoreInputs.as_args(), history)``: heatmap (B, 10, H, W) logits, offset (B, 2, H, W), z (B, 1, H, W),
    log_size (B, 3, H, W), rot (B, 2, H, W), velocity (B, 2, H, W), attribute (B, 8, H, W) logits,
    map (B, 6, H_map, W_map) logits, scene (B, 6) logits; for a temporal model the inputs end with
    `TEMPORAL_INPUTS` and the outputs with `STATE_OUTPUT` (B, C, H, W). Shares the model's modules and weights."""

    def __init__(self, model: BEVFusionModel):
        super().__init__()
        self.model = model
        self.geometry_names = model.view_transform.rig_geometry.input_names
        self.temporal = model.temporal is not None
        self.input_names = core_input_names(self.geometry_names) + (TEMPORAL_INPUTS if self.temporal else ())
        self.output_names = OUTPUT_NAMES + ((STATE_OUTPUT,) if self.temporal else ())

    def forward(self, *inputs: Tensor) -> tuple[Tensor, ...]:
        history = None
        if self.temporal:
            inputs, history = inputs[:-len(TEMPORAL_INPUTS)], History(*inputs[-len(TEMPORAL_INPUTS):])
        out = self.model(*CoreInputs.from_flat(inputs, self.geometry_names).as_args(), history)
        return tuple(out[name] for name in self.output_names)

    def empty_history(self, batch_size: int, device) -> dict[str, Tensor]:
        """Feeds of `TEMPORAL_INPUTS` without any history ({} for a single-frame model)."""
        if not self.temporal:
            return {}
        return history_feeds(History.empty(batch_size, self.model.fuser.out_channels, self.model.grid, device))


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
