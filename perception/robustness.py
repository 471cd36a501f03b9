"""Sensor-failure robustness: one model evaluated under sensor losses and corruptions.

Each condition is a `Batch -> Batch` transform applied to the model's inputs only (targets, frames and the
evaluation stay the same), seeded per batch so every run of the benchmark sees the same corruption. The
resilience ratio of a condition is its NDS over the clean NDS (RoboBEV's resilience rate).

Conditions (names are the keys of `robustness.json`):
  clean; cameras_missing; camera_missing_<CHANNEL> for each of the six cameras (that camera absent, as
  `Batch.camera_mask` makes it; summarised as one_camera_missing, their mean, and one_camera_missing_worst);
  lidar_missing; radar_missing; camera_only; lidar_only; radar_only; lidar_beams_16 and lidar_beams_8 (every 2nd / 4th of the 32 HDL-32E rings, found by
  elevation); lidar_drop_50 and radar_drop_50 (half the points at random); camera_low_light, camera_motion_blur,
  camera_fog, camera_noise, camera_frame_lost (each camera absent with probability 0.5); calibration_error (every
  camera extrinsic off by 1 degree about a random axis and 5 cm in a random direction); history_lost (temporal
  models only, by default: no keyframe has its previous one, as after a restart of the stack).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from perception.checkpoint import model_from_checkpoint
from perception.data.batch import Batch
from perception.data.build import build_dataset
from perception.data.mmdet3d_info import info_sample_tokens
from perception.distributed import pick_device
from perception.errors import PerceptionError
from perception.evaluation import check_tokens_in_tables, evaluate_model_conditions, is_temporal
from perception.structures import CAMERA_CHANNELS
from perception.viz import agg_pyplot

log = logging.getLogger(__name__)
# The devkit's true-positive errors kept per condition (translation, scale, orientation, velocity, attribute).
TP_ERRORS: tuple[str, ...] = ("mate", "mase", "maoe", "mave", "maae")

Transform = Callable[[Batch], Batch]

# HDL-32E: 32 rings from -30.67 to +10.67 degrees of elevation, 1.333 degrees apart.
HDL32_LOWEST_DEG = -30.67
HDL32_STEP_DEG = 4.0 / 3.0


def _rng(batch: Batch, salt: int) -> np.random.Generator:
    """A generator seeded by the condition and the batch's sample tokens: the same corruption on every run."""
    key = "|".join(str(m.get("sample_token", "")) for m in batch.meta)
    return np.random.default_rng([salt, int(hashlib.md5(key.encode()).hexdigest()[:8], 16)])


def _set_mask(batch: Batch, modality: int, present: bool) -> Batch:
    mask = batch.modality_mask.clone()
    mask[:, modality] = present
    return replace(batch, modality_mask=mask)


def _empty_points(batch: Batch, name: str) -> Batch:
    pts = getattr(batch, name)
    return replace(batch, **{name: pts[:0], f"num_{name}": torch.zeros_like(getattr(batch, f"num_{name}"))})


def _keep_points(batch: Batch, name: str, keep: torch.Tensor) -> Batch:
    pts = getattr(batch, name)
    counts = getattr(batch, f"num_{name}")
    sample_of = torch.repeat_interleave(torch.arange(len(counts), device=pts.device), counts)
    new_counts = torch.bincount(sample_of[keep], minlength=len(counts)).to(counts.dtype)
    return replace(batch, **{name: pts[keep], f"num_{name}": new_counts})


def cameras_missing(batch: Batch) -> Batch:
    return _set_mask(replace(batch, images=torch.zeros_like(batch.images)), 0, False)


def mask_cameras(batch: Batch, lost: torch.Tensor) -> Batch:
    """`batch` with the cameras `lost` (B, N) bool absent, as a dataroot without their records loads
    (`Batch.camera_mask`): their features stay out of the BEV; a sample left with no camera has the camera
    modality off."""
    present = (torch.ones_like(lost) if batch.camera_mask is None else batch.camera_mask.to(lost.device)) & ~lost
    mask = batch.modality_mask.clone()
    mask[:, 0] &= present.any(1).to(mask.device)
    return replace(batch, camera_mask=present, modality_mask=mask)


def one_camera_missing(batch: Batch, camera: int = 0) -> Batch:
    lost = torch.zeros(batch.images.shape[:2], dtype=torch.bool, device=batch.images.device)
    lost[:, camera] = True
    return mask_cameras(batch, lost)


def lidar_missing(batch: Batch) -> Batch:
    return _set_mask(_empty_points(batch, "points_lidar"), 1, False)


def radar_missing(batch: Batch) -> Batch:
    return _set_mask(_empty_points(batch, "points_radar"), 2, False)


def lidar_ring(points_lidar: torch.Tensor) -> torch.Tensor:
    """(N,) int64 HDL-32E ring index estimated from each point's elevation in the LIDAR_TOP frame."""
    xyz = points_lidar[:, :3]
    elev = torch.rad2deg(torch.atan2(xyz[:, 2], xyz[:, :2].norm(dim=1).clamp(min=1e-6)))
    return torch.round((elev - HDL32_LOWEST_DEG) / HDL32_STEP_DEG).long().clamp(0, 31)


