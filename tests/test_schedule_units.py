"""Schedule units: the run's length in epochs or steps, and the learning rate and warm-up scaled with the global
batch (`train.epochs`, `train.lr_batch`), checked against hand-computed values."""

from __future__ import annotations

from pathlib import Path

import pytest

from perception.config import load_config
from perception.training import RunSpec, Trainer, scaled_lr, scaled_warmup, schedule_length

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "configs" / "tiny.yaml"
FAST = ["data.image_size=[64,176]", "grid.cell=1.6", "data.lidar_sweeps=1", "data.radar_sweeps=1",
        "train.num_workers=0", "train.batch_size=1", "model.fuser.modality_dropout=0.0"]


def _train(*extra: str):
    return load_config(TINY, list(extra)).train


def test_schedule_length_precedence():
    spec = RunSpec(data=Path("d"), work_dir=Path("w"))
    assert schedule_length(spec, _train("train.max_steps=70"), batches_per_epoch=9) == 70
    assert schedule_length(spec, _train("train.max_steps=70", "train.epochs=3"), batches_per_epoch=9) == 27
    assert schedule_length(RunSpec(data=Path("d"), work_dir=Path("w"), epochs=2), _train("train.epochs=3"), 9) == 18
    assert schedule_length(RunSpec(data=Path("d"), work_dir=Path("w"), max_steps=5, epochs=2), _train("train.epochs=3"), 9) == 5


@pytest.mark.parametrize("global_batch, lr, warmup", [(32, 2e-4, 500), (4, 2.5e-5, 4000), (64, 4e-4, 250)])
def test_linear_scaling_rule(global_batch, lr, warmup):
    t = _train("train.lr=2e-4", "train.lr_batch=32", "train.warmup_steps=500")
    assert scaled_lr(t, global_batch) == pytest.approx(lr, rel=1e-12)
    assert scaled_warmup(t, global_batch) == warmup
    plain = _train("train.lr=2e-4", "train.warmup_steps=500")  # lr_batch null: as given
    assert scaled_lr(plain, global_batch) == 2e-4 and scaled_warmup(plain, global_batch) == 500


def test_trainer_runs_the_scaled_schedule(synth_root, tmp_path):
    cfg = load_config(TINY, FAST + ["train.lr=1e-3", "train.lr_batch=4", "train.warmup_steps=3", "train.accumulate_steps=2",
                                    "train.epochs=2", "train.layer_decay=1.0", "train.val_every_epochs=1"])
    trainer = Trainer(cfg, RunSpec(data=synth_root, work_dir=tmp_path, device="cpu", progress=False))
    try:
        assert trainer.global_batch == 2
        assert [g["initial_lr"] for g in trainer.optimizer.param_groups] == pytest.approx([5e-4] * len(trainer.optimizer.param_groups))  # 1e-3 x 2 / 4
        assert trainer.total_steps == 2 * trainer.batches_per_epoch == 2 * (len(trainer.train_set) // 2)
        assert trainer.val_interval == trainer.batches_per_epoch  # once per epoch (and once at the end)
        factor = trainer.scheduler.lr_lambdas[0]
        assert [factor(s) for s in range(6)] == pytest.approx([1 / 6, 2 / 6, 3 / 6, 4 / 6, 5 / 6, 1.0])  # 3 at batch 4 = 6 at 2
    finally:
        trainer.close()


def test_validation_interval_in_steps_or_epochs():
    from perception.errors import ConfigError

    assert _train("train.val_every=7").val_every_epochs is None
    with pytest.raises(ConfigError, match="val_every"):
        _train("train.val_every=7", "train.val_every_epochs=1")
    for name in ("base.yaml", "base_lidar.yaml"):  # the real-data recipes validate once per epoch
        t = load_config(ROOT / "configs" / name).train
        assert t.val_every_epochs == 1 and t.val_every == 0
