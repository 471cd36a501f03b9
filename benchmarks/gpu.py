"""Every check that needs an NVIDIA GPU, in one run: one JSON and one table (CI never has a GPU).

    python benchmarks/gpu.py --out work_dirs/gpu [--scratch DIR] [--data DIR] [--budget-s 420]

Sections, in this order, each recorded in ``OUT/gpu.json`` (a failure is recorded and the next section runs):
  1. ``environment``: torch, CUDA, the GPU, onnxruntime's providers.
  2. ``tests``: ``pytest -m gpu tests`` (CUDA-only tests; the TensorRT ones skip where tensorrt is not installed).
  3. ``train``: ``--train-steps`` (200) optimiser steps of ``configs/base.yaml`` with mixed precision
     (``train.amp=auto``: bf16 autocast on CUDA) through the real `Trainer` and data loader on a small synthetic
     set: step time and samples/s with data loading (from step 10 to the end), step time on preloaded batches
     (model only), whether the loader keeps up (with-data step time within 10% of the preloaded one), peak CUDA
     memory, finite losses.
  4. ``latency``: `perception bench latency` of base (or ``--checkpoint``'s model) at batch 1 on a synthetic batch
     (200k LiDAR points; or the first sample of ``--latency-data``):
     torch eager FP32, FP16 and BF16 autocast, `torch.compile` (FP32 and BF16), and ONNX Runtime with its CUDA
     provider when the installed onnxruntime has one (``onnxruntime-gpu``); otherwise the reason is recorded.
Sections still to run when ``--budget-s`` is spent are recorded as skipped, so a short lease still returns
the figures measured so far. Without a CUDA device it says so, writes ``{"gpu": null}`` and exits 0 at once.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run from a checkout without installing it (the GPU machine's own python)
    sys.path.insert(0, str(REPO))


def _environment(device: str) -> dict[str, Any]:
    import onnxruntime as ort

    env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "cpu_count": os.cpu_count(), "onnxruntime": ort.__version__,
           "onnxruntime_providers": ort.get_available_providers()}
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1), bf16=torch.cuda.is_bf16_supported())
    return env


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _run_tests(out: Path) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", str(REPO / "tests")]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    (out / "gpu_tests.txt").write_text(proc.stdout + proc.stderr)
    summary = (proc.stdout.strip().splitlines() or [""])[-1]
    counts = {}
    for part in summary.strip("= ").split(" in ")[0].split(", "):
        n, _, what = part.partition(" ")
        if n.isdigit():
            counts[what] = int(n)
    return {"returncode": proc.returncode, "summary": summary, **counts}


def _synth(data: Path) -> None:
    if (data / "v1.0-mini").is_dir():
        return
    cmd = [sys.executable, "-m", "perception", "data", "synth", "--out", str(data), "--scenes", "4",
           "--samples-per-scene", "10", "--lidar-sweeps", "9"]
    subprocess.run(cmd, cwd=REPO, check=True, timeout=300)


def _train(data: Path, out: Path, steps: int, workers: int, device: str, preloaded_steps: int = 20) -> dict[str, Any]:
    from perception.config import load_config
    from perception.training import RunSpec, Trainer

    overrides = ["train.amp=auto", "train.log_every=5", f"train.num_workers={workers}", "train.val_every=0",
                 f"train.max_steps={steps}", f"train.checkpoint_every={10 * steps}", "train.warmup_steps=10",
                 "model.camera.pretrained=null", "train.gt_sampling=false"]  # a timing: no weights to fetch offline
    cfg = load_config(REPO / "configs/base.yaml", overrides)
    spec = RunSpec(data=data, work_dir=out / "train_base", max_steps=steps, device=device, progress=False)
    trainer = Trainer(cfg, spec)
    cuda = device == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    result = trainer.fit()
    fit_s = time.perf_counter() - t0
    peak_fit = torch.cuda.max_memory_allocated() if cuda else 0
    by_step = {h["step"]: h["time_s"] for h in result.history}
    first = min((s for s in by_step if s >= 10), default=None)
    with_data_ms = (1e3 * (by_step[steps] - by_step[first]) / (steps - first)) if first and first < steps else math.nan
    losses = [h["total"] for h in result.history]

    # The same step on batches already in memory: the model's own cost, without the data loader.
    loader = trainer._loader(0, 0)
    batches = [b for _, b in zip(range(4), loader)]
    for _ in range(3):
        trainer.train_step([batches[0]])
    _sync(device)
    times = []
    for i in range(preloaded_steps):
        t = time.perf_counter()
        trainer.train_step([batches[i % len(batches)]])
        _sync(device)
        times.append(1e3 * (time.perf_counter() - t))
    trainer.close()
    return {"config": "configs/base.yaml", "overrides": overrides, "steps": result.step, "batch_size": cfg.train.batch_size,
            "amp_dtype": str(trainer.amp_dtype).removeprefix("torch."), "num_workers": workers,
            "fit_s": round(fit_s, 1), "step_ms_with_data": round(with_data_ms, 1),
            "step_ms_preloaded_median": round(statistics.median(times), 1), "preloaded_steps": len(times),
            "samples_per_s": round(1e3 * trainer.global_batch / with_data_ms, 2) if with_data_ms > 0 else math.nan,
            "loader_keeps_up": bool(with_data_ms <= 1.1 * statistics.median(times)),
            "peak_memory_gib": round(peak_fit / 2**30, 2),
            "peak_memory_reserved_gib": round((torch.cuda.max_memory_reserved() if cuda else 0) / 2**30, 2),
            "losses_finite": all(math.isfinite(x) for x in losses), "loss_first": losses[0], "loss_last": losses[-1]}


def _latency(device: str, precision: str, torch_compile: bool = False, backend: str = "torch",
             iterations: int = 50, checkpoint: Path | None = None, data: Path | None = None) -> dict[str, Any]:
    from deploy.bench import bench_latency
    from perception.config import load_config

    if checkpoint is None:
        cfg = load_config(REPO / "configs/base.yaml", ["model.camera.pretrained=null"])  # random weights: a timing
    else:  # the checkpoint's own config (its image size), not base.yaml's
        from perception.checkpoint import model_from_checkpoint

        cfg = model_from_checkpoint(checkpoint).config
    r = bench_latency(cfg, backend, device=device, precision=precision, iterations=iterations, warmup=5,
                      config_name="configs/base.yaml" if checkpoint is None else "", torch_compile=torch_compile,
                      checkpoint=checkpoint, data=data)
    return {"backend": backend, "precision": precision, "compile": torch_compile, "first_run_s": round(r["first_run_s"], 2),
            "total_ms_median": round(r["total_ms"]["median"], 2), "total_ms_p90": round(r["total_ms"]["p90"], 2),
            "core_ms_median": round(r["core_ms"]["median"], 2),
            "stages_ms_median": {k: round(v["median"], 2) for k, v in r["stages_ms"].items()},
            "iterations": r["iterations"], "input": r["input"], "checkpoint": r["checkpoint"]}


def _onnx_cuda(device: str, iterations: int, **kwargs) -> dict[str, Any]:
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return {"skipped": f"onnxruntime {ort.__version__} has no CUDAExecutionProvider "
                           f"({', '.join(ort.get_available_providers())}): onnxruntime-gpu is not installed"}
    return _latency(device, "fp32", backend="onnx", iterations=iterations, **kwargs)


def _table(report: dict[str, Any]) -> str:
    env = report.get("environment", {})
    lines = [f"GPU checks: {env.get('gpu', '?')}, torch {env.get('torch', '?')} (CUDA {env.get('cuda', '?')}), "
             f"onnxruntime {env.get('onnxruntime', '?')}"]

    def row(name: str, value: str) -> None:
        lines.append(f"  {name:<34}{value}")

    sections = report["sections"]
    t = sections.get("tests", {})
    row("gpu tests", t.get("summary") or t.get("error") or t.get("skipped", ""))
    tr = sections.get("train", {})
    if "steps" in tr:
        row("train base.yaml (bf16 AMP)", f"{tr['steps']} steps, batch {tr['batch_size']}, losses finite: {tr['losses_finite']}")
        row("  step, with data loader", f"{tr['step_ms_with_data']} ms ({tr['num_workers']} workers)")
        row("  step, preloaded batches", f"{tr['step_ms_preloaded_median']} ms (median of {tr['preloaded_steps']})")
        row("  samples/s with data; loader keeps up", f"{tr.get('samples_per_s')}; {tr.get('loader_keeps_up')}")
        row("  peak memory allocated/reserved", f"{tr['peak_memory_gib']} / {tr['peak_memory_reserved_gib']} GiB")
    else:
        row("train base.yaml (bf16 AMP)", tr.get("error") or tr.get("skipped", ""))
    ckpt = next((r["checkpoint"] for n, r in sections.items() if n.startswith("latency") and r.get("checkpoint")), None)
    title = f"latency {'base' if ckpt is None else Path(ckpt).name}, batch 1"
    lines.append(f"  {title:<34}{'total ms':>10}{'core ms':>10}{'p90 ms':>10}  first run")
    for name, r in sections.items():
        if not name.startswith("latency"):
            continue
        if "total_ms_median" in r:
            lines.append(f"  {name.removeprefix('latency_'):<34}{r['total_ms_median']:>10.2f}{r['core_ms_median']:>10.2f}"
                         f"{r['total_ms_p90']:>10.2f}  {r['first_run_s']:.1f} s")
        else:
            row(name.removeprefix("latency_"), r.get("error") or r.get("skipped", ""))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("work_dirs/gpu"))
    ap.add_argument("--scratch", type=Path, default=None, help="Where the synthetic set and the training run go (default: OUT).")
    ap.add_argument("--data", type=Path, default=None, help="Synthetic dataroot (default: SCRATCH/synth, written if missing).")
    ap.add_argument("--budget-s", type=float, default=420.0, help="Sections not started by then are skipped.")
    ap.add_argument("--train-steps", type=int, default=200)
    ap.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    ap.add_argument("--iterations", type=int, default=50)
    ap.add_argument("--preloaded-steps", type=int, default=20)
    ap.add_argument("--checkpoint", type=Path, default=None,
                    help="Trained checkpoint for the latency sections (its config replaces base.yaml's; with random "
                         "weights post-processing time means nothing: it follows how many scores pass the threshold).")
    ap.add_argument("--latency-data", type=Path, default=None,
                    help="Dataroot whose first sample the latency sections feed (default: a synthetic batch).")
    ap.add_argument("--only", default="", help="Comma-separated section names to run (default: all).")
    ap.add_argument("--device", default="cuda", help="cpu: a dry run of every section on the CPU (its figures mean nothing).")
    args = ap.parse_args(argv)
    dev = args.device
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "gpu.json"
    if dev == "cuda" and not torch.cuda.is_available():
        print(f"no CUDA GPU here (torch {torch.__version__}, CUDA build {torch.version.cuda}): nothing to measure")
        path.write_text(json.dumps({"gpu": None, "reason": "torch.cuda.is_available() is False"}, indent=2) + "\n")
        return 0

    start = time.perf_counter()
    report: dict[str, Any] = {"device": dev, "environment": _environment(dev), "sections": {}}
    scratch = args.scratch or args.out
    data = args.data or scratch / "synth"
    lat = dict(iterations=args.iterations, checkpoint=args.checkpoint, data=args.latency_data)
    plan: list[tuple[str, Callable[[], dict[str, Any]]]] = [
        ("tests", lambda: _run_tests(args.out)),
        ("train", lambda: (_synth(data), _train(data, scratch, args.train_steps, args.workers, dev,
                                                         args.preloaded_steps))[1]),
        ("latency_torch_fp32", lambda: _latency(dev, "fp32", **lat)),
        ("latency_torch_fp16", lambda: _latency(dev, "fp16", **lat)),
        ("latency_torch_bf16", lambda: _latency(dev, "bf16", **lat)),
        ("latency_onnxruntime_cuda_fp32", lambda: _onnx_cuda(dev, **lat)),
        ("latency_torch_compile_bf16", lambda: _latency(dev, "bf16", torch_compile=True, **lat)),
        ("latency_torch_compile_fp32", lambda: _latency(dev, "fp32", torch_compile=True, **lat)),
    ]
    if args.only:
        unknown = set(args.only.split(",")) - {name for name, _ in plan}
        if unknown:
            ap.error(f"--only: unknown sections {sorted(unknown)}")
        plan = [(name, fn) for name, fn in plan if name in args.only.split(",")]
    for name, fn in plan:
        elapsed = time.perf_counter() - start
        if elapsed > args.budget_s:
            report["sections"][name] = {"skipped": f"time budget of {args.budget_s:.0f} s spent ({elapsed:.0f} s)"}
            continue
        print(f"[{elapsed:6.0f} s] {name}", flush=True)
        t0 = time.perf_counter()
        try:
            report["sections"][name] = fn()
        except Exception as exc:  # noqa: BLE001 - recorded; the next section still runs
            traceback.print_exc()
            report["sections"][name] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
        report["sections"][name]["section_s"] = round(time.perf_counter() - t0, 1)
        if dev == "cuda":
            torch.cuda.empty_cache()
        path.write_text(json.dumps(report, indent=2) + "\n")  # finished sections survive a killed run
    report["wall_s"] = round(time.perf_counter() - start, 1)
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(_table(report))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
