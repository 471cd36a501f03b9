"""Temporal BEV alignment (`fusion.temporal.warp_bev`) against closed-form ego motion."""

from __future__ import annotations

import math

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
