"""Where the channels of a bare per-channel parameter are (shared by the graph and the runtime)."""

from __future__ import annotations

import torch

__all__ = ["parameter_channel_dim"]


def parameter_channel_dim(param: torch.Tensor) -> int:
    """The dimension torch-pruning prunes in a bare parameter: its last non-singleton one."""
    dims = [d for d, size in enumerate(param.shape) if size != 1]
    return dims[-1] if dims else 0
