"""Bounded disk and bad steps: `train.keep_checkpoints` retention (and resume from what is left), and a
non-finite loss that skips the optimizer step on every rank instead of ending the job (`train.max_bad_steps`)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import torch

from perception.checkpoint import load_checkpoint, prune_checkpoints
from perception.config import load_config
from perception.training import RunSpec, Trainer, TrainingError
from tests.test_training import FAST, TINY, _run_two_ranks

NAN = float("nan")


def _trainer(root: Path, work_dir: Path, steps: int, overrides: list[str] = (), **spec) -> Trainer:
    cfg = load_config(TINY, FAST + list(overrides))
    return Trainer(cfg, RunSpec(data=root, work_dir=work_dir, max_steps=steps, device="cpu", progress=False, **spec))


def _inject_nan(trainer: Trainer, bad_at: set[int]) -> None:
    """Make the model's loss non-finite (its ``heatmap`` term times NaN, still attached to the graph, so the
    gradients are NaN too) while `trainer.step` (the 0-based index of the step being computed) is in `bad_at`."""
    real = trainer.model.loss

    def loss(batch, state=None):
        losses = real(batch, state)
        if trainer.step in bad_at:
            losses["heatmap"] = losses["heatmap"] * NAN
        return losses

    trainer.model.loss = loss


def _snapshots(trainer: Trainer) -> dict[int, dict]:
    """Record, for every step (1-based, as `trainer.step` after it), the model's state dict and the optimizer's
    first moments before and after it, and what `train_step` returned."""
    snaps: dict[int, dict] = {}
    real = trainer.train_step

    def state() -> dict:
        opt = {k: v["exp_avg"].clone() for k, v in trainer.optimizer.state_dict()["state"].items()}
        return {"model": {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}, "exp_avg": opt}

    def spy(micro):
        before = state()
        out = real(micro)
        snaps[trainer.step] = {"before": before, "after": state(), "out": out}
        return out

    trainer.train_step = spy
    return snaps


def _assert_same(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), what
    for k, v in a.items():
        assert torch.equal(v, b[k]), f"{what}: {k} differs"


# --------------------------------------------------------------------------------------------- retention


def test_prune_keeps_the_newest_step_files_and_touches_nothing_else(tmp_path):
    names = ["step_0000001.pt", "step_0000002.pt", "step_0000010.pt", "step_0000011.pt", "step_0000099.pt",
             "last.pt", "best.pt", "step_latest.pt", "step_0000003.pt.bak", ".step_0000004.pt.tmp123", "notes.txt"]
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "step_0000005.pt").mkdir()  # not a file: never deleted
    deleted = prune_checkpoints(tmp_path, keep=2, current_step=11)
    # step 99 is beyond the run's step (left by an abandoned, later run): not counted, not deleted
    assert sorted(p.name for p in deleted) == ["step_0000001.pt", "step_0000002.pt"]
    left = {p.name for p in tmp_path.iterdir()}
    assert left == set(names) - {"step_0000001.pt", "step_0000002.pt"} | {"step_0000005.pt"}
    assert {p.name for p in prune_checkpoints(tmp_path, keep=0, current_step=11)} == {"step_0000010.pt", "step_0000011.pt"}
    assert (tmp_path / "step_0000099.pt").is_file() and (tmp_path / "last.pt").is_file()


def test_keep_checkpoints_bounds_the_step_files_and_resume_works_from_what_is_left(synth_root, tmp_path):
    work = tmp_path / "run"
    trainer = _trainer(synth_root, work, 7, ["train.checkpoint_every=1", "train.keep_checkpoints=2"])
    (work / "checkpoints").mkdir(parents=True)
    (work / "checkpoints" / "step_notes.pt").write_bytes(b"not a step checkpoint")  # not step_<digits>.pt: kept
    trainer.fit()
    trainer.close()
    ckpts = work / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["last.pt", "step_0000006.pt", "step_0000007.pt", "step_notes.pt"]
    assert [load_checkpoint(ckpts / f"step_000000{s}.pt")["step"] for s in (6, 7)] == [6, 7]
    step7 = load_checkpoint(ckpts / "step_0000007.pt")

    # last.pt damaged: --resume falls back to the newest step file left, and goes on from its step
    (ckpts / "last.pt").write_bytes(b"truncated")
    resumed = _trainer(synth_root, work, 8, ["train.checkpoint_every=1", "train.keep_checkpoints=2"], resume=True)
    assert resumed.step == 7
    _assert_same(resumed.model.state_dict(), step7["model"], "resumed weights")
    resumed.fit()
    resumed.close()
    assert sorted(p.name for p in ckpts.iterdir()) == ["last.pt", "step_0000007.pt", "step_0000008.pt", "step_notes.pt"]
    assert load_checkpoint(ckpts / "last.pt")["step"] == 8


def test_keep_checkpoints_zero_writes_no_step_files(synth_root, tmp_path):
    trainer = _trainer(synth_root, tmp_path, 2, ["train.checkpoint_every=1", "train.keep_checkpoints=0"])
    trainer.fit()
    trainer.close()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["last.pt"]


# -------------------------------------------------------------------------------------------- bad steps


def test_a_nan_step_is_skipped_and_the_run_goes_on(synth_root, tmp_path, caplog):
    trainer = _trainer(synth_root, tmp_path, 5, ["train.checkpoint_every=100"])
    _inject_nan(trainer, {2})  # the third step
    snaps = _snapshots(trainer)
    scalars: list[tuple[str, float, int]] = []
    add_scalar = trainer.writer.add_scalar
    trainer.writer.add_scalar = lambda tag, value, step: scalars.append((tag, value, step)) or add_scalar(tag, value, step)
    with caplog.at_level(logging.WARNING, logger="perception.training"):
        result = trainer.fit()
    trainer.close()

    assert result.step == 5 and trainer.bad_steps == 1 and trainer.bad_streak == 0
    assert snaps[3]["out"] is None
    _assert_same(snaps[3]["after"]["model"], snaps[3]["before"]["model"], "weights and BatchNorm statistics")
    _assert_same(snaps[3]["after"]["exp_avg"], snaps[3]["before"]["exp_avg"], "optimizer state")
    for s in (1, 2, 4, 5):  # the other steps train
        assert snaps[s]["out"] is not None and all(torch.isfinite(torch.tensor(v)) for v in snaps[s]["out"].values())
        changed = [k for k, v in snaps[s]["after"]["model"].items() if not torch.equal(v, snaps[s]["before"]["model"][k])]
        assert changed, f"step {s} changed no weight"
    assert trainer.scheduler.last_epoch == 4  # the lr schedule counts the 4 updates taken
    assert load_checkpoint(tmp_path / "checkpoints" / "last.pt")["bad_steps"] == 1
    assert ("train/bad_steps", 1, 3) in scalars
    assert not any(tag == "train/total" and step == 3 for tag, _, step in scalars)  # no NaN loss scalar
    warning = next(r.getMessage() for r in caplog.records if "skipped on every rank" in r.getMessage())
    assert warning.startswith("step 3:") and "rank 0: heatmap=nan" in warning and "total=nan" in warning


def test_max_bad_steps_in_a_row_stop_the_run_after_writing_last_pt(synth_root, tmp_path):
    trainer = _trainer(synth_root, tmp_path, 10, ["train.max_bad_steps=3", "train.checkpoint_every=100"])
    _inject_nan(trainer, set(range(10)))
    initial = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    with pytest.raises(TrainingError, match=r"3 bad steps in a row \(train.max_bad_steps=3"):
        trainer.fit()
    trainer.close()
    assert trainer.step == 3 and trainer.bad_steps == 3
    last = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert last["step"] == 3 and last["bad_steps"] == 3
    _assert_same(last["model"], initial, "weights in last.pt (no update was ever taken)")


class _InfGrad(torch.autograd.Function):
    """Identity forward, infinite gradient backward: a finite loss whose gradients overflow (as fp16's do)."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


def test_loss_scaling_skips_overflows_itself_and_a_nan_loss_is_counted_once(synth_root, tmp_path):
    """fp16's GradScaler (here its CPU twin, enabled): a step with a finite loss and inf gradients is the
    scaler's to skip (not a bad step); a NaN loss is one bad step, and the scaler's state stays consistent."""
    trainer = _trainer(synth_root, tmp_path, 4, ["train.checkpoint_every=100"])
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=1000)
    real = trainer.model.loss

    def loss(batch, state=None):
        losses = real(batch, state)
        if trainer.step == 1:
            losses["heatmap"] = losses["heatmap"] * NAN
        if trainer.step == 2:
            losses["heatmap"] = _InfGrad.apply(losses["heatmap"])
        return losses

    trainer.model.loss = loss
    snaps = _snapshots(trainer)
    result = trainer.fit()
    trainer.close()
    assert result.step == 4 and trainer.bad_steps == 1
    assert snaps[2]["out"] is None and snaps[3]["out"] is not None and snaps[4]["out"] is not None
    _assert_same(snaps[2]["after"]["model"], snaps[2]["before"]["model"], "weights across the bad step")
    params = [k for k, _ in trainer.model.named_parameters()]  # the scaler's skip keeps BatchNorm's new statistics
    _assert_same({k: snaps[3]["after"]["model"][k] for k in params}, {k: snaps[3]["before"]["model"][k] for k in params},
                 "parameters across the step the GradScaler skipped")
    assert trainer.scaler.get_scale() == 1024.0 / 4  # each found inf/NaN halves the scale once
    assert trainer.scheduler.last_epoch == 3  # steps 1, 3 (the scaler's skip, as before) and 4


