"""`perception bench data`: data pipeline throughput against the cost of only decoding the same JPEGs.

For each worker count, two DataLoaders run over the same samples with the same number of worker processes:
  - pipeline: the full training item (6 camera images decoded, augmented and warped to the model size; LiDAR
    and radar sweeps read, motion-compensated and BEV-augmented; boxes; map masks rendered) and collation;
  - decode-only: read the 6 camera files of the sample and decode them at full resolution (cv2.imdecode).
The ratio pipeline / decode-only is the figure of merit (goal >= 0.8). The pipeline may be faster than a full
decode: when the model image is at most half the camera resolution, libjpeg decodes at 1/2 scale in the DCT
domain (see `loading.read_jpeg`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from torch.utils.data import DataLoader, Dataset

from perception.data.collate import collate_samples
from perception.data.dataset import DatasetConfig, NuScenesDataset
from perception.data.mmdet3d_info import read_mmdet3d_infos
from perception.data.transforms import BEVAugConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BenchResult:
    workers: int
    samples: int
    pipeline_per_s: float
    decode_only_per_s: float
    mean_lidar_points: float
    mean_radar_points: float
    image_wh: tuple[int, int]
    lidar_sweeps: float
    radar_files: float

    @property
    def ratio(self) -> float:
        return self.pipeline_per_s / self.decode_only_per_s


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


def run_data_bench(dataroot: str | Path, version: str = "v1.0-mini", split: str | None = None,
                   workers: tuple[int, ...] = (0, 1, 2), samples: int = 24, lidar_sweeps: int = 10,
                   radar_sweeps: int = 6, info: str | Path | None = None) -> list[BenchResult]:
    """Measure samples/s of the training pipeline and of decode-only, for each worker count (`info`: the samples
    of this mmdet3d v2 info file instead of `split`'s)."""
    index = None
    if info is not None:
        index = read_mmdet3d_infos(info, dataroot, lidar_sweeps=lidar_sweeps)
    base = NuScenesDataset(dataroot, version, split, config=DatasetConfig(
        train=True, bev_aug=BEVAugConfig(), lidar_sweeps=lidar_sweeps, radar_sweeps=radar_sweeps), index=index)
    if len(base) == 0:
        raise ValueError(f"no samples in {dataroot} ({version}, {split})")
    idx = base.index
    probe = base[0]
    results = []
    for w in workers:
        warmup = max(2, 2 * w)
        n = samples
        order = [i % len(base) for i in range(n + warmup)]
        common = dict(batch_size=1, num_workers=w, sampler=order, persistent_workers=False,
                      prefetch_factor=4 if w else None)
        pipe = _rate(DataLoader(base, collate_fn=collate_samples, **common), n, warmup)
        dec = _rate(DataLoader(_DecodeOnly(base), collate_fn=_first, **common), n, warmup)
        res = BenchResult(
            workers=w, samples=n, pipeline_per_s=pipe, decode_only_per_s=dec,
            mean_lidar_points=float(probe.points_lidar.shape[0]), mean_radar_points=float(probe.points_radar.shape[0]),
            image_wh=tuple(int(v) for v in idx.cam_wh[0, 0]),
            lidar_sweeps=float(np.diff(idx.lidar_offsets).mean()), radar_files=float(np.diff(idx.radar_offsets).mean()),
        )
        log.info("workers=%d: pipeline %.2f samples/s, decode-only %.2f samples/s (%.0f%%)", w, pipe, dec,
                 100 * res.ratio)
        results.append(res)
    return results


def format_results(results: list[BenchResult]) -> str:
    """A small table of the figures."""
    if not results:
        return "no results"
    r0 = results[0]
    lines = [
        f"cameras 6 x {r0.image_wh[0]}x{r0.image_wh[1]}, LiDAR sweeps/sample {r0.lidar_sweeps:.1f}, "
        f"radar files/sample {r0.radar_files:.1f} (5 radars), first sample: {r0.mean_lidar_points:.0f} LiDAR / "
        f"{r0.mean_radar_points:.0f} radar points",
        f"{'workers':>7}  {'pipeline/s':>10}  {'decode-only/s':>13}  {'ratio':>6}",
    ]
    for r in results:
        lines.append(f"{r.workers:>7}  {r.pipeline_per_s:>10.2f}  {r.decode_only_per_s:>13.2f}  {r.ratio:>6.0%}")
    return "\n".join(lines)
