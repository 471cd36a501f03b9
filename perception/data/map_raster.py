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

Two renderers:
  - `render`: exact, through the devkit's polygon clipping per sample (~25 ms per sample on the synthetic set).
    Evaluation targets always come from it.
  - `render_cached`: training targets from a `LocationRaster`, each location's layers rasterised once at
    `RASTER_OVERSAMPLE` times the grid's resolution into the cache (never the dataroot) and memory-mapped, so
    DataLoader workers share its pages; per sample the cell centres are looked up (nearest raster pixel, well
    under 1 ms). It imitates what `render` does on the output grid (outlines filled, 2 px lines, truncated line
    vertices) without reproducing its integer rounding, so cells near boundaries can differ;
    tests/test_map_raster.py bounds the per-class IoU against the exact renderer.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from shapely import affinity

from perception.cache import atomic_write, cache_path
from perception.errors import DataError
from perception.structures import MAP_CLASSES, BEVGrid

log = logging.getLogger(__name__)

_POLYGON_LAYERS = ("drivable_area", "ped_crossing", "walkway", "stop_line", "carpark_area")
_LINE_LAYERS = ("road_divider", "lane_divider")
# `render_cached`: raster pixels per grid cell along each axis; widths in grid cells of the divider lines and of
# the band drawn along polygon outlines. Chosen to agree best with `render` (tests/test_map_raster.py): the
# devkit's 2 px lines and filled outlines on the output grid are wider than their geometry.
RASTER_OVERSAMPLE = 4
RASTER_LINE_CELLS = 2.5
RASTER_EDGE_CELLS = 1.0
_RASTER_FORMAT = 1  # bump when the raster's content or layout changes (a new cache key)


