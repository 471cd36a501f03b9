"""Training and fine-tuning: one process, or many under `torchrun` (PyTorch DDP).

The loop is short on purpose (`Trainer.fit`, `Trainer.train_step`); everything around it is plain functions,
here or in the modules it composes:
  - data: `perception.data.build.build_dataset` turns the experiment config into a `NuScenesDataset`;
    `perception.data.loader.EpochSampler` gives every rank its share of a seeded per-epoch permutation, and can
    start mid-epoch (exact resume); `CBGSSampler` does the same over a class-balanced expansion of the split
    (``train.cbgs``; an epoch is then one pass over the expansion); `perception.data.gt_cache` caches the
    GT-sampling database, which stops pasting at ``train.gt_sampling_stop_epoch`` (the dataset is told the epoch
    before each epoch's loader starts its workers);
  - optimisation: AdamW with layer-wise lr decay over the camera ViT, linear warm-up then cosine decay
    (`perception.schedule`), gradient clipping, gradient accumulation, AMP on GPU, optional EMA of the weights;
  - checkpoints: `W/checkpoints/last.pt`, `best.pt` and `step_XXXXXXX.pt`, each written to a temp file and
    renamed, with model, optimizer, scheduler, scaler, EMA, step and every RNG state, and what rebuilds the
    model on another machine (format and loading: `perception.checkpoint`); only the ``train.keep_checkpoints``
    newest `step_XXXXXXX.pt` are kept (`prune_checkpoints`);
  - bad steps: a non-finite loss (or, without fp16 loss scaling, gradient norm) on any rank skips the optimizer
    step on every rank (`Trainer.train_step`); ``train.max_bad_steps`` of them in a row stop the run with a
    `TrainingError` once `last.pt` is written;
  - logging (`perception.train_log`): a progress bar with loss and ETA, readable log lines, TensorBoard scalars
    in `W/tb`, the resolved config in `W/config.yaml`, the skipped bad samples in `W/skipped_samples.json`;
    periodic validation with the official metrics (`perception.evaluation`).

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
import logging
import math
import random
import time
from copy import deepcopy
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Sampler
from tqdm import tqdm

from perception.checkpoint import (
    init_from_checkpoint, model_card, newest_valid_checkpoint, portable_config, prune_checkpoints, rng_state,
    save_atomic, set_rng_state)
from perception.config import ExperimentConfig, TrainConfig
from perception.data.batch import Batch
from perception.data.build import build_dataset, default_splits
from perception.data.gt_cache import cached_gt_database
from perception.data.gt_sampling import GTSampler, GTSamplerConfig
from perception.data.loader import CBGSSampler, EpochSampler, SequenceSampler, make_loader
from perception.data.mmdet3d_info import info_sample_tokens
from perception.distributed import DistInfo, TimeBudget, any_rank, gather_objects, init_distributed, pick_device
from perception.errors import ConfigError, PerceptionError
from perception.evaluation import check_tokens_in_tables, evaluate_model, require_tables
from perception.model.build import build_model
from perception.model.camera import layer_decay_param_groups
from perception.model.temporal import TemporalState
from perception.model.weights import prefetch_pretrained
from perception.progress import progress_bar
from perception.schedule import EMA, autocast_dtype, lr_lambda
from perception.train_log import (
    VAL_SCALARS, RunningMean, bad_ranks, format_bad_step, format_losses, gather_skipped, log_scalars, log_validation,
    open_work_dir, record_skipped, write_skipped_report)

log = logging.getLogger(__name__)


class TrainingError(PerceptionError):
    """A run that cannot go on: ``train.max_bad_steps`` optimizer steps in a row were skipped (non-finite loss or
    gradients); `last.pt` holds the run as it was before them."""


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


class Trainer:
    """One run of `spec` with `cfg` on this process's rank: builds the model, data, optimizer and schedule
    (and resumes them with ``spec.resume``); `fit` trains, validates and checkpoints; `close` leaves the
    process group."""

    def __init__(self, cfg: ExperimentConfig, spec: RunSpec):
        self.cfg, self.spec = cfg, spec
        t = cfg.train
        self.device = pick_device(spec.device)
        self.dist = init_distributed(self.device, t.dist_timeout_min)
        if t.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        seed_everything(t.seed + self.dist.rank)
        self.work_dir = Path(spec.work_dir)
        self.ckpt_dir = self.work_dir / "checkpoints"
        self.train_split, self.val_split = run_splits(spec)
        if (t.val_every or t.val_every_epochs) and (spec.train_info or spec.val_info):  # fail now, not at the first validation
            check_validation_tables(spec)

        # Downloaded weights: rank 0 fetches them into the cache while the others wait, then every rank builds.
        fetch_pretrained_once(cfg.model.camera.pretrained, self.dist, self.device)
        self.model = build_model(cfg).to(self.device)
        sync_batchnorm(self.model, t.sync_bn, self.dist, self.device)
        if spec.init_from is not None:
            init_from_checkpoint(self.model, spec.init_from)
        self.train_set = build_dataset(cfg, spec.data, spec.version, self.train_split, train=True, map_grid=self.model.map_grid,
                                       info=spec.train_info, dist_info=self.dist)
        if t.gt_sampling:
            self.train_set.gt_sampler = self._gt_sampler()
        self.val_set = None  # built on first validation
        self.micro_batch = t.batch_size
        self.global_batch = t.batch_size * self.dist.world_size * t.accumulate_steps
        # Temporal fusion: batch slots stream consecutive keyframes (`SequenceSampler`), the history of each slot
        # is carried from step to step (a resumed run starts without history).
        self.state = TemporalState() if cfg.model.temporal.frames else None
        if self.state is not None and self.train_set.index.scene_tokens is None:
            raise ConfigError("model.temporal.frames: the training samples have no scene tokens (mmdet3d info files); "
                              "train a temporal model from the nuScenes tables")
        # An epoch is the split, or with train.cbgs one pass over its class-balanced expansion (`CBGSSampler`).
        self.sample_classes = self.train_set.index.classes_of_samples() if t.cbgs else None
        epoch_samples = len(self.train_set) if self.sample_classes is None else len(self._sampler(0, 0).expanded())
        self.batches_per_epoch = epoch_samples // self.global_batch
        if self.batches_per_epoch == 0:
            raise ConfigError(f"train.batch_size: a global batch of {self.global_batch} samples is larger than the "
                              f"{epoch_samples} samples of {'a CBGS epoch of ' if t.cbgs else ''}split "
                              f"{self.train_split}")
        # Steps between validations (0: none): train.val_every, or train.val_every_epochs in this run's epochs.
        self.val_interval = t.val_every or (t.val_every_epochs or 0) * self.batches_per_epoch
        # With only a time budget, the schedule's length is estimated from the measured step rate (`fit`).
        self.adaptive_length = spec.time_budget_s is not None and spec.max_steps is None and spec.epochs is None
        self.total_steps = schedule_length(spec, t, self.batches_per_epoch)

        self.optimizer = make_optimizer(self.model, t, self.global_batch)
        warmup = scaled_warmup(t, self.global_batch)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda step: lr_lambda(warmup, self.total_steps)(step))
        amp_dtype = autocast_dtype(t.amp, self.device)
        self.amp = amp_dtype is not None
        self.amp_dtype = amp_dtype or torch.float32
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        log.info("mixed precision: %s", f"{str(self.amp_dtype).removeprefix('torch.')} autocast on {self.device.type}"
                 if self.amp else "off (float32)")
        self.loss_module = wrap_loss(self.model, self.dist, self.device,
                                     find_unused_parameters=self.model.may_leave_parameters_unused)
        # After the DDP wrapper: every rank's EMA starts from rank 0's weights, which DDP has just broadcast.
        self.ema = EMA(self.model, t.ema_decay) if t.ema_decay > 0 else None
        self.step = 0  # global batches consumed (the data position), skipped bad steps included
        self.bad_steps = 0  # optimizer steps skipped on every rank (non-finite loss or gradients), in all
        self.bad_streak = 0  # ... in a row, up to now (train.max_bad_steps stops the run)
        # BatchNorm running statistics: restored when a step is skipped (a NaN forward would poison them for good).
        self._norm_buffers = [b for m in self.model.modules()
                              if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats
                              for b in (m.running_mean, m.running_var, m.num_batches_tracked) if b is not None]
        self.best_nds = -1.0
        self.history: list[dict] = []
        self.skipped: dict[str, str] = {}  # bad samples skipped so far (data.skip_bad_samples): token -> reason
        self.writer = open_work_dir(self.work_dir, cfg) if self.dist.is_main else None
        if spec.resume:
            self._resume()

    # ----------------------------------------------------------------------------------- checkpoints

    def _gt_sampler(self) -> GTSampler:
        classes = self.train_set.config.classes
        settings = GTSamplerConfig(stop_epoch=self.cfg.train.gt_sampling_stop_epoch)
        if classes.preset != "nuscenes":  # the paste counts of the user's classes, in their order
            settings = GTSamplerConfig(targets={c.name: c.paste for c in classes.classes if c.paste},
                                       stop_epoch=settings.stop_epoch)
        return GTSampler(cached_gt_database(self.train_set.with_config(train=False, bev_aug=None), self.dist,
                                            fallback_dir=self.work_dir / "cache", grid=self.model.grid),
                         settings, classes)

    def state_dict(self) -> dict:
        """Everything `_resume` restores, and what rebuilds the model anywhere (see `perception.checkpoint`)."""
        config, provenance = portable_config(self.cfg, self.model.camera_encoder.weights_provenance)
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "ema": self.ema.state_dict() if self.ema else None,
            "step": self.step,
            "total_steps": self.total_steps,
            "bad_steps": self.bad_steps,
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
        """Write checkpoint `name` into ``W/checkpoints`` atomically (rank 0 only; every rank gets the path)."""
        path = self.ckpt_dir / name
        if self.dist.is_main:
            save_atomic(self.state_dict(), path)
        return path

    def save_periodic(self) -> None:
        """The checkpoints due every ``train.checkpoint_every`` steps: `last.pt`, then `step_XXXXXXX.pt` (none with
        ``train.keep_checkpoints=0``), then rank 0 deletes the step files beyond the newest ``keep_checkpoints``
        (`prune_checkpoints`: only after both writes succeeded, never the one just written)."""
        keep = self.cfg.train.keep_checkpoints
        self.save("last.pt")
        if keep:
            self.save(f"step_{self.step:07d}.pt")
        if self.dist.is_main:
            for path in prune_checkpoints(self.ckpt_dir, keep, self.step):
                log.debug("deleted %s (train.keep_checkpoints=%d)", path, keep)

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
        self.bad_steps = int(ckpt.get("bad_steps", 0))  # a resumed run starts a new streak (train.max_bad_steps)
        if self.adaptive_length:
            self.total_steps = ckpt.get("total_steps", self.total_steps)
        if self.dist.world_size == 1:
            set_rng_state(ckpt["rng"])
        else:  # rank 0's states were saved; every rank reseeds from its rank and the step
            seed_everything(self.cfg.train.seed + 7919 * self.step + self.dist.rank)
        log.info("resumed from %s at step %d", path, self.step)

    # -------------------------------------------------------------------------------------- training

    def _sampler(self, epoch: int, start_batch: int) -> Sampler[int]:
        """This rank's samples of `epoch` from its global batch `start_batch` on: scenes streamed in time order
        for a temporal model (`SequenceSampler`), the class-balanced expansion with train.cbgs (`CBGSSampler`),
        else a permutation of the split (`EpochSampler`)."""
        t = self.cfg.train
        common = dict(micro_batch=self.micro_batch, world_size=self.dist.world_size, rank=self.dist.rank, seed=t.seed,
                      epoch=epoch)
        if self.state is not None:
            index = self.train_set.index
            return SequenceSampler(index.scene_tokens, index.timestamps, **common,
                                   start_batch=start_batch * t.accumulate_steps)
        if self.sample_classes is not None:
            return CBGSSampler(self.sample_classes, num_classes=len(self.train_set.config.classes), **common,
                               accumulate=t.accumulate_steps, start_batch=start_batch)
        return EpochSampler(len(self.train_set), **common, accumulate=t.accumulate_steps, start_batch=start_batch)

    def _loader(self, epoch: int, start_batch: int) -> DataLoader:
        """The loader of `epoch` from global batch `start_batch` on. The dataset is set to `epoch` first: the
        loader's workers are not persistent, so they start with this epoch (augmentation seeds, GT-sampling stop)."""
        t = self.cfg.train
        self.train_set.set_epoch(epoch)
        if t.gt_sampling and epoch == t.gt_sampling_stop_epoch:
            log.info("GT sampling stops from epoch %d (train.gt_sampling_stop_epoch)", epoch)
        return make_loader(self.train_set, self._sampler(epoch, start_batch), self.micro_batch, t.num_workers)

    def train_step(self, micro_batches: list[Batch]) -> dict[str, float] | None:
        """One optimizer step over `accumulate_steps` micro-batches; returns the mean loss terms, their sum
        (``total``) and the gradient norm before clipping (``grad_norm``), or None when the step was skipped.

        A bad step: a non-finite loss term (or sum) of any micro-batch on any rank, or, unless fp16 loss scaling
        is on, a non-finite gradient norm. The ranks agree through one all-reduce (`any_rank`, every step), so
        every rank skips it: gradients zeroed; optimizer, GradScaler step, lr schedule and EMA untouched;
        BatchNorm running statistics restored; temporal history dropped. `step` still advances (it is the data
        position: an exact resume continues after the skipped batch, and the time budget counts it), but the lr
        schedule counts only the updates taken. With fp16 the GradScaler skips overflowing steps on its own
        (finite loss, inf gradients: not a bad step, not counted); a non-finite loss is a bad step, and the
        scaler's update after it lowers its scale as after an overflow. Each bad step is logged by rank 0 (the
        step, the ranks, their non-finite terms and samples) and written as the TensorBoard scalar
        ``train/bad_steps`` (the count so far); ``train.max_bad_steps`` in a row write `last.pt` and raise
        `TrainingError` on every rank.
        """
        n = len(micro_batches)
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        norm_state = [b.detach().clone() for b in self._norm_buffers]
        totals: dict[str, float] = {}
        bad: dict[str, float] = {}  # this rank's non-finite terms (the first value seen of each)
        bad_samples: list[str] = []
        for i, batch in enumerate(micro_batches):
            batch = batch.to(self.device, non_blocking=True)
            losses = self._backward(batch, n, sync=i == n - 1)
            values = {k: float(v.detach()) for k, v in losses.items()}
            values_bad = {k: v for k, v in {**values, "total": sum(values.values())}.items() if not math.isfinite(v)}
            if values_bad:
                bad = {**values_bad, **bad}
                bad_samples += [m.get("sample_token", "?") for m in batch.meta]
            for k, v in values.items():
                totals[k] = totals.get(k, 0.0) + v / n
            record_skipped(self.skipped, batch.meta, self.step)
        grad_norm, reports = self._optimizer_step(bad, bad_samples, norm_state)
        self.step += 1
        if grad_norm is None:
            self._count_bad_step(reports)
            return None
        self.bad_streak = 0
        totals["total"] = sum(totals.values())
        totals["grad_norm"] = float(grad_norm)
        return totals

    def _backward(self, batch: Batch, n: int, *, sync: bool) -> dict[str, torch.Tensor]:
        """Forward and backward of one of `n` micro-batches (the loss divided by `n`); DDP synchronises the
        gradients only when `sync` (the last micro-batch). A non-finite loss is back-propagated all the same
        (DDP's gradient all-reduce needs every rank's backward); `train_step` then skips the step."""
        ctx = self.loss_module.no_sync() if (self.dist.enabled and not sync) else contextlib.nullcontext()
        with ctx:
            with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp):
                losses = self.loss_module(batch, self.state)
                total = sum(losses.values())
            self.scaler.scale(total / n).backward()
        return losses

    def _optimizer_step(self, bad: dict[str, float], bad_samples: list[str],
                        norm_state: list[torch.Tensor]) -> tuple[torch.Tensor | None, list[dict]]:
        """Clip, step the optimizer, scaler, lr schedule and EMA; returns (the gradient norm before clipping, []).
        When `bad` (this rank's non-finite loss terms) is not empty or the gradient norm is not finite on any
        rank, skips the step on every rank instead (`_skip_step`) and returns (None, every rank's report)."""
        self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.train.grad_clip)
        # With fp16 loss scaling, inf gradients are an overflow the GradScaler skips (and counts) on its own.
        if not self.scaler.is_enabled() and not torch.isfinite(grad_norm):
            bad = {**bad, "grad_norm": float(grad_norm)}
        if any_rank(bool(bad), self.dist, self.device):
            return None, self._skip_step(bad, bad_samples, norm_state)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        if self.ema:
            self.ema.update(self.model)
        return grad_norm, []

    def _skip_step(self, bad: dict[str, float], bad_samples: list[str], norm_state: list[torch.Tensor]) -> list[dict]:
        """Undo what a bad step did (see `train_step`); returns every rank's ``{"terms": {name: value},
        "samples": [token]}`` (its non-finite values, empty on a rank without any). Called on every rank together."""
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler.is_enabled():
            self.scaler.update()  # closes this step's unscale_ (the found inf/NaN lowers the scale)
        with torch.no_grad():
            for buf, saved in zip(self._norm_buffers, norm_state):
                buf.copy_(saved)
        if self.state is not None:
            self.state.reset()
        return gather_objects({"terms": bad, "samples": bad_samples}, self.dist)

    def _count_bad_step(self, reports: list[dict]) -> None:
        """Count, log (rank 0) and write as ``train/bad_steps`` the step just skipped (`step`, already advanced);
        at ``train.max_bad_steps`` in a row, write `last.pt` and raise `TrainingError` (every rank together)."""
        self.bad_steps += 1
        self.bad_streak += 1
        limit = self.cfg.train.max_bad_steps
        if self.dist.is_main:
            log.warning("%s", format_bad_step(self.step, reports, self.bad_streak, self.bad_steps, limit))
        if self.writer is not None:
            log_scalars(self.writer, "train", {"bad_steps": self.bad_steps}, self.step)
        if self.bad_streak >= limit:
            last = self.save("last.pt")
            raise TrainingError(f"training stopped at step {self.step}: {self.bad_streak} bad steps in a row "
                                f"(train.max_bad_steps={limit}; non-finite loss or gradients, the last: "
                                f"{bad_ranks(reports)}). {last} holds the weights from before them; --resume "
                                "continues after them (e.g. with a lower train.lr or train.grad_clip)")

    def fit(self) -> TrainResult:
        t = self.cfg.train
        start_time = time.time()
        config_steps = t.max_steps if t.epochs is None else t.epochs * self.batches_per_epoch
        budget = TimeBudget(self.spec.time_budget_s, adaptive=self.adaptive_length, max_steps=config_steps,
                            dist_info=self.dist, device=self.device, start=start_time)
        stopped_early = False
        bar = None
        if self.dist.is_main and self.spec.progress:
            bar = progress_bar(total=self.total_steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True)
        log.info("training %d steps (%d per epoch, global batch %d on %d process(es), device %s) into %s",
                 self.total_steps, self.batches_per_epoch, self.global_batch, self.dist.world_size, self.device, self.work_dir)
        running = RunningMean()
        while self.step < self.total_steps and not stopped_early:
            epoch, start_batch = divmod(self.step, self.batches_per_epoch)
            for micro in accumulation_groups(self._loader(epoch, start_batch), t.accumulate_steps):
                losses = self.train_step(micro)  # None: skipped on every rank (a bad step)
                over_budget = self._after_step(losses, budget, bar, running, start_time)
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
        if self.val_interval:
            self.validate()
        if self.writer is not None:
            self.writer.flush()
        self._report_skipped()
        return TrainResult(self.step, last, best if best.is_file() else None, self.history, stopped_early)

    def _after_step(self, losses: dict[str, float] | None, budget: TimeBudget, bar: tqdm | None, running: RunningMean,
                    start_time: float) -> bool:
        """What follows an optimizer step: scalars, the time budget (which may change `total_steps`), the progress
        bar, a log line every ``train.log_every`` steps, validation and checkpoints when due. A skipped step
        (`losses` None) adds no loss scalars. Returns whether the time budget is spent."""
        t = self.cfg.train
        lr = self.optimizer.param_groups[-1]["lr"]
        if losses is not None:
            running.add(losses)
            if self.writer is not None:
                log_scalars(self.writer, "train", {**losses, "lr": lr}, self.step)
        over_budget, self.total_steps = budget.after_step(self.step, self.total_steps)
        if bar is not None:
            bar.total = self.total_steps
            bar.update(1)
            if losses is not None:
                bar.set_postfix(loss=f"{losses['total']:.3f}", hm=f"{losses.get('heatmap', 0):.3f}")
        if (self.step % t.log_every == 0 or self.step == self.total_steps) and running.n:
            mean = running.pop()
            self.history.append({"step": self.step, "time_s": time.time() - start_time, **mean})
            if self.dist.is_main:
                log.info("step %d/%d  %s  lr %.2e", self.step, self.total_steps, format_losses(mean), lr)
        if self.val_interval and self.step % self.val_interval == 0 and self.step < self.total_steps and not over_budget:
            self.validate()
        if self.step % t.checkpoint_every == 0:
            self.save_periodic()
        return over_budget

    def _report_skipped(self) -> None:
        """Log and write (W/skipped_samples.json) every bad sample skipped by any rank."""
        skipped = gather_skipped(self.skipped, self.dist)
        if self.dist.is_main:
            write_skipped_report(skipped, self.work_dir / "skipped_samples.json")

    # ------------------------------------------------------------------------------------ validation

    def eval_model(self) -> nn.Module:
        """The weights to evaluate: the EMA when enabled."""
        return self.model if self.ema is None else ema_model(self.model, self.ema)

    def validate(self) -> dict | None:
        if self.val_set is None:
            self.val_set = build_dataset(self.cfg, self.spec.data, self.spec.version, self.val_split, train=False,
                                         map_grid=self.model.map_grid, info=self.spec.val_info, dist_info=self.dist)
        error: Exception | None = None
        try:
            metrics = evaluate_model(self.eval_model(), self.val_set, self.spec.data, self.spec.version,
                                     self.val_split, self.work_dir / "val" / f"step_{self.step:07d}", device=self.device,
                                     dist_info=self.dist, batch_size=self.cfg.train.batch_size,
                                     workers=self.cfg.train.num_workers, progress=self.spec.progress,
                                     info=self.spec.val_info)
        except Exception as exc:
            if not self.dist.enabled:
                raise
            error, metrics = exc, None
        # Rank 0 ran the devkit evaluation alone (train.dist_timeout_min bounds the wait). If it failed there,
        # every rank stops now with an error instead of waiting out the timeout for a rank that is gone.
        if any_rank(error is not None, self.dist, self.device):
            if error is not None:
                raise error
            raise RuntimeError(f"validation at step {self.step} failed on another rank (rank 0 logs the error)")
        if metrics is None:  # non-zero ranks
            return None
        if self.writer is not None:
            log_scalars(self.writer, "val", {k: metrics[k] for k in VAL_SCALARS if metrics.get(k) is not None}, self.step)
        self.history.append({"step": self.step, "val_nds": metrics["nds"], "val_map": metrics["map"], "val_seg_miou": metrics["seg_miou"]})
        log_validation(metrics, self.step)
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


