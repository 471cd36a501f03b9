#!/usr/bin/env bash
# Wheels of the packages that a GPU machine's own image lacks (it has PyTorch, timm, onnx, numpy, opencv, ... but
# no package index), in the versions that ran on an H200 on 2026-11-30. `benchmarks/gpu.sh` installs them into
# /tmp/site there: carry the folder (default .whl/, which git should ignore: `echo /.whl/ >> .git/info/exclude`).
# Usage: bash benchmarks/gpu_wheels.sh [DIR] [PYTHON_VERSION]      (the GPU machine's Python, default 3.12)
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-.whl}
PYV=${2:-3.12}
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version "$PYV" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$DIR" \
  nuscenes-devkit==1.2.0 pyquaternion==0.9.9 shapely==2.0.7 descartes==1.1.0 pydantic==2.14.4 pydantic_core==2.50.5 \
  annotated_types==0.8.0 typing_inspection==0.4.5 timm==1.0.31 motmetrics==1.4.0 cachetools==8.0.2
ls "$DIR"
