"""Training and fine-tuning: one process, or many under `torchrun` (PyTorch DDP).

The loop is short on purpose (`Trainer.step`); everything around it is plain functions:
  - data: `build_dataset` turns the experiment config into a `NuScenesDataset`; `EpochSampler` gives every
    rank its share of a seeded per-epoch permutation, and can start mid-epoch (exact resume);
  - optimisation: AdamW with layer-wise lr decay over the camera ViT, linear warm-up then cosine decay,
    gradient clipping, gradient accumulation, AMP on GPU, optional EMA of the weights;
  - checkpoints: `W/checkpoints/last.pt`, `best.pt` and `step_XXXXXXX.pt`, each written to a temp file and
    renamed, with model, optimizer, scheduler, scaler, EMA, step and every RNG state, and what rebuilds the
    model on another machine (format and loading: `perception.checkpoint`);
  - logging: a progress bar with loss and ETA, readable log lines, TensorBoard scalars in `W/tb`, the resolved
    config in `W/config.yaml`; periodic validation with the official metrics (`perception.evaluation`).

Distributed: `torchrun --nproc-per-node K -m perception train ...`. Each rank draws its own micro-batches of
the global batch (batch_size x world size x accumulate_steps), seeds itself with seed + rank, and only rank 0
logs, writes checkpoints and evaluates (validation predictions are gathered from every rank). Whatever could
differ between ranks is decided on rank 0 and shared: the time budget (`TimeBudget`), the initial weights
(DDP's broadcast, which the EMA starts from), the GT-sampling database (`cached_gt_database`).
BatchNorm statistics are per process, so K processes with batch b compute exactly what one process computes
with batch b and K accumulation steps (`tests/test_training.py` checks this).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Sampler

from perception.checkpoint import (  # noqa: F401 (re-exported: the checkpoint API's older home)
    CHECKPOINT_FORMAT, CHECKPOINT_VERSION, init_from_checkpoint, load_checkpoint, model_card, model_state_from,
    newest_valid_checkpoint, portable_config, rng_state, save_atomic, set_rng_state)
from perception.config import ExperimentConfig
from perception.data.build import build_dataset, default_splits  # noqa: F401 (re-exported: their older home)
from perception.distributed import DistInfo, TimeBudget, init_distributed, pick_device  # noqa: F401 (re-exported)
from perception.errors import ConfigError, PerceptionError

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------- data


class EpochSampler(Sampler[int]):
    """Indices of one epoch for one rank: a permutation seeded by (seed, epoch), cut into global batches of
    ``micro_batch x world_size x accumulate`` samples; micro-batch ``a * world_size + rank`` of each global
    batch goes to `rank` as its a-th accumulation step. Incomplete global batches are dropped.

    `start_batch` skips that many global batches (resuming mid-epoch).
    """

    def __init__(self, num_samples: int, *, micro_batch: int, world_size: int = 1, rank: int = 0, accumulate: int = 1,
                 seed: int = 0, epoch: int = 0, shuffle: bool = True, start_batch: int = 0):
        self.n, self.mb, self.world, self.rank, self.acc = num_samples, micro_batch, world_size, rank, accumulate
        self.seed, self.epoch, self.shuffle, self.start_batch = seed, epoch, shuffle, start_batch

    @property
    def global_batch(self) -> int:
        return self.mb * self.world * self.acc

    def batches_per_epoch(self) -> int:
        return self.n // self.global_batch

    def __len__(self) -> int:
        return max(0, self.batches_per_epoch() - self.start_batch) * self.mb * self.acc

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
            perm = torch.randperm(self.n, generator=g).tolist()
        else:
            perm = list(range(self.n))
        for b in range(self.start_batch, self.batches_per_epoch()):
            chunk = perm[b * self.global_batch:(b + 1) * self.global_batch]
            for a in range(self.acc):
                m = a * self.world + self.rank
                yield from chunk[m * self.mb:(m + 1) * self.mb]


def make_loader(dataset, sampler, batch_size: int, workers: int) -> DataLoader:
    from perception.data.collate import collate_samples

    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, collate_fn=collate_samples,
                      persistent_workers=False, pin_memory=torch.cuda.is_available())


def gt_database_key(dataset, min_points: int = 5, grid=None) -> dict:
    """What a GT-sampling database of `dataset` (a `NuScenesDataset`) is built from, as a cache key: the
    dataroot, version and split, the LiDAR settings, the grid whose boxes it keeps, the table files' sizes and
    mtimes, and a digest of the index arrays the build reads (samples, sweep files and poses, boxes): a changed
    dataset misses."""
    from perception.cache import array_digest, table_fingerprint

    idx, c = dataset.index, dataset.config
    grid = grid if grid is not None else c.grid
    return {"format": 1, "dataroot": str(Path(dataset.dataroot).resolve()), "version": dataset.version,
            "split": dataset.split, "lidar_sweeps": c.lidar_sweeps, "min_distance": c.min_distance,
            "min_points": min_points, "grid": [grid.x_min, grid.x_max, grid.y_min, grid.y_max],
            "tables": table_fingerprint(dataset.dataroot, dataset.version),
            "index": array_digest(idx.tokens, idx.lidar_offsets, idx.lidar_paths, idx.lidar_sweep2lidar, idx.lidar_dt,
                                  idx.box_offsets, idx.boxes, idx.labels, idx.attributes)}


def cached_gt_database(dataset, dist_info: DistInfo, *, fallback_dir: Path, min_points: int = 5, grid=None):
    """The `GTDatabase` of `dataset`, from the cache when it was built before from the same data.

    The cache file is `perception.cache.cache_path("gt_database", gt_database_key(...), ".npz")` (under
    ``$PERCEPTION_CACHE``, default ``~/.cache/perception``), or the same name in `fallback_dir` (the run's work
    dir) when the cache folder cannot be written; never in the dataroot. Rank 0 loads or builds and writes it;
    the other ranks wait for it (one broadcast of its path) and load it, building their own only when they
    cannot read it (a cache folder that is not shared between nodes).
    """
    from perception.cache import atomic_write, cache_path
    from perception.data.gt_sampling import GTDatabase

    key = gt_database_key(dataset, min_points, grid)
    candidates = [cache_path("gt_database", key, ".npz"), cache_path("gt_database", key, ".npz", root=fallback_dir)]
    db, where = None, None
    if dist_info.is_main:
        for path in candidates:
            if path.is_file():
                try:
                    db, where = GTDatabase.load(path), path
                    log.info("GT database: cache hit %s (%d objects)", path, len(db))
                    break
                except (OSError, ValueError, KeyError) as exc:
                    log.warning("GT database: unreadable cache file %s (%s); rebuilding", path, exc)
        if db is None:
            db = GTDatabase.build(dataset, min_points, grid)
            for path in candidates:
                try:
                    with atomic_write(path, key) as f:
                        db.save(f)
                    where = path
                    log.info("GT database: cached in %s", path)
                    break
                except PerceptionError as exc:
                    log.warning("GT database: %s", exc)
    if dist_info.enabled:
        shared = [None if where is None else str(where)]
        dist.broadcast_object_list(shared, src=0)
        if not dist_info.is_main:
            try:
                db = GTDatabase.load(shared[0]) if shared[0] is not None else None
            except (OSError, ValueError, KeyError):
                db = None
            if db is None:
                log.warning("GT database: rank %d cannot read rank 0's cache file %s; building its own", dist_info.rank, shared[0])
                db = GTDatabase.build(dataset, min_points, grid)
    return db


# --------------------------------------------------------------------------------------- optimisation


def lr_lambda(warmup: int, total: int, min_ratio: float = 0.01):
    """Linear warm-up from 1/warmup to 1 over `warmup` steps, then cosine down to `min_ratio` at `total`."""

    def f(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


class EMA:
    """Exponential moving average of a model's parameters and buffers (decay d per step, with warm-up)."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.updates = 0
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for k, v in model.state_dict().items():
            if v.dtype.is_floating_point:
                self.shadow[k].mul_(d).add_(v.detach(), alpha=1 - d)
            else:
                self.shadow[k].copy_(v)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "updates": self.updates, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        self.decay, self.updates = state["decay"], state["updates"]
        for k, v in state["shadow"].items():
            self.shadow[k].copy_(v)


