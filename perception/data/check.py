"""`perception data check`: validate a nuScenes dataroot (real or synthetic) before anything trains on it.

The checks run in three passes, cheapest first, so a broken dataroot is reported precisely instead of
crashing the devkit half way through loading:

1. Tables: the 13 JSON tables parse, tokens are unique, every reference resolves, prev/next chains are
   symmetric, quaternions are unit, sizes positive, sample timestamps increase, every sample has exactly one
   keyframe per channel and a LIDAR_TOP one, map records and their PNGs exist.
2. Devkit: ``NuScenes(version, dataroot)`` loads and the map expansion (if installed) loads in ``NuScenesMap``.
3. Files: every sensor file exists and is non-empty; keyframe files are decoded (LiDAR ``.pcd.bin`` size and
   finiteness, radar ``.pcd`` through the devkit's reader, JPEG fully decoded and its size matching the table).
   A tables-only synthetic dataroot (``perception data synth --tables-only``: ``"tables_only": true`` in its
   ``synth_config.json``) has no sensor files by design: this pass is skipped with one ``tables_only`` warning.

Errors are what makes loading, training or evaluation fail; warnings are legal but worth knowing (real
nuScenes has annotations without points, for example). Every finding names the file or token.

The summary also says how diverse the world is (``summary["world"]``, `world_summary`: off-axis keyframes,
turning scenes, junctions and roads near the keyframes), from the tables and the map expansion JSON alone.
"""

from __future__ import annotations

import json
import logging
import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np
from PIL import Image

from perception.data.synth.generate import SYNTH_CONFIG, is_tables_only
from perception.data.world_summary import format_world, world_summary
from perception.classes import NUSCENES, ClassList
from perception.errors import PerceptionError
from perception.progress import progress_bar
from perception.structures import SCENE_TAGS, parse_scene_tags

log = logging.getLogger(__name__)

TABLES = (
    "attribute", "calibrated_sensor", "category", "ego_pose", "instance", "log", "map", "sample",
    "sample_annotation", "sample_data", "scene", "sensor", "visibility",
)
MAP_NAMES = ("singapore-onenorth", "singapore-hollandvillage", "singapore-queenstown", "boston-seaport")
MAP_LAYERS = ("drivable_area", "road_segment", "lane", "ped_crossing", "walkway", "stop_line", "carpark_area", "road_divider", "lane_divider")
# Findings of one kind printed before "... and N more" (all of them are in `Report.to_json`).
PRINT_PER_KIND = {"ERRORS": 50, "WARNINGS": 5}


@dataclass(frozen=True)
class Finding:
    kind: str  # short machine-readable kind, e.g. "missing_file", "broken_link"
    where: str  # the file path or "table.json token" it is about
    message: str

    def __str__(self) -> str:
        return f"[{self.kind}] {self.where}: {self.message}"


