"""Scratch vs pretrained camera backbone at the demo's budget: several seeds per arm, mean and spread.

    python benchmarks/pretrained_ab.py --out work_dirs/pretrained_ab \\
        --arm scratch=configs/tiny.yaml --arm dinov2=configs/tiny_dinov2.yaml --seeds 0 1 2 --minutes 14

Each (arm, seed) is one `perception demo --config C --minutes M train.seed=S` in a subprocess, run one after the
other (seeds outer, arms inner, so a change of machine load hits every arm alike), into ``OUT/<arm>/seed<S>``.
An arm may carry its own config overrides after the config (``--arm "cam_scratch=configs/tiny_camera.yaml
model.camera.pretrained=null"``). A run whose ``summary.json`` exists is not run again: a stopped benchmark resumes where it was. Extra arguments
after ``--`` are config overrides given to every run.

Reads each run's ``eval/by_sensors.json`` and ``summary.json`` and writes ``OUT/results.json`` (every run, and
per arm the mean, sample standard deviation, min and max of: steps trained, all-sensor NDS / mAP / mAVE / seg mIoU,
LiDAR + radar (cameras missing) NDS / seg mIoU and what the cameras add, camera-only NDS / mAP / seg
mIoU, and each map class's IoU with all sensors and with the camera only), then
prints a table. Time-budgeted: the step counts say how much training each figure had.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

MAP_CLASSES = ("drivable_area", "ped_crossing", "walkway", "stop_line", "carpark_area", "divider")


def run_figures(run_dir: Path) -> dict[str, float]:
    """The figures of one finished demo run (flat name -> value)."""
    summary = json.loads((run_dir / "summary.json").read_text())
    by = json.loads((run_dir / "eval" / "by_sensors.json").read_text())
    allm, cam = by["all"], by["camera_only"]
    fig = {"steps": float(summary["steps"]), "nds": allm["nds"], "map": allm["map"], "mave": allm["mave"],
           "seg_miou": allm["seg_miou"], "camera_nds": cam["nds"], "camera_map": cam["map"],
           "camera_seg_miou": cam["seg_miou"]}
    if "lidar_radar" in by:  # runs made before the demo evaluated without cameras lack it
        lr = by["lidar_radar"]
        fig.update({"lidar_radar_nds": lr["nds"], "lidar_radar_seg_miou": lr["seg_miou"],
                    "cameras_add_nds": allm["nds"] - lr["nds"], "cameras_add_seg_miou": allm["seg_miou"] - lr["seg_miou"]})
    for name in MAP_CLASSES:
        fig[f"iou_{name}"] = allm["seg_iou"][name]
        fig[f"camera_iou_{name}"] = cam["seg_iou"][name]
    return fig


def aggregate(runs: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    """name -> {mean, std (sample; 0 for one run), min, max, n} over the runs."""
    out = {}
    for key in [k for k in runs[0] if all(k in r for r in runs)]:
        vals = [r[key] for r in runs]
        out[key] = {"mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
                    "min": min(vals), "max": max(vals), "n": len(vals)}
    return out


def table(per_arm: dict[str, dict[str, dict[str, float]]]) -> str:
    keys = ["steps", "nds", "map", "mave", "seg_miou", "lidar_radar_nds", "lidar_radar_seg_miou", "cameras_add_nds",
            "cameras_add_seg_miou", "camera_nds", "camera_map", "camera_seg_miou"]
    keys += [f"iou_{c}" for c in MAP_CLASSES] + [f"camera_iou_{c}" for c in MAP_CLASSES]
    arms = list(per_arm)
    lines = ["| figure | " + " | ".join(f"{a} (mean ± std [min, max])" for a in arms) + " |",
             "|---|" + "---|" * len(arms)]
    for k in keys:
        cells = []
        if not any(k in per_arm[a] for a in arms):
            continue
        for a in arms:
            s = per_arm[a].get(k)
            if s is None:
                cells.append("n/a")
                continue
            fmt = "{:.0f}" if k == "steps" else "{:.3f}"
            cells.append(f"{fmt.format(s['mean'])} ± {fmt.format(s['std'])} [{fmt.format(s['min'])}, {fmt.format(s['max'])}]")
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arm", action="append", required=True, metavar="NAME=CONFIG", help="an arm: name, config YAML and optional overrides, space-separated")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--minutes", type=float, default=14.0, help="training budget of each run (the demo's: 14)")
    ap.add_argument("--data", default="datasets/synthetic-mini")
    ap.add_argument("--out", type=Path, default=Path("work_dirs/pretrained_ab"))
    ap.add_argument("overrides", nargs="*", help="config overrides for every run (after --)")
    args = ap.parse_args()
    arms: dict[str, list[str]] = {}
    for a in args.arm:
        name, _, spec = a.partition("=")
        arms[name] = shlex.split(spec)
        if not arms[name] or not Path(arms[name][0]).is_file():
            sys.exit(f"--arm {a}: expected NAME=CONFIG [KEY=VALUE ...] with an existing config file")
    results: dict[str, list[dict]] = {name: [] for name in arms}
    for seed in args.seeds:
        for name, (config, *arm_overrides) in arms.items():
            run_dir = args.out / name / f"seed{seed}"
            if not (run_dir / "summary.json").exists():
                cmd = [sys.executable, "-m", "perception", "demo", "--config", config, "--data", args.data,
                       "--work-dir", str(run_dir), "--minutes", str(args.minutes), f"train.seed={seed}", *arm_overrides, *args.overrides]
                print(f"[{time.strftime('%H:%M:%S')}] {name} seed {seed}: {' '.join(cmd)}", flush=True)
                run_dir.mkdir(parents=True, exist_ok=True)
                with open(run_dir.parent / f"seed{seed}.log", "w") as log:
                    rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT)
                if rc != 0:
                    sys.exit(f"{name} seed {seed} failed (rc {rc}); see {run_dir.parent / f'seed{seed}.log'}")
            fig = run_figures(run_dir)
            print(f"[{time.strftime('%H:%M:%S')}] {name} seed {seed}: {fig['steps']:.0f} steps, NDS {fig['nds']:.3f}, "
                  f"camera-only NDS {fig['camera_nds']:.3f}, seg mIoU {fig['seg_miou']:.3f}", flush=True)
            results[name].append({"seed": seed, **fig})
    per_arm = {name: aggregate([{k: v for k, v in r.items() if k != "seed"} for r in runs]) for name, runs in results.items()}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps({"arms": arms, "minutes": args.minutes, "overrides": args.overrides,
                                                        "runs": results, "aggregate": per_arm}, indent=1))
    print(table(per_arm))
    print(f"wrote {args.out / 'results.json'}")


if __name__ == "__main__":
    main()
