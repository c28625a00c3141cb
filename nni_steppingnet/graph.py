"""Neuron groups from torch-pruning's dependency graph.

A *neuron group* is a set of channels that must share one subnet index because the network couples
them (a residual add, a depthwise conv, an SE multiply, BN). This module turns torch-pruning's
``DependencyGraph`` groups into plain index maps: for every Conv/Linear layer, which group neuron
each output channel and each input channel belongs to. Everything downstream (masks, MACs, the
runtime, export) reads only these maps.

The functional core is :func:`discover_layers`; it knows nothing about subnets.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence, cast

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch_pruning as tp
from torch.overrides import TorchFunctionMode

from ._channels import channels_first_parameters, parameter_channel_dim
from ._index_mapping import build_dependency_graph, chunk_products
from ._inputs import batch_size, call_model, check_forward
from ._memory import address_space_ceiling
from .attention import (
    AttentionSpec,
    HeadLayout,
    head_layout,
    head_parameters,
    is_head_attention,
    product_macs,
    unsupported_attention_reason,
    untraced_parameters,
)
from .errors import UnsupportedModelError
from .macs import layer_positions
from .nested_norm import norm_kind, unsupported_norm_reason
from .patch_merging import MERGED_TOKENS, child_channels, is_patch_merging, patch_merging_pruners
from .token_mixing import (
    TokenMixingSpec,
    probe_token_mixing,
    token_channel_positions,
    token_mixing_candidates,
    unsupported_token_mixing_reason,
)

__all__ = [
    "INPUT_SLOT",
    "GroupSpec",
    "LayerSpec",
    "GraphSpec",
    "discover_layers",
    "find_classifier",
    "timm_heads",
    "activation_products",
    "unsupported_modules",
    "WEIGHTED_TYPES",
]

logger = logging.getLogger(__name__)

#: Layers whose weights SteppingNet masks (every neuron is a channel of one of these).
WEIGHTED_TYPES: tuple[type[nn.Module], ...] = (nn.Conv2d, nn.Linear)

#: Flat-position marker for channels read straight from the model input (subnet index 1).
INPUT_SLOT = -1


@dataclass
class GroupSpec:
    """One neuron group: ``size`` neurons; ``members`` maps module channels to neurons."""

    name: str
    size: int
    #: (module name, side "out"/"in", channel indices, neuron indices) for every coupled module.
    members: list[tuple[str, str, torch.Tensor, torch.Tensor]] = field(default_factory=list)


@dataclass
class LayerSpec:
    """A Conv2d/Linear layer and where its channels live in the flat neuron vector."""

    name: str
    module: nn.Module
    is_logits: bool
    #: flat neuron position of every output channel (length out_channels); unused for logits.
    out_pos: torch.Tensor
    #: flat neuron position of every input channel/feature, or INPUT_SLOT (model input).
    in_pos: torch.Tensor
    #: output positions per sample (conv: H_out*W_out; linear: tokens), filled by a trace.
    positions: int = 0

    @property
    def groups(self) -> int:
        return int(getattr(self.module, "groups", 1))

    @property
    def out_channels(self) -> int:
        return int(cast(torch.Tensor, self.module.weight).shape[0])

    @property
    def in_channels(self) -> int:
        m = self.module
        return int(m.in_channels if isinstance(m, nn.Conv2d) else cast(nn.Linear, m).in_features)


@dataclass
class GraphSpec:
    groups: list[GroupSpec]
    layers: list[LayerSpec]
    #: group offsets into the flat neuron vector
    offsets: list[int]
    #: per-channel modules other than Conv/Linear (BN, ...): name -> flat positions of channels
    channel_modules: dict[str, torch.Tensor]
    #: per-channel parameters used directly in forward (layer scale, ...): qualified parameter
    #: name -> flat positions of its channels along :func:`parameter_channel_dim`
    channel_parameters: dict[str, torch.Tensor] = field(default_factory=dict)
    #: multi-head attention blocks whose heads are neurons, with the flat position of every head
    attention: list[tuple[AttentionSpec, torch.Tensor]] = field(default_factory=list)
    #: token-mixing Linears (MLP-Mixer, ResMLP: :mod:`.token_mixing`), not neuron layers
    token_mixing: list[TokenMixingSpec] = field(default_factory=list)

    @property
    def num_neurons(self) -> int:
        return self.offsets[-1] if self.offsets else 0


# Modules whose computation mixes channels in ways a per-channel subnet index cannot respect.
_MIXING_REASONS: tuple[tuple[type[nn.Module], str], ...] = (
    (nn.LocalResponseNorm, "LocalResponseNorm mixes neighbouring channels"),
    (nn.MultiheadAttention, "attention mixes all channels of every token"),
    (nn.ChannelShuffle, "channel shuffle permutes channels across groups"),
    (nn.PixelShuffle, "pixel shuffle folds channels into space"),
    (nn.PixelUnshuffle, "pixel unshuffle folds space into channels"),
    (
        nn.Conv1d,
        "Conv1d layers are not supported (only Conv2d and Linear); in CNNs they usually "
        "convolve across channels (ECA attention)",
    ),
    (nn.Conv3d, "Conv3d layers are not supported (only Conv2d and Linear)"),
    (nn.ConvTranspose2d, "transposed convolutions are not supported (only Conv2d and Linear)"),
)


def _norm_parameters_to_modules(
    modules: dict[str, nn.Module], channel_modules: dict[str, torch.Tensor], channel_parameters: dict[str, torch.Tensor]
) -> None:
    """A norm over channels whose affine parameters torch-pruning reaches only as unwrapped
    parameters (timm's GlobalResponseNorm, whose ``weight`` it sees multiplied in ``forward``)
    becomes one per-channel module, like a LayerNorm: the nested norm, sliced execution and the
    runtime then find its channels under its module name. Changes the tables in place."""
    for name, module in modules.items():
        if name in channel_modules or norm_kind(module) is None:
            continue
        tables = [channel_parameters.get(f"{name}.{bare}") for bare in ("weight", "bias")]
        present = [t for t in tables if t is not None]
        if present and all(torch.equal(present[0], t) for t in present):
            channel_modules[name] = present[0]
            for bare in ("weight", "bias"):
                channel_parameters.pop(f"{name}.{bare}", None)


def unsupported_modules(model: nn.Module) -> list[tuple[str, str]]:
    """(module name, reason) for every module that mixes channels the constraint cannot hold."""
    found: list[tuple[str, str]] = []
    inside_heads: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(prefix) for prefix in inside_heads):
            continue  # q/k/v inside a head never mix subnets (.attention)
        if is_head_attention(module):
            inside_heads.append(name + ".")
            continue
        # LayerNorm/RMSNorm over channels and GroupNorm(1) become nested norms (.nested_norm).
        reason = (
            unsupported_norm_reason(module)
            or unsupported_attention_reason(module)
            or unsupported_token_mixing_reason(module)
        )
        if reason is None:
            for kind, why in _MIXING_REASONS:
                if isinstance(module, kind):
                    reason = why
                    break
        if (
            reason is None
            and "attention" in type(module).__name__.lower()
            and any(isinstance(child, nn.Linear) for child in module.children())
        ):
            reason = (
                f"{type(module).__name__} is attention: it mixes all channels of every token, and only "
                "timm's vision_transformer.Attention (fused qkv: ViT, DeiT) has head neurons so far"
            )
        if reason is not None:
            found.append((name or type(model).__name__, reason))
    return found


# Ops that mix channels when both operands are activations (attention built from convs).
_ACTIVATION_PRODUCTS = {
    torch.matmul: "matmul",
    torch.Tensor.matmul: "matmul",
    torch.Tensor.__matmul__: "matmul",
    torch.bmm: "bmm",
    torch.Tensor.bmm: "bmm",
    torch.baddbmm: "baddbmm",
    torch.einsum: "einsum",
    F.scaled_dot_product_attention: "scaled_dot_product_attention",
}


class _ActivationProductProbe(TorchFunctionMode):
    """Records matrix products of two activations (not a parameter times an activation)."""

    def __init__(self, parameters: set[int], stack: list[str]) -> None:
        super().__init__()
        self.parameters = parameters
        self.stack = stack
        self.found: list[tuple[str, str]] = []

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = _ACTIVATION_PRODUCTS.get(func)
        if name is not None:
            tensors = [a for a in (*args, *(kwargs or {}).values()) if isinstance(a, torch.Tensor)]
            activations = [t for t in tensors if id(t) not in self.parameters and t.dim() >= 2]
            if len(activations) >= 2:
                self.found.append((self.stack[-1] if self.stack else "", name))
        return func(*args, **(kwargs or {}))


def activation_products(model: nn.Module, example_inputs: Any) -> list[tuple[str, str]]:
    """(module name, reason) for modules that multiply two activations with each other
    (attention built from Conv2d/Linear, non-local blocks): found by running one forward."""
    parameters = {id(p) for p in model.parameters()}
    stack: list[str] = []

    def enter(name: str) -> Any:
        def hook(module: nn.Module, args: Any) -> None:
            stack.append(name)

        return hook

    def leave(module: nn.Module, args: Any, output: Any) -> None:
        if stack:
            stack.pop()

    handles = []
    for module_name, module in model.named_modules():
        handles.append(module.register_forward_pre_hook(enter(module_name)))
        handles.append(module.register_forward_hook(leave))
    probe = _ActivationProductProbe(parameters, stack)
    was_training = model.training
    model.eval()
    failed = False
    try:
        with torch.no_grad(), probe:
            call_model(model, example_inputs)
    except Exception:  # checked again below without the probe
        logger.debug("activation-product probe: the forward failed", exc_info=True)
        failed = True
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    if failed:
        # Without the probe: a forward that still fails means the inputs do not fit the model
        # (a clear ValueError naming both shapes, not torch-pruning's trace error).
        check_forward(model, example_inputs)
        return []
    seen: dict[str, str] = {}
    heads = {name for name, module in model.named_modules() if is_head_attention(module)}
    for module_name, op in probe.found:
        if module_name in heads:
            continue  # q.k and attn.v inside one head (.attention)
        seen.setdefault(module_name or type(model).__name__, op)
    return [
        (
            name,
            f"it multiplies two activations ({op}): attention-like channel mixing a per-channel "
            "subnet index cannot respect",
        )
        for name, op in seen.items()
    ]


def timm_heads(model: nn.Module) -> list[nn.Module]:
    """The Conv/Linear layers of timm's ``get_classifier()``: one layer, or every head of a
    distilled model (a tuple ``(head, head_dist)``: DeiT, LeViT; a container of norm-linear heads:
    RepViT's ``RepVitClassifier``) whose outputs are the ``num_classes`` logits. Empty without
    ``get_classifier`` or when it names no such layer."""
    if not hasattr(model, "get_classifier"):
        return []
    candidate = cast(Callable[[], Any], model.get_classifier)()
    items = list(candidate) if isinstance(candidate, (tuple, list)) else [candidate]
    classes = getattr(model, "num_classes", None)
    heads: list[nn.Module] = []
    for item in items:
        if isinstance(item, WEIGHTED_TYPES):
            heads.append(item)
        elif isinstance(item, nn.Module):
            heads += [
                m
                for m in item.modules()
                if isinstance(m, WEIGHTED_TYPES) and isinstance(classes, int) and _width(m, "out") == classes
            ]
    return heads


def find_classifier(model: nn.Module, classifier: nn.Module | str | None = None) -> tuple[str, nn.Module]:
    """The final logits layer: given, the first of :func:`timm_heads`, or the last Linear."""
    names = {module: name for name, module in model.named_modules()}
    if isinstance(classifier, str):
        modules = dict(model.named_modules())
        if classifier not in modules:
            raise ValueError(
                f"classifier {classifier!r} is not a module of the model; "
                f"pass one of the names from model.named_modules()"
            )
        return classifier, modules[classifier]
    if classifier is None:
        heads = timm_heads(model)
        classifier = heads[0] if heads else None
    if classifier is None:
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        if not linears:
            raise ValueError(
                "could not find the final classifier (no nn.Linear in the model); "
                "pass classifier=<module or module name>"
            )
        classifier = linears[-1]
    if classifier not in names or not isinstance(classifier, WEIGHTED_TYPES):
        raise ValueError("classifier must be an nn.Linear or nn.Conv2d inside the model")
    return names[classifier], classifier


def _side(handler: Any) -> str | None:
    name = getattr(handler, "__name__", "") or type(handler).__name__
    if "out_channels" in name:
        return "out"
    if "in_channels" in name:
        return "in"
    return None


def _channel_width(module: nn.Module) -> int:
    """Channels of a per-channel module (norm, activation with parameters): ``num_features``,
    its weight's length, or an affine-free norm's last normalised dimension (0: none known)."""
    width = getattr(module, "num_features", None)
    if isinstance(width, int) and width > 0:
        return width
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor):
        return int(weight.shape[0])
    shape = getattr(module, "normalized_shape", None)
    if isinstance(shape, (tuple, list)) and shape and isinstance(shape[-1], int):
        return int(shape[-1])
    return 0


def _to_tensor(values: Iterable[Any]) -> torch.Tensor:
    return torch.as_tensor([int(v) for v in values], dtype=torch.long)


def discover_layers(
    model: nn.Module,
    example_inputs: Any,
    classifier: nn.Module | str | None = None,
    exclude: Sequence[nn.Module] = (),
) -> GraphSpec:
    """Build neuron groups and per-layer channel maps for ``model``.

    ``exclude`` layers keep their outputs in every subnet (like the classifier) and never move.
    Without a ``classifier``, every head timm's ``get_classifier()`` names is a logits layer
    (:func:`timm_heads`: a distilled model's second head too).
    Raises :class:`UnsupportedModelError` when a module mixes channels or torch-pruning cannot
    trace a channel mapping (so no silently wrong mask is ever produced).
    """
    problems = unsupported_modules(model)
    if problems:
        raise UnsupportedModelError(problems)
    # Before torch-pruning: on attention built from convs its tracer can take minutes.
    problems = activation_products(model, example_inputs)
    if problems:
        raise UnsupportedModelError(problems)

    # Token-mixing Linears (.token_mixing) run per channel: not neurons, and torch-pruning
    # traces through them as ops that keep the channel dimension.
    candidates = token_mixing_candidates(model)
    token_calls: dict[str, tuple[int, int]] = {}
    if candidates:
        token_calls, problems = probe_token_mixing(model, example_inputs, candidates)
        if problems:
            raise UnsupportedModelError(problems)
    clf_name, clf = find_classifier(model, classifier)
    module_names = {module: name for name, module in model.named_modules()}
    order = {name: k for k, name in enumerate(module_names.values())}
    all_modules = dict(model.named_modules())
    token_modules = [all_modules[name] for name in token_calls]
    weighted = [(n, m) for n, m in model.named_modules() if isinstance(m, WEIGHTED_TYPES) and n not in token_calls]
    fixed = {clf, *exclude, *(timm_heads(model) if classifier is None else [])}
    # Per-head parameters (relative position bias tables) follow their block's heads, and tables
    # all heads share keep their shape; left to torch-pruning they would be traced as channels.
    per_head = [
        param for module in model.modules() if is_head_attention(module) for param in untraced_parameters(module)
    ]
    was_training = model.training
    model.eval()
    try:
        # a ceiling, so that an unbounded index mapping raises MemoryError (._memory)
        with address_space_ceiling():
            graph = build_dependency_graph(
                model,
                example_inputs,
                ignored_params=per_head,
                ignored_layers=token_modules,
                customized_pruners=patch_merging_pruners(model),
                unwrapped_parameters=channels_first_parameters(model),
            )
            tp_groups = list(graph.get_all_groups(ignored_layers=list(fixed), root_module_types=list(WEIGHTED_TYPES)))
            remainders = _remainder_groups(graph, tp_groups, [m for _, m in weighted if m not in fixed])
            products = chunk_products(graph)
    except UnsupportedModelError:
        raise
    except MemoryError as exc:
        raise UnsupportedModelError(
            [
                (
                    type(model).__name__,
                    "torch-pruning ran out of memory tracing the model: its index mapping of chained "
                    "reshapes (window or block partitions) grows without bound; such models are not "
                    "supported yet",
                )
            ]
        ) from exc
    except Exception as exc:  # torch-pruning's tracer raises many types; name the cause
        raise UnsupportedModelError(
            [(type(model).__name__, f"torch-pruning could not trace the model: {type(exc).__name__}: {exc}")]
        ) from exc
    finally:
        model.train(was_training)

    parameter_names = {id(p): n for n, p in model.named_parameters()}
    # The qkv Linear of every head-attention block: its group's neurons are heads (.attention).
    head_blocks = {
        f"{name}.qkv": AttentionSpec(
            name=name,
            qkv=f"{name}.qkv",
            proj=f"{name}.proj",
            layout=cast(HeadLayout, head_layout(module)),
            head_params=head_parameters(module),
        )
        for name, module in model.named_modules()
        if is_head_attention(module)
    }
    groups: list[GroupSpec] = []
    group_heads: dict[str, AttentionSpec] = {}
    for tp_group, remainder in [*((g, False) for g in tp_groups), *((g, True) for g in remainders)]:
        items = list(tp_group.items)
        root = items[0]
        root_name = module_names.get(root.dep.target.module)
        if root_name is None:
            continue
        size = int(root.dep.target.module.weight.shape[0])
        block = head_blocks.get(root_name)
        if block is not None:
            size = block.num_heads
            group_heads[root_name] = block
        # A remainder group (below) holds only some of its root's channels: its neurons are those.
        compact = torch.unique(_to_tensor(root.root_idxs)) if remainder else None
        if compact is not None:
            size = len(compact)
        # Root channels that a gated product combines are one neuron (chunk_products)
        merged = None if block is not None else _merged_roots(items, products, compact, size)
        if merged is not None:
            size = int(merged.max()) + 1
        spec = GroupSpec(name=root_name, size=size)
        for item in items:
            module = item.dep.target.module
            # A bare nn.Parameter multiplied in forward (layer scale) is its own node.
            name = parameter_names.get(id(module)) if isinstance(module, nn.Parameter) else module_names.get(module)
            side = _side(item.dep.handler)
            if name is None or side is None:
                continue  # torch-pruning's internal ops (add, concat, reshape) carry no parameters
            if module in fixed and side == "out":
                continue
            idxs, roots = _to_tensor(item.idxs), _to_tensor(item.root_idxs)
            if compact is not None:
                roots = torch.searchsorted(compact, roots)
            if merged is not None:
                roots = merged[roots]
            if block is not None:
                if (name, side) == (block.proj, "in"):
                    # torch-pruning 1.6 loses proj's inputs through some per-head splits (the
                    # identity past proj's width for an interleaved qkv, SAM's reshape to
                    # [3, B * heads, N, -1]): the layout gives them for every block (below)
                    continue
                if block.layout.interleaved and (name, side) != (block.qkv, "out"):
                    continue
                roots = block.layout.qkv_head(roots)
            if is_patch_merging(module):
                # one torch-pruning node (.patch_merging): its channels live in its norm and reduction
                child_roots = roots.repeat(MERGED_TOKENS) if side == "in" else roots
                for child, child_side, channels in child_channels(module, side, idxs):
                    spec.members.append((f"{name}.{child}", child_side, channels, child_roots))
                continue
            spec.members.append((name, side, idxs, roots))
        if block is not None:
            channels = torch.arange(block.num_heads * block.head_dim)
            spec.members.append((block.proj, "in", channels, block.layout.proj_head(channels)))
        groups.append(spec)
    groups.sort(key=lambda g: order[g.name])
    offsets = [0]
    for g in groups:
        offsets.append(offsets[-1] + g.size)

    # Map every Conv/Linear channel to its flat neuron position, checking torch-pruning's work.
    out_pos: dict[str, torch.Tensor] = {}
    in_pos: dict[str, torch.Tensor] = {}
    channel_modules: dict[str, torch.Tensor] = {}
    channel_parameters: dict[str, torch.Tensor] = {}
    modules = dict(model.named_modules())
    parameters = dict(model.named_parameters())
    errors: list[tuple[str, str]] = []
    for gi, g in enumerate(groups):
        for name, side, idxs, roots in g.members:
            module = modules.get(name)
            if module is None:
                if side != "out" or name not in parameters:
                    continue
                param = parameters[name]
                width = int(param.shape[parameter_channel_dim(param)]) if param.dim() else 0
                if width == 0:
                    continue
                table = channel_parameters.setdefault(name, torch.full((width,), -2, dtype=torch.long))
            elif isinstance(module, WEIGHTED_TYPES):
                width = _width(module, side)
                table = (out_pos if side == "out" else in_pos).setdefault(
                    name, torch.full((width,), -2, dtype=torch.long)
                )
            else:
                if side != "out":
                    continue
                width = _channel_width(module)
                if width == 0:
                    continue
                table = channel_modules.setdefault(name, torch.full((width,), -2, dtype=torch.long))
            if idxs.numel() and (int(idxs.max()) >= width or int(roots.max()) >= g.size):
                errors.append(
                    (
                        name,
                        f"torch-pruning mapped channel {int(idxs.max())} of a layer with "
                        f"{width} {side}put channels (untraceable concat/reshape before it)",
                    )
                )
                continue
            flat = roots + offsets[gi]
            previous = table[idxs]
            clash = (previous != -2) & (previous != flat)
            if bool(clash.any()):
                errors.append(
                    (
                        name,
                        f"{side}put channels are claimed by two neuron groups "
                        "(torch-pruning traced an ambiguous concat/reshape)",
                    )
                )
                continue
            table[idxs] = flat

    layers: list[LayerSpec] = []
    for name, module in weighted:
        is_logits = module in fixed
        outs = out_pos.get(name)
        if is_logits:
            outs = torch.full((int(cast(torch.Tensor, module.weight).shape[0]),), INPUT_SLOT, dtype=torch.long)
        elif outs is None or bool((outs == -2).any()):
            errors.append(
                (
                    name,
                    "its output channels are not in any neuron group (is it used in "
                    "forward? pass it in exclude=[...] if it is a second head)",
                )
            )
            continue
        ins = in_pos.get(name)
        if ins is None:
            ins = torch.full((_width(module, "in"),), -2, dtype=torch.long)
        if (
            isinstance(module, nn.Conv2d)
            and module.groups > 1
            and not is_logits
            and module.groups == module.in_channels == module.out_channels
            and bool((ins == -2).all())
        ):
            # torch-pruning couples a depthwise conv's inputs with its outputs and does not list the
            # input side: input channel c is the neuron of output channel c.
            ins = outs.clone()
        # Unmapped inputs are read from the model input, which belongs to subnet 1; the wrap-time
        # isolation probe catches any input torch-pruning failed to trace.
        ins = torch.where(ins == -2, torch.full_like(ins, INPUT_SLOT), ins)
        layers.append(LayerSpec(name=name, module=module, is_logits=is_logits, out_pos=outs, in_pos=ins))
    if errors:
        raise UnsupportedModelError(errors)
    if not any(layer.is_logits for layer in layers):
        raise UnsupportedModelError([(clf_name, "the classifier is never called in forward")])
    for tables in (channel_modules, channel_parameters):
        for name, table in tables.items():
            tables[name] = torch.where(table == -2, torch.full_like(table, INPUT_SLOT), table)
    _norm_parameters_to_modules(modules, channel_modules, channel_parameters)
    token_mixing = _token_mixing(model, candidates, token_calls, channel_modules, channel_parameters)
    _record_positions(model, layers, example_inputs)
    attention = _head_attention(model, example_inputs, groups, offsets, group_heads)
    return GraphSpec(
        groups=groups,
        layers=layers,
        offsets=offsets,
        channel_modules=channel_modules,
        channel_parameters=channel_parameters,
        attention=attention,
        token_mixing=token_mixing,
    )


def _merged_roots(
    items: list[Any], products: dict[Any, list[tuple[int, int, int]]], compact: torch.Tensor | None, size: int
) -> torch.Tensor | None:
    """Neuron of every root index of one group when a split in it has chunks that meet in a
    product (:func:`._index_mapping.chunk_products`): the roots of channels ``start_a + j`` and
    ``start_b + j`` of the split's input become one neuron (numbered by their smallest root);
    ``None`` when nothing merges."""
    parent = list(range(size))

    def find(r: int) -> int:
        while parent[r] != r:
            parent[r] = parent[parent[r]]
            r = parent[r]
        return r

    joined = False
    for item in items:
        pairs = products.get(item.dep.target)
        if not pairs or _side(item.dep.handler) != "out":
            continue
        idxs, roots = _to_tensor(item.idxs), _to_tensor(item.root_idxs)
        if compact is not None:
            roots = torch.searchsorted(compact, roots)
        root_of = dict(zip(idxs.tolist(), roots.tolist()))
        for start_a, start_b, width in pairs:
            for j in range(width):
                a, b = root_of.get(start_a + j), root_of.get(start_b + j)
                if a is not None and b is not None and find(a) != find(b):
                    parent[max(find(a), find(b))] = min(find(a), find(b))
                    joined = True
    if not joined:
        return None
    representatives = torch.tensor([find(r) for r in range(size)])
    return torch.searchsorted(torch.unique(representatives), representatives)


def _remainder_groups(graph: Any, groups: list[Any], roots: list[nn.Module]) -> list[Any]:
    """Groups for the output channels of ``roots`` that no torch-pruning group holds.

    ``get_all_groups`` builds no group rooted at a layer another group has reached, even when that
    group holds only some of its channels: a depthwise conv reading one chunk of a split claims
    those channels of the layer before the split, and the rest end up in no group
    (InceptionNeXt's bands without a residual around them). Each remainder is one more group,
    rooted at the channels left over.
    """
    covered: dict[nn.Module, set[int]] = {}

    def cover(group: Any) -> None:
        for item in group.items:
            target = item.dep.target.module
            if isinstance(target, WEIGHTED_TYPES) and _side(item.dep.handler) == "out":
                covered.setdefault(target, set()).update(int(i) for i in item.idxs)

    for group in groups:
        cover(group)
    extra: list[Any] = []
    for module in roots:
        if module not in graph.module2node:
            continue  # a layer inside a customized pruner's node (patch merging): its own channel map
        width = int(cast(torch.Tensor, module.weight).shape[0])
        held = covered.get(module, set())
        if len(held) < width:
            missing = sorted(set(range(width)) - held)
            handler = tp.prune_conv_out_channels if isinstance(module, nn.Conv2d) else tp.prune_linear_out_channels
            extra.append(graph.get_pruning_group(module, handler, idxs=missing))
            cover(extra[-1])  # it may hold later layers' channels too
    return extra


def _token_mixing(
    model: nn.Module,
    candidates: dict[str, tuple[str, list[str]]],
    token_calls: dict[str, tuple[int, int]],
    channel_modules: dict[str, torch.Tensor],
    channel_parameters: dict[str, torch.Tensor],
) -> list[TokenMixingSpec]:
    """The token-mixing Linears with the flat positions of the channels they run over (those of
    the ``norm1`` they read, which torch-pruning couples to the residual stream)."""
    found: list[TokenMixingSpec] = []
    problems: list[tuple[str, str]] = []
    for block, (norm, linears) in candidates.items():
        positions = token_channel_positions(norm, channel_modules, channel_parameters)
        for linear in linears:
            channels, calls = token_calls[linear]
            if positions is None or positions.numel() != channels:
                problems.append(
                    (
                        linear,
                        f"torch-pruning mapped {0 if positions is None else positions.numel()} channels of "
                        f"{norm!r} to neurons, but the token-mixing Linear runs over {channels} channels; "
                        "give norm1 per-channel parameters (LayerNorm with elementwise_affine=True, Affine)",
                    )
                )
                continue
            module = cast(nn.Linear, model.get_submodule(linear))
            found.append(
                TokenMixingSpec(
                    name=linear,
                    block=block,
                    in_features=int(module.in_features),
                    out_features=int(module.out_features),
                    positions=positions.clone(),
                    calls=calls,
                )
            )
    if problems:
        raise UnsupportedModelError(problems)
    return found


def _head_attention(
    model: nn.Module,
    example_inputs: Any,
    groups: list[GroupSpec],
    offsets: list[int],
    group_heads: dict[str, AttentionSpec],
) -> list[tuple[AttentionSpec, torch.Tensor]]:
    """Head-attention blocks with their q.k / attn.v MACs per sample and the flat position of
    every head."""
    if not group_heads:
        return []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            products = product_macs(model, lambda: call_model(model, example_inputs), batch_size(example_inputs))
    finally:
        model.train(was_training)
    found = []
    for gi, group in enumerate(groups):
        block = group_heads.get(group.name)
        if block is None:
            continue
        if block.name not in products:
            raise UnsupportedModelError([(block.name, "attention block is never called in forward")])
        block.macs = products[block.name]
        found.append((block, torch.arange(offsets[gi], offsets[gi + 1])))
    return found


def _width(module: nn.Module, side: str) -> int:
    if isinstance(module, nn.Conv2d):
        return int(module.out_channels if side == "out" else module.in_channels)
    assert isinstance(module, nn.Linear)
    return int(module.out_features if side == "out" else module.in_features)


def _record_positions(model: nn.Module, layers: list[LayerSpec], example_inputs: Any) -> None:
    """Per-sample output positions of every layer, from one traced forward."""
    seen = layer_positions(model, example_inputs)
    for layer in layers:
        if layer.name not in seen:
            raise UnsupportedModelError([(layer.name, "layer is never called in forward")])
        layer.positions = seen[layer.name]
