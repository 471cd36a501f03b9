"""Temporal BEV alignment (`fusion.temporal.warp_bev`) against closed-form ego motion."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from fusion.temporal import curr2prev_transform, warp_bev
from perception.structures import BEVGrid

GRID = BEVGrid(x_min=-25.6, x_max=25.6, y_min=-25.6, y_max=25.6, cell=0.8)  # 64 x 64


def _pose(x: float, y: float, yaw: float) -> np.ndarray:
    m = np.eye(4)
    m[:2, :2] = [[math.cos(yaw), -math.sin(yaw)], [math.sin(yaw), math.cos(yaw)]]
    m[:2, 3] = [x, y]
    return m


def _cell_of(x: float, y: float) -> tuple[int, int]:
    return int((y - GRID.y_min) // GRID.cell), int((x - GRID.x_min) // GRID.cell)


@pytest.mark.parametrize("dx, dy, dyaw", [(4.0, 0.0, 0.0), (0.0, -2.4, 0.0), (3.2, 1.6, math.radians(15)),
                                          (0.0, 0.0, math.radians(-30))])
def test_a_static_feature_moves_against_the_ego_motion_to_within_a_cell(dx, dy, dyaw):
    # A static object at global (110, 57): where it is in each LIDAR_TOP frame is the closed form of the poses.
    prev_pose = _pose(100.0, 50.0, 0.3)
    curr_pose = prev_pose @ _pose(dx, dy, dyaw)  # the ego moved by (dx, dy, dyaw) in its previous frame
    obj_global = np.array([110.0, 57.0, 0.0, 1.0])
    obj_prev = (np.linalg.inv(prev_pose) @ obj_global)[:2]
    obj_curr = (np.linalg.inv(curr_pose) @ obj_global)[:2]
    prev_bev = torch.zeros(1, 2, *GRID.shape)
    i, j = _cell_of(*obj_prev)
    prev_bev[0, :, i, j] = torch.tensor([1.0, 5.0])
    m = curr2prev_transform(torch.from_numpy(prev_pose)[None], torch.from_numpy(curr_pose)[None])
    warped, valid = warp_bev(prev_bev, m, GRID)
    assert warped.shape == prev_bev.shape and valid.shape == (1, 1, *GRID.shape)
    peak = divmod(int(warped[0, 0].argmax()), GRID.width)
    ci, cj = _cell_of(*obj_curr)
    assert abs(peak[0] - ci) <= 1 and abs(peak[1] - cj) <= 1, (peak, (ci, cj))
    # Bilinear resampling keeps the feature's channel ratio and (up to the grid's edges) its mass.
    torch.testing.assert_close(warped[0, 1].sum(), 5 * warped[0, 0].sum())
    assert 0.5 < float(warped[0, 0].sum()) < 2.0


def test_no_motion_is_the_identity_and_cells_from_outside_are_invalid():
    bev = torch.randn(2, 3, *GRID.shape)
    eye = torch.eye(4, dtype=torch.float64).expand(2, 4, 4)
    warped, valid = warp_bev(bev, eye, GRID)
    torch.testing.assert_close(warped, bev, atol=1e-4, rtol=0)  # float32 normalised coordinates
    assert valid.all()
    # 10 m forward (+x): the last 10 m of the current grid were outside the previous one.
    m = torch.from_numpy(_pose(10.0, 0.0, 0.0))[None]
    _, valid = warp_bev(bev[:1], m, GRID)
    outside = GRID.x_min + (torch.arange(GRID.width) + 0.5) * GRID.cell + 10.0 > GRID.x_max
    assert (~valid[0, 0][:, outside]).all() and valid[0, 0][:, ~outside].all()


def test_warp_exports_to_onnx_with_grid_sample(tmp_path):
    onnx = pytest.importorskip("onnx")

    class Warp(torch.nn.Module):
        def forward(self, prev_bev, curr2prev):
            return warp_bev(prev_bev, curr2prev, GRID)

    path = tmp_path / "warp.onnx"
    torch.onnx.export(Warp(), (torch.randn(1, 2, *GRID.shape), torch.eye(4)[None]), str(path), opset_version=17,
                      dynamo=False)
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert "GridSample" in ops


# ------------------------------------------------------------------------ state, model, training, evaluation


def _meta(token: str, prev: str, ego2global: np.ndarray, lidar_aug: np.ndarray | None = None) -> dict:
    lidar2ego = _pose(0.9, 0.0, math.radians(-90))  # nuScenes' LIDAR_TOP is turned 90 degrees on the ego
    lidar2ego[2, 3] = 1.8
    return {"sample_token": token, "prev_token": prev, "timestamp": 0, "ego2global": ego2global,
            "lidar2ego": lidar2ego, "lidar_aug": np.eye(4) if lidar_aug is None else lidar_aug}


def _bev_point(meta: dict, p_global: np.ndarray) -> np.ndarray:
    """A global point in the sample's BEV frame, transformed step by step (the oracle for `curr2prev`)."""
    p = np.append(p_global, 1.0)
    p = np.linalg.solve(meta["ego2global"], p)
    p = np.linalg.solve(meta["lidar2ego"], p)
    return (meta["lidar_aug"] @ p)[:3]


