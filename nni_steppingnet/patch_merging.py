"""Swin's patch merging: each 2x2 patch of tokens concatenated along channels, then a Linear.

timm's ``PatchMerging`` (Swin, SwinV2, SwinV2-CR) turns ``[B, H, W, C]`` into
``[B, H/2, W/2, 4C]`` with ``reshape(B, H/2, 2, W/2, 2, C).permute(0, 1, 3, 4, 2, 5).flatten(3)``:
merged channel ``j`` is channel ``j % C`` of one of the four tokens of a patch. It goes through
a LayerNorm over the ``4C`` merged channels and the ``reduction`` Linear (SwinV2 runs the
reduction first and normalises its output instead).

torch-pruning 1.6 maps only the first ``C`` merged channels to the input's channels. The other
``3C`` were left unmapped, and so read as subnet 1, and the wrap-time isolation probe refused
every Swin with more than one stage. So the block becomes one torch-pruning node with its own
pruner (:class:`PatchMergingPruner`, given to every ``DependencyGraph`` this package builds).
Its input channels are the ``C`` channels and its outputs the reduction's. :func:`child_channels`
spreads them over the norm and the reduction, for the neuron maps (graph.py) and for export
alike. Merged channel ``j`` then belongs to the neuron of input channel ``j % C``. The nested
LayerNorm over ``4C`` channels normalises a channel of subnet ``k`` with the active merged
channels of index ``<= k``, so the four copies of a channel share its index. The reduction's
weights follow the mask rule like those of any Linear.

Only timm's three classes are recognised, by the class that defines ``forward``, and only with
a LayerNorm named ``norm`` and a Linear named ``reduction`` of matching widths. Another merging
block is left to torch-pruning's tracer, and the isolation probe refuses it by name if that
tracer mis-maps it.
"""

from __future__ import annotations

import importlib
from typing import Any, Sequence, cast

import torch
import torch.nn as nn
import torch_pruning as tp

__all__ = [
    "MERGED_TOKENS",
    "PatchMergingPruner",
    "is_patch_merging",
    "input_width",
    "merged_indices",
    "child_channels",
    "patch_merging_pruners",
]

#: tokens of one patch whose channels are concatenated (2 x 2)
MERGED_TOKENS = 4

#: timm module -> whether the norm runs before the reduction (over the merged channels)
_NORM_FIRST = {
    "timm.models.swin_transformer": True,
    "timm.models.swin_transformer_v2_cr": True,
    "timm.models.swin_transformer_v2": False,
}


def _merging_classes() -> dict[type[nn.Module], bool]:
    classes: dict[type[nn.Module], bool] = {}
    for module_name, norm_first in _NORM_FIRST.items():
        try:
            cls = importlib.import_module(module_name).PatchMerging
        except (ImportError, AttributeError):  # an older or newer timm without it
            continue
        classes[cls] = norm_first
    return classes


def _norm_first(module: nn.Module) -> bool | None:
    """Whether ``module`` is a recognised patch merging block, and its order (``None``: it is not)."""
    for cls, norm_first in _merging_classes().items():
        if getattr(type(module), "forward", None) is cls.forward:
            norm, reduction = getattr(module, "norm", None), getattr(module, "reduction", None)
            if not (isinstance(norm, nn.LayerNorm) and isinstance(reduction, nn.Linear)):
                return None
            if reduction.in_features % MERGED_TOKENS:
                return None
            width = reduction.in_features if norm_first else reduction.out_features
            if tuple(norm.normalized_shape) != (width,):
                return None
            return norm_first
    return None


def is_patch_merging(module: nn.Module) -> bool:
    """True for timm's Swin ``PatchMerging`` blocks this module handles."""
    return _norm_first(module) is not None


def input_width(module: nn.Module) -> int:
    """The ``C`` channels a patch merging block reads (a quarter of its reduction's inputs)."""
    return cast(nn.Linear, module.reduction).in_features // MERGED_TOKENS


def merged_indices(idxs: torch.Tensor, width: int) -> torch.Tensor:
    """The merged channels of input channels ``idxs`` (``width`` = C): copy 0 of every index,
    then copy 1, ... (``j = idx + t * C`` for token ``t`` of the patch)."""
    offsets = torch.arange(MERGED_TOKENS, dtype=torch.long) * width
    return (offsets[:, None] + idxs.to(torch.long)[None, :]).flatten()


def child_channels(module: nn.Module, side: str, idxs: torch.Tensor) -> list[tuple[str, str, torch.Tensor]]:
    """Where channels ``idxs`` of the block's ``side`` ("in": its ``C`` input channels, "out": the
    reduction's outputs) land in its children: ``(child, child side, channel indices)``. For the
    input side every index is listed ``MERGED_TOKENS`` times (:func:`merged_indices`), so a caller
    that repeats its own per-index values with ``values.repeat(MERGED_TOKENS)`` keeps them aligned."""
    norm_first = _norm_first(module)
    if norm_first is None:
        raise ValueError(f"{type(module).__name__} is not a patch merging block this module handles")
    if side == "in":
        merged = merged_indices(idxs, input_width(module))
        children = [("reduction", "in", merged)]
        return [("norm", "out", merged), *children] if norm_first else children
    if side == "out":
        children = [("reduction", "out", idxs.to(torch.long))]
        return children if norm_first else [*children, ("norm", "out", idxs.to(torch.long))]
    raise ValueError(f"side must be 'in' or 'out', not {side!r}")


class PatchMergingPruner(tp.pruner.function.BasePruningFunc):
    """torch-pruning's pruner for a patch merging block (one node: ``C`` in, reduction's out)."""

    TARGET_MODULES = None

    def _prune(self, layer: nn.Module, side: str, idxs: Sequence[int]) -> nn.Module:
        for child, child_side, channels in child_channels(layer, side, torch.as_tensor(list(idxs), dtype=torch.long)):
            target = layer.get_submodule(child)
            index = [int(c) for c in channels]
            if child == "norm":
                tp.prune_layernorm_out_channels(target, index)
            elif child_side == "in":
                tp.prune_linear_in_channels(target, index)
            else:
                tp.prune_linear_out_channels(target, index)
        return layer

    def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        return self._prune(layer, "out", idxs)

    def prune_in_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        return self._prune(layer, "in", idxs)

    def get_out_channels(self, layer: nn.Module) -> int:
        return int(cast(nn.Linear, layer.reduction).out_features)

    def get_in_channels(self, layer: nn.Module) -> int:
        return input_width(layer)


def patch_merging_pruners(model: nn.Module) -> dict[Any, tp.pruner.function.BasePruningFunc]:
    """``customized_pruners`` for ``tp.DependencyGraph.build_dependency``: one
    :class:`PatchMergingPruner` per patch merging class in ``model`` (empty if none). torch-pruning
    looks pruners up by class, so a class is listed only when every instance of it in ``model`` is
    recognised; otherwise its instances stay with torch-pruning's tracer."""
    classes = set(_merging_classes())
    instances = [m for m in model.modules() if type(m) in classes]
    pruner = PatchMergingPruner()
    return {
        cls: pruner
        for cls in {type(m) for m in instances}
        if all(is_patch_merging(m) for m in instances if type(m) is cls)
    }
