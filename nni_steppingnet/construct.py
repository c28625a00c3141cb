"""Subnet construction by moving neurons (paper Fig. 3, Section III-A).

All neurons start in subnet 1. Every iteration:

1. for each subnet ``k = 1..N``: train ``m`` batches of subnet ``k``'s loss (SGD, beta
   suppression for ``k``), accumulating the neuron importance ``|dL_k/dr_j|`` (eq. 2);
2. for each subnet ``i = 1..N``: if ``MAC(i) > P_i`` and (``i == 1`` or
   ``MAC(i) - MAC(i-1) > P_i - P_{i-1}``, the *flow condition* that lets subnet ``i`` first fill
   up to its own share), move the neurons of subnet ``i`` with the smallest criterion ``M``
   (eq. 3) to subnet ``i + 1`` (``N + 1`` = unused) until the moved MACs reach the quantum;
3. unstructured pruning: a weight with ``|W| < prune_threshold`` is masked in every subnet, except
   that the synapses of neurons moved in this iteration are revived;
4. dead neurons are retired (our addition, :meth:`Constructor.retire_dead`): a neuron in a subnet
   ``<= N`` whose output no weight reads (every synapse from it is pruned or goes to a neuron in
   ``N + 1``) is sent to ``N + 1``. It reached no output of any subnet, so no subnet's function
   changes, and the MACs of its incoming synapses are freed (the MAC counts are recounted from
   the masks, so they stay exact). After the last iteration the rule also retires neurons whose
   consumers all sit in smaller subnets (structurally masked synapses); during construction
   those consumers may still move up and read them;
5. the importance scores are reset.

The criterion ``M`` is eq. (3) of the importance normalised per neuron group
(:func:`nni_steppingnet.importance.normalize_scores`; importance of channels that pass through a
BatchNorm is taken at the BatchNorm output, see :mod:`nni_steppingnet.importance`).

It stops when every ``MAC(i) <= P_i`` or after ``N_t`` iterations.

Quantum. The paper moves ``q = (P_t - P_1) / N_t`` MACs per iteration and subnet, where ``P_t``
is the MAC count of the (expanded) network at the start (``net.macs(N)`` before any move). We
move ``quantum_i = min(max(q, cap_i / iterations_left), cap_i)`` out of subnet ``i`` with

    cap_i = min(MAC(i) - P_i, (MAC(i) - MAC(i-1)) - (P_i - P_{i-1}))     (cap_1 = MAC(1) - P_1)

* ``max(q, cap_i / iterations_left)``: never less than the paper's quantum, and enough to close
  the remaining gap in the iterations left, so every subnet can reach its budget within ``N_t``
  iterations even when the flow condition held it back early;
* the first term of ``cap_i``: never more than needed to reach the budget;
* the second term: never more than the subnet's excess over its own share. Moving a neuron out of
  a smaller subnet ``l`` cuts its synapses into subnet ``l``'s neurons in *every* larger subnet,
  so ``MAC(i)`` keeps falling after subnet ``i`` has shed down to ``P_i``, while the differences
  ``MAC(i) - MAC(i-1)`` (``i > l + 1``) are untouched. Capping each difference at its share
  keeps the final ``MAC(i) = MAC(1) + sum of differences`` near ``P_i``.

Measured on LeNet-3C1L x1.8 / digits, budgets 0.1/0.3/0.5/0.85 of the x1.0 MACs, m=20, N_t=30:
with the paper's selection and only the first cap the subnets ended at 0.077/0.241/0.428/0.747;
with both caps, marginal costs and the fitting below at 0.099/0.290/0.486/0.847.

Neurons are taken in ascending ``M`` until their MACs reach the quantum (marginal costs: a
synapse shared by two moved neurons counts once, so the total is the exact MAC reduction). A
neuron that would take the subnet past ``cap_i`` is passed over for the next ones in ``M`` order
that still fit (within the lower half of the candidates); if none fits, the cheapest of them
completes the move when ``cap_i`` is the budget (it must be met), or when that lands closer to
the share than stopping short (the share is only a waypoint while the smaller subnet is still
over its budget). So a subnet lands near its target rather than a whole neuron below it. At most
half of a group's neurons in the subnet are taken per selection (three quarters when only those
fit; our addition, see :meth:`Constructor._select`).

A neuron moved in an iteration is not moved again in the same iteration (it has not been
trained in its new subnet yet). The last neuron of a neuron group inside subnet ``i`` is never
moved out of it, so no subnet loses a whole layer (which would disconnect it from its input).
"""
from __future__ import annotations