@dataclass
class Report:
    dataroot: Path
    version: str
    summary: dict = field(default_factory=dict)
    errors: list[Finding] = field(default_factory=list)
    warnings: list[Finding] = field(default_factory=list)

    def error(self, kind: str, where: str | Path, message: str) -> None:
        self.errors.append(Finding(kind, str(where), message))

    def warn(self, kind: str, where: str | Path, message: str) -> None:
        self.warnings.append(Finding(kind, str(where), message))

    def format(self) -> str:
        lines = [f"nuScenes dataroot {self.dataroot} ({self.version})", ""]
        s = self.summary
        for key in ("scenes", "samples", "sample_data", "sample_annotations", "instances", "logs", "locations", "splits"):
            if key in s:
                lines.append(f"  {key:<20} {s[key]}")
        if "sensors" in s:
            lines.append("  sensors (keyframes / sweeps):")
            for ch, (kf, sw) in s["sensors"].items():
                lines.append(f"    {ch:<20} {kf:>7} / {sw:<7}")
        if "annotations_per_class" in s:
            lines.append("  annotations per detection class (with >= 1 point / all):")
            for name, (with_pts, total) in s["annotations_per_class"].items():
                lines.append(f"    {name:<20} {with_pts:>7} / {total:<7}")
        if s.get("unmapped_categories"):
            lines.append("  categories no class maps (annotations): "
                         + ", ".join(f"{k} {v}" for k, v in s["unmapped_categories"].items()))
        if "map_layers" in s:
            lines.append("  map expansion layers (records):")
            for loc, layers in s["map_layers"].items():
                lines.append(f"    {loc}: " + ", ".join(f"{k} {v}" for k, v in layers.items()))
        if "scene_tags" in s:
            lines.append("  scenes per scene tag: " + ", ".join(f"{k} {v}" for k, v in s["scene_tags"].items())
                         + f"; no tag {s['scenes_without_tags']}")
        if "heads" in s:
            lines.append("  heads:")
            for k, v in s["heads"].items():
                lines.append(f"    {k:<18} {v}")
        if "world" in s:
            lines.extend(format_world(s["world"]))
        if "files_checked" in s:
            lines.append(f"  files checked        {s['files_checked']} present, {s['files_decoded']} decoded")
        if "files_skipped" in s:
            lines.append(f"  files checked        none: {s['files_skipped']}")
        lines.append("")
        for title, findings in (("ERRORS", self.errors), ("WARNINGS", self.warnings)):
            if not findings:
                continue
            lines.append(f"{title} ({len(findings)}):")
            by_kind: dict[str, list[Finding]] = defaultdict(list)
            for f in findings:
                by_kind[f.kind].append(f)
            for kind, items in by_kind.items():
                limit = PRINT_PER_KIND[title]
                for f in items[:limit]:
                    lines.append(f"  {f}")
                if len(items) > limit:
                    lines.append(f"  ... and {len(items) - limit} more [{kind}] (write them all with --report FILE.json)")
        verdict = "FAILED" if self.errors else "OK"
        lines.append(f"{verdict}: {len(self.errors)} error(s), {len(self.warnings)} warning(s)")
        return "\n".join(lines)

    def print(self) -> None:
        print(self.format())

    def to_json(self) -> dict:
        return {
            "dataroot": str(self.dataroot),
            "version": self.version,
            "summary": self.summary,
            "errors": [f.__dict__ for f in self.errors],
            "warnings": [f.__dict__ for f in self.warnings],
        }


def check_dataroot(dataroot: str | Path, version: str = "v1.0-mini", max_files_per_channel: int | None = None,
                   progress: bool = True, classes: ClassList = NUSCENES) -> Report:
    """Check a nuScenes dataroot. Returns the report; raises only if `dataroot` itself does not exist.

    max_files_per_channel: decode at most this many keyframe files per channel (None: all). Every file is
    still checked for presence and size.
    classes: the class list annotations are counted by; categories it does not map are listed in the summary
    (``unmapped_categories``) and, for a list other than the nuScenes preset, warned about (`unmapped_category`).
    """
    root = Path(dataroot)
    if not root.is_dir():
        raise PerceptionError(f"{root}: dataroot does not exist or is not a directory")
    report = Report(root, version)
    tables = _load_tables(root, version, report)
    if tables is None:
        return report
    _check_tables(root, version, tables, report)
    _summarise(tables, version, report, classes)
    if not report.errors:
        _check_devkit(root, version, report)
    _check_maps(root, tables, report)
    _summarise_heads(root, tables, report)
    _summarise_world(root, version, tables, report)
    if is_tables_only(root):
        report.summary["files_skipped"] = "tables-only synthetic dataroot, no sensor files"
        report.warn("tables_only", root / SYNTH_CONFIG, "tables-only synthetic dataroot (perception data synth --tables-only): "
                    "its sample_data files were never written, so the file checks are skipped; it indexes, it cannot train")
    else:
        _check_files(root, tables, report, max_files_per_channel, progress)
    return report


# ----------------------------------------------------------------------------------------------- tables


def _load_tables(root: Path, version: str, report: Report) -> dict[str, list[dict]] | None:
    table_dir = root / version
    if not table_dir.is_dir():
        report.error("missing_table", table_dir, f"no table directory {version}/ (is --version right? found: {sorted(p.name for p in root.iterdir() if p.is_dir())})")
        return None
    tables: dict[str, list[dict]] = {}
    for name in TABLES:
        path = table_dir / f"{name}.json"
        if not path.is_file():
            report.error("missing_table", path, "table file missing")
            continue
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            report.error("unreadable_table", path, f"not valid JSON: {exc}")
            continue
        if not isinstance(data, list) or not all(isinstance(r, dict) and "token" in r for r in data):
            report.error("unreadable_table", path, "expected a JSON list of records that each have a 'token'")
            continue
        tables[name] = data
    if len(tables) < len(TABLES):
        return None
    return tables


