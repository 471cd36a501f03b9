"""DDP hygiene: `find_unused_parameters` only when a config can leave parameters without a gradient (checked
against an actual backward), ``train.sync_bn`` (conversion; refusal off CUDA), and downloaded weights fetched
once per job (rank 0 fetches, the others wait; `fetch_timm` writes atomically)."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

import perception.model.weights as W
from perception.config import load_config
from perception.distributed import DistInfo, init_distributed
from perception.errors import ConfigError
from perception.model.build import build_model
from perception.model.synthetic import make_synthetic_batch
from perception.training import (
    SYNC_BN_PARTS, RunSpec, Trainer, convert_sync_batchnorm, fetch_pretrained_once, sync_batchnorm)

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "configs" / "tiny.yaml"
# tests/test_model.py's small tiny settings (no modality dropout unless a test sets it)
SMALL = ["data.image_size=[64, 176]", "model.camera.blocks=2", "model.fuser.modality_dropout=0",
         "grid.x_min=-12.8", "grid.x_max=12.8", "grid.y_min=-12.8", "grid.y_max=12.8"]
# tests/test_training.py's FAST settings
FAST = ["data.image_size=[64,176]", "grid.cell=1.6", "data.lidar_sweeps=1", "data.radar_sweeps=1",
        "train.num_workers=0", "train.batch_size=1", "train.warmup_steps=2", "train.log_every=1",
        "model.fuser.modality_dropout=0.0", "train.deterministic=true"]


def _params_without_grad(*extra: str) -> tuple[list[str], bool]:
    """(trainable parameters whose grad is None after one training `loss` backward, the model's
    `may_leave_parameters_unused`) for tiny with SMALL + `extra`."""
    torch.manual_seed(0)
    cfg = load_config(TINY, [*SMALL, *extra])
    model = build_model(cfg).train()
    batch = make_synthetic_batch(batch_size=2, image_size=cfg.data.image_size, grid=cfg.grid.build(), seed=3)
    sum(model.loss(batch).values()).backward()
    return [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None], model.may_leave_parameters_unused


def test_every_parameter_gets_a_gradient_in_tiny_so_ddp_need_not_search():
    missing, flag = _params_without_grad()
    assert missing == [] and flag is False


@pytest.mark.parametrize("extra", [("model.fuser.modality_dropout=[0.0, 0.0, 1.0]",),  # radar masked: zero grads
                                   ("model.fuser.paired_drop=[[radar]]",)])
def test_masked_branches_get_zero_gradients_not_none(extra):
    missing, flag = _params_without_grad(*extra)
    assert missing == [] and flag is False


@pytest.mark.parametrize("extra, prefix", [
    (("model.fuser.modality_dropout=[1.0, 0.0, 1.0]", "loss.depth=0"), "camera_encoder."),  # LiDAR-only stage
    (("loss.scene=0",), "heads.scene."),
])
def test_configs_that_leave_parameters_unused_turn_the_search_on(extra, prefix):
    missing, flag = _params_without_grad(*extra)
    assert any(n.startswith(prefix) for n in missing) and flag is True


def test_sync_bn_converts_every_batchnorm_of_the_bev_parts_only():
    cfg = load_config(TINY, SMALL)
    model = build_model(cfg).eval()
    bn = lambda m: sum(isinstance(x, nn.modules.batchnorm._BatchNorm) and not isinstance(x, nn.SyncBatchNorm)
                       for x in m.modules())
    sync = lambda m: sum(isinstance(x, nn.SyncBatchNorm) for x in m.modules())
    bev_before = sum(bn(getattr(model, p)) for p in SYNC_BN_PARTS if getattr(model, p) is not None)
    camera_before = bn(model.camera_encoder) + bn(model.view_transform)
    params_before = dict(model.named_parameters())
    batch = make_synthetic_batch(batch_size=1, image_size=cfg.data.image_size, grid=cfg.grid.build(), seed=1)
    with torch.no_grad():
        ref = model(*model.prepare(batch).as_args())
    assert bev_before > 0
    assert convert_sync_batchnorm(model) == bev_before
    assert sync(model) == bev_before and bn(model) == camera_before
    # the same Parameter objects (the optimizer and EMA keep working), the same state-dict keys
    assert all(p is params_before[n] for n, p in model.named_parameters()) and params_before.keys() == dict(model.named_parameters()).keys()
    with torch.no_grad():  # eval mode: SyncBatchNorm normalises with the running statistics, as BatchNorm
        out = model(*model.prepare(batch).as_args())
    for k in ref:
        torch.testing.assert_close(out[k], ref[k])


def test_sync_bn_is_refused_off_cuda_and_a_no_op_in_one_process():
    model = build_model(load_config(TINY, SMALL))
    with pytest.raises(ConfigError, match="train.sync_bn"):
        sync_batchnorm(model, True, DistInfo(rank=0, world_size=2), torch.device("cpu"))
    assert sync_batchnorm(model, True, DistInfo(), torch.device("cpu")) == 0
    assert sync_batchnorm(model, False, DistInfo(rank=0, world_size=2), torch.device("cpu")) == 0
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in model.modules())


# ------------------------------------------------------------------------------------------ fetched once


def _fetch_worker(rank: int, world: int, port: int, log_file: str) -> None:
    """Joins a gloo group of `world`, with `fetch` / `fetch_timm` replaced by fakes that append a line to
    `log_file` and take 1 s; runs `fetch_pretrained_once` for a registered and a timm name, then appends the
    time it returned."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)

    def fake(kind):
        def fetch(name, cache_dir=None, **kwargs):
            time.sleep(1.0)
            with open(log_file, "a") as f:
                f.write(json.dumps({"rank": rank, "fetch": kind, "name": name, "done": time.time()}) + "\n")
            return Path(log_file)
        return fetch

    W.fetch, W.fetch_timm = fake("registered"), fake("timm")
    info = init_distributed(torch.device("cpu"), timeout_min=2)
    assert info.world_size == world
    for value in ("dinov2-small", "timm:vit_tiny_patch16_224", None):
        fetch_pretrained_once(value, info, torch.device("cpu"))
        with open(log_file, "a") as f:
            f.write(json.dumps({"rank": rank, "returned": str(value), "at": time.time()}) + "\n")
    torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_weights_are_fetched_once_across_two_ranks_and_the_others_wait(tmp_path):
    log_file = tmp_path / "fetches.jsonl"
    mp.start_processes(_fetch_worker, args=(2, _free_port(), str(log_file)), nprocs=2, join=True, start_method="spawn")
    records = [json.loads(line) for line in log_file.read_text().splitlines()]
    fetches = [r for r in records if "fetch" in r]
    assert [(r["rank"], r["fetch"], r["name"]) for r in fetches] == [
        (0, "registered", "dinov2-small"), (0, "timm", "vit_tiny_patch16_224")]
    # rank 1 went on only after rank 0's fetch had finished (it waited at the barrier)
    returned = {(r["rank"], r["returned"]): r["at"] for r in records if "returned" in r}
    assert returned[(1, "dinov2-small")] >= fetches[0]["done"]
    assert returned[(1, "timm:vit_tiny_patch16_224")] >= fetches[1]["done"]
    assert (1, "None") in returned


