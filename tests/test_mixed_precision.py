"""Mixed precision on CPU: losses in float32 under bfloat16 / float16 autocast (against float64 closed forms),
BEV pooling summed in float32, the model's loss and backward under bfloat16 autocast, and `train.amp`.

CPU autocast runs the same code path as CUDA autocast, with bfloat16 and float16 rounding; the references are
float64 computations written out here, not the code under test in another dtype.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pytest
import torch

from perception.config import load_config
from perception.errors import ConfigError
from fusion.bev_pool import make_pooling_plan, pool_with_plan
from perception.model.build import build_model
from perception.model.losses import (
    depth_loss, dice_loss, gaussian_focal_loss, masked_cross_entropy, sigmoid_focal_loss, weighted_l1,
)
from perception.model.synthetic import camera_rig, make_synthetic_batch
from perception.model.view_transform import LiftSplat
from perception.structures import BEVGrid
from perception.schedule import autocast_dtype
from perception.training import RunSpec, Trainer

ROOT = Path(__file__).resolve().parents[1]
HALF = [torch.bfloat16, torch.float16]
IMAGE = (64, 176)


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _gaussian_focal_reference(logits: list[float], target: list[float]) -> float:
    """CenterNet focal loss (alpha 2, gamma 4, sigmoid clamped to [1e-4, 1 - 1e-4]) in float64, element by element."""
    total, num_pos = 0.0, 0
    for x, t in zip(logits, target):
        p = min(max(_sigmoid(x), 1e-4), 1 - 1e-4)
        if t == 1.0:
            total -= math.log(p) * (1 - p) ** 2
            num_pos += 1
        else:
            total -= math.log(1 - p) * p**2 * (1 - t) ** 4
    return total / max(num_pos, 1)


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_gaussian_focal_loss_with_saturated_logits_under_autocast(dtype):
    # Logits of +-20 (saturated in both half dtypes) on centres, near centres and background; all values are
    # exact in bfloat16 and float16, so the reference sees the same inputs.
    logits = [20.0, -20.0, 20.0, -20.0, 9.0, 7.0, -3.0, 0.5, 20.0, -20.0, 12.0, 0.0]
    target = [1.0, 1.0, 0.5, 0.5, 0.25, 0.0, 0.0, 1.0, 0.0, 0.0, 0.75, 0.125]
    logits_t = torch.tensor(logits).view(1, 2, 2, 3).to(dtype)
    target_t = torch.tensor(target).view(1, 2, 2, 3)
    with torch.autocast("cpu", dtype=dtype):
        loss = gaussian_focal_loss(logits_t, target_t)
    assert loss.dtype == torch.float32
    assert math.isfinite(float(loss))
    assert float(loss) == pytest.approx(_gaussian_focal_reference(logits, target), rel=1e-5)


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_every_loss_runs_in_float32_under_autocast(dtype):
    logits = torch.tensor([[20.0, -20.0, 3.0], [-20.0, 20.0, -0.5]])  # exact in both half dtypes
    target = torch.tensor([[1.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    half = logits.to(dtype)
    with torch.autocast("cpu", dtype=dtype):
        sig_focal = sigmoid_focal_loss(half, target)
        dice = dice_loss(half.view(1, 2, 1, 3), target.view(1, 2, 1, 3))
        ce = masked_cross_entropy(half, torch.tensor([2, -1]))
        l1 = weighted_l1(half, target.to(dtype), torch.tensor([1.0, 0.5, 2.0]))
        # depth probabilities of exactly 0 and 1 in the half dtype: clamped in float32, not rounded back to 0 / 1
        probs = torch.tensor([1.0, 0.0, 0.0]).to(dtype).view(1, 1, 3, 1, 1)
        depth = depth_loss(probs, torch.tensor([[[[1]]]]))
    for loss in (sig_focal, dice, ce, l1, depth):
        assert loss.dtype == torch.float32 and math.isfinite(float(loss))

    # Float64 closed forms.
    ref_focal = 0.0
    for x, t in zip(logits.flatten().tolist(), target.flatten().tolist()):
        p = _sigmoid(x)
        ce_x = -(t * math.log(p) + (1 - t) * math.log1p(-p)) if 0 < p < 1 else max(x, 0) - x * t + math.log1p(math.exp(-abs(x)))
        p_t = p * t + (1 - p) * (1 - t)
        ref_focal += (0.25 * t + 0.75 * (1 - t)) * ce_x * (1 - p_t) ** 2
    assert float(sig_focal) == pytest.approx(ref_focal / 6, rel=1e-5)
    ref_dice = 0.0
    for row_x, row_t in zip(logits.tolist(), target.tolist()):
        probs_row = [_sigmoid(x) for x in row_x]
        inter = sum(p * t for p, t in zip(probs_row, row_t))
        ref_dice += 1 - (2 * inter + 1) / (sum(probs_row) + sum(row_t) + 1)
    assert float(dice) == pytest.approx(ref_dice / 2, rel=1e-5)
    row0 = logits[0].tolist()
    assert float(ce) == pytest.approx(math.log(sum(math.exp(v) for v in row0)) - row0[2], rel=1e-5)
    ref_l1 = sum(abs(x - t) * w for xs, ts in zip(logits.tolist(), target.tolist()) for x, t, w in zip(xs, ts, (1.0, 0.5, 2.0)))
    assert float(l1) == pytest.approx(ref_l1 / 2, rel=1e-5)
    # Probabilities clamped to [1e-6, 1 - 1e-6] (the upper bound as float32 holds it); bin 1 is the label:
    # -log(1e-6) for it, -log(1 - hi) for bin 0 (probability 1), -log(1 - 1e-6) for bin 2.
    hi = float(torch.tensor(1 - 1e-6, dtype=torch.float32))
    assert float(depth) == pytest.approx(-math.log(1e-6) - math.log(1 - hi) - math.log1p(-1e-6), rel=1e-5)



def test_dice_without_empty_maps_averages_over_the_maps_with_target_cells():
    # Two samples x two classes of three cells; map (sample 0, class 1) has no target cell. Float64 closed form
    # over the three maps with target cells.
    logits = torch.tensor([[[1.0, -2.0, 0.5], [3.0, 0.0, -1.0]], [[-0.5, 2.0, 0.0], [0.0, 1.0, -3.0]]])
    target = torch.tensor([[[1.0, 0.0, 1.0], [0.0, 0.0, 0.0]], [[0.0, 1.0, 0.0], [1.0, 1.0, 0.0]]])
    per_map = {}
    for b in range(2):
        for c in range(2):
            probs = [_sigmoid(x) for x in logits[b, c].tolist()]
            t = target[b, c].tolist()
            per_map[b, c] = 1 - (2 * sum(p * q for p, q in zip(probs, t)) + 1) / (sum(probs) + sum(t) + 1)
    got = dice_loss(logits.unsqueeze(2), target.unsqueeze(2), empty_maps=False)
    assert float(got) == pytest.approx((per_map[0, 0] + per_map[1, 0] + per_map[1, 1]) / 3, rel=1e-6)
    assert float(dice_loss(logits.unsqueeze(2), target.unsqueeze(2))) == pytest.approx(sum(per_map.values()) / 4, rel=1e-6)
    # No target cell anywhere: 0, and still differentiable.
    empty_logits = logits.clone().requires_grad_(True)
    none = dice_loss(empty_logits.unsqueeze(2), torch.zeros_like(target).unsqueeze(2), empty_maps=False)
    none.backward()
    assert float(none) == 0.0 and empty_logits.grad is not None


def _focal_reference(logits: list[float], target: list[float], alpha: float | None) -> float:
    """RetinaNet focal loss (gamma 2) in float64, element by element; alpha None weighs every cell 1."""
    total = 0.0
    for x, t in zip(logits, target):
        p = _sigmoid(x)
        if t == 1.0:
            total -= (1.0 if alpha is None else alpha) * math.log(p) * (1 - p) ** 2
        else:
            total -= (1.0 if alpha is None else 1 - alpha) * math.log(1 - p) * p**2
    return total / len(logits)


@pytest.mark.parametrize("alpha", [0.25, None], ids=["alpha0.25", "no_alpha"])
def test_sigmoid_focal_loss_alpha_against_closed_form(alpha):
    logits = [2.5, -1.0, 0.3, -4.0, 0.0, 6.0]
    target = [1.0, 1.0, 0.0, 0.0, 1.0, 0.0]
    got = sigmoid_focal_loss(torch.tensor(logits), torch.tensor(target), alpha=alpha)
    assert float(got) == pytest.approx(_focal_reference(logits, target, alpha), rel=1e-6)


def test_model_map_focal_term_follows_loss_map_focal_alpha():
    """`loss.map_focal_alpha` reaches the model's map term: the term equals the float64 closed form on the
    model's own map logits and targets, for 0.25 and for null."""
    overrides = ["data.image_size=[64, 176]", "model.camera.blocks=1", "model.fuser.modality_dropout=0",
                 "model.fuser.paired_drop=[]", "grid.x_min=-12.8", "grid.x_max=12.8", "grid.y_min=-12.8", "grid.y_max=12.8"]
    for alpha in (0.25, None):
        torch.manual_seed(0)
        cfg = load_config(ROOT / "configs" / "tiny.yaml", overrides + [f"loss.map_focal_alpha={'null' if alpha is None else alpha}"])
        assert cfg.loss.map_focal_alpha == alpha
        model = build_model(cfg).train()
        batch = make_synthetic_batch(batch_size=1, image_size=cfg.data.image_size, grid=cfg.grid.build(), seed=5)
        out = model(*model.prepare(batch).as_args())
        losses = model.loss(batch)
        assert bool(batch.has_map.all()) and float(batch.map_masks.sum()) > 0
        ref = _focal_reference(out["map"].detach().double().flatten().tolist(),
                               batch.map_masks.double().flatten().tolist(), alpha)
        assert float(losses["map_focal"].detach()) == pytest.approx(cfg.loss.map_focal * ref, rel=1e-4)


