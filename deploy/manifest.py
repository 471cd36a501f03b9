"""The export manifest (`manifest.json`): what an export directory holds and everything its runners need
(graph files, tensor specs and dynamic ranges, pre- and post-processing, grids, the experiment config)."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from deploy.postprocess import Postprocessor, PostprocessSpec
from perception.model.preprocess import Preprocessor, PreprocessSpec
from perception.config import ExperimentConfig, config_from_dict
from perception.errors import PerceptionError
from perception.model.build import rig_geometry_from_json
from perception.structures import ATTRIBUTES, DETECTION_CLASSES, MAP_CLASSES, SCENE_TAGS, BEVGrid

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "perception-deploy/1"
CORE_GRAPH = "core.onnx"


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output: dtype as numpy names it, shape with named dynamic axes."""

    name: str
    dtype: str
    shape: tuple[int | str, ...]
    description: str = ""


@dataclass
class Manifest:
    """The contents of ``manifest.json`` (see the module docstring). `directory` is where it was read from."""

    graphs: dict[str, str]
    opset: int
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    dynamic_axes: dict[str, dict[str, int]]
    preprocessing: PreprocessSpec
    postprocessing: PostprocessSpec
    map_grid: BEVGrid
    config: dict[str, Any]
    source: dict[str, Any] = field(default_factory=dict)
    quantization: dict[str, Any] | None = None
    compatibility: dict[str, Any] = field(default_factory=dict)
    engines: dict[str, str] = field(default_factory=dict)
    directory: Path | None = None

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.inputs)

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.outputs)

    def input_spec(self, name: str) -> "TensorSpec":
        """The `TensorSpec` of input `name`."""
        for t in self.inputs:
            if t.name == name:
                return t
        raise PerceptionError(f"{self.directory or 'manifest'}: the core has no input {name!r} (inputs: {self.input_names})")

    @property
    def temporal(self) -> bool:
        """The core takes the previous keyframe's fused BEV (a temporal model's export)."""
        return "prev_bev" in self.input_names

    def experiment_config(self) -> ExperimentConfig:
        return config_from_dict(self.config, source=f"{self.directory or 'manifest'} config")

    def preprocessor(self) -> Preprocessor:
        return Preprocessor(self.preprocessing)

    def postprocessor(self) -> Postprocessor:
        return Postprocessor(self.postprocessing)

    def graph_path(self, precision: str = "fp32") -> Path:
        if precision not in self.graphs:
            raise PerceptionError(f"{self.directory}: no {precision} graph in the export (has {sorted(self.graphs)})")
        return Path(self.directory or ".") / self.graphs[precision]

    def profile(self, spec: TensorSpec) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        """(min, opt, max) shapes of an input for a TensorRT optimisation profile."""
        shapes = []
        for key in ("min", "opt", "max"):
            shapes.append(tuple(d if isinstance(d, int) else self.dynamic_axes[d][key] for d in spec.shape))
        return tuple(shapes)  # type: ignore[return-value]

    def to_json(self) -> dict[str, Any]:
        return {
            "format": MANIFEST_FORMAT,
            "graphs": self.graphs,
            "engines": self.engines,
            "opset": self.opset,
            "inputs": [asdict(t) | {"shape": list(t.shape)} for t in self.inputs],
            "outputs": [asdict(t) | {"shape": list(t.shape)} for t in self.outputs],
            "dynamic_axes": self.dynamic_axes,
            "preprocessing": self.preprocessing.to_json(),
            "postprocessing": self.postprocessing.to_json(),
            "bev_grid": asdict(self.preprocessing.grid),
            "map_grid": asdict(self.map_grid),
            "classes": {"detection": list(DETECTION_CLASSES), "attributes": list(ATTRIBUTES), "map": list(MAP_CLASSES),
                        "scene_tags": list(SCENE_TAGS)},
            "quantization": self.quantization,
            "compatibility": self.compatibility,
            "source": self.source,
            "config": self.config,
        }

    def write(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / MANIFEST_NAME
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=1))
        tmp.replace(path)
        self.directory = directory
        return path

    @staticmethod
    def read(directory: str | Path) -> "Manifest":
        directory = Path(directory)
        path = directory / MANIFEST_NAME
        try:
            raw = json.loads(path.read_text())
        except OSError as exc:
            raise PerceptionError(f"{path}: cannot read the export manifest ({exc.strerror}); is {directory} an export directory?") from None
        except json.JSONDecodeError as exc:
            raise PerceptionError(f"{path}: invalid JSON: {exc}") from None
        if raw.get("format") != MANIFEST_FORMAT:
            raise PerceptionError(f"{path}: format {raw.get('format')!r}, expected {MANIFEST_FORMAT!r}")
        grid = BEVGrid(**raw["bev_grid"])

        def tensors(items: list[dict]) -> list[TensorSpec]:
            return [TensorSpec(t["name"], t["dtype"], tuple(t["shape"]), t.get("description", "")) for t in items]

        return Manifest(
            graphs=dict(raw["graphs"]), opset=int(raw["opset"]), inputs=tensors(raw["inputs"]), outputs=tensors(raw["outputs"]),
            dynamic_axes={k: {kk: int(vv) for kk, vv in v.items()} for k, v in raw["dynamic_axes"].items()},
            preprocessing=PreprocessSpec.from_json(raw["preprocessing"], rig_geometry_from_json),
            postprocessing=PostprocessSpec.from_json(raw["postprocessing"], grid), map_grid=BEVGrid(**raw["map_grid"]),
            config=raw["config"], source=raw.get("source", {}), quantization=raw.get("quantization"),
            compatibility=raw.get("compatibility", {}), engines=dict(raw.get("engines", {})), directory=directory,
        )