def _check_tables(root: Path, version: str, t: dict[str, list[dict]], report: Report) -> None:
    vdir = f"{version}/"
    idx: dict[str, dict[str, dict]] = {}
    for name, rows in t.items():
        idx[name] = {}
        for r in rows:
            if r["token"] in idx[name]:
                report.error("duplicate_token", f"{vdir}{name}.json {r['token']}", "token appears more than once")
            idx[name][r["token"]] = r

    def ref(table: str, rec: dict, key: str, target: str, optional: bool = False) -> None:
        value = rec.get(key)
        if value is None:
            report.error("missing_field", f"{vdir}{table}.json {rec['token']}", f"field '{key}' missing")
        elif value == "" and optional:
            return
        elif value not in idx[target]:
            report.error("broken_link", f"{vdir}{table}.json {rec['token']}", f"{key} = {value!r} is not a {target} token")

    def chain(table: str) -> None:
        rows = idx[table]
        for tok, r in rows.items():
            for key, back in (("next", "prev"), ("prev", "next")):
                other = r.get(key, "")
                if other == "":
                    continue
                if other not in rows:
                    report.error("broken_link", f"{vdir}{table}.json {tok}", f"{key} = {other!r} is not a {table} token")
                elif rows[other].get(back) != tok:
                    report.error("broken_link", f"{vdir}{table}.json {tok}", f"{key} = {other} but that record's {back} is {rows[other].get(back)!r}")

    def unit_quat(table: str, rec: dict) -> None:
        q = rec.get("rotation")
        if not isinstance(q, list) or len(q) != 4 or not all(isinstance(v, (int, float)) for v in q):
            report.error("bad_rotation", f"{vdir}{table}.json {rec['token']}", f"rotation must be 4 numbers [w, x, y, z], got {q!r}")
        elif abs(math.sqrt(sum(v * v for v in q)) - 1.0) > 1e-3:
            report.error("bad_rotation", f"{vdir}{table}.json {rec['token']}", f"rotation {q} is not a unit quaternion (norm {math.sqrt(sum(v * v for v in q)):.4f})")

    for r in t["calibrated_sensor"]:
        ref("calibrated_sensor", r, "sensor_token", "sensor")
        unit_quat("calibrated_sensor", r)
        sensor = idx["sensor"].get(r.get("sensor_token"))
        if sensor is not None and sensor.get("modality") == "camera":
            k = np.asarray(r.get("camera_intrinsic", []), dtype=float)
            if k.shape != (3, 3) or not np.isfinite(k).all() or k[0, 0] <= 0 or k[1, 1] <= 0 or k[2, 2] != 1:
                report.error("bad_intrinsic", f"{vdir}calibrated_sensor.json {r['token']}", f"{sensor['channel']} camera_intrinsic must be 3x3 with positive focal lengths and K[2][2] = 1, got {r.get('camera_intrinsic')!r}")
    for r in t["ego_pose"]:
        unit_quat("ego_pose", r)
    for r in t["instance"]:
        ref("instance", r, "category_token", "category")
        ref("instance", r, "first_annotation_token", "sample_annotation")
        ref("instance", r, "last_annotation_token", "sample_annotation")
    for r in t["scene"]:
        ref("scene", r, "log_token", "log")
        ref("scene", r, "first_sample_token", "sample")
        ref("scene", r, "last_sample_token", "sample")
    for r in t["map"]:
        for lt in r.get("log_tokens", []):
            if lt not in idx["log"]:
                report.error("broken_link", f"{vdir}map.json {r['token']}", f"log_tokens has {lt!r}, not a log token")
        filename = r.get("filename") or ""
        if not filename or not (root / filename).is_file():
            report.error("missing_file", root / (filename or "maps/?"), f"semantic-prior map PNG of map record {r['token']} missing (the devkit needs it to load)")
    logs_in_maps = {lt for r in t["map"] for lt in r.get("log_tokens", [])}
    for r in t["log"]:
        if r["token"] not in logs_in_maps:
            report.error("broken_link", f"{vdir}log.json {r['token']}", "log is not listed in any map record (the devkit fails to load)")
        if r.get("location") not in MAP_NAMES:
            report.warn("unknown_location", f"{vdir}log.json {r['token']}", f"location {r.get('location')!r} is not one of the 4 nuScenes maps; map layers unavailable")
    for r in t["sample"]:
        ref("sample", r, "scene_token", "scene")
    chain("sample")
    for r in t["sample_data"]:
        ref("sample_data", r, "sample_token", "sample")
        ref("sample_data", r, "ego_pose_token", "ego_pose")
        ref("sample_data", r, "calibrated_sensor_token", "calibrated_sensor")
    chain("sample_data")
    for r in t["sample_annotation"]:
        where = f"{vdir}sample_annotation.json {r['token']}"
        ref("sample_annotation", r, "sample_token", "sample")
        ref("sample_annotation", r, "instance_token", "instance")
        ref("sample_annotation", r, "visibility_token", "visibility", optional=True)
        attrs = r.get("attribute_tokens", [])
        for a in attrs:
            if a not in idx["attribute"]:
                report.error("broken_link", where, f"attribute token {a!r} is not an attribute")
        if len(attrs) > 1:
            report.error("bad_annotation", where, f"{len(attrs)} attributes (the detection eval accepts at most one)")
        unit_quat("sample_annotation", r)
        size = r.get("size")
        if not isinstance(size, list) or len(size) != 3 or not all(isinstance(v, (int, float)) and v > 0 for v in size):
            report.error("bad_annotation", where, f"size must be 3 positive numbers [w, l, h], got {size!r}")
        if r.get("num_lidar_pts", 0) + r.get("num_radar_pts", 0) == 0:
            report.warn("no_points", where, "annotation has no LiDAR or radar points (the detection eval drops it)")
    chain("sample_annotation")

    # Per sample: scene timestamps strictly increasing, exactly one keyframe per channel, a LIDAR_TOP keyframe.
    channel_of = {}
    for cs in t["calibrated_sensor"]:
        sensor = idx["sensor"].get(cs.get("sensor_token"))
        channel_of[cs["token"]] = sensor["channel"] if sensor else "?"
    keyframes: dict[str, Counter] = defaultdict(Counter)
    for sd in t["sample_data"]:
        if sd.get("is_key_frame"):
            keyframes[sd.get("sample_token")][channel_of.get(sd.get("calibrated_sensor_token"), "?")] += 1
    for s in t["sample"]:
        where = f"{vdir}sample.json {s['token']}"
        kf = keyframes.get(s["token"], Counter())
        if kf.get("LIDAR_TOP", 0) == 0:
            report.error("missing_keyframe", where, "sample has no LIDAR_TOP keyframe")
        for ch, n in kf.items():
            if n > 1:
                report.error("duplicate_keyframe", where, f"{n} {ch} keyframes (the devkit keeps only one)")
    for sc in t["scene"]:
        tok, prev_ts, n = sc.get("first_sample_token"), None, 0
        seen = set()
        while tok and tok in idx["sample"] and tok not in seen:
            seen.add(tok)
            s = idx["sample"][tok]
            if s.get("scene_token") != sc["token"]:
                report.error("broken_link", f"{vdir}sample.json {tok}", f"sample is chained in scene {sc['token']} but its scene_token is {s.get('scene_token')!r}")
            if prev_ts is not None and s["timestamp"] <= prev_ts:
                report.error("bad_timestamp", f"{vdir}sample.json {tok}", f"timestamp {s['timestamp']} does not increase over the previous sample's {prev_ts}")
            prev_ts, n = s["timestamp"], n + 1
            tok = s.get("next")
        if sc.get("nbr_samples") is not None and n != sc["nbr_samples"]:
            report.error("broken_link", f"{vdir}scene.json {sc['token']}", f"nbr_samples = {sc['nbr_samples']} but its chain has {n} samples")


