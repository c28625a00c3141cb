"""Exceptions raised by nni_steppingnet."""

from __future__ import annotations

from typing import Sequence

__all__ = ["UnsupportedModelError", "CheckpointError", "LayoutMismatchError"]


class UnsupportedModelError(ValueError):
    """The model mixes channels in a way the no-backward-synapse constraint cannot hold.

    ``problems`` lists ``(module name, reason)`` for every offending module.
    """

    def __init__(self, problems: Sequence[tuple[str, str]]) -> None:
        self.problems: list[tuple[str, str]] = list(problems)
        lines = "\n".join(f"  - {name}: {reason}" for name, reason in self.problems)
        super().__init__(
            "SteppingNet cannot wrap this model; these modules break the rule that a larger "
            f"subnet's channels never feed a smaller subnet's:\n{lines}"
        )


class CheckpointError(ValueError):
    """A checkpoint or runtime file does not belong to the model it is loaded into."""


class LayoutMismatchError(RuntimeError):
    """The model's forward does not keep the runtime's delta layout (a tensor reached a layer with
    other channels than the current stage adds); build the runner with ``layout="auto"`` or
    ``"full"``."""
