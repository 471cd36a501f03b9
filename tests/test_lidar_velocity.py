"""Box velocities from the LiDAR sweeps' motion blur (`perception.model.lidar_velocity`), against scenes built with
a known motion, and the batched measurement against the per-box implementation it replaced
(`tests/lidar_velocity_reference.py`) on those scenes and on random scenes with many boxes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import perception.model.bevfusion as bevfusion
import perception.model.lidar_velocity as lidar_velocity
from deploy.postprocess import PostprocessSpec
from perception.model.bevfusion import DecodeSettings, outputs_to_predictions
from perception.model.lidar_velocity import LidarVelocityConfig, _merge, lidar_box_velocity, refine_velocities
from perception.structures import ATTRIBUTES, DETECTION_CLASSES, MAP_CLASSES, SCENE_TAGS, BEVGrid
from tests import lidar_velocity_reference as reference

SWEEP_DT = np.arange(10) * 0.05  # keyframe + 9 sweeps at 20 Hz, seconds before the keyframe


def _surface_points(rng, centre_xy, size_wlh, yaw, n):
    """n points on the vertical faces of a box (as a LiDAR sees a vehicle), z from 0.2 m above its bottom."""
    w, l, h = size_wlh
    u = rng.uniform(-0.5, 0.5, n)
    side = rng.integers(0, 4, n)
    along = np.where(side < 2, u * l, np.where(side == 2, l / 2, -l / 2))
    across = np.where(side < 2, np.where(side == 0, w / 2, -w / 2), u * w)
    c, s = math.cos(yaw), math.sin(yaw)
    x = centre_xy[0] + along * c - across * s
    y = centre_xy[1] + along * s + across * c
    z = rng.uniform(-h / 2 + 0.2, h / 2, n)
    return np.stack([x, y, z], 1)


def _scene(rng, objects):
    """Sweeps of `objects` [(centre_xy at the keyframe, (w, l, h), yaw, velocity_xy)], with ground points."""
    clouds = []
    for dt in SWEEP_DT:
        for centre, size, yaw, vel in objects:
            then = np.asarray(centre) - np.asarray(vel) * dt  # dt seconds earlier
            xyz = _surface_points(rng, then, size, yaw, 150)
            clouds.append(np.c_[xyz, np.full(len(xyz), 50.0), np.full(len(xyz), dt)])
        ground = np.c_[rng.uniform(-30, 30, (2000, 2)), np.full(2000, -1.0), np.zeros(2000), np.full(2000, dt)]
        clouds.append(ground)
    return torch.from_numpy(np.concatenate(clouds).astype(np.float32))


def _boxes(objects, head_velocity=(0.0, 0.0)):
    rows = [[*centre, 0.0, *size, yaw, *head_velocity] for centre, size, yaw, _ in objects]
    return torch.tensor(rows, dtype=torch.float32)


def test_measures_moving_and_static_objects():
    rng = np.random.default_rng(0)
    car = ((10.0, 5.0), (1.9, 4.6, 1.6), 0.3, (7.0 * math.cos(0.3), 7.0 * math.sin(0.3)))
    reversing = ((-8.0, 12.0), (1.9, 4.6, 1.6), 1.2, (-2.0 * math.cos(1.2), -2.0 * math.sin(1.2)))
    parked = ((3.0, -9.0), (1.9, 4.6, 1.6), -0.7, (0.0, 0.0))
    walker = ((-5.0, -4.0), (0.6, 0.7, 1.7), 2.0, (1.4 * math.cos(2.0), 1.4 * math.sin(2.0)))
    objects = [car, reversing, parked, walker]
    velocity, valid = lidar_box_velocity(_boxes(objects), _scene(rng, objects))
    assert valid.all()
    for (_, _, _, truth), v in zip(objects, velocity.tolist()):
        assert math.dist(v, truth) <= 0.4, (v, truth)  # search grid: 0.25 m/s, 0.025 rad


def test_a_box_turned_back_to_front_gets_the_same_velocity():
    rng = np.random.default_rng(1)
    car = ((12.0, -3.0), (1.9, 4.6, 1.6), 0.0, (6.0, 0.0))
    points = _scene(rng, [car])
    flipped = _boxes([car])
    flipped[0, 6] = math.pi
    velocity, _ = lidar_box_velocity(flipped, points)
    assert velocity[0].tolist() == pytest.approx([6.0, 0.0], abs=0.3)


def test_too_few_points_or_sweeps_is_not_valid():
    rng = np.random.default_rng(2)
    car = ((10.0, 5.0), (1.9, 4.6, 1.6), 0.0, (5.0, 0.0))
    only_keyframe = _scene(rng, [car])
    only_keyframe = only_keyframe[only_keyframe[:, 4] == 0]
    far_away = _boxes([((40.0, 40.0), (1.9, 4.6, 1.6), 0.0, (0, 0))])
    velocity, valid = lidar_box_velocity(torch.cat([_boxes([car]), far_away]), only_keyframe)
    assert not valid.any() and (velocity == 0).all()
    velocity, valid = lidar_box_velocity(torch.zeros(0, 9), only_keyframe)
    assert velocity.shape == (0, 2) and valid.shape == (0,)


def test_a_car_seen_only_from_behind_is_measured_from_a_box_a_little_off():
    # The sensor sits behind a car in its lane, so every point lies on the rear face (as in the synthetic LiDAR).
    # A detector's box that is 0.25 m too far forward, or 0.3 m too short, has none of those points strictly
    # inside it; they are within `keyframe_margin_m` of its end, and the car is measured.
    rng = np.random.default_rng(5)
    w, l, h, speed = 1.9, 4.6, 1.6, 7.0
    clouds = []
    for dt in SWEEP_DT:
        rear_x = 20.0 - speed * dt - l / 2 + 0.03
        n = 80
        clouds.append(np.c_[np.full(n, rear_x), rng.uniform(-w / 2, w / 2, n), rng.uniform(-h / 2 + 0.2, h / 2, n),
                            np.full(n, 50.0), np.full(n, dt)])
    points = torch.from_numpy(np.concatenate(clouds).astype(np.float32))
    truth = _boxes([((20.0, 0.0), (w, l, h), 0.0, (speed, 0.0))])
    forward, short = truth.clone(), truth.clone()
    forward[0, 0] += 0.25
    short[0, 4] -= 0.3
    for boxes in (truth, forward, short):
        velocity, valid = lidar_box_velocity(boxes, points)
        assert bool(valid[0]) and velocity[0].tolist() == pytest.approx([speed, 0.0], abs=0.3)
    _, valid = lidar_box_velocity(forward, points, LidarVelocityConfig(keyframe_margin_m=0.0))
    assert not bool(valid[0])  # what the strict count did


def test_refinement_replaces_only_valid_boxes_of_scored_classes():
    rng = np.random.default_rng(3)
    car = ((10.0, 5.0), (1.9, 4.6, 1.6), 0.0, (5.0, 0.0))
    cone = ((10.0, 5.0), (1.9, 4.6, 1.6), 0.0, (5.0, 0.0))  # same points, but a class whose velocity is not scored
    nowhere = ((-40.0, -40.0), (1.9, 4.6, 1.6), 0.0, (0.0, 0.0))
    boxes = _boxes([car, cone, nowhere], head_velocity=(-1.0, -1.0))
    labels = torch.tensor([DETECTION_CLASSES.index(n) for n in ("car", "traffic_cone", "car")])
    out = refine_velocities(boxes, labels, _scene(rng, [car]), LidarVelocityConfig())
    assert out[0, 7:9].tolist() == pytest.approx([5.0, 0.0], abs=0.3)
    assert out[1, 7:9].tolist() == [-1.0, -1.0] and out[2, 7:9].tolist() == [-1.0, -1.0]
    assert torch.equal(out[:, :7], boxes[:, :7]) and boxes[0, 7] == -1.0  # a new tensor


def test_post_processing_uses_the_points_only_when_enabled_and_present():
    grid = BEVGrid()
    h, w = grid.height, grid.width
    out = {"heatmap": torch.full((2, len(DETECTION_CLASSES), h, w), -10.0), "offset": torch.zeros(2, 2, h, w),
           "z": torch.zeros(2, 1, h, w), "log_size": torch.tensor([1.9, 4.6, 1.6]).log().view(1, 3, 1, 1).expand(2, 3, h, w),
           "rot": torch.zeros(2, 2, h, w), "velocity": torch.zeros(2, 2, h, w),
           "attribute": torch.zeros(2, len(ATTRIBUTES), h, w), "map": torch.zeros(2, len(MAP_CLASSES), h, w),
           "scene": torch.zeros(2, len(SCENE_TAGS))}
    out["rot"][:, 1] = 1.0  # cos(yaw) = 1, sin(yaw) = 0: yaw 0 (the head's rot layout is sin, cos)
    row, col = grid.height // 2 + 6, grid.width // 2 + 12  # a cell centre
    x, y = grid.x_min + (col + 0.5) * grid.cell, grid.y_min + (row + 0.5) * grid.cell
    out["heatmap"][:, DETECTION_CLASSES.index("car"), row, col] = 5.0
    points = _scene(np.random.default_rng(4), [((x, y), (1.9, 4.6, 1.6), 0.0, (4.0, 0.0))])
    on = DecodeSettings(lidar_velocity=LidarVelocityConfig())
    plain, measured = outputs_to_predictions(out, grid, on, [None, points])
    assert len(plain.labels) == 1 and len(measured.labels) == 1
    assert plain.boxes_lidar.tensor[0, 7:9].tolist() == [0.0, 0.0]  # no LiDAR: the head's velocity
    assert measured.boxes_lidar.tensor[0, 7:9].tolist() == pytest.approx([4.0, 0.0], abs=0.3)
    off = outputs_to_predictions(out, grid, DecodeSettings(), [points, points])
    assert all(p.boxes_lidar.tensor[0, 7:9].tolist() == [0.0, 0.0] for p in off)
    # The deploy manifest carries the option.
    spec = PostprocessSpec(grid=grid, decode=on)
    assert PostprocessSpec.from_json(spec.to_json(), grid) == spec
    assert PostprocessSpec.from_json({**spec.to_json(), "lidar_velocity": None}, grid).decode.lidar_velocity is None
    older = {k: v for k, v in spec.to_json()["lidar_velocity"].items()
             if k not in ("silhouette_classes", "silhouette_dilate_m", "silhouette_across_margin_m",
                          "max_reverse_speed", "forward_classes", "merge_m", "axis_fit_classes",
                          "axis_fit_margin_m", "axis_fit_min_points", "axis_fit_steps")}
    assert PostprocessSpec.from_json({**spec.to_json(), "lidar_velocity": older}, grid).decode.lidar_velocity == \
        LidarVelocityConfig()  # fields an older manifest lacks take today's defaults


def test_direction_comes_from_the_points_when_the_box_yaw_is_off():
    """A detector's yaw is off by some degrees: 0.15 rad at 8 m/s would be 1.2 m/s of error if the velocity
    followed the box; the measured one follows the points."""
    rng = np.random.default_rng(5)
    motion = 0.4
    car = ((6.0, -12.0), (1.9, 4.6, 1.6), motion, (8.0 * math.cos(motion), 8.0 * math.sin(motion)))
    points = _scene(rng, [car])
    box = _boxes([car])
    box[0, 6] = motion + 0.15
    velocity, valid = lidar_box_velocity(box, points)
    assert valid[0] and math.dist(velocity[0].tolist(), car[3]) <= 0.4
    along_box_only, _ = lidar_box_velocity(box, points, LidarVelocityConfig(turn_steps=0))
    assert math.dist(along_box_only[0].tolist(), car[3]) > 1.0


@pytest.mark.parametrize("yaw_error", [0.35, -0.45])
def test_the_box_axis_is_refitted_to_the_points_when_the_yaw_is_off(yaw_error):
    """A detector's car box turned by more than the direction search reaches (0.3 rad): the speed search along
    the wrong axis and the direction search around it miss; the axis refitted to the keyframe points finds it."""
    rng = np.random.default_rng(7)
    motion = -0.6
    car = ((9.0, 7.0), (1.9, 4.6, 1.6), motion, (8.0 * math.cos(motion), 8.0 * math.sin(motion)))
    points = _scene(rng, [car])
    box = _boxes([car])
    box[0, 6] = motion + yaw_error
    label = torch.tensor([DETECTION_CLASSES.index("car")])
    velocity, valid = lidar_box_velocity(box, points, LidarVelocityConfig(), label)
    assert bool(valid[0]) and math.dist(velocity[0].tolist(), car[3]) <= 0.4
    unfitted, _ = lidar_box_velocity(box, points, LidarVelocityConfig(axis_fit_classes=()), label)
    assert math.dist(unfitted[0].tolist(), car[3]) > 0.6
    # Without labels no class is refitted.
    unlabelled, _ = lidar_box_velocity(box, points)
    assert unlabelled[0].tolist() == unfitted[0].tolist()


def test_merging_points_into_cells_matches_a_grouping_by_hand():
    rng = np.random.default_rng(8)
    along = rng.uniform(-6.0, 6.0, 400).astype(np.float32)
    dt = rng.choice(SWEEP_DT[:3], 400).astype(np.float32)
    box = np.sort(rng.integers(0, 3, 400))  # three boxes, each counted from its own lowest point
    cell = 0.25
    sweep_times, sweep = np.unique(dt, return_inverse=True)
    cell_box, cells, cell_sweep, count = _merge(torch.from_numpy(box), torch.from_numpy(along),
                                                torch.from_numpy(sweep.astype(np.int64)), len(sweep_times), cell)
    expected: dict[tuple, int] = {}
    for b, a, t in zip(box.tolist(), along.tolist(), dt.tolist()):
        key = (b, t, int((a - float(along[box == b].min())) // cell))
        expected[key] = expected.get(key, 0) + 1
    got = {(b, float(sweep_times[s]), round((a - float(along[box == b].min())) / cell - 0.5)): int(n)
           for b, a, s, n in zip(cell_box.tolist(), cells.tolist(), cell_sweep.tolist(), count.tolist())}
    assert got == expected
    assert cell_box.tolist() == sorted(cell_box.tolist())


def _ray_cast_sweeps(objects, sensor_speed, step_deg=0.3, rings=8):
    """Sweeps of a scanner driving along +x at `sensor_speed` (at the origin at the keyframe), motion-compensated
    into the keyframe frame as the loader gives them: each sweep casts rays at the same azimuths (every
    `step_deg`) from where the sensor was, and keeps the nearest hit on `objects` [(x, y, w, l, vx)] (axis-aligned
    rectangles at the keyframe, moving along x), so a body hides what is behind it."""
    azimuth = np.deg2rad(np.arange(0.0, 360.0, step_deg))
    ray = np.stack([np.cos(azimuth), np.sin(azimuth)], 1)
    clouds = []
    with np.errstate(divide="ignore", invalid="ignore"):
        for dt in SWEEP_DT:
            sensor = np.array([-sensor_speed * dt, 0.0])
            nearest = np.full(len(azimuth), np.inf)
            for x, y, w, l, vx in objects:  # slab test per rectangle
                x = x - vx * dt
                tx = ((x - l / 2 - sensor[0]) / ray[:, 0], (x + l / 2 - sensor[0]) / ray[:, 0])
                ty = ((y - w / 2 - sensor[1]) / ray[:, 1], (y + w / 2 - sensor[1]) / ray[:, 1])
                t_in = np.maximum(np.minimum(*tx), np.minimum(*ty))
                t_out = np.minimum(np.maximum(*tx), np.maximum(*ty))
                hit = (t_out >= t_in) & (t_in > 0) & (t_in < nearest)
                nearest = np.where(hit, t_in, nearest)
            seen = np.isfinite(nearest)
            xy = np.repeat(sensor + nearest[seen, None] * ray[seen], rings, 0)
            z = np.tile(np.linspace(-1.2, 1.4, rings), int(seen.sum()))
            clouds.append(np.c_[xy, z, np.full(len(z), 30.0), np.full(len(z), dt)])
    return torch.from_numpy(np.concatenate(clouds).astype(np.float32))


@pytest.mark.parametrize("speed", [0.0, -8.0, 5.7])
def test_a_truck_and_trailer_beside_a_moving_scanner(speed):
    """A truck and its (wider) trailer in the next lane, seen from the side by a scanner driving at 7.7 m/s: the
    point counts along their side face follow the scanner's beam pattern and the trailer's occlusion edge, which
    move with the scanner, so counting aligns them at the wrong speed (at rest or oncoming); their silhouettes
    give the vehicles' own speed."""
    truck = (4.0, 3.5, 2.4, 6.8, speed)
    trailer = (4.0 - 6.8 / 2 - 0.4 - 9.5 / 2, 3.5, 2.6, 9.5, speed)
    points = _ray_cast_sweeps([truck, trailer], sensor_speed=7.7)
    boxes = torch.tensor([[x, y, 0.1, w, l, 3.0, 0.0, 0.0, 0.0] for x, y, w, l, _ in (truck, trailer)])
    labels = torch.tensor([DETECTION_CLASSES.index("truck"), DETECTION_CLASSES.index("trailer")])
    velocity, valid = lidar_box_velocity(boxes, points, LidarVelocityConfig(silhouette_classes=tuple(labels.tolist())),
                                         labels)
    assert valid.all()
    for v in velocity.tolist():  # a flat side face leaves the direction search little to go on: 0.8 m/s
        assert math.dist(v, (speed, 0.0)) <= 0.8, (v, speed)
    counted, _ = lidar_box_velocity(boxes, points, LidarVelocityConfig(silhouette_classes=()), labels)
    worst = max(math.dist(v, (speed, 0.0)) for v in counted.tolist())
    assert worst <= 0.8 if speed == 5.7 else worst > 2.0


