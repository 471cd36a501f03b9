"""`perception bench data`: data pipeline throughput against the cost of only decoding the same JPEGs.

The pipeline is the training dataset an experiment config builds (`build_dataset(..., train=True)`: its image
size and augmentation, sweeps, BEV augmentation, map targets). For each worker count, two DataLoaders run over
the same samples with the same number of worker processes:
  - pipeline: the full training item (6 camera images decoded, augmented and warped to the model size; LiDAR
    and radar sweeps read, motion-compensated and BEV-augmented; boxes; map masks) and collation, sent to the
    main process;
  - decode-only: read the 6 camera files of the sample and decode them at full resolution (cv2.imdecode).
The ratio pipeline / decode-only is the figure of merit (goal >= 0.8). The pipeline may be faster than a full
decode: when the model image is at most half the camera resolution, libjpeg decodes at 1/2 scale in the DCT
domain (see `loading.read_jpeg`). Each pair is measured `repeats` times, alternating, and the median kept.

`stage_times` splits one item's cost (single process, ms per sample) by stage, for profiling.
"""

from __future__ import annotations

import logging
import os
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np
from torch.utils.data import DataLoader, Dataset

from perception.data.collate import collate_samples
from perception.data.dataset import NuScenesDataset
from perception.data.loader import SampleLoader
from perception.data.transforms import sample_bev_aug

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BenchResult:
    workers: int
    samples: int
    pipeline_samples_per_s: float
    decode_only_samples_per_s: float

    @property
    def ratio(self) -> float:
        return self.pipeline_samples_per_s / self.decode_only_samples_per_s


class _DecodeOnly(Dataset):
    """Reads and fully decodes the 6 camera JPEGs of each sample; returns the summed pixel count."""

    def __init__(self, dataset: NuScenesDataset):
        self.root = Path(dataset.dataroot)
        self.paths = dataset.index.cam_paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> int:
        total = 0
        for rel in self.paths[i]:
            img = cv2.imdecode(np.fromfile(self.root / rel, np.uint8), cv2.IMREAD_COLOR)
            total += img.size
        return total


def _first(batch):
    return batch[0]


def _rate(loader: DataLoader, n: int, warmup: int) -> float:
    it = iter(loader)
    for _ in range(warmup):
        next(it)
    t0 = time.perf_counter()
    for _ in range(n):
        next(it)
    return n / (time.perf_counter() - t0)


def run_data_bench(dataset: NuScenesDataset, workers: tuple[int, ...] = (0, 1, 2), samples: int = 24,
                   repeats: int = 3) -> list[BenchResult]:
    """Samples/s of `dataset` (collated, batch 1) and of decode-only over its first samples, per worker count."""
    if len(dataset) == 0:
        raise ValueError(f"no samples in {dataset.dataroot}")
    results = []
    for w in workers:
        warmup = max(2, 2 * w)
        order = [i % len(dataset) for i in range(samples + warmup)]
        common = dict(batch_size=1, num_workers=w, sampler=order, persistent_workers=False,
                      prefetch_factor=4 if w else None)
        pipe, dec = [], []
        for _ in range(repeats):
            pipe.append(_rate(SampleLoader(dataset, collate_fn=collate_samples, **common), samples, warmup))
            dec.append(_rate(SampleLoader(_DecodeOnly(dataset), collate_fn=_first, **common), samples, warmup))
        res = BenchResult(workers=w, samples=samples, pipeline_samples_per_s=statistics.median(pipe),
                          decode_only_samples_per_s=statistics.median(dec))
        log.info("workers=%d: pipeline %.2f samples/s, decode-only %.2f samples/s (%.0f%%)", w,
                 res.pipeline_samples_per_s, res.decode_only_samples_per_s, 100 * res.ratio)
        results.append(res)
    return results


