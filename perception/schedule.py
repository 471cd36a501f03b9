"""The optimisation schedule around the trainer's step: the learning-rate curve (`lr_lambda`), the exponential
moving average of the weights (`EMA`) and the autocast precision of ``train.amp`` (`autocast_dtype`)."""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn


def lr_lambda(warmup: int, total: int, min_ratio: float = 0.01) -> Callable[[int], float]:
    """The learning-rate factor (of the base lr) at each optimizer step: linear warm-up from 1/warmup to 1 over
    `warmup` steps, then cosine down to `min_ratio` at step `total` (and `min_ratio` after it)."""

    def f(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


class EMA:
    """Exponential moving average of a model's parameters and buffers (decay d per step, with warm-up).

    Floating-point tensors of the state dict are averaged; integer ones (BatchNorm's step count) are copied.
    """

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.updates = 0
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Fold `model`'s current state in, with decay ``min(decay, (1 + n) / (10 + n))`` at the n-th update."""
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
