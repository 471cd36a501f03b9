"""CPU (or CUDA) training-step time of a config on preloaded batches: no data loading in the timing.

    python benchmarks/step_time.py --config configs/tiny.yaml --data datasets/synthetic-mini --steps 30

Loads `--batches` training batches of the split once (training augmentation, the config's seed), then times
`--steps` optimiser steps (``model.loss`` -> backward -> AdamW step) cycling over them, after `--warmup`
untimed ones. Prints the median, mean and spread of the step time in ms, and the step count.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from perception.config import load_config
from perception.data.build import build_dataset, default_splits
from perception.data.collate import collate_samples
from perception.model.build import build_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/tiny.yaml")
    ap.add_argument("--data", default="datasets/synthetic-mini")
    ap.add_argument("--version", default="v1.0-mini")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batches", type=int, default=6)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. train.batch_size=1")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(args.config, args.overrides)
    torch.manual_seed(cfg.train.seed)
    train_split, _ = default_splits(args.version)
    ds = build_dataset(cfg, args.data, args.version, train_split, train=True)
    bs = cfg.train.batch_size
    batches = [collate_samples([ds[(i * bs + j) % len(ds)] for j in range(bs)]) for i in range(args.batches)]
    model = build_model(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    times = []
    for step in range(args.warmup + args.steps):
        batch = batches[step % len(batches)]
        t0 = time.perf_counter()
        loss = sum(model.loss(batch).values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step >= args.warmup:
            times.append((time.perf_counter() - t0) * 1e3)
    out = {"config": args.config, "steps": len(times), "batch_size": bs, "threads": torch.get_num_threads(),
           "median_ms": round(statistics.median(times), 1), "mean_ms": round(statistics.fmean(times), 1),
           "min_ms": round(min(times), 1), "max_ms": round(max(times), 1)}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
