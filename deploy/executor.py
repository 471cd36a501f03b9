"""The executor interface of the deploy runners: one graph, named input tensors -> named output tensors.
Implemented by `deploy.runners` (torch, ONNX Runtime) and `deploy.tensorrt`."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor


class Executor(ABC):
    """Runs one graph: named input tensors -> named output tensors (on `device`)."""

    device: torch.device
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]

    @abstractmethod
    def run(self, inputs: dict[str, Tensor]) -> dict[str, Tensor]:
        """Outputs for `inputs` (extra keys are ignored); returns when the outputs are ready to read."""


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
