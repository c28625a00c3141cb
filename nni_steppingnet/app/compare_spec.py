"""What ``compare`` and ``ablate`` run: the methods, the ablation variants and the file formats.

A light module (no torch): the command-line parser reads these names without importing the
training code.
"""

from __future__ import annotations

import logging
from typing import Any

__all__ = [
    "METHODS",
    "ABLATION_VARIANTS",
    "BASELINE_FORMAT",
    "COMPARE_FORMAT",
    "TEACHER_FILE",
    "RESULTS_FILE",
    "parse_list",
]

logger = logging.getLogger(__name__)

#: the methods ``compare`` knows, in report order
METHODS: tuple[str, ...] = ("steppingnet", "anywidth", "slimmable")
#: ablation variant (Fig. 8) -> recipe overrides
ABLATION_VARIANTS: dict[str, tuple[str, ...]] = {
    "beta+kd": (),
    "no beta": ("construction.beta=1.0", "retraining.beta=1.0"),
    "no kd": ("retraining.gamma=1.0",),
    "no beta, no kd": ("construction.beta=1.0", "retraining.beta=1.0", "retraining.gamma=1.0"),
}
BASELINE_FORMAT = "nni_steppingnet.baseline/1"
COMPARE_FORMAT = "nni_steppingnet.compare/1"
TEACHER_FILE = "teacher.pt"
RESULTS_FILE = "results.json"


def parse_list(text: str, kind: type, what: str) -> list[Any]:
    """``"0,1,2"`` -> ``[0, 1, 2]`` (``kind`` int or float); raises ``ValueError`` naming ``what``."""
    items = [t.strip() for t in str(text).split(",") if t.strip()]
    if not items:
        raise ValueError(f"{what} must be a comma-separated list, got {text!r}")
    try:
        return [kind(t) for t in items]
    except ValueError as exc:
        raise ValueError(f"{what}: cannot read {text!r} as comma-separated {kind.__name__} values") from exc
