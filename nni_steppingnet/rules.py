"""The mask rule: which synapse ``W[o, i]`` is active in subnet ``s``, from subnet indices.

A rule maps the subnet index of a weight's output neuron ``a(o)`` and input neuron ``a(i)`` to
"active in subnet ``s``" (tensors broadcast). The classifier's outputs (the logits) belong to
every subnet, so for the logits layer only ``a(i)`` matters. Unstructured pruning masks multiply
on top of the rule (:meth:`nni_steppingnet.SteppingNet.weight_mask`).

* :data:`NESTED`, SteppingNet's rule (paper Section III): ``a(i) <= a(o) <= s`` (logits:
  ``a(i) <= s``). No synapse runs from a larger subnet's neuron into a smaller one's, so the
  activations of subnet ``s`` do not change in subnet ``s + 1`` (isolation, computation reuse).
  Any-width networks use the same rule on the triangular assignment of nested width slices.
* :data:`SLICES`, the slimmable rule: ``a(o) <= s and a(i) <= s``: every synapse inside the
  width is active, so a wider subnet feeds its new channels into the narrower slice (no
  isolation, no reuse).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

__all__ = ["MaskRule", "NestedRule", "SliceRule", "NESTED", "SLICES"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class MaskRule:
    """Base of the mask rules; subclasses define :meth:`allowed`.

    Attributes:
        name: short name used in messages.
        isolated: subnet ``s``'s activations never change in a larger subnet under this rule
            (the isolation probe applies).
        exact: every synapse the rule allows must be active (``validate`` checks both ways);
            otherwise only "no active synapse outside the rule" is checked.
    """

    name: str = "rule"
    isolated: bool = True
    exact: bool = False

    def allowed(self, a_out: torch.Tensor, a_in: torch.Tensor, s: int, is_logits: bool) -> torch.Tensor:
        """Bool tensor (broadcast of ``a_out`` and ``a_in``): synapse active in subnet ``s``."""
        raise NotImplementedError

    def violation(self) -> str:
        """What an active synapse outside the rule means, for error messages."""
        return f"against the {self.name} rule"


@dataclass(frozen=True)
class NestedRule(MaskRule):
    """SteppingNet's no-backward-synapse rule ``a(i) <= a(o) <= s`` (logits: ``a(i) <= s``)."""

    name: str = "nested"

    def allowed(self, a_out: torch.Tensor, a_in: torch.Tensor, s: int, is_logits: bool) -> torch.Tensor:
        if is_logits:
            return (a_in <= s) & torch.ones_like(a_out, dtype=torch.bool)
        return (a_out <= s) & (a_in <= a_out)

    def violation(self) -> str:
        return "connects a larger subnet's neuron into a smaller one"


@dataclass(frozen=True)
class SliceRule(MaskRule):
    """The slimmable rule ``a(o) <= s and a(i) <= s`` (logits: ``a(i) <= s``)."""

    name: str = "slimmable"
    isolated: bool = False
    exact: bool = True

    def allowed(self, a_out: torch.Tensor, a_in: torch.Tensor, s: int, is_logits: bool) -> torch.Tensor:
        inside = a_in <= s
        if is_logits:
            return inside & torch.ones_like(a_out, dtype=torch.bool)
        return (a_out <= s) & inside

    def violation(self) -> str:
        return "against the slimmable rule (active iff both ends are inside the width)"


#: SteppingNet's (and any-width's) rule.
NESTED: MaskRule = NestedRule()
#: The slimmable networks' rule.
SLICES: MaskRule = SliceRule()
