"""Deployment of the fused BEV model: plugin-free ONNX, INT8 quantisation, TensorRT engines, runtimes, latency.

  - `deploy.core`: the exported graphs: `BEVFusionModel.forward` itself with flat named inputs, and its stages;
  - `deploy.postprocess`: the post-processing settings every runtime records (the decoding is the model's own;
    pre-processing is `perception.model.preprocess`, built from the manifest);
  - `deploy.export`: ``perception export`` (ONNX graphs and ``manifest.json``, whose type is `deploy.manifest`);
  - `deploy.quantize`: INT8 Q/DQ post-training quantisation (NVIDIA ModelOpt);
  - `deploy.trt_compat`: the static check against TensorRT 10's ONNX parser;
  - `deploy.runners`, `deploy.tensorrt`: PyTorch, ONNX Runtime and TensorRT behind one interface
    (`deploy.executor`), and ``perception eval --backend onnx|tensorrt`` (`deploy.runners.evaluate_export`);
  - `deploy.bench`: ``perception bench latency``.

No model arithmetic lives in `deploy`: it exports, quantises, builds engines, runs and times the model's core.
"""