import dataclasses
import logging
import math
import random
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Mapping

import numpy as np
import torch
import torch.nn.functional as F

from .data import to_device
from .errors import CheckpointError
from .importance import ImportanceTracker
from .stepping import SteppingNet
from .train import BetaSuppression, _forward, _split_batch, autocast, check_amp, make_optimizer

__all__ = ["ConstructionConfig", "ConstructionResult", "Constructor", "CONSTRUCTION_FORMAT"]

logger = logging.getLogger(__name__)

CONSTRUCTION_FORMAT = "nni_steppingnet.construction/1"


def _is_number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


def _is_int(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, int)


@dataclass
class ConstructionConfig:
    """Settings of the construction loop (names follow the paper).

    Attributes:
        budgets: ``P_i / reference_macs`` for ``i = 1..N``, strictly ascending and positive.
        reference_macs: MACs the budgets are fractions of (the original, unexpanded network).
        batches_per_iteration: ``m``, training batches per subnet per iteration.
        iterations: ``N_t``, the most iterations the loop may run.
        alpha_growth: ``alpha_{k+1} / alpha_k`` in eq. (3).
        beta: learning-rate suppression ratio (``None`` or 1.0 disables it).
        prune_threshold: weights with ``|W|`` below it are pruned after each iteration (0 disables).
        lr, momentum, weight_decay: SGD settings of the construction training.
        seed: seeds the order of the training batches (epoch ``e`` uses ``seed + e``).
    """

    budgets: list[float]
    reference_macs: int
    batches_per_iteration: int = 250
    iterations: int = 300
    alpha_growth: float = 1.5
    beta: float | None = 0.9
    prune_threshold: float = 1e-5
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    seed: int = 0

    def __post_init__(self) -> None:
        budgets = self.budgets
        if isinstance(budgets, (str, bytes)) or not isinstance(budgets, (list, tuple)) or not budgets:
            raise ValueError(f"budgets must be a non-empty list of MAC fractions, got {budgets!r}")
        if not all(_is_number(b) and b > 0 for b in budgets):
            raise ValueError(f"budgets must be positive finite numbers, got {list(budgets)}")
        if any(b >= c for b, c in zip(budgets, budgets[1:])):
            raise ValueError(f"budgets must be strictly ascending (subnet i+1 contains subnet i), "
                             f"got {list(budgets)}")
        self.budgets = [float(b) for b in budgets]
        if not _is_int(self.reference_macs) or self.reference_macs <= 0:
            raise ValueError(f"reference_macs must be a positive int (e.g. the original network's "
                             f"net.full_macs), got {self.reference_macs!r}")
        for name in ("batches_per_iteration", "iterations"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not _is_number(self.alpha_growth) or self.alpha_growth <= 0:
            raise ValueError(f"alpha_growth must be a positive number, got {self.alpha_growth!r}")
        if self.beta is not None and (not _is_number(self.beta) or not 0 < self.beta <= 1):
            raise ValueError(f"beta must be in (0, 1] or None, got {self.beta!r}")
        if not _is_number(self.prune_threshold) or self.prune_threshold < 0:
            raise ValueError(f"prune_threshold must be a number >= 0, got {self.prune_threshold!r}")
        if not _is_number(self.lr) or self.lr <= 0:
            raise ValueError(f"lr must be a positive number, got {self.lr!r}")
        if not _is_number(self.momentum) or not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum!r}")
        if not _is_number(self.weight_decay) or self.weight_decay < 0:
            raise ValueError(f"weight_decay must be a number >= 0, got {self.weight_decay!r}")
        if not _is_int(self.seed):
            raise ValueError(f"seed must be an int, got {self.seed!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class ConstructionResult:
    """Outcome of :meth:`Constructor.run`."""

    budgets_met: list[bool]
    all_met: bool
    macs: list[int]
    iterations: int
    mac_ratios: list[float] = field(default_factory=list)


class _BatchStream:
    """An endless, seeded, resumable stream of batches over a loader.

    Epoch ``e`` is shuffled by reseeding the loader's generator (and a ``RandomSampler``'s own
    generator) with ``seed + e``; the iterator is created, and its first batch drawn, under a
    forked CPU RNG seeded with ``seed + e`` so that neither depends on (nor changes) the global RNG.
    The position ``(epoch, batch)`` resumes exactly: reopening epoch ``e`` skips ``batch`` batches.
    With persistent DataLoader workers the workers' own augmentation RNG is not part of the state.
    """

    def __init__(self, loader: Iterable[Any], seed: int) -> None:
        self.loader = loader
        self.seed = int(seed)
        self.epoch = 0
        self.batch = 0
        self._iter: Iterator[Any] | None = None
        self._pending: list[Any] = []

    def _reseed(self, epoch_seed: int) -> None:
        generator = getattr(self.loader, "generator", None)
        if isinstance(generator, torch.Generator):
            generator.manual_seed(epoch_seed)
        sampler = getattr(self.loader, "sampler", None)
        sampler_gen = getattr(sampler, "generator", None)
        if isinstance(sampler_gen, torch.Generator) and sampler_gen is not generator:
            sampler_gen.manual_seed(epoch_seed)

    def _open(self) -> None:
        """Open the iterator of ``self.epoch`` positioned at ``self.batch``."""
        for _ in range(2):
            epoch_seed = self.seed + self.epoch
            with torch.random.fork_rng(devices=[]):
                torch.default_generator.manual_seed(epoch_seed)
                self._reseed(epoch_seed)
                iterator = iter(self.loader)
                self._pending = []
                try:
                    for _ in range(self.batch):
                        next(iterator)
                    if self.batch == 0:
                        # The sampler draws its seed lazily: draw the first batch in the fork too.
                        self._pending = [next(iterator)]
                except StopIteration:
                    if self.batch == 0:
                        raise ValueError("train_loader yielded no batches; give it a non-empty "
                                         "dataset (and drop_last=False for small datasets)") from None
                    self.epoch += 1
                    self.batch = 0
                    continue
            self._iter = iterator
            return
        raise RuntimeError("unreachable")  # pragma: no cover

    def next(self) -> Any:
        if self._iter is None:
            self._open()
        assert self._iter is not None
        if self._pending:
            item = self._pending.pop()
        else:
            try:
                item = next(self._iter)
            except StopIteration:
                self.epoch += 1
                self.batch = 0
                self._open()
                item = self._pending.pop()
        self.batch += 1
        return item

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batch": self.batch, "seed": self.seed}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self.epoch = int(state["epoch"])
        self.batch = int(state["batch"])
        self._iter = None
        self._pending = []


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": _to_lists(random.getstate()),
        "numpy": [str(np_state[0]), torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
                  int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _to_lists(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_to_lists(v) for v in value]
    return value


def _to_tuples(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_to_tuples(v) for v in value)
    return value


def _set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_to_tuples(state["python"]))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), int(pos), int(has_gauss), float(cached)))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class _CostTable:
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

    def cost_of(self, j: int) -> float:
        return float(self.cost[j])

    def take(self, j: int) -> float:
        """Remove neuron ``j``'s synapses; return the MACs that removes."""
        removed_total = 0.0
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


