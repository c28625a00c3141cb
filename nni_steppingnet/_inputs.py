"""How example inputs are passed to a model (tensor, tuple or dict, as torch-pruning accepts)."""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn as nn

__all__ = ["batch_size", "call_model", "describe_shapes", "expected_input", "check_forward", "probe_forward"]


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
    raise ValueError(
        "example_inputs must be a tensor (or a tuple/dict of tensors) with a batch "
        f"dimension, got {type(example_inputs).__name__}"
    )


def call_model(model: nn.Module, example_inputs: Any) -> Any:
    """Call ``model`` on ``example_inputs`` the way torch-pruning does."""
    if isinstance(example_inputs, dict):
        return model(**example_inputs)
    if isinstance(example_inputs, (list, tuple)):
        return model(*example_inputs)
    return model(example_inputs)


def describe_shapes(example_inputs: Any) -> str:
    """``(2, 3, 32, 32)`` for a tensor; tuples and dicts of them element by element."""
    if isinstance(example_inputs, torch.Tensor):
        return str(tuple(example_inputs.shape))
    if isinstance(example_inputs, (list, tuple)):
        return "(" + ", ".join(describe_shapes(item) for item in example_inputs) + ")"
    if isinstance(example_inputs, dict):
        return "{" + ", ".join(f"{key!r}: {describe_shapes(v)}" for key, v in example_inputs.items()) + "}"
    return type(example_inputs).__name__


def expected_input(model: nn.Module) -> str | None:
    """The input shape the model expects, from its first Conv/Linear layer (channels or features)
    and its ``img_size`` attribute or timm ``pretrained_cfg`` (spatial size), e.g. ``(batch, 1, 8, 8)``."""
    first = next((m for m in model.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear))), None)
    if first is None:
        return None
    if isinstance(first, nn.Linear):
        return f"(batch, {first.in_features})"
    dims = 1 if isinstance(first, nn.Conv1d) else 3 if isinstance(first, nn.Conv3d) else 2
    size = getattr(model, "img_size", None)
    if size is None:
        cfg = getattr(model, "pretrained_cfg", None)
        size = cfg.get("input_size", (None,))[1:] if isinstance(cfg, dict) else None
    if isinstance(size, int):
        spatial = [str(size)] * dims
    elif isinstance(size, (list, tuple)) and len(size) == dims and all(isinstance(v, int) for v in size):
        spatial = [str(v) for v in size]
    else:
        spatial = ["H", "W", "D"][:dims] if dims > 1 else ["L"]
    return f"(batch, {first.in_channels}, {', '.join(spatial)})"


def probe_forward(model: nn.Module, example_inputs: Any, handles: Sequence[Any] = ()) -> Any:
    """One forward in eval mode without gradients, for hooks that record what it does; the
    model's mode is restored and ``handles`` (the hooks' removable handles) are removed after it,
    whether it succeeds or not. Returns the output."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return call_model(model, example_inputs)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()


def check_forward(model: nn.Module, example_inputs: Any) -> None:
    """Run the model once on ``example_inputs`` (eval mode, no grad); if the forward fails, raise a
    ``ValueError`` naming the given shape, the expected one and the forward's error."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            call_model(model, example_inputs)
    except Exception as exc:  # any failure of the user's forward on these inputs
        expected = expected_input(model)
        hint = f"; the model expects {expected}" if expected else ""
        cause = " ".join(str(exc).split())
        raise ValueError(
            f"example_inputs of shape {describe_shapes(example_inputs)} do not fit the model"
            f"{hint}: its forward raised {type(exc).__name__}: {cause[:400]}. Pass a batch "
            "shaped like the model's real input"
        ) from exc
    finally:
        model.train(was_training)
