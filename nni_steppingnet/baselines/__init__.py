"""Baselines for SteppingNet's comparison (paper Fig. 6): any-width and slimmable networks.

Both are built on SteppingNet's own machinery (masks, exact MAC counter, training loop), so in a
comparison only the method differs:

* :class:`AnyWidthNet`: nested width slices, lower-triangular weights (no synapse from a wider
  slice into a narrower one), shared BatchNorm; computation reuse works.
* :class:`SlimmableNet`: nested width slices, full connections inside each width, switchable
  (per-width) BatchNorm; no reuse.

:func:`search_widths` picks each subnet's widths so that its MACs meet a budget (a fraction of the
original network's MACs) with the method's own MAC rule. The ``compare`` and ``ablate``
subcommands live in :mod:`nni_steppingnet.baselines.compare`.
"""

from __future__ import annotations

from .anywidth import AnyWidthNet, make_anywidth
from .slimmable import SlimmableNet, SwitchableBatchNorm, make_slimmable
from .widths import (
    SlicedNet,
    WidthPlan,
    check_budgets,
    counts_from_assignment,
    search_widths,
    triangular_assignment,
    uniform_counts,
)

__all__ = [
    "AnyWidthNet",
    "SlimmableNet",
    "SlicedNet",
    "SwitchableBatchNorm",
    "WidthPlan",
    "make_anywidth",
    "make_slimmable",
    "search_widths",
    "triangular_assignment",
    "counts_from_assignment",
    "uniform_counts",
    "check_budgets",
]