def train(cfg: ExperimentConfig, spec: RunSpec) -> TrainResult:
    trainer = Trainer(cfg, spec)
    try:
        return trainer.fit()
    finally:
        trainer.close()


# --------------------------------------------------------------------------------------- set-up helpers


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def run_splits(spec: RunSpec) -> tuple[str, str]:
    """The (train, val) split names of a run: ``info-<file stem>`` for an mmdet3d info file, else the requested
    split, else the version's default (`default_splits`)."""
    train_split, val_split = default_splits(spec.version)
    return (f"info-{Path(spec.train_info).stem}" if spec.train_info else spec.train_split or train_split,
            f"info-{Path(spec.val_info).stem}" if spec.val_info else spec.val_split or val_split)


def check_validation_tables(spec: RunSpec) -> None:
    """Raise DataError unless validation of a run on mmdet3d info files can be scored: the dataroot has the
    devkit tables and holds every sample of the validation info file."""
    require_tables(spec.data, spec.version, "validation scores against the devkit tables (train.val_every=0 "
                   "trains without validation)")
    if spec.val_info:
        check_tokens_in_tables(spec.data, spec.version, info_sample_tokens(spec.val_info), spec.val_info)


def schedule_length(spec: RunSpec, t: TrainConfig, batches_per_epoch: int) -> int:
    """Optimizer steps of the run: ``--max-steps``, else ``--epochs`` epochs, else ``train.epochs`` epochs, else
    ``train.max_steps``."""
    if spec.max_steps is not None:
        return spec.max_steps
    epochs = spec.epochs if spec.epochs is not None else t.epochs
    if epochs is not None:
        return epochs * batches_per_epoch
    return t.max_steps


