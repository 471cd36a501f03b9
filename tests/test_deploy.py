"""Deployment: the plugin-free core and its pooling plan, ONNX export and manifest, ONNX Runtime against
PyTorch on the synthetic dataset, INT8 Q/DQ export, the TensorRT compatibility check, `perception eval
--backend onnx`, `perception bench latency`, and TensorRT (skipped without TensorRT and CUDA).

Small sizes throughout (config overrides): 64x176 images and a 64 x 64 BEV grid of 1.6 m cells. One random
checkpoint is exported once per module (with INT8) through the CLI and shared by the tests.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper
from typer.testing import CliRunner

from deploy.core import OUTPUT_NAMES
from deploy.export import Manifest, export_stage_graphs
from deploy.quantize import SENSITIVE_NODES
from deploy.runners import OnnxRuntimeExecutor, load_runner
from deploy.trt_compat import SOURCE_VERSION, SUPPORTED_OPS, check_model, check_onnx
from perception.checkpoint import save_atomic
from perception.cli import app
from perception.config import load_config
from perception.data.build import build_dataset
from perception.data.collate import collate_samples
from perception.errors import PerceptionError
from fusion.bev_pool import gather_bev, make_pooling_plan, pool_with_plan
from perception.model.build import build_model
from perception.model.synthetic import make_synthetic_batch
from perception.structures import BEVGrid

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["data.image_size=[64, 176]", "grid.cell=1.6", "model.fuser.modality_dropout=0"]
BEV_SAMPLE = ["model.view_transform={kind: bev_sample, z_levels: 4, out_channels: 32}", "loss.depth=0"]


def small_model(*extra: str, seed: int = 0):
    torch.manual_seed(seed)
    cfg = load_config(ROOT / "configs" / "tiny.yaml", [*SMALL, *extra])
    model = build_model(cfg).eval()
    # Spread the heatmap logits of the random model, so that decoded scores are far from the threshold and
    # from each other (a random head sits at its 0.1 prior, the score threshold).
    with torch.no_grad():
        model.heads.detection.branches["heatmap"][3].weight.mul_(30.0)
    return cfg, model


@pytest.fixture(scope="module")
def exported(synth_root, tmp_path_factory):
    """A random tiny checkpoint in the trainer's format, exported with INT8 by `perception export`."""
    cfg, model = small_model()
    work = tmp_path_factory.mktemp("deploy")
    ckpt = work / "random.pt"
    save_atomic({"model": model.state_dict(), "ema": None, "config": cfg.model_dump(mode="json"), "step": 0}, ckpt)
    out = work / "export"
    res = CliRunner().invoke(app, ["export", "--checkpoint", str(ckpt), "--out", str(out), "--int8", "--calib-data",
                                   str(synth_root), "--calib-samples", "3"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    return cfg, model, ckpt, out


def _dataset_batches(cfg, synth_root, model, split: str, count: int, batch_size: int = 2):
    ds = build_dataset(cfg, synth_root, "v1.0-mini", split, train=False, map_grid=model.map_grid)
    return [collate_samples([ds[(i * batch_size + j) % len(ds)] for j in range(batch_size)]) for i in range(count)]


# ------------------------------------------------------------------------------------------ the core


def _add_at(rows: np.ndarray, index: np.ndarray, num: int) -> np.ndarray:
    """Independent oracle: numpy's unbuffered sum of rows (R, C) into `num` output rows, float64."""
    out = np.zeros((num, rows.shape[1]), np.float64)
    np.add.at(out, index, rows.astype(np.float64))
    return out


def test_pooling_plan_sums_like_numpy_add_at():
    grid = BEVGrid(x_min=-4, x_max=4, y_min=-4, y_max=4, cell=1.0)  # 8 x 8 cells
    cells = grid.height * grid.width
    gen = torch.Generator().manual_seed(0)
    # 2 samples x 300 points: most in a few cells (up to 100+ points, several segments and merges), some dropped.
    geometry = torch.randint(0, 5, (2, 300), generator=gen) ** 2
    geometry[:, ::7] = cells
    rows = torch.randn(600, 3, generator=gen, dtype=torch.float64)
    plan = make_pooling_plan(geometry, grid, segment_size=4)
    assert plan.segments.shape[1] == 4 and plan.merges.shape[0] >= 1 and plan.cells.shape == (2, 8, 8)
    got = pool_with_plan(rows, *plan.as_tuple())  # (2, 3, 8, 8)
    offsets = np.arange(2)[:, None] * (cells + 1)
    expected = _add_at(rows.numpy(), (geometry.numpy() + offsets).ravel(), 2 * (cells + 1)).reshape(2, cells + 1, 3)[:, :cells]
    np.testing.assert_allclose(got.permute(0, 2, 3, 1).reshape(2, cells, 3).numpy(), expected, rtol=1e-12, atol=1e-12)
    # Nothing lands on the grid: one all-padding segment, every cell empty.
    empty = make_pooling_plan(torch.full((1, 10), cells), grid)
    assert empty.segments.shape[0] == 1 and bool((empty.cells == empty.segments.shape[0] + empty.merges.shape[0]).all())
    assert not pool_with_plan(torch.randn(10, 3), *empty.as_tuple()).any()


def test_camera_bev_of_the_model_equals_a_scatter_sum_of_each_samples_own_rig():
    """The model's lift-splat BEV against numpy add.at of depth x context over each frustum point's cell, for a
    batch whose two samples have different rigs (the second moved 3 m forward)."""
    cfg, model = small_model()
    batch = make_synthetic_batch(batch_size=2, image_size=cfg.data.image_size, grid=model.grid, seed=5)
    batch.cam2lidar[1, :, 1, 3] += 3.0
    inputs = model.prepare(batch)
    vt = model.view_transform
    with torch.no_grad():
        depth, context = vt.lift(model.camera_encoder(inputs.images))
        bev = vt.splat(depth, context, *inputs.geometry)
    frustum = vt.rig_geometry.frustum_bev_index(batch.cam2img, batch.cam2lidar).numpy()  # (2, N*D*h*w)
    cells = model.grid.height * model.grid.width
    c = vt.out_channels
    volume = (depth[:, :, None] * context[:, None]).permute(0, 1, 3, 4, 2).reshape(2, -1, c).numpy()
    for b in range(2):
        expected = _add_at(volume[b], frustum[b], cells + 1)[:cells]
        np.testing.assert_allclose(bev[b].permute(1, 2, 0).reshape(cells, c).numpy(), expected, rtol=1e-4, atol=1e-5)
    assert not np.array_equal(frustum[0], frustum[1])


def test_pillars_land_on_their_cells_and_an_empty_batch_is_one_padding_pillar():
    cfg, model = small_model()
    batch = make_synthetic_batch(batch_size=2, image_size=cfg.data.image_size, grid=model.grid, seed=5,
                                 lidar_points_per_sample=[0, None])
    pillars = model.prepare(batch).lidar
    enc = model.lidar_encoder
    with torch.no_grad():
        rows = enc.pool(pillars.features, pillars.point_mask)
        placed = gather_bev(rows, pillars.bev_index)  # what the encoder's backbone reads
    # Oracle: every cell of each pillar's flat key, from the pillar-centre decoration and the point offsets.
    xy = (pillars.features[..., :2] - pillars.features[..., -2:])[:, 0]  # a real point minus its offset to the centre
    col = torch.floor((xy[:, 0] - model.grid.x_min) / model.grid.cell).long()
    row = torch.floor((xy[:, 1] - model.grid.y_min) / model.grid.cell).long()
    assert int((pillars.bev_index[0] < len(rows)).sum()) == 0  # sample 0 has no LiDAR points
    b, r, cc = torch.nonzero(pillars.bev_index < len(rows), as_tuple=True)
    k = pillars.bev_index[b, r, cc]
    assert torch.equal(row[k], r) and torch.equal(col[k], cc)
    torch.testing.assert_close(placed[b, :, r, cc], rows[k])
    assert not placed[0].any()
    # No pillar in the whole batch: one padding pillar, every cell reads zeros: the LiDAR BEV is the backbone of zeros.
    empty = make_synthetic_batch(batch_size=1, image_size=cfg.data.image_size, grid=model.grid, lidar_points_per_sample=[0])
    lidar = model.prepare(empty).lidar
    assert lidar.features.shape[0] == 1 and bool((lidar.bev_index == 1).all())
    with torch.no_grad():
        zeros = torch.zeros(1, rows.shape[1], *model.grid.shape)
        torch.testing.assert_close(enc(*lidar.as_tuple()), enc.backbone(zeros))


def test_manifest_describes_the_graphs(exported):
    cfg, model, _, out = exported
    manifest = Manifest.read(out)
    raw = json.loads((out / "manifest.json").read_text())
    for key in ("inputs", "outputs", "dynamic_axes", "preprocessing", "postprocessing", "bev_grid", "map_grid", "classes", "config"):
        assert key in raw, key
    assert manifest.graphs == {"fp32": "core.onnx", "int8": "core.int8.onnx"}
    assert manifest.input_names == model.preprocess_spec().input_names
    assert manifest.output_names == OUTPUT_NAMES
    heatmap = next(t for t in manifest.outputs if t.name == "heatmap")
    assert heatmap.dtype == "float32" and heatmap.shape == ("batch", 10, 64, 64)
    assert raw["classes"]["detection"][0] == "car" and raw["preprocessing"]["image_size"] == [64, 176]
    assert raw["quantization"]["calibration_samples"] == 3 and "modelopt" in raw["quantization"]["tool"]
    graph = onnx.load(str(out / "core.onnx"))
    assert graph.opset_import[0].version >= 17
    assert [i.name for i in graph.graph.input] == list(manifest.input_names)
    # The TensorRT profile of every input covers the example shapes.
    lo, opt, hi = manifest.profile(next(t for t in manifest.inputs if t.name == "lidar_features"))
    assert lo[0] == 1 and hi[0] >= opt[0] and lo[1:] == opt[1:] == hi[1:]


def test_profiles_cover_the_calibration_rig_with_margin(exported, synth_root):
    """`--calib-data` sizes the pooling-plan axes of the TensorRT profiles to the dataset's own rig."""
    cfg, model, _, out = exported
    manifest = Manifest.read(out)
    assert "widened to 1.25 x the largest of 3 samples" in manifest.source["profiles"]
    (batch,) = _dataset_batches(cfg, synth_root, model, "mini_train", count=1, batch_size=1)
    feeds = manifest.preprocessor()(batch).named()
    for name, axis, dim in (("pool_segments", 0, "pool_segments"), ("pool_merges", 1, "pool_merge_width")):
        assert manifest.dynamic_axes[dim]["max"] >= 1.25 * feeds[name].shape[axis], dim


def test_onnxruntime_agrees_with_pytorch_on_synthetic_samples(exported, synth_root):
    cfg, model, _, out = exported
    runner = load_runner("onnx", out)
    for batch in _dataset_batches(cfg, synth_root, model, "mini_val", count=2):
        with torch.no_grad():
            expected = model(*model.prepare(batch).as_args())
        got = runner.infer(runner.preprocessor(batch).named())
        assert float((got["heatmap"] - expected["heatmap"]).abs().max()) <= 1e-3
        torch_preds, onnx_preds = model.predict(batch), runner.predict(batch)
        assert any(len(p.boxes_lidar) for p in torch_preds)
        for a, b in zip(torch_preds, onnx_preds):
            assert len(a.boxes_lidar) == len(b.boxes_lidar)
            for centre, label in zip(a.boxes_lidar.center, a.labels):
                same = b.labels == label
                assert same.any() and float(torch.linalg.norm(b.boxes_lidar.center[same] - centre, dim=1).min()) <= 0.01
            torch.testing.assert_close(b.map_probs, a.map_probs, rtol=0, atol=1e-4)


def test_int8_qdq_graph_runs_in_onnxruntime(exported, synth_root, tmp_path):
    cfg, model, _, out = exported
    graph = onnx.load(str(out / "core.int8.onnx"))
    ops = {n.op_type for n in graph.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    # The sensitive layers stay in FP32: no Q/DQ feeds the pillar feature nets, the attention products or the
    # detection outputs; the BEV decoder's convolutions are quantised.
    dq_outputs = {o for n in graph.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    quantized = {n.name for n in graph.graph.node if dq_outputs & set(n.input)}
    sensitive = [n.name for n in graph.graph.node if n.name.startswith(("/model/lidar_encoder/pfn/", "/model/heads/detection/heatmap/heatmap.3/"))
                 or n.name.endswith(("/attn/MatMul", "/attn/MatMul_1"))]
    assert len(sensitive) >= 3 and not quantized & set(sensitive)
    assert "/model/bev_decoder/stage1/stage1.0/Conv" in quantized
    (batch,) = _dataset_batches(cfg, synth_root, model, "mini_train", count=1)
    fp32, int8 = load_runner("onnx", out), load_runner("onnx", out / "core.int8.onnx")
    inputs = fp32.preprocessor(batch).named()
    a, b = fp32.infer(inputs), int8.infer(inputs)
    assert b["heatmap"].shape == a["heatmap"].shape and torch.isfinite(b["heatmap"]).all()
    assert float((a["heatmap"] - b["heatmap"]).abs().max()) < 0.1 * float(a["heatmap"].abs().max())
    assert len(int8.predict(batch)) == 2
    # The fallback quantiser (onnxruntime's static QDQ) for machines where ModelOpt does not import, in a
    # process of its own: ModelOpt patches onnxruntime's quantisation modules when it runs.
    np.savez(tmp_path / "feeds.npz", **{k: v.numpy() for k, v in inputs.items()})
    script = ("import sys, numpy as np; from deploy.quantize import quantize_graph; "
              "feeds = [dict(np.load(sys.argv[3]))]; "
              "info = quantize_graph(sys.argv[1], sys.argv[2], feeds, tool='onnxruntime'); print(info['tool'])")
    done = subprocess.run([sys.executable, "-c", script, str(out / "core.onnx"), str(tmp_path / "ort.int8.onnx"),
                           str(tmp_path / "feeds.npz")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "onnxruntime" in done.stdout, done.stderr[-2000:]
    assert check_onnx(tmp_path / "ort.int8.onnx").ok
    c = OnnxRuntimeExecutor(tmp_path / "ort.int8.onnx").run(inputs)
    assert float((a["heatmap"] - c["heatmap"]).abs().max()) < 0.1 * float(a["heatmap"].abs().max())


def test_every_sensitive_node_pattern_names_nodes_of_the_core(exported):
    """A renamed module must not silently quantise a layer meant to stay in FP32."""
    names = [n.name for n in onnx.load(str(exported[3] / "core.onnx")).graph.node]
    for pattern in SENSITIVE_NODES:
        assert any(re.match(pattern, n) for n in names), pattern


def test_eval_backend_onnx_on_an_export_directory(exported, synth_root, tmp_path):
    _, _, _, out = exported
    res = CliRunner().invoke(app, ["eval", "--backend", "onnx", "--checkpoint", str(out), "--data", str(synth_root),
                                   "--split", "mini_val", "--out", str(tmp_path), "--workers", "0"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["num_samples"] == 6 and "onnxruntime core.onnx" in metrics["backend"]
    for key in ("nds", "map", "seg_miou", "scene_map"):
        assert key in metrics
    with pytest.raises(PerceptionError, match="export directory"):
        load_runner("onnx", tmp_path / "nowhere")


# ------------------------------------------------------------------------------- TensorRT compatibility


def _custom_op_model() -> onnx.ModelProto:
    node = helper.make_node("BEVPoolV2", ["x", "idx"], ["y"], domain="com.example", name="bev_pool")
    graph = helper.make_graph([node], "custom", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 8]),
                                                 helper.make_tensor_value_info("idx", TensorProto.INT64, [4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)])


def test_trt_compatibility_check(exported, tmp_path):
    cfg, model, _, out = exported
    assert "GridSample" in SUPPORTED_OPS and "Unique" not in SUPPORTED_OPS and SOURCE_VERSION.startswith("TensorRT 10")
    graphs = [out / "core.onnx", out / "core.int8.onnx"]
    # The stage graphs of both view transforms, and the whole core of Simple-BEV.
    for kind, extra in (("lift_splat", ()), ("bev_sample", BEV_SAMPLE)):
        c, m = (cfg, model) if kind == "lift_splat" else small_model(*extra)
        batch = make_synthetic_batch(batch_size=1, image_size=c.data.image_size, grid=m.grid)
        staged = export_stage_graphs(m, m.prepare(batch).named(), tmp_path / kind)
        graphs += staged.values()
        if kind == "lift_splat":  # the stages cut the core: together they hold its convolutions, each once
            convs = lambda p: sum(n.op_type == "Conv" for n in onnx.load(str(p)).graph.node)  # noqa: E731
            assert sum(convs(p) for p in staged.values()) == convs(out / "core.onnx")
    for path in graphs:
        report = check_onnx(path)
        assert report.ok, report.format()
        assert report.num_nodes > 0 and not any(op.startswith("com.") for op in report.op_types)

    report = check_model(_custom_op_model(), "custom")
    assert not report.ok and "custom operator of domain 'com.example'" in report.format()

    # scatter_add BEV pooling (which the model no longer has) would need TensorRT's ScatterElements plugin.
    scatter = helper.make_node("ScatterElements", ["x", "idx", "u"], ["y"], reduction="add", name="splat")
    maxpool = helper.make_node("MaxPool", ["y"], ["z"], kernel_shape=[3, 3], dilations=[2, 2], name="pool")
    bogus = helper.make_node("Relu", ["z"], ["w"], alpha=1.0, name="relu")
    graph = helper.make_graph([scatter, maxpool, bogus], "g",
                              [helper.make_tensor_value_info(n, t, s) for n, t, s in (
                                  ("x", TensorProto.FLOAT, [1, 1, 8, 8]), ("idx", TensorProto.INT64, [1, 1, 8, 8]),
                                  ("u", TensorProto.FLOAT, [1, 1, 8, 8]))],
                              [helper.make_tensor_value_info("w", TensorProto.FLOAT, None)])
    text = check_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])).format()
    assert "ScatterElements plugin" in text and "dilations" in text and "attribute 'alpha'" in text


# ---------------------------------------------------------------------------------------------- bench


@pytest.mark.parametrize("backend", ["torch", "onnx"])
def test_bench_latency_cli(backend, tmp_path):
    out = tmp_path / "latency.json"
    res = CliRunner().invoke(app, ["bench", "latency", "--config", str(ROOT / "configs" / "tiny.yaml"), "--backend", backend,
                                   "--iterations", "3", "--warmup", "1", "--points", "3000", "--out", str(out), *SMALL])
    assert res.exit_code == 0, res.output + repr(res.exception)
    result = json.loads(out.read_text())
    assert result["total_ms"]["median"] > 0 and result["throughput_samples_per_s"] > 0
    for stage in ("pre_process", "camera", "bev_pooling", "lidar", "radar", "fuse_heads", "post_process"):
        assert result["stages_ms"][stage]["p99"] >= result["stages_ms"][stage]["median"] > 0, stage
    assert "bev_pooling" in res.output and "total" in res.output


# -------------------------------------------------------------------------------------------- TensorRT


def test_tensorrt_missing_is_a_clear_error(exported, tmp_path):
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("TensorRT is installed")
    _, _, _, out = exported
    res = CliRunner().invoke(app, ["build-engine", "--onnx", str(out / "core.onnx"), "--precision", "fp16",
                                   "--out", str(tmp_path / "core.engine")])
    assert isinstance(res.exception, PerceptionError) and "TensorRT is not installed" in str(res.exception)


@pytest.mark.gpu
@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is None or not torch.cuda.is_available(),
                    reason="needs TensorRT and CUDA")  # a marker, so the export fixtures are not built to be skipped
@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_tensorrt_engine_agrees_with_onnxruntime(exported, synth_root, precision, tmp_path):
    from deploy.tensorrt import build_engine

    cfg, model, _, out = exported
    graph = out / ("core.int8.onnx" if precision == "int8" else "core.onnx")
    engine = build_engine(graph, out / f"core.{precision}.engine", precision=precision)
    assert Manifest.read(out).engines[precision] == engine.name
    trt_runner = load_runner("tensorrt", engine)
    ort_runner = load_runner("onnx", graph)
    (batch,) = _dataset_batches(cfg, synth_root, model, "mini_val", count=1)
    a = ort_runner.infer(ort_runner.preprocessor(batch).named())
    b = trt_runner.infer(trt_runner.preprocessor(batch.to("cuda")).named())
    tolerance = {"fp32": 1e-3, "fp16": 5e-2, "int8": 0.1 * float(a["heatmap"].abs().max())}[precision]
    assert float((a["heatmap"] - b["heatmap"].cpu()).abs().max()) <= tolerance
    assert len(trt_runner.predict(batch.to("cuda"))) == 2
    np.testing.assert_equal(b["scene"].shape, a["scene"].shape)