def lidar_beams(batch: Batch, beams: int) -> Batch:
    step = 32 // beams
    keep = lidar_ring(batch.points_lidar) % step == 0
    return _keep_points(batch, "points_lidar", keep)


def drop_points(batch: Batch, name: str, fraction: float, salt: int) -> Batch:
    rng = _rng(batch, salt)
    n = getattr(batch, name).shape[0]
    keep = torch.from_numpy(rng.random(n) >= fraction).to(getattr(batch, name).device)
    return _keep_points(batch, name, keep)


def _images_float(batch: Batch) -> torch.Tensor:
    return batch.images.float()


def _with_images(batch: Batch, images: torch.Tensor) -> Batch:
    return replace(batch, images=images.clamp(0, 255).round().to(torch.uint8))


def camera_low_light(batch: Batch) -> Batch:
    """Gamma-darkened images (about 1/4 of the brightness) with sensor noise, as RoboBEV's dark condition."""
    img = _images_float(batch) / 255.0
    rng = _rng(batch, 11)
    dark = img.pow(1.8) * 0.3
    noise = torch.from_numpy(rng.normal(0, 0.02, size=tuple(img.shape)).astype(np.float32)).to(img.device)
    return _with_images(batch, (dark + noise) * 255.0)


def camera_motion_blur(batch: Batch, length: int = 9) -> Batch:
    """A horizontal box blur of `length` pixels (at the model's image size)."""
    img = _images_float(batch)
    b, n, c, h, w = img.shape
    kernel = torch.full((c, 1, 1, length), 1.0 / length, device=img.device)
    x = F.conv2d(F.pad(img.reshape(b * n, c, h, w), (length // 2, length // 2, 0, 0), mode="replicate"), kernel, groups=c)
    return _with_images(batch, x.reshape(b, n, c, h, w))


def camera_fog(batch: Batch, density: float = 0.6) -> Batch:
    """Blend towards a light grey, more strongly towards the top of the image (farther away)."""
    img = _images_float(batch)
    h = img.shape[-2]
    t = torch.linspace(density, density * 0.6, h, device=img.device).view(1, 1, 1, h, 1)
    return _with_images(batch, img * (1 - t) + 200.0 * t)


def camera_noise(batch: Batch, sigma: float = 25.0) -> Batch:
    rng = _rng(batch, 13)
    img = _images_float(batch)
    noise = torch.from_numpy(rng.normal(0, sigma, size=tuple(img.shape)).astype(np.float32)).to(img.device)
    return _with_images(batch, img + noise)


def camera_frame_lost(batch: Batch, p: float = 0.5) -> Batch:
    rng = _rng(batch, 17)
    lost = torch.from_numpy(rng.random(batch.images.shape[:2]) < p).to(batch.images.device)
    return mask_cameras(batch, lost)


def _rotation(axis: np.ndarray, angle: float) -> np.ndarray:
    axis = axis / np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + math.sin(angle) * k + (1 - math.cos(angle)) * k @ k


def calibration_error(batch: Batch, degrees: float = 1.0, metres: float = 0.05) -> Batch:
    """Every camera's cam2lidar is off by `degrees` about a random axis and `metres` in a random direction
    (the images stay as captured: the model is told a wrong extrinsic)."""
    rng = _rng(batch, 19)
    cam2lidar = batch.cam2lidar.clone()
    for b in range(cam2lidar.shape[0]):
        for c in range(cam2lidar.shape[1]):
            err = np.eye(4)
            err[:3, :3] = _rotation(rng.normal(size=3), math.radians(degrees))
            d = rng.normal(size=3)
            err[:3, 3] = metres * d / np.linalg.norm(d)
            cam2lidar[b, c] = torch.from_numpy(err).to(cam2lidar) @ cam2lidar[b, c]
    return replace(batch, cam2lidar=cam2lidar)


def _identity(batch: Batch) -> Batch:
    return batch


def history_lost(batch: Batch) -> Batch:
    """No sample has a history: every previous-keyframe token is cleared (`perception.model.temporal`)."""
    return replace(batch, meta=[{**m, "prev_token": ""} for m in batch.meta])


CONDITIONS: dict[str, Transform] = {
    "clean": _identity,
    "cameras_missing": cameras_missing,
    **{f"camera_missing_{ch}": partial(one_camera_missing, camera=c) for c, ch in enumerate(CAMERA_CHANNELS)},
    "lidar_missing": lidar_missing,
    "radar_missing": radar_missing,
    "camera_only": lambda b: radar_missing(lidar_missing(b)),
    "lidar_only": lambda b: radar_missing(cameras_missing(b)),
    "radar_only": lambda b: lidar_missing(cameras_missing(b)),
    "lidar_beams_16": lambda b: lidar_beams(b, 16),
    "lidar_beams_8": lambda b: lidar_beams(b, 8),
    "lidar_drop_50": lambda b: drop_points(b, "points_lidar", 0.5, 3),
    "radar_drop_50": lambda b: drop_points(b, "points_radar", 0.5, 5),
    "camera_low_light": camera_low_light,
    "camera_motion_blur": camera_motion_blur,
    "camera_fog": camera_fog,
    "camera_noise": camera_noise,
    "camera_frame_lost": camera_frame_lost,
    "calibration_error": calibration_error,
    "history_lost": history_lost,
}


def run_robustness(checkpoint: str | Path, dataroot: str | Path, version: str, split: str | None, out: str | Path, *,
                   conditions: list[str] | None = None, device: str | None = None, batch_size: int = 2,
                   workers: int = 0, progress: bool = True, info: str | Path | None = None) -> dict:
    """Evaluate a checkpoint under every condition; write robustness.json, robustness.md and a bar chart.
    `info`: the samples of this mmdet3d v2 info file instead of `split` (scored against the dataroot's tables)."""
    names = conditions or [n for n in CONDITIONS if n != "history_lost"]
    unknown = [n for n in names if n not in CONDITIONS]
    if unknown:
        raise PerceptionError(f"unknown robustness condition(s) {unknown}; known: {', '.join(CONDITIONS)}")
    if "clean" not in names:
        names = ["clean"] + names
    if info is not None:
        split = str(info)
        check_tokens_in_tables(dataroot, version, info_sample_tokens(info), info)  # before any inference
    dev = pick_device(device)
    loaded = model_from_checkpoint(checkpoint, device=dev)
    cfg, model = loaded.config, loaded.model
    if conditions is None and is_temporal(model):
        names.append("history_lost")
    dataset = build_dataset(cfg, dataroot, version, split, train=False, map_grid=model.map_grid, info=info)
    out = Path(out)
    log.info("robustness: %d conditions (%s), each batch loaded once", len(names), ", ".join(names))
    evaluated = evaluate_model_conditions(model, dataset, dataroot, version, split, {n: out / n for n in names},
                                          {n: CONDITIONS[n] for n in names}, device=dev, batch_size=batch_size,
                                          workers=workers, progress=progress, info=info)
    results: dict[str, dict] = {}
    for name in names:
        m = evaluated[name]
        # NaN (no true positive of any class) becomes null, so robustness.json stays strict JSON.
        results[name] = {k: (None if m[k] is None or not math.isfinite(m[k]) else float(m[k]))
                         for k in ("nds", "map", *TP_ERRORS, "seg_miou", "scene_map")}
    results.update(one_camera_summary(results))
    clean = results["clean"]["nds"]
    for r in results.values():
        r["ratio"] = r["nds"] / clean if clean > 0 else None
    (out / "robustness.json").write_text(json.dumps(results, indent=1, allow_nan=False))
    (out / "robustness.md").write_text(format_robustness(results, checkpoint, split))
    plot_robustness(results, out / "robustness.png")
    return results


def one_camera_summary(results: dict[str, dict]) -> dict[str, dict]:
    """``one_camera_missing`` (the mean of every metric over the ``camera_missing_<CHANNEL>`` conditions) and
    ``one_camera_missing_worst`` (the condition of lowest NDS, named in ``camera``), when all of them ran."""
    per_camera = {ch: results.get(f"camera_missing_{ch}") for ch in CAMERA_CHANNELS}
    if any(r is None for r in per_camera.values()):
        return {}
    keys = next(iter(per_camera.values())).keys()
    mean = {}
    for k in keys:
        values = [r[k] for r in per_camera.values()]
        mean[k] = None if any(v is None for v in values) else float(np.mean(values))
    worst_channel = min(per_camera, key=lambda ch: per_camera[ch]["nds"])
    return {"one_camera_missing": mean, "one_camera_missing_worst": {**per_camera[worst_channel], "camera": worst_channel}}


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def format_robustness(results: dict[str, dict], checkpoint, split: str) -> str:
    tp_head = " | ".join(f"m{k[1:].upper()}" for k in TP_ERRORS)
    lines = [f"# Robustness of {checkpoint} on {split}", "",
             f"| condition | NDS | ratio (NDS / clean) | mAP | {tp_head} | seg mIoU |",
             "|---|---|---|---|" + "---|" * len(TP_ERRORS) + "---|"]
    for name, r in results.items():
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}"
        tp = " | ".join(_fmt(r.get(k)) for k in TP_ERRORS)
        lines.append(f"| {name} | {r['nds']:.4f} | {ratio} | {r['map']:.4f} | {tp} | {_fmt(r['seg_miou'])} |")
    lines += ["", "![robustness](robustness.png)", ""]
    return "\n".join(lines)


def plot_robustness(results: dict[str, dict], path: Path) -> None:
    plt = agg_pyplot()
    names = list(results)
    fig, ax = plt.subplots(figsize=(10, 4))
    x = np.arange(len(names))
    ax.bar(x - 0.2, [results[n]["nds"] for n in names], 0.4, label="NDS")
    ax.bar(x + 0.2, [results[n]["seg_miou"] or 0.0 for n in names], 0.4, label="seg mIoU")
    ax.set_xticks(x)
    ax.set_xticklabels(names, rotation=45, ha="right", fontsize=8)
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
