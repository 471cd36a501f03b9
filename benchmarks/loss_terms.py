"""Loss terms and gradient norms of fixed batches, as JSON: run it in two checkouts to compare their training
arithmetic on the same weights and data (a paired check, free of run-to-run noise).

    PYTHONPATH=$PWD python benchmarks/loss_terms.py --data datasets/synthetic-mini > a.json

Builds `--config` with seed 0 and modality dropout off, and for `--batches` batches of 2 consecutive
mini_train samples (evaluation transforms, no augmentation) prints every term of ``model.loss`` and the summed
gradient norms of the camera, LiDAR and all parameters.
"""

from __future__ import annotations

import argparse
import json

import torch

from perception.config import load_config
from perception.data.build import build_dataset
from perception.data.collate import collate_samples
from perception.model.build import build_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/tiny.yaml")
    ap.add_argument("--data", default="datasets/synthetic-mini")
    ap.add_argument("--batches", type=int, default=2)
    args = ap.parse_args()
    cfg = load_config(args.config, ["model.fuser.modality_dropout=0"])
    torch.manual_seed(0)
    ds = build_dataset(cfg, args.data, "v1.0-mini", "mini_train", train=False)
    model = build_model(cfg).train()
    out = {}
    for i in range(args.batches):
        batch = collate_samples([ds[2 * i], ds[2 * i + 1]])
        model.zero_grad()
        losses = model.loss(batch)
        sum(losses.values()).backward()
        norms = {k: float(torch.linalg.norm(p.grad)) for k, p in model.named_parameters() if p.grad is not None}
        out[i] = {"losses": {k: round(float(v.detach()), 6) for k, v in losses.items()},
                  "grad_norm_camera": sum(v for k, v in norms.items() if k.startswith("camera")),
                  "grad_norm_lidar": sum(v for k, v in norms.items() if k.startswith("lidar")),
                  "grad_norm_all": sum(norms.values())}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
