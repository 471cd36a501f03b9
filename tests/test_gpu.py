"""What a user's CUDA machine runs, against the CPU path as the oracle: the same weights give the same losses and
core outputs on CUDA; a bf16 mixed-precision training step keeps float32 losses and finite gradients; the
deployed torch core under FP16 / BF16 autocast and through `torch.compile` agrees with eager FP32.

All `gpu`-marked: skipped without CUDA (CI); `benchmarks/gpu.sh` runs them on a lent GPU machine.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from deploy.core import OUTPUT_NAMES, ExportedCore
from deploy.runners import TorchExecutor
from perception.config import ExperimentConfig, load_config
from perception.model.build import build_model
from perception.model.synthetic import make_synthetic_batch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

ROOT = Path(__file__).resolve().parents[1]
# Small variants of the shipped configs (as in test_model), without the training-time randomness.
SMALL = ["data.image_size=[64, 176]", "model.camera.blocks=2", "model.fuser.modality_dropout=0",
         "model.camera.drop_path_rate=0", "grid.x_min=-12.0", "grid.x_max=12.0", "grid.y_min=-12.0", "grid.y_max=12.0"]


def _small(name: str) -> ExperimentConfig:
    # base's DINOv2 takes multiples of its patch 14, and random weights (tests download nothing).
    extra = ["data.image_size=[56, 168]", "model.camera.pretrained=null"] if name == "base" else []
    return load_config(ROOT / "configs" / f"{name}.yaml", SMALL + extra)


@pytest.fixture(autouse=True)
def _exact_fp32():
    """TF32 off, so that CUDA FP32 is comparable with the CPU."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _core_outputs(model, batch, device: str) -> dict[str, torch.Tensor]:
    model = model.to(device).eval()
    feeds = model.preprocessor(batch.to(device)).named()
    core = ExportedCore(model)
    with torch.no_grad():
        out = core(*(feeds[n] for n in core.input_names))
    return {n: t.float().cpu() for n, t in zip(OUTPUT_NAMES, out)}


@pytest.mark.parametrize("name", ["tiny", "base"])
def test_cuda_matches_cpu(name):
    cfg = _small(name)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    batch = make_synthetic_batch(batch_size=2, image_size=cfg.data.image_size, grid=cfg.grid.build(),
                                 boxes_per_sample=[3, 1], seed=0)
    with torch.no_grad():
        losses_cpu = {k: float(v) for k, v in model.loss(batch).items()}
    out_cpu = _core_outputs(model, batch, "cpu")
    with torch.no_grad():
        losses_cuda = {k: float(v) for k, v in model.to("cuda").loss(batch.to("cuda")).items()}
    out_cuda = _core_outputs(model, batch, "cuda")
    assert losses_cuda.keys() == losses_cpu.keys()
    for key, value in losses_cpu.items():
        assert losses_cuda[key] == pytest.approx(value, rel=1e-3, abs=1e-5), key
    for key, value in out_cpu.items():
        scale = float(value.abs().max()) + 1e-6
        assert float((out_cuda[key] - value).abs().max()) <= 1e-3 * scale, key


@pytest.mark.parametrize("name", ["tiny", "base"])
def test_bf16_training_step(name):
    cfg = _small(name)
    torch.manual_seed(0)
    model = build_model(cfg).to("cuda").train()
    batch = make_synthetic_batch(batch_size=2, image_size=cfg.data.image_size, grid=cfg.grid.build(),
                                 boxes_per_sample=[3, 1], seed=1).to("cuda")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    before = [p.detach().clone() for p in model.parameters()]
    with torch.autocast("cuda", dtype=torch.bfloat16):
        losses = model.loss(batch)
    for key, value in losses.items():
        assert value.dtype == torch.float32 and torch.isfinite(value), key
    sum(losses.values()).backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    optimizer.step()
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))


def test_torch_core_precisions_and_compile_agree_with_fp32():
    cfg = _small("tiny")
    torch.manual_seed(0)
    model = build_model(cfg).to("cuda").eval()
    batch = make_synthetic_batch(batch_size=1, image_size=cfg.data.image_size, grid=cfg.grid.build(),
                                 boxes_per_sample=4, seed=2).to("cuda")
    feeds = model.preprocessor(batch).named()
    core = ExportedCore(model)

    def run(precision: str, compiled: bool = False) -> torch.Tensor:
        executor = TorchExecutor(core, core.input_names, OUTPUT_NAMES, device="cuda", precision=precision)
        if compiled:
            executor.module = torch.compile(executor.module, dynamic=False)
        return torch.sigmoid(executor.run(feeds)["heatmap"])

    reference = run("fp32")
    assert float((run("fp32", compiled=True) - reference).abs().max()) < 1e-3
    for precision in ("fp16", "bf16"):
        assert float((run(precision) - reference).abs().max()) < 0.05, precision
