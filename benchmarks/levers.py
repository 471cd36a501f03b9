"""Training levers at a fixed step count: several seeds per arm, per-class AP, mean and spread.

    python benchmarks/levers.py --out work_dirs/levers --data datasets/synthetic-mini --steps 200 --jobs 2 \\
        --arm tiny=configs/tiny.yaml --arm pillars04=configs/tiny.yaml model.lidar.pillar_stride=2 \\
        --arm cbgs_gt="configs/tiny.yaml train.cbgs=true train.gt_sampling=true train.gt_sampling_stop_epoch=2"

Each (arm, seed) is `perception train --max-steps STEPS train.seed=S` then one all-sensor `perception eval` of the
last checkpoint on `--split`, into ``OUT/<arm>/seed<S>``. Unlike `pretrained_ab.py` (a whole demo per run: five
sensor subsets and tracking), a run costs its training and one evaluation. `--jobs` runs that many at once, each
with ``cores // jobs`` threads; the step count, not the machine's load, fixes how much each run trains. A run
whose ``eval/metrics.json`` exists is not run again, so a stopped benchmark resumes. Arguments after ``--`` are
config overrides for every run.

Writes ``OUT/results.json`` (every run, and per arm the mean, sample standard deviation, min and max of NDS, mAP,
mAVE, seg mIoU and each class's AP) and prints a table of the classes named by `--classes`. CPU step time is
`step_time.py`'s job (on an idle machine), not this one's.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pretrained_ab import aggregate  # benchmarks/ is on sys.path when this file runs as a script

SMALL_CLASSES = ("pedestrian", "traffic_cone", "bicycle", "barrier")


def run_one(name: str, spec: list[str], seed: int, args: argparse.Namespace, threads: int) -> dict[str, float]:
    """Train and evaluate one (arm, seed) unless its metrics exist; returns its figures."""
    run_dir = args.out / name / f"seed{seed}"
    metrics_path = run_dir / "eval" / "metrics.json"
    if not metrics_path.exists():
        config, *arm_overrides = spec
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        train = [sys.executable, "-m", "perception", "train", "--config", config, "--data", args.data,
                 "--version", args.version, "--work-dir", str(run_dir), "--max-steps", str(args.steps),
                 f"train.seed={seed}", *arm_overrides, *args.overrides]
        evaluate = [sys.executable, "-m", "perception", "eval", "--data", args.data, "--version", args.version,
                    "--split", args.split, "--checkpoint", str(run_dir / "checkpoints" / "last.pt"),
                    "--out", str(run_dir / "eval"), "--workers", "0"]
        run_dir.mkdir(parents=True, exist_ok=True)
        for stage, cmd in (("train", train), ("eval", evaluate)):
            log_path = run_dir.parent / f"seed{seed}.{stage}.log"
            print(f"[{time.strftime('%H:%M:%S')}] {name} seed {seed} {stage}: {shlex.join(cmd)}", flush=True)
            with open(log_path, "w") as log:
                rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
            if rc != 0:
                raise RuntimeError(f"{name} seed {seed} {stage} failed (rc {rc}); see {log_path}")
    m = json.loads(metrics_path.read_text())
    fig = {"nds": m["nds"], "map": m["map"], "mave": m["mave"], "seg_miou": m["seg_miou"]}
    fig.update({f"ap_{c}": v for c, v in m["per_class_ap"].items()})
    print(f"[{time.strftime('%H:%M:%S')}] {name} seed {seed}: NDS {fig['nds']:.3f}, mAP {fig['map']:.3f}, "
          f"seg mIoU {fig['seg_miou']:.3f}", flush=True)
    return fig


def table(per_arm: dict[str, dict[str, dict[str, float]]], classes: list[str]) -> str:
    keys = ["nds", "map", "mave", "seg_miou"] + [f"ap_{c}" for c in classes]
    arms = list(per_arm)
    lines = ["| figure | " + " | ".join(f"{a} (mean ± std [min, max])" for a in arms) + " |",
             "|---|" + "---|" * len(arms)]
    for k in keys:
        cells = []
        for a in arms:
            s = per_arm[a].get(k)
            cells.append("n/a" if s is None else
                         f"{s['mean']:.3f} ± {s['std']:.3f} [{s['min']:.3f}, {s['max']:.3f}]")
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arm", action="append", required=True, metavar="NAME=CONFIG",
                    help="an arm: name, config YAML and optional overrides, space-separated")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, required=True, help="optimizer steps of every run (train.max_steps)")
    ap.add_argument("--data", default="datasets/synthetic-mini")
    ap.add_argument("--version", default="v1.0-mini")
    ap.add_argument("--split", default="mini_val")
    ap.add_argument("--jobs", type=int, default=1, help="runs at once")
    ap.add_argument("--classes", nargs="+", default=list(SMALL_CLASSES), help="classes whose AP the table shows")
    ap.add_argument("--out", type=Path, default=Path("work_dirs/levers"))
    ap.add_argument("overrides", nargs="*", help="config overrides for every run (after --)")
    args = ap.parse_args()
    arms: dict[str, list[str]] = {}
    for a in args.arm:
        name, _, spec = a.partition("=")
        arms[name] = shlex.split(spec)
        if not arms[name] or not Path(arms[name][0]).is_file():
            sys.exit(f"--arm {a}: expected NAME=CONFIG [KEY=VALUE ...] with an existing config file")
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    tasks = [(name, seed) for seed in args.seeds for name in arms]  # seeds outer: load hits every arm alike
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = {t: pool.submit(run_one, t[0], arms[t[0]], t[1], args, threads) for t in tasks}
        figures = {t: f.result() for t, f in futures.items()}
    results = {name: [{"seed": seed, **figures[(name, seed)]} for seed in args.seeds] for name in arms}
    per_arm = {name: aggregate([{k: v for k, v in r.items() if k != "seed"} for r in runs])
               for name, runs in results.items()}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(
        {"arms": arms, "steps": args.steps, "split": args.split, "overrides": args.overrides,
         "runs": results, "aggregate": per_arm}, indent=1))
    print(f"{args.steps} steps per run, evaluated on {args.data} {args.split}")
    print(table(per_arm, args.classes))
    print(f"wrote {args.out / 'results.json'}")


if __name__ == "__main__":
    main()
