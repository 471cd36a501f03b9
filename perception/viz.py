"""Pictures a person would rather look at than read: the BEV of one sample with ground truth and predictions."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from types import ModuleType
from typing import Sequence

import cv2
import numpy as np

from perception.checkpoint import model_from_checkpoint
from perception.data.build import build_dataset
from perception.data.collate import collate_samples
from perception.data.dataset import DatasetConfig, NuScenesDataset
from perception.data.mmdet3d_info import read_mmdet3d_infos
from perception.data.submission import submission_entries
from perception.data.transforms import ImageAugConfig
from perception.distributed import pick_device
from perception.errors import PerceptionError
from perception.model.temporal import TemporalState
from perception.structures import CAMERA_CHANNELS, DETECTION_CLASSES, MAP_CLASSES, SCENE_TAGS, BEVGrid, Boxes3D
from perception.tracking import CenterPointTracker

log = logging.getLogger(__name__)

# One colour per detection class (matplotlib tab10), shared by every picture.
CLASS_COLOURS = {name: f"C{i}" for i, name in enumerate(DETECTION_CLASSES)}


def agg_pyplot() -> ModuleType:
    """`matplotlib.pyplot` on the Agg backend (pictures written to files; no display needed)."""
    import matplotlib  # heavy: matplotlib takes ~0.3 s to import

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # heavy: matplotlib takes ~0.3 s to import

    return plt


def _box_outline(box: np.ndarray) -> np.ndarray:
    """(5, 2) closed BEV outline of one box (x, y, z, w, l, h, yaw, ...), LIDAR_TOP frame; length along yaw."""
    x, y, w, l, yaw = box[0], box[1], box[3], box[4], box[6]
    c, s = np.cos(yaw), np.sin(yaw)
    local = np.array([[l / 2, w / 2], [l / 2, -w / 2], [-l / 2, -w / 2], [-l / 2, w / 2], [l / 2, w / 2]])
    return local @ np.array([[c, s], [-s, c]]) + np.array([x, y])


def plot_bev(path: str | Path, sample, prediction=None, grid: BEVGrid | None = None, score_threshold: float = 0.3,
             title_extra: str = "", track_ids: Sequence[int | None] | None = None,
             trails: dict[int, np.ndarray] | None = None) -> Path:
    """Two panels over the BEV grid (LIDAR_TOP frame, x right, y forward):
    left: LiDAR points, ground-truth boxes and the ground-truth map (drivable area, crossings, walkways, dividers);
    right: the same points, predicted boxes with score >= `score_threshold` (heading tick, velocity arrow) and
    the predicted map probabilities.

    sample: a `perception.data.dataset.Sample`; prediction: a `perception.model.bevfusion.Prediction` or None.
    track_ids: with a prediction, each predicted box's track id (None: untracked), drawn as "#id".
    trails: track id -> (T, 2) past centres in this sample's LIDAR_TOP frame, metres, drawn as a line.
    """
    plt = agg_pyplot()
    grid = grid or BEVGrid()
    extent = (grid.x_min, grid.x_max, grid.y_min, grid.y_max)
    pts = sample.points_lidar.numpy()
    keep = (pts[:, 0] > grid.x_min) & (pts[:, 0] < grid.x_max) & (pts[:, 1] > grid.y_min) & (pts[:, 1] < grid.y_max)
    pts = pts[keep][::3]
    panels = [("ground truth" if sample.has_map else "ground truth (no map expansion)", sample.boxes_lidar.tensor.numpy(),
               sample.labels.numpy(), None, sample.map_masks.float().numpy(), None)]
    if prediction is not None:
        keep = prediction.scores.cpu().numpy() >= score_threshold
        ids = None if track_ids is None else [t for t, k in zip(track_ids, keep) if k]
        panels.append(("prediction", prediction.boxes_lidar.tensor.cpu().numpy()[keep], prediction.labels.cpu().numpy()[keep],
                       prediction.scores.cpu().numpy()[keep], prediction.map_probs.float().cpu().numpy(), ids))
    fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 7), squeeze=False)
    map_colours = {"drivable_area": (0.55, 0.55, 0.55), "ped_crossing": (0.9, 0.6, 0.1), "walkway": (0.3, 0.6, 0.3),
                   "stop_line": (0.8, 0.1, 0.1), "carpark_area": (0.6, 0.4, 0.7), "divider": (0.1, 0.3, 0.9)}
    for ax, (title, boxes, labels, scores, masks, ids) in zip(axes[0], panels):
        rgb = np.ones((*masks.shape[1:], 3))
        for name in MAP_CLASSES:
            m = np.clip(masks[MAP_CLASSES.index(name)], 0, 1)[..., None] * 0.6
            rgb = rgb * (1 - m) + np.array(map_colours.get(name, (0.5, 0.5, 0.5))) * m
        ax.imshow(rgb, origin="lower", extent=extent, interpolation="nearest")
        ax.scatter(pts[:, 0], pts[:, 1], s=0.2, c="k", alpha=0.4, linewidths=0)
        radar = sample.points_radar.numpy()
        if len(radar):
            ax.scatter(radar[:, 0], radar[:, 1], s=6, c="m", marker="x", linewidths=0.8, label="radar")
            fast = np.hypot(radar[:, 4], radar[:, 5]) > 0.5
            ax.quiver(radar[fast, 0], radar[fast, 1], radar[fast, 4], radar[fast, 5], color="m", angles="xy",
                      scale_units="xy", scale=1.0, width=0.002, alpha=0.6)
        for k, box in enumerate(boxes):
            name = DETECTION_CLASSES[int(labels[k])]
            outline = _box_outline(box)
            ax.plot(outline[:, 0], outline[:, 1], color=CLASS_COLOURS[name], lw=1.2)
            head = np.array([box[0], box[1]]) + 0.5 * box[4] * np.array([np.cos(box[6]), np.sin(box[6])])
            ax.plot([box[0], head[0]], [box[1], head[1]], color=CLASS_COLOURS[name], lw=1.0)
            if np.hypot(box[7], box[8]) > 0.5:
                ax.arrow(box[0], box[1], box[7], box[8], color=CLASS_COLOURS[name], width=0.05, head_width=0.6, alpha=0.7)
            if scores is not None:
                ax.text(box[0], box[1], f"{scores[k]:.2f}", fontsize=5)
            if ids is not None and ids[k] is not None:
                ax.text(box[0] + 1.0, box[1] + 1.0, f"#{ids[k]}", fontsize=6, color=CLASS_COLOURS[name])
                trail = (trails or {}).get(ids[k])
                if trail is not None and len(trail) > 1:
                    ax.plot(trail[:, 0], trail[:, 1], color=CLASS_COLOURS[name], lw=0.8, alpha=0.7, ls="--")
        ax.plot([0], [0], marker="^", color="r", ms=8)
        ax.set_xlim(grid.x_min, grid.x_max)
        ax.set_ylim(grid.y_min, grid.y_max)
        ax.set_aspect("equal")
        ax.set_title(f"{title}: {len(boxes)} boxes")
        ax.set_xlabel("x (m, LIDAR_TOP)")
        ax.set_ylabel("y (m)")
    handles = [plt.Line2D([], [], color=c, label=n) for n, c in CLASS_COLOURS.items()]
    fig.legend(handles=handles, loc="lower center", ncol=5, fontsize=8)
    token = sample.meta.get("sample_token", "")
    fig.suptitle(f"sample {token}   {title_extra}".strip())
    fig.tight_layout(rect=(0, 0.05, 1, 0.97))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------- camera mosaic

# The mosaic layout: front row left to right, back row left to right (as a driver would look around).
MOSAIC = (("CAM_FRONT_LEFT", "CAM_FRONT", "CAM_FRONT_RIGHT"), ("CAM_BACK_LEFT", "CAM_BACK", "CAM_BACK_RIGHT"))
BOX_EDGES = ((0, 1), (1, 2), (2, 3), (3, 0), (4, 5), (5, 6), (6, 7), (7, 4), (0, 4), (1, 5), (2, 6), (3, 7))
GT_BGR = (60, 220, 60)


def _bgr(name: str) -> tuple[int, int, int]:
    import matplotlib.colors as mcolors  # heavy: matplotlib takes ~0.3 s to import

    r, g, b = mcolors.to_rgb(CLASS_COLOURS[name])
    return int(b * 255), int(g * 255), int(r * 255)


def draw_boxes_on_image(image_bgr: np.ndarray, corners_lidar: np.ndarray, cam2lidar: np.ndarray, cam2img: np.ndarray,
                        colours: list[tuple[int, int, int]], labels: list[str] | None = None, thickness: int = 2) -> None:
    """Draw 3D boxes (K, 8, 3) given in the LIDAR_TOP frame into one camera image, in place.

    cam2lidar (4, 4), cam2img (3, 3) of that (augmented) image; edges with an end behind the camera are skipped.
    """
    lidar2cam = np.linalg.inv(cam2lidar)
    h, w = image_bgr.shape[:2]
    for k, corners in enumerate(corners_lidar):
        cam = corners @ lidar2cam[:3, :3].T + lidar2cam[:3, 3]
        if (cam[:, 2] > 0.5).sum() < 2:
            continue
        uv = cam @ cam2img.T
        uv = uv[:, :2] / np.maximum(uv[:, 2:3], 1e-6)
        if not ((uv[:, 0] > -w) & (uv[:, 0] < 2 * w) & (uv[:, 1] > -h) & (uv[:, 1] < 2 * h)).any():
            continue
        for a, b in BOX_EDGES:
            if cam[a, 2] > 0.5 and cam[b, 2] > 0.5:
                cv2.line(image_bgr, tuple(int(v) for v in uv[a]), tuple(int(v) for v in uv[b]), colours[k], thickness, cv2.LINE_AA)
        if labels is not None and cam[:, 2].min() > 0.5:
            top = uv[np.argmin(uv[:, 1])]
            cv2.putText(image_bgr, labels[k], (int(top[0]), int(top[1]) - 3), cv2.FONT_HERSHEY_SIMPLEX, 0.4, colours[k], 1, cv2.LINE_AA)


def camera_mosaic(sample, prediction=None, score_threshold: float = 0.3) -> np.ndarray:
    """(2H, 3W, 3) uint8 BGR: the six cameras with ground-truth boxes (green) and predictions (class colours,
    with scores). `sample` images are (6, 3, H, W) uint8 RGB with their `cam2img` / `cam2lidar`."""
    gt_corners = sample.boxes_lidar.corners().numpy()
    pred_corners, pred_colours, pred_text = np.zeros((0, 8, 3)), [], []
    if prediction is not None:
        keep = (prediction.scores >= score_threshold).cpu().numpy()
        pred_corners = prediction.boxes_lidar.corners().cpu().numpy()[keep]
        labels = prediction.labels.cpu().numpy()[keep]
        scores = prediction.scores.cpu().numpy()[keep]
        pred_colours = [_bgr(DETECTION_CLASSES[int(l)]) for l in labels]
        pred_text = [f"{DETECTION_CLASSES[int(l)]} {s:.2f}" for l, s in zip(labels, scores)]
    rows = []
    for row in MOSAIC:
        tiles = []
        for channel in row:
            c = CAMERA_CHANNELS.index(channel)
            img = cv2.cvtColor(sample.images[c].permute(1, 2, 0).numpy().copy(), cv2.COLOR_RGB2BGR)
            c2l, c2i = sample.cam2lidar[c].double().numpy(), sample.cam2img[c].double().numpy()
            draw_boxes_on_image(img, gt_corners, c2l, c2i, [GT_BGR] * len(gt_corners), thickness=1)
            draw_boxes_on_image(img, pred_corners, c2l, c2i, pred_colours, pred_text, thickness=2)
            cv2.putText(img, channel, (6, 18), cv2.FONT_HERSHEY_SIMPLEX, 0.55, (255, 255, 255), 2, cv2.LINE_AA)
            tiles.append(img)
        rows.append(np.concatenate(tiles, axis=1))
    return np.concatenate(rows, axis=0)


def scene_tag_text(sample, prediction=None, threshold: float = 0.5) -> str:
    true = [t for t, v in zip(SCENE_TAGS, sample.scene_tags.tolist()) if v > 0.5]
    text = "tags: " + (", ".join(true) or "-")
    if prediction is not None:
        probs = prediction.scene_probs.cpu().tolist()
        text += "   predicted: " + (", ".join(f"{t} {p:.2f}" for t, p in zip(SCENE_TAGS, probs) if p >= threshold) or "-")
    return text


# --------------------------------------------------------------------------------------- open3d export


def write_ply_points(path: Path, points_lidar: np.ndarray) -> None:
    """ASCII PLY: x, y, z and grey colour from intensity (0-255)."""
    inten = np.clip(points_lidar[:, 3] if points_lidar.shape[1] > 3 else np.full(len(points_lidar), 128), 0, 255).astype(np.uint8)
    lines = ["ply", "format ascii 1.0", f"element vertex {len(points_lidar)}", "property float x", "property float y",
             "property float z", "property uchar red", "property uchar green", "property uchar blue", "end_header"]
    body = [f"{p[0]:.3f} {p[1]:.3f} {p[2]:.3f} {i} {i} {i}" for p, i in zip(points_lidar[:, :3], inten)]
    path.write_text("\n".join(lines + body) + "\n")


def write_ply_boxes(path: Path, corners: np.ndarray, colours_rgb: list[tuple[int, int, int]]) -> None:
    """Boxes (K, 8, 3) as a PLY line set (vertices + edges with colours), which Open3D reads with
    `o3d.io.read_line_set`."""
    k = len(corners)
    lines = ["ply", "format ascii 1.0", f"element vertex {8 * k}", "property float x", "property float y", "property float z",
             f"element edge {12 * k}", "property int vertex1", "property int vertex2", "property uchar red",
             "property uchar green", "property uchar blue", "end_header"]
    body = [f"{v[0]:.3f} {v[1]:.3f} {v[2]:.3f}" for box in corners for v in box]
    for i in range(k):
        r, g, b = colours_rgb[i]
        body += [f"{8 * i + a} {8 * i + bb} {r} {g} {b}" for a, bb in BOX_EDGES]
    path.write_text("\n".join(lines + body) + "\n")


def show_open3d(points_ply: Path, boxes_ply: list[Path]) -> bool:
    """Open the Open3D viewer if Open3D is installed and a display exists; returns whether it was shown."""
    if not os.environ.get("DISPLAY") and not os.environ.get("WAYLAND_DISPLAY"):
        return False
    try:
        import open3d as o3d  # noqa: PLC0415 - optional, heavy, needs system GL libraries
    except ImportError:
        return False
    geoms = [o3d.io.read_point_cloud(str(points_ply))] + [o3d.io.read_line_set(str(p)) for p in boxes_ply]
    o3d.visualization.draw_geometries(geoms)
    return True


# ---------------------------------------------------------------------------------------------- driver


def _track_frame(tracker: CenterPointTracker, trails_global: dict[int, list[np.ndarray]], sample, pred,
                 prev_timestamp: int | None, score_threshold: float = 0.3) -> tuple[list[int | None], dict[int, np.ndarray]]:
    """One video frame through the tracker: the predicted boxes (all of them, drawn or not) get track ids (only
    those with score >= `score_threshold` are tracked); each track's global centres so far are appended to
    `trails_global` and returned in this sample's LIDAR_TOP frame."""
    lidar2ego, ego2global = sample.meta["lidar2ego"], sample.meta["ego2global"]
    scores = pred.scores.cpu().numpy()
    entries = submission_entries(sample.meta["sample_token"], Boxes3D(pred.boxes_lidar.tensor.cpu()),
                                 pred.labels.cpu().numpy(), scores, pred.attributes.cpu().numpy(), lidar2ego, ego2global)
    drawn = [k for k in range(len(entries)) if scores[k] >= score_threshold]
    dt = 0.0 if prev_timestamp is None else (sample.meta["timestamp"] - prev_timestamp) / 1e6
    ids: list[int | None] = [None] * len(entries)
    for k, t in zip(drawn, tracker.assign([entries[k] for k in drawn], dt)):
        ids[k] = t
        if t is not None:
            trails_global.setdefault(t, []).append(np.asarray(entries[k]["translation"][:3], dtype=np.float64))
    global2lidar = np.linalg.inv(ego2global @ lidar2ego)
    live = {t for t in ids if t is not None}
    trails = {t: (np.stack(trails_global[t]) @ global2lidar[:3, :3].T + global2lidar[:3, 3])[:, :2] for t in live}
    return ids, trails


