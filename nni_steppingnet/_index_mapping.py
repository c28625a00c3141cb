"""torch-pruning's dependency graph, with the channel offsets of split, concat and view read from autograd.

torch-pruning 1.6 maps a channel through ``torch.split``/``chunk``, ``torch.cat`` and
``view``/``reshape`` by offsets it infers, and on torch 2.x three of those inferences go wrong:

- **split**: the offsets are handed to the split's consumers in the order the tracer discovered
  them, not by which output (``output_nr``) each consumer reads. Where a later chunk is reached
  first (InceptionNeXt's ``x_id, x_hw, x_w, x_h = split(...)`` then ``cat``), its channels are
  mapped into the wrong chunk. And ``SplitBackward0`` (``chunk`` and split by an int) has no
  ``_saved_self_sizes`` on torch 2.x, so its chunk widths are guessed from the layers around it.
- **concat**: the widths of its inputs are guessed the same way; a guess that misses gives
  offsets past the layer (DPN's dense path: "channel 79 of a layer with 16").
- **view**: ``_saved_self_sizes`` is ``_saved_self_sym_sizes`` on torch 2.x, so every view is
  mapped by the widths inferred around it. A layer scale viewed as ``[1, C, 1, 1]``
  (InceptionNeXt's ``gamma.reshape(1, -1, 1, 1)``) was mapped as a flatten of stride 4.

Autograd records what really happened, so :func:`build_dependency_graph` rebuilds those mappings
from it after torch-pruning built the graph: each split output's channel offset from the
``output_nr`` its consumer reads and the split sizes autograd saved; each concat input's width
from the shape autograd recorded for it; a view that only adds or drops size-1 dimensions maps
channels as the identity. A node set here is marked so that torch-pruning does not overwrite it
again (it recomputes its mappings in every ``get_pruning_group``): splits and concats by their
``enable_index_mapping`` flag, views by becoming element-wise nodes. Only a split or concat
along the channel dimension (dim 1 of an ``N, C, ...`` tensor of rank 2 or 4, or the last dim)
is touched; one along tokens is left as torch-pruning maps it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Sequence

import torch.nn as nn
import torch_pruning as tp
from torch_pruning import ops
from torch_pruning._helpers import _HybridIndex
from torch_pruning.dependency import constants
from torch_pruning.dependency.index_mapping import _SliceIndexMapping, update_index_mapping

__all__ = ["build_dependency_graph", "correct_index_mapping", "chunk_products"]

logger = logging.getLogger(__name__)

_UNSIGNED = 2**64


def build_dependency_graph(
    model: nn.Module,
    example_inputs: Any,
    *,
    ignored_params: Sequence[Any] = (),
    ignored_layers: Sequence[nn.Module] = (),
    customized_pruners: dict[Any, Any] | None = None,
    unwrapped_parameters: Sequence[Any] = (),
) -> tp.DependencyGraph:
    """``tp.DependencyGraph().build_dependency(...)`` followed by :func:`correct_index_mapping`.

    torch-pruning 1.6 sums the widths it inferred for a concat's inputs, and raises ``TypeError``
    when one could not be inferred (``None``: CSPNet's split chunk fed straight into a concat).
    The graph is complete by then; only its index mappings are not. With the concat's widths
    read from autograd the mappings then finish (``update_index_mapping`` again); a second
    failure is raised as it is.
    """
    graph = tp.DependencyGraph()
    try:
        graph.build_dependency(
            model,
            example_inputs=example_inputs,
            ignored_params=list(ignored_params) or None,
            ignored_layers=list(ignored_layers) or None,
            customized_pruners=customized_pruners or None,
            unwrapped_parameters=list(unwrapped_parameters) or None,
        )
    except TypeError:
        if not getattr(graph, "module2node", None):
            raise
        logger.debug("torch-pruning's index mapping failed; finishing it after the autograd correction")
        correct_index_mapping(graph)
        update_index_mapping(graph)
        return graph
    correct_index_mapping(graph)
    return graph


def _saved_dim(grad_fn: Any, rank: int) -> int:
    # autograd stores a negative dim as an unsigned 64-bit integer
    dim = int(grad_fn._saved_dim)
    if dim >= _UNSIGNED // 2:
        dim -= _UNSIGNED
    return dim + rank if dim < 0 else dim


def _is_channel_dim(dim: int, rank: int) -> bool:
    return dim == rank - 1 or (dim == 1 and rank in (2, 4))


def _offsets(widths: Sequence[int]) -> list[int]:
    offsets = [0]
    for width in widths:
        offsets.append(offsets[-1] + width)
    return offsets


def _split_widths(grad_fn: Any) -> tuple[int, int, list[int]] | None:
    """(dim, rank, chunk widths) of a split's backward node, or None if autograd did not save them."""
    sizes = getattr(grad_fn, "_saved_self_sym_sizes", None)
    if sizes is None or not hasattr(grad_fn, "_saved_dim"):
        return None
    rank = len(sizes)
    dim = _saved_dim(grad_fn, rank)
    if hasattr(grad_fn, "_saved_split_sizes"):
        return dim, rank, [int(w) for w in grad_fn._saved_split_sizes]
    if hasattr(grad_fn, "_saved_split_size"):
        step, total = int(grad_fn._saved_split_size), int(sizes[dim])
        return dim, rank, [min(step, total - start) for start in range(0, total, step)]
    return None


class _ChunkMapping:
    """Channel indices between a whole tensor and its chunk ``[start, stop)``. Every group is
    built on the unpruned model (export prunes once, by the union of all groups' indices), so
    the offsets are those autograd recorded."""

    def __init__(self, start: int, stop: int, into_chunk: bool) -> None:
        self.start = start
        self.stop = stop
        self.into_chunk = into_chunk

    def __call__(self, idxs: list[_HybridIndex]) -> list[_HybridIndex]:
        if not self.into_chunk:
            return [_HybridIndex(idx=i.idx + self.start, root_idx=i.root_idx) for i in idxs]
        return [
            _HybridIndex(idx=i.idx - self.start, root_idx=i.root_idx) for i in idxs if self.start <= i.idx < self.stop
        ]


def _set_mapping(source: Any, target: Any, slot: int, mapping: Any) -> None:
    for dep in source.dependencies:
        if dep.target is target:
            dep.index_mapping[slot] = mapping


@dataclass
class _ChunkPlan:
    """How one split or concat maps channels: ``chunks[neighbour]`` is the chunk a consumer of a
    split (or an input of a concat) reads; its other neighbours see the whole tensor."""

    node: Any
    attribute: str  # "split_sizes" or "concat_sizes"
    widths: list[int]
    chunks: dict[Any, int]

    def mapping(self, neighbour: Any, from_node: bool) -> Any:
        """The mapping this node applies on the dependency between it and ``neighbour``."""
        chunk = self.chunks.get(neighbour)
        if chunk is None:
            return constants.INDEX_MAPPING_PLACEHOLDER
        start = sum(self.widths[:chunk])
        return _ChunkMapping(start, start + self.widths[chunk], into_chunk=from_node)


@dataclass
class _SlicePlan:
    """A channel slice ``x[:, start:stop:step]``: torch-pruning's own mapping between it and its
    input, placed in the slot :func:`_apply_plans` gives it (and kept from being recomputed)."""

    node: Any
    start: int
    stop: int
    step: int
    dim: int

    def mapping(self, neighbour: Any, from_node: bool) -> Any:
        if neighbour not in self.node.inputs:
            return constants.INDEX_MAPPING_PLACEHOLDER
        return _SliceIndexMapping(dim=self.dim, start=self.start, end=self.stop, step=self.step, reverse=from_node)


def _plan_slice(node: Any) -> _SlicePlan | None:
    grad_fn = node.grad_fn
    sizes = getattr(grad_fn, "_saved_self_sym_sizes", None)
    if sizes is None or not all(hasattr(grad_fn, f"_saved_{k}") for k in ("start", "end", "step", "dim")):
        return None
    rank = len(sizes)
    dim = _saved_dim(grad_fn, rank)
    start, stop, step = int(grad_fn._saved_start), int(grad_fn._saved_end), int(grad_fn._saved_step)
    if not _is_channel_dim(dim, rank) or start < 0 or stop < 0 or step < 1:
        return None
    return _SlicePlan(node, start, min(stop, int(sizes[dim])), step, dim)


def _plan_split(node: Any) -> _ChunkPlan | None:
    found = _split_widths(node.grad_fn)
    if found is None:
        return None
    dim, rank, widths = found
    if not _is_channel_dim(dim, rank):
        return None
    chunks: dict[Any, int] = {}
    for consumer in node.outputs:
        numbers = {nr for fn, nr in getattr(consumer.grad_fn, "next_functions", ()) if fn is node.grad_fn}
        if len(numbers) != 1:
            # a consumer of two chunks (x1 * x2): no single offset
            logger.debug("split %s: consumer %s reads outputs %s", node, consumer, sorted(numbers))
            return None
        chunks[consumer] = numbers.pop()
    return _ChunkPlan(node, "split_sizes", widths, chunks)


def _plan_concat(node: Any, by_grad_fn: dict[Any, Any]) -> _ChunkPlan | None:
    edges = node.grad_fn.next_functions
    if any(fn is None for fn, _ in edges):
        return None  # an input without grad: its width is not recorded
    shapes = [list(fn._input_metadata[nr].shape) for fn, nr in edges]
    rank = len(shapes[0])
    dim = _saved_dim(node.grad_fn, rank)
    if not _is_channel_dim(dim, rank):
        return None
    inputs = [by_grad_fn.get(fn) for fn, _ in edges]
    if any(source is None for source in inputs) or len({id(source) for source in inputs}) != len(inputs):
        return None  # the same tensor concatenated twice: one dependency cannot carry two offsets
    return _ChunkPlan(node, "concat_sizes", [int(shape[dim]) for shape in shapes], {n: k for k, n in enumerate(inputs)})


def _apply_plans(plans: dict[Any, _ChunkPlan | _SlicePlan]) -> None:
    """Install the plans. A dependency's first mapping is its source's, its second its target's
    (torch-pruning applies ``index_mapping[0]`` then ``[1]``): on a split feeding a concat
    directly (Res2Net) the way back then maps into the concat's chunk before out of the split's,
    where torch-pruning's fixed slots (0 for splits, 1 for concats) apply them the wrong way round.
    A plan next to a node with a mapping of its own that is not planned (a flatten, a slice) is
    dropped, so that no mapping of torch-pruning's is lost."""
    owners = {
        ops.OPTYPE.SPLIT,
        ops.OPTYPE.CONCAT,
        ops.OPTYPE.RESHAPE,
        ops.OPTYPE.UNBIND,
        ops.OPTYPE.SLICE,
        ops.OPTYPE.EXPAND,
    }
    changed = True
    while changed:
        changed = False
        for node in list(plans):
            neighbours = [*node.inputs, *node.outputs]
            if any(n not in plans and n.type in owners for n in neighbours):
                del plans[node]
                changed = True
    for node, plan in plans.items():
        # torch-pruning recomputes its own mappings in every get_pruning_group
        if isinstance(plan, _SlicePlan):
            node.type = ops.OPTYPE.ELEMENTWISE  # its slice update ignores enable_index_mapping
            continue
        node.module.offsets = _offsets(plan.widths)
        setattr(node.module, plan.attribute, list(plan.widths))
        node.enable_index_mapping = False
    for node in plans:
        for neighbour in {*node.inputs, *node.outputs}:
            for source, target in ((node, neighbour), (neighbour, node)):
                first = plans[source].mapping(target, True) if source in plans else constants.INDEX_MAPPING_PLACEHOLDER
                second = (
                    plans[target].mapping(source, False) if target in plans else constants.INDEX_MAPPING_PLACEHOLDER
                )
                for dep in source.dependencies:
                    if dep.target is target:
                        dep.index_mapping[0] = first
                        dep.index_mapping[1] = second


def _correct_view(node: Any) -> None:
    sizes = getattr(node.grad_fn, "_saved_self_sym_sizes", None)
    metadata: Any = getattr(node.grad_fn, "_input_metadata", ())
    if sizes is None or len(metadata) != 1:
        return
    before = [int(s) for s in sizes if int(s) != 1]
    after = [int(s) for s in metadata[0].shape if int(s) != 1]
    if before != after:
        return  # a real flatten or split of dimensions: torch-pruning's mapping stays
    node.type = ops.OPTYPE.ELEMENTWISE
    identity = constants.INDEX_MAPPING_PLACEHOLDER
    for dep in node.dependencies:
        dep.index_mapping[0] = identity
    for neighbour in [*node.inputs, *node.outputs]:
        _set_mapping(neighbour, node, 0, identity)


def correct_index_mapping(graph: tp.DependencyGraph) -> None:
    """Rebuild the split, concat and view index mappings of ``graph`` from autograd (module doc)."""
    nodes = [node for node in graph.module2node.values() if node.grad_fn is not None]
    by_grad_fn = {node.grad_fn: node for node in nodes}
    for node in nodes:
        if node.type == ops.OPTYPE.RESHAPE:
            _correct_view(node)
    plans: dict[Any, _ChunkPlan | _SlicePlan] = {}
    for node in nodes:
        plan: _ChunkPlan | _SlicePlan | None = None
        if node.type == ops.OPTYPE.SPLIT:
            plan = _plan_split(node)
        elif node.type == ops.OPTYPE.CONCAT:
            plan = _plan_concat(node, by_grad_fn)
        elif node.type == ops.OPTYPE.SLICE:
            plan = _plan_slice(node)
        if plan is not None:
            plans[node] = plan
    _apply_plans(plans)


def _reached_product(node: Any) -> Any:
    """The first node with several inputs that ``node`` feeds through element-wise nodes of one
    input (activations), if that node is element-wise (a product or sum), else ``None``."""
    seen: set[int] = set()
    while id(node) not in seen:
        seen.add(id(node))
        if node.type != ops.OPTYPE.ELEMENTWISE:
            return None
        if len(node.inputs) > 1:
            return node
        if len(node.outputs) != 1:
            return None
        node = node.outputs[0]
    return None


def chunk_products(graph: tp.DependencyGraph) -> dict[Any, list[tuple[int, int, int]]]:
    """Splits whose equal chunks meet again element-wise: split node -> ``(start_a, start_b,
    width)`` for every pair of chunks that one product or sum combines, each through nothing but
    element-wise activations (a gated MLP's ``act(x1) * x2`` after ``fc1(x).chunk(2)``: timm's
    ``GluMlp``, ``SwiGLUPacked``). Channel ``start_a + j`` and ``start_b + j`` of the split's
    input then reach one channel together, so they are one neuron; torch-pruning's group keeps
    one path's root indices only, which maps them to two (the leak the wrap-time probe caught)."""
    found: dict[Any, list[tuple[int, int, int]]] = {}
    for node in graph.module2node.values():
        if node.type != ops.OPTYPE.SPLIT or node.grad_fn is None:
            continue
        split = _split_widths(node.grad_fn)
        if split is None or not _is_channel_dim(split[0], split[1]):
            continue
        widths = split[2]
        offsets = _offsets(widths)
        meeting: dict[int, tuple[Any, set[int]]] = {}
        for consumer in node.outputs:
            numbers = {nr for fn, nr in getattr(consumer.grad_fn, "next_functions", ()) if fn is node.grad_fn}
            if len(numbers) == 2 and consumer.type == ops.OPTYPE.ELEMENTWISE:
                meeting.setdefault(id(consumer), (consumer, set()))[1].update(numbers)  # x1 * x2 directly
                continue
            if len(numbers) != 1:
                continue
            product = _reached_product(consumer)
            if product is not None:
                meeting.setdefault(id(product), (product, set()))[1].update(numbers)
        pairs = []
        for _, chunks in meeting.values():
            ordered = sorted(chunks)
            for a, b in zip(ordered, ordered[1:]):
                if widths[a] == widths[b]:
                    pairs.append((offsets[a], offsets[b], widths[a]))
        if pairs:
            found[node] = pairs
    return found