def test_temporal_state_curr2prev_maps_a_fixed_world_point_between_augmented_frames():
    from perception.model.temporal import TemporalState

    aug = _pose(0.0, 0.0, math.radians(20)) @ np.diag([1.05, -1.05, 1.05, 1.0])  # rotation, scale and a y flip
    prev = [_meta("a0", "", _pose(300.0, 1200.0, 0.3), aug), _meta("b0", "", _pose(10.0, -5.0, -1.2))]
    curr = [_meta("a1", "a0", _pose(304.0, 1201.5, 0.35)), _meta("b1", "b0", _pose(10.0, -5.0, -1.2), aug)]
    state = TemporalState()
    state.update(prev, torch.zeros(2, 4, *GRID.shape))
    history = state.history(curr, 4, GRID, "cpu")
    assert history.has_history.tolist() == [True, True]
    for i in range(2):
        for p_global in (np.array([310.0, 1190.0, 0.5]), np.array([20.0, 3.0, -1.0])):
            m = history.curr2prev[i].double().numpy()
            got = (m @ np.append(_bev_point(curr[i], p_global), 1.0))[:3]
            np.testing.assert_allclose(got, _bev_point(prev[i], p_global), atol=1e-3)


def test_temporal_state_without_history():
    from perception.model.temporal import TemporalState

    state = TemporalState()
    first = [_meta("a0", "", np.eye(4)), _meta("b0", "", np.eye(4))]
    h = state.history(first, 4, GRID, "cpu")  # nothing remembered yet
    assert not h.has_history.any() and not h.prev_bev.any()
    state.update(first, torch.ones(2, 4, *GRID.shape))
    # The scene's first keyframe, a keyframe whose previous one was skipped, and a batch of another size.
    h = state.history([_meta("c0", "", np.eye(4)), _meta("b2", "b1", np.eye(4))], 4, GRID, "cpu")
    assert h.has_history.tolist() == [False, False]
    assert torch.equal(h.curr2prev, torch.eye(4).repeat(2, 1, 1))
    assert not state.history([_meta("a1", "a0", np.eye(4))], 4, GRID, "cpu").has_history.any()
    state.reset()
    assert not state.history([_meta("a1", "a0", np.eye(4)), _meta("b1", "b0", np.eye(4))], 4, GRID, "cpu").has_history.any()


def _temporal_model():
    from perception.config import load_config
    from perception.model.build import build_model

    root = __import__("pathlib").Path(__file__).resolve().parents[1]
    cfg = load_config(root / "configs/tiny.yaml", [
        "data.image_size=[64, 176]", "model.camera.blocks=2", "model.fuser.modality_dropout=0", "grid.x_min=-12.8",
        "grid.x_max=12.8", "grid.y_min=-12.8", "grid.y_max=12.8", "model.temporal.frames=1"])
    torch.manual_seed(0)
    model = build_model(cfg)
    torch.nn.init.normal_(model.temporal.block[-1].weight, std=0.05)  # not the zero init: history must show
    return cfg, model


def test_temporal_model_uses_the_history_and_no_history_is_the_empty_one():
    from perception.model.synthetic import make_synthetic_batch
    from perception.model.temporal import TemporalState
    from perception.robustness import history_lost

    cfg, model = _temporal_model()
    grid = cfg.grid.build()
    b0 = make_synthetic_batch(batch_size=2, image_size=cfg.data.image_size, grid=grid, boxes_per_sample=[3, 1], seed=0)
    b1 = make_synthetic_batch(batch_size=2, image_size=cfg.data.image_size, grid=grid, boxes_per_sample=[2, 2], seed=1)
    for m, p in zip(b1.meta, b0.meta):
        m["prev_token"] = p["sample_token"]

    model.train()
    state = TemporalState()
    losses = model.loss(b0, state)
    assert state.tokens == [m["sample_token"] for m in b0.meta] and not state.bev.requires_grad
    losses = model.loss(b1, state)
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert model.temporal.block[0].weight.grad.abs().sum() > 0  # the history reaches the loss

    model.eval()
    state = TemporalState()
    model.predict(b0, state)
    with_history = model(*model.prepare(b1).as_args(), model.history(b1, state))
    assert model.history(b1, state).has_history.all()
    without = model(*model.prepare(b1).as_args())
    lost = model(*model.prepare(b1).as_args(), model.history(history_lost(b1), state))
    assert not torch.allclose(with_history["heatmap"], without["heatmap"])
    torch.testing.assert_close(lost["heatmap"], without["heatmap"])
    torch.testing.assert_close(with_history["bev"], without["bev"])  # the state output is the pre-temporal BEV