def test_prefetch_fetches_only_what_must_be_downloaded(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(W, "fetch", lambda name, cache_dir=None: calls.append(("registered", name)) or tmp_path)
    monkeypatch.setattr(W, "fetch_timm", lambda name, cache_dir=None: calls.append(("timm", name)) or tmp_path)
    for value in (None, str(tmp_path), "dinov2-small", " timm:vit_tiny_patch16_224 "):
        W.prefetch_pretrained(value)
    assert calls == [("registered", "dinov2-small"), ("timm", "vit_tiny_patch16_224")]


def test_fetch_timm_keeps_the_folder_another_process_wrote_first(monkeypatch, tmp_path):
    """Two processes fetch the same timm model: the second to rename finds the first one's complete folder and
    uses it; no temp folder is left behind, nothing is deleted under the other process."""
    folder = W.weights_dir(tmp_path) / "timm" / "some_vit"
    monkeypatch.setattr(W.timm, "create_model", lambda *a, **k: nn.Linear(2, 2))

    def save_for_hf(model, path, safe_serialization=True):
        for name in ("model.safetensors", "config.json"):
            (Path(path) / name).write_text("mine")
        folder.mkdir(parents=True)  # meanwhile the other process finished its own write
        for name in ("model.safetensors", "config.json"):
            (folder / name).write_text("theirs")

    monkeypatch.setattr(W, "save_for_hf", save_for_hf)
    assert W.fetch_timm("some_vit", tmp_path) == folder
    assert (folder / "model.safetensors").read_text() == "theirs"
    assert sorted(p.name for p in folder.parent.iterdir()) == ["some_vit"]
    # an incomplete leftover (no config.json) is replaced
    (folder / "config.json").unlink()
    monkeypatch.setattr(W, "save_for_hf", lambda model, path, safe_serialization=True: [
        (Path(path) / n).write_text("new") for n in ("model.safetensors", "config.json")])
    assert W.fetch_timm("some_vit", tmp_path) == folder
    assert (folder / "config.json").read_text() == "new"
    assert sorted(p.name for p in folder.parent.iterdir()) == ["some_vit"]


# ------------------------------------------------------------------------------------------ 2 ranks, search off


def _ddp_worker(rank: int, world: int, port: int, data: str, work_dir: str, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    cfg = load_config(TINY, FAST + ["train.checkpoint_every=1000", "train.dist_timeout_min=2"])
    trainer = Trainer(cfg, RunSpec(data=Path(data), work_dir=Path(work_dir), max_steps=2, device="cpu", progress=False))
    assert trainer.loss_module.find_unused_parameters is False
    trainer.fit()
    (Path(out) / f"rank{rank}.json").write_text(json.dumps({"step": trainer.step}))
    trainer.close()


@pytest.mark.slow
def test_two_gloo_ranks_train_tiny_without_the_unused_parameter_search(synth_root, tmp_path):
    ctx = mp.start_processes(_ddp_worker, args=(2, _free_port(), str(synth_root), str(tmp_path / "ddp"), str(tmp_path)),
                             nprocs=2, join=False, start_method="spawn")
    deadline = time.time() + 300
    try:
        while not ctx.join(timeout=5):
            assert time.time() < deadline, "the two ranks did not finish in 300 s"
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    for r in range(2):
        assert json.loads((tmp_path / f"rank{r}.json").read_text()) == {"step": 2}
