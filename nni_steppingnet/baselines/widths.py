"""Width slicing shared by the baselines, and the search for widths that meet MAC budgets.

Both baselines cut every neuron group into nested *slices*: subnet ``s`` owns the first ``k_s``
neurons of each group (in root channel order), with ``k_1 <= k_2 <= ... <= k_N``. In SteppingNet
terms this is the assignment ``a(j) = min{s : j < k_s}`` (``N + 1`` beyond ``k_N``): the
*triangular* assignment. What differs between the baselines is only which synapses a subnet may
use (any-width: ``a(i) <= a(o)``, SteppingNet's own rule; slimmable: every synapse inside the
width), so the MACs of a subnet at a given width differ too, and :func:`search_widths` finds the
widths with each method's own MAC count (``net.macs``: the very code SteppingNet is measured with).

Budgets are fractions of ``reference_macs``, the MACs of the original (unexpanded) network, as in
the paper's ``M_i / M_t`` columns.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from typing import Any, Protocol, Sequence, TypeVar

import torch
import torch.nn as nn

from ..rules import NESTED, MaskRule
from ..stepping import SteppingNet

__all__ = [
    "SlicedNet",
    "WidthSliced",
    "WidthPlan",
    "triangular_assignment",
    "counts_from_assignment",
    "uniform_counts",
    "check_counts",
    "check_budgets",
    "search_widths",
    "wrap_with_widths",
    "structural_macs",
]

logger = logging.getLogger(__name__)


class WidthSliced(Protocol):
    """What :func:`search_widths` needs: a net whose subnets are nested width slices."""

    num_subnets: int

    @property
    def group_sizes(self) -> list[int]: ...

    @property
    def widths(self) -> list[list[int]]: ...

    def set_widths(self, counts: Sequence[Sequence[int]]) -> None: ...

    def macs(self, s: int) -> int: ...


@dataclass
class WidthPlan:
    """Widths found by :func:`search_widths` (already applied to the net)."""

    #: ``counts[s-1][g]``: neurons of group ``g`` in subnet ``s`` (nested: non-decreasing in s)
    counts: list[list[int]]
    #: the uniform width fraction bisection found for each subnet (before per-group refinement)
    fractions: list[float]
    #: exact MACs per sample of each subnet (``net.macs(s)``)
    macs: list[int]
    #: ``macs / reference_macs``
    mac_ratios: list[float]
    budgets: list[float]
    reference_macs: int
    tolerance: float
    #: whether ``|mac_ratio - budget| <= tolerance`` for each subnet
    budgets_met: list[bool]

    @property
    def all_met(self) -> bool:
        return all(self.budgets_met)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["all_met"] = self.all_met
        return out


def triangular_assignment(size: int, counts: Sequence[int], num_subnets: int) -> torch.Tensor:
    """Subnet index of every neuron of a group of ``size`` when subnet ``s`` holds the first
    ``counts[s-1]`` neurons: neuron ``j`` gets the smallest ``s`` with ``j < counts[s-1]``, or
    ``num_subnets + 1`` (unused) when ``j >= counts[-1]``."""
    if len(counts) != num_subnets:
        raise ValueError(f"need one width per subnet ({num_subnets}), got {len(counts)}: {list(counts)}")
    assignment = torch.full((size,), num_subnets + 1, dtype=torch.long)
    previous = 0
    for s, k in enumerate(counts, start=1):
        k = int(k)
        if not previous <= k <= size:
            raise ValueError(f"widths must be non-decreasing and at most the group size {size}; got {list(counts)}")
        assignment[previous:k] = s
        previous = k
    return assignment


def counts_from_assignment(assignment: torch.Tensor, num_subnets: int) -> list[int]:
    """Inverse of :func:`triangular_assignment` for any assignment: neurons with index <= s."""
    return [int((assignment <= s).sum()) for s in range(1, num_subnets + 1)]


def uniform_counts(sizes: Sequence[int], fraction: float, lower: Sequence[int] | None = None) -> list[int]:
    """``round(fraction * size)`` per group (half up), at least 1 and at least ``lower``."""
    if not math.isfinite(fraction) or fraction < 0:
        raise ValueError(f"width fraction must be a finite number >= 0, got {fraction!r}")
    lower = [1] * len(sizes) if lower is None else list(lower)
    return [min(size, max(low, 1, int(math.floor(fraction * size + 0.5)))) for size, low in zip(sizes, lower)]


def check_counts(counts: Sequence[Sequence[int]], sizes: Sequence[int], num_subnets: int) -> list[list[int]]:
    """Validate per-subnet, per-group widths; returns them as a list of int lists."""
    if len(counts) != num_subnets:
        raise ValueError(f"need widths for {num_subnets} subnets, got {len(counts)}")
    out: list[list[int]] = []
    for s, row in enumerate(counts, start=1):
        row = [int(k) for k in row]
        if len(row) != len(sizes):
            raise ValueError(f"subnet {s}: need one width per neuron group ({len(sizes)}), got {len(row)}")
        for g, (k, size) in enumerate(zip(row, sizes)):
            low = 1 if s == 1 else out[-1][g]
            if not low <= k <= size:
                raise ValueError(
                    f"subnet {s}, group {g}: width {k} must be in [{low}, {size}] "
                    "(at least 1 in subnet 1, non-decreasing over subnets, at most the "
                    "group size)"
                )
        out.append(row)
    return out


def check_budgets(budgets: Sequence[float], num_subnets: int) -> list[float]:
    """Budgets must be N positive, strictly ascending fractions."""
    values = [float(b) for b in budgets]
    if len(values) != num_subnets:
        raise ValueError(f"need one MAC budget per subnet ({num_subnets}), got {len(values)}: {values}")
    if any(not math.isfinite(b) or b <= 0 for b in values):
        raise ValueError(f"MAC budgets must be positive fractions of the reference MACs, got {values}")
    if any(b >= c for b, c in zip(values, values[1:])):
        raise ValueError(f"MAC budgets must be strictly ascending, got {values}")
    return values


class SlicedNet(SteppingNet):
    """A :class:`SteppingNet` whose assignment is the triangular one of nested width slices.

    The base class of :class:`~nni_steppingnet.baselines.AnyWidthNet` and
    :class:`~nni_steppingnet.baselines.SlimmableNet`. Widths are read back from the assignment,
    so checkpoints (``state_dict``) restore them.

    Args:
        model, example_inputs, num_subnets, classifier, exclude, verify: as for SteppingNet.
        width_fractions: a uniform width fraction per subnet (non-decreasing, in (0, 1]); the
            default ``s / N`` slices every group evenly. Use :meth:`set_widths` or
            :func:`search_widths` for exact per-group widths.
    """

    #: short method name used in reports
    method: str = "sliced"
    #: the mask rule of the method (:mod:`nni_steppingnet.rules`)
    mask_rule: MaskRule = NESTED

    def __init__(
        self,
        model: nn.Module,
        example_inputs: Any,
        num_subnets: int,
        width_fractions: Sequence[float] | None = None,
        *,
        classifier: nn.Module | str | None = None,
        exclude: Sequence[nn.Module] = (),
        verify: bool = True,
        execution: str = "auto",
    ) -> None:
        super().__init__(
            model,
            example_inputs,
            num_subnets,
            classifier=classifier,
            exclude=exclude,
            verify=verify,
            rule=self.mask_rule,
            execution=execution,
        )
        if width_fractions is None:
            width_fractions = [s / num_subnets for s in range(1, num_subnets + 1)]
        self.set_width_fractions(width_fractions)

    @property
    def group_sizes(self) -> list[int]:
        return [g.size for g in self.groups]

    @property
    def widths(self) -> list[list[int]]:
        """``widths[s-1][g]``: how many neurons of group ``g`` subnet ``s`` holds."""
        per_group = [counts_from_assignment(g.assignment, self.num_subnets) for g in self.groups]
        return [[row[s] for row in per_group] for s in range(self.num_subnets)]

    def set_widths(self, counts: Sequence[Sequence[int]]) -> None:
        """Set per-subnet, per-group widths (nested, at least 1 in subnet 1)."""
        rows = check_counts(counts, self.group_sizes, self.num_subnets)
        for g, group in enumerate(self.groups):
            group.assignment = triangular_assignment(group.size, [row[g] for row in rows], self.num_subnets)
        # Always drop cached masks: a fresh assignment tensor may reuse a freed tensor's id.
        self.invalidate()

    def set_width_fractions(self, fractions: Sequence[float]) -> None:
        """Uniform widths: subnet ``s`` holds ``round(fractions[s-1] * size)`` neurons per group."""
        values = [float(f) for f in fractions]
        if len(values) != self.num_subnets:
            raise ValueError(f"need one width fraction per subnet ({self.num_subnets}), got {values}")
        if any(not 0 < f <= 1 for f in values) or any(a > b for a, b in zip(values, values[1:])):
            raise ValueError(f"width fractions must be non-decreasing values in (0, 1], got {values}")
        rows: list[list[int]] = []
        for f in values:
            rows.append(uniform_counts(self.group_sizes, f, rows[-1] if rows else None))
        self.set_widths(rows)

    def summary(self) -> str:
        return super().summary().replace("SteppingNet:", f"{type(self).__name__}:", 1)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(num_subnets={self.num_subnets}, groups={len(self.groups)}, widths={self.widths})"


def _macs_with(net: WidthSliced, done: list[list[int]], row: list[int], s: int) -> int:
    """MACs of subnet ``s`` with subnets < s at ``done`` and subnets >= s at width ``row``."""
    net.set_widths(done + [row] * (net.num_subnets - len(done)))
    if isinstance(net, SlicedNet) and not net.prune_masks:
        return structural_macs(net, s)
    return net.macs(s)


def structural_macs(net: SlicedNet, s: int) -> int:
    """``net.macs(s)`` of a sliced net without unstructured pruning masks, counted from
    histograms of the subnet indices instead of weight-shaped masks: the width search calls it
    thousands of times. Uses the net's own mask rule (``net.rule``); tests check that it equals
    ``net.macs(s)``."""
    if net.prune_masks:
        raise ValueError("structural_macs ignores unstructured pruning masks; use net.macs(s)")
    net.check_subnet(s)
    flat = net.flat_assignment()
    bins = net.num_subnets + 2
    values = torch.arange(bins)
    total = 0
    for k, layer in enumerate(net.layers):
        a_out, a_in = net.layer_assignment(k, flat)
        if a_in.shape[0] != 1:  # grouped conv: columns differ per output channel
            count = int(net.structural_mask(k, s, flat).sum())
        else:
            h_out = torch.bincount(a_out, minlength=bins)
            h_in = torch.bincount(a_in[0], minlength=bins)
            allowed = net.rule.allowed(values.unsqueeze(1), values.unsqueeze(0), s, layer.is_logits)
            count = int((h_out.unsqueeze(1) * h_in.unsqueeze(0) * allowed).sum())
        weight = net.original_weight(k)
        per_entry = weight[0, 0].numel() if weight.dim() > 2 else 1
        total += count * per_entry * layer.positions
    return total


def search_widths(
    net: WidthSliced,
    budgets: Sequence[float],
    reference_macs: int,
    *,
    tolerance: float = 0.02,
    bisection_steps: int = 16,
) -> WidthPlan:
    """Choose each subnet's widths so that ``net.macs(s) / reference_macs`` meets ``budgets[s-1]``
    within ``tolerance``, and apply them to ``net``.

    Subnet by subnet (each at least as wide as the previous one): bisection on a uniform width
    fraction finds the widest uniform slice whose MACs stay within the budget; channel counts are
    integers, so one step of a wide layer can jump past the tolerance, and a refinement then adds
    single neurons, always to the group with the smallest width fraction whose neuron keeps the
    subnet within half the tolerance above the budget, until the budget is reached. The result is
    the closer of the last two states. Budgets the net cannot reach (larger than its widest slice)
    are reported in ``budgets_met`` rather than raised.
    """
    n = net.num_subnets
    budgets = check_budgets(budgets, n)
    if isinstance(reference_macs, bool) or not isinstance(reference_macs, int) or reference_macs <= 0:
        raise ValueError(f"reference_macs must be a positive int, got {reference_macs!r}")
    if not 0 < tolerance < 1:
        raise ValueError(f"tolerance must be a fraction in (0, 1), got {tolerance!r}")
    sizes = list(net.group_sizes)
    done: list[list[int]] = []
    fractions: list[float] = []
    for s in range(1, n + 1):
        target = budgets[s - 1] * reference_macs
        lower = done[-1] if done else [1] * len(sizes)
        lo, hi = 0.0, 1.0
        best = uniform_counts(sizes, 0.0, lower)
        best_macs = _macs_with(net, done, best, s)
        if best_macs <= target:
            top = uniform_counts(sizes, 1.0, lower)
            if _macs_with(net, done, top, s) <= target:
                lo, best = 1.0, top
            else:
                for _ in range(bisection_steps):
                    mid = 0.5 * (lo + hi)
                    row = uniform_counts(sizes, mid, lower)
                    if _macs_with(net, done, row, s) <= target:
                        lo, best = mid, row
                    else:
                        hi = mid
            best_macs = _macs_with(net, done, best, s)
        fractions.append(lo)
        row, row_macs = list(best), best_macs
        slack = 0.5 * tolerance * reference_macs
        while row_macs < target:
            candidates = []
            for g, size in enumerate(sizes):
                if row[g] < size:
                    trial = row.copy()
                    trial[g] += 1
                    trial_macs = _macs_with(net, done, trial, s)
                    if trial_macs <= target + slack:
                        candidates.append((row[g] / size, trial_macs, g, trial))
            if not candidates:
                break
            _, trial_macs, _, trial = min(candidates, key=lambda c: (c[0], c[1], c[2]))
            if trial_macs >= target and abs(trial_macs - target) > abs(row_macs - target):
                break
            row, row_macs = trial, trial_macs
        done.append(row)
        logger.debug("subnet %d: fraction %.4f, widths %s, %d MACs (target %.0f)", s, lo, row, row_macs, target)
    net.set_widths(done)
    macs = [net.macs(s) for s in range(1, n + 1)]
    ratios = [m / reference_macs for m in macs]
    met = [abs(r - b) <= tolerance + 1e-12 for r, b in zip(ratios, budgets)]
    for s, (r, b, ok) in enumerate(zip(ratios, budgets, met), start=1):
        if not ok:
            logger.warning(
                "subnet %d: MAC ratio %.4f misses budget %.4f by more than %.2f (the net's "
                "slices cannot reach it; widen the model or lower the budget)",
                s,
                r,
                b,
                tolerance,
            )
    return WidthPlan(
        counts=done,
        fractions=fractions,
        macs=macs,
        mac_ratios=ratios,
        budgets=budgets,
        reference_macs=int(reference_macs),
        tolerance=float(tolerance),
        budgets_met=met,
    )


SlicedNetT = TypeVar("SlicedNetT", bound=SlicedNet)


def wrap_with_widths(
    cls: type[SlicedNetT],
    model: nn.Module,
    example_inputs: Any,
    budgets: Sequence[float],
    reference_macs: int,
    *,
    tolerance: float = 0.02,
    classifier: nn.Module | str | None = None,
    exclude: Sequence[nn.Module] = (),
    verify: bool = True,
) -> tuple[SlicedNetT, WidthPlan]:
    """Wrap ``model`` as a ``cls`` network with one subnet per budget, widths searched so that
    every subnet's MACs are within ``tolerance`` of ``budgets[s-1] * reference_macs``."""
    net = cls(model, example_inputs, len(budgets), classifier=classifier, exclude=exclude, verify=verify)
    plan = search_widths(net, budgets, reference_macs, tolerance=tolerance)
    logger.info("%s widths %s, MAC ratios %s", net.method, plan.counts, [round(r, 4) for r in plan.mac_ratios])
    return net, plan
