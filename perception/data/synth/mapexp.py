"""Map files: the map expansion JSON (v1.3 layout that `NuScenesMap` loads) and the semantic-prior PNG.

Polygons are written as valid polygons (holes where the drivable area or a walkway encloses one) and dividers
as straight 2-node lines, which the devkit's Shapely 2.0
clipping handles (see shared/docs/nuscenes-format.md, pitfalls 7 and 8).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import cv2
import numpy as np
from shapely.geometry import Polygon

from perception.data.synth.names import MAP_PNG, token

PRIOR_RES = 0.1  # metres per pixel of the semantic prior (fixed by the devkit's MapMask)
# The polygon layers of a scene's map geometry (`generate._map_geometry`), each a list of (exterior, holes).
POLYGON_LAYERS = ("drivable_area", "road_segment", "lane", "ped_crossing", "walkway", "stop_line", "carpark_area")


def coarsen(geo: dict, tolerance: float) -> dict:
    """A copy of one scene's map geometry (`generate._map_geometry`, global metres) with every polygon ring
    simplified (Douglas-Peucker within `tolerance` metres, topology kept); lines, flags and lane edges as they are.

    The generator samples curves and straight edges densely (about 6,000 polygon nodes per scene); at 0.25 m a
    scene keeps about 5% of them, which keeps a trainval-sized tables-only map expansion small.
    """
    out = dict(geo)
    for layer in POLYGON_LAYERS:
        polys = []
        for exterior, holes in geo[layer]:
            p = Polygon(exterior, holes).simplify(tolerance, preserve_topology=True)
            if p.geom_type != "Polygon" or p.is_empty or not p.is_valid:
                polys.append((exterior, holes))  # keep a ring the simplification would break
                continue
            polys.append((np.asarray(p.exterior.coords)[:-1], [np.asarray(h.coords)[:-1] for h in p.interiors]))
        out[layer] = polys
    return out


class _MapBuilder:
    def __init__(self, seed: int, location: str):
        self.seed, self.location = seed, location
        self.n = 0
        self.layers: dict[str, list] = {
            k: []
            for k in ("node", "line", "polygon", "drivable_area", "road_segment", "road_block", "lane", "ped_crossing", "walkway", "stop_line", "carpark_area", "road_divider", "lane_divider", "traffic_light", "lane_connector")
        }

    def tok(self, kind: str) -> str:
        self.n += 1
        return token(self.seed, "map", self.location, kind, self.n)

    def nodes(self, pts: np.ndarray) -> list[str]:
        out = []
        for x, y in pts:
            t = self.tok("node")
            self.layers["node"].append({"token": t, "x": round(float(x), 4), "y": round(float(y), 4)})
            out.append(t)
        return out

    def polygon(self, poly) -> str:
        """A polygon record from (exterior (P, 2), [holes (Q, 2)]) in global metres."""
        exterior, holes = poly
        t = self.tok("polygon")
        self.layers["polygon"].append({"token": t, "exterior_node_tokens": self.nodes(exterior), "holes": [{"node_tokens": self.nodes(h)} for h in holes]})
        return t

    def line(self, pts: np.ndarray) -> tuple[str, list[str]]:
        t = self.tok("line")
        nodes = self.nodes(pts)
        self.layers["line"].append({"token": t, "node_tokens": nodes})
        return t, nodes

    def add(self, layer: str, record: dict) -> str:
        t = self.tok(layer)
        self.layers[layer].append({"token": t, **record})
        return t


def write_maps(root: Path, location: str, scenes: list[dict], canvas: tuple[float, float], seed: int, prior_res: float = PRIOR_RES) -> str:
    """Write `maps/expansion/<location>.json` and the semantic-prior PNG for the scenes on this map.

    scenes: per scene, layer -> list of (P, 2) global polygons / (2, 2) segments (`generate._map_geometry`);
    canvas: (width, height) of the map in metres; prior_res: metres per PNG pixel (the devkit's `MapMask` reads
    PRIOR_RES; a coarser one keeps a trainval-sized tables-only map small). Returns the PNG's file name
    (relative to `maps/`).
    """
    mb = _MapBuilder(seed, location)
    for geo in scenes:
        da_polys = [mb.polygon(p) for p in geo["drivable_area"]]
        da = mb.add("drivable_area", {"polygon_tokens": da_polys})
        segs = []
        for p, inter in zip(geo["road_segment"], geo["road_segment_is_intersection"]):
            segs.append(mb.add("road_segment", {"polygon_token": mb.polygon(p), "is_intersection": inter, "drivable_area_token": da}))
        for p, (from_edge, to_edge) in zip(geo["lane"], geo["lane_edges"]):
            from_line, _ = mb.line(from_edge)
            to_line, _ = mb.line(to_edge)
            mb.add("lane", {"polygon_token": mb.polygon(p), "lane_type": "CAR", "from_edge_line_token": from_line, "to_edge_line_token": to_line, "left_lane_divider_segments": [], "right_lane_divider_segments": []})
        crossings = []
        for p in geo["ped_crossing"]:
            crossings.append(mb.add("ped_crossing", {"polygon_token": mb.polygon(p), "road_segment_token": segs[0]}))
        for p in geo["walkway"]:
            mb.add("walkway", {"polygon_token": mb.polygon(p)})
        for p in geo["stop_line"]:
            c = p[0].mean(0)
            nearest = int(np.argmin([np.linalg.norm(q[0].mean(0) - c) for q in geo["ped_crossing"]]))
            mb.add("stop_line", {"polygon_token": mb.polygon(p), "stop_line_type": "PED_CROSSING", "ped_crossing_tokens": [crossings[nearest]], "traffic_light_tokens": [], "road_block_token": ""})
        for p, yaw in zip(geo["carpark_area"], geo["carpark_orientation"]):
            mb.add("carpark_area", {"polygon_token": mb.polygon(p), "orientation": round(float(math.remainder(yaw, 2 * math.pi)), 4), "road_block_token": ""})
        for seg in geo["road_divider"]:
            line_tok, _ = mb.line(seg)
            mb.add("road_divider", {"line_token": line_tok, "road_segment_token": segs[0]})
        for seg in geo["lane_divider"]:
            line_tok, nodes = mb.line(seg)
            mb.add("lane_divider", {"line_token": line_tok, "lane_divider_segments": [{"node_token": n, "segment_type": "DOUBLE_DASHED_WHITE"} for n in nodes]})
    doc = {"version": "1.3", "canvas_edge": [float(canvas[0]), float(canvas[1])], **mb.layers, "arcline_path_3": {}, "connectivity": {}}
    with open(root / "maps" / "expansion" / f"{location}.json", "w") as f:
        json.dump(doc, f)

    # Semantic prior: drivable area, 255 foreground; col = x / res, row = H - y / res.
    w_px, h_px = int(math.ceil(canvas[0] / prior_res)), int(math.ceil(canvas[1] / prior_res))
    prior = np.zeros((h_px, w_px), dtype=np.uint8)
    shift = 2
    for geo in scenes:
        for exterior, holes in geo["drivable_area"]:
            rings = [np.stack([r[:, 0] / prior_res, h_px - r[:, 1] / prior_res], 1) for r in [exterior, *holes]]
            cv2.fillPoly(prior, [np.round(px * (1 << shift)).astype(np.int32) for px in rings], 255, lineType=cv2.LINE_8, shift=shift)
    name = MAP_PNG[location]
    cv2.imwrite(str(root / "maps" / name), prior)
    return name
