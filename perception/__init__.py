"""Multimodal BEV perception: data, camera model, heads, training, evaluation and CLI."""

import os

# numpy's OpenBLAS is used only for small products in the data pipeline (3x3 and 4x4 transforms of point
# clouds), where its worker threads spin against torch's and the DataLoader workers: one thread is up to 10x
# faster there. torch keeps its own thread pool. Set before numpy loads; an explicit setting wins.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

__version__ = "0.1.0"