def _nan_on_rank1_worker(rank: int, world: int, port: int, data: str, work_dir: str, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    trainer = _trainer(Path(data), Path(work_dir), 6, ["train.max_bad_steps=2", "train.checkpoint_every=100",
                                                       "train.dist_timeout_min=2"])
    # rank 1 only: a lone bad step (the 2nd), then two in a row (the 4th and 5th): max_bad_steps=2 stops the run
    _inject_nan(trainer, {1, 3, 4} if rank == 1 else set())
    snaps = _snapshots(trainer)
    try:
        trainer.fit()
        message = "no error"
    except Exception as exc:  # noqa: BLE001 - the test reads what each rank saw
        message = f"{type(exc).__name__}: {exc}"
    torch.save({"message": message, "step": trainer.step, "bad_steps": trainer.bad_steps,
                "snaps": {s: {"before": v["before"]["model"], "after": v["after"]["model"], "skipped": v["out"] is None}
                          for s, v in snaps.items()}}, Path(out) / f"rank{rank}.pt")
    trainer.close()


@pytest.mark.slow
def test_two_gloo_ranks_skip_a_nan_of_rank1_together_and_stop_together(synth_root, tmp_path):
    _run_two_ranks(_nan_on_rank1_worker, synth_root, tmp_path, "a rank waits after a bad step")
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    for r in (r0, r1):
        assert r["message"].startswith("TrainingError: training stopped at step 5: 2 bad steps in a row"), r["message"]
        # rank 1's loss was NaN; rank 0's loss was finite, its gradients NaN only through DDP's all-reduce
        assert "rank 1: heatmap=nan, total=nan" in r["message"] and "rank 0: grad_norm=nan;" in r["message"]
        assert r["step"] == 5 and r["bad_steps"] == 3
        assert [s for s, v in r["snaps"].items() if v["skipped"]] == [2, 4]  # the 5th raised inside train_step
        _assert_same(r["snaps"][2]["after"], r["snaps"][2]["before"], "weights across the skipped step 2")
        _assert_same(r["snaps"][4]["after"], r["snaps"][4]["before"], "weights across the skipped step 4")
    params = [k for k in r0["snaps"][3]["after"] if "running" not in k and "num_batches" not in k]
    for s in (1, 2, 3, 4):  # BatchNorm statistics are per rank; the parameters are DDP's, equal on both ranks
        _assert_same({k: r0["snaps"][s]["after"][k] for k in params}, {k: r1["snaps"][s]["after"][k] for k in params},
                     f"rank 0 and rank 1 after step {s}")
    last = load_checkpoint(tmp_path / "ddp" / "checkpoints" / "last.pt")
    assert last["step"] == 5 and last["bad_steps"] == 3
    _assert_same({k: last["model"][k] for k in params}, {k: r0["snaps"][4]["after"][k] for k in params},
                 "last.pt against the weights before the two bad steps")
