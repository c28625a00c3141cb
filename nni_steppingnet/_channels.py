"""Where the channels of a bare per-channel parameter are (shared by the graph, export, training
and the runtime)."""

from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["parameter_channel_dim", "channels_first_parameters"]

#: modules whose parameters torch-pruning's own pruners handle (never bare parameters)
_WRAPPED: tuple[type[nn.Module], ...] = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose2d,
    nn.Linear,
    nn.Embedding,
    nn.PReLU,
    nn.modules.batchnorm._NormBase,
    nn.LayerNorm,
    nn.GroupNorm,
)


def _is_channels_first_map(param: torch.Tensor) -> bool:
    """``[1, C, H, W]`` with a square map ``H == W > 1`` and ``C != H``: a feature map added to
    NCHW activations (PiT's position embedding)."""
    shape = param.shape
    return param.dim() == 4 and shape[0] == 1 and shape[2] == shape[3] > 1 and shape[1] != shape[2]


def parameter_channel_dim(param: torch.Tensor) -> int:
    """The channel dimension of a bare parameter: its last non-singleton one (torch-pruning's
    default: a layer scale ``[C]`` or ``[C, 1, 1]``, a ViT's ``pos_embed [1, N, C]``), except for a
    channels-first feature map ``[1, C, H, W]`` with ``H == W > 1`` (PiT's ``pos_embed``), whose
    channels are dim 1. A map that is not square or whose ``C`` equals its side is left at the
    default; the wrap-time checks refuse it if that is wrong."""
    if _is_channels_first_map(param):
        return 1
    dims = [d for d, size in enumerate(param.shape) if size != 1]
    return dims[-1] if dims else 0


def channels_first_parameters(model: nn.Module) -> list[tuple[nn.Parameter, int]]:
    """torch-pruning's ``unwrapped_parameters`` for the bare parameters whose channel dimension is
    not its default (:func:`parameter_channel_dim`), so that the graph and export prune the same
    dimension the rest of the package reads."""
    found = []
    for module in model.modules():
        if isinstance(module, _WRAPPED):
            continue
        for param in module.parameters(recurse=False):
            if _is_channels_first_map(param):
                found.append((param, 1))
    return found