def scaled_lr(t: TrainConfig, global_batch: int) -> float:
    """The base learning rate at `global_batch` samples per step: ``lr * global_batch / lr_batch`` (linear scaling
    rule; Goyal et al. 2017, as mmdet's ``auto_scale_lr``), or ``lr`` when ``train.lr_batch`` is null."""
    return t.lr if t.lr_batch is None else t.lr * global_batch / t.lr_batch


def scaled_warmup(t: TrainConfig, global_batch: int) -> int:
    """Warm-up steps at `global_batch`: ``warmup_steps`` is counted at ``train.lr_batch`` (the same number of
    samples at any global batch), or taken as given when ``lr_batch`` is null."""
    return t.warmup_steps if t.lr_batch is None else int(round(t.warmup_steps * t.lr_batch / global_batch))


def make_optimizer(model: nn.Module, t: TrainConfig, global_batch: int = 1) -> torch.optim.AdamW:
    """AdamW over `model` with layer-wise lr decay over the camera ViT (`layer_decay_param_groups`), at the base
    rate `scaled_lr` for `global_batch`."""
    lr = scaled_lr(t, global_batch)
    groups = layer_decay_param_groups(model, lr=lr, weight_decay=t.weight_decay, layer_decay=t.layer_decay)
    return torch.optim.AdamW(groups, lr=lr, weight_decay=t.weight_decay, betas=(0.9, 0.999))


