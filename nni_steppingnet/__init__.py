"""nni_steppingnet: SteppingNet nested subnets with computation reuse for PyTorch, timm and NNI."""
from __future__ import annotations

import logging

from .errors import CheckpointError, UnsupportedModelError
from .macs import macs
from .runtime import IncrementalRunner
from .stepping import NeuronGroup, SteppingNet

__all__ = [
    "SteppingNet",
    "IncrementalRunner",
    "NeuronGroup",
    "UnsupportedModelError",
    "CheckpointError",
    "macs",
    "__version__",
]

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())