def stage_times(dataset: NuScenesDataset, samples: int = 24) -> dict[str, float]:
    """Mean ms per sample of each stage of `dataset`'s item, in this process: images (read, decode, augment),
    lidar / radar (read, motion-compensate, BEV-augment), map (targets as the dataset renders them), item (the
    whole `dataset[i]`, which also draws the augmentation and copies boxes) and collate (batch of one)."""
    cfg = dataset.config
    n = min(samples, len(dataset))
    totals = dict.fromkeys(("images", "lidar", "radar", "map", "item", "collate"), 0.0)
    warmup = min(2, n)
    for step, i in enumerate(list(range(warmup)) + list(range(n))):  # the first `warmup` passes are not timed
        rng = dataset._rng(i)
        aug = sample_bev_aug(rng, cfg.bev_aug) if (cfg.train and cfg.bev_aug is not None) else np.eye(4)
        t = [time.perf_counter()]
        dataset.load_images(i, rng)
        t.append(time.perf_counter())
        dataset.load_points_lidar(i, aug)
        t.append(time.perf_counter())
        dataset.load_points_radar(i, aug)
        t.append(time.perf_counter())
        dataset.load_map_masks(i, aug)
        t.append(time.perf_counter())
        sample = dataset[i]
        t.append(time.perf_counter())
        collate_samples([sample])
        t.append(time.perf_counter())
        if step >= warmup:
            for k, name in enumerate(totals):
                totals[name] += t[k + 1] - t[k]
    return {name: 1000.0 * v / n for name, v in totals.items()}


def bench_report(dataset: NuScenesDataset, results: list[BenchResult], stages: dict[str, float],
                 config: str | Path | None = None) -> dict:
    """The JSON written by `perception bench data --out`: the figures for the largest worker count at the top
    (`pipeline_samples_per_s`, `decode_only_samples_per_s`, `ratio`), every worker count under `by_workers`,
    the per-stage times (ms per sample, one process) and what was measured."""
    idx = dataset.index
    last = max(results, key=lambda r: r.workers)
    return {
        "pipeline_samples_per_s": round(last.pipeline_samples_per_s, 3),
        "decode_only_samples_per_s": round(last.decode_only_samples_per_s, 3),
        "ratio": round(last.ratio, 4),
        "workers": last.workers,
        "by_workers": [dict(asdict(r), ratio=round(r.ratio, 4)) for r in results],
        "stages_ms": {k: round(v, 2) for k, v in stages.items()},
        "config": None if config is None else str(config),
        "dataroot": str(dataset.dataroot),
        "samples": last.samples,
        "camera_wh": [int(v) for v in idx.cam_wh[0, 0]],
        "image_hw": list(dataset.config.image.final_hw),
        "lidar_sweeps_per_sample": float(np.diff(idx.lidar_offsets).mean()),
        "radar_files_per_sample": float(np.diff(idx.radar_offsets).mean()),
        "map": dataset.config.map if dataset.map_locations else "off (no map expansion)",
        "map_cache": bool(dataset.config.map_cache),
        "cpus": os.cpu_count(),
    }


def format_results(report: dict) -> str:
    """A small table of a `bench_report`."""
    lines = [
        f"cameras 6 x {report['camera_wh'][0]}x{report['camera_wh'][1]} -> {report['image_hw'][1]}x"
        f"{report['image_hw'][0]}, LiDAR sweeps/sample {report['lidar_sweeps_per_sample']:.1f}, radar "
        f"files/sample {report['radar_files_per_sample']:.1f}, {report['samples']} samples per measurement",
        f"{'workers':>7}  {'pipeline/s':>10}  {'decode-only/s':>13}  {'ratio':>6}",
    ]
    for r in report["by_workers"]:
        lines.append(f"{r['workers']:>7}  {r['pipeline_samples_per_s']:>10.2f}  {r['decode_only_samples_per_s']:>13.2f}"
                     f"  {r['ratio']:>6.0%}")
    lines.append("stage ms/sample (one process): " + ", ".join(f"{k} {v:.1f}" for k, v in report["stages_ms"].items()))
    return "\n".join(lines)