class _LossWrapper(nn.Module):
    """Lets DDP wrap `model.loss` (DDP synchronises gradients of what runs through its forward)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: Batch, state: TemporalState | None = None) -> dict[str, torch.Tensor]:
        return self.model.loss(batch, state)


def wrap_loss(model: nn.Module, dist_info: DistInfo, device: torch.device, *,
              find_unused_parameters: bool = True) -> nn.Module:
    """A module whose forward is ``model.loss(batch)`` (a dict of scalar losses), DDP-wrapped under torchrun
    (constructing it broadcasts rank 0's weights).

    find_unused_parameters: DDP's flag (an extra graph traversal every step); the trainer passes
    `BEVFusionModel.may_leave_parameters_unused`, False unless a trainable parameter can get no gradient (DDP
    then raises at the next step if one did, naming it)."""
    wrapper = _LossWrapper(model)
    if dist_info.enabled:
        if dist_info.is_main:
            log.info("DDP: find_unused_parameters=%s (%s)", find_unused_parameters,
                     "the config can leave trainable parameters without a gradient" if find_unused_parameters
                     else "every trainable parameter gets a gradient every step")
        wrapper = nn.parallel.DistributedDataParallel(
            wrapper, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=find_unused_parameters)
    return wrapper


# The parts of `BEVFusionModel` that work on the BEV grid (or on LiDAR/radar points): ``train.sync_bn`` converts
# their BatchNorm. The camera backbone and view transform see B x cameras images per rank, and stay per rank.
SYNC_BN_PARTS = ("lidar_encoder", "radar_encoder", "fuser", "temporal", "bev_decoder", "heads")


def sync_batchnorm(model: nn.Module, enabled: bool, dist_info: DistInfo, device: torch.device) -> int:
    """``train.sync_bn``: under DDP with more than one rank, replace the BatchNorm layers of the BEV parts of
    `model` (`SYNC_BN_PARTS`) by `nn.SyncBatchNorm` in place (same parameters and buffers, so the optimizer,
    EMA and checkpoints are unaffected), before DDP wraps the model. Returns the number converted (0 when
    disabled or in one process, where it changes nothing).

    Raises ConfigError naming ``train.sync_bn`` when the device is not CUDA (torch's SyncBatchNorm runs only on
    GPU: on CPU / gloo its forward raises)."""
    if not enabled or not dist_info.enabled:
        if enabled and dist_info.is_main:
            log.info("train.sync_bn: one process, BatchNorm left as it is")
        return 0
    if device.type != "cuda":
        raise ConfigError(f"train.sync_bn: SyncBatchNorm needs CUDA devices (NCCL); this run is on {device.type} "
                          "(set train.sync_bn=false)")
    count = convert_sync_batchnorm(model)
    if dist_info.is_main:
        log.info("train.sync_bn: %d BatchNorm layers of the BEV modules synchronised across %d ranks", count,
                 dist_info.world_size)
    return count


def convert_sync_batchnorm(model: nn.Module) -> int:
    """Replace every BatchNorm of the `SYNC_BN_PARTS` children of `model` by `nn.SyncBatchNorm` (torch's
    ``convert_sync_batchnorm``), in place; returns how many."""
    count = 0
    for name in SYNC_BN_PARTS:
        part = getattr(model, name, None)
        if part is None:
            continue
        count += sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in part.modules())
        setattr(model, name, nn.SyncBatchNorm.convert_sync_batchnorm(part))
    return count


def fetch_pretrained_once(pretrained: str | Path | None, dist_info: DistInfo, device: torch.device) -> None:
    """Fetch ``model.camera.pretrained`` into the weights cache once per job: rank 0 downloads it
    (`prefetch_pretrained`: a registered name or ``timm:<name>``; nothing for a local path or None) while the
    other ranks wait (`any_rank`, a barrier), then every rank resolves it from the cache when it builds the
    model. A failure on rank 0 stops every rank (rank 0 raises its error)."""
    error: Exception | None = None
    if dist_info.is_main:
        try:
            prefetch_pretrained(pretrained)
        except PerceptionError as exc:
            error = exc
    if any_rank(error is not None, dist_info, device) and error is None:
        raise ConfigError(f"model.camera.pretrained: {pretrained}: fetching it failed on rank 0 (rank 0 logs the error)")
    if error is not None:
        raise error


# ------------------------------------------------------------------------------------ loop helpers


def accumulation_groups(loader: Iterable[Batch], accumulate: int) -> Iterator[list[Batch]]:
    """The micro-batches of `loader` in lists of `accumulate` (one optimizer step each); an incomplete last
    list is dropped."""
    micro: list[Batch] = []
    for batch in loader:
        micro.append(batch)
        if len(micro) == accumulate:
            yield micro
            micro = []


def ema_model(model: nn.Module, ema: EMA) -> nn.Module:
    """A copy of `model` holding the EMA's weights (`model` itself is unchanged)."""
    m = deepcopy(model)
    m.load_state_dict(ema.shadow)
    return m
