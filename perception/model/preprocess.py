"""Pre-processing: a `Batch` -> the core's input tensors. One implementation, used by `BEVFusionModel.loss` and
`predict` and by every deploy runtime (which builds it from the export manifest, without model weights).

  - images: uint8 RGB -> float32 ``(image - pixel_mean) / pixel_std`` (the backbone's normalisation);
  - camera geometry: the view transform's `RigGeometry` (lift-splat: its pooling plan; Simple-BEV: lidar2img),
    computed once per distinct calibration and kept in a small cache (a fixed rig hits it every time; on real
    nuScenes every sample's ``cam2lidar`` differs, as the ego moves between each camera's and the LiDAR's
    timestamps, and under training augmentation every sample's differs too, so there it is made per batch);
  - point clouds: `fusion.lidar.PillarVoxelizer` for LiDAR and radar (pillars and each BEV cell's pillar).

Everything here is plain torch on the batch's device and is not part of the exported graph.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch
from torch import Tensor

from fusion.lidar import Pillars, PillarVoxelizer
from perception.data.batch import Batch
from perception.errors import PerceptionError
from perception.model.view_transform import RigGeometry
from perception.rig import NUSCENES as NUSCENES_RIG, Rig
from perception.structures import BEVGrid

PILLAR_INPUTS: tuple[str, ...] = ("features", "point_mask", "bev_index")


def core_input_names(geometry_names: tuple[str, ...]) -> tuple[str, ...]:
    """The core's inputs in graph order, for a view transform with these geometry inputs."""
    return ("images", *geometry_names, *(f"lidar_{n}" for n in PILLAR_INPUTS), *(f"radar_{n}" for n in PILLAR_INPUTS),
            "modality_mask")


@dataclass
class CoreInputs:
    """The tensors `BEVFusionModel.forward` takes (B samples, the rig's N cameras).

    Attributes:
        images: (B, N, 3, H, W) float32, normalised with the backbone's mean/std.
        geometry: the view transform's geometry tensors (`RigGeometry.input_names`): lift-splat's pooling plan
            (`fusion.bev_pool.PoolingPlan`), or Simple-BEV's lidar2img (B, N, 4, 4) float32.
        geometry_names: their names.
        lidar, radar: `fusion.lidar.Pillars` of the LiDAR sweeps and of the radar points.
        modality_mask: (B, 3) bool, camera / lidar / radar present.
    """

    images: Tensor
    geometry: tuple[Tensor, ...]
    geometry_names: tuple[str, ...]
    lidar: Pillars
    radar: Pillars
    modality_mask: Tensor

    def as_args(self) -> tuple:
        """The positional arguments of `BEVFusionModel.forward`."""
        return self.images, self.geometry, self.lidar, self.radar, self.modality_mask

    def named(self) -> dict[str, Tensor]:
        """``{input name: tensor}`` in the graph's order (`core_input_names`): what every runtime is fed."""
        values = (self.images, *self.geometry, *self.lidar.as_tuple(), *self.radar.as_tuple(), self.modality_mask)
        return dict(zip(core_input_names(self.geometry_names), values))

    @staticmethod
    def from_flat(values: tuple[Tensor, ...], geometry_names: tuple[str, ...]) -> "CoreInputs":
        """The inverse of ``tuple(named().values())``."""
        g = len(geometry_names)
        if len(values) != g + 8:
            raise TypeError(f"the core takes {g + 8} inputs {core_input_names(geometry_names)}, got {len(values)}")
        return CoreInputs(images=values[0], geometry=tuple(values[1:1 + g]), geometry_names=geometry_names,
                          lidar=Pillars(*values[1 + g:4 + g]), radar=Pillars(*values[4 + g:7 + g]), modality_mask=values[-1])


