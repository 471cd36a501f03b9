"""Training: DDP equivalence, exact resume after SIGKILL, the demo end to end (small and fast settings)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from perception.config import load_config
from perception.data.loader import EpochSampler
from perception.checkpoint import init_from_checkpoint, load_checkpoint, model_state_from
from perception.training import RunSpec, Trainer

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "configs" / "tiny.yaml"
# Small and deterministic: 64x176 images, a 64x64 BEV grid, no workers, no modality dropout (it draws per rank).
FAST = ["data.image_size=[64,176]", "grid.cell=1.6", "data.lidar_sweeps=1", "data.radar_sweeps=1",
        "train.num_workers=0", "train.batch_size=1", "train.warmup_steps=2", "train.log_every=1",
        "model.fuser.modality_dropout=0.0", "train.deterministic=true"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_epoch_sampler_shards_global_batches():
    single = list(EpochSampler(10, micro_batch=1, accumulate=2, seed=3, epoch=1))
    ranks = [list(EpochSampler(10, micro_batch=1, world_size=2, rank=r, seed=3, epoch=1)) for r in range(2)]
    # step s: one process takes [a, b] as accumulation steps; rank 0 takes a, rank 1 takes b
    assert single[0::2] == ranks[0] and single[1::2] == ranks[1]
    assert sorted(single) == sorted(ranks[0] + ranks[1]) and len(set(single)) == 10
    resumed = list(EpochSampler(10, micro_batch=1, accumulate=2, seed=3, epoch=1, start_batch=2))
    assert resumed == single[4:]


def _ddp_worker(rank: int, world: int, port: int, data: str, work_dir: str, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    cfg = load_config(TINY, FAST)
    trainer = Trainer(cfg, RunSpec(data=Path(data), work_dir=Path(work_dir), max_steps=3, device="cpu", progress=False))
    trainer.fit()
    torch.save({k: p.detach() for k, p in trainer.model.named_parameters()}, Path(out) / f"rank{rank}.pt")
    trainer.close()


@pytest.mark.slow
def test_two_gloo_processes_match_one_process_with_the_same_global_batch(synth_root, tmp_path):
    port = _free_port()
    mp.start_processes(_ddp_worker, args=(2, port, str(synth_root), str(tmp_path / "ddp"), str(tmp_path)), nprocs=2,
                       join=True, start_method="spawn")
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    for k in r0:
        assert torch.equal(r0[k], r1[k]), f"ranks differ in {k}"
    # One process, the same global batch of 2 as two accumulation steps of 1 (BatchNorm statistics are per
    # micro-batch in both). Tolerance rtol 1e-4, atol 1e-5: float32 sums in another order (gloo's all-reduce).
    # Without gradient synchronisation rank 0 would have followed its own samples only and differ far more.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = load_config(TINY, FAST + ["train.accumulate_steps=2"])
        single = Trainer(cfg, RunSpec(data=synth_root, work_dir=tmp_path / "single", max_steps=3, device="cpu", progress=False))
        single.fit()
        single.close()
    finally:
        torch.set_num_threads(threads)
    # parameters only: BatchNorm running statistics are per rank (and updated per micro-batch in one process)
    ref = {k: p.detach() for k, p in single.model.named_parameters()}
    assert ref.keys() == r0.keys()
    for k, v in ref.items():
        torch.testing.assert_close(r0[k], v, rtol=1e-4, atol=1e-5, msg=lambda m: f"{k}: {m}")
    assert single.step == 3


def _run_two_ranks(worker, data: Path, tmp_path: Path, hang: str, timeout_s: float = 150.0) -> None:
    """`worker(rank, world, port, data, work_dir, out)` in two spawned processes (gloo); fails with `hang` when they
    have not both finished within `timeout_s`."""
    ctx = mp.start_processes(worker, args=(2, _free_port(), str(data), str(tmp_path / "ddp"), str(tmp_path)),
                             nprocs=2, join=False, start_method="spawn")
    deadline = time.time() + timeout_s
    try:
        while not ctx.join(timeout=5):
            assert time.time() < deadline, f"the two ranks did not finish in {timeout_s:.0f} s ({hang})"
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()


def _budget_worker(rank: int, world: int, port: int, data: str, work_dir: str, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    if rank == 1:  # rank 1's clock runs 4x fast: deciding the budget on its own clock, it would stop steps early
        real, t0 = time.time, time.time()
        time.time = lambda: t0 + 4.0 * (real() - t0)
    cfg = load_config(TINY, FAST + ["train.val_every=2", "train.ema_decay=0.9", "train.max_steps=30",
                                    "train.checkpoint_every=1000", "train.dist_timeout_min=2"])
    # "fixed": a length far beyond what 5 s allows, so the budget (rank 0's clock) always ends the run.
    # "adaptive": the budget alone, the length estimated from rank 0's step rate and broadcast (a run that keeps
    # its pace then ends on its last step a moment before the budget, or the budget ends it).
    fixed = os.environ["BUDGET_TEST_LENGTH"] == "fixed"
    trainer = Trainer(cfg, RunSpec(data=Path(data), work_dir=Path(work_dir), max_steps=1000 if fixed else None,
                                   time_budget_s=5.0, device="cpu", progress=False))
    validated = []
    validate = trainer.validate
    trainer.validate = lambda: validated.append(trainer.step) or validate()
    result = trainer.fit()
    params = [k for k, _ in trainer.model.named_parameters()]
    torch.save({"step": result.step, "total_steps": trainer.total_steps, "stopped_early": result.stopped_early,
                "validated": validated, "ema": {k: trainer.ema.shadow[k] for k in params}}, Path(out) / f"rank{rank}.pt")
    trainer.close()


@pytest.mark.slow
@pytest.mark.parametrize("length", ["fixed", "adaptive"])
def test_two_gloo_processes_share_rank0s_time_budget_validations_and_ema(synth_root, tmp_path, monkeypatch, length):
    """Rank 1's clock is skewed: every rank still stops at rank 0's step, validates at the same steps (no
    hang in a collective entered alone) and averages the same EMA (initialised from rank 0's broadcast weights)."""
    monkeypatch.setenv("BUDGET_TEST_LENGTH", length)  # read by the spawned ranks
    _run_two_ranks(_budget_worker, synth_root, tmp_path, "a rank waits in a collective alone")
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert r0["stopped_early"] == r1["stopped_early"]
    if length == "fixed":
        assert r0["stopped_early"] and r0["total_steps"] == 1000
    assert (r0["step"], r0["total_steps"], r0["validated"]) == (r1["step"], r1["total_steps"], r1["validated"])
    assert r0["validated"][-1] == r0["step"] and len(r0["validated"]) >= 2  # periodic validation(s), then the final one
    for k, v in r0["ema"].items():
        assert torch.equal(v, r1["ema"][k]), f"EMA differs between ranks in {k}"


def _failing_validation_worker(rank: int, world: int, port: int, data: str, work_dir: str, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import perception.training as training

    if rank == 0:  # the devkit part, which rank 0 runs alone after gathering every rank's predictions, fails
        real = training.evaluate_model

        def failing(*args, **kwargs):
            real(*args, **kwargs)
            raise OSError("disk full while writing metrics.json")

        training.evaluate_model = failing
    cfg = load_config(TINY, FAST + ["train.val_every=2", "train.max_steps=4", "train.checkpoint_every=1000",
                                    "train.dist_timeout_min=10"])
    t0 = time.time()
    try:
        training.train(cfg, RunSpec(data=Path(data), work_dir=Path(work_dir), device="cpu", progress=False))
        message = "no error"
    except Exception as exc:  # noqa: BLE001 - the test reads what each rank saw
        message = f"{type(exc).__name__}: {exc}"
    Path(out, f"rank{rank}.txt").write_text(f"{time.time() - t0:.1f}\n{message}")


@pytest.mark.slow
def test_rank0_validation_failure_stops_every_rank_at_once(synth_root, tmp_path):
    """Rank 0's devkit evaluation raises: both ranks stop at once, rank 0 with that error and rank 1 with one that
    says where to look (before, rank 1 went on into a collective with a rank that was gone: a wait of up to
    train.dist_timeout_min, or a transport error that does not name the cause)."""
    _run_two_ranks(_failing_validation_worker, synth_root, tmp_path, "a rank still waits after rank 0's validation failed")
    r0, r1 = ((tmp_path / f"rank{r}.txt").read_text().splitlines() for r in range(2))
    assert r0[1] == "OSError: disk full while writing metrics.json"
    assert r1[1].startswith("RuntimeError: validation at step 2 failed on another rank"), r1


def _train_cmd(data: Path, work_dir: Path, steps: int, resume: bool = False) -> list[str]:
    cmd = [sys.executable, "-m", "perception", "train", "--config", str(TINY), "--data", str(data), "--work-dir",
           str(work_dir), "--max-steps", str(steps), "--device", "cpu"]
    if resume:
        cmd.append("--resume")
    return cmd + FAST + ["train.checkpoint_every=2", "data.bev_aug=true"]


@pytest.mark.slow
def test_sigkill_after_checkpoint_then_resume_matches_uninterrupted(synth_root, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    subprocess.run(_train_cmd(synth_root, tmp_path / "full", 5), check=True, env=env, capture_output=True)
    proc = subprocess.Popen(_train_cmd(synth_root, tmp_path / "killed", 5), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    ckpt = tmp_path / "killed" / "checkpoints" / "step_0000002.pt"
    deadline = time.time() + 300
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert ckpt.exists()
    killed_at = load_checkpoint(tmp_path / "killed" / "checkpoints" / "last.pt")["step"]
    assert killed_at < 5, "the run finished before it was killed"
    # no temp file is mistaken for a checkpoint, and last.pt is complete
    subprocess.run(_train_cmd(synth_root, tmp_path / "killed", 5, resume=True), check=True, env=env, capture_output=True)
    a = load_checkpoint(tmp_path / "full" / "checkpoints" / "last.pt")
    b = load_checkpoint(tmp_path / "killed" / "checkpoints" / "last.pt")
    assert a["step"] == b["step"] == 5
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), f"resumed weights differ in {k}"
    for k, v in a["optimizer"]["state"].items():
        assert torch.equal(v["exp_avg"], b["optimizer"]["state"][k]["exp_avg"])


def test_init_from_reports_missing_and_unexpected(tmp_path, caplog):
    from perception.model.build import build_model

    cfg = load_config(TINY, FAST)
    model = build_model(cfg)
    state = model.state_dict()
    dropped = next(k for k in state if k.startswith("heads.scene"))
    state.pop(dropped)
    state["extra.weight"] = torch.zeros(1)
    torch.save({"model": state}, tmp_path / "w.pt")
    with caplog.at_level("INFO"):
        missing, unexpected = init_from_checkpoint(build_model(cfg), tmp_path / "w.pt")
    assert dropped in missing and unexpected == ["extra.weight"]
    assert any("missing" in r.message for r in caplog.records)


@pytest.mark.slow
def test_demo_writes_checkpoint_metrics_submission_and_report(synth_root, tmp_path):
    from perception.demo import run_demo

    work = tmp_path / "demo"
    metrics = run_demo(synth_root, work, minutes=0.15, overrides=FAST[:-1], progress=False)
    for rel in ("checkpoints/last.pt", "eval/metrics.json", "eval/submission.json", "report.md",
                "eval/lidar_only/metrics.json", "eval/camera_only/metrics.json", "eval/lidar_radar/metrics.json", "eval/radar_only/metrics.json",
                "bev_sample.png", "learning_curve.png", "config.yaml"):
        assert (work / rel).is_file(), rel
    assert 0.0 <= metrics["nds"] <= 1.0 and metrics["num_samples"] == 6
    report = (work / "report.md").read_text()
    assert "| lidar_only |" in report and "| lidar_radar |" in report and "configs/tiny.yaml` trained for" in report
    assert "## What the cameras add" in report and "| ped crossing IoU |" in report and "| stop line IoU |" in report
    assert "Camera backbone `vit_tiny_patch16_224`, first 4 blocks, randomly initialised" in report
    assert "AMOTA" in report and (work / "tracking" / "tracking_metrics.json").is_file()
    assert any((work / "tb").iterdir())


def test_camera_contribution_is_all_sensors_minus_lidar_radar():
    from perception.demo import camera_contribution_table

    fused = {"nds": 0.40, "map": 0.30, "seg_miou": 0.25, "seg_iou": {"ped_crossing": 0.20, "stop_line": 0.05}}
    no_cam = {"nds": 0.35, "map": 0.31, "seg_miou": 0.15, "seg_iou": {"ped_crossing": 0.02, "stop_line": 0.0}}
    rows = {line.split("|")[1].strip(): line.split("|")[2:5] for line in camera_contribution_table(fused, no_cam).splitlines()[2:]}
    assert [c.strip() for c in rows["NDS"]] == ["0.4000", "0.3500", "+0.0500"]
    assert rows["mAP"][2].strip() == "-0.0100" and rows["ped crossing IoU"][2].strip() == "+0.1800"
    assert rows["stop line IoU"][2].strip() == "+0.0500" and "walkway IoU" not in rows  # absent classes are left out
    no_map = camera_contribution_table({"nds": 0.4, "map": 0.3, "seg_miou": None, "seg_iou": None},
                                       {"nds": 0.3, "map": 0.3, "seg_miou": None, "seg_iou": None})
    assert "seg mIoU" not in no_map and "| NDS |" in no_map


def test_ema_weights_are_kept_checkpointed_and_evaluated(synth_root, tmp_path):

    cfg = load_config(TINY, FAST + ["train.ema_decay=0.9"])
    trainer = Trainer(cfg, RunSpec(data=synth_root, work_dir=tmp_path, max_steps=2, device="cpu", progress=False))
    trainer.fit()
    trainer.close()
    ckpt = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert ckpt["ema"]["updates"] == 2
    name = next(k for k, v in ckpt["model"].items() if v.dtype.is_floating_point and v.numel() > 10 and "camera" in k)
    assert not torch.equal(ckpt["ema"]["shadow"][name], ckpt["model"][name])
    assert model_state_from(ckpt) is ckpt["ema"]["shadow"]  # evaluation and export use the EMA
    assert torch.equal(trainer.eval_model().state_dict()[name], ckpt["ema"]["shadow"][name])


def test_sequence_sampler_keeps_scenes_in_order_and_shards_two_ranks_without_overlap():
    from perception.data.loader import SequenceSampler

    rng = np.random.default_rng(0)
    lengths = [5, 7, 3, 6, 4, 8, 5]
    scene_of, timestamps = [], []
    for s, n in enumerate(lengths):
        for k in range(n):
            scene_of.append(f"scene-{s}")
            timestamps.append(1_000_000 * s + 500_000 * k)
    perm = rng.permutation(len(scene_of))  # the dataset's order need not be time order
    scene_of, timestamps = [scene_of[i] for i in perm], [timestamps[i] for i in perm]
    ranks = [SequenceSampler(scene_of, timestamps, micro_batch=2, world_size=2, rank=r, seed=3, epoch=1) for r in (0, 1)]
    seqs = [list(s) for s in ranks]
    assert len(seqs[0]) == len(seqs[1]) == len(ranks[0]) > 0  # DDP ranks step together
    assert not set(seqs[0]) & set(seqs[1])
    for r, seq in enumerate(seqs):
        first = ranks[r].is_first()
        for slot in range(2):  # within a slot, consecutive micro-batches are consecutive keyframes of one scene
            stream = seq[slot::2]
            for k, (a, b) in enumerate(zip(stream, stream[1:])):
                if scene_of[a] == scene_of[b]:
                    assert timestamps[b] - timestamps[a] == 500_000 and not first[slot + 2 * (k + 1)]
                else:
                    assert first[slot + 2 * (k + 1)]
    assert seqs[0] == list(SequenceSampler(scene_of, timestamps, micro_batch=2, world_size=2, rank=0, seed=3, epoch=1))
    assert seqs[0] != list(SequenceSampler(scene_of, timestamps, micro_batch=2, world_size=2, rank=0, seed=3, epoch=2))
