"""`benchmarks/gpu.sh` / `benchmarks/gpu.py` on a machine without a GPU: they say so and exit 0 at once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_sh_without_nvidia_gpu(tmp_path):
    # A PATH with only the basic tools: no nvidia-smi, as on CI.
    env = {**os.environ, "PATH": "/usr/bin:/bin"}
    if subprocess.run(["sh", "-c", "command -v nvidia-smi"], env=env, capture_output=True).returncode == 0:
        pytest.skip("nvidia-smi is on the system path")
    t0 = time.perf_counter()
    proc = subprocess.run(["bash", str(ROOT / "benchmarks/gpu.sh"), str(tmp_path / "out")], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "no NVIDIA GPU here" in proc.stdout
    assert time.perf_counter() - t0 < 10


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_gpu_py_without_cuda(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks/gpu.py"), "--out", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "no CUDA GPU here" in proc.stdout
    assert json.loads((tmp_path / "gpu.json").read_text())["gpu"] is None
