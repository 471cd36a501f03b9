"""The sample index built once and cached (`perception.data.index_cache`): a second construction does not parse
the devkit tables, a changed table file rebuilds, the cached arrays are memory-mapped, and under two gloo ranks
rank 1 never parses the tables. The oracle for the index's content is the index built straight from the tables
(`index_from_tables`), a separate path that never touches the cache."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import nuscenes
import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from perception.cli import app
from perception.config import load_config
from perception.data.build import base_dataset_config, build_dataset
from perception.data.dataset import INDEX_ARRAYS, DatasetConfig, NuScenesDataset, index_from_tables
from perception.training import RunSpec, Trainer

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "configs" / "tiny.yaml"
FAST = ["data.image_size=[64,176]", "grid.cell=1.6", "data.lidar_sweeps=1", "data.radar_sweeps=1",
        "train.num_workers=0", "train.batch_size=1", "train.dist_timeout_min=2"]


def _count_parses(monkeypatch) -> list[str]:
    """Replace the devkit's `NuScenes` by a wrapper that records each construction (its version)."""
    calls: list[str] = []
    real = nuscenes.NuScenes

    def counting(version="v1.0-mini", dataroot="", verbose=True, **kwargs):
        calls.append(version)
        return real(version=version, dataroot=dataroot, verbose=verbose, **kwargs)

    monkeypatch.setattr(nuscenes, "NuScenes", counting)
    return calls


def _assert_same_index(a, b) -> None:
    for name in INDEX_ARRAYS:
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is not None:
            assert x.dtype == y.dtype and x.shape == y.shape, name
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=name)


def test_second_construction_reads_the_cache_not_the_tables(synth_root, tmp_path, monkeypatch):
    monkeypatch.setenv("PERCEPTION_CACHE", str(tmp_path / "cache"))
    calls = _count_parses(monkeypatch)
    cfg = DatasetConfig(lidar_sweeps=2, radar_sweeps=2)
    first = NuScenesDataset(synth_root, "v1.0-mini", "mini_train", config=cfg)
    second = NuScenesDataset(synth_root, "v1.0-mini", "mini_train", config=cfg)
    assert calls == ["v1.0-mini"]  # parsed once
    assert isinstance(second.index.tokens, np.memmap) and isinstance(second.index.boxes, np.memmap)
    oracle, bad = index_from_tables(synth_root, "v1.0-mini", "mini_train", cfg)
    _assert_same_index(second.index, oracle)
    _assert_same_index(first.index, oracle)
    assert second.bad_samples == bad == []
    # copy-on-write: a write in one process's copy neither fails nor reaches the file
    second.index.boxes[0, 0] += 100.0
    third = NuScenesDataset(synth_root, "v1.0-mini", "mini_train", config=cfg)
    assert third.index.boxes[0, 0] == oracle.boxes[0, 0]
    # other settings or another split: another entry
    NuScenesDataset(synth_root, "v1.0-mini", "mini_train", config=DatasetConfig(lidar_sweeps=1, radar_sweeps=2))
    NuScenesDataset(synth_root, "v1.0-mini", "mini_val", config=cfg)
    assert len(calls) == 4  # the oracle parsed once too
    assert len(list((tmp_path / "cache" / "sample_index").iterdir())) == 3


