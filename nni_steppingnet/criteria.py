"""Alternative neuron criteria for subnet construction: class-based and trainable-noise ranking.

Construction (:mod:`nni_steppingnet.construct`) ranks neurons with a *scorer*: an object that
watches the construction's training batches and yields ``scores``, an ``[N, num_neurons]`` tensor
in the flat neuron layout of :meth:`SteppingNet.flat_assignment` (row ``k - 1``: importance to
subnet ``k``), which eq. (3) (:func:`nni_steppingnet.importance.criterion`) folds into the
criterion ``M`` (lower moves first). Three scorers, chosen by ``construction.criterion``:

* ``gradient`` (default): :class:`GradientScorer`, the paper's eq. (2) gate gradients
  (:class:`nni_steppingnet.importance.ImportanceTracker`, unchanged), normalised per group.
* ``class``: :class:`ClassScorer`, after the class-based importance of the SteppingNet authors'
  class-based quantization: every neuron is scored per class, and a neuron ranks by *how many
  classes depend on it*. Per batch of subnet ``k``, a gate ``r_{b,j} = 1`` multiplies neuron ``j``'s
  output for sample ``b`` (at the output of its norm layer when it has one, as
  :mod:`nni_steppingnet.importance` does; else at the Conv/Linear output, bias included, a
  departure from eq. (1)'s pre-bias gate that keeps one forward hook per module), so one backward
  gives every sample's gate gradient; ``I[k, c, j] += |sum_{b in class c} dL/dr_{b,j}|``. At
  scoring time each class's importance is divided by the mean of the neuron's group (neurons in
  subnet ``k``), class ``c`` *depends on* ``j`` when that ratio is ``>= class_threshold`` (1: above
  its layer's average for that class), and the score is the count of such classes plus a
  tie-break in ``[0, 1)`` (the mean ratio ``t`` as ``t / (1 + t)``). Counts are comparable across
  layers, so this score is not normalised per group again.
* ``noise``: :class:`NoiseScorer`, after the trainable noise ranking of progressive sub-net
  search: during the construction batches of subnet ``k`` every neuron's output gets Gaussian
  noise ``exp(rho[k, j]) * std_j * eps`` (``std_j`` the channel's batch standard deviation,
  detached, so the scale is relative and comparable across layers) and the loss gets
  ``-noise_weight * mean_j rho[k, j]`` over subnet ``k``'s neurons, which rewards noise; the
  ``rho`` are trained with Adam (``noise_lr``) and clamped to ``[log 1e-3, log 10]``. A neuron
  that tolerates much noise matters little: the score is ``exp(-rho[k, j])``. The weights train
  under the noise (as in the paper's search); the ``rho`` persist across iterations.

Only the abstracts of the two related papers are available to this project; the threshold,
tie-break, noise form, penalty and optimiser above are our choices (see docs/data.md and
docs/results.md for their measurements on CIFAR-10).

A scorer is used like the importance tracker, plus :meth:`observe` around the forward and
backward of a batch (it installs the gates or the noise) and :meth:`penalty`/:meth:`after_step`::

    with scorer.observe(k, targets):
        with net.subnet(k):
            logits = net.model(x)
        loss = F.cross_entropy(logits, targets) + scorer.penalty(k)
        with scorer.collect(subnet=k):
            loss.backward()
    optimizer.step(); scorer.after_step()
"""

from __future__ import annotations

import contextlib
import logging
import math
from typing import Any, Callable, Final, Iterator, Mapping

import torch
import torch.nn as nn

from .importance import ImportanceTracker, criterion, norm_gated_modules, reduce_together
from .stepping import SteppingNet
from .validation import CRITERIA

__all__ = [
    "CRITERIA",
    "GradientScorer",
    "ClassScorer",
    "NoiseScorer",
    "make_scorer",
    "class_scores",
    "group_means",
]

logger = logging.getLogger(__name__)


_RHO_MIN: Final[float] = math.log(1e-3)
_RHO_MAX: Final[float] = math.log(10.0)


class GradientScorer(ImportanceTracker):
    """The paper's criterion (eq. 2-3, :class:`ImportanceTracker`) with the scorer interface."""

    name = "gradient"

    @contextlib.contextmanager
    def observe(self, subnet: int, targets: torch.Tensor) -> Iterator[GradientScorer]:
        """Nothing to install: the gradient hooks are always registered."""
        yield self

    def penalty(self, subnet: int) -> torch.Tensor | float:
        return 0.0

    def after_step(self) -> None:
        return None


