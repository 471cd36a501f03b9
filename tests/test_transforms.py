"""Augmentation geometry: boxes keep their points, projections follow the image warp, velocities and map masks
move with the boxes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from perception.data.dataset import DatasetConfig, NuScenesDataset
from perception.data.transforms import (
    BEVAugConfig,
    ImageAugConfig,
    bev_aug_matrix,
    image_aug_matrix,
    sample_bev_aug,
    sample_image_aug,
    transform_boxes,
    transform_points,
    transform_radar,
    warp_image,
)
from perception.structures import Boxes3D

AUGS = [
    bev_aug_matrix(0.0, 1.0, False, False, (0, 0, 0)),
    bev_aug_matrix(0.7, 1.0, False, False, (0, 0, 0)),
    bev_aug_matrix(-0.3, 1.08, True, False, (1.0, -2.0, 0.3)),
    bev_aug_matrix(2.5, 0.93, False, True, (0.0, 0.5, 0.0)),
    bev_aug_matrix(-1.2, 1.05, True, True, (-1.5, 0.0, -0.2)),
]


def _random_scene(rng):
    K = 20
    boxes = np.zeros((K, 9), np.float32)
    boxes[:, 0:2] = rng.uniform(-40, 40, (K, 2))
    boxes[:, 2] = rng.uniform(-1.5, 0.5, K)
    boxes[:, 3:6] = rng.uniform(0.5, 5.0, (K, 3))
    boxes[:, 6] = rng.uniform(-math.pi, math.pi, K)
    boxes[:, 7:9] = rng.normal(0, 5, (K, 2))
    pts = [rng.uniform(-50, 50, (3000, 5)).astype(np.float32)]
    for b in boxes:  # points in and around each box
        local = rng.uniform(-0.7, 0.7, (200, 3)) * b[[4, 3, 5]]
        c, s = math.cos(b[6]), math.sin(b[6])
        xyz = np.stack([c * local[:, 0] - s * local[:, 1], s * local[:, 0] + c * local[:, 1], local[:, 2]], 1) + b[:3]
        pts.append(np.concatenate([xyz, rng.uniform(0, 1, (200, 2))], 1).astype(np.float32))
    pts = np.concatenate(pts)
    # drop points within 1 mm of a face, whose membership float rounding may flip
    inside_tight = Boxes3D(boxes).points_inside(torch.from_numpy(pts), margin=-1e-3)
    inside_loose = Boxes3D(boxes).points_inside(torch.from_numpy(pts), margin=1e-3)
    ambiguous = (inside_tight != inside_loose).any(0).numpy()
    return boxes, pts[~ambiguous]


@pytest.mark.parametrize("k", range(len(AUGS)))
def test_bev_aug_keeps_points_in_boxes(k):
    rng = np.random.default_rng(k)
    boxes, pts = _random_scene(rng)
    A = AUGS[k]
    before = Boxes3D(boxes).points_inside(torch.from_numpy(pts))
    after = Boxes3D(transform_boxes(boxes, A)).points_inside(torch.from_numpy(transform_points(pts, A)))
    assert before.sum() > 1000
    assert torch.equal(before, after)


def test_sampled_bev_aug_keeps_points_and_rotates_velocity():
    rng = np.random.default_rng(7)
    boxes, pts = _random_scene(rng)
    cfg = BEVAugConfig(rot_lim_deg=(-180, 180), scale_lim=(0.9, 1.1), trans_std=(1.0, 1.0, 0.2))
    for _ in range(10):
        A = sample_bev_aug(rng, cfg)
        out = transform_boxes(boxes, A)
        assert torch.equal(Boxes3D(boxes).points_inside(torch.from_numpy(pts)),
                           Boxes3D(out).points_inside(torch.from_numpy(transform_points(pts, A))))
        # velocity and heading move by the same linear map: their relative angle is kept up to reflection
        L = A[:2, :2]
        np.testing.assert_allclose(out[:, 7:9], boxes[:, 7:9] @ L.T, rtol=1e-5, atol=1e-4)
        heading = np.stack([np.cos(out[:, 6]), np.sin(out[:, 6])], 1)
        expect = np.stack([np.cos(boxes[:, 6]), np.sin(boxes[:, 6])], 1) @ L.T
        expect /= np.linalg.norm(expect, axis=1, keepdims=True)
        np.testing.assert_allclose(heading, expect, atol=1e-5)
        rel_before = np.arctan2(boxes[:, 8], boxes[:, 7]) - boxes[:, 6]
        rel_after = np.arctan2(out[:, 8], out[:, 7]) - out[:, 6]
        sign = np.sign(np.linalg.det(L))
        d = np.remainder(rel_after - sign * rel_before + np.pi, 2 * np.pi) - np.pi
        np.testing.assert_allclose(d, 0, atol=1e-4)


def test_radar_velocity_rotates():
    A = bev_aug_matrix(math.pi / 2, 1.0, False, False, (0, 0, 0))
    radar = np.array([[10, 0, 0, 5, 1.0, 0.0, 0.1]], np.float32)
    out = transform_radar(radar, A)
    np.testing.assert_allclose(out[0, :2], [0, 10], atol=1e-5)
    np.testing.assert_allclose(out[0, 4:6], [0, 1], atol=1e-6)
    np.testing.assert_allclose(out[0, [3, 6]], [5, 0.1])


def test_image_warp_moves_pixels_like_img_aug():
    img = np.zeros((225, 400, 3), np.uint8)
    img[100:104, 250:254] = 255  # a blob centred at (251.5, 101.5)
    M = image_aug_matrix(0.8, (20, 30), (128, 256), True, 4.0)
    out = warp_image(img, M, (128, 256))
    ys, xs = np.nonzero(out[..., 0] > 60)
    w = out[ys, xs, 0].astype(float)
    centre = np.array([(xs * w).sum() / w.sum(), (ys * w).sum() / w.sum()])
    expect = (M @ np.array([251.5, 101.5, 1.0]))[:2]
    assert np.linalg.norm(centre - expect) < 0.6


@pytest.fixture(scope="module")
def aug_pair(synth_root):
    """The same samples loaded plain and with every image and BEV augmentation switched on."""
    plain = NuScenesDataset(synth_root, "v1.0-mini", "mini_train",
                            config=DatasetConfig(lidar_sweeps=1, radar_sweeps=1,
                                                 image=ImageAugConfig(final_hw=(128, 352))))
    aug = plain.with_config(train=True, bev_aug=BEVAugConfig(rot_lim_deg=(-60, 60), scale_lim=(0.9, 1.1),
                                                             trans_std=(1.0, 1.0, 0.2)),
                            image=ImageAugConfig(final_hw=(128, 352), resize_lim=(0.3, 0.6),
                                                 bot_pct_lim=(0.0, 0.2), rot_lim_deg=(-10, 10), flip=True))
    return plain, aug


def test_dataset_aug_projection_matches_image_aug(aug_pair):
    plain, aug = aug_pair
    checked = 0
    for i in (0, 3, 7):
        a, p = aug[i], plain.load(i)
        assert np.abs(a.meta["lidar_aug"] - np.eye(4)).max() > 1e-3
        # a reflection permutes the corner order, so compare the augmented boxes' corners as sets with the
        # augmentation applied to the original corners, then project those
        A = torch.from_numpy(a.meta["lidar_aug"])
        corners_orig = p.boxes_lidar.corners().double()
        moved = corners_orig @ A[:3, :3].T + A[:3, 3]
        d = torch.cdist(a.boxes_lidar.corners().double(), moved)
        assert d.min(dim=2).values.max() < 1e-3
        corners_aug = moved.reshape(-1, 3)
        corners_orig = corners_orig.reshape(-1, 3)
        for c in range(6):
            lidar2cam_a = torch.linalg.inv(a.cam2lidar[c].double())
            lidar2cam_p = torch.linalg.inv(p.cam2lidar[c].double())
            cam_a = corners_aug @ lidar2cam_a[:3, :3].T + lidar2cam_a[:3, 3]
            cam_p = corners_orig @ lidar2cam_p[:3, :3].T + lidar2cam_p[:3, 3]
            front = cam_p[:, 2] > 0.5
            uv_a = cam_a @ a.cam2img[c].double().T
            uv_a = uv_a[:, :2] / uv_a[:, 2:]
            K = torch.linalg.inv(p.img_aug[c].double()) @ p.cam2img[c].double()  # original intrinsics
            uv0 = cam_p @ K.T
            uv0 = uv0 / uv0[:, 2:]
            uv_expect = uv0 @ a.img_aug[c].double().T
            err = (uv_a - uv_expect[:, :2]).norm(dim=1)[front]
            checked += int(front.sum())
            assert err.numel() == 0 or err.max() < 1.0
        # the boxes still hold their points after the BEV augmentation
        # (points keep their order; a point more than 2 mm inside stays inside, float32 rounding aside)
        in_a, in_p = a.boxes_lidar.points_inside(a.points_lidar), p.boxes_lidar.points_inside(p.points_lidar)
        assert in_p.sum() > 100
        assert not (p.boxes_lidar.points_inside(p.points_lidar, margin=-2e-3) & ~in_a).any()
        assert not (a.boxes_lidar.points_inside(a.points_lidar, margin=-2e-3) & ~in_p).any()
    assert checked > 100


def test_map_masks_follow_bev_aug(aug_pair):
    plain, aug = aug_pair
    grid = plain.config.grid
    xs, ys = grid.cell_centers()
    X, Y = np.meshgrid(xs, ys)
    for i in (1, 5):
        a, p = aug[i], plain.load(i)
        A = a.meta["lidar_aug"]
        inv = np.linalg.inv(A)
        q = np.stack([X.ravel(), Y.ravel(), np.zeros(X.size), np.ones(X.size)])
        src = inv @ q
        j = np.floor((src[0] - grid.x_min) / grid.cell).astype(int)
        r = np.floor((src[1] - grid.y_min) / grid.cell).astype(int)
        ok = (j >= 0) & (j < grid.width) & (r >= 0) & (r < grid.height)
        for c in (0, 2):  # drivable_area, walkway
            warped = p.map_masks[c].numpy()[r[ok], j[ok]]
            got = a.map_masks[c].numpy().ravel()[ok]
            assert (warped == got).mean() > 0.95, (i, c, (warped == got).mean())


@pytest.mark.parametrize("rng", [None, 0])
def test_fit_width_resizes_each_camera_by_its_own_width(rng):
    """A rig of mixed image sizes: with `fit_width` each camera's full width lands on the same output columns
    (closed form: the scale is final_W / W0 times the relative resize), whatever its own width."""
    cfg = ImageAugConfig(final_hw=(64, 176), resize_lim=(1.0, 1.0), rot_lim_deg=(0.0, 0.0), flip=False, fit_width=True)
    for wh in ((1600, 900), (800, 450), (1920, 1208)):
        gen = None if rng is None else np.random.default_rng(rng)
        aug, resize = sample_image_aug(gen, wh, cfg)
        assert resize == pytest.approx(176 / wh[0])
        # The image's left and right edges, x = 0 and W0 in `image_aug_matrix`'s scaling convention.
        left, right = aug @ np.array([0.0, wh[1] / 2, 1.0]), aug @ np.array([float(wh[0]), wh[1] / 2, 1.0])
        assert left[0] == pytest.approx(0.0, abs=1e-6) and right[0] == pytest.approx(176.0, abs=1e-6)
    absolute = ImageAugConfig(final_hw=(64, 176), resize_lim=(0.11, 0.11), rot_lim_deg=(0.0, 0.0), flip=False)
    assert sample_image_aug(None, (800, 450), absolute)[1] == pytest.approx(0.11)