def test_a_truck_and_trailer_whose_boxes_are_turned():
    """The ray-cast truck and trailer at 5.7 and -8 m/s with both boxes turned by 0.3 rad, as a detector's trailer
    boxes often are: each box's axis is refitted to its side face before the silhouettes are compared."""
    for speed in (5.7, -8.0):
        truck = (4.0, 3.5, 2.4, 6.8, speed)
        trailer = (4.0 - 6.8 / 2 - 0.4 - 9.5 / 2, 3.5, 2.6, 9.5, speed)
        points = _ray_cast_sweeps([truck, trailer], sensor_speed=7.7)
        boxes = torch.tensor([[x, y, 0.1, w, l, 3.0, -0.3, 0.0, 0.0] for x, y, w, l, _ in (truck, trailer)])
        labels = torch.tensor([DETECTION_CLASSES.index("truck"), DETECTION_CLASSES.index("trailer")])
        velocity, valid = lidar_box_velocity(boxes, points, LidarVelocityConfig(), labels)
        errors = [math.dist(v, (speed, 0.0)) for v in velocity.tolist()]
        assert valid.all() and max(errors) <= 1.3, errors  # a flat side face: the direction search has little to go on
        unfitted, _ = lidar_box_velocity(boxes, points, LidarVelocityConfig(axis_fit_classes=()), labels)
        assert max(math.dist(v, (speed, 0.0)) for v in unfitted.tolist()) > 4.0


