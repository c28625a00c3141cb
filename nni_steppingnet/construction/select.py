"""Neuron selection and moves of the construction loop, as functions of the net and the scores.

* :class:`CostTable`: exact marginal MAC costs of taking neurons out of a subnet;
* :func:`select_neurons`: the neurons of one subnet, in ascending criterion, whose MACs first
  reach an amount under a cap, with the per-group limit;
* :func:`move_neurons`: the movement phase of one iteration (the flow condition and the quantum of
  every subnet), which applies the moves to the net.

See :mod:`nni_steppingnet.construction.loop` for the loop and the measurements behind the caps.
"""

from __future__ import annotations

import logging
import math
from typing import Sequence

import torch

from ..stepping import SteppingNet
from ..validation import DEFAULT_LANDING, LANDINGS

__all__ = ["CostTable", "select_neurons", "move_neurons", "neuron_costs"]

logger = logging.getLogger(__name__)


class CostTable:
    """Active synapses of subnet ``s`` per layer, for exact marginal move costs.

    ``cost[j]`` is the MACs subnet ``s`` loses when neuron ``j`` leaves it, given the neurons
    already taken: :meth:`take` removes a neuron's synapses from the table and from the costs of
    the neurons at their other end.
    """

    def __init__(self, net: SteppingNet, s: int) -> None:
        net.refresh()
        size = net.num_neurons
        self.cost = torch.zeros(size + 1, dtype=torch.float64)
        self.layers: list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]] = []
        self.out_layers: dict[int, list[int]] = {}
        self.in_layers: dict[int, list[int]] = {}
        for k, layer in enumerate(net.layers):
            mask = net.weight_mask(k, s).to(torch.float64)
            out = mask.shape[0]
            in_pos = net.index.in_positions[k]
            entries = mask.reshape(out, in_pos.shape[1], -1).sum(-1) * layer.positions  # [out, in/g]
            out_pos = None if layer.is_logits else net.index.out_positions[k]
            if out_pos is not None:
                self.cost.index_add_(0, out_pos, entries.sum(1))
                for j in out_pos.unique().tolist():
                    self.out_layers.setdefault(j, []).append(len(self.layers))
            self.cost.index_add_(0, in_pos.expand(out, -1).reshape(-1), entries.reshape(-1))
            for j in in_pos.unique().tolist():
                self.in_layers.setdefault(j, []).append(len(self.layers))
            self.layers.append((entries, out_pos, in_pos))
        # A neuron's own MACs (an attention head's q.k and attn.v) leave with it.
        active = net.flat_assignment() <= s
        self.own = net.neuron_macs().to(torch.float64) * active.to(torch.float64)
        self.cost += self.own

    def cost_of(self, j: int) -> float:
        return float(self.cost[j])

    def take(self, j: int) -> float:
        """Remove neuron ``j``'s synapses; return the MACs that removes."""
        removed_total = float(self.own[j])
        if removed_total:
            self.cost[j] -= self.own[j]
            self.own[j] = 0.0
        for index in sorted(set(self.out_layers.get(j, [])) | set(self.in_layers.get(j, []))):
            entries, out_pos, in_pos = self.layers[index]
            touched = in_pos == j
            if out_pos is not None:
                touched = touched | (out_pos == j).unsqueeze(1)
            touched = touched.expand_as(entries)
            removed = entries * touched
            total = float(removed.sum())
            if total == 0.0:
                continue
            removed_total += total
            if out_pos is not None:
                self.cost.index_add_(0, out_pos, -removed.sum(1))
            self.cost.index_add_(0, in_pos.expand_as(entries).reshape(-1), -removed.reshape(-1))
            entries.masked_fill_(touched, 0.0)
        return removed_total


