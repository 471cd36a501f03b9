"""The `NuScenesDataset` an experiment config describes: one function used by training, evaluation,
robustness, viz, export calibration and the benches."""

from __future__ import annotations

import time
from pathlib import Path


from perception.config import ExperimentConfig
from perception.errors import PerceptionError
from perception.data.dataset import DatasetConfig, NuScenesDataset, cached_sample_index, read_tables
from perception.data.mmdet3d_info import read_mmdet3d_infos
from perception.data.transforms import BEVAugConfig, ImageAugConfig
from perception.distributed import DistInfo
from perception.structures import BEVFUSION_MAP_GRID


def default_splits(version: str) -> tuple[str, str]:
    """(train split, validation split) of a nuScenes version."""
    return ("mini_train", "mini_val") if version.endswith("mini") else ("train", "val")


def base_dataset_config(cfg: ExperimentConfig, *, train: bool, map_grid=None) -> DatasetConfig:
    """The `DatasetConfig` of the experiment before its augmentation: grid, sweeps, map and bad-sample policy."""
    d = cfg.data
    grid = map_grid if map_grid is not None else cfg.grid.build()
    # The dataset counts the keyframe sweep too (the devkit's nsweeps); the config counts the sweeps before it.
    return DatasetConfig(grid=grid, lidar_sweeps=d.lidar_sweeps + 1, radar_sweeps=d.radar_sweeps + 1,
                         skip_bad_samples=d.skip_bad_samples, seed=cfg.train.seed, map=d.map, map_cache=d.map_cache,
                         eval_map_grid=None if train else BEVFUSION_MAP_GRID, classes=cfg.classes.build(),
                         rig=cfg.rig.build())


def index_splits(cfg: ExperimentConfig, data: str | Path, version: str, splits: list[str]) -> list[dict]:
    """Build (or find in the cache) the sample index of each split as `build_dataset` reads it for this config,
    reading the devkit tables at most once. Returns per split: split, samples, bad samples, cache hit, seconds."""
    settings = base_dataset_config(cfg, train=True)
    tables = []

    def read_once():
        if not tables:
            tables.append(read_tables(data, version))
        return tables[0]

    out = []
    for split in splits:
        start, missed = time.perf_counter(), []

        def tables_on_miss():
            missed.append(split)
            return read_once()

        index, bad = cached_sample_index(data, version, split, settings, tables=tables_on_miss)
        out.append({"split": split, "samples": len(index), "bad_samples": len(bad), "cache_hit": not missed,
                    "seconds": time.perf_counter() - start})
    return out


def build_dataset(cfg: ExperimentConfig, data: str | Path, version: str, split: str | None, *, train: bool,
                  map_grid=None, index=None, info: str | Path | None = None, dist_info: DistInfo | None = None):
    """The `NuScenesDataset` the experiment config describes (training augmentation when `train`).

    Image resize limits in the config are relative to the scale that fits each camera's width to
    ``data.image_size``, so one config serves 1600x900 nuScenes, smaller synthetic images and rigs of mixed
    camera sizes alike.
    `info`: the samples of this mmdet3d v2 info file (paths relative to `data`) instead of the split's.
    `dist_info`: under torchrun, every rank calls this together and rank 0 alone parses the tables when the
    index cache misses (`perception.data.dataset.cached_sample_index`).
    """
    d = cfg.data
    base = base_dataset_config(cfg, train=train, map_grid=map_grid)
    if info is not None:
        index = read_mmdet3d_infos(info, data, lidar_sweeps=base.lidar_sweeps, skip_bad_samples=d.skip_bad_samples)
    ds = NuScenesDataset(data, version, split, config=base, index=index, dist_info=dist_info)
    if len(ds) == 0:
        raise PerceptionError(f"{info}: no samples" if info is not None else f"{data}: split {split!r} of {version} has no samples")
    # Each camera is resized by its own width (`ImageAugConfig.fit_width`): mixed image sizes get the same view.
    image = ImageAugConfig(final_hw=tuple(d.image_size), resize_lim=tuple(d.resize_lim), bot_pct_lim=tuple(d.bot_pct_lim),
                           rot_lim_deg=tuple(d.rot_lim_deg), flip=d.image_flip, fit_width=True)
    bev = None
    if train and d.bev_aug:
        bev = BEVAugConfig(rot_lim_deg=tuple(d.bev_rot_lim_deg), scale_lim=tuple(d.bev_scale_lim),
                           flip_x_prob=d.bev_flip_prob, flip_y_prob=d.bev_flip_prob, trans_std=tuple(d.bev_trans_std))
    return ds.with_config(image=image, bev_aug=bev, train=train)