# The batched measurement against the per-box implementation it replaced (issue 38). Every step of both is the same
# float32 / float64 arithmetic on the same values, so the velocities agree to float rounding: the only sums whose
# order differs are the axis fit's float64 closeness sums (relative 1e-16, against a 1e-9 tie tolerance), and the
# cos / sin of the refitted heading (one float32 ulp).
TOLERANCE = 1e-4  # m/s


def _assert_same(got, want):
    (velocity, valid), (ref_velocity, ref_valid) = got, want
    assert torch.equal(valid.cpu(), ref_valid)
    assert (velocity.cpu() - ref_velocity).abs().max().item() <= TOLERANCE if len(valid) else True


@pytest.mark.parametrize("test, kwargs", [
    pytest.param(test_measures_moving_and_static_objects, {}, id="moving-reversing-parked-walker"),
    pytest.param(test_a_box_turned_back_to_front_gets_the_same_velocity, {}, id="back-to-front"),
    pytest.param(test_too_few_points_or_sweeps_is_not_valid, {}, id="too-few-points"),
    pytest.param(test_a_car_seen_only_from_behind_is_measured_from_a_box_a_little_off, {}, id="rear-face-only"),
    pytest.param(test_refinement_replaces_only_valid_boxes_of_scored_classes, {}, id="refinement-classes"),
    pytest.param(test_post_processing_uses_the_points_only_when_enabled_and_present, {}, id="post-processing"),
    pytest.param(test_direction_comes_from_the_points_when_the_box_yaw_is_off, {}, id="yaw-off"),
    pytest.param(test_the_box_axis_is_refitted_to_the_points_when_the_yaw_is_off, {"yaw_error": 0.35},
                 id="turned-car-0.35"),
    pytest.param(test_the_box_axis_is_refitted_to_the_points_when_the_yaw_is_off, {"yaw_error": -0.45},
                 id="turned-car--0.45"),
    *[pytest.param(test_a_truck_and_trailer_beside_a_moving_scanner, {"speed": v}, id=f"truck-trailer-{v:g}")
      for v in (0.0, -8.0, 5.7)],
    pytest.param(test_a_truck_and_trailer_whose_boxes_are_turned, {}, id="truck-trailer-turned"),
])
def test_batched_equals_the_per_box_reference_on_the_built_scenes(test, kwargs, monkeypatch):
    """Each built scene above is measured by both implementations (every call the test makes, with its boxes,
    labels and settings), which must agree."""
    calls = []

    def velocity(boxes, points, cfg=LidarVelocityConfig(), labels=None):
        got = lidar_velocity.lidar_box_velocity(boxes, points, cfg, labels)
        _assert_same(got, reference.lidar_box_velocity(boxes, points, cfg, labels))
        calls.append(len(boxes))
        return got

    def refine(boxes, labels, points, cfg):
        got = lidar_velocity.refine_velocities(boxes, labels, points, cfg)
        want = reference.refine_velocities(boxes, labels, points, cfg)
        assert (got - want).abs().max().item() <= TOLERANCE
        calls.append(len(boxes))
        return got

    monkeypatch.setitem(globals(), "lidar_box_velocity", velocity)
    monkeypatch.setitem(globals(), "refine_velocities", refine)
    monkeypatch.setattr(bevfusion, "refine_velocities", refine)
    test(**kwargs)
    assert calls