class _LossWrapper(nn.Module):
    """Lets DDP wrap `model.loss` (DDP synchronises gradients of what runs through its forward)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch):
        return self.model.loss(batch)


# ---------------------------------------------------------------------------------------------- trainer


@dataclass(frozen=True)
class RunSpec:
    """What `perception train` was asked to do (besides the experiment config)."""

    data: Path
    version: str = "v1.0-mini"
    work_dir: Path = Path("work_dirs/run")
    max_steps: int | None = None
    epochs: int | None = None
    resume: bool = False
    init_from: Path | None = None
    time_budget_s: float | None = None  # stop (and checkpoint) after this much training time
    device: str | None = None
    progress: bool = True
    train_split: str | None = None
    val_split: str | None = None
    train_info: Path | None = None  # mmdet3d v2 info files (paths relative to `data`) instead of the splits
    val_info: Path | None = None


@dataclass
class TrainResult:
    step: int
    last_checkpoint: Path
    best_checkpoint: Path | None
    history: list[dict]
    stopped_early: bool


def autocast_dtype(amp: bool | str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``train.amp`` on `device`, None for float32 throughout.

    ``auto``: on for CUDA, off elsewhere. On CUDA bfloat16 where supported, else float16 (the trainer then scales
    the loss); on other devices (``true`` on CPU) bfloat16, so that CI runs the mixed-precision path.
    """
    if amp == "auto":
        amp = device.type == "cuda"
    if not amp:
        return None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16


