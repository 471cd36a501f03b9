"""Export to ONNX, quantisation, TensorRT engines, runtimes and latency benchmarks."""
