"""Deployment of the fused BEV model: plugin-free ONNX, INT8 quantisation, TensorRT engines, runtimes, latency.

  - `deploy.core`: the deployable core, the model's parts with Gather-based BEV pooling (no plugins);
  - `deploy.preprocess`, `deploy.postprocess`: the pre- and post-processing every runtime shares;
  - `deploy.export`: ``perception export`` (ONNX graphs and ``manifest.json``, whose type is `deploy.manifest`);
  - `deploy.quantize`: INT8 Q/DQ post-training quantisation (NVIDIA ModelOpt);
  - `deploy.trt_compat`: the static check against TensorRT 10's ONNX parser;
  - `deploy.runners`, `deploy.tensorrt`: PyTorch, ONNX Runtime and TensorRT behind one interface
    (`deploy.executor`), and ``perception eval --backend onnx|tensorrt`` (`deploy.runners.evaluate_export`);
  - `deploy.bench`: ``perception bench latency``.
"""
