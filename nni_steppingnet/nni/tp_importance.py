"""SteppingNet's neuron criterion as a torch-pruning ``Importance``.

:class:`SteppingImportance` scores every channel of a torch-pruning group with the criterion of
paper eq. (3) for one chosen subnet ``i``::

    M_j = sum_{k >= i} alpha_k * |dL_k / dr_j|,   alpha_1 = 1, alpha_{k+1} = alpha_growth * alpha_k

from the importance a :class:`~nni_steppingnet.importance.ImportanceTracker` accumulated on a
:class:`~nni_steppingnet.SteppingNet` of the same architecture (or a ``[N, num_neurons]`` score
tensor), normalised per neuron group and subnet row first
(:func:`~nni_steppingnet.importance.normalize_scores`, as construction does). Plug it into any torch-pruning pruner (``tp.pruner.BasePruner``/``MetaPruner``) for
plain structured pruning: the channels with the smallest ``M`` go first.

Typical use::

    net = SteppingNet(model, x, num_subnets=4)
    tracker = ImportanceTracker(net)
    ...                                   # backward passes inside tracker.collect(subnet=k)
    plain = net.plain_copy()              # unmasked copy with the same module names
    imp = SteppingImportance(net, tracker, subnet=1, model=plain)
    pruner = tp.pruner.BasePruner(plain, x, importance=imp, pruning_ratio=0.5,
                                  ignored_layers=[plain.get_classifier()])
    pruner.step()

A group is scored through its root module (the Conv2d/Linear whose output channels torch-pruning
prunes); the root's channel ``c`` is the SteppingNet neuron ``net.index.out_positions[layer][c]``, so every
coupled channel of the group gets its neuron's ``M``. Groups rooted at a layer that holds no
neurons (the classifier) get ``None``, which torch-pruning skips.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn as nn
import torch_pruning as tp

from ..importance import ImportanceTracker, criterion, normalize_scores
from ..stepping import SteppingNet

__all__ = ["SteppingImportance"]

logger = logging.getLogger(__name__)

_OUT_FNS = (tp.prune_conv_out_channels, tp.prune_linear_out_channels)


class SteppingImportance(tp.importance.Importance):
    """Criterion ``M`` of subnet ``subnet`` for every channel of a torch-pruning group.

    Args:
        net: the SteppingNet whose neurons were scored.
        scores: an :class:`ImportanceTracker` of ``net`` (its current scores are read on every
            call) or a ``[N, num_neurons]`` tensor of accumulated ``|dL_k/dr_j|``.
        subnet: ``i`` in eq. (3): the importance counts subnets ``i..N``.
        alpha_growth: ratio between consecutive ``alpha_k``.
        model: the module torch-pruning prunes (default ``net.model``); its module names must be
            the SteppingNet's, as in ``net.plain_copy()``.
    """

    def __init__(
        self,
        net: SteppingNet,
        scores: ImportanceTracker | torch.Tensor,
        subnet: int = 1,
        alpha_growth: float = 1.5,
        model: nn.Module | None = None,
    ) -> None:
        if not isinstance(net, SteppingNet):
            raise TypeError(f"net must be a SteppingNet, got {type(net).__name__}")
        if isinstance(subnet, bool) or not isinstance(subnet, int) or not 1 <= subnet <= net.num_subnets:
            raise ValueError(f"subnet must be an int in 1..{net.num_subnets}, got {subnet!r}")
        if isinstance(alpha_growth, bool) or not isinstance(alpha_growth, (int, float)) or not alpha_growth > 0:
            raise ValueError(f"alpha_growth must be a positive number, got {alpha_growth!r}")
        num_neurons = int(net.num_neurons)
        if isinstance(scores, ImportanceTracker):
            if scores.net is not net:
                raise ValueError(
                    "the ImportanceTracker belongs to another SteppingNet; pass the tracker built on this net"
                )
        elif isinstance(scores, torch.Tensor):
            if tuple(scores.shape) != (net.num_subnets, num_neurons):
                raise ValueError(
                    f"scores must have shape ({net.num_subnets}, {num_neurons}) "
                    f"[num_subnets, num_neurons], got {tuple(scores.shape)}"
                )
            scores = scores.detach().to("cpu", torch.float32).clone()
        else:
            raise TypeError(
                "scores must be an ImportanceTracker or a [num_subnets, num_neurons] "
                f"tensor, got {type(scores).__name__}"
            )
        self.net = net
        self.scores = scores
        self.subnet = subnet
        self.alpha_growth = float(alpha_growth)
        self.model = net.model if model is None else model
        if not isinstance(self.model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(self.model).__name__}")
        modules = dict(self.model.named_modules())
        self._positions: dict[str, torch.Tensor] = {}
        for k, layer in enumerate(net.layers):
            if layer.is_logits:
                continue
            if layer.name not in modules:
                raise ValueError(
                    f"model has no module {layer.name!r} of the SteppingNet; pass a model "
                    "with the same module names (e.g. net.plain_copy())"
                )
            self._positions[layer.name] = net.index.out_positions[k].clone()
        self._names = {module: name for name, module in modules.items()}

    def criterion(self) -> torch.Tensor:
        """``M`` of every neuron (float32 ``[num_neurons]``) for :attr:`subnet`."""
        raw = self.scores.scores if isinstance(self.scores, ImportanceTracker) else self.scores
        # Per-group normalisation over the net's real subnets (see importance.normalize_scores),
        # then eq. (3) as if every neuron were in subnet ``self.subnet``.
        normalized = normalize_scores(raw, self.net.index.offsets, self.net.flat_assignment()[:-1])
        fixed = torch.full((raw.shape[1],), self.subnet, dtype=torch.long)
        return criterion(normalized, fixed, self.alpha_growth)

    @torch.no_grad()
    def __call__(self, group: Any) -> torch.Tensor | None:
        dep, idxs = group[0]
        root = dep.target.module
        name = self._names.get(root)
        positions = self._positions.get(name) if name is not None else None
        if positions is None or dep.handler not in _OUT_FNS:
            logger.debug("group rooted at %s holds no SteppingNet neurons; not scored", name or type(root).__name__)
            return None
        channels = int(root.weight.shape[0])
        if channels != positions.numel():
            raise ValueError(
                f"layer {name!r} has {channels} output channels but the SteppingNet "
                f"scored {positions.numel()}: the model was pruned since; build a new "
                "SteppingNet and SteppingImportance after each pruning step (or prune "
                "with iterative_steps=1)"
            )
        index = torch.as_tensor([int(i) for i in idxs], dtype=torch.long)
        return self.criterion()[positions[index]]
