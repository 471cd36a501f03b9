#!/usr/bin/env bash
# Every check that needs an NVIDIA GPU, in one run, for a lent GPU machine (CI never has one):
# benchmarks/gpu.py writes OUT_DIR/gpu.json and prints a table (its docstring lists the sections).
# Usage: bash benchmarks/gpu.sh [OUT_DIR [gpu.py options]]      (about 7 minutes on one H200)
# Python: .venv/bin/python where the checkout has one (`make install`), else the machine's python3 with its own
# PyTorch (a GPU machine's image); wheels carried in .whl/ (the packages that image lacks) go to /tmp/site first.
# Without an NVIDIA GPU it says so and exits 0 at once.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-${OUT:-work_dirs/gpu}}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ! nvidia-smi -L >/dev/null 2>&1; then
  echo "no NVIDIA GPU here (nvidia-smi finds none): nothing to measure"
  exit 0
fi
if [ -x .venv/bin/python ]; then
  PY=.venv/bin/python
else
  PY=python3
  if compgen -G ".whl/*.whl" >/dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/nvidia-smi.txt"
exec "$PY" benchmarks/gpu.py --out "$OUT" "${@:2}"
