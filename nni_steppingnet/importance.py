"""Neuron importance for subnet construction (paper eq. (1)-(3)).

Every neuron j (an output channel of a Conv2d/Linear) gets a virtual gate ``r_j`` that multiplies
its pre-bias sum ``z_j = sum_k d_{j,k} w_{j,k}`` (eq. 1). The gate is 1 in the forward pass, and
its gradient (eq. 2) is

    dL/dr_j = sum over batch and output positions of (dL/d out_j) * z_j.

Because ``z_j`` is linear in the (masked) weight row ``W_j``, the same number is

    dL/dr_j = sum_k W_j[k] * dL/dW_j[k]

(expand ``z_j`` and swap the sums). :class:`ImportanceTracker` computes it in this second form,
from a gradient hook on every layer's trainable weight: it needs no forward hook, keeps no
activations, and stays exact when a later in-place op (``ReLU(inplace=True)``) overwrites the
layer output. With the mask parametrization ``W_eff = W * mask`` and a binary mask,
``sum W * dL/dW = sum W_eff * dL/dW_eff``, so the masked-out synapses contribute nothing.
A neuron fed by several layers (coupled channels of one neuron group) sums their gates' gradients.

The absolute value is taken per backward pass (one batch) and accumulated over the batches of an
iteration into ``scores[k - 1, j]`` for the subnet ``k`` whose loss was back-propagated.
:func:`criterion` turns the scores into eq. (3).
"""
from __future__ import annotations

import contextlib
import logging
import weakref
from typing import Any, Iterator, Mapping

import torch

from .stepping import SteppingNet

__all__ = ["ImportanceTracker", "criterion", "register_suppression", "unregister_suppression"]

logger = logging.getLogger(__name__)

# SteppingNets with active beta-suppression gradient hooks (see train.beta_suppression). The
# tracker's hooks must run before those (they scale the gradient), so a tracker cannot be created
# while suppression is active on its net.
_SUPPRESSED: "weakref.WeakKeyDictionary[SteppingNet, int]" = weakref.WeakKeyDictionary()


def register_suppression(net: SteppingNet) -> None:
    """Mark ``net`` as having gradient-scaling hooks (used by :func:`train.beta_suppression`)."""
    _SUPPRESSED[net] = _SUPPRESSED.get(net, 0) + 1


def unregister_suppression(net: SteppingNet) -> None:
    """Undo one :func:`register_suppression`."""
    count = _SUPPRESSED.get(net, 0) - 1
    if count > 0:
        _SUPPRESSED[net] = count
    else:
        _SUPPRESSED.pop(net, None)


