"""Unstructured pruning and dead-neuron retirement (steps 3 and 4 of the construction loop).

Both are functions of the net: :func:`prune_small_weights` sets ``net.prune_masks``,
:func:`retire_dead` moves neurons that no active weight reads to the unused index ``N + 1``.
"""

from __future__ import annotations

import logging

import torch

from ..stepping import SteppingNet

__all__ = ["prune_small_weights", "dead_neurons", "retire_dead"]

logger = logging.getLogger(__name__)


def prune_small_weights(net: SteppingNet, threshold: float, moved: torch.Tensor) -> int:
    """Mask weights with ``|W| < threshold`` (on top of the previous pruning masks) and
    revive every synapse from or to a neuron in ``moved`` (bool ``[num_neurons]``).

    Sets ``net.prune_masks`` and returns the number of weight entries newly pruned.
    """
    moved = torch.as_tensor(moved).to(device="cpu", dtype=torch.bool)
    if tuple(moved.shape) != (net.num_neurons,):
        raise ValueError(f"moved must be a bool mask of shape ({net.num_neurons},), got {tuple(moved.shape)}")
    moved_ext = torch.cat([moved, torch.zeros(1, dtype=torch.bool)])
    masks: dict[str, torch.Tensor] = {}
    newly = 0
    for k, layer in enumerate(net.layers):
        weight = net.original_weight(k).detach()
        keep = (weight.abs() >= threshold).cpu()
        previous = net.prune_masks.get(layer.name)
        if previous is not None:
            keep &= previous.to(device="cpu", dtype=torch.bool)
        rows = (
            moved_ext[net.index.out_positions[k]]
            if not layer.is_logits
            else torch.zeros(keep.shape[0], dtype=torch.bool)
        )
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


def dead_neurons(net: SteppingNet, final: bool = True) -> torch.Tensor:
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
            mask = (
                torch.ones(weight.shape, dtype=torch.float64)
                if prune is None
                else prune.to(device="cpu", dtype=torch.float64)
            )
            if not layer.is_logits:
                alive = (flat[net.index.out_positions[k]] <= n).to(torch.float64)
                mask = mask * alive.reshape((-1,) + (1,) * (mask.dim() - 1))
        entries = mask.reshape(mask.shape[0], net.index.in_positions[k].shape[1], -1).sum(-1)  # [out, in/groups]
        in_pos = net.index.in_positions[k].expand_as(entries)
        if not layer.is_logits:
            entries = entries * (in_pos != net.index.out_positions[k].unsqueeze(1))
        readers.index_add_(0, in_pos.reshape(-1), entries.reshape(-1))
    return (flat[:-1] <= n) & (readers[:-1] == 0)


def retire_dead(net: SteppingNet, final: bool = True, frozen: torch.Tensor | None = None) -> list[int]:
    """Send dead neurons (:func:`dead_neurons`) to ``N + 1``, repeatedly until none is left.

    Retiring a neuron masks its incoming synapses in every subnet, so ``net.macs(s)`` drops by
    exactly their MACs (the masks are recounted) and no subnet's function changes (nothing
    read the neuron). That can leave its producers dead in turn, hence the repetition. Each
    group keeps at least one neuron at its smallest subnet index, so no subnet loses a whole
    layer; ``frozen`` neurons (bool ``[num_neurons]``) stay. The loop retires the lasting dead (``final=False``)
    every iteration and all dead neurons (``final=True``) after the last iteration. Returns
    the number of neurons retired per subnet index they left (``[N]``).
    """
    n = net.num_subnets
    counts = [0] * n
    if frozen is not None:
        frozen = torch.as_tensor(frozen, dtype=torch.bool).flatten()[: net.num_neurons].cpu()
    for _ in range(len(net.layers) + 2):
        dead = dead_neurons(net, final)
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
