"""Class-balanced grouping and sampling (`CBGSSampler`, ``train.cbgs``) and the GT-sampling stop epoch
(``train.gt_sampling_stop_epoch``)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch

from perception.config import load_config
from perception.data.dataset import DatasetConfig, NuScenesDataset
from perception.data.gt_sampling import GTDatabase, GTSampler, GTSamplerConfig
from perception.data.loader import CBGSSampler, make_loader
from perception.data.transforms import ImageAugConfig
from perception.errors import ConfigError
from perception.structures import DETECTION_CLASSES
from perception.training import RunSpec, Trainer

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "configs" / "tiny.yaml"
# A long tail of single-class samples: 90 of class 0, 9 of class 1, 1 of class 2.
TAIL = [{0}] * 90 + [{1}] * 9 + [{2}]


def test_class_frequencies_after_balancing_match_the_closed_form():
    # By hand (mmdet3d's CBGS): T = 100 class occurrences; f = 0.90, 0.09, 0.01; r_c = (1/3) / f_c = 0.370,
    # 3.70, 33.3; int(n_c * r_c) = int(33.3) = 33 draws for each class.
    ids = list(CBGSSampler(TAIL, num_classes=3, micro_batch=1, seed=5))
    counts = Counter(cls for i in ids for cls in TAIL[i])
    assert counts == {0: 33, 1: 33, 2: 33}
    assert counts[2] / len(ids) == pytest.approx(1 / 3)  # the rare class: 1% of the split, a third of an epoch
    assert ids.count(99) == 33  # its one sample, repeated

    # Samples holding several classes count once per class (a repeated label counts once): class 0 is in samples
    # {0, 1, 2, 4}, class 1 in {0, 3}, class 2 in {3}; T = 7, T / 3 = 2.33 -> 2 draws each, class by class.
    multi = [[0, 1], [0], [0], [1, 2], [0, 0]]
    expanded = CBGSSampler(multi, num_classes=3, micro_batch=1).expanded().tolist()
    assert len(expanded) == 6
    assert set(expanded[:2]) <= {0, 1, 2, 4} and set(expanded[2:4]) <= {0, 3} and expanded[4:] == [3, 3]
    # A class with no sample draws nothing (C = 4: T / 4 = 1.75 -> 1 draw for each of the three present).
    assert len(CBGSSampler(multi, num_classes=4, micro_batch=1).expanded()) == 3


@pytest.mark.parametrize("world, micro_batch, accumulate", [(2, 1, 1), (2, 2, 3), (3, 1, 1), (3, 11, 3)])
def test_ddp_shards_are_disjoint_equal_and_cover_the_expanded_epoch(world, micro_batch, accumulate):
    ranks = [CBGSSampler(TAIL, num_classes=3, micro_batch=micro_batch, world_size=world, rank=r,
                         accumulate=accumulate, seed=1, epoch=4) for r in range(world)]
    expanded = ranks[0].expanded().tolist()
    assert len(expanded) == 99
    positions = [list(s.order) for s in ranks]  # positions in the expanded list, per rank
    assert len({len(p) for p in positions}) == 1  # equal lengths: DDP ranks step together
    every = [p for rank in positions for p in rank]
    assert len(set(every)) == len(every)  # disjoint
    # Together the whole epoch, but for an incomplete last global batch (dropped, as `EpochSampler` drops it).
    global_batch = world * micro_batch * accumulate
    assert len(every) == 99 - 99 % global_batch and set(every) <= set(range(99))
    for s, p in zip(ranks, positions):
        assert list(s) == [expanded[k] for k in p] and len(s) == len(p)
        assert s.batches_per_epoch() == 99 // global_batch


def test_order_depends_on_seed_and_epoch_only():
    def order(seed, epoch):
        return list(CBGSSampler(TAIL, num_classes=3, micro_batch=2, world_size=2, rank=1, seed=seed, epoch=epoch))

    assert order(3, 1) == order(3, 1)
    assert order(3, 1) != order(3, 2)
    assert order(3, 1) != order(4, 1)


def test_gt_sampling_stops_at_its_epoch_also_in_loader_workers(synth_root):
    train = NuScenesDataset(synth_root, "v1.0-mini", "mini_train",
                            config=DatasetConfig(lidar_sweeps=1, radar_sweeps=0, map="off",
                                                 image=ImageAugConfig(final_hw=(64, 176))))
    plain = train.load(0)
    aug = train.with_config(train=True)
    aug.gt_sampler = GTSampler(GTDatabase.build(train), GTSamplerConfig(targets={c: 40 for c in DETECTION_CLASSES},
                                                                          stop_epoch=2))
    for epoch, pastes in ((0, True), (1, True), (2, False), (3, False)):
        aug.set_epoch(epoch)
        s = aug[0]
        if pastes:
            assert len(s.boxes_lidar) > len(plain.boxes_lidar)
        else:
            assert len(s.boxes_lidar) == len(plain.boxes_lidar) and torch.equal(s.points_lidar, plain.points_lidar)
    # A worker process holds the epoch set before its loader starts (the training loader's workers are not
    # persistent: one loader per epoch).
    for epoch, pastes in ((1, True), (2, False)):
        aug.set_epoch(epoch)
        batch = next(iter(make_loader(aug, [0], batch_size=1, workers=1)))
        assert (int(batch.num_boxes[0]) > len(plain.boxes_lidar)) == pastes


def test_trainer_wires_cbgs_and_the_stop_epoch(synth_root, tmp_path):
    cfg = load_config(TINY, ["data.image_size=[64,176]", "grid.cell=1.6", "data.lidar_sweeps=1",
                             "data.radar_sweeps=1", "train.num_workers=0", "train.batch_size=2", "train.cbgs=true",
                             "train.gt_sampling=true", "train.gt_sampling_stop_epoch=1"])
    trainer = Trainer(cfg, RunSpec(data=synth_root, work_dir=tmp_path, epochs=2, device="cpu", progress=False))
    try:
        sampler = trainer._loader(0, 0).sampler
        assert isinstance(sampler, CBGSSampler)
        assert trainer.batches_per_epoch == len(sampler.expanded()) // 2  # an epoch: one pass over the expansion
        assert trainer.total_steps == 2 * trainer.batches_per_epoch
        gt = trainer.train_set.gt_sampler
        assert gt.active(0) and not gt.active(1)
    finally:
        trainer.close()


def test_cbgs_with_temporal_frames_is_a_config_error():
    load_config(TINY, ["train.cbgs=true"])
    with pytest.raises(ConfigError, match=r"train\.cbgs.*model\.temporal\.frames"):
        load_config(TINY, ["train.cbgs=true", "model.temporal.frames=1"])
    with pytest.raises(ConfigError, match="train.gt_sampling_stop_epoch"):
        load_config(TINY, ["train.gt_sampling_stop_epoch=-1"])
