"""ONNX export of the model's tensor core (`BEVFusionModel.forward`).

What exports: camera backbone and pyramid, the view transform (lift-splat's scatter-add BEV pooling as
``ScatterElements(reduction="add")``, or Simple-BEV's ``GridSample``), pillar feature nets and their scatter,
fuser, BEV decoder and all heads, as plain ONNX operators (opset >= 17; no custom ops). What does not: the
pre-processing (`BEVFusionModel.prepare`: image normalisation, voxelisation, rig geometry) and the
post-processing (`decode_detections`: top-k, circle NMS), which stay in torch.

The graph's inputs are `CoreInputs` in field order, under the field names; the numbers of LiDAR and radar
pillars (axes ``lidar_pillars`` and ``radar_pillars``) and the batch size (axis ``batch``) are dynamic. The
camera geometry is an input, so a fixed rig's geometry is computed once and fed to every call.
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import torch

from perception.model.bevfusion import BEVFusionModel, CoreInputs

CORE_INPUT_NAMES: tuple[str, ...] = tuple(f.name for f in fields(CoreInputs))


def _dynamic_axes(input_names: tuple[str, ...], output_names: tuple[str, ...]) -> dict[str, dict[int, str]]:
    axes: dict[str, dict[int, str]] = {name: {0: "batch"} for name in ("images", "camera_geometry", "modality_mask")}
    for sensor in ("lidar", "radar"):
        for name in (f"{sensor}_features", f"{sensor}_point_mask", f"{sensor}_pillar_index"):
            axes[name] = {0: f"{sensor}_pillars"}
    axes.update({name: {0: "batch"} for name in output_names})
    return {k: v for k, v in axes.items() if k in input_names or k in output_names}


def export_core_onnx(model: BEVFusionModel, inputs: CoreInputs, path: str | Path, *, opset: int = 17) -> tuple[str, ...]:
    """Write `model`'s core, in eval mode, to the ONNX file `path` (TorchScript-based exporter).

    Args:
        model: the model; its training/eval mode is restored afterwards.
        inputs: example inputs from `model.prepare(batch)`; they fix every shape except the dynamic axes
            named in the module docstring. Use a batch with at least one LiDAR and one radar pillar.
        path: the .onnx file to write.
        opset: ONNX opset (17 or later).

    Returns: the graph's output names, in order (the keys of `model.forward`'s dict).
    """
    was_training = model.training
    model.eval()
    try:
        args = inputs.as_args()
        with torch.no_grad():
            output_names = tuple(model(*args))
        torch.onnx.export(
            model, args, str(path), opset_version=opset, dynamo=False, input_names=list(CORE_INPUT_NAMES),
            output_names=list(output_names), dynamic_axes=_dynamic_axes(CORE_INPUT_NAMES, output_names),
        )
    finally:
        model.train(was_training)
    return output_names
