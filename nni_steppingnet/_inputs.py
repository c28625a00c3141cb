"""How example inputs are passed to a model (tensor, tuple or dict, as torch-pruning accepts)."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

__all__ = ["batch_size", "call_model"]


def batch_size(example_inputs: Any) -> int:
    """Batch dimension of the first tensor in ``example_inputs``."""
    if isinstance(example_inputs, torch.Tensor):
        if example_inputs.dim() == 0:
            raise ValueError("example_inputs must have a batch dimension, e.g. torch.randn(1, 3, 32, 32)")
        return int(example_inputs.shape[0])
    if isinstance(example_inputs, (list, tuple)) and example_inputs:
        return batch_size(example_inputs[0])
    if isinstance(example_inputs, dict) and example_inputs:
        return batch_size(next(iter(example_inputs.values())))
    raise ValueError("example_inputs must be a tensor (or a tuple/dict of tensors) with a batch "
                     f"dimension, got {type(example_inputs).__name__}")


def call_model(model: nn.Module, example_inputs: Any) -> Any:
    """Call ``model`` on ``example_inputs`` the way torch-pruning does."""
    if isinstance(example_inputs, dict):
        return model(**example_inputs)
    if isinstance(example_inputs, (list, tuple)):
        return model(*example_inputs)
    return model(example_inputs)