@dataclass(frozen=True)
class LocationRaster:
    """All `MAP_CLASSES` of one location on a global raster: `bits[r, c]` (uint8) has bit k set when class
    `MAP_CLASSES[k]` covers the pixel whose centre is global (x0 + (c + 0.5) res, y0 + (r + 0.5) res), metres.
    `bits` is usually a read-only memory map of the cached `.npy`."""

    bits: np.ndarray
    x0: float
    y0: float
    res: float

    def lookup(self, xy_global: np.ndarray) -> np.ndarray:
        """(..., 2) float64 global x, y (m) -> (...) uint8 class bits of the raster pixel holding each point
        (0 outside the raster)."""
        c = np.floor((xy_global[..., 0] - self.x0) / self.res).astype(np.int64)
        r = np.floor((xy_global[..., 1] - self.y0) / self.res).astype(np.int64)
        h, w = self.bits.shape
        inside = (r >= 0) & (r < h) & (c >= 0) & (c < w)
        out = np.zeros(c.shape, np.uint8)
        out[inside] = self.bits[r[inside], c[inside]]
        return out

    def sample_grid(self, cell2global: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
        """`lookup` of the points of an affine grid in one pass: (H, W) uint8 class bits of the raster pixel
        holding global (x, y) = cell2global @ (j, i, 1) for each row i and column j (0 outside the raster).
        cell2global: (2, 3) float64. Agrees with `lookup` except within ~1e-3 pixel of a pixel edge (OpenCV's
        nearest-neighbour warp rounds coordinates in 1/1024 pixel steps)."""
        # global -> raster coordinates with pixel centres at integers, so that nearest = the holding pixel
        to_px = np.array([[1.0 / self.res, 0.0, -self.x0 / self.res - 0.5],
                          [0.0, 1.0 / self.res, -self.y0 / self.res - 0.5]])
        cell2px = to_px[:, :2] @ cell2global
        cell2px[:, 2] += to_px[:, 2]
        H, W = hw
        # Warp only the raster window the grid covers (plus a pixel): OpenCV's warp refuses sources of 32767
        # pixels or more on a side (a large city at a fine grid), and reads less of the memory-mapped raster.
        corners = cell2px @ np.array([[0, W, 0, W], [0, 0, H, H], [1, 1, 1, 1]], np.float64)  # (2, 4): c, r
        h, w = self.bits.shape
        c0, r0 = (max(0, int(np.floor(corners[k].min())) - 1) for k in (0, 1))
        c1, r1 = min(w, int(np.ceil(corners[0].max())) + 2), min(h, int(np.ceil(corners[1].max())) + 2)
        if c1 <= c0 or r1 <= r0:
            return np.zeros((H, W), np.uint8)
        cell2px[:, 2] -= (c0, r0)
        return cv2.warpAffine(np.asarray(self.bits[r0:r1, c0:c1]), cell2px, (W, H),
                              flags=cv2.INTER_NEAREST | cv2.WARP_INVERSE_MAP, borderMode=cv2.BORDER_CONSTANT,
                              borderValue=0)


def rasterize_location(nmap, res: float, line_width_m: float, edge_width_m: float) -> LocationRaster:
    """Rasterise every `MAP_CLASSES` layer of a loaded `NuScenesMap` at `res` m per pixel over the bounds of its
    nodes. Polygons as the devkit fills them (exterior 1, then holes 0, layer by layer; invalid non-drivable
    polygons skipped, as `_get_layer_polygon` does), each ring also drawn `edge_width_m` wide in the same value:
    the devkit's `cv2.fillPoly` on the output grid sets every cell its outline touches, which grows a polygon
    by about half a cell; divider lines `line_width_m` wide."""
    nodes = np.array([(n["x"], n["y"]) for n in nmap.node], np.float64).reshape(-1, 2)
    if len(nodes) == 0:
        return LocationRaster(np.zeros((1, 1), np.uint8), 0.0, 0.0, res)
    pad = line_width_m + res
    x0, y0 = nodes.min(0) - pad
    x1, y1 = nodes.max(0) + pad
    w, h = int(math.ceil((x1 - x0) / res)), int(math.ceil((y1 - y0) / res))
    shift = 3  # cv2 sub-pixel bits: vertices at 1/8 pixel

    def to_px(coords) -> np.ndarray:  # global (x, y) -> cv2 coordinates, integer pixel = pixel centre
        xy = np.asarray(coords, np.float64)[:, :2]
        uv = (xy - (x0, y0)) / res - 0.5
        return np.round(uv * (1 << shift)).astype(np.int32).reshape(-1, 1, 2)

    edge_px = max(1, int(round(edge_width_m / res)))
    bits = np.zeros((h, w), np.uint8)
    layer = np.zeros((h, w), np.uint8)
    for name in _POLYGON_LAYERS:
        layer[:] = 0
        for record in getattr(nmap, name):
            tokens = record["polygon_tokens"] if name == "drivable_area" else [record["polygon_token"]]
            for token in tokens:
                polygon = nmap.extract_polygon(token)
                if name != "drivable_area" and not polygon.is_valid:
                    continue
                if polygon.is_empty:
                    continue
                outer = [to_px(polygon.exterior.coords)]
                cv2.fillPoly(layer, outer, 1, lineType=cv2.LINE_8, shift=shift)
                cv2.polylines(layer, outer, True, 1, edge_px, lineType=cv2.LINE_8, shift=shift)
                holes = [to_px(ring.coords) for ring in polygon.interiors]
                if holes:
                    cv2.fillPoly(layer, holes, 0, lineType=cv2.LINE_8, shift=shift)
                    cv2.polylines(layer, holes, True, 0, edge_px, lineType=cv2.LINE_8, shift=shift)
        bits |= layer << MAP_CLASSES.index(name)
    layer[:] = 0
    thickness = max(1, int(round(line_width_m / res)))
    for name in _LINE_LAYERS:
        for record in getattr(nmap, name):
            line = nmap.extract_line(record["line_token"])
            if line.is_empty:
                continue
            cv2.polylines(layer, [to_px(line.coords)], False, 1, thickness, lineType=cv2.LINE_8, shift=shift)
    bits |= layer << MAP_CLASSES.index("divider")
    return LocationRaster(bits, float(x0), float(y0), float(res))


class MapRasterizer:
    """Renders `MAP_CLASSES` masks for one sample. Each `NuScenesMap` is loaded on first use, in the process
    that uses it (so DataLoader workers each hold only the maps of the locations they render)."""

    def __init__(self, dataroot: str | Path, grid: BEVGrid):
        self.dataroot = str(dataroot)
        self.grid = grid
        self._maps: dict[str, object] = {}
        self._rasters: dict[tuple[str, float], LocationRaster] = {}

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_maps"] = {}  # never ship loaded maps to workers or pickles
        state["_rasters"] = {}  # workers map the cached files themselves (shared pages)
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

    def raster_path(self, location: str, grid: BEVGrid | None = None) -> Path:
        """The cache file of `location`'s raster for `grid` (keyed by the map file's size and mtime)."""
        g = self.grid if grid is None else grid
        path = self.path_of(location)
        try:
            st = path.stat()
        except OSError as exc:
            raise DataError(f"map expansion for location {location!r} not readable ({exc.strerror or exc})",
                            path=path) from None
        key = {"format": _RASTER_FORMAT, "map_file": str(path.resolve()), "size": st.st_size,
               "mtime_ns": st.st_mtime_ns, "res": g.cell / RASTER_OVERSAMPLE,
               "line_width_m": RASTER_LINE_CELLS * g.cell, "edge_width_m": RASTER_EDGE_CELLS * g.cell,
               "classes": list(MAP_CLASSES)}
        return cache_path("map_raster", key, ".npy")

    def raster(self, location: str, grid: BEVGrid | None = None) -> LocationRaster:
        """`location`'s `LocationRaster` for `grid`: memory-mapped from the cache, built there first if absent
        (a few seconds per real nuScenes location; the file is written atomically, so concurrent builders are
        safe)."""
        g = self.grid if grid is None else grid
        res = g.cell / RASTER_OVERSAMPLE
        if (location, res) in self._rasters:
            return self._rasters[(location, res)]
        path = self.raster_path(location, g)
        meta_path = path.with_suffix(".meta.json")
        if not (path.is_file() and meta_path.is_file()):
            log.info("rasterising the %s map at %.3g m/pixel into %s (once per location and grid cell)",
                     location, res, path.parent)
            built = rasterize_location(self._map(location), res, RASTER_LINE_CELLS * g.cell,
                                       RASTER_EDGE_CELLS * g.cell)
            with atomic_write(path) as f:
                np.save(f, built.bits)
            with atomic_write(meta_path) as f:
                f.write(json.dumps({"x0": built.x0, "y0": built.y0, "res": built.res}).encode())
        try:
            meta = json.loads(meta_path.read_text())
            bits = np.load(path, mmap_mode="r")
        except (OSError, ValueError) as exc:
            raise DataError(f"cached map raster unreadable ({exc}); delete it to rebuild", path=path) from None
        raster = LocationRaster(bits, float(meta["x0"]), float(meta["y0"]), float(meta["res"]))
        self._rasters[(location, res)] = raster
        return raster

    def render_cached(self, location: str, lidar2global: np.ndarray, lidar_aug: np.ndarray | None = None,
                      token: str | None = None, grid: BEVGrid | None = None) -> np.ndarray:
        """As `render` (same arguments, frames and output), from the location's cached `LocationRaster`: each
        cell takes the classes of the raster pixel under its centre."""
        g = self.grid if grid is None else grid
        A = np.eye(4) if lidar_aug is None else np.asarray(lidar_aug, dtype=np.float64)
        # augmented -> LIDAR_TOP (the xy block of a similarity about z), then LIDAR_TOP -> global as a rotation
        # by the heading of the LiDAR's x axis (as `render` orients its patch) and the LiDAR origin.
        axis = lidar2global[:2, 0]
        yaw = math.atan2(axis[1], axis[0])
        c, s = math.cos(yaw), math.sin(yaw)
        aug2global = np.array([[c, -s], [s, c]]) @ np.linalg.inv(A[:2, :2])
        origin = lidar2global[:2, 3] - aug2global @ A[:2, 3]
        raster = self.raster(location, g)

        def cells(offset_x: float, offset_y: float) -> np.ndarray:  # (j, i, 1) -> global xy of cell points
            cell2aug = np.array([[g.cell, 0.0, g.x_min + (0.5 + offset_x) * g.cell],
                                 [0.0, g.cell, g.y_min + (0.5 + offset_y) * g.cell]])
            cell2global = aug2global @ cell2aug
            cell2global[:, 2] += origin
            return raster.sample_grid(cell2global, (g.height, g.width))

        bits = cells(0.0, 0.0)
        shifts = np.arange(len(MAP_CLASSES), dtype=np.uint8)[:, None, None]
        out = (bits[None] >> shifts) & 1
        # `render` truncates divider vertices to whole cells of its (unreflected) patch, drawing each line half a
        # cell towards lower patch coordinates on average: probe the dividers half a cell the other way.
        sx = -1.0 if float(np.linalg.det(A[:2, :2])) < 0 else 1.0
        k = MAP_CLASSES.index("divider")
        out[k] = (cells(0.5 * sx, 0.5) >> k) & 1
        return out

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
