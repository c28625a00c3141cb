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

Our adaptations of the paper (its networks have no BatchNorm):

* **Gate after BatchNorm.** A BatchNorm in training mode normalises every channel by its batch
  statistics, so the loss does not change when the conv's output channel is scaled: the eq. (2)
  gradient at the conv output is ~0 (measured: ~1e-8 for conv neurons vs ~1e-4 for hidden Linear
  neurons), and construction would rank conv neurons by noise. For every neuron whose channel
  passes through an affine norm layer (``BatchNorm*``, ``SyncBatchNorm``, ``InstanceNorm*`` with
  ``affine=True``, i.e. every module of ``net.channel_modules`` that is a torch ``_NormBase``) the
  gate sits on the norm's output instead, ``y_c = r_c * (gamma_c * xhat_c + beta_c)``, the value
  the next layer reads (setting ``r_c = 0`` removes the neuron). Its gradient is

      dL/dr_c = sum over batch and positions of (dL/dy_c) * y_c
              = gamma_c * dL/dgamma_c + beta_c * dL/dbeta_c,

  taken from gradient hooks on the norm's ``weight`` and ``bias`` (no activations kept, exact
  under an in-place ReLU). The two terms are added signed during the backward and their sum's
  absolute value is accumulated when :meth:`ImportanceTracker.collect` ends, so ``collect`` must
  enclose exactly one backward, as before. Such neurons take *only* this importance (the conv's
  ~0 term is dropped); a neuron covered by several norm layers sums them. A norm layer with
  ``affine=False`` (no ``gamma``) or a frozen ``gamma`` cannot carry the gate: its neurons keep
  eq. (2) at the producing Conv/Linear (where a BatchNorm follows, that is ~0 again). Neurons
  without a norm layer keep eq. (2). (The diagnostic that motivated this measured the same
  quantity with a forward hook on the BN output.)
* **Per-group normalisation** (:func:`normalize_scores`). Importance scales differ by orders of
  magnitude between layers (a conv filter's gate sums over every output position; a gate after a
  norm layer and one before a ReLU see different gradients), and eq. (3) compares neurons of all
  layers in one ranking (:func:`nni_steppingnet.construction.select.select_neurons` sorts the
  candidates of a subnet by ``M`` across all groups). Before eq. (3), every neuron group's scores
  are therefore divided, per subnet row ``k``, by the mean score of that group's neurons that are
  in subnet ``k`` (``a(j) <= k``; the others score 0 in row ``k`` by construction), in the spirit
  of layer-wise normalised Taylor pruning (Molchanov et al., 2017, who divide by the layer's L2
  norm). Within one row of a group the order is unchanged; across groups a neuron is compared by
  how it stands in its own layer. Because each row is scaled separately, eq. (3)'s sum over the
  subnets weighs every subnet's loss equally before ``alpha_k``.