def test_temporal_training_streams_scenes_and_evaluation_runs_them_in_order(synth_root, tmp_path):
    from perception.config import load_config
    from perception.evaluation import evaluate_model, scene_ordered_indices
    from perception.data.build import build_dataset
    from perception.model.temporal import TemporalState
    from perception.training import RunSpec, Trainer

    root = __import__("pathlib").Path(__file__).resolve().parents[1]
    cfg = load_config(root / "configs/tiny.yaml", [
        "data.image_size=[64, 176]", "model.camera.blocks=1", "grid.x_min=-12.8", "grid.x_max=12.8",
        "grid.y_min=-12.8", "grid.y_max=12.8", "model.temporal.frames=1", "train.num_workers=0",
        "train.batch_size=2", "data.lidar_sweeps=1", "data.radar_sweeps=1"])
    trainer = Trainer(cfg, RunSpec(data=synth_root, work_dir=tmp_path / "run", max_steps=4, progress=False))
    seen = []
    original = trainer.model.loss

    def spy(batch, state=None):
        seen.append([(m["sample_token"], m["prev_token"]) for m in batch.meta])
        return original(batch, state)

    trainer.model.loss = spy
    trainer.fit()
    assert len(seen) == 4 and isinstance(trainer.state, TemporalState)
    for step in range(1, 4):  # each slot walks its scene: the next sample's previous keyframe is the slot's last
        for slot in range(2):
            assert seen[step][slot][1] in ("", seen[step - 1][slot][0])
    assert sum(seen[s][k][1] == seen[s - 1][k][0] for s in range(1, 4) for k in range(2)) >= 4

    val = build_dataset(cfg, synth_root, "v1.0-mini", "mini_val", train=False, map_grid=trainer.model.map_grid)
    order = scene_ordered_indices(val.index)
    assert sorted(order) == list(range(len(val)))
    tokens = [str(val.index.tokens[i]) for i in order]
    assert all(str(val.index.prev_tokens[i]) in ("", tokens[k - 1] if k else "") for k, i in enumerate(order))
    halves = [scene_ordered_indices(val.index, r, 2) for r in (0, 1)]
    assert not set(halves[0]) & set(halves[1]) and sorted(halves[0] + halves[1]) == list(range(len(val)))
    metrics = evaluate_model(trainer.model.eval(), val, synth_root, "v1.0-mini", "mini_val", tmp_path / "eval",
                             device=torch.device("cpu"), progress=False)
    assert metrics["num_samples"] == len(val)


def test_temporal_export_carries_the_state_and_matches_torch_over_a_scene(synth_root, tmp_path):
    from deploy.core import TEMPORAL_INPUTS, history_feeds
    from deploy.export import calibration_feeds, export_model
    from deploy.runners import load_runner
    from perception.data.build import build_dataset
    from perception.data.collate import collate_samples
    from perception.evaluation import is_temporal, scene_ordered_indices
    from perception.model.temporal import TemporalState

    cfg, model = _temporal_model()
    model.eval()
    dataset = build_dataset(cfg, synth_root, "v1.0-mini", "mini_val", train=False, map_grid=model.map_grid)
    batches = [collate_samples([dataset[i]]) for i in scene_ordered_indices(dataset.index)]
    manifest = export_model(model, cfg, tmp_path / "export", example=batches[0])  # includes the TensorRT check
    assert manifest.input_names[-3:] == TEMPORAL_INPUTS and manifest.output_names[-1] == "bev"
    runner = load_runner("onnx", tmp_path / "export")
    assert is_temporal(runner) and is_temporal(model)
    assert not is_temporal(SimpleNamespace(temporal=False)) and not is_temporal(SimpleNamespace(temporal=None))
    state_torch, state_onnx = TemporalState(), TemporalState()
    with_history = 0
    for batch in batches:  # one scene of mini_val, keyframe after keyframe
        history = runner.history(batch, state_onnx)
        with_history += int(history.has_history.sum())
        got = runner.infer(runner.preprocessor(batch).named() | history_feeds(history))
        with torch.no_grad():
            expected = model(*model.prepare(batch).as_args(), model.history(batch, state_torch))
        for name in ("heatmap", "velocity", "map", "bev"):
            torch.testing.assert_close(got[name], expected[name], atol=2e-4, rtol=1e-3)
        model.predict(batch, state_torch)  # each advances its own state
        runner.predict(batch, state_onnx)
        torch.testing.assert_close(state_onnx.bev, state_torch.bev, atol=2e-4, rtol=1e-3)
    assert with_history == len(batches) - len(set(dataset.index.scene_tokens))
    # INT8 calibration feeds carry the history each sample has in use (its previous keyframe's bev).
    feeds = calibration_feeds(manifest, synth_root, 3, split="mini_val")
    assert [bool(f["has_history"][0]) for f in feeds] == [False, True, True]
    assert all(np.abs(f["prev_bev"]).sum() > 0 for f in feeds[1:])
