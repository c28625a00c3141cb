"""Checks of settings, shared by the library's config classes, the NNI pruner and the recipes.

One definition per kind of setting: a :class:`Range` (an int or a number, bounds open or closed,
optionally ``None``) says both what is wrong (:meth:`Range.problem`, used by the recipe loader
which adds the key and the file) and raises it (:meth:`Range.check`, used by the library).
:func:`check_budgets` is the single check of MAC budgets. Messages say what is allowed.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Sequence

__all__ = [
    "CRITERIA",
    "EXECUTIONS",
    "OPTIMIZERS",
    "LANDINGS",
    "Range",
    "POSITIVE_INT",
    "NON_NEGATIVE_INT",
    "POSITIVE",
    "NON_NEGATIVE",
    "UNIT_OPEN_CLOSED",
    "UNIT_CLOSED",
    "UNIT_CLOSED_OPEN",
    "is_int",
    "is_number",
    "CONSTRUCTION_RULES",
    "check_budgets",
    "check_choice",
    "check_subnet",
]

logger = logging.getLogger(__name__)


def is_int(value: Any) -> bool:
    """An ``int`` that is not a ``bool``."""
    return not isinstance(value, bool) and isinstance(value, int)


def is_number(value: Any) -> bool:
    """A finite ``int`` or ``float`` that is not a ``bool``."""
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


def _fmt(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


@dataclass(frozen=True)
class Range:
    """An int or a finite number within bounds.

    Attributes:
        low, high: bounds (``None``: unbounded on that side).
        low_open, high_open: whether a bound itself is excluded.
        integer: ints only (bools never pass).
        optional: ``None`` passes.
    """

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    integer: bool = False
    optional: bool = False

    def describe(self) -> str:
        """What is allowed, e.g. ``"in (0, 1]"``, ``">= 0"``, ``"a positive int"``."""
        if self.integer and self.low == 1 and self.high is None and not self.low_open:
            text = "a positive int"
        elif self.low is not None and self.high is not None:
            text = (
                f"in {'(' if self.low_open else '['}{_fmt(self.low)}, {_fmt(self.high)}{')' if self.high_open else ']'}"
            )
        elif self.low is not None:
            text = f"{'>' if self.low_open else '>='} {_fmt(self.low)}"
        elif self.high is not None:
            text = f"{'<' if self.high_open else '<='} {_fmt(self.high)}"
        else:
            text = "an int" if self.integer else "a number"
        return text + (" or null/None" if self.optional else "")

    def problem(self, value: Any) -> str | None:
        """``None`` if ``value`` passes, else ``"must be ..."`` (no key, no value)."""
        if value is None:
            return None if self.optional else f"must be {self.describe()}"
        if self.integer and not is_int(value):
            described = self.describe()
            return "must be an int" + ("" if described.startswith("an int") else f" ({described})")
        if not self.integer and not is_number(value):
            described = self.describe()
            return "must be a finite number" + ("" if described.startswith("a number") else f" ({described})")
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return f"must be {self.describe()}"
        if self.high is not None and (value > self.high or (self.high_open and value == self.high)):
            return f"must be {self.describe()}"
        return None

    def __call__(self, value: Any) -> str | None:
        """:meth:`problem`: a ``Range`` serves as a recipe field check."""
        return self.problem(value)

    def check(self, name: str, value: Any) -> Any:
        """Return ``value`` (ints stay ints, numbers become float); raise ``ValueError`` naming
        ``name`` otherwise."""
        problem = self.problem(value)
        if problem:
            raise ValueError(f"{name} {problem}, got {value!r}")
        if value is None or self.integer:
            return value
        return float(value)


#: counts such as iterations and batches per iteration
POSITIVE_INT = Range(low=1, integer=True)
#: counts that may be 0 (epochs, steps)
NON_NEGATIVE_INT = Range(low=0, integer=True)
#: rates, temperatures, width factors
POSITIVE = Range(low=0, low_open=True)
#: weight decay, thresholds
NON_NEGATIVE = Range(low=0)
#: beta (suppression ratio): 1 is "off", 0 would freeze smaller subnets
UNIT_OPEN_CLOSED = Range(low=0, high=1, low_open=True)
#: gamma (loss mix)
UNIT_CLOSED = Range(low=0, high=1)
#: SGD momentum and held-out fractions
UNIT_CLOSED_OPEN = Range(low=0, high=1, high_open=True)


#: The construction loop's settings (besides budgets and reference_macs), one rule each: used by
#: ``ConstructionConfig``, the recipe's ``construction`` section and the NNI pruner's arguments.
CONSTRUCTION_RULES: dict[str, Range] = {
    "batches_per_iteration": POSITIVE_INT,
    "iterations": POSITIVE_INT,
    "alpha_growth": POSITIVE,
    "beta": UNIT_OPEN_CLOSED,  # ConstructionConfig also takes None (off)
    "prune_threshold": NON_NEGATIVE,
    "lr": POSITIVE,
    "momentum": UNIT_CLOSED_OPEN,
    "weight_decay": NON_NEGATIVE,
    "seed": Range(integer=True),
    "min_group_fraction": UNIT_CLOSED,
}

#: Names of the neuron criteria (``ConstructionConfig.criterion``, the recipe's
#: ``construction.criterion``); :func:`nni_steppingnet.criteria.make_scorer` builds each.
CRITERIA: tuple[str, ...] = ("gradient", "class", "noise")

#: Optimizers of :func:`nni_steppingnet.train.make_optimizer` and the recipe's
#: ``teacher.optimizer``: ``"sgd"`` (the paper's, with momentum and weight decay) and ``"adamw"``
#: (decoupled weight decay; ``momentum`` is its first-moment decay beta1).
OPTIMIZERS: tuple[str, ...] = ("sgd", "adamw")

#: Values of ``SteppingNet(..., execution=...)`` and the recipe's ``steppingnet.execution``.
EXECUTIONS: tuple[str, ...] = ("auto", "sliced", "masked")

#: How a subnet lands on its MAC budget when no neuron that is still movable fits under it
#: (``ConstructionConfig.landing``, the recipe's ``construction.landing``): ``"defer"`` stops
#: short and finishes in a later iteration, passing the budget by the cheapest neuron only in the
#: last one; ``"now"`` passes it by the cheapest neuron at once (the behaviour before the option);
#: ``"ahead"`` is ``"defer"``, and first moves the neurons of the most expensive group that the
#: other groups, down to their floors, could not pay for.
LANDINGS: tuple[str, ...] = ("defer", "now", "ahead")

#: The default landing (one place: ``ConstructionConfig``, the recipe schema and
#: :func:`~nni_steppingnet.construction.select.move_neurons` read it); docs/results.md holds the
#: measurement that chose it.
DEFAULT_LANDING: str = "ahead"


def check_budgets(budgets: Any, num_subnets: int | None = None, *, name: str = "budgets") -> list[float]:
    """MAC budgets: a non-empty list of fractions in (0, 1] of the reference MACs, strictly
    ascending (subnet ``i + 1`` contains subnet ``i``), one per subnet when ``num_subnets`` is
    given. Returns them as floats; raises ``ValueError`` naming the first bad entry."""
    if isinstance(budgets, (str, bytes)) or not isinstance(budgets, (list, tuple)) or not budgets:
        raise ValueError(f"{name} must be a non-empty list of MAC fractions, got {budgets!r}")
    for i, b in enumerate(budgets):
        if not is_number(b) or not 0 < b <= 1:
            raise ValueError(f"{name}[{i}] = {b!r} must be in (0, 1] (a fraction of the reference network's MACs)")
    for i in range(1, len(budgets)):
        if budgets[i] <= budgets[i - 1]:
            raise ValueError(
                f"{name} must be strictly ascending (subnet i+1 contains subnet i), but "
                f"{name}[{i - 1}] = {budgets[i - 1]} >= {name}[{i}] = {budgets[i]}"
            )
    if num_subnets is not None and len(budgets) != num_subnets:
        raise ValueError(
            f"{name} has {len(budgets)} entries but there are {num_subnets} subnets; give one budget per subnet"
        )
    return [float(b) for b in budgets]


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> Any:
    """Return ``value`` if it is one of ``choices``; raise ``ValueError`` listing them."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(repr(c) for c in choices)}, got {value!r}")
    return value


def check_subnet(s: Any, num_subnets: int, *, name: str = "subnet") -> int:
    """Return ``s`` if it is an int in ``1..num_subnets``; raise ``ValueError`` otherwise."""
    if not is_int(s) or not 1 <= s <= num_subnets:
        raise ValueError(f"{name} must be an int in 1..{num_subnets}, got {s!r}")
    return int(s)