SIZES = {"car": (1.9, 4.6, 1.6), "truck": (2.5, 7.0, 3.0), "bus": (2.9, 11.0, 3.4), "trailer": (2.6, 10.0, 3.6),
         "construction_vehicle": (2.8, 6.0, 3.0), "pedestrian": (0.6, 0.7, 1.7), "motorcycle": (0.8, 2.1, 1.5),
         "bicycle": (0.6, 1.7, 1.3), "barrier": (2.5, 0.5, 1.0), "traffic_cone": (0.4, 0.4, 0.8)}


def _random_scene(seed, n_boxes, sweep_dt=(0.0, 0.05, 0.1, 0.3, 0.6)):
    """Boxes as a detector might give them for a random scene of `n_boxes` objects of every class (centres within
    45 m, a third parked, some reversing), with their sweeps at `sweep_dt`: each box perturbed (centre, size, yaw;
    one in ten back to front), and one in eight boxes a false positive where there is no object."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, len(DETECTION_CLASSES), n_boxes)
    objects, boxes = [], []
    for label in labels.tolist():
        size = np.asarray(SIZES[DETECTION_CLASSES[label]]) * rng.uniform(0.9, 1.1, 3)
        centre, yaw = rng.uniform(-45, 45, 2), rng.uniform(-math.pi, math.pi)
        speed = 0.0 if rng.random() < 0.33 else rng.uniform(0.5, 14.0) * (-1 if rng.random() < 0.1 else 1)
        heading = yaw + rng.normal(0, 0.05)
        vel = (speed * math.cos(heading), speed * math.sin(heading))
        if rng.random() < 0.125:
            centre = rng.uniform(-45, 45, 2)  # a false positive: no object there
        else:
            objects.append((tuple(centre), tuple(size), yaw, vel))
        box_yaw = yaw + rng.normal(0, 0.15) + (math.pi if rng.random() < 0.1 else 0.0)
        boxes.append([*(centre + rng.normal(0, 0.2, 2)), size[2] / 2 - 1.0, *(size * rng.uniform(0.9, 1.1, 3)),
                      box_yaw, 0.0, 0.0])
    clouds = []
    for dt in sweep_dt:
        for centre, (w, l, h), yaw, vel in objects:
            then = np.asarray(centre) - np.asarray(vel) * dt
            xyz = _surface_points(rng, then, (w, l, h), yaw, int(rng.integers(20, 120)))
            xyz[:, 2] += h / 2 - 1.0  # standing on the ground at z = -1
            clouds.append(np.c_[xyz, np.full(len(xyz), 40.0), np.full(len(xyz), dt)])
        ground = np.c_[rng.uniform(-50, 50, (3000, 2)), rng.normal(-1.0, 0.03, 3000), np.zeros(3000),
                       np.full(3000, dt)]
        clouds.append(ground)
    points = torch.from_numpy(np.concatenate(clouds).astype(np.float32))
    return torch.tensor(boxes, dtype=torch.float32), torch.from_numpy(labels), points


@pytest.mark.parametrize("seed, n_boxes, cfg", [
    (0, 60, LidarVelocityConfig()),
    (1, 200, LidarVelocityConfig()),
    (2, 120, LidarVelocityConfig(max_reverse_speed=1.0, turn_steps=9, silhouette_classes=(1, 2, 3, 4))),
])
def test_batched_equals_the_per_box_reference_on_random_scenes(seed, n_boxes, cfg):
    boxes, labels, points = _random_scene(seed, n_boxes)
    got = lidar_box_velocity(boxes, points, cfg, labels)
    _assert_same(got, reference.lidar_box_velocity(boxes, points, cfg, labels))
    assert got[1].float().mean() > 0.4  # most boxes measured: the comparison is not vacuous
    unlabelled = lidar_box_velocity(boxes, points, cfg)
    _assert_same(unlabelled, reference.lidar_box_velocity(boxes, points, cfg))


def test_chunked_boxes_give_the_same_velocities(monkeypatch):
    """Tiny memory limits split every step into many chunks of boxes (and of candidate points) without changing a
    velocity."""
    boxes, labels, points = _random_scene(3, 40)
    whole = lidar_box_velocity(boxes, points, LidarVelocityConfig(), labels)
    monkeypatch.setattr(lidar_velocity, "_MAX_ELEMENTS", 3000)
    monkeypatch.setattr(lidar_velocity, "_CPU_CHUNK_ELEMENTS", 3000)
    monkeypatch.setattr(lidar_velocity, "_MAX_CANDIDATES", 500)
    chunked = lidar_box_velocity(boxes, points, LidarVelocityConfig(), labels)
    assert torch.equal(whole[0], chunked[0]) and torch.equal(whole[1], chunked[1])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_runs_on_the_boxes_device():
    """On CUDA boxes the measurement runs on the GPU and matches the per-box reference on the CPU."""
    boxes, labels, points = _random_scene(4, 150)
    got = lidar_box_velocity(boxes.cuda(), points.cuda(), LidarVelocityConfig(), labels.cuda())
    assert got[0].is_cuda and got[1].is_cuda
    _assert_same(got, reference.lidar_box_velocity(boxes, points, LidarVelocityConfig(), labels))
    out = refine_velocities(boxes.cuda(), labels.cuda(), points, LidarVelocityConfig())  # points on the CPU
    assert out.is_cuda
    want = reference.refine_velocities(boxes, labels, points, LidarVelocityConfig())
    assert (out.cpu() - want).abs().max() <= TOLERANCE
