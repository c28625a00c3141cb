"""Sliced execution: subnet ``s`` computes only its own channels, at the dense subnet's cost.

With masks, every layer of subnet ``s`` still computes its full (expanded) width and multiplies
the inactive weights by zero. Sliced execution runs the model's own ``forward`` on tensors in the
*cumulative layout*: between layers, every tensor holds only the channels of neurons with index
``<= s``, in ascending original channel order (the order torch-pruning's channel maps, flatten
expansions and concatenation offsets already follow, so a flattened or concatenated tensor comes
out in the order of the next layer's active inputs). For the duration of each layer's call:

* a Conv2d/Linear weight is gathered from its trainable parameter with ``index_select`` (rows of
  the active outputs, columns of the active inputs) and multiplied by the same mask the masked
  execution uses, restricted to the gathered block (isolation rule ``a(i) <= a(o)`` and the
  unstructured pruning mask), through the net's existing weight parametrization; the bias is
  gathered the same way. ``index_select``'s backward scatters into the full parameter, so the
  gradient of every entry equals the masked execution's (zero outside the block), and an
  optimizer with momentum and weight decay sees the same gradients;
* grouped convolutions keep a grouped kernel when every conv group that is present keeps the same
  numbers of outputs and inputs (depthwise convs always do); otherwise the gathered weight is
  rebuilt as a dense block-diagonal weight (``groups=1``);
* modules with per-channel parameters or buffers (BatchNorm, PReLU, a layer scale) get the slices
  of the active channels (:class:`~nni_steppingnet.channels_plan.ChannelSlicer`, differentiable
  swap); BatchNorm runs ``F.batch_norm`` on gathered running statistics, written back for the
  active channels only (``num_batches_tracked`` counts as with masks);
* a layer with no active output channel returns a tensor with zero channels, and
  :class:`~nni_steppingnet.channels_plan.EmptyChannelsMode` runs the ops that refuse those;
  a conv with active outputs but no active input reads one zero channel (its outputs are the
  bias, as with masks).

* nested norms (:mod:`~nni_steppingnet.nested_norm`: LayerNorm/LayerNorm2d/RMSNorm over
  channels, GroupNorm(1)) are per-channel modules as above, and the :class:`ChannelSlicer` also
  gives a norm's ``normalized_shape`` the active channel count for the call, so the norm's own
  forward accepts the narrower input; the nested norm's hook, which replaces that output, then
  normalises over the present channels only, with their subnet indices: it asks
  :meth:`SlicedExecution.present_channels` (through ``net.present_channels``) which channels the
  input holds, the same slicer's index the affine parameters were sliced with, so one place
  decides. With every channel's prefix statistics taken over present channels only, the result
  equals the masked nested norm (where inactive channels are zeros left out of every prefix);
* an attention block with head neurons (:mod:`~nni_steppingnet.attention`: timm's ViT and DeiT
  ``Attention``, Swin's ``WindowAttention``, EfficientFormer's and TinyViT's ``Attention``): its
  ``qkv`` Linear outputs the active rows in ascending order, which is the active heads' q, k and
  v in the block's head layout, and ``proj`` reads the active heads' channels in the same order; a
  pre-hook sets the block's ``num_heads`` (and the widths timm derives from it) to the number of
  active heads for the call and gives its per-head parameters the active heads' slices, and the
  post-hook restores them, so the block's own forward reshapes and attends over the active heads
  only. A ViT block with no active head runs with zero heads; the other forwards infer the head
  width with ``-1``, which zero heads cannot, so they run one *phantom* head whose ``qkv`` rows
  and ``proj`` columns are masked (it adds nothing and gets zero gradients). Blocks with another
  forward are refused by name (:func:`unsupported_blocks`): ``"sliced"`` raises, ``"auto"`` runs
  masked with the reason logged.

* a timm block that splits by widths stored at construction (:mod:`~nni_steppingnet.fixed_splits`:
  InceptionNeXt, FasterNet, Res2Net, DPN, ReXNet) gets, for the call, the widths of the active
  channels of each chunk (restored by its post-hook).

Activations, pooling, residual adds, concatenation, SE and token-mixing Linears (MLP-Mixer,
ResMLP: they act on the token dimension, which is not sliced) run unchanged on the narrower
tensors. Checked against the masked execution (``tests/test_sliced.py``): the paper's CNNs, timm's
foundation models, ViT, DeiT, ConvNeXt and MLP-Mixer.

Modules are not swapped: forward pre/post hooks on the wrapped model's own modules gather and
restore, so user hooks, ``model.modules()`` and optimizers keep seeing the same objects.

Departures from the masked execution (measured by ``tests/test_sliced.py`` and the wrap-time
check): floating-point sums run over fewer terms, so logits differ by rounding (about 1e-7
relative in float32), not bitwise; isolation across subnets holds to the same rounding (the masked
execution is bitwise isolated). Use ``execution="masked"`` where bitwise results matter.
"""

from __future__ import annotations

import contextlib
import logging
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator, Sequence, cast

import torch
import torch.nn as nn

from ._inputs import call_model
from .attention import AttentionSpec, HeadLayout, clear_bias_cache, head_widths, is_vit_attention, runs_sliced
from .channels_plan import ChannelSlicer, EmptyChannelsMode
from .errors import UnsupportedModelError
from .fixed_splits import has_fixed_splits, split_widths
from .graph import INPUT_SLOT
from .standardized_conv import standardized_kind
from .validation import EXECUTIONS

if TYPE_CHECKING:
    from .stepping import SteppingNet