class ImportanceTracker:
    """Accumulate ``|dL_k/dr_j|`` (eq. 2) for every neuron of ``net``.

    Usage::

        tracker = ImportanceTracker(net)
        with net.subnet(k):
            loss = F.cross_entropy(net.model(x), y)
        with tracker.collect(subnet=k):
            loss.backward()
        tracker.scores  # [N, num_neurons]: row k-1 holds subnet k's accumulated importance

    The gradient hooks stay registered for the tracker's lifetime (call :meth:`close` to remove
    them) and return at once outside :meth:`collect`. Create the tracker before entering
    :func:`nni_steppingnet.train.beta_suppression`: its hooks must see the unscaled gradient.

    Args:
        net: the SteppingNet whose neurons are scored. Columns of ``scores`` are the flat neuron
            positions of :meth:`SteppingNet.flat_assignment` (without the trailing input slot).
    """

    def __init__(self, net: SteppingNet) -> None:
        if not isinstance(net, SteppingNet):
            raise TypeError(f"ImportanceTracker needs a SteppingNet, got {type(net).__name__}")
        if net in _SUPPRESSED:
            raise RuntimeError("create the ImportanceTracker before entering beta_suppression(): "
                               "its gradient hooks must run before the suppression scales the "
                               "gradients")
        self.net = net
        self.num_subnets = net.num_subnets
        self.num_neurons = int(net._num_neurons)
        self._scores = torch.zeros(self.num_subnets, self.num_neurons, dtype=torch.float32)
        self._subnet: int | None = None
        self._handles: list[Any] = []
        self._positions: dict[tuple[int, torch.device], torch.Tensor] = {}
        self.batches = torch.zeros(self.num_subnets, dtype=torch.long)
        for k, layer in enumerate(net.layers):
            if layer.is_logits:
                continue
            weight = net.original_weight(k)
            if not weight.requires_grad:
                continue
            self._handles.append(weight.register_hook(self._make_hook(k)))

    # ------------------------------------------------------------------ hooks
    def _make_hook(self, k: int) -> Any:
        ref = weakref.ref(self)
        positions = self.net._out_pos[k]

        def hook(grad: torch.Tensor) -> None:
            tracker = ref()
            if tracker is None or tracker._subnet is None:
                return None
            weight = tracker.net.original_weight(k)
            with torch.no_grad():
                per_row = (weight.detach().float() * grad.detach().float()).reshape(grad.shape[0], -1).sum(1)
                tracker._accumulate(tracker._subnet, positions, per_row.abs())
            return None

        return hook

    def _accumulate(self, subnet: int, positions: torch.Tensor, values: torch.Tensor) -> None:
        if self._scores.device != values.device:
            self._scores = self._scores.to(values.device)
        key = (id(positions), values.device)
        index = self._positions.get(key)
        if index is None:
            index = self._positions[key] = positions.to(values.device)
        self._scores[subnet - 1].index_add_(0, index, values)

    # ----------------------------------------------------------------- public
    @contextlib.contextmanager
    def collect(self, subnet: int) -> Iterator["ImportanceTracker"]:
        """Within this context, every backward pass adds ``|dL/dr_j|`` to ``scores[subnet - 1]``.

        Run exactly one backward per batch inside it (the absolute value is taken per backward).
        """
        if not self._handles and any(not layer.is_logits for layer in self.net.layers):
            raise RuntimeError("this ImportanceTracker was closed; create a new one")
        if isinstance(subnet, bool) or not isinstance(subnet, int) or not 1 <= subnet <= self.num_subnets:
            raise ValueError(f"subnet must be an int in 1..{self.num_subnets}, got {subnet!r}")
        if self._subnet is not None:
            raise RuntimeError(f"already collecting for subnet {self._subnet}; collect() does not nest")
        self._subnet = subnet
        try:
            yield self
        finally:
            self._subnet = None
            self.batches[subnet - 1] += 1

    @property
    def scores(self) -> torch.Tensor:
        """``[N, num_neurons]`` float32 accumulated importance (row ``k - 1``: subnet ``k``)."""
        return self._scores

    @scores.setter
    def scores(self, value: torch.Tensor) -> None:
        value = torch.as_tensor(value)
        if tuple(value.shape) != (self.num_subnets, self.num_neurons):
            raise ValueError(f"scores must have shape ({self.num_subnets}, {self.num_neurons}), "
                             f"got {tuple(value.shape)}")
        self._scores = value.detach().to(dtype=torch.float32).clone()

    def reset(self) -> None:
        """Zero the scores and batch counts (start of a new construction iteration)."""
        self._scores.zero_()
        self.batches.zero_()

    def criterion(self, alpha_growth: float = 1.5) -> torch.Tensor:
        """:func:`criterion` of the current scores and the net's current assignment."""
        return criterion(self._scores, self.net.flat_assignment()[:-1], alpha_growth)

    def close(self) -> None:
        """Remove the gradient hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"scores": self._scores.detach().cpu().clone(), "batches": self.batches.clone()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        device = self._scores.device
        self.scores = state["scores"]
        self._scores = self._scores.to(device)
        batches = torch.as_tensor(state["batches"], dtype=torch.long)
        if batches.shape != self.batches.shape:
            raise ValueError(f"importance state is for {batches.numel()} subnets, this tracker has "
                             f"{self.num_subnets}")
        self.batches = batches.clone()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: hooks may already be gone
            pass


def criterion(scores: torch.Tensor, assignment: torch.Tensor, alpha_growth: float = 1.5) -> torch.Tensor:
    """Selection criterion of eq. (3): ``M_j = sum_{k >= a(j)} alpha_k * scores[k - 1, j]``.

    ``alpha_1 = 1`` and ``alpha_{k+1} = alpha_growth * alpha_k``. A neuron only counts its
    importance to its own subnet and the larger ones. Unused neurons (``a = N + 1``) get ``+inf``.

    Args:
        scores: ``[N, num_neurons]`` accumulated ``|dL_k/dr_j|``.
        assignment: ``[num_neurons]`` subnet index of every neuron (1..N+1).
        alpha_growth: ratio between consecutive ``alpha_k`` (the paper uses 1.5).

    Returns:
        float32 ``[num_neurons]`` on the CPU.
    """
    scores = torch.as_tensor(scores)
    assignment = torch.as_tensor(assignment)
    if scores.dim() != 2:
        raise ValueError(f"scores must be [N, num_neurons], got shape {tuple(scores.shape)}")
    n, count = scores.shape
    if assignment.dim() != 1 or assignment.numel() != count:
        raise ValueError(f"assignment must be 1-D with {count} entries (one per neuron), got shape "
                         f"{tuple(assignment.shape)}; pass net.flat_assignment()[:-1]")
    if assignment.dtype.is_floating_point or assignment.dtype == torch.bool:
        raise ValueError(f"assignment must hold integers, got {assignment.dtype}")
    if count and (int(assignment.min()) < 1 or int(assignment.max()) > n + 1):
        raise ValueError(f"assignment values must be in 1..{n + 1}, got [{int(assignment.min())}, "
                         f"{int(assignment.max())}]")
    if not (isinstance(alpha_growth, (int, float)) and not isinstance(alpha_growth, bool)
            and alpha_growth > 0 and alpha_growth == alpha_growth and alpha_growth != float("inf")):
        raise ValueError(f"alpha_growth must be a positive finite number, got {alpha_growth!r}")
    scores = scores.detach().to(device="cpu", dtype=torch.float64)
    assignment = assignment.to(device="cpu", dtype=torch.long)
    alpha = torch.tensor([float(alpha_growth) ** k for k in range(n)], dtype=torch.float64)
    weighted = scores * alpha.unsqueeze(1)
    subnet_index = torch.arange(1, n + 1).unsqueeze(1)
    include = subnet_index >= assignment.unsqueeze(0)  # [N, num_neurons]: k >= a(j)
    result = (weighted * include).sum(0)
    result[assignment == n + 1] = float("inf")
    return result.to(torch.float32)
