"""What a training run reports besides checkpoints: the run folder with its resolved config (``W/config.yaml``)
and TensorBoard scalars (``W/tb``), the periodic loss log line (`RunningMean`, `format_losses`), the validation
log line, the bad (skipped) optimizer steps (`format_bad_step`), and the bad samples skipped on any rank
(``W/skipped_samples.json``).

Plain functions of what they report, so that `perception.training.Trainer` only decides when to call them.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import torch.distributed as dist
import yaml
from torch.utils.tensorboard import SummaryWriter

from perception.config import ExperimentConfig
from perception.distributed import DistInfo

log = logging.getLogger(__name__)

# Validation metrics written as TensorBoard scalars (val/<key>), when the evaluation has them.
VAL_SCALARS = ("nds", "map", "mate", "mase", "maoe", "mave", "maae", "seg_miou", "scene_map")


def config_yaml(cfg: ExperimentConfig) -> str:
    """The resolved experiment config as YAML (what `perception.config.load_config` reads back)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def open_work_dir(work_dir: Path, cfg: ExperimentConfig) -> SummaryWriter:
    """Create the run's folder, write the resolved config to ``W/config.yaml`` and open the TensorBoard writer of
    ``W/tb`` (rank 0 only)."""
    work_dir.mkdir(parents=True, exist_ok=True)
    (work_dir / "config.yaml").write_text(config_yaml(cfg))
    return SummaryWriter(str(work_dir / "tb"))


class RunningMean:
    """Means of the loss terms over the steps added since the last `pop` (the periodic log line)."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.n = 0

    def add(self, values: Mapping[str, float]) -> None:
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.n += 1

    def pop(self) -> dict[str, float]:
        mean = {k: v / self.n for k, v in self.sums.items()}
        self.sums, self.n = {}, 0
        return mean


def format_losses(mean: Mapping[str, float]) -> str:
    """``"heatmap 0.1234  regression 0.5678 ..."`` of the loss terms (the gradient norm left out)."""
    return "  ".join(f"{k} {v:.4f}" for k, v in mean.items() if k != "grad_norm")


def log_scalars(writer: SummaryWriter, prefix: str, values: Mapping[str, float], step: int) -> None:
    """TensorBoard scalars ``<prefix>/<key>`` at optimizer step `step`."""
    for k, v in values.items():
        writer.add_scalar(f"{prefix}/{k}", v, step)


def bad_ranks(reports: Sequence[Mapping]) -> str:
    """``"rank 1: heatmap=nan, total=nan (samples tok_a, tok_b)"`` for each rank whose report (index = rank)
    names non-finite values: ``{"terms": {name: value}, "samples": [sample token]}``, as
    `perception.training.Trainer` gathers them after a bad step. Under DDP a rank whose own loss was finite may
    name only ``grad_norm``: the all-reduce spread another rank's NaN gradients to it."""
    parts = []
    for rank, report in enumerate(reports):
        if report["terms"]:
            terms = ", ".join(f"{k}={v:.4g}" for k, v in report["terms"].items())
            samples = f" (samples {', '.join(report['samples'])})" if report["samples"] else ""
            parts.append(f"rank {rank}: {terms}{samples}")
    return "; ".join(parts) or "no rank named a value"


def format_bad_step(step: int, reports: Sequence[Mapping], streak: int, total: int, limit: int) -> str:
    """The warning of a skipped optimizer step `step` (1-based, as the other log lines): which ranks had
    which non-finite values (`bad_ranks`), and how many bad steps there were in a row (`streak`, of at most
    `limit`: train.max_bad_steps) and in all (`total`)."""
    return (f"step {step}: non-finite loss or gradients, optimizer step skipped on every rank ({bad_ranks(reports)}); "
            f"{streak} bad step(s) in a row (train.max_bad_steps={limit}), {total} in all")


def log_validation(metrics: dict, step: int) -> None:
    """One log line with a validation's NDS, mAP and map-segmentation mIoU (n/a without map ground truth)."""
    seg = "n/a" if metrics["seg_miou"] is None else f"{metrics['seg_miou']:.4f}"
    log.info("validation at step %d: NDS %.4f mAP %.4f seg mIoU %s", step, metrics["nds"], metrics["map"], seg)


def record_skipped(skipped: dict[str, str], metas: Iterable[dict], step: int) -> None:
    """Add the bad samples a batch skipped (``meta["skipped_reasons"]``: token -> reason, data.skip_bad_samples)
    to `skipped`, logging each the first time it is seen."""
    for meta in metas:
        for token, reason in meta.get("skipped_reasons", {}).items():
            if token not in skipped:
                skipped[token] = reason
                log.warning("step %d: skipped bad sample %s: %s", step, token, reason)


def gather_skipped(skipped: dict[str, str], dist_info: DistInfo) -> dict[str, str]:
    """Every rank's skipped samples (token -> reason), merged; a collective under torchrun."""
    merged = dict(skipped)
    if dist_info.enabled:
        parts = [None] * dist_info.world_size
        dist.all_gather_object(parts, merged)
        for p in parts:
            merged.update(p)
    return merged


def write_skipped_report(skipped: dict[str, str], path: Path) -> None:
    """Write the skipped samples (token -> reason) as JSON to `path`, and a warning naming them if any."""
    path.write_text(json.dumps(skipped, indent=1))
    if skipped:
        log.warning("skipped %d bad sample(s) during training (listed in %s): %s", len(skipped), path,
                    ", ".join(sorted(skipped)))
