"""Standalone subnets: physically remove inactive channels with torch-pruning."""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.nn as nn
import torch_pruning as tp

from ._channels import channels_first_parameters
from ._index_mapping import build_dependency_graph
from ._inputs import call_model
from .attention import reads_input_width, set_num_heads, slice_head_parameters, untraced_parameters
from .fixed_splits import fit_halves, halved_output, has_fixed_splits, needs_input_width, split_widths
from .macs import macs as count_macs
from .nested_norm import install_fixed, kept_channels, kept_indices
from .patch_merging import patch_merging_pruners

if TYPE_CHECKING:
    from .stepping import SteppingNet

__all__ = ["export_subnet", "export_with_report", "ExportReport"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExportReport:
    subnet: int
    #: nonzero Conv/Linear weight entries x positions: equals ``net.macs(subnet)``
    nonzero_macs: int
    #: what a dense kernel spends on the Conv/Linear layers, zeros of masked synapses included
    dense_macs: int
    #: torch-pruning's ``count_ops_and_params`` on the exported model (per sample; it also counts
    #: BN, pooling and element-wise ops, so it is a little above ``dense_macs``)
    torch_pruning_macs: int
    params: int


def _densify_grouped(conv: nn.Conv2d) -> nn.Conv2d:
    """A groups=1 conv holding the block-diagonal weight of a grouped (not depthwise) conv.

    torch-pruning cannot drop an arbitrary subset of a grouped conv's channels (each conv group
    must keep equal sizes), so export rebuilds the layer; the zero blocks cost only dense MACs.
    """
    # a copy keeps the conv's class and geometry (timm's Conv2dSame pads in its forward)
    dense = copy.deepcopy(conv)
    weight = conv.weight.new_zeros(conv.out_channels, conv.in_channels, *conv.kernel_size)
    out_per, in_per = conv.out_channels // conv.groups, conv.in_channels // conv.groups
    with torch.no_grad():
        for g in range(conv.groups):
            weight[g * out_per : (g + 1) * out_per, g * in_per : (g + 1) * in_per] = conv.weight[
                g * out_per : (g + 1) * out_per
            ]
    dense.groups = 1
    dense.weight = nn.Parameter(weight, requires_grad=conv.weight.requires_grad)
    return dense


def export_subnet(net: SteppingNet, s: int) -> nn.Module:
    """Copy of ``net.model`` computing subnet ``s`` with the inactive channels removed.

    Masked synapses are stored as zeros, so the copy computes exactly ``with net.subnet(s)``.
    """
    model = net.plain_copy(s)
    for layer in net.layers:
        module = model.get_submodule(layer.name)
        # Only a true depthwise conv (groups == in == out) stays grouped: torch-pruning keeps its
        # in/out channels in step. A depthwise conv with a channel multiplier (out = k * in,
        # e.g. timm FastViT) is densified like any grouped conv.
        if (
            isinstance(module, nn.Conv2d)
            and module.groups > 1
            and not (module.groups == module.in_channels == module.out_channels)
        ):
            parent_name, _, child = layer.name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, _densify_grouped(module))

    # torch-pruning's GroupNorm pruner slices the bias unconditionally (metaformer's
    # GroupNorm1NoBias has a weight but bias=None): a zero bias stands in while it prunes.
    bias_free = [m for m in model.modules() if isinstance(m, nn.GroupNorm) and m.weight is not None and m.bias is None]
    for module in bias_free:
        module.register_parameter(
            "bias", nn.Parameter(torch.zeros_like(cast(torch.Tensor, module.weight)), requires_grad=False)
        )

    # torch-pruning 1.6's LayerNorm pruner keeps its channels in set order, not sorted
    # (``torch.Tensor.sort()`` is not in place): with kept channels past the set's table size the
    # weight and bias come out permuted against the conv before them. Invisible at timm's init
    # (weight 1, bias 0); on convnext_atto with random norm parameters the exported subnet 1 was
    # 0.63 off the masked one. Their affine parameters are set from these copies after pruning.
    layer_norm_affine = {
        name: (module.weight.detach().clone(), None if module.bias is None else module.bias.detach().clone())
        for name in net.nested_norms.positions
        if isinstance(module := model.get_submodule(name), nn.LayerNorm) and module.weight is not None
    }

    flat = net.flat_assignment()
    out_assignment = {layer.name: flat[pos] for layer, pos in zip(net.layers, net.index.out_positions)}
    names = {m: n for n, m in model.named_modules()}
    fixed = [model.get_submodule(layer.name) for layer in net.layers if layer.is_logits]
    was_training = model.training
    model.eval()
    # per-head parameters are sliced with their heads below, not by torch-pruning; tables all
    # heads share keep their shape
    per_head = [param for block, _ in net.attention for param in untraced_parameters(model.get_submodule(block.name))]
    # token-mixing Linears run over the kept channels as they are (.token_mixing)
    tokens = [model.get_submodule(token.name) for token in net.token_mixing]
    with torch.enable_grad():  # torch-pruning traces through autograd; callers may be under no_grad
        graph = build_dependency_graph(
            model,
            net.example_inputs,
            ignored_params=per_head,
            ignored_layers=tokens,
            customized_pruners=patch_merging_pruners(model),
            unwrapped_parameters=channels_first_parameters(model),
        )
    out_neurons = {layer.name: pos for layer, pos in zip(net.layers, net.index.out_positions)}
    # A layer keeps one output neuron (one channel; a whole head of an attention qkv) when all of
    # its are inactive: it cannot have zero channels, and a group's active neurons may all lie in
    # its other layers (a Res2Net scale whose chunk is inactive). The kept channel's weights are
    # all masked and no active weight reads it, so it changes nothing but costs dense MACs.
    kept_anyway = torch.zeros(flat.numel(), dtype=torch.bool)
    for layer, positions in zip(net.layers, net.index.out_positions):
        if not layer.is_logits and bool((flat[positions] > s).all()):
            kept_anyway[positions[int(torch.argmin(flat[positions]))]] = True
    _keep_for_fixed_widths(net, model, flat, s, kept_anyway)
    # torch-pruning can lose a qkv's heads on the way to proj (graph.py): every block's qkv and
    # proj are pruned here by their head layout, outside its groups
    head_blocks = {block.qkv: block for block, _ in net.attention}
    pending: list[Any] = []
    for group in graph.get_all_groups(ignored_layers=fixed + tokens, root_module_types=[nn.Conv2d, nn.Linear]):
        root = group.items[0].dep.target.module
        assignment = out_assignment[names[root]]
        drop = ((assignment > s) & ~kept_anyway[out_neurons[names[root]]]).nonzero().flatten()
        if drop.numel() == 0:
            continue
        block = head_blocks.get(names[root])
        if block is not None:
            layout = block.layout
            dropped = torch.unique(layout.qkv_head(drop))
            columns = (dropped[:, None] * layout.val_dim + torch.arange(layout.val_dim)[None, :]).flatten()
            tp.prune_linear_out_channels(root, drop.tolist())
            tp.prune_linear_in_channels(model.get_submodule(block.proj), columns.tolist())
            continue
        handler = tp.prune_conv_out_channels if isinstance(root, nn.Conv2d) else tp.prune_linear_out_channels
        pending.append(graph.get_pruning_group(root, handler, idxs=drop.tolist()))
    _prune_once(pending)
    for module in bias_free:
        module.register_parameter("bias", None)
    for name, (weight, bias) in layer_norm_affine.items():
        module = model.get_submodule(name)
        keep = kept_channels(flat, net.nested_norms.positions[name], s, also=kept_anyway)
        if cast(torch.Tensor, module.weight).numel() != keep.numel():
            continue  # install_fixed below names the mismatch
        module.weight = nn.Parameter(weight[keep].clone())
        if bias is not None:
            module.bias = nn.Parameter(bias[keep].clone())
    _fit_channel_state(model)
    kept_out = {
        model.get_submodule(layer.name): (flat[positions] <= s) | kept_anyway[positions]
        for layer, positions in zip(net.layers, net.index.out_positions)
    }
    _fit_split_widths(model, net.example_inputs, kept_out)
    for module in model.modules():
        fit_halves(module)
    for block, heads in net.attention:
        module = model.get_submodule(block.name)
        set_num_heads(module, block.layout)
        if block.head_params:
            # the heads kept anyway (none active, or kept for the input width) are in kept_anyway
            kept = _kept(heads, flat, s, kept_anyway).nonzero().flatten()
            slice_head_parameters(module, block.head_params, kept)
    norms = net.nested_norms
    install_fixed(
        model,
        dict(norms.kinds),
        {name: kept_indices(flat, positions, s, also=kept_anyway) for name, positions in norms.positions.items()},
        s,
    )
    _check_runs(model, net.example_inputs, s)
    model.train(was_training)
    return model


