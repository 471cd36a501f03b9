#!/usr/bin/env bash
# Every check that needs an NVIDIA GPU, in one run (for a lent GPU machine; CI never has one).
# Usage: bash benchmarks/gpu.sh [OUT_DIR]    (about 10 minutes on one H200, install included)
#   1. install (torch/torchvision pinned as in the Makefile) and print the GPU;
#   2. the `gpu` tests (TensorRT ones skip unless tensorrt is installed);
#   3. 50 steps of configs/base.yaml with mixed precision (train.amp=auto -> bf16 on CUDA) on a small
#      synthetic set: finite losses, step time and peak memory;
#   4. torch latency of base.yaml on CUDA.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-${OUT:-work_dirs/gpu}}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
  .venv/bin/pip install --quiet torch==2.14.1 torchvision==0.29.1
  .venv/bin/pip install --quiet "numpy<2" -e ".[dev]"
fi
PY=.venv/bin/python
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0), 'bf16', torch.cuda.is_bf16_supported())" | tee "$OUT/env.txt"
$PY -m pytest -q -m gpu tests 2>&1 | tee "$OUT/gpu_tests.txt" || true
DATA=${DATA:-work_dirs/gpu-synth}
[ -d "$DATA/v1.0-mini" ] || .venv/bin/perception data synth --out "$DATA" --scenes 4 --samples-per-scene 10 --lidar-sweeps 9
/usr/bin/time -v .venv/bin/perception train --config configs/base.yaml --data "$DATA" --work-dir "$OUT/base_amp" \
  --max-steps 50 --device cuda train.amp=auto train.log_every=5 train.num_workers=8 2>&1 | tee "$OUT/base_amp.txt"
.venv/bin/perception bench latency --config configs/base.yaml --backend torch --device cuda --out "$OUT/latency_torch_cuda.json" 2>&1 | tee "$OUT/latency.txt"
echo "wrote $OUT"
