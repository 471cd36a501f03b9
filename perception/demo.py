"""`perception demo`: README's main command, end to end on synthetic data.

1. Writes the synthetic nuScenes mini set into `--data` unless it is already there, and checks it.
2. Trains `configs/tiny.yaml` for `--minutes` (GPU if present, else CPU), checkpointing as it goes.
3. Evaluates on `mini_val` with all sensors, then without the cameras (LiDAR + radar), with only LiDAR, only
   camera and only radar, and tracks the all-sensor detections (`perception.tracking`, scored by the devkit's
   `TrackingEval`). The report's "What the cameras add" table is all sensors minus LiDAR + radar, same checkpoint.
4. Writes `W/checkpoints/last.pt`, `W/eval/metrics.json`, `W/eval/submission.json`, `W/eval/<sensors>/...`,
   `W/tracking/tracking_{submission,metrics}.json`, `W/report.md` with the metrics tables, pictures (learning
   curve, a BEV view of one sample), and `W/summary.json` (config, steps trained, times, seed, the camera's
   initial weights, tracking metrics).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Sequence

from perception.config import load_config
from perception.data.build import build_dataset
from perception.data.check import check_dataroot
from perception.data.collate import collate_samples
from perception.data.synth.generate import (GENERATOR_VERSION, SynthConfig, dataset_exists, generate, generator_version,
                                            is_tables_only, remove_synthetic)
from perception.errors import PerceptionError
from perception.evaluation import evaluate_model, format_metrics
from perception.tracking import format_tracking, run_tracking
from perception.training import RunSpec, Trainer
from perception.viz import agg_pyplot, plot_bev

log = logging.getLogger(__name__)

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "tiny.yaml"
SENSOR_SUBSETS: dict[str, tuple[bool, bool, bool]] = {  # (camera, lidar, radar) present
    "lidar_radar": (False, True, True),
    "lidar_only": (False, True, False),
    "camera_only": (True, False, False),
    "radar_only": (False, False, True),
}


def ensure_synthetic(data: Path, version: str = "v1.0-mini") -> None:
    """Write the default synthetic mini set into `data` unless a dataset is already there."""
    written_by = generator_version(data)
    if dataset_exists(data, version) and written_by is not None and written_by != GENERATOR_VERSION:
        # An older world must not leak into new measurements: remove what the generator wrote, write anew.
        log.warning("%s was written by synthetic generator version %s (now %s): regenerating it", data, written_by, GENERATOR_VERSION)
        remove_synthetic(data)
    elif dataset_exists(data, version) and is_tables_only(data):
        raise PerceptionError(f"{data}: a tables-only synthetic set (no sensor files, `data synth --tables-only`); "
                              "pass an empty or new --data directory for the demo")
    elif dataset_exists(data, version):
        log.info("using the dataset in %s", data)
        return
    if data.exists() and any(data.iterdir()):
        raise PerceptionError(f"{data}: exists but holds no {version} tables; pass an empty or new --data directory")
    log.info("writing the synthetic nuScenes mini set to %s (about 2 minutes)", data)
    generate(data, SynthConfig(version=version))


def run_demo(data: Path, work_dir: Path, minutes: float, config: Path = DEFAULT_CONFIG, overrides: Sequence[str] = (),
             progress: bool = True) -> dict:
    """Returns the all-sensor metrics; see the module docstring for what is written."""
    t_start = time.time()
    data, work_dir = Path(data), Path(work_dir)
    ensure_synthetic(data)
    report = check_dataroot(data, "v1.0-mini", max_files_per_channel=4, progress=False)
    if report.errors:
        report.print()
        raise PerceptionError(f"{data}: the dataset check found {len(report.errors)} error(s); see above")
    log.info("dataset check: %d scenes, %d samples, no errors", report.summary["scenes"], report.summary["samples"])

    cfg = load_config(config, list(overrides))
    trainer = Trainer(cfg, RunSpec(data=data, version="v1.0-mini", work_dir=work_dir, time_budget_s=minutes * 60.0,
                                   progress=progress))
    try:
        result = trainer.fit()
    finally:
        trainer.close()
    train_s = time.time() - t_start
    model = trainer.eval_model()
    val_set = build_dataset(cfg, data, "v1.0-mini", "mini_val", train=False, map_grid=model.map_grid)
    eval_dir = work_dir / "eval"
    workers = cfg.train.num_workers
    metrics = evaluate_model(model, val_set, data, "v1.0-mini", "mini_val", eval_dir, device=trainer.device,
                             batch_size=cfg.train.batch_size, workers=workers, progress=progress)
    subsets = {}
    for name, mask in SENSOR_SUBSETS.items():
        subsets[name] = evaluate_model(model, val_set, data, "v1.0-mini", "mini_val", eval_dir / name, device=trainer.device,
                                       batch_size=cfg.train.batch_size, workers=workers, modality_mask=mask, progress=progress)
    tracking = run_tracking(eval_dir / "submission.json", data, "v1.0-mini", "mini_val", work_dir / "tracking")
    print(format_metrics(metrics, title="mini_val, all sensors"))
    print("\n" + _subset_table(metrics, subsets))
    print("\n" + camera_contribution_table(metrics, subsets["lidar_radar"]))
    print("\n" + _tracking_line(tracking))
    pictures = _pictures(work_dir, result.history, model, val_set, trainer.device)
    _write_report(work_dir, cfg, result, metrics, subsets, pictures, minutes, train_s, time.time() - t_start,
                  config=Path(config), camera_weights=trainer.model.camera_encoder.weights_provenance,
                  tracking=tracking)
    print(f"\nwrote {work_dir / 'report.md'} ({(time.time() - t_start) / 60:.1f} min)")
    return metrics


def _tracking_line(m: dict) -> str:
    """The demo's tracking summary (devkit TrackingEval of the all-sensor detections)."""
    return f"Tracking (`perception track`, all-sensor detections, devkit `TrackingEval`): {format_tracking(m)}."