class Constructor:
    """Run the construction loop of Fig. 3 on ``net`` (in place).

    Args:
        net: the SteppingNet to construct; its current assignment is the start (normally all
            neurons in subnet 1).
        config: :class:`ConstructionConfig`; ``len(config.budgets)`` must equal ``net.num_subnets``.
        train_loader: yields ``(inputs, targets)`` batches; a DataLoader's shuffling generator is
            reseeded every epoch (see :class:`_BatchStream`) so a resumed run sees the same batches.
        device: where to train (the model is moved there).
        amp: ``None`` or ``'bf16'`` (autocast).

    ``history`` gets one dict per iteration with ``iteration``, ``macs`` (per subnet),
    ``mac_ratios`` (``macs / reference_macs``), ``budgets_met``, ``loss`` (mean training loss),
    ``moved`` (neurons moved out of each subnet), ``moved_macs`` (MACs removed from each subnet by
    the moves), ``pruned`` (weight entries newly pruned) and ``retired`` (dead neurons sent to
    ``N + 1``, per subnet index they left; see :meth:`retire_dead`).

    ``frozen`` (bool ``[num_neurons]`` or ``None``) marks neurons that never change subnet; the
    base class freezes none (the NNI pruner freezes the layers its config list leaves out).
    """

    frozen: torch.Tensor | None = None
    #: at most half of a group's neurons in a subnet leave it per selection (see :meth:`_select`)
    group_move_limit: bool = True

    def __init__(
        self,
        net: SteppingNet,
        config: ConstructionConfig,
        train_loader: Iterable[Any],
        *,
        device: torch.device | str = "cpu",
        amp: str | None = None,
    ) -> None:
        if not isinstance(net, SteppingNet):
            raise TypeError(f"Constructor needs a SteppingNet, got {type(net).__name__}")
        if not isinstance(config, ConstructionConfig):
            raise TypeError(f"config must be a ConstructionConfig, got {type(config).__name__}")
        if len(config.budgets) != net.num_subnets:
            raise ValueError(f"config.budgets has {len(config.budgets)} entries but the net has "
                             f"{net.num_subnets} subnets; give one budget per subnet")
        self.net = net
        self.config = config
        self.loader = train_loader
        try:
            self.device = torch.device(device)
        except (RuntimeError, TypeError) as exc:
            raise ValueError(f"device must be like 'cpu' or 'cuda', got {device!r}") from exc
        self.amp = check_amp(amp)
        net.model.to(self.device)
        self.tracker = ImportanceTracker(net)
        self.optimizer = make_optimizer(net.model.parameters(), config.lr, config.momentum, config.weight_decay)
        self._stream = _BatchStream(train_loader, config.seed)
        self.iteration = 0
        self.history: list[dict[str, Any]] = []
        n = net.num_subnets
        self.budget_macs = [b * config.reference_macs for b in config.budgets]
        flat = net.flat_assignment()[:-1]
        if flat.numel() and int(flat.max()) > 1:
            logger.info("construction starts from a net whose neurons are not all in subnet 1")
        #: P_t: MACs of the network at the start of construction.
        self.initial_macs = net.macs(n)
        self.quantum = (self.initial_macs - self.budget_macs[0]) / config.iterations
        offsets = net.index.offsets
        self._group_of = torch.zeros(net.num_neurons, dtype=torch.long)
        for g, start in enumerate(offsets[:-1]):
            self._group_of[start:offsets[g + 1]] = g
        self._all_met = all(self._budgets_met(self._current_macs()))

    # ----------------------------------------------------------------- status
    def _current_macs(self) -> list[int]:
        return [self.net.macs(s) for s in range(1, self.net.num_subnets + 1)]

    def _budgets_met(self, macs: list[int]) -> list[bool]:
        return [m <= p for m, p in zip(macs, self.budget_macs)]

    @property
    def done(self) -> bool:
        """True once every budget is met or ``config.iterations`` iterations have run."""
        return self._all_met or self.iteration >= self.config.iterations

    def result(self) -> ConstructionResult:
        macs = self._current_macs()
        met = self._budgets_met(macs)
        return ConstructionResult(budgets_met=met, all_met=all(met), macs=macs, iterations=self.iteration,
                                  mac_ratios=[m / self.config.reference_macs for m in macs])

    # ------------------------------------------------------------------- loop
    def step(self) -> dict[str, Any]:
        """Run one iteration of Fig. 3 (train, move, prune) and return its history entry."""
        if self.done:
            raise RuntimeError(f"construction is finished after {self.iteration} iterations "
                               f"(all budgets met: {self._all_met}); check .done before step()")
        loss = self._train()
        moved, moved_counts, moved_macs = self.move()
        pruned = self.prune(moved)
        retired = self.retire_dead(final=False)
        self.tracker.reset()
        self.iteration += 1
        macs = self._current_macs()
        met = self._budgets_met(macs)
        if all(met) or self.iteration >= self.config.iterations:
            # Construction ends: now a neuron whose consumers all sit in smaller subnets stays so.
            final = self.retire_dead(final=True)
            retired = [a + b for a, b in zip(retired, final)]
            if any(final):
                macs = self._current_macs()
                met = self._budgets_met(macs)
        self._all_met = all(met)
        entry = {
            "iteration": self.iteration,
            "macs": macs,
            "mac_ratios": [m / self.config.reference_macs for m in macs],
            "budgets_met": met,
            "loss": loss,
            "moved": moved_counts,
            "moved_macs": moved_macs,
            "pruned": pruned,
            "retired": retired,
        }
        self.history.append(entry)
        logger.info("construction iteration %d: MACs %s (budgets %s), moved %s, loss %.4f",
                    self.iteration, [f"{r:.3f}" for r in entry["mac_ratios"]],
                    [f"{b:.3f}" for b in self.config.budgets], moved_counts, loss)
        return entry

    def run(
        self,
        callback: Callable[[dict[str, Any]], None] | None = None,
        progress: bool = False,
    ) -> ConstructionResult:
        """Iterate until every budget is met or ``config.iterations`` iterations have run.

        ``callback(entry)`` is called after every iteration (e.g. to checkpoint or report).
        """
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=max(self.config.iterations - self.iteration, 0), desc="construction",
                       leave=False, dynamic_ncols=True)
        try:
            while not self.done:
                entry = self.step()
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix_str(" ".join(f"{r:.3f}" for r in entry["mac_ratios"]))
                if callback is not None:
                    callback(entry)
        finally:
            if bar is not None:
                bar.close()
        result = self.result()
        if not result.all_met:
            logger.warning("construction stopped after %d iterations with budgets met %s "
                           "(MAC ratios %s vs budgets %s)", result.iterations, result.budgets_met,
                           [round(r, 4) for r in result.mac_ratios], self.config.budgets)
        return result

    def _train(self) -> float:
        net, cfg = self.net, self.config
        model = net.model
        model.train()
        suppress = None
        if cfg.beta is not None and cfg.beta != 1.0:
            suppress = BetaSuppression(net, 1, cfg.beta)
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        steps = 0
        try:
            for k in range(1, net.num_subnets + 1):
                if suppress is not None:
                    suppress.subnet = k
                for _ in range(cfg.batches_per_iteration):
                    inputs, targets = _split_batch(to_device(self._stream.next(), self.device))
                    self.optimizer.zero_grad(set_to_none=True)
                    with net.subnet(k), autocast(self.device, self.amp):
                        logits = _forward(model, inputs)
                    loss = F.cross_entropy(logits.float(), targets)
                    with self.tracker.collect(subnet=k):
                        loss.backward()
                    self.optimizer.step()
                    total += loss.detach()
                    steps += 1
        finally:
            if suppress is not None:
                suppress.remove()
        return float(total) / max(steps, 1)

    # --------------------------------------------------------------- movement
    def neuron_costs(self, s: int) -> torch.Tensor:
        """MACs of subnet ``s`` that each neuron carries alone (float64 ``[num_neurons]``).

        A neuron's cost is the active weight entries of its output channels plus the active
        entries reading it, times their layers' output positions: the MACs subnet ``s`` loses if
        only that neuron leaves it.
        """
        return _CostTable(self.net, s).cost[: self.net.num_neurons].clone()

    def _select(
        self,
        i: int,
        amount: float,
        flat: torch.Tensor,
        scores: torch.Tensor,
        moved: torch.Tensor,
        cap: float,
        strict: bool = True,
    ) -> list[int]:
        """Neurons of subnet ``i`` in ascending criterion whose MACs first reach ``amount``.

        Costs are marginal: after a neuron is taken, the synapses it shares with the other
        candidates no longer count for them, so the total is the exact MAC reduction of subnet
        ``i``. Per-group limit (``group_move_limit``, our addition): at most half of a group's
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
        lands near its target instead of up to a whole expensive neuron below it.
        """
        assignment = flat[:-1]
        candidates = ((assignment == i) & ~moved).nonzero().flatten()
        if candidates.numel() == 0:
            return []
        table = _CostTable(self.net, i)
        order = candidates[torch.argsort(scores[candidates], stable=True)].tolist()
        inside = torch.bincount(self._group_of[assignment <= i], minlength=len(self.net.groups)).tolist()
        # Per group: at most half of its neurons in subnet i leave in one call (at least one
        # may), and at most three quarters to land near the target (see the docstring).
        here = torch.bincount(self._group_of[assignment == i], minlength=len(self.net.groups)).tolist()
        limit = [max(1, c // 2) for c in here]
        hard = [max(1, c - math.ceil(c / 4)) for c in here]
        if not self.group_move_limit:
            limit = hard = [self.net.num_neurons] * len(here)
        left_soft, left_hard = list(limit), list(hard)
        group_of = self._group_of.tolist()
        window = max(4, math.ceil(0.5 * len(order)))
        taken: set[int] = set()
        chosen: list[int] = []
        total = 0.0
        protected: set[int] = set()

        def movable(j: int, capped: bool = True) -> bool:
            if j in taken:
                return False
            if inside[group_of[j]] <= 1:
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
            ahead = [x for x in order[pos + 1:pos + window] if movable(x)]
            fits = [x for x in ahead if total + table.cost_of(x) <= cap]
            if not fits:
                # Landing near the target comes before the per-group limit.
                ahead = [x for x in order[pos + 1:pos + window] if movable(x, capped=False)]
                fits = [x for x in ahead if total + table.cost_of(x) <= cap]
            if fits:
                take(fits[0])  # the lowest-M neuron that still fits under the target
                continue
            # Nothing fits: every neuron overshoots the cap; the cheapest one overshoots least.
            cheapest = min([(table.cost_of(x), k, x) for k, x in enumerate(ahead)], default=(c, 0, j))
            best_cost, best = (cheapest[0], cheapest[2]) if cheapest[0] < c else (c, j)
            if strict or total + best_cost - cap < cap - total:
                take(best)
            break
        if protected:
            logger.info("subnet %d: kept %d neuron(s) that are the last of their group in the subnet",
                        i, len(protected))
        return chosen

    def move(self, scores: torch.Tensor | None = None) -> tuple[torch.Tensor, list[int], list[int]]:
        """The movement phase of one iteration (step 2 of the loop in the module docstring).

        Args:
            scores: the criterion ``M`` per neuron (``[num_neurons]``); default: eq. (3) of the
                tracker's accumulated importance. Lower means "move first".

        Returns:
            ``(moved, counts, moved_macs)``: a bool mask over neurons moved, the number of neurons
            moved out of each subnet, and the MACs each subnet lost by the moves.
        """
        net, cfg = self.net, self.config
        n = net.num_subnets
        if scores is None:
            scores = self.tracker.criterion(cfg.alpha_growth)
        scores = torch.as_tensor(scores).detach().to(device="cpu", dtype=torch.float64)
        if tuple(scores.shape) != (net.num_neurons,):
            raise ValueError(f"scores must have shape ({net.num_neurons},) (one per neuron), got "
                             f"{tuple(scores.shape)}")
        moved = torch.zeros(net.num_neurons, dtype=torch.bool)
        counts = [0] * n
        moved_macs = [0] * n
        left = cfg.iterations - self.iteration
        macs = self._current_macs()
        for i in range(1, n + 1):
            budget = self.budget_macs[i - 1]
            excess = macs[i - 1] - budget
            if excess <= 0:
                continue
            if i == 1:
                diff_excess = excess
            else:
                # Flow condition: subnet i passes neurons on only once it holds more than its share.
                diff_excess = (macs[i - 1] - macs[i - 2]) - (budget - self.budget_macs[i - 2])
                if diff_excess <= 0:
                    continue
            cap = min(excess, diff_excess)
            amount = min(max(self.quantum, cap / left), cap)
            start = macs[i - 1]
            # _select's marginal costs are exact, so one round normally moves the amount; the
            # exact recount and top-up are a safeguard (e.g. a conv reading its own group).
            for _ in range(8):
                remaining = amount - (start - macs[i - 1])
                if remaining <= 0:
                    break
                flat = net.flat_assignment()
                # The budget (absolute excess) must be met; the share (difference excess) is
                # rounded to the nearest neuron while the smaller subnet is still over budget.
                chosen = self._select(i, remaining, flat, scores, moved, cap - (start - macs[i - 1]),
                                      strict=excess <= diff_excess)
                if not chosen:
                    break
                index = torch.tensor(chosen, dtype=torch.long)
                flat[index] = i + 1
                net.set_flat_assignment(flat)
                moved[index] = True
                counts[i - 1] += len(chosen)
                macs = self._current_macs()
            moved_macs[i - 1] = start - macs[i - 1]
        return moved, counts, moved_macs

    # ----------------------------------------------------------- dead neurons
    def dead_neurons(self, final: bool = True) -> torch.Tensor:
        """Bool ``[num_neurons]``: neurons in a subnet ``<= N`` whose output no weight reads.

        A reader of neuron ``j`` is a weight entry ``W[o, i = j]`` with ``o != j`` (a synapse into
        another neuron or into the logits; a depthwise conv's read of its own channel does not
        count). With ``final=True`` a reader must be active in subnet ``N``'s masks (the union of
        all subnets' masks, since subnets are nested): ``j`` is dead when every weight reading it
        is pruned or structurally inactive (its consumer is in a smaller subnet or in ``N + 1``).
        Its value then reaches no output of any subnet, while its incoming synapses cost MACs.

        With ``final=False`` only the lasting reasons count: a reader is any unpruned entry whose
        consumer is in a subnet ``<= N``, so a neuron whose consumers all sit in smaller subnets
        is *not* dead (those consumers may still move up and read it; during construction a
        subnet passes neurons on before the next layer's neurons follow).
        """
        net = self.net
        n, total = net.num_subnets, net.num_neurons
        net.refresh()
        flat = net.flat_assignment()
        readers = torch.zeros(total + 1, dtype=torch.float64)
        for k, layer in enumerate(net.layers):
            if final:
                mask = net.weight_mask(k, n).to(torch.float64)
            else:
                prune = net.prune_masks.get(layer.name)
                weight = net.original_weight(k)
                mask = (torch.ones(weight.shape, dtype=torch.float64) if prune is None
                        else prune.to(device="cpu", dtype=torch.float64))
                if not layer.is_logits:
                    alive = (flat[net.index.out_positions[k]] <= n).to(torch.float64)
                    mask = mask * alive.reshape((-1,) + (1,) * (mask.dim() - 1))
            entries = mask.reshape(mask.shape[0], net.index.in_positions[k].shape[1], -1).sum(-1)  # [out, in/groups]
            in_pos = net.index.in_positions[k].expand_as(entries)
            if not layer.is_logits:
                entries = entries * (in_pos != net.index.out_positions[k].unsqueeze(1))
            readers.index_add_(0, in_pos.reshape(-1), entries.reshape(-1))
        return (flat[:-1] <= n) & (readers[:-1] == 0)

    def retire_dead(self, final: bool = True) -> list[int]:
        """Send dead neurons (:meth:`dead_neurons`) to ``N + 1``, repeatedly until none is left.

        Retiring a neuron masks its incoming synapses in every subnet, so ``net.macs(s)`` drops by
        exactly their MACs (the masks are recounted) and no subnet's function changes (nothing
        read the neuron). That can leave its producers dead in turn, hence the repetition. Each
        group keeps at least one neuron at its smallest subnet index, so no subnet loses a whole
        layer; ``frozen`` neurons stay. :meth:`step` retires the lasting dead (``final=False``)
        every iteration and all dead neurons (``final=True``) after the last iteration. Returns
        the number of neurons retired per subnet index they left (``[N]``).
        """
        net = self.net
        n = net.num_subnets
        counts = [0] * n
        frozen = None
        if self.frozen is not None:
            frozen = torch.as_tensor(self.frozen, dtype=torch.bool).flatten()[: net.num_neurons].cpu()
        for _ in range(len(net.layers) + 2):
            dead = self.dead_neurons(final)
            if frozen is not None:
                dead &= ~frozen
            if not bool(dead.any()):
                break
            flat = net.flat_assignment()
            assignment = flat[:-1]
            for g, start in enumerate(net.index.offsets[:-1]):
                stop = net.index.offsets[g + 1]
                block, gone = assignment[start:stop], dead[start:stop]
                lowest = int(block.min())
                at_lowest = block == lowest
                if lowest <= n and bool(gone[at_lowest].all()):
                    # every neuron at the group's smallest index is dead: keep the first of them
                    gone[at_lowest.nonzero()[0, 0]] = False
            index = dead.nonzero().flatten()
            if index.numel() == 0:
                break
            for a, c in zip(*torch.unique(assignment[index], return_counts=True)):
                counts[int(a) - 1] += int(c)
            flat[index] = n + 1
            net.set_flat_assignment(flat)
        if any(counts):
            logger.info("retired %s dead neuron(s) (per subnet index) to the unused index %d", counts, n + 1)
        return counts

    # ---------------------------------------------------------------- pruning
    def prune(self, moved: torch.Tensor) -> int:
        """Mask weights with ``|W| < prune_threshold`` (on top of the previous pruning masks) and
        revive every synapse from or to a neuron in ``moved`` (bool ``[num_neurons]``).

        Sets ``net.prune_masks`` and returns the number of weight entries newly pruned.
        """
        net, cfg = self.net, self.config
        moved = torch.as_tensor(moved).to(device="cpu", dtype=torch.bool)
        if tuple(moved.shape) != (net.num_neurons,):
            raise ValueError(f"moved must be a bool mask of shape ({net.num_neurons},), got "
                             f"{tuple(moved.shape)}")
        moved_ext = torch.cat([moved, torch.zeros(1, dtype=torch.bool)])
        masks: dict[str, torch.Tensor] = {}
        newly = 0
        for k, layer in enumerate(net.layers):
            weight = net.original_weight(k).detach()
            keep = (weight.abs() >= cfg.prune_threshold).cpu()
            previous = net.prune_masks.get(layer.name)
            if previous is not None:
                keep &= previous.to(device="cpu", dtype=torch.bool)
            rows = moved_ext[net.index.out_positions[k]] if not layer.is_logits else torch.zeros(keep.shape[0], dtype=torch.bool)
            revive = rows.unsqueeze(1) | moved_ext[net.index.in_positions[k]]  # [out, in/groups]
            revive = revive.reshape(revive.shape + (1,) * (keep.dim() - 2)).expand(keep.shape)
            keep |= revive
            before = previous.sum() if previous is not None else torch.tensor(keep.numel())
            newly += max(int(before) - int(keep.sum()), 0)
            if not bool(keep.all()):
                masks[layer.name] = keep
        net.prune_masks = masks
        net.invalidate()
        return newly

    # -------------------------------------------------------------- state I/O
    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs to end exactly like an uninterrupted one."""
        return {
            "format": CONSTRUCTION_FORMAT,
            "config": self.config.to_dict(),
            "iteration": self.iteration,
            "history": [dict(entry) for entry in self.history],
            "initial_macs": self.initial_macs,
            "net": self.net.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "importance": self.tracker.state_dict(),
            "stream": self._stream.state_dict(),
            "rng": _rng_state(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict` (the net, optimizer, data position and RNG states)."""
        if not isinstance(state, Mapping) or state.get("format") != CONSTRUCTION_FORMAT:
            found = state.get("format") if isinstance(state, Mapping) else type(state).__name__
            raise CheckpointError(f"not a construction state (format {found!r}, expected "
                                  f"{CONSTRUCTION_FORMAT!r})")
        saved = dict(state["config"])
        mine = self.config.to_dict()
        differ = sorted(k for k in set(saved) | set(mine) if saved.get(k) != mine.get(k))
        if differ:
            raise CheckpointError("the construction state was saved with a different config ("
                                  + ", ".join(f"{k}: saved {saved.get(k)!r} vs now {mine.get(k)!r}" for k in differ)
                                  + "); resume with the same settings")
        self.net.load_state_dict(state["net"])
        self.net.model.to(self.device)
        self.optimizer.load_state_dict(state["optimizer"])
        self.tracker.load_state_dict(state["importance"])
        self._stream.load_state_dict(state["stream"])
        self.iteration = int(state["iteration"])
        self.history = [dict(entry) for entry in state["history"]]
        self.initial_macs = int(state["initial_macs"])
        self.quantum = (self.initial_macs - self.budget_macs[0]) / self.config.iterations
        _set_rng_state(state["rng"])
        self._all_met = all(self._budgets_met(self._current_macs()))

    def close(self) -> None:
        """Remove the importance hooks from the model."""
        self.tracker.close()

