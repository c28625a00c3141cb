"""nni_steppingnet: SteppingNet nested subnets with computation reuse for PyTorch, timm and NNI.

Public names load lazily, so ``IncrementalRunner.load`` (inference) does not import the training
path (torch-pruning, construction) and ``import nni_steppingnet`` stays cheap.
"""

from __future__ import annotations

import importlib
import logging
from typing import TYPE_CHECKING, Any

# Light modules load eagerly; ``macs`` must, or importing the submodule would shadow the function.
from .errors import CheckpointError, LayoutMismatchError, UnsupportedModelError

try:
    from .macs import macs
except ImportError as exc:
    # Without torch only the torch-free deployment runner (nni_steppingnet.onnx_runner) works.
    if getattr(exc, "name", None) != "torch":
        raise

if TYPE_CHECKING:
    from .runtime import IncrementalRunner
    from .stepping import NeuronGroup, SteppingNet

__all__ = [
    "SteppingNet",
    "IncrementalRunner",
    "NeuronGroup",
    "UnsupportedModelError",
    "CheckpointError",
    "LayoutMismatchError",
    "macs",
    "__version__",
]

__version__ = "0.1.0"

_LAZY = {
    "SteppingNet": "stepping",
    "NeuronGroup": "stepping",
    "IncrementalRunner": "runtime",
}

logging.getLogger(__name__).addHandler(logging.NullHandler())


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'nni_steppingnet' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
