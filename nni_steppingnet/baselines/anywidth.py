"""Any-width networks (Yu et al., CVPR 2020 workshops) as a fixed SteppingNet assignment.

An any-width network slices every layer into nested widths and makes the weight matrix lower
triangular over the slices: an output channel of slice ``s`` reads input channels of slices
``<= s`` only, so no synapse runs from a wider slice into a narrower one. That is exactly
SteppingNet's mask rule (``W[o, i]`` active iff ``a(i) <= a(o) <= s``) applied to the triangular
assignment of :mod:`~nni_steppingnet.baselines.widths`: neuron ``j`` of a group belongs to slice
``s`` for ``k_{s-1} <= j < k_s``. So any-width is a :class:`SteppingNet` whose assignment never
moves: the same masks, MAC counter, training loop and runtime (computation reuse works, because the
narrower slices' activations do not change when wider slices run). BatchNorm is shared across
widths, as in the any-width paper (the triangular structure keeps each channel's statistics
independent of the width).
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import torch.nn as nn

from .widths import SlicedNet, WidthPlan, wrap_with_widths

__all__ = ["AnyWidthNet", "make_anywidth"]

logger = logging.getLogger(__name__)


class AnyWidthNet(SlicedNet):
    """Any-width baseline: nested width slices with a lower-triangular (no backward synapse)
    structure and shared BatchNorm; wraps ``model`` in place like :class:`SteppingNet`.

    ``width_fractions`` gives a uniform fraction per subnet (default ``s / N``); use
    :meth:`set_widths` or :func:`~nni_steppingnet.baselines.search_widths` for per-group widths.
    """

    method = "anywidth"


def make_anywidth(
    model: nn.Module,
    example_inputs: Any,
    budgets: Sequence[float],
    reference_macs: int,
    *,
    tolerance: float = 0.02,
    classifier: nn.Module | str | None = None,
    exclude: Sequence[nn.Module] = (),
    verify: bool = True,
) -> tuple[AnyWidthNet, WidthPlan]:
    """Wrap ``model`` as an any-width network with one subnet per budget, widths searched so that
    every subnet's MACs are within ``tolerance`` of ``budgets[s-1] * reference_macs``."""
    return wrap_with_widths(
        AnyWidthNet,
        model,
        example_inputs,
        budgets,
        reference_macs,
        tolerance=tolerance,
        classifier=classifier,
        exclude=exclude,
        verify=verify,
    )
