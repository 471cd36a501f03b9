"""Radar encoder: the PointPillars encoder of `fusion.lidar` over radar columns.

Radar points (Batch.points_radar, (sum M_b, 7): x, y, z, rcs, vx_comp, vy_comp, dt) have unreliable height,
so the point features are x, y, rcs (dBsm), ego-motion-compensated velocity (m/s, LIDAR_TOP) and time lag
(s), plus the usual pillar-mean and pillar-centre offsets.
"""

from __future__ import annotations

from fusion.lidar import PillarEncoder, PillarVoxelizer
from perception.structures import BEVGrid

# Columns of Batch.points_radar used as features: x, y, rcs, vx_comp, vy_comp, dt (z is only used for binning).
RADAR_FEATURE_COLUMNS: tuple[int, ...] = (0, 1, 3, 4, 5, 6)


class RadarEncoder(PillarEncoder):
    """`PillarEncoder` over radar points (x, y, rcs, vx_comp, vy_comp, dt)."""

    @staticmethod
    def make_voxelizer(grid: BEVGrid, *, max_points_per_pillar: int, max_pillars: int) -> PillarVoxelizer:
        return PillarVoxelizer(grid=grid, feature_columns=RADAR_FEATURE_COLUMNS,
                               max_points_per_pillar=max_points_per_pillar, max_pillars=max_pillars)