@dataclass(frozen=True)
class PreprocessSpec:
    """Everything pre-processing needs, as the manifest's ``preprocessing`` section records it.

    Attributes:
        image_size: (H, W) of the images the core takes.
        pixel_mean, pixel_std: per RGB channel, in uint8 units: ``(image - mean) / std``.
        grid: the BEV grid.
        lidar, radar: the voxelisers.
        geometry: the view transform's rig geometry.
    """

    image_size: tuple[int, int]
    pixel_mean: tuple[float, float, float]
    pixel_std: tuple[float, float, float]
    grid: BEVGrid
    lidar: PillarVoxelizer
    radar: PillarVoxelizer
    geometry: RigGeometry
    rig: Rig = NUSCENES_RIG

    @property
    def input_names(self) -> tuple[str, ...]:
        return core_input_names(self.geometry.input_names)

    def to_json(self) -> dict[str, Any]:
        return {
            "image_size": list(self.image_size), "image_layout": "RGB, (B, N, 3, H, W), the rig's N cameras in its order",
            "rig": self.rig.to_json(),
            "pixel_mean": list(self.pixel_mean), "pixel_std": list(self.pixel_std),
            "normalization": "float32(image_uint8 - pixel_mean) / pixel_std",
            "grid": asdict(self.grid), "lidar": self.lidar.to_json(), "radar": self.radar.to_json(),
            "view_transform": self.geometry.to_json(),
        }

    @staticmethod
    def from_json(d: dict[str, Any], read_geometry: Callable[[dict[str, Any], BEVGrid, tuple[int, int]], RigGeometry]
                  ) -> "PreprocessSpec":
        """The spec a manifest records; `read_geometry` (``perception.model.build.rig_geometry_from_json``)
        makes the view transform's geometry from its ``view_transform`` entry."""
        grid = BEVGrid(**d["grid"])
        image_size = (int(d["image_size"][0]), int(d["image_size"][1]))
        return PreprocessSpec(
            image_size=image_size, pixel_mean=tuple(d["pixel_mean"]), pixel_std=tuple(d["pixel_std"]), grid=grid,
            lidar=PillarVoxelizer.from_json(d["lidar"], grid), radar=PillarVoxelizer.from_json(d["radar"], grid),
            geometry=read_geometry(d["view_transform"], grid, image_size),
            rig=Rig.from_json(d["rig"]) if "rig" in d else NUSCENES_RIG,  # manifests before the rig: nuScenes
        )


class Preprocessor:
    """`Batch` -> `CoreInputs` on the batch's device (see the module docstring).

    Args:
        spec: the settings.
        cache_size: calibrations whose geometry is kept (0: none kept, nothing hashed).
    """

    def __init__(self, spec: PreprocessSpec, cache_size: int = 8):
        self.spec = spec
        self._cache: OrderedDict[tuple, tuple[Tensor, ...]] = OrderedDict()
        self._cache_size = cache_size

    def normalize(self, images: Tensor) -> Tensor:
        """(B, N, 3, H, W) uint8 RGB -> float32 ``(image - pixel_mean) / pixel_std``."""
        mean = torch.tensor(self.spec.pixel_mean, dtype=torch.float32, device=images.device).view(3, 1, 1)
        std = torch.tensor(self.spec.pixel_std, dtype=torch.float32, device=images.device).view(3, 1, 1)
        return (images.float() - mean) / std

    def geometry(self, cam2img: Tensor, cam2lidar: Tensor, cache: bool = True,
                 camera_mask: Tensor | None = None) -> tuple[Tensor, ...]:
        """The camera-geometry inputs for a rig: cam2img (B, N, 3, 3), cam2lidar (B, N, 4, 4), camera_mask (B, N)
        bool or None (every camera present)."""
        if camera_mask is not None and bool(camera_mask.all()):
            camera_mask = None
        if not cache or self._cache_size == 0:
            return self.spec.geometry(cam2img, cam2lidar, camera_mask)
        digest = hashlib.sha1(cam2img.float().cpu().numpy().tobytes() + cam2lidar.float().cpu().numpy().tobytes())
        if camera_mask is not None:
            digest.update(camera_mask.bool().cpu().numpy().tobytes())
        key = (str(cam2img.device), tuple(cam2img.shape), camera_mask is not None, digest.hexdigest())
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit
        out = self.spec.geometry(cam2img, cam2lidar, camera_mask)
        self._cache[key] = out
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return out

    @torch.no_grad()
    def __call__(self, batch: Batch, modality_mask: Tensor | None = None, cache: bool = True) -> CoreInputs:
        """The core's inputs for `batch`; `modality_mask` (B, 3) bool replaces the batch's (modality dropout);
        `cache`: look the rig geometry up in the cache (training, where every rig is new, passes False).
        Runs in float32 whatever the caller's autocast (frustum points and pillar decorations in metres)."""
        if tuple(batch.images.shape[-2:]) != tuple(self.spec.image_size):
            raise ValueError(f"images are {tuple(batch.images.shape[-2:])} (H, W) but the core takes {self.spec.image_size}")
        if batch.images.shape[1] != len(self.spec.rig.cameras):
            raise PerceptionError(f"the batch has {batch.images.shape[1]} cameras but the model's rig has "
                                  f"{len(self.spec.rig.cameras)} ({', '.join(self.spec.rig.camera_names)})")
        with torch.autocast(batch.images.device.type, enabled=False):
            return self._prepare(batch, modality_mask, cache)

    def _prepare(self, batch: Batch, modality_mask: Tensor | None, cache: bool) -> CoreInputs:
        return CoreInputs(
            images=self.normalize(batch.images),
            geometry=self.geometry(batch.cam2img, batch.cam2lidar, cache, batch.camera_mask),
            geometry_names=self.spec.geometry.input_names,
            lidar=self.spec.lidar(batch.points_lidar, batch.num_points_lidar),
            radar=self.spec.radar(batch.points_radar, batch.num_points_radar),
            modality_mask=(batch.modality_mask if modality_mask is None else modality_mask).bool(),
        )