def _summarise(t: dict[str, list[dict]], version: str, report: Report, classes: ClassList = NUSCENES) -> None:
    from nuscenes.utils.splits import create_splits_scenes  # heavy: the devkit takes ~1 s to import

    s = report.summary
    s["scenes"] = len(t["scene"])
    s["samples"] = len(t["sample"])
    s["sample_data"] = len(t["sample_data"])
    s["sample_annotations"] = len(t["sample_annotation"])
    s["instances"] = len(t["instance"])
    s["logs"] = len(t["log"])
    s["locations"] = ", ".join(sorted({r.get("location", "?") for r in t["log"]}))
    sensors = {r["token"]: r for r in t["sensor"]}
    calib = {r["token"]: sensors.get(r.get("sensor_token"), {}).get("channel", "?") for r in t["calibrated_sensor"]}
    per_channel: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for sd in t["sample_data"]:
        per_channel[calib.get(sd.get("calibrated_sensor_token"), "?")][0 if sd.get("is_key_frame") else 1] += 1
    s["sensors"] = {ch: tuple(v) for ch, v in sorted(per_channel.items())}
    cats = {r["token"]: r["name"] for r in t["category"]}
    inst_cat = {r["token"]: cats.get(r.get("category_token"), "?") for r in t["instance"]}
    per_class: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    unmapped: dict[str, int] = defaultdict(int)
    for a in t["sample_annotation"]:
        category = inst_cat.get(a.get("instance_token"), "")
        label = classes.label_of_category(category)
        if label is None:
            unmapped[category] += 1
        name = "(not evaluated)" if label is None else classes.names[label]
        per_class[name][1] += 1
        if a.get("num_lidar_pts", 0) + a.get("num_radar_pts", 0) > 0:
            per_class[name][0] += 1
    s["annotations_per_class"] = {k: tuple(v) for k, v in sorted(per_class.items())}
    s["unmapped_categories"] = dict(sorted(unmapped.items()))
    if classes.preset != "nuscenes":
        for category, n in sorted(unmapped.items()):
            report.warn("unmapped_category", f"{version}/category.json {category}",
                        f"{n} annotations of this category map to no class of the class list: they are neither "
                        "trained nor scored (add it to a class's categories)")
    names = {r.get("name") for r in t["scene"]}
    splits = create_splits_scenes()
    wanted = ("mini_train", "mini_val") if version.endswith("mini") else ("train", "val", "test")
    s["splits"] = ", ".join(f"{sp} {len(names & set(splits[sp]))}" for sp in wanted)


