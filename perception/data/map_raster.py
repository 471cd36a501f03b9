"""BEV map segmentation targets from the nuScenes map expansion, on the model's BEVGrid.

Frame conventions (checked by tests/test_dataset.py against shapely point-in-polygon on global coordinates):
  - `NuScenesMap.get_map_mask(patch_box=(x_c, y_c, h, w), patch_angle, ...)` rotates the map by -patch_angle
    about (x_c, y_c), so the patch's local x axis points along `patch_angle` (degrees, counter-clockwise from
    global +x = east). Row 0 of the mask is the patch's min-y edge and column 0 its min-x edge, which matches
    `BEVGrid` (rows along +y, columns along +x) without a transpose.
  - cv2 fills a pixel when its centre, at integer canvas coordinates, is inside. Canvas coordinate j is the
    patch-local coordinate -w/2 + j * cell, while grid column j is centred at x_min + (j + 0.5) * cell, so the
    patch centre is put half a cell past the grid centre.
  - With a BEV augmentation `lidar_aug` (a similarity, possibly a reflection), the mask is rendered directly in
    the augmented frame: the patch is the augmented grid mapped back through `lidar_aug^-1`, and a reflection
    is undone by reversing the columns. Nothing is resampled.

`divider` is road_divider or lane_divider. Line layers are drawn like the devkit's `_line_geom_to_mask`
(2 px wide), but also when clipping gives a MultiLineString (the devkit raises TypeError there with
Shapely 2).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import cv2
import numpy as np
from shapely import affinity

from perception.errors import DataError
from perception.structures import MAP_CLASSES, BEVGrid

log = logging.getLogger(__name__)

_POLYGON_LAYERS = ("drivable_area", "ped_crossing", "walkway", "stop_line", "carpark_area")
_LINE_LAYERS = ("road_divider", "lane_divider")


class MapRasterizer:
    """Renders `MAP_CLASSES` masks for one sample. Each `NuScenesMap` is loaded on first use, in the process
    that uses it (so DataLoader workers each hold only the maps of the locations they render)."""

    def __init__(self, dataroot: str | Path, grid: BEVGrid):
        self.dataroot = str(dataroot)
        self.grid = grid
        self._maps: dict[str, object] = {}

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_maps"] = {}  # never ship loaded maps to workers or pickles
        return state

    def path_of(self, location: str) -> Path:
        """The map expansion file of a location (it may not exist: the expansion is a separate download)."""
        return Path(self.dataroot) / "maps" / "expansion" / f"{location}.json"

    def has(self, location: str) -> bool:
        """Whether the dataroot holds the map expansion of `location` ("" : unknown location -> False)."""
        return bool(location) and self.path_of(location).is_file()

    def _map(self, location: str):
        if location not in self._maps:
            from nuscenes.map_expansion.map_api import NuScenesMap  # heavy: the devkit takes ~1 s to import

            path = self.path_of(location)
            if not path.exists():
                raise DataError(f"map expansion for location {location!r} not found", path=path)
            log.debug("loading map expansion %s", path)
            try:
                self._maps[location] = NuScenesMap(dataroot=self.dataroot, map_name=location)
            except Exception as exc:  # the devkit raises JSON, Key and Assertion errors for a bad file
                raise DataError(f"map expansion unreadable ({type(exc).__name__}: {exc})", path=path) from None
        return self._maps[location]

    def render(self, location: str, lidar2global: np.ndarray, lidar_aug: np.ndarray | None = None,
               token: str | None = None, grid: BEVGrid | None = None) -> np.ndarray:
        """Map masks on the grid, in the augmented LIDAR_TOP frame.

        Args:
            location: map name (`log.location`).
            lidar2global: (4, 4) float64, keyframe LIDAR_TOP -> global.
            lidar_aug: (4, 4) float64 similarity LIDAR_TOP -> augmented LIDAR_TOP, or None for identity.
            grid: the grid to render on (None: the rasteriser's own).

        Returns: (len(MAP_CLASSES), H, W) uint8 in {0, 1}; [c, i, j] covers the cell centred at
            x = x_min + (j + 0.5) cell, y = y_min + (i + 0.5) cell of the augmented frame.
        """
        g = self.grid if grid is None else grid
        A = np.eye(4) if lidar_aug is None else np.asarray(lidar_aug, dtype=np.float64)
        L2 = A[:2, :2]
        scale = math.sqrt(abs(float(np.linalg.det(L2))))
        Q = L2 / scale
        reflect = float(np.linalg.det(Q)) < 0
        F = np.diag([-1.0, 1.0]) if reflect else np.eye(2)
        Rr = F @ Q  # a proper rotation: augmented offsets r = F (q - t) relate to lidar p by r = s Rr p
        t = A[:2, 3]
        # Grid of the augmented frame expressed in r = F (q - t); an x-reflection flips the x range.
        xs = np.array([g.x_min - t[0], g.x_max - t[0]])
        ys = np.array([g.y_min - t[1], g.y_max - t[1]])
        if reflect:
            xs = -xs[::-1]
        r_centre = np.array([xs.mean() + g.cell / 2, ys.mean() + g.cell / 2])
        p_centre = Rr.T @ r_centre / scale  # LIDAR_TOP (x, y) of the patch centre
        x_axis_lidar = Rr.T @ np.array([1.0, 0.0])
        R_l2g = lidar2global[:3, :3]
        centre_g = lidar2global @ np.array([p_centre[0], p_centre[1], 0.0, 1.0])
        axis_g = R_l2g @ np.array([x_axis_lidar[0], x_axis_lidar[1], 0.0])
        angle_deg = math.degrees(math.atan2(axis_g[1], axis_g[0]))
        patch_box = (float(centre_g[0]), float(centre_g[1]), g.height * g.cell / scale, g.width * g.cell / scale)
        canvas = (g.height, g.width)

        nmap = self._map(location)
        out = np.zeros((len(MAP_CLASSES), g.height, g.width), np.uint8)
        poly = self._polygon_masks(nmap, patch_box, angle_deg, canvas, token)
        for k, name in enumerate(_POLYGON_LAYERS):
            out[MAP_CLASSES.index(name)] = poly[k]
        out[MAP_CLASSES.index("divider")] = self._line_mask(nmap, patch_box, angle_deg, canvas)
        if reflect:
            out = out[:, :, ::-1].copy()
        return out

    @staticmethod
    def _polygon_masks(nmap, patch_box, angle_deg, canvas, token) -> np.ndarray:
        """(5, H, W) uint8 via `get_map_mask`. A polygon edge lying exactly on the patch boundary can clip to a
        GeometryCollection that the devkit cannot fill; then the patch is nudged by 1 mm and tried again."""
        for attempt in range(3):
            box = (patch_box[0] + 1e-3 * attempt, patch_box[1] + 1e-3 * attempt, patch_box[2], patch_box[3])
            try:
                return nmap.get_map_mask(box, angle_deg, list(_POLYGON_LAYERS), canvas_size=canvas)
            except (AttributeError, TypeError, ValueError) as exc:
                err = exc
        raise DataError(f"map {nmap.map_name}: get_map_mask failed at {patch_box}: {err}", token=token)

    @staticmethod
    def _line_mask(nmap, patch_box, angle_deg, canvas) -> np.ndarray:
        """(H, W) uint8: road and lane dividers, drawn like the devkit's `_line_geom_to_mask`."""
        ph, pw = patch_box[2], patch_box[3]
        H, W = canvas
        mask = np.zeros(canvas, np.uint8)
        local = nmap.explorer.get_patch_coord((0.0, 0.0, ph, pw))
        for _, lines in nmap.explorer.get_map_geom(patch_box, angle_deg, list(_LINE_LAYERS)):
            for line in lines:
                clipped = line.intersection(local)
                if clipped.is_empty:
                    continue
                clipped = affinity.affine_transform(clipped, [W / pw, 0.0, 0.0, H / ph, W / 2.0, H / 2.0])
                parts = getattr(clipped, "geoms", [clipped])
                for part in parts:
                    if part.geom_type != "LineString":
                        continue
                    coords = np.asarray(part.coords, np.int32).reshape(-1, 1, 2)
                    cv2.polylines(mask, [coords], False, 1, 2)
        return mask