__all__ = [
    "EXECUTIONS",
    "SlicedExecution",
    "LayerSlice",
    "attach",
    "compare_executions",
    "nested_assignment",
    "random_inputs",
    "relative_error",
    "unsupported_blocks",
]

logger = logging.getLogger(__name__)

#: Tolerances of the wrap-time check (``execution="auto"``): outputs and gradients, relative to
#: the largest magnitude of each compared tensor.
OUTPUT_RTOL = 1e-5
GRAD_RTOL = 1e-4


@dataclass
class LayerSlice:
    """How one Conv2d/Linear layer runs in subnet ``s`` (index tensors on the CPU).

    ``rows``: active output channels (``None``: all, in order); ``cols``: active input channels
    of an ungrouped layer (``None``: all); ``mask``: bool mask of the gathered block (``None``:
    all active). Grouped convs: ``group_cols`` ``[R, C]`` local columns per row (grouped kernel
    with ``groups`` groups), or ``dense_cols`` ``[R, I]`` local column per input position, the
    group width meaning "not in this row's conv group" (dense block-diagonal, ``groups=1``).
    ``empty_out``: no active output (the layer returns zero channels); ``widen_in``: active
    outputs but no active input (the conv reads one zero channel).
    """

    rows: torch.Tensor | None
    cols: torch.Tensor | None
    mask: torch.Tensor | None
    groups: int
    group_cols: torch.Tensor | None = None
    dense_cols: torch.Tensor | None = None
    empty_out: bool = False
    widen_in: bool = False
    n_rows: int = 0


class _DeviceSlice:
    """A :class:`LayerSlice` with its tensors on one device and dtype."""

    __slots__ = ("plan", "rows", "cols", "mask", "group_cols", "dense_cols", "first")

    def __init__(self, plan: LayerSlice, device: torch.device, dtype: torch.dtype) -> None:
        self.plan = plan
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        self.rows = move(plan.rows)
        self.cols = move(plan.cols)
        self.mask = None if plan.mask is None else plan.mask.to(device=device, dtype=dtype)
        self.group_cols = move(plan.group_cols)
        self.dense_cols = move(plan.dense_cols)
        self.first = torch.zeros(1, dtype=torch.long, device=device)


class _Live:
    """State of one layer call between its pre- and post-hook."""

    __slots__ = ("weight", "slice", "bias", "groups")

    def __init__(self, weight: torch.Tensor, device_slice: _DeviceSlice, bias: Any, groups: int | None) -> None:
        self.weight = weight
        self.slice = device_slice
        self.bias = bias
        self.groups = groups