def visualise(data: Path, out: Path, *, version: str = "v1.0-mini", sample_token: str | None = None,
              scene: str | None = None, checkpoint: Path | None = None, video: bool = False, device: str | None = None,
              show: bool = False, image_scale: float = 0.5, info: Path | None = None) -> list[Path]:
    """`perception viz`: pictures (and optionally an MP4) for one sample or every sample of a scene.
    `info`: the samples of this mmdet3d v2 info file (no tables needed): `sample_token` one of them, or None for
    all; info files name no scenes."""
    import matplotlib.colors as mcolors  # heavy: matplotlib takes ~0.3 s to import
    from nuscenes.nuscenes import NuScenes  # heavy: the devkit takes ~1 s to import

    index = None
    if info is not None:
        if scene is not None:
            raise PerceptionError("viz --info: info files name no scenes; give --sample TOKEN or neither (every sample)")
        index = read_mmdet3d_infos(info, data)
        tokens = [str(t) for t in index.tokens] if sample_token is None else [sample_token]
        if sample_token is not None and sample_token not in set(index.tokens.tolist()):
            raise PerceptionError(f"viz: no sample {sample_token!r} in {info}")
    elif (sample_token is None) == (scene is None):
        raise PerceptionError("viz: give exactly one of --sample and --scene")
    else:
        nusc = NuScenes(version, str(data), verbose=False)
        if scene is not None:
            recs = [s for s in nusc.scene if s["name"] == scene]
            if not recs:
                raise PerceptionError(f"viz: no scene named {scene!r} in {data} ({version}); scenes: {', '.join(s['name'] for s in nusc.scene[:12])}...")
            tokens, tok = [], recs[0]["first_sample_token"]
            while tok:
                tokens.append(tok)
                tok = nusc.get("sample", tok)["next"]
        else:
            try:
                nusc.get("sample", sample_token)
            except KeyError:
                raise PerceptionError(f"viz: no sample {sample_token!r} in {data} ({version})") from None
            tokens = [sample_token]
        del nusc

    model, model_ds = None, None
    grid = BEVGrid()
    if checkpoint is not None:
        loaded = model_from_checkpoint(checkpoint, device=pick_device(device))
        cfg, model = loaded.config, loaded.model
        model_ds = build_dataset(cfg, data, version, None, train=False, map_grid=model.map_grid, info=info)
        grid = model.map_grid
    base = NuScenesDataset(data, version, None, config=DatasetConfig(grid=grid), index=index)
    w0, h0 = (int(v) for v in np.median(base.index.cam_wh.reshape(-1, 2), axis=0))
    final = (int(h0 * image_scale) // 2 * 2, int(w0 * image_scale) // 2 * 2)
    viz_ds = base.with_config(image=ImageAugConfig(final_hw=final, resize_lim=(image_scale, image_scale), bot_pct_lim=(0.0, 0.0), rot_lim_deg=(0.0, 0.0), flip=False))
    index_of = {str(t): i for i, t in enumerate(base.index.tokens)}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    frames = []
    # With a model, a video tracks the drawn predictions (`perception.tracking`) and draws ids and trails.
    tracker = CenterPointTracker() if video and model is not None else None
    trails_global: dict[int, list[np.ndarray]] = {}
    prev_t = None
    state = TemporalState()  # a temporal model's history: used when consecutive drawn samples are consecutive keyframes
    for token in tokens:
        i = index_of[token]
        sample = viz_ds[i]
        pred, track_ids, trails = None, None, None
        if model is not None:
            batch = collate_samples([model_ds[i]]).to(next(model.parameters()).device)
            pred = model.predict(batch, state)[0]
        if tracker is not None:
            track_ids, trails = _track_frame(tracker, trails_global, sample, pred, prev_t)
            prev_t = sample.meta["timestamp"]
        mosaic = camera_mosaic(sample, pred)
        text = scene_tag_text(sample, pred)
        cv2.putText(mosaic, text, (8, mosaic.shape[0] - 10), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (255, 255, 255), 2, cv2.LINE_AA)
        cam_path = out / f"{token}_cameras.png"
        cv2.imwrite(str(cam_path), mosaic)
        bev_path = plot_bev(out / f"{token}_bev.png", sample, pred, grid, title_extra=text, track_ids=track_ids,
                            trails=trails)
        pts_path = out / f"{token}_points.ply"
        write_ply_points(pts_path, sample.points_lidar.numpy())
        box_paths = [out / f"{token}_boxes_gt.ply"]
        write_ply_boxes(box_paths[0], sample.boxes_lidar.corners().numpy(), [(60, 220, 60)] * len(sample.boxes_lidar))
        if pred is not None:
            keep = (pred.scores >= 0.3).cpu().numpy()
            cols = [tuple(int(255 * v) for v in mcolors.to_rgb(CLASS_COLOURS[DETECTION_CLASSES[int(l)]]))
                    for l in pred.labels.cpu().numpy()[keep]]
            box_paths.append(out / f"{token}_boxes_pred.ply")
            write_ply_boxes(box_paths[1], pred.boxes_lidar.corners().cpu().numpy()[keep], cols)
        written += [cam_path, bev_path, pts_path, *box_paths]
        if video:
            bev = cv2.imread(str(bev_path))
            scale = mosaic.shape[0] / bev.shape[0]
            bev = cv2.resize(bev, (int(bev.shape[1] * scale), mosaic.shape[0]))
            frames.append(np.concatenate([mosaic, bev], axis=1))
        if show and len(tokens) == 1:
            show_open3d(pts_path, box_paths)
    if video and frames:
        h, w = frames[0].shape[:2]
        path = out / f"{scene or tokens[0]}.mp4"
        writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 2.0, (w, h))
        for f in frames:
            writer.write(f)
        writer.release()
        written.append(path)
    log.info("wrote %d files to %s", len(written), out)
    return written