def _subset_table(clean: dict, subsets: dict[str, dict]) -> str:
    rows = [("all sensors", clean)] + list(subsets.items())
    lines = ["| sensors | NDS | mAP | seg mIoU | scene mAP |", "|---|---|---|---|---|"]
    for name, m in rows:
        seg, scene = (("n/a" if v is None else f"{v:.4f}") for v in (m["seg_miou"], m["scene_map"]))
        lines.append(f"| {name} | {m['nds']:.4f} | {m['map']:.4f} | {seg} | {scene} |")
    return "\n".join(lines)


CONTRIBUTION_ROWS = (("NDS", "nds", None), ("mAP", "map", None), ("seg mIoU", "seg_miou", None),
                     ("ped crossing IoU", "seg_iou", "ped_crossing"), ("stop line IoU", "seg_iou", "stop_line"),
                     ("walkway IoU", "seg_iou", "walkway"), ("divider IoU", "seg_iou", "divider"))


def camera_contribution_table(with_cameras: dict, without_cameras: dict) -> str:
    """Markdown table: each figure with all sensors, without the cameras (LiDAR + radar, same checkpoint) and the
    difference, i.e. what the cameras add. Both arguments are `evaluate_model` metrics dicts."""
    lines = ["| figure | all sensors | LiDAR + radar | cameras add |", "|---|---|---|---|"]
    for label, key, cls in CONTRIBUTION_ROWS:
        a, b = with_cameras.get(key), without_cameras.get(key)
        if cls is not None:
            a, b = (None if m is None else m.get(cls) for m in (a, b))
        if a is None or b is None:
            continue
        lines.append(f"| {label} | {a:.4f} | {b:.4f} | {a - b:+.4f} |")
    return "\n".join(lines)


def _pictures(work_dir: Path, history: list[dict], model, val_set, device) -> list[Path]:
    plt = agg_pyplot()
    out = []
    steps = [h["step"] for h in history if "total" in h]
    if steps:
        fig, ax = plt.subplots(figsize=(7, 4))
        for key in ("total", "heatmap", "regression", "map_dice", "depth"):
            vals = [h.get(key) for h in history if "total" in h]
            if any(v is not None for v in vals):
                ax.plot(steps, vals, label=key)
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = work_dir / "learning_curve.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        out.append(path)
    sample = val_set[len(val_set) // 2]
    batch = collate_samples([sample]).to(device)
    model.eval()
    pred = model.predict(batch)[0]
    path = work_dir / "bev_sample.png"
    plot_bev(path, sample, pred, model.map_grid)
    out.append(path)
    return out


def _shown(path: Path) -> str:
    """`path` relative to the working directory when it is below it."""
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _camera_line(cfg, camera_weights: dict) -> str:
    """Which camera backbone the run trained and where its initial weights came from."""
    cam = cfg.model.camera
    blocks = f", first {cam.blocks} blocks" if cam.blocks else ""
    if cam.pretrained is None:
        return f"Camera backbone `{cam.backbone}`{blocks}, randomly initialised (`model.camera.pretrained: null`)."
    name = camera_weights.get("name") or Path(str(cam.pretrained)).name
    sha = camera_weights.get("sha256")
    return (f"Camera backbone `{cam.backbone}`{blocks}, initialised from `{name}`"
            + (f" (sha256 `{sha[:16]}...`)" if sha else "") + ".")


def _write_report(work_dir: Path, cfg, result, metrics: dict, subsets: dict, pictures: list[Path], minutes: float,
                  train_s: float, total_s: float, config: Path = DEFAULT_CONFIG, camera_weights: dict | None = None,
                  tracking: dict | None = None) -> None:
    lines = [
        "# Demo report",
        "",
        f"`{_shown(config)}` trained for {result.step} steps ({minutes:g} min budget) on the synthetic",
        f"`mini_train` split, evaluated on `mini_val` with the devkit's `DetectionEval`. Total time {total_s / 60:.1f} min.",
        _camera_line(cfg, camera_weights or {}),
        "",
        "## Metrics by sensor set",
        "",
        _subset_table(metrics, subsets),
        "",
        "## What the cameras add",
        "",
        "All sensors against the same checkpoint evaluated without its cameras (`perception eval --modalities lidar,radar`).",
        "",
        camera_contribution_table(metrics, subsets["lidar_radar"]),
        "",
        "## All sensors",
        "",
        "```",
        format_metrics(metrics),
        "```",
        "",
        _tracking_line(tracking or {}),
        "",
        "## Pictures",
        "",
    ]
    for p in pictures:
        lines.append(f"![{p.stem}]({p.name})")
        lines.append("")
    lines += ["## Files", "", "- `checkpoints/last.pt` (and `best.pt` with periodic validation)",
              "- `eval/metrics.json`, `eval/submission.json` (all sensors); `eval/<sensors>/` for each sensor subset",
              "- `tb/`: TensorBoard scalars (`tensorboard --logdir " + str(work_dir / "tb") + "`)", ""]
    (work_dir / "report.md").write_text("\n".join(lines))
    (work_dir / "eval" / "by_sensors.json").write_text(json.dumps({"all": metrics, **subsets}, indent=1))
    summary = {"config": str(config), "steps": result.step, "tracking": tracking or {}, "minutes": minutes, "train_s": round(train_s, 1),
               "total_s": round(total_s, 1), "seed": cfg.train.seed, "camera_weights": camera_weights or {}}
    (work_dir / "summary.json").write_text(json.dumps(summary, indent=1))