class Trainer:
    def __init__(self, cfg: ExperimentConfig, spec: RunSpec):
        from perception.model.build import build_model
        from perception.model.camera import layer_decay_param_groups

        self.cfg, self.spec = cfg, spec
        t = cfg.train
        self.device = pick_device(spec.device)
        self.dist = init_distributed(self.device, t.dist_timeout_min)
        if t.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        seed = t.seed + self.dist.rank
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        self.work_dir = Path(spec.work_dir)
        self.ckpt_dir = self.work_dir / "checkpoints"
        train_split, val_split = default_splits(spec.version)
        self.train_split = f"info-{Path(spec.train_info).stem}" if spec.train_info else spec.train_split or train_split
        self.val_split = f"info-{Path(spec.val_info).stem}" if spec.val_info else spec.val_split or val_split
        if t.val_every and (spec.train_info or spec.val_info):  # fail now, not at the first validation
            from perception.data.mmdet3d_info import info_sample_tokens
            from perception.evaluation import check_tokens_in_tables, require_tables

            require_tables(spec.data, spec.version, "validation scores against the devkit tables (train.val_every=0 "
                           "trains without validation)")
            if spec.val_info:
                check_tokens_in_tables(spec.data, spec.version, info_sample_tokens(spec.val_info), spec.val_info)

        self.model = build_model(cfg).to(self.device)
        if spec.init_from is not None:
            init_from_checkpoint(self.model, spec.init_from)
        self.train_set = build_dataset(cfg, spec.data, spec.version, self.train_split, train=True, map_grid=self.model.map_grid,
                                       info=spec.train_info)
        if t.gt_sampling:
            self.train_set.gt_sampler = self._gt_sampler()
        self.val_set = None  # built on first validation
        self.micro_batch = t.batch_size
        self.global_batch = t.batch_size * self.dist.world_size * t.accumulate_steps
        self.batches_per_epoch = len(self.train_set) // self.global_batch
        if self.batches_per_epoch == 0:
            raise ConfigError(f"train.batch_size: a global batch of {self.global_batch} samples is larger than the "
                              f"{len(self.train_set)} samples of split {self.train_split}")
        # With only a time budget, the schedule's length is estimated from the measured step rate (`fit`).
        self.adaptive_length = spec.time_budget_s is not None and spec.max_steps is None and spec.epochs is None
        if spec.max_steps is not None:
            self.total_steps = spec.max_steps
        elif spec.epochs is not None:
            self.total_steps = spec.epochs * self.batches_per_epoch
        else:
            self.total_steps = t.max_steps

        groups = layer_decay_param_groups(self.model, lr=t.lr, weight_decay=t.weight_decay, layer_decay=t.layer_decay)
        self.optimizer = torch.optim.AdamW(groups, lr=t.lr, weight_decay=t.weight_decay, betas=(0.9, 0.999))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda step: lr_lambda(t.warmup_steps, self.total_steps)(step))
        amp_dtype = autocast_dtype(t.amp, self.device)
        self.amp = amp_dtype is not None
        self.amp_dtype = amp_dtype or torch.float32
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        log.info("mixed precision: %s", f"{str(self.amp_dtype).removeprefix('torch.')} autocast on {self.device.type}"
                 if self.amp else "off (float32)")
        wrapper = _LossWrapper(self.model)
        if self.dist.enabled:
            wrapper = nn.parallel.DistributedDataParallel(
                wrapper, device_ids=[self.device.index] if self.device.type == "cuda" else None, find_unused_parameters=True)
        # After the DDP wrapper: every rank's EMA starts from rank 0's weights, which DDP has just broadcast.
        self.ema = EMA(self.model, t.ema_decay) if t.ema_decay > 0 else None
        self.loss_module = wrapper
        self.step = 0
        self.best_nds = -1.0
        self.history: list[dict] = []
        self.skipped: dict[str, str] = {}  # bad samples skipped so far (data.skip_bad_samples): token -> reason
        self.writer = None
        if self.dist.is_main:
            self.work_dir.mkdir(parents=True, exist_ok=True)
            (self.work_dir / "config.yaml").write_text(_dump_config(cfg))
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.work_dir / "tb"))
        if spec.resume:
            self._resume()

    # ----------------------------------------------------------------------------------- checkpoints

    def _gt_sampler(self):
        from perception.data.gt_sampling import GTSampler

        return GTSampler(cached_gt_database(self.train_set.with_config(train=False, bev_aug=None), self.dist,
                                            fallback_dir=self.work_dir / "cache", grid=self.model.grid))

    def state_dict(self) -> dict:
        """Everything `_resume` restores, and what rebuilds the model anywhere (see `perception.checkpoint`)."""
        config, provenance = portable_config(self.cfg)
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "ema": self.ema.state_dict() if self.ema else None,
            "step": self.step,
            "total_steps": self.total_steps,
            "best_nds": self.best_nds,
            "history": self.history,
            "skipped": self.skipped,
            "rng": rng_state(),
            "config": config,
            "provenance": provenance,
            "model_card": model_card(self.model),
            "version": self.spec.version,
        }

    def save(self, name: str) -> Path:
        path = self.ckpt_dir / name
        if self.dist.is_main:
            save_atomic(self.state_dict(), path)
        return path

    def _resume(self) -> None:
        found = newest_valid_checkpoint(self.ckpt_dir, map_location=self.device)
        if found is None:
            log.warning("--resume: no readable checkpoint in %s; starting from scratch", self.ckpt_dir)
            return
        path, ckpt = found
        if path.name != "last.pt":
            log.warning("--resume: %s is missing or corrupt; resuming from %s (step %d) instead",
                        self.ckpt_dir / "last.pt", path, ckpt["step"])
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        if self.ema and ckpt.get("ema"):
            self.ema.load_state_dict(ckpt["ema"])
        self.step, self.best_nds, self.history = ckpt["step"], ckpt["best_nds"], ckpt["history"]
        self.skipped = dict(ckpt.get("skipped", {}))
        if self.adaptive_length:
            self.total_steps = ckpt.get("total_steps", self.total_steps)
        if self.dist.world_size == 1:
            set_rng_state(ckpt["rng"])
        else:  # rank 0's states were saved; every rank reseeds from its rank and the step
            seed = self.cfg.train.seed + 7919 * self.step + self.dist.rank
            random.seed(seed)
            np.random.seed(seed)
            torch.manual_seed(seed)
        log.info("resumed from %s at step %d", path, self.step)

    # -------------------------------------------------------------------------------------- training

    def _loader(self, epoch: int, start_batch: int) -> DataLoader:
        t = self.cfg.train
        self.train_set.set_epoch(epoch)
        sampler = EpochSampler(len(self.train_set), micro_batch=self.micro_batch, world_size=self.dist.world_size,
                               rank=self.dist.rank, accumulate=t.accumulate_steps, seed=t.seed, epoch=epoch,
                               start_batch=start_batch)
        return make_loader(self.train_set, sampler, self.micro_batch, t.num_workers)

    def train_step(self, micro_batches: list) -> dict[str, float]:
        """One optimizer step over `accumulate_steps` micro-batches; returns the mean loss terms."""
        t = self.cfg.train
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        totals: dict[str, float] = {}
        for i, batch in enumerate(micro_batches):
            batch = batch.to(self.device, non_blocking=True)
            sync = i == len(micro_batches) - 1
            ctx = self.loss_module.no_sync() if (self.dist.enabled and not sync) else contextlib.nullcontext()
            with ctx:
                with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp):
                    losses = self.loss_module(batch)
                    total = sum(losses.values())
                if not torch.isfinite(total):
                    raise PerceptionError(f"non-finite loss at step {self.step}: " + ", ".join(f"{k}={v.item():.4g}" for k, v in losses.items())
                                          + f" (samples {[m['sample_token'] for m in batch.meta]})")
                self.scaler.scale(total / len(micro_batches)).backward()
            for k, v in losses.items():
                totals[k] = totals.get(k, 0.0) + float(v.detach()) / len(micro_batches)
            for meta in batch.meta:
                for token, reason in meta.get("skipped_reasons", {}).items():
                    if token not in self.skipped:
                        self.skipped[token] = reason
                        log.warning("step %d: skipped bad sample %s: %s", self.step, token, reason)
        self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        if self.ema:
            self.ema.update(self.model)
        self.step += 1
        totals["total"] = sum(v for k, v in totals.items())
        totals["grad_norm"] = float(grad_norm)
        return totals

    def fit(self) -> TrainResult:
        t = self.cfg.train
        start_time = time.time()
        budget = TimeBudget(self.spec.time_budget_s, adaptive=self.adaptive_length, max_steps=t.max_steps,
                            dist_info=self.dist, device=self.device, start=start_time)
        stopped_early = False
        bar = None
        if self.dist.is_main and self.spec.progress:
            from tqdm import tqdm

            bar = tqdm(total=self.total_steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True)
        log.info("training %d steps (%d per epoch, global batch %d on %d process(es), device %s) into %s",
                 self.total_steps, self.batches_per_epoch, self.global_batch, self.dist.world_size, self.device, self.work_dir)
        running: dict[str, float] = {}
        while self.step < self.total_steps and not stopped_early:
            epoch, start_batch = divmod(self.step, self.batches_per_epoch)
            micro: list = []
            for batch in self._loader(epoch, start_batch):
                micro.append(batch)
                if len(micro) < t.accumulate_steps:
                    continue
                losses = self.train_step(micro)
                micro = []
                for k, v in losses.items():
                    running[k] = running.get(k, 0.0) + v
                running["_n"] = running.get("_n", 0) + 1
                if self.writer is not None:
                    for k, v in losses.items():
                        self.writer.add_scalar(f"train/{k}", v, self.step)
                    self.writer.add_scalar("train/lr", self.optimizer.param_groups[-1]["lr"], self.step)
                over_budget, self.total_steps = budget.after_step(self.step, self.total_steps)
                if bar is not None:
                    bar.total = self.total_steps
                    bar.update(1)
                    bar.set_postfix(loss=f"{losses['total']:.3f}", hm=f"{losses.get('heatmap', 0):.3f}")
                if self.step % t.log_every == 0 or self.step == self.total_steps:
                    n = running.pop("_n")
                    mean = {k: v / n for k, v in running.items()}
                    running = {}
                    self.history.append({"step": self.step, "time_s": time.time() - start_time, **mean})
                    if self.dist.is_main:
                        log.info("step %d/%d  %s  lr %.2e", self.step, self.total_steps,
                                 "  ".join(f"{k} {v:.4f}" for k, v in mean.items() if k != "grad_norm"),
                                 self.optimizer.param_groups[-1]["lr"])
                if t.val_every and self.step % t.val_every == 0 and self.step < self.total_steps and not over_budget:
                    self.validate()
                if self.step % t.checkpoint_every == 0:
                    self.save("last.pt")
                    self.save(f"step_{self.step:07d}.pt")
                if self.step >= self.total_steps:
                    break
                if over_budget:
                    log.info("time budget of %.0f s reached at step %d", self.spec.time_budget_s, self.step)
                    stopped_early = True
                    break
        if bar is not None:
            bar.close()
        last = self.save("last.pt")
        best = self.ckpt_dir / "best.pt"
        if t.val_every:
            self.validate()
        if self.writer is not None:
            self.writer.flush()
        self._report_skipped()
        return TrainResult(self.step, last, best if best.is_file() else None, self.history, stopped_early)

    def _report_skipped(self) -> None:
        """Log and write (W/skipped_samples.json) every bad sample skipped by any rank."""
        skipped = dict(self.skipped)
        if self.dist.enabled:
            parts = [None] * self.dist.world_size
            dist.all_gather_object(parts, skipped)
            for p in parts:
                skipped.update(p)
        if not self.dist.is_main:
            return
        path = self.work_dir / "skipped_samples.json"
        path.write_text(json.dumps(skipped, indent=1))
        if skipped:
            log.warning("skipped %d bad sample(s) during training (listed in %s): %s", len(skipped), path,
                        ", ".join(sorted(skipped)))

    # ------------------------------------------------------------------------------------ validation

    def eval_model(self) -> nn.Module:
        """The weights to evaluate: the EMA when enabled."""
        if self.ema is None:
            return self.model
        from copy import deepcopy

        m = deepcopy(self.model)
        m.load_state_dict(self.ema.shadow)
        return m

    def validate(self) -> dict | None:
        from perception.evaluation import evaluate_model

        if self.val_set is None:
            self.val_set = build_dataset(self.cfg, self.spec.data, self.spec.version, self.val_split, train=False,
                                         map_grid=self.model.map_grid, info=self.spec.val_info)
        metrics = evaluate_model(self.eval_model(), self.val_set, self.spec.data, self.spec.version, self.val_split,
                                 self.work_dir / "val" / f"step_{self.step:07d}", device=self.device, dist_info=self.dist,
                                 batch_size=self.cfg.train.batch_size, workers=self.cfg.train.num_workers,
                                 progress=self.spec.progress, info=self.spec.val_info)
        if self.dist.enabled:  # rank 0 ran the devkit evaluation alone (train.dist_timeout_min bounds the wait)
            dist.barrier()
        if metrics is None:  # non-zero ranks
            return None
        if self.writer is not None:
            for k in ("nds", "map", "mate", "mase", "maoe", "mave", "maae", "seg_miou", "scene_map"):
                if metrics.get(k) is not None:
                    self.writer.add_scalar(f"val/{k}", metrics[k], self.step)
        self.history.append({"step": self.step, "val_nds": metrics["nds"], "val_map": metrics["map"], "val_seg_miou": metrics["seg_miou"]})
        seg = "n/a" if metrics["seg_miou"] is None else f"{metrics['seg_miou']:.4f}"
        log.info("validation at step %d: NDS %.4f mAP %.4f seg mIoU %s", self.step, metrics["nds"], metrics["map"], seg)
        if metrics["nds"] > self.best_nds:
            self.best_nds = metrics["nds"]
            self.save("best.pt")
        return metrics

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.dist.enabled and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


def _dump_config(cfg: ExperimentConfig) -> str:
    import yaml

    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def train(cfg: ExperimentConfig, spec: RunSpec) -> TrainResult:
    trainer = Trainer(cfg, spec)
    try:
        return trainer.fit()
    finally:
        trainer.close()
