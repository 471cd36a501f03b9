"""Processes and devices: the torchrun process group (`DistInfo`, `init_distributed`), a flag any rank may raise
(`any_rank`), every rank's report gathered (`gather_objects`), rank 0's time-budget decisions shared with every
rank (`TimeBudget`), and the default device (`pick_device`)."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device: torch.device, timeout_min: float = 60.0) -> DistInfo:
    """Join the process group when started by torchrun (RANK/WORLD_SIZE set); a no-op otherwise.

    `timeout_min` bounds how long a collective waits for the other ranks (``train.dist_timeout_min``): it must
    outlast the longest stretch one rank works alone, rank 0's devkit evaluation of the validation split.
    """
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return DistInfo()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", timeout=timedelta(minutes=timeout_min))
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def any_rank(flag: bool, dist_info: DistInfo, device: torch.device) -> bool:
    """Whether `flag` is True on any rank, on every rank (one all-reduce of one int on `device`, CUDA for NCCL;
    just `flag` without a process group). Also a barrier: it returns once every rank has called it."""
    if not dist_info.enabled:
        return flag
    t = torch.tensor([int(flag)], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def gather_objects(obj: object, dist_info: DistInfo) -> list:
    """Every rank's `obj` (picklable), in rank order, on every rank; ``[obj]`` without a process group. A
    collective: every rank must call it."""
    if not dist_info.enabled:
        return [obj]
    parts: list = [None] * dist_info.world_size
    dist.all_gather_object(parts, obj)
    return parts


class TimeBudget:
    """The time-budget decisions of a run, made on rank 0 and shared with every rank, so that all ranks stop
    at the same step and run a schedule of the same length (per-rank clocks would let one rank leave the loop,
    or enter a collective validation, alone: a hang).

    `after_step` costs one broadcast of two int64 per step, and nothing without a budget.

    Args:
        budget_s: training time allowed, seconds (None: no budget, `after_step` changes nothing).
        adaptive: set the schedule's length from the measured step rate (only a time budget was given).
        max_steps: the longest schedule `adaptive` may choose (``train.max_steps``, or ``train.epochs`` epochs).
        dist_info: this process's rank; device: where the broadcast tensor lives (CUDA for NCCL).
        start: the run's start, `time.time()` seconds (rank 0's clock is the one that counts).
    """

    def __init__(self, budget_s: float | None, *, adaptive: bool, max_steps: int, dist_info: DistInfo,
                 device: torch.device, start: float):
        self.budget_s, self.adaptive, self.max_steps = budget_s, adaptive, max_steps
        self.dist, self.device, self.start = dist_info, device, start
        self._rate_mark: tuple[int, float] | None = None

    def after_step(self, step: int, total_steps: int) -> tuple[bool, int]:
        """(stop now, schedule length) after optimizer step `step`, equal on every rank."""
        if self.budget_s is None:
            return False, total_steps
        stop, total = False, total_steps
        if self.dist.is_main:
            now = time.time()
            if self.adaptive:
                total = self._estimate_length(step, total, now)
            stop = now - self.start > self.budget_s
        if self.dist.enabled:
            shared = torch.tensor([int(stop), total], dtype=torch.int64, device=self.device)
            dist.broadcast(shared, src=0)
            stop, total = bool(shared[0]), int(shared[1])
        return stop, total

    def _estimate_length(self, step: int, total: int, now: float) -> int:
        """The schedule's length from the step rate (after 10 steps, then every 25), leaving 3% of the budget
        as margin; never more than `max_steps`."""
        if step == 3:
            self._rate_mark = (step, now)  # skip the first steps (worker start, allocator warm-up)
        if self._rate_mark is None or step < 10 or (step - 10) % 25:
            return total
        rate = (now - self._rate_mark[1]) / max(1, step - self._rate_mark[0])
        remaining = 0.97 * self.budget_s - (now - self.start)
        return int(min(self.max_steps, step + max(0.0, remaining) / rate))


def pick_device(requested: str | None = None) -> torch.device:
    if requested:
        return torch.device(requested)
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")
