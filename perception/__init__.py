"""Multimodal BEV perception: data, camera model, heads, training, evaluation and CLI."""

__version__ = "0.1.0"
