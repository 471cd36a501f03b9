"""Paired comparison on one checkpoint: circle-NMS with CenterPoint's squared-distance thresholds read as metres
(the table before issue 15) vs the shipped table (their square roots).

Usage: python benchmarks/nms_radii_ab.py CHECKPOINT DATAROOT OUT_DIR   (mini_val of v1.0-mini; prints both)
"""
import json, sys
from perception.model import heads
from perception.evaluation import evaluate_checkpoint

ckpt, data, out = sys.argv[1:4]
shipped = dict(heads.CIRCLE_NMS_RADIUS_M)
old = {"car": 4.0, "truck": 12.0, "construction_vehicle": 12.0, "bus": 10.0, "trailer": 10.0, "barrier": 1.0,
       "motorcycle": 0.85, "bicycle": 0.85, "pedestrian": 0.175, "traffic_cone": 0.175}
res = {}
for name, table in (("old", old), ("shipped", shipped)):
    heads.CIRCLE_NMS_RADIUS_M.clear(); heads.CIRCLE_NMS_RADIUS_M.update(table)
    m = evaluate_checkpoint(ckpt, data, "v1.0-mini", "mini_val", f"{out}/{name}", workers=0, progress=False)
    res[name] = {k: m[k] for k in ("nds", "map", "mate", "maoe", "mave", "per_class_ap", "seg_miou", "seg_miou_bevfusion", "scene_map")}
    print(name, json.dumps(res[name]), flush=True)
json.dump(res, open(f"{out}/nms_ab.json", "w"), indent=1)