The absolute value is taken per backward pass (one batch) and accumulated over the batches of an
iteration into ``scores[k - 1, j]`` for the subnet ``k`` whose loss was back-propagated.
:func:`criterion` turns the (normalised) scores into eq. (3).
"""

from __future__ import annotations

import contextlib
import logging
import weakref
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
import torch.nn as nn

from .hooks import OBSERVE
from .stepping import SteppingNet

__all__ = ["ImportanceTracker", "criterion", "normalize_scores", "norm_gated_modules", "reduce_together"]

logger = logging.getLogger(__name__)


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
    them) and return at once outside :meth:`collect`. They go through ``net.hooks`` with priority
    :data:`~nni_steppingnet.hooks.OBSERVE`, so they see the unscaled gradient even when beta
    suppression (priority ``SCALE``) was set up first.

    Args:
        net: the SteppingNet whose neurons are scored. Columns of ``scores`` are the flat neuron
            positions of :meth:`SteppingNet.flat_assignment` (without the trailing input slot).
        reduce: in a data-parallel job, a function that averages a tensor over the ranks
            (:func:`nni_steppingnet.distributed.all_reduce_mean`). It is applied once per backward
            to the *signed* gate gradients of every layer before their absolute value is taken,
            so each rank accumulates the importance of the global batch (each rank's gradient is
            that of its local mean loss; their mean is the global batch's gradient, exactly so
            with synchronised BatchNorm) and every rank ranks the neurons identically.
    """

    def __init__(self, net: SteppingNet, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        if not isinstance(net, SteppingNet):
            raise TypeError(f"ImportanceTracker needs a SteppingNet, got {type(net).__name__}")
        if reduce is not None and not callable(reduce):
            raise TypeError(f"reduce must be callable (tensor -> tensor) or None, got {type(reduce).__name__}")
        self.net = net
        self.reduce = reduce
        self.num_subnets = net.num_subnets
        self.num_neurons = net.index.num_neurons
        self._scores = torch.zeros(self.num_subnets, self.num_neurons, dtype=torch.float32)
        self._subnet: int | None = None
        self._handles: list[Any] = []
        self._positions: dict[tuple[int, torch.device], torch.Tensor] = {}
        self.batches = torch.zeros(self.num_subnets, dtype=torch.long)
        #: neurons whose importance is taken at a norm layer's output (see the module docstring)
        self.norm_gated = torch.zeros(self.num_neurons, dtype=torch.bool)
        norms = norm_gated_modules(net)
        modules = dict(net.model.named_modules())
        for positions in norms.values():
            self.norm_gated[positions] = True
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_layers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._norm_index: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        for name, positions in norms.items():
            module = modules[name]
            channels = (positions < self.num_neurons).nonzero().flatten()
            full = channels.numel() == positions.numel()
            self._norm_index[name] = (positions if full else positions[channels], None if full else channels)
            self._handles.append(
                net.hooks.add_gradient_hook(
                    module.weight, self._make_norm_hook(name, positions, "weight"), priority=OBSERVE
                )
            )
            bias = getattr(module, "bias", None)
            if isinstance(bias, nn.Parameter) and bias.requires_grad:
                self._handles.append(
                    net.hooks.add_gradient_hook(bias, self._make_norm_hook(name, positions, "bias"), priority=OBSERVE)
                )
        for k, layer in enumerate(net.layers):
            if layer.is_logits:
                continue
            weight = net.original_weight(k)
            if not weight.requires_grad:
                continue
            rows = (~self.norm_gated[net.index.out_positions[k]]).nonzero().flatten()
            if rows.numel() == 0:
                continue  # every output channel is gated after a norm layer
            self._handles.append(net.hooks.add_gradient_hook(weight, self._make_hook(k, rows), priority=OBSERVE))

    # ------------------------------------------------------------------ hooks
    def _make_hook(self, k: int, rows: torch.Tensor) -> Any:
        ref = weakref.ref(self)
        out_positions = self.net.index.out_positions[k]
        full = rows.numel() == out_positions.numel()
        positions = out_positions if full else out_positions[rows]
        rows_by_device: dict[torch.device, torch.Tensor] = {}

        def hook(grad: torch.Tensor) -> None:
            tracker = ref()
            if tracker is None or tracker._subnet is None:
                return None
            weight = tracker.net.original_weight(k)
            with torch.no_grad():
                per_row = (weight.detach().float() * grad.detach().float()).reshape(grad.shape[0], -1).sum(1)
                if not full:
                    index = rows_by_device.get(per_row.device)
                    if index is None:
                        index = rows_by_device[per_row.device] = rows.to(per_row.device)
                    per_row = per_row.index_select(0, index)
                # Signed until collect() ends: the ranks of a data-parallel job average it first.
                previous = tracker._pending_layers.get(k)
                tracker._pending_layers[k] = (positions, per_row if previous is None else previous[1] + per_row)
            return None

        return hook

    def _make_norm_hook(self, name: str, positions: torch.Tensor, attr: str) -> Any:
        """Hook on a norm layer's ``weight`` (``attr='weight'``: ``gamma * dL/dgamma``) or ``bias``
        (``'bias'``: ``beta * dL/dbeta``). Both add, signed, to the layer's pending gate gradient
        of this backward; :meth:`_flush` takes its absolute value when :meth:`collect` ends."""
        ref = weakref.ref(self)
        module_ref = weakref.ref(dict(self.net.model.named_modules())[name])

        def hook(grad: torch.Tensor) -> None:
            tracker, module = ref(), module_ref()
            if tracker is None or module is None or tracker._subnet is None:
                return None
            with torch.no_grad():
                value = getattr(module, attr).detach().float() * grad.detach().float()
                pending = tracker._pending.get(name)
                tracker._pending[name] = value if pending is None else pending + value
            return None

        return hook

    def _flush(self) -> None:
        """Add ``|dL/dr|`` of the norm-layer gates of the backward just run to the scores."""
        pending, self._pending = self._pending, {}
        layers, self._pending_layers = self._pending_layers, {}
        if self._subnet is None:
            return
        items: list[tuple[torch.Tensor, torch.Tensor]] = []
        for name in sorted(pending):
            value = pending[name]
            positions, channels = self._norm_index[name]
            if channels is not None:
                value = value.index_select(0, channels.to(value.device))
            items.append((positions, value))
        items.extend(layers[k] for k in sorted(layers))
        if self.reduce is not None and items:
            # One call per backward, in the same order on every rank (sorted names and layers).
            reduced = reduce_together(self.reduce, [value for _, value in items])
            items = [(positions, value) for (positions, _), value in zip(items, reduced)]
        for positions, value in items:
            self._accumulate(self._subnet, positions, value.abs())

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
    def collect(self, subnet: int) -> Iterator[ImportanceTracker]:
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
        self._pending = {}
        self._pending_layers = {}
        try:
            yield self
        finally:
            self._flush()
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
            raise ValueError(
                f"scores must have shape ({self.num_subnets}, {self.num_neurons}), got {tuple(value.shape)}"
            )
        self._scores = value.detach().to(dtype=torch.float32).clone()

    def reset(self) -> None:
        """Zero the scores and batch counts (start of a new construction iteration)."""
        self._scores.zero_()
        self.batches.zero_()

    def normalized_scores(self) -> torch.Tensor:
        """:func:`normalize_scores` of the current scores (per group, per subnet row)."""
        return normalize_scores(self._scores, list(self.net.index.offsets), self.net.flat_assignment()[:-1])

    def criterion(self, alpha_growth: float = 1.5) -> torch.Tensor:
        """:func:`criterion` (eq. 3) of the :meth:`normalized_scores` and the net's current assignment."""
        return criterion(self.normalized_scores(), self.net.flat_assignment()[:-1], alpha_growth)

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
            raise ValueError(f"importance state is for {batches.numel()} subnets, this tracker has {self.num_subnets}")
        self.batches = batches.clone()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: hooks may already be gone
            pass


def reduce_together(
    reduce: Callable[[torch.Tensor], torch.Tensor], values: Sequence[torch.Tensor]
) -> list[torch.Tensor]:
    """``reduce`` applied to all ``values`` in one call (one collective in a data-parallel job):
    flattened, concatenated, reduced and split back into their shapes."""
    flat = reduce(torch.cat([value.reshape(-1) for value in values]))
    parts = flat.split([value.numel() for value in values])
    return [part.reshape(value.shape) for value, part in zip(values, parts)]


def norm_gated_modules(net: SteppingNet) -> dict[str, torch.Tensor]:
    """Norm layers of ``net`` that carry the importance gate: name -> flat neuron positions.

    Every module of ``net.channel_modules`` that is a torch norm layer (``_NormBase``: BatchNorm*,
    SyncBatchNorm, InstanceNorm*) with a trainable per-channel ``weight`` (``affine=True``). The
    positions exclude channels mapped to the model input slot.
    """
    modules = dict(net.model.named_modules())
    found: dict[str, torch.Tensor] = {}
    for name, positions in net.channel_modules.items():
        module = modules.get(name)
        if not isinstance(module, nn.modules.batchnorm._NormBase) or not module.affine:
            continue
        weight = getattr(module, "weight", None)
        if (
            not isinstance(weight, nn.Parameter)
            or not weight.requires_grad
            or weight.dim() != 1
            or weight.numel() != positions.numel()
        ):
            continue
        if bool((positions < net.index.num_neurons).any()):
            found[name] = positions
    return found


def normalize_scores(
    scores: torch.Tensor,
    offsets: Sequence[int] | torch.Tensor,
    assignment: torch.Tensor | None = None,
) -> torch.Tensor:
    """Divide every neuron group's scores by their mean, per subnet row.

    Row ``k - 1`` of group ``g`` (flat positions ``offsets[g]:offsets[g + 1]``) is divided by the
    mean of its entries over the group's neurons in subnet ``k`` (``assignment <= k``; all of the
    group's neurons when ``assignment`` is ``None``). A row whose mean is 0 (no batches, or no
    neuron of the group in subnet ``k``) stays as it is. Within a group the order is unchanged;
    across groups the scores become comparable (each active group averages 1 per row).

    Args:
        scores: ``[N, num_neurons]`` accumulated importance.
        offsets: group start positions plus the end (``net.index.offsets``: ``len(groups) + 1`` entries).
        assignment: ``[num_neurons]`` subnet index of every neuron, or ``None``.

    Returns:
        float32 ``[N, num_neurons]`` on the CPU (a new tensor).
    """
    scores = torch.as_tensor(scores)
    if scores.dim() != 2:
        raise ValueError(f"scores must be [N, num_neurons], got shape {tuple(scores.shape)}")
    n, count = scores.shape
    bounds = [int(o) for o in torch.as_tensor(offsets).flatten().tolist()]
    if not bounds or bounds[0] != 0 or bounds[-1] != count or any(a > b for a, b in zip(bounds, bounds[1:])):
        raise ValueError(f"offsets must ascend from 0 to the {count} neurons (net.index.offsets), got {bounds}")
    result = scores.detach().to(device="cpu", dtype=torch.float64).clone()
    if assignment is None:
        member = torch.ones(n, count, dtype=torch.bool)
    else:
        assignment = torch.as_tensor(assignment).to(device="cpu", dtype=torch.long).flatten()
        if assignment.numel() != count:
            raise ValueError(f"assignment must have {count} entries (one per neuron), got {assignment.numel()}")
        member = torch.arange(1, n + 1).unsqueeze(1) >= assignment.unsqueeze(0)  # [N, num_neurons]
    for start, stop in zip(bounds[:-1], bounds[1:]):
        if stop == start:
            continue
        block, inside = result[:, start:stop], member[:, start:stop]
        counts = inside.sum(1)
        total = (block * inside).sum(1)
        mean = torch.where(counts > 0, total / counts.clamp_min(1), torch.zeros_like(total))
        scale = torch.where(mean > 0, mean, torch.ones_like(mean))
        result[:, start:stop] = block / scale.unsqueeze(1)
    return result.to(torch.float32)


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
        raise ValueError(
            f"assignment must be 1-D with {count} entries (one per neuron), got shape "
            f"{tuple(assignment.shape)}; pass net.flat_assignment()[:-1]"
        )
    if assignment.dtype.is_floating_point or assignment.dtype == torch.bool:
        raise ValueError(f"assignment must hold integers, got {assignment.dtype}")
    if count and (int(assignment.min()) < 1 or int(assignment.max()) > n + 1):
        raise ValueError(
            f"assignment values must be in 1..{n + 1}, got [{int(assignment.min())}, {int(assignment.max())}]"
        )
    if not (
        isinstance(alpha_growth, (int, float))
        and not isinstance(alpha_growth, bool)
        and alpha_growth > 0
        and alpha_growth == alpha_growth
        and alpha_growth != float("inf")
    ):
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