def _kept(positions: torch.Tensor, flat: torch.Tensor, s: int, kept_anyway: torch.Tensor) -> torch.Tensor:
    """Bool per position: the neuron is active in subnet ``s`` or kept anyway."""
    return (flat[positions] <= s) | kept_anyway[positions]


def _keep_more(positions: torch.Tensor, count: int, flat: torch.Tensor, s: int, kept_anyway: torch.Tensor) -> None:
    """Mark inactive neurons of ``positions`` in ``kept_anyway``, the lowest subnet index first,
    until ``count`` of them are kept."""
    kept = _kept(positions, flat, s, kept_anyway)
    missing = count - int(kept.sum())
    if missing <= 0:
        return
    candidates = (~kept).nonzero().flatten()
    if candidates.numel() < missing:
        raise RuntimeError(f"export needs {count} of {positions.numel()} channels kept; there are not so many")
    order = torch.sort(flat[positions][candidates], stable=True).indices
    kept_anyway[positions[candidates[order[:missing]]]] = True


def _keep_for_fixed_widths(
    net: SteppingNet, model: nn.Module, flat: torch.Tensor, s: int, kept_anyway: torch.Tensor
) -> None:
    """Keep inactive neurons where a block's forward fixes one width by another.

    An attention block that takes its widths from its input (:func:`.attention.reads_input_width`)
    needs as many residual channels as head channels: every such block over one residual stream
    keeps inactive heads, and the stream inactive channels, up to the widest need (a multiple of
    every head width). A CSPNet cross stage (:func:`.fixed_splits.halved_output`) needs equal
    halves. The extra neurons' weights are all masked in subnet ``s`` (the mask rule: no active
    neuron reads them, and they read nothing), so the export computes the same function; they
    cost only dense MACs (``macs(..., nonzero=True)`` skips their all-zero heads and rows)."""
    streams: dict[tuple[int, ...], list[tuple[int, torch.Tensor]]] = {}
    for block, heads in net.attention:
        if reads_input_width(model.get_submodule(block.name)):
            residual = net.index.in_positions[net.index.layer(block.qkv)][0]
            streams.setdefault(tuple(residual.tolist()), []).append((block.head_dim, heads))
    for key, blocks in streams.items():
        residual = torch.tensor(key, dtype=torch.long)
        unit = math.lcm(*(head_dim for head_dim, _ in blocks))
        need = int(_kept(residual, flat, s, kept_anyway).sum())
        for head_dim, heads in blocks:
            need = max(need, head_dim * int(_kept(heads, flat, s, kept_anyway).sum()))
        width = -(-need // unit) * unit
        _keep_more(residual, width, flat, s, kept_anyway)
        for head_dim, heads in blocks:
            _keep_more(heads, width // head_dim, flat, s, kept_anyway)
    for name, module in model.named_modules():
        conv = halved_output(module)
        if conv is None:
            continue
        positions = net.index.out_positions[net.index.layer(f"{name}.conv_exp.conv")]
        half = positions.numel() // 2
        need = max(int(_kept(part, flat, s, kept_anyway).sum()) for part in (positions[:half], positions[half:]))
        for part in (positions[:half], positions[half:]):
            _keep_more(part, need, flat, s, kept_anyway)


def _prune_once(groups: list[Any]) -> None:
    """Prune every (layer, pruning function) of ``groups`` once, by the union of its indices.

    All groups are built on the unpruned model, so every index is in its original coordinates;
    pruning group by group would shift the coordinates under the groups still to come, which
    torch-pruning recomputes only for the offsets it infers itself (a split's offsets it never
    updates, nor a slice's start past a pruned channel: DPN's ``x[:, num_1x1_c:]``).
    """
    if not groups:
        return
    merged: dict[tuple[int, Any], tuple[Any, set[int]]] = {}
    for group in groups:
        for item in group.items:
            key = (id(item.dep.target.module), item.dep.handler)
            dep, idxs = merged.setdefault(key, (item.dep, set()))
            idxs.update(int(i) for i in item.idxs)
    combined = groups[0]
    combined.items.clear()
    for dep, idxs in merged.values():
        combined.add_dep(dep, sorted(idxs))
    combined.prune(record_history=False)


def _fit_channel_state(model: nn.Module) -> None:
    """Shrink the per-channel state of timm modules torch-pruning does not know, after it pruned
    their channels: metaformer's ``Scale`` keeps the original width in ``shape`` (its ``scale``
    parameter is pruned), ``BlurPool2d(channels=C)`` a filter repeated C times (one row is kept
    and expanded over the input's channels at forward, which timm does for ``channels=None``)."""
    for module in model.modules():
        kind = (type(module).__module__, type(module).__name__)
        # timm's plain attributes (nn.Module's stubs type attributes as Tensor | Module)
        state: Any = module
        if kind == ("timm.models.metaformer", "Scale"):
            state.shape = (int(state.scale.numel()), *tuple(state.shape)[1:])
        elif kind == ("timm.layers.blur_pool", "BlurPool2d") and state.channels is not None:
            filt = state.filt
            if torch.equal(filt, filt[:1].expand_as(filt)):  # identical rows (timm's binomial filter)
                state.channels = None
                state.filt = filt[:1].clone()


def _fit_split_widths(model: nn.Module, example_inputs: Any, kept_out: dict[nn.Module, torch.Tensor]) -> None:
    """Set the fixed split widths of timm blocks (:mod:`.fixed_splits`) to the pruned model's:
    from the pruned layers, and where a chunk is read by no layer from the block's input width
    (one forward with pre-hooks)."""

    def width(layer: nn.Module, side: str) -> int:
        if isinstance(layer, nn.Linear):
            return int(layer.in_features if side == "in" else layer.out_features)
        conv = cast(nn.Conv2d, layer)
        return int(conv.in_channels if side == "in" else conv.out_channels)

    def output_prefix(layer: nn.Module, n: int) -> int:
        return int(kept_out[layer][:n].sum())

    def fit(block: nn.Module, args: tuple[Any, ...]) -> None:
        for attr, value in split_widths(block, width, output_prefix, int(args[0].shape[1])).items():
            setattr(block, attr, value)

    hooks = []
    for block in [m for m in model.modules() if has_fixed_splits(m)]:
        if needs_input_width(block):
            hooks.append(block.register_forward_pre_hook(fit))
        else:
            for attr, value in split_widths(block, width, output_prefix).items():
                setattr(block, attr, value)
    if hooks:
        try:
            with torch.no_grad():
                call_model(model, example_inputs)
        except RuntimeError:
            pass  # a block that still does not fit is named by _check_runs below
        finally:
            for handle in hooks:
                handle.remove()


def _check_runs(model: nn.Module, example_inputs: Any, s: int) -> None:
    """Run the pruned copy once; name the module that still expects the removed channels.

    torch-pruning shrinks the modules it knows; a module with per-channel state it does not
    know (e.g. the fixed filter buffer of timm's ``BlurPool2d`` in TResNet) would otherwise fail
    later with a bare shape error.
    """
    entered: list[str] = []
    handles = [
        m.register_forward_pre_hook(lambda mod, args, name=name: entered.append(name))
        for name, m in model.named_modules()
        if name and not list(m.children())
    ]
    try:
        with torch.no_grad():
            call_model(model, example_inputs)
    except (RuntimeError, ValueError) as exc:  # ValueError: a split into a fixed number of chunks
        where = entered[-1] if entered else type(model).__name__
        kind = type(model.get_submodule(where)).__name__ if entered else ""
        raise RuntimeError(
            f"export_subnet({s}): after torch-pruning removed the inactive channels, module {where!r} "
            f"({kind}) still expects the original channel count ({exc}). It holds per-channel "
            "state torch-pruning does not know how to shrink; run the masked model "
            "(with net.subnet(s): ...) instead, or register a torch-pruning pruner for that "
            "module type"
        ) from exc
    finally:
        for handle in handles:
            handle.remove()


def export_with_report(net: SteppingNet, s: int) -> tuple[nn.Module, ExportReport]:
    """:func:`export_subnet` plus its nonzero and dense MAC counts and parameter count."""
    model = export_subnet(net, s)
    # Our own per-sample counter for both numbers (torch-pruning's count_ops_and_params is
    # already per sample and also counts BN/pooling ops, so it is not comparable).
    report = ExportReport(
        subnet=s,
        nonzero_macs=count_macs(model, net.example_inputs, nonzero=True),
        dense_macs=count_macs(model, net.example_inputs),
        torch_pruning_macs=int(tp.utils.count_ops_and_params(model, net.example_inputs)[0]),
        params=sum(p.numel() for p in model.parameters()),
    )
    logger.info(
        "exported subnet %d: %s nonzero MACs, %s dense MACs (torch-pruning: %s), %s params",
        s,
        f"{report.nonzero_macs:,}",
        f"{report.dense_macs:,}",
        f"{report.torch_pruning_macs:,}",
        f"{report.params:,}",
    )
    return model, report