def select_neurons(
    net: SteppingNet,
    i: int,
    amount: float,
    flat: torch.Tensor,
    scores: torch.Tensor,
    excluded: torch.Tensor,
    cap: float,
    strict: bool = True,
    *,
    group_limit: bool = True,
    search_all: bool = False,
    stop_short: bool = False,
    floors: Sequence[int] | None = None,
    table: CostTable | None = None,
) -> list[int]:
    """Neurons of subnet ``i`` in ascending criterion whose MACs first reach ``amount``.

    Costs are marginal: after a neuron is taken, the synapses it shares with the other
    candidates no longer count for them, so the total is the exact MAC reduction of subnet
    ``i``. Per-group limit (``group_limit``, our addition): at most half of a group's
    neurons in subnet ``i`` (at least one) are taken in one call, and at most three quarters
    when only such neurons still fit under ``cap``. Importance is a first-order estimate, valid
    for small changes, and without the limit a small subnet's cheap Linear neurons, ranked low
    as a group, could nearly all leave in one iteration (measured on MNIST/LeNet-5, seeds
    0-2: subnet 1 kept 1-2 neurons of ``hidden.2``, 27-35% accuracy in two of three seeds).
    ``cap >= amount`` is the most the subnet should lose (its remaining excess): a neuron
    that would take the total past ``cap`` is passed over for the next ones in
    criterion order that still fit (within a window of half the candidates, at least 4);
    when none fits, the cheapest neuron of the window completes the amount (``strict``: the
    cap is a budget that must be reached) or, if stopping short is closer, nothing more is
    taken (``strict=False``: the cap is a share that later moves still adjust). So a subnet
    lands near its target instead of up to a whole expensive neuron below it. ``search_all``:
    before passing ``cap``, the lowest-M neuron beyond the window that still fits is taken.
    ``stop_short`` (with ``strict``): the budget is still reached in a later iteration, so
    nothing that passes ``cap`` is taken now while a neuron that fits is held back only by this
    call's per-group limits (both: ``landing="defer"`` of :func:`move_neurons`); when none is,
    waiting cannot help and the cheapest neuron passes the cap at once.
    ``floors`` (one per neuron group): the fewest neurons a group keeps in subnets ``<= i``
    (at least 1: the last neuron of a group never leaves, whatever ``floors`` says).

    Args:
        net: the SteppingNet (read only: the moves are not applied).
        i: the subnet whose neurons leave it.
        amount: MACs to remove from subnet ``i``.
        flat: ``net.flat_assignment()``.
        scores: the criterion ``M`` per neuron (lower leaves first).
        excluded: bool ``[num_neurons]``: neurons that are not candidates (moved in this
            iteration, frozen).
        cap, strict, group_limit: see above.
        table: a fresh ``CostTable(net, i)`` of this assignment, if the caller has built one
            (it is consumed: taking neurons updates it).
    """
    group_of_t = net.index.group_of
    num_groups = len(net.groups)

    assignment = flat[:-1]
    candidates = ((assignment == i) & ~excluded).nonzero().flatten()
    if candidates.numel() == 0:
        return []
    if table is None:
        table = CostTable(net, i)
    order = candidates[torch.argsort(scores[candidates], stable=True)].tolist()
    inside = torch.bincount(group_of_t[assignment <= i], minlength=num_groups).tolist()
    # Per group: at most half of its neurons in subnet i leave in one call (at least one
    # may), and at most three quarters to land near the target (see the docstring).
    here = torch.bincount(group_of_t[assignment == i], minlength=num_groups).tolist()
    limit = [max(1, c // 2) for c in here]
    hard = [max(1, c - math.ceil(c / 4)) for c in here]
    if not group_limit:
        limit = hard = [net.num_neurons] * len(here)
    left_soft, left_hard = list(limit), list(hard)
    floor = [1] * num_groups if floors is None else [max(1, int(f)) for f in floors]
    if len(floor) != num_groups:
        raise ValueError(f"floors needs one entry per neuron group ({num_groups}), got {len(floor)}")
    group_of = group_of_t.tolist()
    window = max(4, math.ceil(0.5 * len(order)))
    taken: set[int] = set()
    chosen: list[int] = []
    total = 0.0
    protected: set[int] = set()

    def movable(j: int, capped: bool = True) -> bool:
        if j in taken:
            return False
        if inside[group_of[j]] <= floor[group_of[j]]:
            protected.add(j)
            return False
        return (left_soft if capped else left_hard)[group_of[j]] > 0

    def take(j: int) -> None:
        nonlocal total
        taken.add(j)
        inside[group_of[j]] -= 1
        left_soft[group_of[j]] -= 1
        left_hard[group_of[j]] -= 1
        chosen.append(j)
        total += table.take(j)

    pos = 0
    while total < amount:
        while pos < len(order) and not movable(order[pos]):
            pos += 1
        if pos == len(order):
            break
        j = order[pos]
        c = table.cost_of(j)
        if total + c <= cap:
            take(j)
            continue
        ahead = [x for x in order[pos + 1 : pos + window] if movable(x)]
        fits = [x for x in ahead if total + table.cost_of(x) <= cap]
        if not fits:
            # Landing near the target comes before the per-group limit.
            ahead = [x for x in order[pos + 1 : pos + window] if movable(x, capped=False)]
            fits = [x for x in ahead if total + table.cost_of(x) <= cap]
        if not fits and search_all:
            fits = [x for x in order[pos + window :] if movable(x, capped=False) and total + table.cost_of(x) <= cap]
        if fits:
            take(fits[0])  # the lowest-M neuron that still fits under the target
            continue
        # Nothing fits: every neuron overshoots the cap; the cheapest one overshoots least.
        if search_all:
            ahead = [x for x in order[pos + 1 :] if movable(x, capped=False)]
        cheapest = min([(table.cost_of(x), k, x) for k, x in enumerate(ahead)], default=(c, 0, j))
        best_cost, best = (cheapest[0], cheapest[2]) if cheapest[0] < c else (c, j)
        if (
            strict
            and stop_short
            and any(
                x not in taken and total + table.cost_of(x) <= cap and inside[group_of[x]] > floor[group_of[x]]
                for x in order
            )
        ):
            break  # a neuron that fits is only held back by this call's limits: a later call takes it
        if strict or total + best_cost - cap < cap - total:
            take(best)
        break
    if protected:
        logger.info(
            "subnet %d: kept %d neuron(s) at their group's floor (the last or min_group_fraction)", i, len(protected)
        )
    return chosen


def _expensive_first(
    net: SteppingNet,
    i: int,
    cap: float,
    flat: torch.Tensor,
    scores: torch.Tensor,
    excluded: torch.Tensor,
    floors: Sequence[int],
    table: CostTable,
) -> list[int]:
    """``landing="ahead"``: the lowest-M neuron of subnet ``i``'s most expensive group (by mean
    cost), if the other groups, each down to its floor, could not remove ``cap`` MACs without it
    and it fits under ``cap``; else nothing. Taking it now, while the cheap groups are still full,
    lets them pay for the rest of the budget instead of shrinking to their floors first.
    ``table``: ``CostTable(net, i)`` of this assignment (read only)."""
    group_of = net.index.group_of
    assignment = flat[:-1]
    cost = table.cost[: net.num_neurons]
    inside = torch.bincount(group_of[assignment <= i], minlength=len(net.groups))
    candidates = (assignment == i) & ~excluded
    capacity: dict[int, float] = {}
    mean_cost: dict[int, float] = {}
    for g in group_of[candidates].unique().tolist():
        members = (candidates & (group_of == g)).nonzero().flatten()
        spare = min(int(inside[g]) - max(1, int(floors[g])), members.numel())
        if spare <= 0:
            continue
        capacity[g] = float(cost[members].sort().values[:spare].sum())
        mean_cost[g] = float(cost[members].mean())
    if len(capacity) < 2:
        return []
    expensive = max(mean_cost, key=lambda g: mean_cost[g])
    if cap <= sum(c for g, c in capacity.items() if g != expensive):
        return []
    members = (candidates & (group_of == expensive)).nonzero().flatten()
    j = int(members[torch.argmin(scores[members])])
    return [j] if float(cost[j]) <= cap else []


def _apply_moves(net: SteppingNet, flat: torch.Tensor, chosen: list[int], target: int, moved: torch.Tensor) -> None:
    """Move the ``chosen`` neurons to subnet ``target`` (in ``flat`` and the net) and mark them."""
    index = torch.tensor(chosen, dtype=torch.long)
    flat[index] = target
    net.set_flat_assignment(flat)
    moved[index] = True


def neuron_costs(net: SteppingNet, s: int) -> torch.Tensor:
    """MACs of subnet ``s`` that each neuron carries alone (float64 ``[num_neurons]``).

    A neuron's cost is the active weight entries of its output channels plus the active
    entries reading it, times their layers' output positions: the MACs subnet ``s`` loses if
    only that neuron leaves it.
    """
    return CostTable(net, s).cost[: net.num_neurons].clone()


def move_neurons(
    net: SteppingNet,
    scores: torch.Tensor,
    budget_macs: Sequence[float],
    quantum: float,
    iterations_left: int,
    *,
    frozen: torch.Tensor | None = None,
    group_limit: bool = True,
    landing: str = DEFAULT_LANDING,
    min_group_fraction: float = 0.5,
) -> tuple[torch.Tensor, list[int], list[int]]:
    """The movement phase of one iteration (step 2 of the loop in
    :mod:`nni_steppingnet.construction.loop`); applies the moves to ``net``.

    For every subnet ``i`` over its budget whose excess also passes the flow condition, the
    neurons with the smallest ``scores`` move to ``i + 1`` until the moved MACs reach
    ``min(max(quantum, cap / iterations_left), cap)``.

    Args:
        scores: the criterion ``M`` per neuron (``[num_neurons]``); lower means "move first".
        budget_macs: ``P_i`` in MACs, one per subnet.
        quantum: the paper's ``q`` in MACs.
        iterations_left: iterations the loop may still run, this one included (at least 1).
        frozen: bool ``[num_neurons]``: neurons that never move.
        group_limit: the per-group limit of :func:`select_neurons`.
        landing: :data:`nni_steppingnet.validation.LANDINGS` (default
            :data:`~nni_steppingnet.validation.DEFAULT_LANDING`, ``"ahead"``). ``"defer"`` (our
            addition): when no neuron of the window fits under the cap, the lowest-M neuron of
            the rest that fits is taken, and while iterations are left a subnet never passes its
            budget (it stops short; a later iteration, with the per-group limits reset, completes
            it). Measured on LeNet-5 x2.0 / CIFAR-10 (budgets 15/30/60/85%, 40 iterations of
            m = 2): with ``"now"`` the only movable neurons at the last step were often conv1
            neurons worth about 10% of the original MACs, and subnet 1 ended at 10.5% (budget
            15%). ``"ahead"`` (our addition, the default) is ``"defer"`` plus, before each
            selection, :func:`_expensive_first`: when the other groups, each down to its floor,
            could not pay for the rest of the subnet's excess, the lowest-M neuron of its most
            expensive group goes first. Without it the cheap groups shrink to their floors
            before the criterion ever reaches a conv1 neuron, and the excess left (about 5% of
            the MACs for subnet 1) can only go with a whole conv1 channel, landing the subnet
            5 points of MACs below its budget. Measured on LeNet-5 x2.0 / CIFAR-10 (three seeds,
            validation split, 30 iterations of m = 10): subnet 1 at 15.0% instead of 10.2% of
            the MACs and 51.8% instead of 40.3% accurate, mean subnet error 43.1% against 49.5%
            with ``"defer"`` (docs/results.md).
        min_group_fraction: while iterations are left, a group keeps at least
            ``floor(min_group_fraction * w_i * size)`` of its neurons in subnet ``i``, where ``w_i = sqrt(P_i / full MACs)`` is the width at
            which a uniformly narrowed chain of layers meets ``P_i`` (0: only the last neuron of
            a group is kept). Our addition: the criterion ranks neurons, not MACs, so reaching a
            budget takes many cheap Linear neurons per expensive conv neuron. Measured on
            LeNet-5 x2.0 / CIFAR-10 (budget 15%, 40 iterations of m = 2) without it: subnet 1
            kept 2 conv1 channels, 1 conv2 channel and 1 neuron in each hidden Linear.

    Returns:
        ``(moved, counts, moved_macs)``: a bool mask over neurons moved, the number of neurons
        moved out of each subnet, and the MACs each subnet lost by the moves.
    """
    n = net.num_subnets
    if landing not in LANDINGS:
        raise ValueError(f"landing must be one of {', '.join(map(repr, LANDINGS))}, got {landing!r}")
    scores = torch.as_tensor(scores).detach().to(device="cpu", dtype=torch.float64)
    if tuple(scores.shape) != (net.num_neurons,):
        raise ValueError(f"scores must have shape ({net.num_neurons},) (one per neuron), got {tuple(scores.shape)}")
    if len(budget_macs) != n:
        raise ValueError(f"need one MAC budget per subnet ({n}), got {len(budget_macs)}")
    fixed = torch.zeros(net.num_neurons, dtype=torch.bool)
    if frozen is not None:
        fixed = torch.as_tensor(frozen, dtype=torch.bool).flatten()[: net.num_neurons].cpu()
    moved = torch.zeros(net.num_neurons, dtype=torch.bool)
    sizes = torch.bincount(net.index.group_of, minlength=len(net.groups)).tolist()
    counts = [0] * n
    moved_macs = [0] * n
    left = max(int(iterations_left), 1)
    macs = [net.macs(s) for s in range(1, n + 1)]
    for i in range(1, n + 1):
        budget = budget_macs[i - 1]
        excess = macs[i - 1] - budget
        if excess <= 0:
            continue
        if i == 1:
            diff_excess = excess
        else:
            # Flow condition: subnet i passes neurons on only once it holds more than its share.
            diff_excess = (macs[i - 1] - macs[i - 2]) - (budget - budget_macs[i - 2])
            if diff_excess <= 0:
                continue
        cap = min(excess, diff_excess)
        amount = min(max(quantum, cap / left), cap)
        width = min(1.0, math.sqrt(max(budget, 0.0) / max(net.full_macs, 1)))
        # Rounded down, and dropped in the last iteration: the budget comes first.
        fraction = min_group_fraction if left > 1 else 0.0
        floors = [int(fraction * width * size) for size in sizes]
        start = macs[i - 1]
        # select_neurons' marginal costs are exact, so one round normally moves the amount; the
        # exact recount and top-up are a safeguard (e.g. a conv reading its own group).
        rounds = 0
        while rounds < 8:
            remaining = amount - (start - macs[i - 1])
            if remaining <= 0:
                break
            flat = net.flat_assignment()
            table = None
            # A forced move is no selection round: each moves a neuron not moved before, so it
            # cannot repeat forever, and it must not use up the rounds the selection needs. It
            # may pass the iteration's amount (one expensive neuron), never the cap.
            if landing == "ahead":
                # One table serves both: the forced check reads it, the selection then consumes it.
                table = CostTable(net, i)
                forced = _expensive_first(
                    net, i, cap - (start - macs[i - 1]), flat, scores, moved | fixed, floors, table
                )
                if forced:
                    _apply_moves(net, flat, forced, i + 1, moved)
                    counts[i - 1] += len(forced)
                    macs = [net.macs(s) for s in range(1, n + 1)]
                    continue
            rounds += 1
            # The budget (absolute excess) must be met; the share (difference excess) is
            # rounded to the nearest neuron while the smaller subnet is still over budget.
            chosen = select_neurons(
                net,
                i,
                remaining,
                flat,
                scores,
                moved | fixed,
                cap - (start - macs[i - 1]),
                strict=excess <= diff_excess,
                group_limit=group_limit,
                search_all=landing != "now",
                stop_short=landing != "now" and left > 1,
                floors=floors,
                table=table,
            )
            if not chosen:
                break
            _apply_moves(net, flat, chosen, i + 1, moved)
            counts[i - 1] += len(chosen)
            macs = [net.macs(s) for s in range(1, n + 1)]
        moved_macs[i - 1] = start - macs[i - 1]
    return moved, counts, moved_macs
