"""The typed experiment configuration: the shipped files, overrides, and errors that name the key path."""

from __future__ import annotations

from pathlib import Path

import pytest

from perception.config import BEVSampleConfig, ExperimentConfig, LiftSplatConfig, config_from_dict, load_config
from perception.errors import ConfigError, PerceptionError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_tiny_config_is_the_cpu_model():
    cfg = load_config(CONFIGS / "tiny.yaml")
    grid = cfg.grid.build()
    assert cfg.data.image_size == (128, 352)
    assert grid.shape == (128, 128) and grid.cell == pytest.approx(0.8)
    assert cfg.model.camera.backbone.startswith("vit_tiny")
    assert isinstance(cfg.model.view_transform, LiftSplatConfig)


def test_base_config_is_the_bevfusion_sized_model():
    cfg = load_config(CONFIGS / "base.yaml")
    grid = cfg.grid.build()
    assert cfg.data.image_size == (252, 700)  # 18 x 50 patches of DINOv2's 14 pixels
    assert grid.shape == (180, 180) and grid.cell == pytest.approx(0.6)
    assert cfg.model.camera.backbone == "vit_small_patch14_dinov2" and cfg.model.camera.pretrained == "dinov2-small"
    # BEVFusion's nuScenes recipe: rotation +-45 degrees, scaling 0.9-1.1, 0.5 m translation; epochs, CBGS, EMA.
    assert cfg.data.bev_rot_lim_deg == (-45.0, 45.0) and cfg.data.bev_trans_std == (0.5, 0.5, 0.5)
    assert cfg.train.epochs == 6 and cfg.train.cbgs and cfg.train.ema_decay > 0 and cfg.train.lr_batch == 32
    assert cfg.train.gt_sampling and cfg.train.gt_sampling_stop_epoch == 4
    assert cfg.model.lidar.pillar_stride == 3  # 0.2 m pillars under 0.6 m BEV cells


def test_lidar_stage_builds_the_same_model_as_base():
    """Stage 1 (configs/base_lidar.yaml) must load into stage 2 (base.yaml) key for key (--init-from)."""
    lidar, fused = load_config(CONFIGS / "base_lidar.yaml"), load_config(CONFIGS / "base.yaml")
    assert lidar.model.model_copy(update={"fuser": fused.model.fuser}) == fused.model
    assert lidar.data.image_size == fused.data.image_size and lidar.grid == fused.grid
    assert lidar.model.fuser.modality_dropout == (1.0, 0.0, 1.0) and lidar.loss.depth == 0
    assert lidar.train.epochs == 20 and lidar.train.gt_sampling_stop_epoch == 15


def test_overrides_are_parsed_as_yaml_and_the_config_is_frozen():
    cfg = load_config(CONFIGS / "tiny.yaml", ["train.lr=1e-4", "data.image_size=[64, 176]", "model.camera.pretrained=null"])
    assert cfg.train.lr == pytest.approx(1e-4)
    assert cfg.data.image_size == (64, 176)
    assert cfg.model.camera.pretrained is None
    with pytest.raises(Exception):
        cfg.train.lr = 1.0  # type: ignore[misc]


def test_view_transform_kind_selects_the_section_type():
    cfg = load_config(CONFIGS / "tiny.yaml", ["model.view_transform={kind: bev_sample, z_levels: 4}", "loss.depth=0"])
    assert isinstance(cfg.model.view_transform, BEVSampleConfig)
    assert cfg.model.view_transform.z_levels == 4


@pytest.mark.parametrize(
    "override, path",
    [
        ("model.camera.blokcs=2", "model.camera.blokcs"),  # unknown key
        ("model.camera.blocks=many", "model.camera.blocks"),  # wrong type
        ("model.camera.blocks=0", "model.camera.blocks"),  # out of range
        ("model.view_transform.depth_min=near", "model.view_transform.depth_min"),  # inside the tagged union
        ("model.decoder.channels=[32]", "model.decoder.channels"),
        ("loss.heatmapp=1", "loss.heatmapp"),
        ("modle.camera.blocks=2", "modle"),
    ],
)
def test_bad_override_fails_naming_the_key_path(override, path):
    with pytest.raises(ConfigError) as info:
        load_config(CONFIGS / "tiny.yaml", [override])
    message = str(info.value)
    assert f" {path}:" in message or f" {path}." in message, message
    assert "lift_splat." not in message  # pydantic's union tag is not part of the path


def test_bad_key_in_a_yaml_file_names_the_file_and_path(tmp_path):
    text = (CONFIGS / "tiny.yaml").read_text().replace("    blocks: 4\n", "    blocks: 4\n    block: 5\n")
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=r"bad\.yaml: .*model\.camera\.block: Extra inputs"):
        load_config(path)


def test_config_error_is_a_perception_error_so_the_cli_prints_one_line():
    with pytest.raises(PerceptionError):
        config_from_dict({"train": {"lr": "fast"}})


def test_switching_kind_keeps_no_foreign_keys():
    # Switching kind without replacing the section leaves lift-splat keys that bev_sample does not have.
    with pytest.raises(ConfigError, match=r"model\.view_transform\.depth_min: Extra inputs"):
        load_config(CONFIGS / "tiny.yaml", ["model.view_transform.kind=bev_sample", "loss.depth=0"])


def test_depth_loss_needs_lift_splat():
    with pytest.raises(ConfigError, match="loss.depth"):
        load_config(CONFIGS / "tiny.yaml", ["model.view_transform={kind: bev_sample}"])


def test_inconsistent_grid_fails_naming_its_section():
    cfg = load_config(CONFIGS / "tiny.yaml", ["grid.cell=0.7"])
    with pytest.raises(ConfigError, match=r"^grid: .*whole number"):
        cfg.grid.build()
    cfg = load_config(CONFIGS / "tiny.yaml", ["model.heads.map_grid={x_min: -10, x_max: 10, y_min: -10, y_max: 10, cell: 3}"])
    with pytest.raises(ConfigError, match=r"^model\.heads\.map_grid: "):
        cfg.model.heads.map_grid.build("model.heads.map_grid", even=False)


@pytest.mark.parametrize("item", ["model.camera.blocks", "=3", "model.camera.blocks.x=3"])
def test_malformed_override_fails(item):
    with pytest.raises(ConfigError):
        load_config(CONFIGS / "tiny.yaml", [item])


def test_missing_file_and_defaults():
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(CONFIGS / "nope.yaml")
    assert isinstance(config_from_dict({}), ExperimentConfig)