class SlicedExecution:
    """Runs a :class:`~nni_steppingnet.SteppingNet`'s subnets in the cumulative layout.

    Created by the net (``execution="sliced"`` or a passing ``"auto"`` check); the hooks act only
    while ``net.runs_sliced()`` and read the active subnet and the assignment at forward time, so
    they follow neuron moves. :meth:`install` (re)builds the hooks from ``net.channel_modules``
    (call it after replacing modules, as the slimmable baseline does).
    """

    def __init__(self, net: SteppingNet) -> None:
        self._net_ref = weakref.ref(net)
        self._handles: list[Any] = []
        self._live: dict[int, _Live] = {}
        self._live_slicers: dict[int, ChannelSlicer] = {}
        #: block -> (its int attributes, its per-head parameters) while a call runs sliced
        self._live_heads: dict[str, tuple[dict[str, int], dict[str, torch.Tensor]]] = {}
        #: a fixed-split block's attributes as built, while a call runs sliced (.fixed_splits)
        self._live_splits: dict[int, dict[str, Any]] = {}
        #: qkv and proj layers of blocks whose forward cannot run zero heads (their reshape infers
        #: the head width, -1): layer index -> (the block's head positions, layout, role)
        self._phantom: dict[int, tuple[torch.Tensor, HeadLayout, str]] = {}
        names = [layer.name for layer in net.layers]
        modules = dict(net.model.named_modules())
        for block, heads in net.attention:
            module = modules.get(block.name)
            if module is not None and not is_vit_attention(module):
                self._phantom[names.index(block.qkv)] = (heads, block.layout, "qkv")
                self._phantom[names.index(block.proj)] = (heads, block.layout, "proj")
        self._channel_entries: list[tuple[str, nn.Module, str | None, torch.Tensor]] = []
        self._channel_of: dict[str, int] = {}
        self._mode: EmptyChannelsMode | None = None
        self._groups = [int(getattr(layer.module, "groups", 1)) for layer in net.layers]
        self._kinds = ["conv" if isinstance(layer.module, nn.Conv2d) else "linear" for layer in net.layers]
        self.install()

    # ------------------------------------------------------------------ hooks
    def install(self) -> None:
        """(Re)register the forward hooks on the net's layers and per-channel modules."""
        self.remove()
        net = self._net()
        modules = dict(net.model.named_modules())
        for k, layer in enumerate(net.layers):
            self._hook_module(layer.module, self._layer_pre(k, layer.module), self._layer_post(k))
        channel_entries: list[tuple[str, nn.Module, str | None, torch.Tensor]] = []
        for name, positions in net.channel_modules.items():
            module = modules.get(name)
            if module is not None:
                channel_entries.append((name, module, None, positions))
        for qualified, positions in net.channel_parameters.items():
            owner, _, bare = qualified.rpartition(".")
            module = modules.get(owner)
            if module is not None:
                channel_entries.append((qualified, module, bare, positions))
        self._channel_entries = channel_entries
        self._channel_of = {name: index for index, (name, _, attr, _) in enumerate(channel_entries) if attr is None}
        for index, (_, module, _, _) in enumerate(channel_entries):
            self._hook_module(module, self._channel_pre(index, module), self._channel_post(index))
        for block, heads in net.attention:
            module = modules.get(block.name)
            if module is not None:
                self._hook_module(module, self._heads_pre(block, module, heads), self._heads_post(block.name))
        layer_of = {id(layer.module): k for k, layer in enumerate(net.layers)}
        for module in modules.values():
            if has_fixed_splits(module):
                self._hook_module(module, self._splits_pre(module, layer_of), self._splits_post())
        root = net.model
        self._handles.append(root.register_forward_pre_hook(self._root_pre))
        self._handles.append(root.register_forward_hook(self._root_post, always_call=True))

    def _hook_module(self, module: nn.Module, pre: Any, post: Any) -> None:
        self._handles.append(module.register_forward_pre_hook(pre))
        # First among the post hooks, and also after an exception: the module must get its full
        # tensors back before anything else looks at it.
        self._handles.append(module.register_forward_hook(post, prepend=True, always_call=True))

    def remove(self) -> None:
        """Detach every hook."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._live.clear()
        self._live_slicers.clear()
        self._live_heads.clear()

    def detach_from(self, model: nn.Module) -> None:
        """Drop this execution's hooks from a deep copy of the hooked model."""
        ids = {handle.id for handle in self._handles}
        for module in model.modules():
            for hook_id in ids:
                module._forward_pre_hooks.pop(hook_id, None)
                module._forward_hooks.pop(hook_id, None)

    def _net(self) -> SteppingNet:
        net = self._net_ref()
        if net is None:
            raise RuntimeError("the SteppingNet of this sliced execution no longer exists")
        return net

    def _active(self, module: nn.Module, expected: weakref.ref[nn.Module]) -> SteppingNet | None:
        # A deep copy of the model carries these hooks too; they act only on the wrapped modules.
        net = self._net_ref()
        if net is None or module is not expected() or not net.runs_sliced():
            return None
        return net

    def _root_pre(self, module: nn.Module, args: Any) -> None:
        net = self._net_ref()
        if net is None or module is not net.model or not net.runs_sliced() or self._mode is not None:
            return None
        plans = self._layer_plans(net, net.active_subnet)
        if any(plan.empty_out for plan in plans):
            self._mode = EmptyChannelsMode()
            self._mode.__enter__()
        return None

    def _root_post(self, module: nn.Module, args: Any, output: Any) -> None:
        if self._mode is not None:
            mode, self._mode = self._mode, None
            mode.__exit__(None, None, None)
        return None

    # ---------------------------------------------------------------- layers
    def _layer_pre(self, k: int, module: nn.Module) -> Any:
        expected = weakref.ref(module)

        def hook(mod: nn.Module, args: Any) -> Any:
            net = self._active(mod, expected)
            if net is None:
                return None
            weight = net.original_weight(k)
            device_slice = self._device_slice(net, k, weight)
            plan = device_slice.plan
            params: dict[str, Any] = mod._parameters
            bias = params.get("bias")
            if bias is not None:
                if plan.empty_out:
                    params["bias"] = bias.index_select(0, device_slice.first) * 0
                elif device_slice.rows is not None:
                    params["bias"] = bias.index_select(0, device_slice.rows)
            groups = None
            if self._kinds[k] == "conv" and plan.groups != self._groups[k]:
                conv = cast(nn.Conv2d, mod)
                groups = int(conv.groups)
                conv.groups = plan.groups
            self._live[k] = _Live(weight, device_slice, bias, groups)
            if plan.widen_in and args and isinstance(args[0], torch.Tensor):
                x = args[0]
                shape = list(x.shape)
                shape[-3] = 1
                return (x.new_zeros(shape),) + tuple(args[1:])
            return None

        return hook

    def _layer_post(self, k: int) -> Any:
        def hook(mod: nn.Module, args: Any, output: Any) -> Any:
            live = self._live.pop(k, None)
            if live is None:
                return None
            if live.bias is not None:
                params: dict[str, Any] = mod._parameters
                params["bias"] = live.bias
            if live.groups is not None:
                cast(nn.Conv2d, mod).groups = live.groups
            if live.slice.plan.empty_out and isinstance(output, torch.Tensor):
                return output.narrow(-3 if self._kinds[k] == "conv" else -1, 0, 0)
            return None

        return hook

    def weight(self, k: int, weight: torch.Tensor) -> torch.Tensor | None:
        """The gathered, masked weight of layer ``k`` during its sliced call (``None`` outside
        one, or when ``weight`` is not the layer's trainable parameter); what the net's weight
        parametrization returns in sliced execution."""
        live = self._live.get(k)
        if live is None or live.weight is not weight:
            return None
        d = live.slice
        plan = d.plan
        if plan.empty_out or plan.widen_in:
            rows = d.first if plan.empty_out else d.rows
            w = weight if rows is None else weight.index_select(0, rows)
            # Zero but attached: the parameter gets a (zero) gradient, as with masks, so
            # optimizers apply weight decay to it exactly as they would there.
            w = w.narrow(1, 0, 1) * 0
            if plan.empty_out and not plan.widen_in and self._kinds[k] == "conv":
                width = plan.n_rows  # active inputs, stored for empty layers
                w = w.expand(w.shape[0], width, *w.shape[2:])
            return w
        w = weight if d.rows is None else weight.index_select(0, d.rows)
        if d.cols is not None:
            w = w.index_select(1, d.cols)
        if d.group_cols is not None:
            index = d.group_cols.reshape(*d.group_cols.shape, *([1] * (w.dim() - 2))).expand(
                d.group_cols.shape[0], d.group_cols.shape[1], *w.shape[2:]
            )
            w = torch.gather(w, 1, index)
        if d.mask is not None:
            w = w * d.mask
        if d.dense_cols is not None:
            padded = torch.cat([w, w.new_zeros((w.shape[0], 1, *w.shape[2:]))], 1)
            index = d.dense_cols.reshape(*d.dense_cols.shape, *([1] * (w.dim() - 2))).expand(
                d.dense_cols.shape[0], d.dense_cols.shape[1], *w.shape[2:]
            )
            w = torch.gather(padded, 1, index)
        return w

    # --------------------------------------------------------- channel modules
    def _channel_pre(self, index: int, module: nn.Module) -> Any:
        expected = weakref.ref(module)

        def hook(mod: nn.Module, args: Any) -> None:
            net = self._active(mod, expected)
            if net is None:
                return None
            s = net.active_subnet
            slicer = self._slicer(net, index, s)
            slicer.swap_differentiable(s)
            self._live_slicers[index] = slicer
            return None

        return hook

    def _slicer(self, net: SteppingNet, index: int, s: int) -> ChannelSlicer:
        """The :class:`ChannelSlicer` of channel entry ``index`` in subnet ``s``: the one place
        that decides which of a per-channel module's channels a sliced call holds."""
        _, module, attr, positions = self._channel_entries[index]
        return cast(
            ChannelSlicer,
            net.assignment_cache(
                ("sliced-channels", id(self), index, s),
                lambda flat: ChannelSlicer(module, flat[positions], net.num_subnets, attr, layout="cumulative"),
            ),
        )

    def present_channels(self, name: str, device: torch.device) -> torch.Tensor | None:
        """Which channels of the per-channel module ``name`` (a key of ``net.channel_modules``)
        its input holds in the current sliced call: their positions among the module's channels,
        ascending, on ``device``; ``None`` when the call is not sliced or holds every channel in
        order. The nested norms (:mod:`.nested_norm`) read their channels' indices with it."""
        net = self._net_ref()
        index = self._channel_of.get(name)
        if net is None or index is None or not net.runs_sliced():
            return None
        s = net.active_subnet
        slicer = self._slicer(net, index, s)
        if slicer.whole[s]:
            return None
        return slicer.index_on(s, device)

    # ------------------------------------------------------------- attention
    def _heads_pre(self, block: AttentionSpec, module: nn.Module, heads: torch.Tensor) -> Any:
        """An attention block with head neurons: its ``qkv`` Linear outputs the active heads'
        channels only (in ascending order: ``[q | k | v]`` of the active heads, or their ``[q k v]``
        blocks), so the block's forward runs with ``num_heads`` and the widths timm derives from it
        (``attn_dim``, ``key_attn_dim``/``val_attn_dim``, ``out_dim``) of the active heads, and its
        per-head parameters (relative position bias tables, attention biases) hold the active
        heads, gathered so that their gradients land in the full tensors. A forward that cannot run
        zero heads (it infers the head width with ``-1``) runs one inactive *phantom* head
        instead: its ``qkv`` and ``proj`` weights are masked, so it adds nothing (see ``_plan``)."""
        expected = weakref.ref(module)
        widths = head_widths(block.layout)
        phantom = not is_vit_attention(module)

        def hook(mod: nn.Module, args: Any) -> None:
            net = self._active(mod, expected)
            if net is None:
                return None
            s = net.active_subnet
            active = cast(
                torch.Tensor,
                net.assignment_cache(
                    ("sliced-heads", id(self), block.name, s), lambda flat: (flat[heads] <= s).nonzero().flatten()
                ),
            )
            if int(active.numel()) == block.num_heads:
                return None
            if active.numel() == 0 and phantom:
                active = torch.zeros(1, dtype=torch.long)
            count = int(active.numel())
            state: Any = mod
            saved = {"num_heads": int(state.num_heads)}
            state.num_heads = count
            for attr, per_head in widths.items():
                value = getattr(mod, attr, None)
                if isinstance(value, int):
                    saved[attr] = value
                    setattr(state, attr, count * per_head)
            params: dict[str, torch.Tensor] = {}
            for attr, dim in block.head_params.items():
                full = mod._parameters[attr]
                assert full is not None
                params[attr] = full
                mod._parameters[attr] = full.index_select(dim, active.to(full.device))  # type: ignore[assignment]
            clear_bias_cache(mod)
            self._live_heads[block.name] = (saved, params)
            return None

        return hook

    def _splits_pre(self, module: nn.Module, layer_of: dict[int, int]) -> Any:
        """A timm block that splits by widths stored at construction (:mod:`.fixed_splits`): for
        the call, its widths are the active channels of the layers reading each chunk (and the
        rest of its input, which holds the active channels only), computed once per assignment."""
        expected = weakref.ref(module)

        def hook(mod: nn.Module, args: Any) -> None:
            net = self._active(mod, expected)
            if net is None:
                return None
            s = net.active_subnet
            x = args[0] if args and isinstance(args[0], torch.Tensor) else None
            input_width = None if x is None else int(x.shape[1])

            def build(flat: torch.Tensor) -> dict[str, Any]:
                def active(layer: nn.Module, side: str) -> torch.Tensor:
                    spec = net.layers[layer_of[id(layer)]]
                    positions = spec.out_pos if side == "out" else spec.in_pos
                    # the model input's channels (INPUT_SLOT) are in every subnet
                    return (positions == INPUT_SLOT) | (flat[positions.clamp_min(0)] <= s)

                return split_widths(
                    mod,
                    lambda layer, side: int(active(layer, side).sum()),
                    lambda layer, n: int(active(layer, "out")[:n].sum()),
                    input_width,
                )

            values = net.assignment_cache(("sliced-splits", id(self), id(mod), s, input_width), build)
            state: Any = mod
            self._live_splits[id(mod)] = {attr: getattr(state, attr) for attr in values}
            for attr, value in values.items():
                setattr(state, attr, value)
            return None

        return hook

    def _splits_post(self) -> Any:
        def hook(mod: nn.Module, args: Any, output: Any) -> None:
            saved = self._live_splits.pop(id(mod), None)
            if saved is not None:
                state: Any = mod
                for attr, value in saved.items():
                    setattr(state, attr, value)
            return None

        return hook

    def _heads_post(self, name: str) -> Any:
        def hook(mod: nn.Module, args: Any, output: Any) -> None:
            saved = self._live_heads.pop(name, None)
            if saved is not None:
                state: Any = mod
                for attr, value in saved[0].items():
                    setattr(state, attr, value)
                for attr, full in saved[1].items():
                    mod._parameters[attr] = cast(nn.Parameter, full)
                clear_bias_cache(mod)
            return None

        return hook

    def _channel_post(self, index: int) -> Any:
        def hook(mod: nn.Module, args: Any, output: Any) -> None:
            slicer = self._live_slicers.pop(index, None)
            if slicer is not None:
                slicer.restore()
            return None

        return hook

    # ---------------------------------------------------------------- planning
    def _device_slice(self, net: SteppingNet, k: int, weight: torch.Tensor) -> _DeviceSlice:
        s = net.active_subnet
        return net.assignment_cache(
            ("sliced-layer", id(self), s, k, weight.device, weight.dtype),
            lambda flat: _DeviceSlice(self._layer_plans(net, s)[k], weight.device, weight.dtype),
        )

    def _layer_plans(self, net: SteppingNet, s: int) -> list[LayerSlice]:
        """Every layer's :class:`LayerSlice` in subnet ``s`` (cached until the assignment or the
        pruning masks change)."""
        return net.assignment_cache(
            ("sliced-plans", id(self), s), lambda flat: [self._plan(net, k, s, flat) for k in range(len(net.layers))]
        )

    def _plan(self, net: SteppingNet, k: int, s: int, flat: torch.Tensor) -> LayerSlice:
        layer = net.layers[k]
        a_out, a_in = net.layer_assignment(k, flat)
        mask = net.weight_mask(k, s) > 0  # [out, in/groups, *kernel]
        out = int(a_out.numel())
        if layer.is_logits:
            rows_all = torch.arange(out)
        else:
            rows_all = (a_out <= s).nonzero().flatten()
        groups = self._groups[k]
        phantom = self._phantom.get(k)
        empty_block = phantom is not None and not bool((flat[phantom[0]] <= s).any())
        if empty_block and phantom is not None and phantom[2] == "qkv":
            # no active head: the first head's (masked) channels stand in (_heads_pre)
            rows_all = phantom[1].channels_of(0)
        rows = None if rows_all.numel() == out else rows_all
        n_rows = int(rows_all.numel())
        if groups == 1:
            cols_all = (a_in[0] <= s).nonzero().flatten()
            if empty_block and phantom is not None and phantom[2] == "proj":
                cols_all = torch.arange(phantom[1].val_dim)
            n_in = int(cols_all.numel())
            # F.conv2d refuses zero output channels and returns a wrong shape for zero input
            # channels (checked, torch 2.14); F.linear handles both.
            if self._kinds[k] == "conv" and (n_rows == 0 or n_in == 0):
                return LayerSlice(
                    rows,
                    None,
                    None,
                    1,
                    empty_out=n_rows == 0,
                    widen_in=n_in == 0,
                    n_rows=n_in if n_rows == 0 else n_rows,
                )
            cols = None if n_in == a_in.shape[1] else cols_all
            block = mask.index_select(0, rows_all).index_select(1, cols_all)
            return LayerSlice(rows, cols, None if bool(block.all()) else block, 1, n_rows=n_rows)
        # Grouped conv: a_in is [out, in/groups], equal within a conv group.
        width = int(a_in.shape[1])
        rows_per = out // groups
        col_assign = a_in.reshape(groups, rows_per, width)[:, 0, :]  # [G, width]
        col_ok = col_assign <= s
        row_ok = torch.zeros(out, dtype=torch.bool)
        row_ok[rows_all] = True
        n_r = row_ok.reshape(groups, rows_per).sum(1)
        n_c = col_ok.sum(1)
        n_in = int(n_c.sum())
        if n_rows == 0 or n_in == 0:
            return LayerSlice(
                rows, None, None, 1, empty_out=n_rows == 0, widen_in=n_in == 0, n_rows=n_in if n_rows == 0 else n_rows
            )
        block = mask.index_select(0, rows_all)  # [R, width, *kernel]
        row_group = rows_all // rows_per
        present = (n_r > 0) | (n_c > 0)
        pairs = {(int(r), int(c)) for r, c, p in zip(n_r, n_c, present) if p}
        if len(pairs) == 1 and min(next(iter(pairs))) > 0:
            c = next(iter(pairs))[1]
            local = col_ok.nonzero()[:, 1].reshape(-1, c)  # [present groups, C]
            slot = torch.cumsum(present.long(), 0) - 1
            group_cols = local[slot[row_group]]  # [R, C]
            gathered = torch.gather(
                block,
                1,
                group_cols.reshape(*group_cols.shape, *([1] * (block.dim() - 2))).expand(
                    group_cols.shape[0], c, *block.shape[2:]
                ),
            )
            identity = c == width
            return LayerSlice(
                rows,
                None,
                None if bool(gathered.all()) else gathered,
                int(present.sum()),
                group_cols=None if identity else group_cols,
                n_rows=n_rows,
            )
        # Dense block-diagonal: for every row, the local column of each active input (or the
        # padding column ``width`` when the input belongs to another conv group).
        active_inputs = col_ok.reshape(-1).nonzero().flatten()  # global input channels
        in_group = active_inputs // width
        local_col = active_inputs % width
        same = row_group.unsqueeze(1) == in_group.unsqueeze(0)  # [R, I]
        dense_cols = torch.where(same, local_col.unsqueeze(0), torch.full_like(same, width, dtype=torch.long))
        return LayerSlice(rows, None, None if bool(block.all()) else block, 1, dense_cols=dense_cols, n_rows=n_rows)