def _check_devkit(root: Path, version: str, report: Report) -> None:
    try:
        from nuscenes.nuscenes import NuScenes  # heavy: the devkit takes ~1 s to import

        NuScenes(version, str(root), verbose=False)
    except Exception as exc:  # the devkit raises anything from KeyError to AssertionError
        report.error("devkit_load", root / version, f"NuScenes() failed to load: {type(exc).__name__}: {exc}")


def _check_maps(root: Path, t: dict[str, list[dict]], report: Report) -> None:
    locations = sorted({r.get("location") for r in t["log"]} & set(MAP_NAMES))
    layers: dict[str, dict[str, int]] = {}
    for loc in locations:
        path = root / "maps" / "expansion" / f"{loc}.json"
        if not path.is_file():
            report.warn("missing_map_expansion", path, "map expansion not installed: BEV map segmentation targets are unavailable for this location")
            continue
        try:
            from nuscenes.map_expansion.map_api import NuScenesMap  # heavy: the devkit takes ~1 s to import

            m = NuScenesMap(dataroot=str(root), map_name=loc)
        except Exception as exc:
            report.error("bad_map_expansion", path, f"NuScenesMap failed to load: {type(exc).__name__}: {exc}")
            continue
        layers[loc] = {name: len(getattr(m, name)) for name in MAP_LAYERS}
        for name in ("drivable_area", "lane", "ped_crossing", "walkway"):
            if layers[loc][name] == 0:
                report.warn("empty_map_layer", path, f"layer {name} has no records")
    if layers:
        report.summary["map_layers"] = layers


def _summarise_heads(root: Path, t: dict[str, list[dict]], report: Report) -> None:
    """Which heads this dataroot trains and why: scene tags per tag (`SCENE_TAG_KEYWORDS` on the scene
    descriptions), map segmentation on the samples whose location has its map expansion (data.map=auto)."""
    s = report.summary
    tags = {r.get("token"): parse_scene_tags(str(r.get("description", ""))) for r in t["scene"]}
    s["scene_tags"] = {name: int(sum(v[i] > 0 for v in tags.values())) for i, name in enumerate(SCENE_TAGS)}
    s["scenes_without_tags"] = int(sum(not v.any() for v in tags.values()))
    location = {r.get("token"): r.get("location", "") for r in t["log"]}
    scene_loc = {r.get("token"): location.get(r.get("log_token"), "") for r in t["scene"]}
    per_loc = Counter(scene_loc.get(r.get("scene_token"), "") for r in t["sample"])
    with_map = {loc for loc in per_loc if loc and (root / "maps" / "expansion" / f"{loc}.json").is_file()}
    n_map = sum(n for loc, n in per_loc.items() if loc in with_map)
    n_all = sum(per_loc.values())
    missing = sorted(loc or "(no location)" for loc in per_loc if loc not in with_map)
    heads = {"detection": f"trained: {sum(v[0] for k, v in s.get('annotations_per_class', {}).items() if k != '(not evaluated)')} "
                          "annotations of the 10 detection classes with points"}
    if n_map == n_all:
        heads["map segmentation"] = f"trained and scored on all {n_all} samples (map expansion of every location)"
    elif n_map == 0:
        heads["map segmentation"] = (f"not trained, metrics null: no map expansion for {', '.join(missing)} under "
                                     f"{root / 'maps' / 'expansion'} (data.map=auto; data.map=on fails)")
    else:
        heads["map segmentation"] = (f"trained and scored on {n_map} of {n_all} samples: no map expansion for "
                                     f"{', '.join(missing)} (data.map=auto; data.map=on fails)")
    tagged = n_all - sum(n for sc, n in Counter(r.get("scene_token") for r in t["sample"]).items()
                         if sc in tags and not tags[sc].any())
    heads["scene tags"] = (f"trained and scored on all {n_all} samples (scene descriptions through the keyword table; "
                           f"{tagged} samples carry at least one tag)")
    s["heads"] = heads


