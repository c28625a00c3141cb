"""NNI and torch-pruning integration of SteppingNet.

* :class:`SteppingNetPruner` (``pruner``): SteppingNet construction as an NNI 3.0 training-aware
  pruner (``model, config_list, evaluator`` plus SteppingNet's settings).
* :class:`SteppingImportance` (``tp_importance``): the criterion M of a chosen subnet as a
  torch-pruning ``Importance`` for plain structured pruning.
* ``experiment`` / ``trial``: the ``nni-steppingnet tune`` hyperparameter search (an NNI
  ``Experiment`` whose trials run a recipe's flow), on the local or the remote (SSH) training
  service; ``search_space`` validates search spaces and maps trial parameters to recipe keys.

The names are imported lazily: importing this package does not import NNI (which is slow to
import), so the command-line parser stays fast.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "SteppingNetPruner",
    "SteppingImportance",
    "SearchSpaceError",
    "load_search_space",
    "validate_search_space",
    "params_to_overrides",
    "TuneError",
    "TuneOptions",
    "TuneResult",
    "run_tune",
    "MachineSpec",
    "load_machines",
]

_LAZY: dict[str, str] = {
    "SteppingNetPruner": ".pruner",
    "SteppingImportance": ".tp_importance",
    "SearchSpaceError": ".search_space",
    "load_search_space": ".search_space",
    "validate_search_space": ".search_space",
    "params_to_overrides": ".search_space",
    "TuneError": ".experiment",
    "TuneOptions": ".experiment",
    "TuneResult": ".experiment",
    "run_tune": ".experiment",
    "MachineSpec": ".remote",
    "load_machines": ".remote",
}


def __getattr__(name: str) -> Any:
    module_name = _LAZY.get(name)
    if module_name is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module_name, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
