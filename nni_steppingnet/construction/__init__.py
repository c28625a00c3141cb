"""Subnet construction (paper Fig. 3): small functions and a thin loop.

* :mod:`.select`: exact marginal MAC costs, the selection under the quantum and the flow
  condition, and the moves;
* :mod:`.prune`: unstructured pruning and dead-neuron retirement;
* :mod:`.batches`: the seeded, resumable batch stream and RNG state of construction checkpoints;
* :mod:`.loop`: :class:`ConstructionConfig` and :class:`Constructor` with its extension points
  (``train=``, ``scores=``, ``frozen=``, :meth:`Constructor.finish_iteration`).
"""

from __future__ import annotations

from .loop import CONSTRUCTION_FORMAT, ConstructionConfig, ConstructionResult, Constructor, ScoreFn, TrainFn
from .prune import dead_neurons, prune_small_weights, retire_dead
from .select import CostTable, move_neurons, neuron_costs, select_neurons

__all__ = [
    "CONSTRUCTION_FORMAT",
    "ConstructionConfig",
    "ConstructionResult",
    "Constructor",
    "ScoreFn",
    "TrainFn",
    "CostTable",
    "dead_neurons",
    "move_neurons",
    "neuron_costs",
    "prune_small_weights",
    "retire_dead",
    "select_neurons",
]