def _check_subnet(subnet: int, n: int) -> None:
    if isinstance(subnet, bool) or not isinstance(subnet, int) or not 1 <= subnet <= n:
        raise ValueError(f"subnet must be an int in 1..{n}, got {subnet!r}")


_Point = tuple[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor]


def _gate_points(net: SteppingNet) -> list[_Point]:
    """``(module, channels, positions, all_positions)``: where each neuron's output is gated.

    Norm-gated neurons (:func:`norm_gated_modules`) at their norm layer's output, every other
    neuron at its producing Conv/Linear output. ``channels`` index the module's channel axis,
    ``positions`` are the matching flat neuron positions (the input slot excluded) and
    ``all_positions`` the flat position of every channel of the module (to find, under sliced
    execution, which channels a narrower tensor holds).
    """
    modules = dict(net.model.named_modules())
    count = net.index.num_neurons
    covered = torch.zeros(count, dtype=torch.bool)
    points: list[_Point] = []
    for name, positions in norm_gated_modules(net).items():
        channels = (positions < count).nonzero().flatten()
        points.append((modules[name], channels, positions[channels], positions))
        covered[positions[channels]] = True
    for k, layer in enumerate(net.layers):
        if layer.is_logits:
            continue
        positions = net.index.out_positions[k]
        channels = ((positions < count) & ~covered[positions.clamp_max(count - 1)]).nonzero().flatten()
        if channels.numel():
            points.append((layer.module, channels, positions[channels], positions))
    return points


def _channel_dim(module: nn.Module) -> int:
    return -1 if isinstance(module, nn.Linear) else 1


def _broadcast(values: torch.Tensor, out: torch.Tensor, dim: int) -> torch.Tensor:
    """``values [B, C]`` shaped to broadcast against ``out`` along its channel ``dim``."""
    if dim == 1:
        return values.reshape(values.shape + (1,) * (out.dim() - 2))
    return values.reshape((values.shape[0],) + (1,) * (out.dim() - 2) + (values.shape[1],))


def group_means(values: torch.Tensor, offsets: list[int], member: torch.Tensor) -> torch.Tensor:
    """Per-group mean of ``values [R, num_neurons]`` over the ``member`` neurons, spread back to
    every neuron of the group (``[R, num_neurons]``); a group without members gets 1."""
    out = torch.ones_like(values, dtype=torch.float64)
    for start, stop in zip(offsets[:-1], offsets[1:]):
        inside = member[start:stop]
        if stop == start or not bool(inside.any()):
            continue
        mean = values[:, start:stop][:, inside].to(torch.float64).mean(1)
        out[:, start:stop] = torch.where(mean > 0, mean, torch.ones_like(mean)).unsqueeze(1)
    return out


def class_scores(
    per_class: torch.Tensor, offsets: list[int], member: torch.Tensor, threshold: float = 1.0
) -> torch.Tensor:
    """The class-based score of one subnet row (see the module docstring).

    Args:
        per_class: ``[C, num_neurons]`` accumulated per-class importance.
        offsets: group boundaries (``net.index.offsets``).
        member: bool ``[num_neurons]``, the neurons in this subnet; the others score 0.
        threshold: a class depends on a neuron when the neuron's importance to it is at least
            ``threshold`` times its group's mean importance to it.

    Returns:
        float32 ``[num_neurons]``: classes depending on each neuron plus a tie-break in [0, 1).
    """
    if per_class.dim() != 2:
        raise ValueError(f"per_class must be [classes, neurons], got shape {tuple(per_class.shape)}")
    if not threshold > 0:
        raise ValueError(f"threshold must be > 0, got {threshold!r}")
    ratio = per_class.to(torch.float64) / group_means(per_class, offsets, member)
    count = (ratio >= threshold).sum(0).to(torch.float64)
    mean = ratio.mean(0)
    score = count + mean / (1.0 + mean)
    return torch.where(member, score, torch.zeros_like(score)).to(torch.float32)


