"""The construction loop (paper Fig. 3, Section III-A): a thin loop over the functions of
:mod:`~nni_steppingnet.construction.select` and :mod:`~nni_steppingnet.construction.prune`.

All neurons start in subnet 1. Every iteration:

1. for each subnet ``k = 1..N``: train ``m`` batches of subnet ``k``'s loss (SGD, beta
   suppression for ``k``), accumulating the neuron importance ``|dL_k/dr_j|`` (eq. 2);
2. for each subnet ``i = 1..N``: if ``MAC(i) > P_i`` and (``i == 1`` or
   ``MAC(i) - MAC(i-1) > P_i - P_{i-1}``, the *flow condition* that lets subnet ``i`` first fill
   up to its own share), move the neurons of subnet ``i`` with the smallest criterion ``M``
   (eq. 3) to subnet ``i + 1`` (``N + 1`` = unused) until the moved MACs reach the quantum;
3. unstructured pruning: a weight with ``|W| < prune_threshold`` is masked in every subnet, except
   that the synapses of neurons moved in this iteration are revived;
4. dead neurons are retired (our addition, :func:`~nni_steppingnet.construction.prune.retire_dead`): a neuron in a subnet
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
fit; our addition, see :func:`~nni_steppingnet.construction.select.select_neurons`).

Two more of our additions decide how a subnet lands on its budget (``construction.landing`` and
``construction.min_group_fraction``, see :func:`~nni_steppingnet.construction.select.move_neurons`):
a neuron group keeps at least half of the uniform width that meets the subnet's budget; a
subnet that only a too-expensive neuron could bring under its budget waits while a neuron that
fits is merely held back by the per-group limits; and a subnet whose cheap groups, down to their
floors, cannot pay for its excess gives up a neuron of its most expensive group first
(``landing="ahead"``, the default). Measured on LeNet-5 / CIFAR-10 (three seeds, validation split,
docs/results.md): mean subnet error 48.99% with the floor and waiting against 53.34% with the
old rules (subnet 1 +14.2 points), and 43.12% with ``"ahead"`` against 49.53% without it on the
same teachers (subnet 1 +11.4 points, at its 15% budget instead of 10%).

A neuron moved in an iteration is not moved again in the same iteration (it has not been
trained in its new subnet yet). The last neuron of a neuron group inside subnet ``i`` is never
moved out of it, so no subnet loses a whole layer (which would disconnect it from its input).

Extension points (public): ``train=`` replaces the training of an iteration (a callable taking the
constructor and returning the mean loss; the NNI pruner trains in the user's loop instead),
``scores=`` replaces the criterion ``M`` (a callable taking the constructor and returning one
score per neuron, lower moves first), ``frozen=`` marks neurons that never move, and
:meth:`Constructor.finish_iteration` ends an iteration (move, prune, retire, record) without
training.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..criteria import CRITERIA, make_scorer
from ..data import to_device
from ..errors import CheckpointError
from ..stepping import SteppingNet
from ..train import BetaSuppression, autocast, check_amp, forward_logits, make_optimizer, split_batch
from ..validation import CONSTRUCTION_RULES, DEFAULT_LANDING, LANDINGS, check_budgets, is_int
from .batches import BatchStream, rng_state, set_rng_state
from .prune import dead_neurons, prune_small_weights, retire_dead
from .select import move_neurons, neuron_costs, select_neurons

__all__ = ["ConstructionConfig", "ConstructionResult", "Constructor", "CONSTRUCTION_FORMAT", "TrainFn", "ScoreFn"]

logger = logging.getLogger(__name__)

CONSTRUCTION_FORMAT = "nni_steppingnet.construction/1"


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
    #: neuron scorer (:data:`nni_steppingnet.criteria.CRITERIA`): ``gradient`` is the paper's eq. (2)-(3)
    criterion: str = "gradient"
    #: how a subnet lands on its budget (:data:`nni_steppingnet.validation.LANDINGS`)
    landing: str = DEFAULT_LANDING
    #: per-group floor of every subnet's neurons (see :func:`~nni_steppingnet.construction.select.move_neurons`)
    min_group_fraction: float = 0.5

    def __post_init__(self) -> None:
        if self.criterion not in CRITERIA:
            raise ValueError(f"criterion must be one of {', '.join(CRITERIA)}, got {self.criterion!r}")
        if self.landing not in LANDINGS:
            raise ValueError(f"landing must be one of {', '.join(map(repr, LANDINGS))}, got {self.landing!r}")
        # The checks live in nni_steppingnet.validation, shared with the recipes and the NNI pruner.
        self.budgets = check_budgets(self.budgets)
        if not is_int(self.reference_macs) or self.reference_macs <= 0:
            raise ValueError(
                f"reference_macs must be a positive int (e.g. the original network's "
                f"net.full_macs), got {self.reference_macs!r}"
            )
        for name, rule in CONSTRUCTION_RULES.items():
            value = getattr(self, name)
            if not (name == "beta" and value is None):  # None: no suppression
                setattr(self, name, rule.check(name, value))

    @classmethod
    def from_settings(
        cls,
        budgets: Sequence[float],
        reference_macs: int,
        settings: Mapping[str, Any],
        **overrides: Any,
    ) -> ConstructionConfig:
        """Build from a mapping of settings (e.g. a recipe's ``construction`` section as a dict):
        the keys that are fields of this class are taken, others (settings of the application
        such as ``monitor_samples``) are ignored; ``overrides`` (e.g. ``seed=``) win."""
        names = {f.name for f in dataclasses.fields(cls)} - {"budgets", "reference_macs"}
        values = {k: v for k, v in settings.items() if k in names}
        values.update(overrides)
        return cls(budgets=list(budgets), reference_macs=reference_macs, **values)

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


#: ``train(constructor) -> mean loss`` of one iteration (see :class:`Constructor`).
TrainFn = Callable[["Constructor"], float]
#: ``scores(constructor) -> [num_neurons]`` criterion, lower moves first.
ScoreFn = Callable[["Constructor"], torch.Tensor]


class Constructor:
    """Run the construction loop of Fig. 3 on ``net`` (in place).

    Args:
        net: the SteppingNet to construct; its current assignment is the start (normally all
            neurons in subnet 1).
        config: :class:`ConstructionConfig`; ``len(config.budgets)`` must equal ``net.num_subnets``.
        train_loader: yields ``(inputs, targets)`` batches; a DataLoader's shuffling generator is
            reseeded every epoch (see :class:`~nni_steppingnet.construction.batches.BatchStream`) so
            a resumed run sees the same batches. ``None`` only together with ``train``.
        device: where to train (the model is moved there).
        amp: ``None`` or ``'bf16'`` (autocast).
        train: ``train(constructor) -> mean loss`` replaces the built-in training of an
            iteration (``m`` batches per subnet from ``train_loader`` with beta suppression and
            importance collection through ``constructor.tracker``).
        scores: ``scores(constructor) -> [num_neurons]`` replaces the criterion ``M`` (default:
            eq. (3) of ``constructor.tracker``'s normalised importance); lower moves first.
        frozen: bool ``[num_neurons]``: neurons that never change subnet (neither selected nor
            retired as dead).
        forward_module: the module the built-in training calls for the forward, when it is not
            ``net.model`` itself: a ``DistributedDataParallel`` wrapper of it
            (:func:`nni_steppingnet.distributed.wrap_ddp`).
        reduce: averages a tensor over the ranks of a data-parallel job
            (:func:`nni_steppingnet.distributed.all_reduce_mean`); the scorer applies it to every
            batch's signed importance, so every rank moves the same neurons.

    ``history`` gets one dict per iteration with ``iteration``, ``macs`` (per subnet),
    ``mac_ratios`` (``macs / reference_macs``), ``budgets_met``, ``loss`` (mean training loss),
    ``moved`` (neurons moved out of each subnet), ``moved_macs`` (MACs removed from each subnet by
    the moves), ``pruned`` (weight entries newly pruned) and ``retired`` (dead neurons sent to
    ``N + 1``, per subnet index they left; see :meth:`retire_dead`).

    ``frozen`` (bool ``[num_neurons]`` or ``None``, settable) marks neurons that never change
    subnet (the NNI pruner freezes the layers its config list leaves out).
    """

    #: at most half of a group's neurons in a subnet leave it per selection
    #: (see :func:`~nni_steppingnet.construction.select.select_neurons`)
    group_move_limit: bool = True

    def __init__(
        self,
        net: SteppingNet,
        config: ConstructionConfig,
        train_loader: Iterable[Any] | None = None,
        *,
        device: torch.device | str = "cpu",
        amp: str | None = None,
        train: TrainFn | None = None,
        scores: ScoreFn | None = None,
        frozen: torch.Tensor | None = None,
        forward_module: nn.Module | None = None,
        reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        if not isinstance(net, SteppingNet):
            raise TypeError(f"Constructor needs a SteppingNet, got {type(net).__name__}")
        if forward_module is not None and not isinstance(forward_module, nn.Module):
            raise TypeError(
                f"forward_module must be an nn.Module wrapping net.model (DistributedDataParallel), "
                f"got {type(forward_module).__name__}"
            )
        if not isinstance(config, ConstructionConfig):
            raise TypeError(f"config must be a ConstructionConfig, got {type(config).__name__}")
        if len(config.budgets) != net.num_subnets:
            raise ValueError(
                f"config.budgets has {len(config.budgets)} entries but the net has "
                f"{net.num_subnets} subnets; give one budget per subnet"
            )
        for name, fn in (("train", train), ("scores", scores)):
            if fn is not None and not callable(fn):
                raise TypeError(f"{name} must be callable (it gets the Constructor), got {type(fn).__name__}")
        if train_loader is None and train is None:
            raise ValueError("give a train_loader, or a train= callable that trains an iteration")
        self.net = net
        self.config = config
        self.loader = train_loader
        self.train_fn = train
        self.scores_fn = scores
        self.frozen = frozen
        try:
            self.device = torch.device(device)
        except (RuntimeError, TypeError) as exc:
            raise ValueError(f"device must be like 'cpu' or 'cuda', got {device!r}") from exc
        self.amp = check_amp(amp)
        net.model.to(self.device)
        #: the module whose forward training calls: ``net.model`` or a DDP wrapper of it
        self.forward_module = net.model if forward_module is None else forward_module
        self.tracker = make_scorer(config.criterion, net, reduce)
        self.optimizer = make_optimizer(net.model.parameters(), config.lr, config.momentum, config.weight_decay)
        self._stream = BatchStream(() if train_loader is None else train_loader, config.seed)
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
        return ConstructionResult(
            budgets_met=met,
            all_met=all(met),
            macs=macs,
            iterations=self.iteration,
            mac_ratios=[m / self.config.reference_macs for m in macs],
        )

    # ------------------------------------------------------------------- loop
    def step(self) -> dict[str, Any]:
        """Run one iteration of Fig. 3 (train, move, prune) and return its history entry."""
        self._check_not_done("step()")
        return self.finish_iteration(self.train_iteration())

    def _check_not_done(self, what: str) -> None:
        if self.done:
            raise RuntimeError(
                f"construction is finished after {self.iteration} iterations "
                f"(all budgets met: {self._all_met}); check .done before {what}"
            )

    def finish_iteration(self, loss: float) -> dict[str, Any]:
        """End an iteration whose training already ran (elsewhere): move neurons by the
        criterion, prune, retire dead neurons, reset the importance and record the history entry
        (``loss`` is recorded as the iteration's mean training loss)."""
        self._check_not_done("finish_iteration()")
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
        entry: dict[str, Any] = {
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
        logger.info(
            "construction iteration %d: MACs %s (budgets %s), moved %s, loss %.4f",
            self.iteration,
            [f"{r:.3f}" for r in entry["mac_ratios"]],
            [f"{b:.3f}" for b in self.config.budgets],
            moved_counts,
            loss,
        )
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

            bar = tqdm(
                total=max(self.config.iterations - self.iteration, 0),
                desc="construction",
                leave=False,
                dynamic_ncols=True,
            )
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
            logger.warning(
                "construction stopped after %d iterations with budgets met %s (MAC ratios %s vs budgets %s)",
                result.iterations,
                result.budgets_met,
                [round(r, 4) for r in result.mac_ratios],
                self.config.budgets,
            )
        return result

    def train_iteration(self) -> float:
        """Train one iteration: ``m`` batches of each subnet in turn, collecting the importance
        (or call the ``train`` callable). Returns the mean training loss."""
        if self.train_fn is not None:
            return float(self.train_fn(self))
        net, cfg = self.net, self.config
        net.model.train()
        model = self.forward_module
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
                    inputs, targets = split_batch(to_device(self._stream.next(), self.device))
                    self.optimizer.zero_grad(set_to_none=True)
                    # The scorer (construction.criterion) may gate or perturb this batch's forward.
                    with self.tracker.observe(k, targets):
                        with net.subnet(k), autocast(self.device, self.amp):
                            logits = forward_logits(model, inputs)
                        loss = F.cross_entropy(logits.float(), targets)
                        with self.tracker.collect(subnet=k):
                            (loss + self.tracker.penalty(k)).backward()
                    self.optimizer.step()
                    self.tracker.after_step()
                    total += loss.detach()
                    steps += 1
        finally:
            if suppress is not None:
                suppress.remove()
        return float(total) / max(steps, 1)

    # --------------------------------------------------------------- movement
    def criterion_scores(self) -> torch.Tensor:
        """The criterion ``M`` per neuron for this iteration's moves: the ``scores`` callable's,
        or eq. (3) of the tracker's normalised importance."""
        if self.scores_fn is not None:
            return torch.as_tensor(self.scores_fn(self))
        return self.tracker.criterion(self.config.alpha_growth)

    def neuron_costs(self, s: int) -> torch.Tensor:
        """:func:`~nni_steppingnet.construction.select.neuron_costs` of the net."""
        return neuron_costs(self.net, s)

    def select(
        self,
        i: int,
        amount: float,
        flat: torch.Tensor,
        scores: torch.Tensor,
        moved: torch.Tensor,
        cap: float,
        strict: bool = True,
    ) -> list[int]:
        """:func:`~nni_steppingnet.construction.select.select_neurons` with this constructor's
        frozen neurons and group limit (``moved``: neurons already moved this iteration)."""
        excluded = torch.as_tensor(moved, dtype=torch.bool)
        if self.frozen is not None:
            excluded = excluded | torch.as_tensor(self.frozen, dtype=torch.bool).flatten()[: self.net.num_neurons].cpu()
        return select_neurons(
            self.net, i, amount, flat, scores, excluded, cap, strict, group_limit=self.group_move_limit
        )

    def move(self, scores: torch.Tensor | None = None) -> tuple[torch.Tensor, list[int], list[int]]:
        """The movement phase of one iteration (step 2 of the loop in the module docstring):
        :func:`~nni_steppingnet.construction.select.move_neurons` with this run's budgets,
        quantum and iterations left.

        Args:
            scores: the criterion ``M`` per neuron (``[num_neurons]``); default:
                :meth:`criterion_scores`. Lower means "move first".

        Returns:
            ``(moved, counts, moved_macs)``: a bool mask over neurons moved, the number of neurons
            moved out of each subnet, and the MACs each subnet lost by the moves.
        """
        if scores is None:
            scores = self.criterion_scores()
        return move_neurons(
            self.net,
            scores,
            self.budget_macs,
            self.quantum,
            self.config.iterations - self.iteration,
            frozen=self.frozen,
            group_limit=self.group_move_limit,
            landing=self.config.landing,
            min_group_fraction=self.config.min_group_fraction,
        )

    # ----------------------------------------------------------- dead neurons
    def dead_neurons(self, final: bool = True) -> torch.Tensor:
        """:func:`~nni_steppingnet.construction.prune.dead_neurons` of the net."""
        return dead_neurons(self.net, final)

    def retire_dead(self, final: bool = True) -> list[int]:
        """:func:`~nni_steppingnet.construction.prune.retire_dead` (``frozen`` neurons stay)."""
        return retire_dead(self.net, final, self.frozen)

    # ---------------------------------------------------------------- pruning
    def prune(self, moved: torch.Tensor) -> int:
        """:func:`~nni_steppingnet.construction.prune.prune_small_weights` with
        ``config.prune_threshold``; returns the number of weight entries newly pruned."""
        return prune_small_weights(self.net, self.config.prune_threshold, moved)

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
            "rng": rng_state(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict` (the net, optimizer, data position and RNG states)."""
        if not isinstance(state, Mapping) or state.get("format") != CONSTRUCTION_FORMAT:
            found = state.get("format") if isinstance(state, Mapping) else type(state).__name__
            raise CheckpointError(f"not a construction state (format {found!r}, expected {CONSTRUCTION_FORMAT!r})")
        saved = dict(state["config"])
        mine = self.config.to_dict()
        differ = sorted(k for k in set(saved) | set(mine) if saved.get(k) != mine.get(k))
        if differ:
            raise CheckpointError(
                "the construction state was saved with a different config ("
                + ", ".join(f"{k}: saved {saved.get(k)!r} vs now {mine.get(k)!r}" for k in differ)
                + "); resume with the same settings"
            )
        self.net.load_state_dict(state["net"])
        self.net.model.to(self.device)
        self.optimizer.load_state_dict(state["optimizer"])
        self.tracker.load_state_dict(state["importance"])
        self._stream.load_state_dict(state["stream"])
        self.iteration = int(state["iteration"])
        self.history = [dict(entry) for entry in state["history"]]
        self.initial_macs = int(state["initial_macs"])
        self.quantum = (self.initial_macs - self.budget_macs[0]) / self.config.iterations
        set_rng_state(state["rng"])
        self._all_met = all(self._budgets_met(self._current_macs()))

    def close(self) -> None:
        """Remove the importance hooks from the model."""
        self.tracker.close()