def test_a_changed_table_file_rebuilds_the_index(synth_root, tmp_path, monkeypatch):
    monkeypatch.setenv("PERCEPTION_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "copy"
    (root / "v1.0-mini").mkdir(parents=True)
    for name in ("samples", "sweeps", "maps"):
        (root / name).symlink_to(synth_root / name)
    for table in (synth_root / "v1.0-mini").iterdir():
        (root / "v1.0-mini" / table.name).write_bytes(table.read_bytes())
    calls = _count_parses(monkeypatch)
    cfg = DatasetConfig(lidar_sweeps=2, radar_sweeps=2)
    before = NuScenesDataset(root, "v1.0-mini", "mini_train", config=cfg)
    # one annotation of the index loses its points: the devkit's filter (and so the rebuilt index) drops it
    path = root / "v1.0-mini" / "sample_annotation.json"
    anns = json.loads(path.read_text())
    kept = set(before.index.box_tokens.tolist())
    victim = next(a for a in anns if a["token"] in kept)
    victim["num_lidar_pts"] = victim["num_radar_pts"] = 0
    path.write_text(json.dumps(anns))
    after = NuScenesDataset(root, "v1.0-mini", "mini_train", config=cfg)
    assert calls == ["v1.0-mini", "v1.0-mini"]
    assert len(after.index.boxes) == len(before.index.boxes) - 1


def test_data_index_command_builds_then_hits(synth_root, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    monkeypatch.setenv("PERCEPTION_CACHE", str(tmp_path / "cache"))
    calls = _count_parses(monkeypatch)
    args = ["data", "index", "--data", str(synth_root), "--version", "v1.0-mini", "--config", str(TINY),
            "data.lidar_sweeps=1", "data.radar_sweeps=1"]
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 0, first.output
    assert calls == ["v1.0-mini"]  # both splits from one reading of the tables
    assert "mini_train: 12 samples" in first.output and "built from the tables" in first.output
    assert "peak RSS" in first.output
    second = CliRunner().invoke(app, args)
    assert second.exit_code == 0, second.output
    assert calls == ["v1.0-mini"] and second.output.count("cache hit") == 2
    # training with the same data settings reads the entries the command wrote
    cfg = load_config(TINY, ["data.lidar_sweeps=1", "data.radar_sweeps=1"])
    ds = build_dataset(cfg, synth_root, "v1.0-mini", "mini_train", train=False)
    assert calls == ["v1.0-mini"] and isinstance(ds.index.tokens, np.memmap)
    assert base_dataset_config(cfg, train=False).lidar_sweeps == 2


# ------------------------------------------------------------------------------------------ two ranks


def _rank_worker(rank: int, world: int, port: int, data: str, work_dir: str, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), PERCEPTION_CACHE=str(Path(out) / "cache"))
    torch.set_num_threads(1)
    parses: list[str] = []
    real = nuscenes.NuScenes

    def counting(version="v1.0-mini", dataroot="", verbose=True, **kwargs):
        parses.append(version)
        if rank == 0:
            time.sleep(1.0)  # the other rank must wait for the cache, not race past it
        return real(version=version, dataroot=dataroot, verbose=verbose, **kwargs)

    nuscenes.NuScenes = counting
    cfg = load_config(TINY, FAST)
    trainer = Trainer(cfg, RunSpec(data=Path(data), work_dir=Path(work_dir), max_steps=1, device="cpu", progress=False))
    val = build_dataset(cfg, data, "v1.0-mini", "mini_val", train=False, dist_info=trainer.dist)  # as `validate` does
    (Path(out) / f"rank{rank}.json").write_text(json.dumps({
        "parses": parses, "train_tokens": [str(t) for t in trainer.train_set.index.tokens],
        "val_tokens": [str(t) for t in val.index.tokens]}))
    trainer.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_under_two_ranks_only_rank_0_parses_the_tables(synth_root, tmp_path):
    ctx = mp.start_processes(_rank_worker, args=(2, _free_port(), str(synth_root), str(tmp_path / "run"), str(tmp_path)),
                             nprocs=2, join=False, start_method="spawn")
    deadline = time.time() + 300
    try:
        while not ctx.join(timeout=5):
            assert time.time() < deadline, "the two ranks did not finish in 300 s"
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    assert r1["parses"] == []
    assert r0["parses"] == ["v1.0-mini", "v1.0-mini"]  # train split, then val split
    assert r0["train_tokens"] == r1["train_tokens"] and len(r0["train_tokens"]) == 12
    assert r0["val_tokens"] == r1["val_tokens"] and len(r0["val_tokens"]) == 6
