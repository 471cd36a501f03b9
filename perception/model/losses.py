"""Loss functions. Each returns a scalar float32 tensor (float64 for float64 inputs) that stays attached to the graph even when there is
nothing to supervise (empty scene, no LiDAR depth), so `backward` always works.

Every loss runs in float32 whatever the autocast dtype (`_in_float32`): its float16 / bfloat16 inputs are
upcast and autocast is off inside. In bfloat16 and float16 ``1 - 1e-4`` rounds to exactly 1.0, and so does the sigmoid of
a logit from ~6.3 (bfloat16) or ~8.4 (float16) up: a clamped sigmoid of a confident logit gave ``log(0)``.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor

_Loss = TypeVar("_Loss", bound=Callable[..., Tensor])


def _in_float32(loss_fn: _Loss) -> _Loss:
    """Decorator: call `loss_fn` with its float16 / bfloat16 tensor arguments upcast to float32 and autocast
    disabled."""

    def upcast(value: Any) -> Any:
        return value.float() if isinstance(value, Tensor) and value.dtype in (torch.float16, torch.bfloat16) else value

    @functools.wraps(loss_fn)
    def wrapper(*args: Any, **kwargs: Any) -> Tensor:
        args = tuple(upcast(a) for a in args)
        kwargs = {k: upcast(v) for k, v in kwargs.items()}
        device = next((a.device.type for a in (*args, *kwargs.values()) if isinstance(a, Tensor)), "cpu")
        with torch.autocast(device_type=device, enabled=False):
            return loss_fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


@_in_float32
def gaussian_focal_loss(logits: Tensor, target: Tensor, alpha: float = 2.0, gamma: float = 4.0) -> Tensor:
    """CenterNet focal loss on a Gaussian heatmap.

    logits: (B, C, H, W) raw; target: (B, C, H, W) in [0, 1] with 1 at object centres.
    Normalised by the number of centres (at least 1).
    """
    pred = logits.sigmoid().clamp(1e-4, 1 - 1e-4)
    pos = target.eq(1).to(pred.dtype)
    neg_weight = (1 - target).pow(gamma)
    pos_loss = -(pred.log() * (1 - pred).pow(alpha) * pos).sum()
    neg_loss = -((1 - pred).log() * pred.pow(alpha) * neg_weight * (1 - pos)).sum()
    return (pos_loss + neg_loss) / pos.sum().clamp(min=1.0)


@_in_float32
def weighted_l1(pred: Tensor, target: Tensor, weights: Tensor) -> Tensor:
    """pred, target: (K, D); weights: (D,). Sum of weighted |pred - target| over D, mean over K (0 when K = 0)."""
    return ((pred - target).abs() * weights).sum() / max(pred.shape[0], 1)


@_in_float32
def masked_cross_entropy(logits: Tensor, target: Tensor, ignore_index: int = -1) -> Tensor:
    """logits: (K, A); target: (K,) int64 with `ignore_index` ignored. Mean over the kept rows (0 if none)."""
    valid = target != ignore_index
    loss = F.cross_entropy(logits, target.clamp(min=0), reduction="none")
    return (loss * valid.to(loss.dtype)).sum() / valid.sum().clamp(min=1).to(loss.dtype)


@_in_float32
def sigmoid_focal_loss(logits: Tensor, target: Tensor, alpha: Optional[float] = 0.25, gamma: float = 2.0) -> Tensor:
    """Multi-label focal loss (RetinaNet), mean over all elements. logits, target: same shape, target in {0, 1}.

    alpha weighs positive cells by ``alpha`` and negative ones by ``1 - alpha`` (RetinaNet's 0.25 favours the
    negatives); None leaves both at 1, as BEVFusion's map head does.
    """
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_t = prob * target + (1 - prob) * (1 - target)
    loss = ce * (1 - p_t).pow(gamma)
    if alpha is not None:
        loss = (alpha * target + (1 - alpha) * (1 - target)) * loss
    return loss.mean()


@_in_float32
def dice_loss(logits: Tensor, target: Tensor, eps: float = 1.0, empty_maps: bool = True) -> Tensor:
    """Soft Dice loss per (sample, class) map, averaged. logits, target: (B, C, H, W).

    empty_maps=False averages over the maps whose target has a positive cell only (0 when none has): a map without
    target cells scores ``1 - eps / (sum p + eps)``, low only when its probabilities sum to well under ``eps`` over
    the whole map, which pushes a class absent from most samples to zero everywhere.
    """
    prob = logits.sigmoid().flatten(2)
    target = target.flatten(2)
    inter = (prob * target).sum(-1)
    dice = 1 - (2 * inter + eps) / (prob.sum(-1) + target.sum(-1) + eps)
    if empty_maps:
        return dice.mean()
    present = (target.sum(-1) > 0).to(dice.dtype)
    return (dice * present).sum() / present.sum().clamp(min=1)


@_in_float32
def depth_loss(depth_probs: Tensor, depth_bins: Tensor) -> Tensor:
    """BEVDepth depth loss: binary cross-entropy against one-hot bins at cells with a LiDAR depth.

    depth_probs: (B, N, D, h, w) softmax over D; depth_bins: (B, N, h, w) int64, -1 where unsupervised.
    Sum over D, mean over supervised cells (0 when there are none).
    """
    num_bins = depth_probs.shape[2]
    probs = depth_probs.permute(0, 1, 3, 4, 2).reshape(-1, num_bins)
    labels = depth_bins.reshape(-1)
    valid = labels >= 0
    onehot = F.one_hot(labels.clamp(min=0), num_bins).to(probs.dtype)
    bce = F.binary_cross_entropy(probs.clamp(1e-6, 1 - 1e-6), onehot, reduction="none").sum(-1)
    return (bce * valid.to(bce.dtype)).sum() / valid.sum().clamp(min=1).to(bce.dtype)