def _summarise_world(root: Path, version: str, t: dict[str, list[dict]], report: Report) -> None:
    """How diverse the world is (`world_summary`: off-axis keyframes, turning scenes, junctions and roads),
    from the tables and the map expansion JSON; scene tags are `_summarise_heads`'s."""
    try:
        report.summary["world"] = world_summary(root, version, tables=t)
    except Exception as exc:  # a summary, not a check: malformed records are the table checks' findings
        report.warn("world_summary", root / version, f"world summary skipped: {type(exc).__name__}: {exc}")


# ------------------------------------------------------------------------------------------------ files


def _iter_with_progress(items: list, progress: bool, desc: str) -> Iterable:
    if not progress:
        return items
    return progress_bar(items, desc=desc, unit="file", leave=False)


def _check_files(root: Path, t: dict[str, list[dict]], report: Report, max_per_channel: int | None, progress: bool) -> None:
    sensors = {r["token"]: r for r in t["sensor"]}
    calib = {r["token"]: sensors.get(r.get("sensor_token"), {}) for r in t["calibrated_sensor"]}
    decoded: Counter = Counter()
    present = 0
    for sd in _iter_with_progress(t["sample_data"], progress, "checking files"):
        rel = sd.get("filename", "")
        path = root / rel
        try:
            size = path.stat().st_size
        except OSError:
            report.error("missing_file", path, f"file of sample_data {sd['token']} is missing")
            continue
        if size == 0:
            report.error("unreadable_file", path, f"file of sample_data {sd['token']} is empty")
            continue
        present += 1
        sensor = calib.get(sd.get("calibrated_sensor_token"), {})
        channel, modality = sensor.get("channel", "?"), sensor.get("modality", "?")
        if not sd.get("is_key_frame") or (max_per_channel is not None and decoded[channel] >= max_per_channel):
            if modality == "lidar" and size % 20:
                report.error("unreadable_file", path, f"LiDAR file size {size} is not a multiple of 20 bytes (5 float32 per point): truncated?")
            continue
        decoded[channel] += 1
        problem = _decode_problem(path, modality, sd, size)
        if problem:
            report.error("unreadable_file", path, problem)
    report.summary["files_checked"] = present
    report.summary["files_decoded"] = sum(decoded.values())


def _decode_problem(path: Path, modality: str, sd: dict, size: int) -> str | None:
    """What is wrong with one sensor file's content, or None."""
    if modality == "lidar":
        if size % 20:
            return f"LiDAR file size {size} is not a multiple of 20 bytes (5 float32 per point): truncated?"
        pts = np.fromfile(path, dtype=np.float32).reshape(-1, 5)
        bad = ~np.isfinite(pts).all(axis=1)
        if bad.any():
            return f"{int(bad.sum())} of {len(pts)} LiDAR points are NaN or inf"
        return None
    if modality == "radar":
        from nuscenes.utils.data_classes import RadarPointCloud  # heavy: the devkit takes ~1 s to import

        try:
            RadarPointCloud.from_file(str(path))
        except Exception as exc:
            return f"radar .pcd unreadable by the devkit ({type(exc).__name__}: {exc or 'bad header, record size or missing trailing byte'})"
        return None
    if modality == "camera":
        try:
            with Image.open(path) as img:
                img.load()
                w, h = img.size
        except Exception as exc:
            return f"image unreadable ({type(exc).__name__}: {exc})"
        if (w, h) != (sd.get("width"), sd.get("height")):
            return f"image is {w}x{h} but sample_data says {sd.get('width')}x{sd.get('height')}"
        return None
    return None


def write_report_json(report: Report, path: str | Path) -> None:
    Path(path).write_text(json.dumps(report.to_json(), indent=1))