class _GatedScorer:
    """Shared machinery: forward hooks at the gate points, active only inside :meth:`observe`."""

    name = ""

    def __init__(self, net: SteppingNet, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        if not isinstance(net, SteppingNet):
            raise TypeError(f"{type(self).__name__} needs a SteppingNet, got {type(net).__name__}")
        if reduce is not None and not callable(reduce):
            raise TypeError(f"reduce must be callable (tensor -> tensor) or None, got {type(reduce).__name__}")
        self.net = net
        #: averages a tensor over the ranks of a data-parallel job (see ImportanceTracker)
        self.reduce = reduce
        self.num_subnets = net.num_subnets
        self.num_neurons = net.index.num_neurons
        self.batches = torch.zeros(self.num_subnets, dtype=torch.long)
        self._points = _gate_points(net)
        self._subnet: int | None = None
        self._targets: torch.Tensor | None = None
        self._handles = [
            module.register_forward_hook(self._make_hook(i)) for i, (module, _, _, _) in enumerate(self._points)
        ]

    def _make_hook(self, index: int) -> Any:
        def hook(module: nn.Module, inputs: Any, output: Any) -> Any:
            if self._subnet is None or not isinstance(output, torch.Tensor):
                return None
            return self._transform(index, module, output)

        return hook

    def _transform(self, index: int, module: nn.Module, output: torch.Tensor) -> torch.Tensor | None:
        raise NotImplementedError

    def _present(self, index: int, width: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(tensor channels, flat positions)`` of the gated neurons in an output of ``width``
        channels: all of them at full width (masked execution); under sliced execution the
        tensor holds the module's channels of neurons in subnets ``<= s`` in ascending order."""
        _, channels, positions, all_positions = self._points[index]
        if width == all_positions.numel():
            return channels, positions
        assert self._subnet is not None
        flat = self.net.flat_assignment()  # trailing input slot: subnet 1
        active = (flat[all_positions] <= self._subnet).nonzero().flatten()
        if active.numel() != width:
            logger.warning(
                "%s: output has %d channels, expected %d (full) or %d (subnet %d); not scored",
                type(self).__name__,
                width,
                all_positions.numel(),
                active.numel(),
                self._subnet,
            )
            return None
        rank = torch.full((all_positions.numel(),), -1, dtype=torch.long)
        rank[active] = torch.arange(active.numel())
        local = rank[channels]
        keep = local >= 0
        return local[keep], positions[keep]

    @contextlib.contextmanager
    def observe(self, subnet: int, targets: torch.Tensor) -> Iterator[Any]:
        """Install the gates (or noise) for one batch of ``subnet``: enclose its forward and backward."""
        _check_subnet(subnet, self.num_subnets)
        if not self._handles and self._points:
            raise RuntimeError(f"this {type(self).__name__} was closed; create a new one")
        if self._subnet is not None:
            raise RuntimeError("observe() does not nest")
        self._subnet, self._targets = subnet, targets
        try:
            yield self
        finally:
            self._subnet, self._targets = None, None

    @contextlib.contextmanager
    def collect(self, subnet: int) -> Iterator[Any]:
        """Enclose the batch's one backward (inside :meth:`observe`)."""
        _check_subnet(subnet, self.num_subnets)
        if self._subnet != subnet:
            raise RuntimeError(f"collect(subnet={subnet}) must run inside observe({subnet}, targets)")
        yield self
        self._after_backward(subnet)
        self.batches[subnet - 1] += 1

    def _after_backward(self, subnet: int) -> None:
        return None

    def penalty(self, subnet: int) -> torch.Tensor | float:
        return 0.0

    def after_step(self) -> None:
        return None

    def _member(self, k: int) -> torch.Tensor:
        return self.net.flat_assignment()[:-1] <= k

    def normalized_scores(self) -> torch.Tensor:
        """The scores, already comparable across groups (see the module docstring)."""
        return self.scores

    def criterion(self, alpha_growth: float = 1.5) -> torch.Tensor:
        """Eq. (3) of :attr:`scores` and the net's current assignment (lower moves first)."""
        return criterion(self.scores, self.net.flat_assignment()[:-1], alpha_growth)

    @property
    def scores(self) -> torch.Tensor:
        raise NotImplementedError

    def close(self) -> None:
        """Remove the forward hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles = []


class ClassScorer(_GatedScorer):
    """Class-based importance: how many classes depend on each neuron (module docstring).

    Args:
        net: the SteppingNet being constructed.
        num_classes: classes of the task (default: the logits layer's output features).
        threshold: see :func:`class_scores`.
    """

    name = "class"

    def __init__(
        self,
        net: SteppingNet,
        num_classes: int | None = None,
        threshold: float = 1.0,
        reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        super().__init__(net, reduce)
        if num_classes is None:
            logits = [layer for layer in net.layers if layer.is_logits]
            if not logits:
                raise ValueError("ClassScorer needs a logits layer (or num_classes) to know the classes")
            weight = logits[-1].module.weight
            if not isinstance(weight, torch.Tensor):
                raise ValueError("ClassScorer: the logits layer has no weight tensor; pass num_classes")
            num_classes = int(weight.shape[0])
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
        if not (isinstance(threshold, (int, float)) and math.isfinite(threshold) and threshold > 0):
            raise ValueError(f"threshold must be a positive number, got {threshold!r}")
        self.num_classes = num_classes
        self.threshold = float(threshold)
        self.per_class = torch.zeros(self.num_subnets, num_classes, self.num_neurons, dtype=torch.float32)
        self._gates: list[tuple[torch.Tensor, torch.Tensor]] = []

    def _transform(self, index: int, module: nn.Module, output: torch.Tensor) -> torch.Tensor | None:
        if not output.requires_grad:
            return None
        dim = _channel_dim(module)
        present = self._present(index, output.shape[dim])
        if present is None or present[0].numel() == 0:
            return None
        channels, positions = present
        gate = torch.ones(
            output.shape[0], channels.numel(), device=output.device, dtype=output.dtype, requires_grad=True
        )
        self._gates.append((positions, gate))
        if channels.numel() == output.shape[dim]:
            return output * _broadcast(gate, output, dim)
        full = torch.ones(output.shape[0], output.shape[dim], device=output.device, dtype=output.dtype)
        full = full.index_copy(1, channels.to(output.device), gate)
        return output * _broadcast(full, output, dim)

    def _after_backward(self, subnet: int) -> None:
        gates, self._gates = self._gates, []
        targets = self._targets
        if targets is None:
            return
        with torch.no_grad():
            onehot = torch.zeros(targets.shape[0], self.num_classes, dtype=torch.float32, device=targets.device)
            onehot.scatter_(1, targets.long().view(-1, 1), 1.0)
            signed = [
                (positions, onehot.t() @ gate.grad.float())  # [C, channels]
                for positions, gate in gates
                if gate.grad is not None
            ]
            if self.reduce is not None and signed:
                # Averaged over the ranks before the absolute value (the gates run in the same order).
                reduced = reduce_together(self.reduce, [value for _, value in signed])
                signed = [(pos, value) for (pos, _), value in zip(signed, reduced)]
            for positions, value in signed:
                self.per_class[subnet - 1].index_add_(1, positions, value.abs().cpu())

    @property
    def scores(self) -> torch.Tensor:
        """``[N, num_neurons]``: :func:`class_scores` of each subnet row (0 outside the subnet)."""
        offsets = list(self.net.index.offsets)
        assignment = self.net.flat_assignment()[:-1]
        rows = [
            class_scores(self.per_class[k - 1], offsets, assignment <= k, self.threshold)
            for k in range(1, self.num_subnets + 1)
        ]
        return torch.stack(rows)

    def reset(self) -> None:
        self.per_class.zero_()
        self.batches.zero_()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"per_class": self.per_class.clone(), "batches": self.batches.clone()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        per_class = torch.as_tensor(state["per_class"], dtype=torch.float32)
        if per_class.shape != self.per_class.shape:
            raise ValueError(
                f"class-criterion state has shape {tuple(per_class.shape)}, this scorer "
                f"needs {tuple(self.per_class.shape)}"
            )
        self.per_class = per_class.clone()
        self.batches = torch.as_tensor(state["batches"], dtype=torch.long).clone()


class NoiseScorer(_GatedScorer):
    """Trainable-noise ranking (module docstring).

    Args:
        net: the SteppingNet being constructed.
        noise_weight: weight of the ``-mean(rho)`` reward for noise.
        noise_lr: Adam learning rate of ``rho``.
        init_noise: initial relative noise ``exp(rho)``.
    """

    name = "noise"

    def __init__(
        self,
        net: SteppingNet,
        noise_weight: float = 0.5,
        noise_lr: float = 0.05,
        init_noise: float = 0.05,
        reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        super().__init__(net, reduce)
        for label, value in (("noise_weight", noise_weight), ("noise_lr", noise_lr), ("init_noise", init_noise)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"{label} must be a positive number, got {value!r}")
        self.noise_weight = float(noise_weight)
        device = next((p.device for p in net.model.parameters()), torch.device("cpu"))
        start = min(max(math.log(init_noise), _RHO_MIN), _RHO_MAX)
        self.rho = torch.full((self.num_subnets, self.num_neurons), start, device=device, requires_grad=True)
        self.optimizer = torch.optim.Adam([self.rho], lr=float(noise_lr))

    def _transform(self, index: int, module: nn.Module, output: torch.Tensor) -> torch.Tensor | None:
        if not output.requires_grad or self._subnet is None:
            return None
        dim = _channel_dim(module)
        present = self._present(index, output.shape[dim])
        if present is None or present[0].numel() == 0:
            return None
        channels, positions = present
        rho = self.rho
        if rho.device != output.device:
            rho = rho.to(output.device)
        scale = rho[self._subnet - 1].index_select(0, positions.to(output.device)).exp()  # [channels]
        with torch.no_grad():
            moved = (
                output.movedim(dim, -1)
                .reshape(-1, output.shape[dim])
                .index_select(1, channels.to(output.device))
                .float()
            )
            std = moved.std(0) if moved.shape[0] > 1 else torch.zeros(channels.numel(), device=output.device)
        eps = torch.randn(output.shape[0], channels.numel(), device=output.device)
        # One draw per sample and channel, broadcast over positions: the whole feature map of a
        # channel is perturbed together, like dropping or scaling the neuron.
        noise = eps * (scale * std.to(scale.dtype)).unsqueeze(0)
        if channels.numel() != output.shape[dim]:
            full = torch.zeros(output.shape[0], output.shape[dim], device=output.device, dtype=noise.dtype)
            noise = full.index_copy(1, channels.to(output.device), noise)
        return output + _broadcast(noise.to(output.dtype), output, dim)

    def penalty(self, subnet: int) -> torch.Tensor | float:
        """``-noise_weight * mean(rho)`` over subnet ``subnet``'s neurons (rewards noise)."""
        _check_subnet(subnet, self.num_subnets)
        member = self._member(subnet).to(self.rho.device)
        if not bool(member.any()):
            return 0.0
        return -self.noise_weight * self.rho[subnet - 1][member].mean()

    def after_step(self) -> None:
        """One Adam step on ``rho`` (its gradient came from the batch's backward), then clamp."""
        if self.rho.grad is None:
            return
        if self.reduce is not None:
            self.rho.grad = self.reduce(self.rho.grad)  # every rank learns the same noise levels
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            self.rho.clamp_(_RHO_MIN, _RHO_MAX)

    @property
    def scores(self) -> torch.Tensor:
        """``[N, num_neurons]``: ``exp(-rho)`` on each subnet's neurons, 0 elsewhere."""
        assignment = self.net.flat_assignment()[:-1]
        rows = torch.arange(1, self.num_subnets + 1).unsqueeze(1) >= assignment.unsqueeze(0)
        value = (-self.rho.detach().float().cpu()).exp()
        return torch.where(rows, value, torch.zeros_like(value))

    def reset(self) -> None:
        """Start a new iteration: the learned noise levels carry over, the batch counts restart."""
        self.batches.zero_()

    def state_dict(self) -> dict[str, Any]:
        return {
            "rho": self.rho.detach().cpu().clone(),
            "batches": self.batches.clone(),
            "optimizer": self.optimizer.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        rho = torch.as_tensor(state["rho"], dtype=torch.float32)
        if rho.shape != self.rho.shape:
            raise ValueError(
                f"noise-criterion state has shape {tuple(rho.shape)}, this scorer needs {tuple(self.rho.shape)}"
            )
        with torch.no_grad():
            self.rho.copy_(rho.to(self.rho.device))
        self.batches = torch.as_tensor(state["batches"], dtype=torch.long).clone()
        self.optimizer.load_state_dict(state["optimizer"])


def make_scorer(
    name: str, net: SteppingNet, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None
) -> GradientScorer | ClassScorer | NoiseScorer:
    """The scorer of ``construction.criterion`` ``name`` (one of :data:`CRITERIA`) for ``net``.

    ``reduce`` averages a tensor over the ranks of a data-parallel job; every scorer applies it
    to its per-batch signed quantities so all ranks score identically."""
    if name == "gradient":
        return GradientScorer(net, reduce)
    if name == "class":
        return ClassScorer(net, reduce=reduce)
    if name == "noise":
        return NoiseScorer(net, reduce=reduce)
    raise ValueError(f"unknown criterion {name!r}; choose from {', '.join(CRITERIA)}")