# ------------------------------------------------------------------- checking
def _loss_weights(output: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(output.shape, generator=generator, dtype=torch.float32).to(output)


class _DropoutAsIdentity(torch.overrides.TorchFunctionMode):
    """Dropout returns its input within this mode.

    A dropout draws one Bernoulli value per element, so on the sliced tensor (fewer channels)
    it draws a different, equally distributed mask than on the masked execution's full-width
    tensor, even from the same seed: the two executions cannot agree elementwise in training
    mode (measured: logits 0.64 apart, relative, on timm's legacy_seresnet18 with its default
    ``drop_rate=0.2``). The check compares the computation without it. DropPath draws one value
    per sample and is left alone.
    """

    _DROPOUTS = frozenset(
        {
            torch.nn.functional.dropout,
            torch.nn.functional.dropout1d,
            torch.nn.functional.dropout2d,
            torch.nn.functional.dropout3d,
            torch.nn.functional.alpha_dropout,
            torch.nn.functional.feature_alpha_dropout,
            torch.dropout,
            torch.alpha_dropout,
            torch.feature_dropout,
            torch.feature_alpha_dropout,
        }
    )

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func in self._DROPOUTS:
            return args[0] if args else (kwargs or {})["input"]
        return func(*args, **(kwargs or {}))


def _run(
    net: SteppingNet, inputs: Any, s: int, train: bool, sliced: bool, seed: int, gradients: bool
) -> tuple[list[torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    model = net.model
    model.train(train)
    for p in model.parameters():
        p.grad = None
    cuda = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    with contextlib.ExitStack() as stack:
        if not sliced:
            stack.enter_context(net.masked_execution())
        if not gradients:
            stack.enter_context(torch.no_grad())
        stack.enter_context(net.subnet(s))
        # The same dropout draws in both executions.
        stack.enter_context(torch.random.fork_rng(devices=cuda))
        torch.manual_seed(seed)
        if train:
            stack.enter_context(_DropoutAsIdentity())
        output = call_model(model, inputs)
    outputs = [t for t in _flatten(output) if t.is_floating_point()]
    grads: dict[str, torch.Tensor] = {}
    if gradients:
        generator = torch.Generator().manual_seed(seed)
        loss = sum((t.float() * _loss_weights(t, generator)).sum() for t in outputs)
        if isinstance(loss, torch.Tensor) and loss.requires_grad:
            loss.backward()
        grads = {
            name: (p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p))
            for name, p in model.named_parameters()
        }
        for p in model.parameters():
            p.grad = None
    buffers = {name: b.detach().clone() for name, b in model.named_buffers() if b.is_floating_point()}
    return [t.detach().clone() for t in outputs], grads, buffers


def _flatten(obj: Any) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            yield from _flatten(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from _flatten(item)


def relative_error(reference: torch.Tensor, other: torch.Tensor, floor: float = 0.0) -> float:
    """Largest absolute difference over the largest magnitude of ``reference`` (at least
    ``floor``); ``inf`` when the shapes differ."""
    if reference.shape != other.shape:
        return float("inf")
    if reference.numel() == 0:
        return 0.0
    scale = max(float(reference.abs().max()), floor, 1e-30)
    return float((reference.float() - other.float()).abs().max()) / scale


def compare_executions(
    net: SteppingNet,
    inputs: Any,
    *,
    subnets: Sequence[int] | None = None,
    modes: Sequence[bool] = (True, False),
    gradients: bool = True,
    output_rtol: float = OUTPUT_RTOL,
    grad_rtol: float = GRAD_RTOL,
    grad_floor: float = 1e-3,
) -> str:
    """Run subnets of ``net`` (default: all) masked and sliced on ``inputs``, in training and/or
    eval mode (``modes``: ``True`` is training), and compare the outputs, the floating-point
    buffers after the forward (BatchNorm statistics) and, with ``gradients``, every parameter's
    gradient of a fixed random weighting of the outputs.

    Outputs are compared relative to their largest magnitude; a gradient relative to its own
    largest magnitude, floored at ``grad_floor`` times the largest gradient of the model (a
    parameter whose exact gradient is 0, e.g. a bias followed by a training-mode BatchNorm,
    carries only rounding noise in both executions, and that noise grows where a BatchNorm sees
    few values per channel: measured 1e-3 of the largest gradient on mobilenetv3_small_100 at
    batch 2, 32x32). Buffers likewise, floored at ``grad_floor`` times the largest buffer value
    (a running mean of zero-mean inputs is rounding noise in both). In training mode dropout runs
    as the identity in both executions (:class:`_DropoutAsIdentity`: its draws depend on the
    tensor's size, so they cannot agree). Returns ``""`` when everything agrees, else a sentence
    naming the first difference. Buffers, gradients and the training flag are restored.
    """
    model = net.model
    was_training = model.training
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    saved_grads = {name: p.grad for name, p in model.named_parameters()}
    targets = list(range(1, net.num_subnets + 1)) if subnets is None else [net.check_subnet(s) for s in subnets]

    def reset() -> None:
        with torch.no_grad():
            for name, b in model.named_buffers():
                b.copy_(buffers[name])

    try:
        for train in modes:
            label = "training" if train else "eval"
            for s in targets:
                reset()
                ref = _run(net, inputs, s, train, sliced=False, seed=s, gradients=gradients)
                reset()
                got = _run(net, inputs, s, train, sliced=True, seed=s, gradients=gradients)
                if len(ref[0]) != len(got[0]):
                    return f"subnet {s} ({label} mode): the outputs differ in number"
                for r, g in zip(ref[0], got[0]):
                    err = relative_error(r, g)
                    if err > output_rtol:
                        return f"subnet {s} ({label} mode): outputs differ by {err:.2e} (relative)"
                largest = max((float(r.abs().max()) for r in ref[1].values() if r.numel()), default=0.0)
                for name, r in ref[1].items():
                    err = relative_error(r, got[1][name], grad_floor * largest)
                    if err > grad_rtol:
                        return f"subnet {s} ({label} mode): the gradient of {name} differs by {err:.2e} (relative)"
                top = max((float(r.abs().max()) for r in ref[2].values() if r.numel()), default=0.0)
                for name, r in ref[2].items():
                    err = relative_error(r, got[2][name], grad_floor * top)
                    if err > grad_rtol:
                        return f"subnet {s} ({label} mode): buffer {name} differs by {err:.2e} (relative)"
    finally:
        reset()
        for name, p in model.named_parameters():
            p.grad = saved_grads[name]
        model.train(was_training)
    return ""


def attach(net: SteppingNet, execution: str) -> SlicedExecution | None:
    """Build the sliced execution of ``net`` for ``execution`` (:data:`EXECUTIONS`).

    ``"masked"``: none. ``"sliced"``: unchecked. ``"auto"``: checked with
    :func:`compare_executions` on :func:`nested_assignment` (seed 0) and a random input shaped
    like ``net.example_inputs`` (batch at least 2, 8 for small images), in training and eval
    mode; a float32 model that differs is checked again in float64 (:func:`_check_in_float64`:
    rounding, not layout); on a difference or an error the hooks are removed, the reason is
    logged and ``None`` (masked execution) is returned. (A uniformly random index per neuron leaves many neurons
    without any active input; their BatchNorm channels then have zero variance, and the
    training-mode gradients blow up to ~1e33 and differ by rounding, so it cannot serve.)
    """
    if execution not in EXECUTIONS:
        raise ValueError(f"execution must be one of {', '.join(map(repr, EXECUTIONS))}, got {execution!r}")
    if execution == "masked":
        return None
    refused = unsupported_blocks(net)
    if refused:
        names = [name for name, _ in refused]
        why = (
            f"the model has {len(names)} block(s) ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''}) "
            f"that sliced execution does not support: {refused[0][1]}"
        )
        if execution == "sliced":
            raise UnsupportedModelError(
                [(name, f"{reason}; use execution='masked' or 'auto'") for name, reason in refused]
            )
        logger.warning("%s; training runs masked, at the full width's cost", why)
        return None
    sliced = SlicedExecution(net)
    if execution == "sliced":
        return sliced
    reason = ""
    saved = net.flat_assignment().clone()
    try:
        net.set_flat_assignment(nested_assignment(net, seed=0))
        inputs = random_inputs(net.example_inputs, min_batch=_check_batch(net.example_inputs))
        with net.execution_override(sliced):
            # Subnets 1 and N: the check looks for forward code the cumulative layout does not
            # fit (channels picked by position, unknown per-channel tensors), which shows in any
            # subnet holding part of the channels, with errors of the gradients' own size (hence
            # gradients relative to the largest one); eval mode compares outputs only.
            subnets = sorted({1, net.num_subnets})
            reason = _check(net, inputs, subnets)
            if reason and _all_float32(net.model):
                precise = _check_in_float64(net, inputs, subnets)
                if not precise:
                    logger.info(
                        "sliced execution differs from masks in float32 (%s) but equals them in float64: "
                        "rounding, amplified by training-mode BatchNorm over few values; running sliced",
                        reason,
                    )
                    reason = ""
    except (RuntimeError, ValueError, IndexError, TypeError) as exc:
        reason = f"{type(exc).__name__}: {exc}"
    finally:
        net.set_flat_assignment(saved)
    if reason:
        sliced.remove()
        logger.warning(
            "sliced execution does not reproduce the masked one on this model (%s); "
            "training runs masked, at the full width's cost",
            reason,
        )
        return None
    logger.debug("sliced execution checked against masks: equal")
    return sliced


def _check(net: SteppingNet, inputs: Any, subnets: list[int]) -> str:
    return compare_executions(net, inputs, subnets=subnets, modes=(True,), grad_floor=1.0) or compare_executions(
        net, inputs, subnets=subnets, modes=(False,), gradients=False
    )


def _all_float32(model: nn.Module) -> bool:
    tensors = [*model.parameters(), *model.buffers()]
    return all(t.dtype == torch.float32 for t in tensors if t.is_floating_point())


def _check_in_float64(net: SteppingNet, inputs: Any, subnets: list[int]) -> str:
    """:func:`_check` with the model and inputs in float64, the model converted back after
    (float32 -> float64 -> float32 is exact). Deep stacks of training-mode BatchNorm over a few
    values per channel amplify float32 rounding past the check's tolerance (measured at batch 8,
    32x32: logits 6.5e-5 apart on timm's selecsls42, 3.0e-5 on xception41), while a layout
    mismatch shows at the outputs' own size in any precision (0.64 on legacy_seresnet18 before
    dropout was left out of the check); in float64 both models agree to 1e-10. An error in float64
    (an op without float64 support) counts as a difference."""
    model = net.model
    cast = _map_floats(inputs, lambda t: t.to(torch.float64))
    try:
        model.double()
        return _check(net, cast, subnets)
    except (RuntimeError, ValueError, IndexError, TypeError) as exc:
        return f"{type(exc).__name__} in float64: {exc}"
    finally:
        model.float()


def _map_floats(item: Any, fn: Any) -> Any:
    """``item`` with ``fn`` applied to every floating-point tensor in it (through lists, tuples and
    dicts; namedtuples and other leaves as they are)."""
    if isinstance(item, torch.Tensor):
        return fn(item) if item.is_floating_point() else item
    if isinstance(item, (list, tuple)) and not hasattr(item, "_fields"):
        return type(item)(_map_floats(v, fn) for v in item)
    if isinstance(item, dict):
        return type(item)((key, _map_floats(v, fn)) for key, v in item.items())
    return item


def unsupported_blocks(net: SteppingNet) -> list[tuple[str, str]]:
    """Blocks that sliced execution cannot run, with the reason: weight-standardising convs
    (:mod:`.standardized_conv`: their forward standardises over the fan-in, which the gathered
    columns change), and attention blocks with head neurons whose forward is other than timm's
    ViT attention, Swin's window attention and EfficientFormer's and TinyViT's interleaved
    attention (the ones whose use of ``num_heads``, the widths derived from it and the per-head
    parameters it knows)."""
    modules = dict(net.model.named_modules())
    found = [
        (
            name,
            f"{standardized_kind(modules[name])} standardises its weight rows over the whole fan-in, which "
            "sliced execution's gathered columns change",
        )
        for name in net.standardized_convs.names
    ]
    for block, _ in net.attention:
        module = modules.get(block.name)
        if module is None:
            continue
        if not runs_sliced(module):
            found.append(
                (
                    block.name,
                    f"the forward of {type(module).__name__} is not one sliced execution runs on the active "
                    "heads (timm's vision_transformer.Attention, Swin's WindowAttention, EfficientFormer's "
                    "and TinyViT's Attention, SAM's Attention without rotary embeddings, AttentionRope; MetaFormer's and "
                    "DaViT's take their widths from the input's channels)",
                )
            )
    return found


def random_inputs(inputs: Any, min_batch: int = 2) -> Any:
    """Random tensors shaped like the floating-point tensors of ``inputs`` (batch at least
    ``min_batch``); other leaves as they are."""
    generator = torch.Generator().manual_seed(0)

    def make(item: torch.Tensor) -> torch.Tensor:
        if item.dim() == 0:
            return item
        shape = (max(int(item.shape[0]), min_batch), *item.shape[1:])
        return torch.randn(shape, generator=generator, dtype=item.dtype).to(item.device)

    return _map_floats(inputs, make)


def _check_batch(inputs: Any) -> int:
    """Batch of the wrap-time check: 8 for small images, where the last BatchNorm layers see a
    few positions per channel (at batch 2 and 32x32, mobilenetv3_small_100's 1x1 stages make
    training-mode BatchNorm so ill-conditioned that masks and slices differ by 1.7e-4 in the
    logits from rounding alone), else 2."""
    sizes = [int(t[0].numel()) for t in _flatten(inputs) if t.is_floating_point() and t.dim() >= 3]
    return 8 if sizes and max(sizes) <= 64 * 64 else 2


def nested_assignment(net: SteppingNet, seed: int = 0, fractions: Sequence[float] | None = None) -> torch.Tensor:
    """A flat assignment (without the input slot) keeping ``fractions[s-1]`` of every group in
    subnets ``<= s`` (default: ``0.1 + 0.8 * s / N``, i.e. 30/50/70/90% for N = 4; at least one
    neuron per subnet), the rest unused; each group's neurons in a random order (``seed``)."""
    n = net.num_subnets
    fractions = [0.1 + 0.8 * s / n for s in range(1, n + 1)] if fractions is None else list(fractions)
    if len(fractions) != n or any(not 0 < f <= 1 for f in fractions) or fractions != sorted(fractions):
        raise ValueError(f"fractions must be {n} non-decreasing values in (0, 1], got {fractions}")
    generator = torch.Generator().manual_seed(seed)
    parts = []
    for group in net.groups:
        order = torch.randperm(group.size, generator=generator)
        values = torch.full((group.size,), n + 1, dtype=torch.long)
        for s in range(n, 0, -1):
            values[order[: max(1, round(fractions[s - 1] * group.size))]] = s
        parts.append(values)
    return torch.cat(parts)