# --------------------------------------------------------------------------------------------- pooling


def test_bev_pooling_accumulates_in_float32():
    gen = torch.Generator().manual_seed(0)
    # 4000 rows into 2 cells, values exact in bfloat16: the bfloat16 sums (~3000) are off by several units.
    features = (torch.rand(4000, 3, generator=gen) + 1.0).to(torch.bfloat16)
    index = torch.arange(4000) % 2
    plan = make_pooling_plan(index[None], BEVGrid(x_min=0, x_max=2, y_min=0, y_max=1, cell=1.0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        sums = pool_with_plan(features, *plan.as_tuple())  # (1, 3, 1, 2)
    assert sums.dtype == torch.float32
    ref = torch.stack([features[index == r].double().sum(0) for r in range(2)])
    torch.testing.assert_close(sums[0, :, 0].T.double(), ref, rtol=1e-6, atol=0)
    assert (features.double().sum(0) - ref.sum(0)).abs().max() < 1e-6  # sanity: the reference is exact


def test_lift_splat_under_autocast_pools_in_float32():
    grid = BEVGrid(x_min=-12.8, x_max=12.8, y_min=-12.8, y_max=12.8, cell=1.6)
    cam2img, cam2lidar, _ = camera_rig(IMAGE)
    torch.manual_seed(0)
    lift = LiftSplat(grid=grid, in_channels=16, out_channels=8, image_size=IMAGE, feature_stride=16,
                     depth_min=1.0, depth_step=0.5, num_bins=40).eval()
    features = torch.randn(1, 6, 16, 4, 11)
    geometry = lift.rig_geometry.frustum_bev_index(cam2img[None], cam2lidar[None])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        bev, depth = lift(features, lift.rig_geometry(cam2img[None], cam2lidar[None]))
        x = lift.depth_net(features.flatten(0, 1))  # the same bfloat16 depth net output
    assert x.dtype == torch.bfloat16
    assert bev.dtype == torch.float32 and depth.dtype == torch.float32

    # Float64 reference from the bfloat16 depth-net output: softmax, lift and sum per cell.
    x = x.double()
    volume = x[:, :40].softmax(1)[:, :, None] * x[:, 40:][:, None]  # (6, D, C, h, w)
    rows = volume.permute(0, 1, 3, 4, 2).reshape(-1, 8)
    cells = grid.height * grid.width
    ref = torch.zeros(cells + 1, 8, dtype=torch.float64).index_add_(0, geometry.flatten(), rows)[:cells]
    ref = ref.view(grid.height, grid.width, 8).permute(2, 0, 1)
    assert int(torch.bincount(geometry.flatten(), minlength=cells + 1)[:cells].max()) > 50  # cells with many points
    torch.testing.assert_close(bev[0].double(), ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(depth.double().flatten(0, 1), x[:, :40].softmax(1).view(6, 40, 4, 11), rtol=1e-5, atol=1e-7)


def test_lift_splat_pooling_of_bfloat16_inputs_sums_in_float32_under_autocast():
    grid = BEVGrid(x_min=-4, x_max=4, y_min=-4, y_max=4, cell=1.0)
    lift = LiftSplat(grid=grid, in_channels=4, out_channels=2, image_size=(16, 16), feature_stride=16,
                     depth_min=1.0, depth_step=1.0, num_bins=500)
    gen = torch.Generator().manual_seed(1)
    depth = torch.rand(1, 500, 1, 1, generator=gen).to(torch.bfloat16)  # not normalised: large sums
    context = (torch.rand(1, 2, 1, 1, generator=gen) + 1).to(torch.bfloat16)
    geometry = torch.randint(0, 3, (1, 500), generator=gen)  # 500 frustum points into 3 cells
    plan = make_pooling_plan(geometry, grid, segment_size=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bev = lift.splat(depth, context, *plan.as_tuple())
    assert bev.dtype == torch.float32
    rows = depth.double().view(500, 1) * context.double().view(1, 2)
    ref = torch.zeros(grid.height * grid.width, 2, dtype=torch.float64).index_add_(0, geometry[0], rows)
    torch.testing.assert_close(bev[0].double().permute(1, 2, 0).reshape(-1, 2), ref, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------ the model


def test_model_loss_and_backward_under_bfloat16_autocast():
    torch.manual_seed(0)
    cfg = load_config(ROOT / "configs" / "tiny.yaml", [
        "data.image_size=[64, 176]", "model.camera.blocks=2", "model.fuser.modality_dropout=0", "loss.depth=1.0",
        "grid.x_min=-12.8", "grid.x_max=12.8", "grid.y_min=-12.8", "grid.y_max=12.8"])
    model = build_model(cfg).train()
    # Saturate the heatmap: logits far beyond +-6.3, where bfloat16's sigmoid is exactly 0 or 1.
    with torch.no_grad():
        model.heads.detection.branches["heatmap"][3].weight.mul_(300.0)
    batch = make_synthetic_batch(batch_size=2, image_size=cfg.data.image_size, grid=cfg.grid.build(), seed=3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(*model.prepare(batch).as_args())
        losses = model.loss(batch)
    assert out["heatmap"].dtype == torch.bfloat16 and float(out["heatmap"].detach().abs().max()) > 20
    assert {"heatmap", "regression", "depth", "map_focal", "scene", "heatmap_no_radar"} <= set(losses)
    for key, value in losses.items():
        assert value.dtype == torch.float32, key
        assert math.isfinite(float(value)), (key, float(value))
    sum(losses.values()).backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(bool(torch.isfinite(g).all()) for g in grads)


# ------------------------------------------------------------------------------------------ train.amp


def test_train_amp_setting(monkeypatch):
    assert load_config(ROOT / "configs" / "tiny.yaml").train.amp == "auto"
    assert load_config(ROOT / "configs" / "tiny.yaml", ["train.amp=true"]).train.amp is True
    assert load_config(ROOT / "configs" / "base.yaml", ["train.amp=false"]).train.amp is False
    with pytest.raises(ConfigError, match="train.amp"):
        load_config(ROOT / "configs" / "tiny.yaml", ["train.amp=fp8"])
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert autocast_dtype("auto", cpu) is None and autocast_dtype(False, cpu) is None
    assert autocast_dtype(True, cpu) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert autocast_dtype("auto", cuda) == torch.bfloat16 and autocast_dtype(False, cuda) is None
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert autocast_dtype("auto", cuda) == torch.float16 and autocast_dtype(True, cuda) == torch.float16


def test_trainer_runs_bfloat16_autocast_on_cpu(synth_root, tmp_path, caplog):
    cfg = load_config(ROOT / "configs" / "tiny.yaml", [
        "data.image_size=[64,176]", "grid.cell=1.6", "grid.x_min=-25.6", "grid.x_max=25.6", "grid.y_min=-25.6",
        "grid.y_max=25.6", "data.lidar_sweeps=1", "data.radar_sweeps=1", "train.num_workers=0", "train.batch_size=1",
        "train.log_every=1", "train.amp=true"])
    with caplog.at_level(logging.INFO, logger="perception.training"):
        trainer = Trainer(cfg, RunSpec(data=synth_root, work_dir=tmp_path, max_steps=1, device="cpu", progress=False))
        result = trainer.fit()
        trainer.close()
    assert trainer.amp and trainer.amp_dtype == torch.bfloat16 and not trainer.scaler.is_enabled()
    assert any(r.getMessage() == "mixed precision: bfloat16 autocast on cpu" for r in caplog.records)
    assert result.step == 1 and result.history and trainer.bad_steps == 0  # a NaN would be skipped, not raised
    assert all(math.isfinite(v) for h in result.history for k, v in h.items() if isinstance(v, float))
