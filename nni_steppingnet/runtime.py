"""Incremental (anytime) inference: compute subnet 1, then extend it subnet by subnet.

:class:`IncrementalRunner` holds a plain copy of the model in which only the Conv2d/Linear layers
are replaced by stage-aware layers; the model's own ``forward`` runs unchanged, once per stage.
At stage ``s`` a layer computes only its new output channels ``O_s = {o : a_out[o] == s}`` from
the inputs ``I_s = {i : a_in(i) <= s}`` (exactly the synapses the subnet mask activates at ``s``).
The logits layer (and any layer whose outputs belong to every subnet) is linear, so it
accumulates: stage ``s`` adds the contribution of the inputs with ``a_in == s``. Each stage
therefore spends exactly ``net.macs(s) - net.macs(s - 1)`` MACs per sample. The weight slices,
index tensors and the MAC count of every stage are computed once when the runner is built.

Two tensor layouts (``layout=``):

* ``"delta"`` (layout (b) of docs/architecture.md): at stage ``s`` every tensor between layers holds only the
  channels with index ``== s``, in ascending channel order. A stage layer appends its input delta
  to the stage-major inputs it keeps from earlier stages, runs its kernel over them (weight
  columns permuted to that order once) and returns only its new channels. BatchNorm and every
  other module with per-channel tensors get the stage's slices of those tensors for the duration
  of the stage, so element-wise work (BN, activations, pooling, adds) runs once per channel over
  all stages, as in the dense subnet. A stage that adds no channel to a layer yields tensors with
  zero channels; ops that refuse those (pooling) are answered by
  :class:`~nni_steppingnet.channels_plan.EmptyChannelsMode`.
  The model input is fed unchanged at every stage (it belongs to subnet 1; layers that expect no
  new input at a stage ignore it).
* ``"full"``: tensors stay full width in the original channel coordinates; a layer writes its new
  channels into its cached full-width output, and element-wise work reruns on full-width tensors
  at every stage (``s`` passes to reach subnet ``s``). It works for any forward the wrapper
  accepts: the model's code may select channels by position or modify outputs in place (the first
  forward watches version counters and switches such layers to returning copies).
* ``"auto"`` (default) checks on a random input that the delta layout reproduces the full-width
  one at every stage, and falls back to ``"full"`` (logged) when it does not: a forward that
  selects or reorders channels by position, a per-channel tensor the graph does not know, an op
  that modifies a layer's input in place after the layer read it.

Nested norms (:mod:`~nni_steppingnet.nested_norm`: LayerNorm/RMSNorm over channels, GroupNorm(1),
GlobalResponseNorm) become :class:`_StageNorm` modules. In the full-width layout stage ``s``
applies subnet ``s``'s nested norm to the full-width tensor (prefix statistics of the channels
computed so far). In the delta layout a call gets the channels of index ``s``, whose statistics
are those of every channel of index ``<= s``: it keeps the statistics of the channels so far
(per position a mean and a sum of squared deviations, merged stage by stage; part of
:meth:`IncrementalRunner.stage_state` like a layer's kept inputs) and normalises the new
channels with them, so the statistics extend stage by stage at the cost of the new channels.

Multi-head attention with head neurons (:mod:`~nni_steppingnet.attention`: timm's ViT attention,
Swin's window attention, EfficientFormer's and TinyViT's interleaved attention) computes ``q.k`` and ``attn.v`` of the heads of index ``s`` only.
In the delta layout its ``qkv`` layer returns exactly their q, k and v channels and ``proj``
reads their outputs; in the full-width layout the block keeps every earlier head's output.

Token-mixing Linears (:mod:`~nni_steppingnet.token_mixing`: MLP-Mixer's ``mlp_tokens``, ResMLP's
``linear_tokens``) are no neuron layers: at stage ``s`` the runner's copy runs them over the
channels with index ``== s`` only (their input's dim ``-2``, which in the delta layout holds only
those) at ``in x out`` MACs per new channel; the full-width layout keeps every earlier channel's
output.

Blocks that split by widths stored at construction (:mod:`~nni_steppingnet.fixed_splits`:
InceptionNeXt, FasterNet, Res2Net, DPN, ReXNet) split, in the delta layout, by the widths of each
chunk's new channels at the stage (the layers' plans say which are new), restored after the call.

Conv groups of grouped/depthwise convs with equal numbers of new outputs and active inputs share
one grouped kernel call. A stage that adds nothing anywhere skips the model forward entirely.

A runner is saved to one file (:meth:`IncrementalRunner.save`) holding an architecture
fingerprint, the per-layer plans, the per-channel assignments of BatchNorm-like modules and the
weights; :meth:`IncrementalRunner.load` rebuilds it from a freshly constructed model of the same
definition, without SteppingNet or torch-pruning.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence, cast

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._pytree import tree_map

from ._inputs import batch_size, call_model
from .attention import (
    HeadLayout,
    decomposed_position_bias,
    head_layout,
    is_head_attention,
    rotary_embedded,
    runs_stage_by_stage,
    shared_head_parameters,
    stage_form,
    stage_head_macs,
    window_position_bias,
)
from .channels_plan import ChannelSlicer, EmptyChannelsMode
from .checkpoint import atomic_write
from .errors import CheckpointError, LayoutMismatchError, UnsupportedModelError
from .fixed_splits import has_fixed_splits, split_widths
from .nested_norm import (
    NormKind,
    affine_parameters,
    extend_statistics,
    nested_norm_output,
    norm_kind,
    normalize_newest,
)

if TYPE_CHECKING:
    from .stepping import SteppingNet

__all__ = [
    "IncrementalRunner",
    "LayerPlan",
    "LAYOUTS",
    "LayoutMismatchError",
    "RUNTIME_FORMAT",
    "architecture_fingerprint",
]

logger = logging.getLogger(__name__)

#: Format tag of files written by :meth:`IncrementalRunner.save`.
RUNTIME_FORMAT = "nni_steppingnet.runtime/2"
#: Older format tags :meth:`IncrementalRunner.load` still reads (without channel assignments).
_READABLE_FORMATS = (RUNTIME_FORMAT, "nni_steppingnet.runtime/1")
#: Tensor layouts of the runner (see the module docstring).
LAYOUTS = ("auto", "delta", "full")
#: Largest difference, relative to the largest output, between the two layouts on the check input.
_LAYOUT_RTOL = 1e-4

#: One fingerprint entry: (module name, module class, [[tensor name, shape], ...]).
FingerprintEntry = tuple[str, str, list[list[Any]]]
_ShapeKey = tuple[tuple[int, ...], ...]


@dataclass
class LayerPlan:
    """What the runtime needs to know about one Conv2d/Linear layer.

    ``a_out`` holds the subnet index of every output channel (ignored when ``is_logits``);
    ``a_in`` the index of the input read by every weight column: shape ``[1, in]`` for an
    ungrouped layer, ``[out, in/groups]`` for a grouped conv (as ``SteppingNet.layer_assignment``
    returns). ``is_logits`` layers have outputs in every subnet and accumulate over stages.
    ``prune_mask`` is an optional bool weight-shaped unstructured pruning mask; ``positions`` the
    per-sample output positions at the reference input size (0 when unknown).
    """

    name: str
    is_logits: bool
    a_out: torch.Tensor
    a_in: torch.Tensor
    prune_mask: torch.Tensor | None = None
    positions: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "is_logits": self.is_logits,
            "a_out": self.a_out.clone(),
            "a_in": self.a_in.clone(),
            "positions": int(self.positions),
            "prune_mask": None if self.prune_mask is None else self.prune_mask.clone(),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LayerPlan:
        return cls(
            name=str(data["name"]),
            is_logits=bool(data["is_logits"]),
            a_out=data["a_out"],
            a_in=data["a_in"],
            prune_mask=data.get("prune_mask"),
            positions=int(data.get("positions", 0)),
        )


def architecture_fingerprint(model: nn.Module) -> list[FingerprintEntry]:
    """Module names, classes and parameter/buffer shapes of ``model``, in definition order."""
    entries: list[FingerprintEntry] = []
    for name, module in model.named_modules():
        kind = type(module)
        tensors: list[list[Any]] = [[p_name, list(p.shape)] for p_name, p in module.named_parameters(recurse=False)]
        tensors += [
            [f"buffer:{b_name}", list(b.shape)] for b_name, b in module.named_buffers(recurse=False) if b is not None
        ]
        # Sorted: parameter order inside a module is not part of the definition.
        entries.append((name, f"{kind.__module__}.{kind.__qualname__}", sorted(tensors)))
    return entries


def _describe(entry: FingerprintEntry) -> str:
    name, kind, tensors = entry
    shapes = ", ".join(f"{t[0]} {tuple(t[1])}" for t in tensors)
    return f"{kind}" + (f" with {shapes}" if shapes else "")


def _compare_fingerprints(saved: Sequence[Any], mine: Sequence[FingerprintEntry]) -> None:
    hint = (
        "build the model with the same definition (architecture, width, num_classes, in_chans) "
        "as the model the file was saved from"
    )
    for old, new in zip(saved, mine):
        old_entry: FingerprintEntry = (str(old[0]), str(old[1]), [[t[0], list(t[1])] for t in old[2]])
        if old_entry != new:
            label = old_entry[0] or "<root>"
            if old_entry[0] != new[0]:
                raise CheckpointError(
                    f"the runtime file was saved from a different model: module "
                    f"{label!r} in the file, {new[0] or '<root>'!r} in this model "
                    f"at the same place; {hint}"
                )
            raise CheckpointError(
                f"the runtime file was saved from a different model: module {label!r} "
                f"is {_describe(old_entry)} in the file but {_describe(new)} in this "
                f"model; {hint}"
            )
    if len(saved) != len(mine):
        if len(saved) > len(mine):
            raise CheckpointError(
                f"the runtime file was saved from a different model: module "
                f"{saved[len(mine)][0]!r} is missing from this model; {hint}"
            )
        raise CheckpointError(
            f"the runtime file was saved from a different model: this model has an "
            f"extra module {mine[len(saved)][0]!r}; {hint}"
        )


def _tensors_of(inputs: Any) -> list[torch.Tensor]:
    if isinstance(inputs, torch.Tensor):
        return [inputs]
    if isinstance(inputs, (list, tuple)):
        return [t for item in inputs for t in _tensors_of(item)]
    if isinstance(inputs, dict):
        return [t for item in inputs.values() for t in _tensors_of(item)]
    return []


def _shape_key(inputs: Any) -> _ShapeKey:
    """Input shapes without the batch dimension: what the output positions depend on."""
    return tuple(tuple(int(d) for d in t.shape[1:]) for t in _tensors_of(inputs))


class _StageNorm(nn.Module):
    """A nested norm (:mod:`~nni_steppingnet.nested_norm`) in the runner's model: subnet
    ``state.stage``'s nested norm (:func:`~nni_steppingnet.nested_norm.nested_norm_output`).

    Full-width layout: the nested norm of the full-width tensor (prefix statistics of the
    channels computed so far). Delta layout: the tensor holds the channels with index ``== s``,
    whose statistics are those of every channel with index ``<= s``; a call keeps the statistics
    of the channels so far (:func:`~nni_steppingnet.nested_norm.extend_statistics`: per position
    a mean and a sum of squared deviations, merged stage by stage; exposed with the layers' kept
    inputs in :meth:`IncrementalRunner.stage_state`) and normalises the new channels with them,
    so a stage's norm work is over its new channels only."""

    channel_index: torch.Tensor

    def __init__(self, norm: nn.Module, kind: NormKind, index: torch.Tensor, state: _RunState, name: str) -> None:
        super().__init__()
        # the norm's parameters (as buffers, like the stage layers' weights: the runner only
        # infers, and an ONNX trace reads them as constants) and children (a norm-act's drop and
        # act) under their own names: the runner's state_dict keys stay the model's
        for param_name, param in norm.named_parameters(recurse=False):
            self.register_buffer(param_name, param.detach().clone())
        for buffer_name, buffer in norm.named_buffers(recurse=False):
            self.register_buffer(buffer_name, buffer)
        for child_name, child in norm.named_children():
            self.add_module(child_name, child)
        self.kind = kind
        self.layer_name = name
        self.state = state
        index = index.to(torch.long)
        self.register_buffer("channel_index", index.clone(), persistent=False)
        stages = int(index.max()) if index.numel() else 0
        #: per stage s: the channels of index s, ascending (what the delta layout's tensor holds)
        self._channels = [(index == t).nonzero().flatten() for t in range(stages + 1)]
        self._new = [int(channels.numel()) for channels in self._channels]
        #: per call of the last forward (delta layout): the statistics of the channels so far
        #: (:func:`~nni_steppingnet.nested_norm.extend_statistics`), batch first
        self._kept: list[torch.Tensor | None] = []
        self._preload: dict[int, torch.Tensor] | None = None
        #: calls in the current model forward (a list: see _StageLayer)
        self._calls = [0]

    def reset(self) -> None:
        self._kept.clear()
        self._calls[0] = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = affine_parameters(self)
        stage = self.state.stage
        if not self.state.delta:
            index = self.channel_index.to(x.device)
            return nested_norm_output(self, self.kind, x, index, max(stage, 1), weight, bias)
        call = self._calls[0]
        self._calls[0] = call + 1
        if call == len(self._kept):
            if stage > 1 and self._preload is None:
                raise RuntimeError(
                    f"nested norm {self.layer_name!r} has no statistics of the earlier stages (was "
                    "runner.model moved or reset directly?); call runner.start(x) again"
                )
            self._kept.append(None if self._preload is None else self._preload.get(call))
        dim = self.kind.dim % x.dim()
        new = self._new[stage] if stage < len(self._new) else 0
        if int(x.shape[dim]) != new:
            raise LayoutMismatchError(
                f"nested norm {self.layer_name!r} got {int(x.shape[dim])} channels at stage {stage}, but "
                f"subnet {stage} gives it {new}: the model's forward selects or reorders channels "
                "(build the runner with layout='full')"
            )
        if new == 0:
            return x
        before = sum(self._new[1:stage])
        statistics = extend_statistics(x, self.kind, self._kept[call], before)
        self._kept[call] = statistics
        channels = self._channels[stage].to(x.device)
        w = None if weight is None else weight.index_select(0, channels)
        b = None if bias is None else bias.index_select(0, channels)
        return normalize_newest(self, self.kind, x, statistics, before + new, w, b)

    # the stage-state protocol of _StageLayer (IncrementalRunner.stage_state, resume_stage)
    def preload(self, tensors: Mapping[int, torch.Tensor] | None) -> None:
        """Statistics of the stages before the next forward's stage, by call; ``None`` ends it."""
        self._preload = None if tensors is None else dict(tensors)

    def delta_cached(self) -> list[torch.Tensor | None]:
        """Per call of the last forward: the statistics of the channels so far, ``None`` if none."""
        return list(self._kept)

    def delta_stage_io(self, s: int) -> tuple[bool, bool, bool]:
        """Stage ``s``: (it keeps statistics of earlier stages, it computes from them, it
        receives new channels)."""
        new = self._new[s] if s < len(self._new) else 0
        return sum(self._new[1:s]) > 0, new > 0, new > 0


class _StageAttention(nn.Module):
    """A head-attention block (:mod:`~nni_steppingnet.attention`) in the runner's model: at stage
    ``s`` it computes the attention of the heads with index ``== s`` only (their q, k, v never
    change afterwards: the mask rule keeps later inputs out). ``qkv`` and ``proj`` are the
    block's stage layers. In the delta layout ``qkv`` returns exactly the new heads' channels; in
    the full-width one the block keeps every earlier head's output. The forwards it knows are
    :func:`~nni_steppingnet.attention.stage_form`'s: plain softmax attention (ViT, MetaFormer,
    DaViT windows); Swin's window attention (the new heads' relative position bias and the
    shifted windows' mask are added to their ``q.k``); EfficientFormer's and TinyViT's
    interleaved attention (their learnt bias per head and token offset; TinyViT's pre-norm);
    SAM's attention on a ``[B, H, W, C]`` grid (the new heads' decomposed position bias from
    their ``q``); DaViT's channel attention (softmax over each new head's ``k^T v``); timm's
    ``AttentionRope`` (the call's rotary embeddings applied to the new heads' q and k)."""

    head_index: torch.Tensor

    def __init__(
        self, block: nn.Module, head_index: torch.Tensor, layout: HeadLayout, state: _RunState, name: str
    ) -> None:
        super().__init__()
        self.qkv = cast(nn.Module, block.qkv)
        self.proj = cast(nn.Module, block.proj)
        self.proj_drop: nn.Module = getattr(block, "proj_drop", nn.Identity())
        self.layout = layout
        self.form = cast(str, stage_form(block))
        self.num_heads = int(head_index.numel())
        self.scale = float(getattr(block, "scale", layout.key_dim**-0.5))
        self.fused = bool(getattr(block, "fused_attn", True))
        self.norm: nn.Module | None = getattr(block, "norm", None) if layout.interleaved else None
        # the block's per-head (and SAM's shared) tensors under their own names (the runner's
        # state_dict keys stay the model's), as buffers like the stage layers' weights
        persistent = set(block.state_dict(keep_vars=True))
        tables: tuple[str, ...] = {
            "window": ("relative_position_bias_table", "relative_position_index"),
            "interleaved": ("attention_biases", "attention_bias_idxs"),
            "decomposed": tuple(shared_head_parameters(block)),
        }.get(self.form, ())
        for attr in tables:
            tensor = cast(torch.Tensor, getattr(block, attr))
            self.register_buffer(attr, tensor.detach().clone(), persistent=attr in persistent)
        self.position_tables = bool(tables)
        # AttentionRope: where its rotary embeddings start, and their layout
        self.num_prefix_tokens = int(getattr(block, "num_prefix_tokens", 0))
        self.rotate_half = bool(getattr(block, "rotate_half", False))
        self.block_name = name
        self.state = state
        #: subnet index of every head (``num_subnets + 1``: never active)
        self.register_buffer("head_index", head_index.to(torch.long).clone(), persistent=False)
        self.heads: torch.Tensor | None = None

    def reset(self) -> None:
        self.heads = None

    def _bias(
        self, new: torch.Tensor, q: torch.Tensor, mask: torch.Tensor | None, grid: tuple[int, int] | None
    ) -> torch.Tensor | None:
        """The additive attention bias of the ``new`` heads (``q``: theirs), ``[rows or 1,
        len(new), N, N]``."""
        rows, _, tokens, _ = q.shape
        if self.form == "interleaved":
            biases = cast(torch.Tensor, self.attention_biases)
            return biases[new][:, cast(torch.Tensor, self.attention_bias_idxs)].unsqueeze(0)
        if self.form == "decomposed" and self.position_tables:
            return decomposed_position_bias(self, q, cast(tuple[int, int], grid))
        if self.form != "window":
            return None
        bias = window_position_bias(self)[new].unsqueeze(0)
        if mask is None:
            return bias
        windows = mask.shape[0]
        shifted = mask.view(1, windows, 1, tokens, tokens).expand(rows // windows, -1, new.numel(), -1, -1)
        return bias + shifted.reshape(rows, new.numel(), tokens, tokens)

    def _attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        new: torch.Tensor,
        mask: torch.Tensor | None,
        grid: tuple[int, int] | None,
        rope: torch.Tensor | None,
    ) -> torch.Tensor:
        """The outputs of the ``new`` heads (q, k, v: theirs), ``[rows, heads, tokens, val_dim]``."""
        if self.form == "channel":
            # DaViT: a head_dim x head_dim attention per head over k^T v, applied to q
            attn = ((k * self.scale).transpose(-2, -1) @ v).softmax(dim=-1)
            return (attn @ q.transpose(-2, -1)).transpose(-2, -1)
        if rope is not None:
            q, k = rotary_embedded(self, q, k, rope)
            q, k = q.type_as(v), k.type_as(v)
        bias = self._bias(new, q, mask, grid)
        bias = None if bias is None else bias.to(q.dtype)
        if self.fused and not self.layout.interleaved:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        scores = (q * self.scale) @ k.transpose(-2, -1)
        return (scores if bias is None else scores + bias).softmax(dim=-1) @ v

    def _split(self, x: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k and v of ``heads`` heads, each ``[batch, heads, tokens, dim]``."""
        batch, tokens, _ = x.shape
        qkv = self.qkv(x)
        layout = self.layout
        if layout.interleaved:
            per_head = qkv.reshape(batch, tokens, heads, layout.qkv_width).permute(0, 2, 1, 3)
            q, k, v = per_head.split([layout.key_dim, layout.key_dim, layout.val_dim], dim=3)
            return q, k, v
        stacked = qkv.reshape(batch, tokens, 3, heads, layout.key_dim).permute(2, 0, 3, 1, 4)
        return stacked[0], stacked[1], stacked[2]

    def forward(
        self,
        x: torch.Tensor,
        attn_mask: Any = None,
        is_causal: bool = False,
        mask: torch.Tensor | None = None,
        rope: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if attn_mask is not None or is_causal or (mask is not None and self.form != "window"):
            raise UnsupportedModelError(
                [(self.block_name, "the incremental runner supports unmasked self-attention only")]
            )
        if rope is not None and self.form != "rotary":
            raise UnsupportedModelError(
                [(self.block_name, "rotary embeddings were passed to an attention whose forward does not take them")]
            )
        if self.norm is not None:
            x = self.norm(x)
        grid: tuple[int, int] | None = None
        if self.form == "decomposed":
            # SAM attends over a [B, H, W, C] grid (explicit widths: a stage may have none)
            grid = (int(x.shape[1]), int(x.shape[2]))
            x = x.reshape(x.shape[0], grid[0] * grid[1], x.shape[-1])
        batch, tokens, _ = x.shape
        stage = self.state.stage
        new = (self.head_index == stage).nonzero().flatten()
        val_dim = self.layout.val_dim
        # delta layout: qkv returns the channels of index == stage, i.e. the new heads' q, k and
        # v in ascending order, and proj reads the new heads' outputs in that order
        delta = self.state.delta
        q, k, v = self._split(x, int(new.numel()) if delta else self.num_heads)
        if not delta and (
            self.heads is None or stage <= 1 or self.heads.shape[0] != batch or self.heads.shape[2] != tokens
        ):
            self.heads = v.new_zeros(batch, self.num_heads, tokens, val_dim)
        out: torch.Tensor | None = None
        if new.numel():
            if not delta:
                q, k, v = q[:, new], k[:, new], v[:, new]
            out = self._attend(q, k, v, new, mask, grid, rope)
            if not delta:
                assert self.heads is not None
                self.heads[:, new] = out
        # per sample of the model's input: a model may fold space into the batch (MobileViT, windows)
        rows = batch / max(self.state.batch, 1)
        head_macs = stage_head_macs(self.form, self.layout, tokens, grid if self.position_tables else None)
        self.state.macs += int(head_macs * int(new.numel()) * rows)
        self.state.positions[self.block_name] = int(head_macs * rows)
        if delta:
            merged = x.new_zeros(batch, tokens, 0) if out is None else out.transpose(1, 2).reshape(batch, tokens, -1)
        else:
            assert self.heads is not None
            merged = self.heads.transpose(1, 2).reshape(batch, tokens, self.num_heads * val_dim)
        y = cast(torch.Tensor, self.proj(merged))
        if grid is not None:
            y = y.reshape(batch, grid[0], grid[1], y.shape[-1])
        return cast(torch.Tensor, self.proj_drop(y))


class _StageTokenLinear(nn.Module):
    """A token-mixing Linear (:mod:`~nni_steppingnet.token_mixing`) in the runner's model: at
    stage ``s`` it runs over the channels (dim ``-2`` of its ``[batch, channels, tokens]`` input)
    with index ``== s`` only and keeps every earlier channel's output (their inputs never change:
    the mask rule keeps later channels out of them). In the delta layout its input holds only
    those channels, and it keeps nothing."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    channel_index: torch.Tensor

    def __init__(self, module: nn.Linear, channel_index: torch.Tensor, state: _RunState, name: str) -> None:
        super().__init__()
        # Buffers under the Linear's own names: the runner's state_dict keys stay the model's.
        self.register_buffer("weight", module.weight.detach().clone())
        self.register_buffer("bias", None if module.bias is None else module.bias.detach().clone())
        #: subnet index of every channel it runs over (``num_subnets + 1``: never active)
        self.register_buffer("channel_index", channel_index.to(torch.long).clone(), persistent=False)
        self.in_features = int(module.in_features)
        self.out_features = int(module.out_features)
        self.layer_name = name
        self.state = state
        self._cache: list[torch.Tensor] = []
        #: calls in the current model forward (a list: nn.Module.__setattr__ is slow per call)
        self._calls = [0]

    def entries(self, num_subnets: int) -> list[int]:
        """MACs per channel-position of every stage: ``in x out`` per new channel."""
        index = self.channel_index.cpu()
        return [self.in_features * self.out_features * int((index == t).sum()) for t in range(num_subnets + 1)]

    def reset(self) -> None:
        self._cache.clear()
        self._calls[0] = 0

    def caches(self) -> list[torch.Tensor]:
        return list(self._cache)

    def restore_caches(self, saved: list[torch.Tensor]) -> None:
        self._cache[:] = saved
        self._calls[0] = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        call = self._calls[0]
        self._calls[0] = call + 1
        state = self.state
        stage = state.stage
        if state.delta:
            return self._forward_delta(x, stage)
        channels = int(self.channel_index.numel())
        if x.dim() < 2 or x.shape[-2] != channels or x.shape[-1] != self.in_features:
            raise ValueError(
                f"token-mixing layer {self.layer_name!r} expects input [..., {channels}, {self.in_features}] "
                f"(channels, tokens), got shape {tuple(x.shape)}"
            )
        if call == len(self._cache):
            if stage > 1:
                raise RuntimeError(
                    f"token-mixing layer {self.layer_name!r} has no cached output of the earlier stages "
                    "(was runner.model moved or reset directly?); call runner.start(x) again"
                )
            with torch.inference_mode(False):
                self._cache.append(x.new_zeros(*x.shape[:-1], self.out_features))
        out = self._cache[call]
        rows = math.prod(int(d) for d in x.shape[:-2]) / max(state.batch, 1)
        state.positions[self.layer_name] = int(state.positions.get(self.layer_name, 0) + rows)
        if stage > 0:
            new = (self.channel_index == stage).nonzero().flatten()
            if new.numel():
                y = F.linear(x.index_select(x.dim() - 2, new), self.weight, self.bias)
                out.index_copy_(out.dim() - 2, new, y.to(out.dtype))
                state.macs += int(self.in_features * self.out_features * new.numel() * rows)
        # a copy: the model's code may modify what it gets in place; the cache stays intact
        return out.clone()

    def _forward_delta(self, x: torch.Tensor, stage: int) -> torch.Tensor:
        """Delta layout: every channel ``x`` holds is new at this stage; nothing is kept."""
        new = int((self.channel_index == stage).sum())
        if x.dim() < 2 or x.shape[-2] != new or x.shape[-1] != self.in_features:
            raise LayoutMismatchError(
                f"token-mixing layer {self.layer_name!r} expects input [..., {new}, {self.in_features}] "
                f"(the channels of stage {stage}, tokens), got shape {tuple(x.shape)}"
            )
        rows = math.prod(int(d) for d in x.shape[:-2]) / max(self.state.batch, 1)
        self.state.positions[self.layer_name] = int(self.state.positions.get(self.layer_name, 0) + rows)
        self.state.macs += int(self.in_features * self.out_features * new * rows)
        return F.linear(x, self.weight, self.bias)


class _RunState:
    """State shared by the runner and all its stage layers during one model forward."""

    __slots__ = ("stage", "probe", "watch", "macs", "positions", "delta", "batch")

    def __init__(self) -> None:
        self.stage = 0
        #: the delta layout (tensors hold only the current stage's channels) is running
        self.delta = False
        self.probe = True
        #: (layer, returned tensor, its version after the layer's writes, from the probe)
        self.watch: list[tuple[_StageLayer, torch.Tensor, int, bool]] = []
        self.macs = 0
        self.positions: dict[str, int] = {}
        #: samples in the model's input (per-sample MACs divide by it)
        self.batch = 1


class _Bucket:
    """One kernel call of a stage: ``k`` conv groups with equal numbers of new rows and inputs."""

    __slots__ = ("in_idx", "out_idx", "weight", "bias", "groups", "rows", "cols")

    def __init__(
        self,
        in_idx: torch.Tensor | None,
        out_idx: torch.Tensor | None,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        groups: int,
        rows: torch.Tensor,
        cols: torch.Tensor,
    ) -> None:
        self.in_idx = in_idx  # input channels to gather (None: all, in order)
        self.out_idx = out_idx  # output channels written (None: all, in order)
        self.weight = weight  # contiguous slice [groups * R, C, *kernel]
        self.bias = bias  # bias slice (None for logits layers or no bias)
        self.groups = groups  # conv groups of the kernel call
        self.rows = rows  # [groups, R] global output rows (to rebuild the dense weight)
        self.cols = cols  # [groups, C] weight columns inside each conv group

    def apply(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Move/convert the tensors the kernel call uses (``nn.Module._apply`` semantics)."""
        self.weight = fn(self.weight)
        self.bias = fn(self.bias) if self.bias is not None else None
        self.in_idx = fn(self.in_idx) if self.in_idx is not None else None
        self.out_idx = fn(self.out_idx) if self.out_idx is not None else None


class _Stage:
    __slots__ = ("buckets", "bias_rows", "bias_values", "entries")

    def __init__(
        self, buckets: list[_Bucket], bias_rows: torch.Tensor | None, bias_values: torch.Tensor | None, entries: int
    ) -> None:
        self.buckets = buckets
        self.bias_rows = bias_rows  # new rows without any active input: output = bias
        self.bias_values = bias_values
        self.entries = entries  # active weight entries computed (MACs per position)

    def apply(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        for bucket in self.buckets:
            bucket.apply(fn)
        if self.bias_values is not None and self.bias_rows is not None:
            self.bias_values, self.bias_rows = fn(self.bias_values), fn(self.bias_rows)


class _DeltaStage(_Stage):
    """Stage ``s`` of the delta layout: what the layer reads, computes and returns at ``s``
    (``bias_rows`` are positions in the returned delta, not output channels)."""

    __slots__ = ("n_in", "in_start", "in_end", "n_new", "direct")

    def __init__(
        self,
        buckets: list[_Bucket],
        bias_rows: torch.Tensor | None,
        bias_values: torch.Tensor | None,
        entries: int,
        n_in: int,
        in_start: int,
        in_end: int,
        n_new: int,
        direct: bool,
    ) -> None:
        super().__init__(buckets, bias_rows, bias_values, entries)
        self.n_in = n_in  # input channels with index == s (the delta read)
        self.in_start = in_start  # inputs of earlier stages the layer keeps (stage-major)
        self.in_end = in_end  # inputs with index <= s, what the kernels read
        self.n_new = n_new  # output channels with index == s (the delta returned)
        self.direct = direct  # one kernel call yields the whole delta in order


class _StageSplits:
    """Forward hooks on a block that splits by widths stored at construction
    (:mod:`~nni_steppingnet.fixed_splits`): in the delta layout a stage's tensors hold only its
    new channels, so for the call its widths are those of the new channels of each chunk (the
    layers' plans say which are new), restored after it. The full-width layout splits the full
    widths, as built."""

    def __init__(self, block: nn.Module, plans: dict[int, LayerPlan], state: _RunState) -> None:
        self.plans = plans
        self.state = state
        self.saved: dict[str, Any] = {}
        self.handles = [
            block.register_forward_pre_hook(self.pre),
            block.register_forward_hook(self.post, always_call=True),
        ]

    def _indices(self, layer: nn.Module, side: str) -> torch.Tensor:
        plan = self.plans[id(layer)]
        if side == "out":
            return plan.a_out
        if plan.a_in.shape[0] == 1:
            return plan.a_in[0]  # ungrouped: one row of input indices
        if plan.a_in.shape[1] == 1 and plan.a_in.shape[0] == plan.a_out.shape[0]:
            return plan.a_in[:, 0]  # depthwise: input c is read by output c
        raise UnsupportedModelError(
            [(plan.name, "a grouped conv reads a fixed split's chunk: its new inputs per stage are not known")]
        )

    def pre(self, block: nn.Module, args: Any) -> None:
        if not self.state.delta:
            return None
        stage = self.state.stage

        def width(layer: nn.Module, side: str) -> int:
            return int((self._indices(layer, side) == stage).sum())

        def output_prefix(layer: nn.Module, n: int) -> int:
            return int((self.plans[id(layer)].a_out[:n] == stage).sum())

        x = args[0] if args and isinstance(args[0], torch.Tensor) else None
        values = split_widths(block, width, output_prefix, None if x is None else int(x.shape[1]))
        state: Any = block  # timm's plain attributes
        self.saved = {attr: getattr(state, attr) for attr in values}
        for attr, value in values.items():
            setattr(state, attr, value)
        return None

    def post(self, block: nn.Module, args: Any, output: Any) -> None:
        saved, self.saved = self.saved, {}
        state: Any = block
        for attr, value in saved.items():
            setattr(state, attr, value)
        return None


class _CallCache:
    """What one call of a stage layer keeps between stages of the delta layout."""

    __slots__ = ("inputs", "out", "shape", "positions", "pads")

    def __init__(
        self,
        inputs: torch.Tensor | None,
        out: torch.Tensor | None,
        shape: list[int],
        positions: int,
        pads: tuple[int, ...] | None,
    ) -> None:
        self.inputs = inputs  # inputs of the stages so far, stage-major (non-logits layers)
        self.out = out  # accumulated output (logits layers)
        self.shape = shape  # output shape with the channel dim set to 0
        self.positions = positions
        self.pads = pads


def _layer_kind(name: str, module: nn.Module) -> tuple[str, bool]:
    """("conv" | "linear", dynamic same-padding) for a layer the runtime can slice."""
    kind = type(module)
    from_timm = kind.__module__.startswith("timm.")
    if isinstance(module, nn.Conv2d):
        if kind.forward is nn.Conv2d.forward:
            return "conv", False
        if from_timm and kind.__name__ == "Conv2dSame":
            return "conv", True
    elif isinstance(module, nn.Linear):
        if kind.forward is nn.Linear.forward or (from_timm and kind.__name__ == "Linear"):
            return "linear", False
    else:
        raise UnsupportedModelError(
            [(name, f"{kind.__name__} is not an nn.Conv2d or nn.Linear; the runtime only slices those layers")]
        )
    raise UnsupportedModelError(
        [
            (
                name,
                f"{kind.__module__}.{kind.__qualname__} overrides forward(); the "
                "runtime replaces the layer by sliced F.conv2d/F.linear calls and "
                "cannot know what the custom forward does",
            )
        ]
    )


class _StageLayer(nn.Module):
    """A Conv2d/Linear that computes, at stage ``s``, only the synapses that stage activates."""

    bias: torch.Tensor | None

    def __init__(
        self,
        plan: LayerPlan,
        module: nn.Module,
        num_subnets: int,
        state: _RunState,
        *,
        full: bool = True,
        delta: bool = True,
    ) -> None:
        super().__init__()
        kind, same_dynamic = _layer_kind(plan.name, module)
        self.layer_name = plan.name
        self.kind = kind
        self.is_logits = bool(plan.is_logits)
        #: return a copy of the cached output: set by the probe when the model modifies this
        #: layer's output in place; always for accumulating layers (their output is usually the
        #: model's output, which the caller may modify; copying logits is cheap)
        self.copy_out = self.is_logits
        self._state = state
        weight = cast(torch.Tensor, module.weight).detach()
        if plan.prune_mask is not None:
            if tuple(plan.prune_mask.shape) != tuple(weight.shape):
                raise ValueError(
                    f"layer {plan.name!r}: prune_mask has shape {tuple(plan.prune_mask.shape)}, "
                    f"the weight {tuple(weight.shape)}; pass a weight-shaped bool mask"
                )
            weight = weight * plan.prune_mask.to(device=weight.device, dtype=weight.dtype)
        module_bias = cast("torch.Tensor | None", module.bias)
        bias = module_bias.detach().clone() if module_bias is not None else None
        self.register_buffer("bias", bias)
        self.weight_shape = tuple(int(d) for d in weight.shape)
        self.out_channels = self.weight_shape[0]
        self._channel_dim = -3 if kind == "conv" else -1
        self._same_dynamic = same_dynamic
        self._pad_mode = "constant"
        self._static_pads: tuple[int, ...] | None = None
        if kind == "conv":
            assert isinstance(module, nn.Conv2d)
            self.in_channels = int(module.in_channels)
            self.groups = int(module.groups)
            self.kernel_size = tuple(int(k) for k in module.kernel_size)
            self.stride = tuple(int(v) for v in module.stride)
            self.dilation = tuple(int(v) for v in module.dilation)
            self.padding: Any = (
                module.padding if isinstance(module.padding, str) else tuple(int(v) for v in module.padding)
            )
            if module.padding_mode != "zeros":
                # nn.Conv2d pads explicitly for these modes, then convolves without padding.
                self._static_pads = tuple(int(v) for v in module._reversed_padding_repeated_twice)
                self._pad_mode = module.padding_mode
                self.padding = (0, 0)
            if same_dynamic:
                self.padding = (0, 0)
        else:
            self.in_channels = self.weight_shape[1]
            self.groups = 1
        a_out, col_assign = self._check_plan(plan, weight, num_subnets)
        prune = plan.prune_mask.to(torch.bool).cpu() if plan.prune_mask is not None else None
        # Plans of the layouts the runner may use (``"auto"`` needs both for its check).
        self._stages: list[_Stage | None] = [cast("_Stage | None", None)] + [
            self._build_stage(plan, weight, bias, prune, a_out, col_assign, s, num_subnets, delta=False)
            if full
            else None
            for s in range(1, num_subnets + 1)
        ]
        self._delta: list[_DeltaStage | None] = [cast("_DeltaStage | None", None)] + [
            cast(
                _DeltaStage, self._build_stage(plan, weight, bias, prune, a_out, col_assign, s, num_subnets, delta=True)
            )
            if delta
            else None
            for s in range(1, num_subnets + 1)
        ]
        self._cache: list[torch.Tensor | None] = []
        self._call_info: list[tuple[int, tuple[int, ...] | None]] = []
        self._delta_cache: list[_CallCache] = []
        #: calls in the current model forward (a list: nn.Module.__setattr__ is slow per call)
        self._calls = [0]
        #: caches of earlier stages handed in by IncrementalRunner.resume_stage, by call
        self._preload: dict[int, torch.Tensor] | None = None

    # ------------------------------------------------------------------ planning
    def _check_plan(self, plan: LayerPlan, weight: torch.Tensor, num_subnets: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Validate a plan; returns a_out and the input assignment per conv group ``[G, in/G]``."""
        out, width = weight.shape[0], weight.shape[1]
        groups = self.groups
        a_out, a_in = plan.a_out.to(torch.long).cpu(), plan.a_in.to(torch.long).cpu()
        if a_out.dim() != 1 or a_out.numel() != out:
            raise ValueError(
                f"layer {plan.name!r}: a_out must have one entry per output channel "
                f"({out}), got shape {tuple(a_out.shape)}"
            )
        if a_in.dim() != 2 or a_in.shape[1] != width or a_in.shape[0] not in (1, out):
            raise ValueError(
                f"layer {plan.name!r}: a_in must have shape [1, {width}] or [{out}, {width}] "
                f"(one entry per weight column), got {tuple(a_in.shape)}"
            )
        for label, values in (("a_out", a_out), ("a_in", a_in)):
            low = 0 if (label == "a_out" and plan.is_logits) else 1
            if values.numel() and (int(values.min()) < low or int(values.max()) > num_subnets + 1):
                raise ValueError(
                    f"layer {plan.name!r}: {label} has values in [{int(values.min())}, "
                    f"{int(values.max())}], allowed are {low}..{num_subnets + 1}"
                )
        if a_in.shape[0] == 1:
            return a_out, a_in.expand(groups, width)
        grouped = a_in.reshape(groups, out // groups, width)
        if not bool((grouped == grouped[:, :1]).all()):
            raise ValueError(
                f"layer {plan.name!r}: a_in must be the same for all output channels of a "
                "conv group (it describes the inputs, not the outputs)"
            )
        return a_out, grouped[:, 0, :]

    def _build_stage(
        self,
        plan: LayerPlan,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        prune: torch.Tensor | None,
        a_out: torch.Tensor,
        col_assign: torch.Tensor,
        s: int,
        num_subnets: int,
        delta: bool,
    ) -> _Stage:
        """Kernel calls of stage ``s``: conv groups bucketed by (new rows, active inputs).

        Full-width layout: a kernel reads its input channels from the full-width input and writes
        its rows into the full-width output. Delta layout: a layer reads the delta of its input
        (channels with index ``== s``, ascending). A non-logits layer appends it to the inputs it
        kept from earlier stages (stage-major: stage 1's channels, then stage 2's, ...), computes
        its new rows from all of them (weight columns permuted to that order here, once) and
        returns only its new output channels, ascending; a logits layer adds the delta's
        contribution to its output. The two differ only in where a kernel finds its input
        channels and puts its rows.
        """
        out, width = weight.shape[0], weight.shape[1]
        groups = self.groups
        rows_per = out // groups
        in_assign = col_assign.reshape(-1)  # per input channel
        n_in = int((in_assign == s).sum())
        in_start = int((in_assign < s).sum())
        if plan.is_logits:
            row_new = torch.ones(groups, rows_per, dtype=torch.bool)
            col_ok = col_assign == s
        else:
            row_new = (a_out == s).reshape(groups, rows_per)
            col_ok = col_assign <= s
        new_rows = row_new.reshape(-1)
        # Where each input channel is in the tensor the kernels read, where each row goes.
        if not delta:
            position = torch.arange(in_assign.numel())
            source_width = in_assign.numel()
            row_position = torch.arange(out)
            out_width = out
        elif plan.is_logits:
            position = torch.cumsum((in_assign == s).long(), 0) - 1
            source_width = n_in
            row_position = torch.arange(out)
            out_width = out
        else:
            active = in_assign <= num_subnets
            key = torch.where(active, in_assign, num_subnets + 1) * in_assign.numel() + torch.arange(in_assign.numel())
            order = torch.argsort(key)
            position = torch.empty_like(order)
            position[order] = torch.arange(order.numel())
            source_width = in_start + n_in
            row_position = torch.cumsum(new_rows.long(), 0) - 1
            out_width = int(new_rows.sum())
        n_rows = row_new.sum(1)
        n_cols = col_ok.sum(1)
        kernel = weight.shape[2:]
        kernel_numel = int(math.prod(kernel))
        buckets: list[_Bucket] = []
        entries = 0
        covered = 0
        signatures = sorted({(r, c) for r, c in zip(n_rows.tolist(), n_cols.tolist()) if r > 0 and c > 0})
        for r_count, c_count in signatures:
            member = (n_rows == r_count) & (n_cols == c_count)  # conv groups in the bucket
            k = int(member.sum())
            group_ids = member.nonzero().flatten()
            local_rows = (row_new & member.unsqueeze(1)).nonzero()[:, 1].reshape(k, r_count)
            rows = group_ids.unsqueeze(1) * rows_per + local_rows  # [k, R] global rows
            cols = (col_ok & member.unsqueeze(1)).nonzero()[:, 1].reshape(k, c_count)  # [k, C] local
            # Columns in the order the source tensor holds them.
            cols = torch.gather(cols, 1, torch.argsort(position[group_ids.unsqueeze(1) * width + cols], dim=1))
            flat_rows = rows.flatten()
            w_rows = weight.index_select(0, flat_rows.to(weight.device)).reshape(k, r_count, width, kernel_numel)
            gather = cols.to(weight.device).reshape(k, 1, c_count, 1).expand(k, r_count, c_count, kernel_numel)
            w_slice = torch.gather(w_rows, 2, gather).reshape(k * r_count, c_count, *kernel).contiguous()
            if prune is None:
                entries += k * r_count * c_count * kernel_numel
            else:
                p_rows = prune.index_select(0, flat_rows).reshape(k, r_count, width, kernel_numel)
                entries += int(torch.gather(p_rows, 2, gather.cpu()).sum())
            inputs = position[group_ids.unsqueeze(1) * width + cols].flatten()
            in_idx: torch.Tensor | None = inputs
            if groups == 1 and c_count == source_width and torch.equal(inputs, torch.arange(c_count)):
                in_idx = None
            outputs = row_position[flat_rows]
            out_idx: torch.Tensor | None = outputs
            if k * r_count == out_width and torch.equal(outputs, torch.arange(out_width)):
                out_idx = None
            b_slice = None
            if bias is not None and not plan.is_logits:
                b_slice = bias.index_select(0, flat_rows.to(bias.device)).contiguous()
            buckets.append(_Bucket(in_idx, out_idx, w_slice, b_slice, k, rows, cols))
            covered += k * r_count
        bias_rows = bias_values = None
        if not plan.is_logits and bias is not None:
            empty = (n_rows > 0) & (n_cols == 0)
            if bool(empty.any()):
                # New neurons without any active input output their bias (no multiply).
                found = (row_new & empty.unsqueeze(1)).nonzero()
                rows_found = found[:, 0] * rows_per + found[:, 1]
                bias_rows = row_position[rows_found]
                bias_values = bias.index_select(0, rows_found.to(bias.device)).contiguous()
        if not delta:
            return _Stage(buckets, bias_rows, bias_values, entries)
        direct = (
            not plan.is_logits
            and len(buckets) == 1
            and buckets[0].out_idx is None
            and covered == out_width
            and bias_rows is None
        )
        return _DeltaStage(buckets, bias_rows, bias_values, entries, n_in, in_start, in_start + n_in, out_width, direct)

    def stage_is_idle(self, s: int, delta: bool) -> bool:
        """True when stage ``s`` computes and writes nothing in this layer (in the given layout)."""
        if delta:
            plan = self._delta[s]
            assert plan is not None
            return not plan.buckets and (self.is_logits or plan.n_new == 0)
        stage = self._stages[s]
        assert stage is not None
        return not stage.buckets and stage.bias_rows is None

    def _stage_plans(self) -> list[_Stage] | list[_DeltaStage]:
        full = [stage for stage in self._stages[1:] if stage is not None]
        if full:
            return full
        return [stage for stage in self._delta[1:] if stage is not None]

    def stage_entries(self) -> list[int]:
        """Active weight entries computed at each stage (index 0 unused)."""
        return [0] + [stage.entries for stage in self._stage_plans()]

    def dense_weight(self) -> torch.Tensor:
        """The full weight rebuilt from the stage slices (never-active entries are zero)."""
        plans = self._stage_plans()
        device = self.bias.device if self.bias is not None else None
        dtype = self.bias.dtype if self.bias is not None else None
        for stage in plans:
            if stage.buckets:
                device, dtype = stage.buckets[0].weight.device, stage.buckets[0].weight.dtype
                break
        full = torch.zeros(self.weight_shape, device=device, dtype=dtype or torch.float32)
        kernel = self.weight_shape[2:]
        for stage in plans:
            for b in stage.buckets:
                k, r_count = b.rows.shape
                c_count = b.cols.shape[1]
                rows = b.rows.to(full.device).reshape(k, r_count, 1)
                cols = b.cols.to(full.device).reshape(k, 1, c_count)
                full[rows, cols] = b.weight.reshape(k, r_count, c_count, *kernel)
        return full

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> _StageLayer:
        super()._apply(fn, recurse)
        for stage in [*self._stages[1:], *self._delta[1:]]:
            if stage is not None:
                stage.apply(fn)
        self.reset()
        return self

    def reset(self) -> None:
        # In place: nn.Module.__setattr__ is slow, and this runs for every layer at every start.
        self._cache.clear()
        self._call_info.clear()
        self._delta_cache.clear()
        self._calls[0] = 0
        self._preload = None

    def caches(self) -> tuple[list[Any], list[Any], list[Any]]:
        """Copies of the per-call caches (see :meth:`restore_caches`)."""
        return list(self._cache), list(self._call_info), list(self._delta_cache)

    def restore_caches(self, saved: tuple[list[Any], list[Any], list[Any]]) -> None:
        self._cache[:], self._call_info[:], self._delta_cache[:] = saved
        self._calls[0] = 0

    def keep_layout(self, delta: bool) -> None:
        """Free the plans of the layout not chosen (the runner keeps one)."""
        if delta:
            self._stages = [None] * len(self._stages)
        else:
            self._delta = [None] * len(self._delta)

    def preload(self, tensors: Mapping[int, torch.Tensor] | None) -> None:
        """Caches of the stages before the next forward's stage, by call (see
        :meth:`IncrementalRunner.resume_stage`): a call's kept inputs (stage-major) or, for a
        logits layer, its accumulated output; a call without an entry has kept no input yet.
        ``None`` ends the hand-over."""
        self._preload = None if tensors is None else dict(tensors)

    def _take_preloaded(self, call: int) -> None:
        assert self._preload is not None
        cache = self._delta_cache[call]
        kept = self._preload.get(call)
        if self.is_logits:
            if kept is None:
                raise ValueError(
                    f"no accumulated output given for call {call} of the logits layer "
                    f"{self.layer_name!r}; pass the state that stage_state() returned"
                )
            cache.out = kept
        else:
            cache.inputs = kept

    def delta_cached(self) -> list[torch.Tensor | None]:
        """Per call of the last forward (delta layout): the inputs kept so far (stage-major), or
        the accumulated output of a logits layer; ``None`` where nothing is kept yet."""
        return [cache.out if self.is_logits else cache.inputs for cache in self._delta_cache]

    def delta_stage_io(self, s: int) -> tuple[bool, bool, bool]:
        """Delta layout, stage ``s``: (it keeps inputs of earlier stages, it computes from them,
        it receives new input channels)."""
        plan = self._delta[s]
        if plan is None:
            raise ValueError(f"layer {self.layer_name!r} has no delta-layout plan (the runner uses layout='full')")
        if self.is_logits:
            return s > 1, s > 1, plan.n_in > 0
        return plan.in_start > 0, bool(plan.buckets), plan.n_in > 0

    def delta_stage_empty(self, s: int) -> bool:
        """True when the delta layout returns an empty tensor from this layer at stage ``s``."""
        delta = self._delta[s]
        return delta is not None and not self.is_logits and delta.n_new == 0

    # ------------------------------------------------------------------- running
    def _pads(self, x: torch.Tensor) -> tuple[int, ...] | None:
        if self._static_pads is not None:
            return self._static_pads
        if self._same_dynamic:
            ih, iw = int(x.shape[-2]), int(x.shape[-1])
            pads = []
            for size, k, st, d in zip((ih, iw), self.kernel_size, self.stride, self.dilation):
                pads.append(max((math.ceil(size / st) - 1) * st + (k - 1) * d + 1 - size, 0))
            pad_h, pad_w = pads
            return (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2)
        return None

    def _output_shape(self, x: torch.Tensor, pads: tuple[int, ...] | None) -> list[int]:
        """Full-width output shape for a full-width input ``x``."""
        if (
            x.dim() == 0
            or x.shape[self._channel_dim] != self.in_channels
            or (self.kind == "conv" and x.dim() not in (3, 4))
        ):
            expected = f"[..., {self.in_channels}]" if self.kind == "linear" else f"[batch, {self.in_channels}, H, W]"
            raise ValueError(f"layer {self.layer_name!r} expects input {expected}, got shape {tuple(x.shape)}")
        shape = self._delta_shape(x, pads)
        shape[self._channel_dim] = self.out_channels
        return shape

    def _per_sample(self, shape: Sequence[int]) -> int:
        """Output positions per sample of the model's input (a model may fold space into the
        batch, as MobileViT's transformer does with its patches)."""
        others = [int(d) for k, d in enumerate(shape) if k != self._channel_dim % len(shape)]
        return int(math.prod(others)) // max(self._state.batch, 1)

    def _allocate(self, x: torch.Tensor) -> torch.Tensor:
        pads = self._pads(x)
        shape = self._output_shape(x, pads)
        positions = self._per_sample(shape)
        self._call_info.append((positions, pads))
        # A normal (not inference-mode) tensor: it has a version counter, so in-place changes
        # by the model's own code after this layer are detected.
        with torch.inference_mode(False):
            out = torch.zeros(shape, dtype=x.dtype, device=x.device)
            if self.is_logits and self.bias is not None:
                view = [1] * len(shape)
                view[self._channel_dim] = self.out_channels
                out += self.bias.to(x.dtype).reshape(view)
        return out

    def _kernel(
        self, x: torch.Tensor, b: _Bucket, bias: torch.Tensor | None, pads: tuple[int, ...] | None
    ) -> torch.Tensor:
        xs = x if b.in_idx is None else x.index_select(self._channel_dim, b.in_idx)
        if self.kind == "linear":
            return F.linear(xs, b.weight, bias)
        if pads is not None:
            xs = F.pad(xs, pads, mode=self._pad_mode)
        return F.conv2d(xs, b.weight, bias, self.stride, self.padding, self.dilation, b.groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        call = self._calls[0]  # the how-many-th call of this layer in this forward
        self._calls[0] = call + 1
        if self._state.delta:
            return self._forward_delta(x, call)
        return self._forward_full(x, call)

    def _delta_shape(self, x: torch.Tensor, pads: tuple[int, ...] | None) -> list[int]:
        """Output shape for input ``x`` of any channel count, channel dim set to 0."""
        if self.kind == "linear":
            return [*x.shape[:-1], 0]
        if x.dim() not in (3, 4):
            raise ValueError(
                f"layer {self.layer_name!r} expects input [batch, channels, H, W], got shape {tuple(x.shape)}"
            )
        sizes = [int(x.shape[-2]), int(x.shape[-1])]
        if pads is not None:
            sizes = [sizes[0] + pads[2] + pads[3], sizes[1] + pads[0] + pads[1]]
        if self.padding == "same":
            spatial = sizes
        else:
            padding = (0, 0) if self.padding == "valid" else self.padding
            spatial = [
                (size + 2 * p - d * (k - 1) - 1) // st + 1
                for size, p, d, k, st in zip(sizes, padding, self.dilation, self.kernel_size, self.stride)
            ]
        return [*x.shape[:-3], 0, *spatial]

    def _delta_allocate(self, x: torch.Tensor) -> _CallCache:
        pads = self._pads(x)
        shape = self._delta_shape(x, pads)
        positions = self._per_sample(shape)
        if self.is_logits:
            full = list(shape)
            full[self._channel_dim] = self.out_channels
            out = torch.zeros(full, dtype=x.dtype, device=x.device)
            if self.bias is not None:
                view = [1] * len(full)
                view[self._channel_dim] = self.out_channels
                out += self.bias.to(x.dtype).reshape(view)
            return _CallCache(None, out, shape, positions, pads)
        return _CallCache(None, None, shape, positions, pads)

    def _forward_delta(self, x: torch.Tensor, call: int) -> torch.Tensor:
        state = self._state
        s = state.stage
        stage = self._delta[s]
        assert stage is not None
        dim = self._channel_dim
        width = int(x.shape[dim]) if x.dim() > 0 else -1
        if width != stage.n_in:
            if stage.n_in != 0:
                raise LayoutMismatchError(
                    f"layer {self.layer_name!r} got {width} input channels at stage {s}, but subnet {s} "
                    f"gives it {stage.n_in}: either the input does not fit the model (check its shape) "
                    "or the model's forward selects or reorders channels (build the runner with "
                    "layout='full')"
                )
            # Nothing of this stage reaches the layer: what it got is the model input fed again
            # (every stage runs the model on the original input), which belongs to stage 1.
        if call == len(self._delta_cache):
            if s > 1 and self._preload is None:
                raise RuntimeError(
                    f"layer {self.layer_name!r} has no cached output of the earlier stages "
                    "(was runner.model moved or reset directly?); call runner.start(x) again"
                )
            self._delta_cache.append(self._delta_allocate(x))
            if s > 1 and self._preload is not None:
                self._take_preloaded(call)
        cache = self._delta_cache[call]
        pads = cache.pads
        state.positions[self.layer_name] = state.positions.get(self.layer_name, 0) + cache.positions
        state.macs += stage.entries * cache.positions
        if self.is_logits:
            out = cache.out
            assert out is not None
            if stage.n_in:
                for b in stage.buckets:
                    y = self._kernel(x, b, None, pads)
                    out = out + y if b.out_idx is None else out.index_add(dim, b.out_idx, y)
                cache.out = out
            return out.clone()
        source = cache.inputs
        if stage.n_in:
            # A new contiguous tensor per stage (a convolution over a channel slice of a larger
            # buffer runs at half speed); the first stage keeps the model's own tensor, which the
            # layout check makes sure no later op modifies in place.
            source = x if source is None else torch.cat([source, x], dim)
            cache.inputs = source
        # a stage with buckets has inputs: this one's or the kept ones
        inputs = cast(torch.Tensor, source)
        if stage.direct:
            b = stage.buckets[0]
            return self._kernel(inputs, b, b.bias, pads)
        shape = list(cache.shape)
        shape[dim] = stage.n_new
        if stage.n_new == 0:
            return x.new_empty(shape)
        out = x.new_zeros(shape)
        for b in stage.buckets:
            y = self._kernel(inputs, b, b.bias, pads)
            if b.out_idx is None:
                out.copy_(y)
            else:
                out.index_copy_(dim, b.out_idx, y)
        if stage.bias_rows is not None:
            assert stage.bias_values is not None
            view = [1] * len(shape)
            view[dim] = stage.bias_rows.numel()
            count = list(shape)
            count[dim] = stage.bias_rows.numel()
            out.index_copy_(dim, stage.bias_rows, stage.bias_values.to(out.dtype).reshape(view).expand(count))
        return out

    def _forward_full(self, x: torch.Tensor, call: int) -> torch.Tensor:
        state = self._state
        s = state.stage
        if call == len(self._cache):
            if s > 1:
                raise RuntimeError(
                    f"layer {self.layer_name!r} has no cached output of the earlier stages "
                    "(was runner.model moved or reset directly?); call runner.start(x) again"
                )
            self._cache.append(self._allocate(x))
        out = self._cache[call]
        assert out is not None
        positions, pads = self._call_info[call]
        state.positions[self.layer_name] = state.positions.get(self.layer_name, 0) + positions
        plan = self._stages[s] if s > 0 else None
        if plan is not None:
            state.macs += plan.entries * positions
            if self.is_logits:
                for b in plan.buckets:
                    y = self._kernel(x, b, None, pads)
                    out = out + y if b.out_idx is None else out.index_add(self._channel_dim, b.out_idx, y)
                self._cache[call] = out
            else:
                for b in plan.buckets:
                    y = self._kernel(x, b, b.bias, pads)
                    if b.out_idx is None:
                        out.copy_(y)
                    else:
                        out.index_copy_(self._channel_dim, b.out_idx, y)
                if plan.bias_rows is not None:
                    assert plan.bias_values is not None
                    shape = list(out.shape)
                    shape[self._channel_dim] = plan.bias_rows.numel()
                    view = [1] * len(shape)
                    view[self._channel_dim] = plan.bias_rows.numel()
                    values = plan.bias_values.to(out.dtype).reshape(view).expand(shape)
                    out.index_copy_(self._channel_dim, plan.bias_rows, values)
        if state.probe:
            with torch.inference_mode(False):
                probe = out.clone()
            state.watch.append((self, probe, probe._version, True))
            return probe
        if self.copy_out:
            return out.clone()
        if not out.is_inference():
            state.watch.append((self, out, out._version, False))
        return out

    def extra_repr(self) -> str:
        return (
            f"{self.layer_name!r}, kind={self.kind}, weight={self.weight_shape}, groups={self.groups}, "
            f"logits={self.is_logits}"
        )


def _random_like(inputs: Any, batch: int) -> Any:
    """Random inputs with the shapes (batch replaced), dtypes and structure of ``inputs``."""
    generator = torch.Generator().manual_seed(0)

    def make(item: Any) -> Any:
        if isinstance(item, torch.Tensor) and item.is_floating_point() and item.dim() > 0:
            shape = (batch, *item.shape[1:])
            return torch.randn(shape, generator=generator, dtype=item.dtype).to(item.device)
        return item

    return tree_map(make, inputs)


def _clone_tensors(obj: Any) -> Any:
    """Copies of the tensors in a (nested) tuple/list/dict output; other objects as they are."""
    if isinstance(obj, torch.Tensor):
        return obj.clone()
    if isinstance(obj, (list, tuple)):
        items = [_clone_tensors(item) for item in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)
    if isinstance(obj, dict):
        return type(obj)((key, _clone_tensors(value)) for key, value in obj.items())
    return obj


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


class IncrementalRunner:
    """Anytime inference over the nested subnets of a :class:`~nni_steppingnet.SteppingNet`.

    ``runner.start(x)`` computes subnet 1 and returns its logits; every ``runner.step()`` computes
    only the neurons the next subnet adds, reusing what earlier stages cached, and returns that
    subnet's logits. The runner works on its own plain copy of the model (eval mode; unstructured
    pruning masks baked in), so later changes to ``net`` do not affect it.

    ``layout``: ``"auto"`` (default: the delta layout, checked once on a random input of the
    net's example shape, else the full-width layout), ``"delta"`` (unchecked) or ``"full"``; see
    the module docstring. :attr:`layout` says which one runs.

    Attributes:
        model: the runner's copy of the model, with Conv2d/Linear layers replaced by stage layers.
        num_subnets: N.
    """

    model: nn.Module
    num_subnets: int

    def __init__(self, net: SteppingNet, *, layout: str = "auto") -> None:
        if not hasattr(net, "plain_copy") or not hasattr(net, "layer_assignment"):
            raise TypeError(
                f"IncrementalRunner expects a SteppingNet, got {type(net).__name__}; to load "
                "a saved runner use IncrementalRunner.load(path, model)"
            )
        flat = net.flat_assignment()
        plans = []
        for k, layer in enumerate(net.layers):
            a_out, a_in = net.layer_assignment(k, flat)
            prune = net.prune_masks.get(layer.name)
            plans.append(
                LayerPlan(
                    name=layer.name,
                    is_logits=layer.is_logits,
                    a_out=a_out.clone(),
                    a_in=a_in.clone(),
                    prune_mask=None if prune is None else prune.bool().cpu(),
                    positions=int(layer.positions),
                )
            )
        channels = {
            name: flat[positions].clone()
            for name, positions in [*net.channel_modules.items(), *net.channel_parameters.items()]
        }
        tokens = {token.name: flat[token.positions].clone() for token in net.token_mixing}
        model = net.plain_copy()
        self._setup(
            model,
            plans,
            net.num_subnets,
            _shape_key(net.example_inputs),
            channels,
            layout,
            sample=_random_like(net.example_inputs, batch=2),
            token_mixing=tokens,
        )

    # ------------------------------------------------------------- construction
    @classmethod
    def from_plan(
        cls,
        model: nn.Module,
        plans: Sequence[LayerPlan],
        num_subnets: int,
        *,
        channel_assignments: Mapping[str, torch.Tensor] | None = None,
        reference_shape: _ShapeKey | None = None,
        layout: str = "auto",
        token_mixing: Mapping[str, torch.Tensor] | None = None,
    ) -> IncrementalRunner:
        """Build a runner from a plain ``model`` (taken over and modified in place) and its plans.

        ``channel_assignments`` maps every module with per-channel parameters or buffers
        (BatchNorm, ...) to the subnet index of each of its channels (the delta layout slices
        them). ``reference_shape`` is the input shape (without batch) at which
        ``plans[*].positions`` were counted; it lets :meth:`macs` answer before the first run, and
        the ``"auto"`` layout is verified on a random input of that shape (else on the first input).
        ``token_mixing`` maps every token-mixing Linear (:mod:`~nni_steppingnet.token_mixing`) to
        the subnet index of each channel it runs over (``SteppingNet.token_mixing``).
        """
        runner = cls.__new__(cls)
        sample = None
        if reference_shape is not None:
            shapes = tuple(torch.empty(1, *shape) for shape in reference_shape)
            sample = _random_like(shapes[0] if len(shapes) == 1 else shapes, batch=2)
        runner._setup(
            model,
            plans,
            num_subnets,
            reference_shape,
            dict(channel_assignments or {}),
            layout,
            sample=sample,
            token_mixing=dict(token_mixing or {}),
        )
        return runner

    def _setup(
        self,
        model: nn.Module,
        plans: Sequence[LayerPlan],
        num_subnets: int,
        reference_shape: _ShapeKey | None,
        channel_assignments: dict[str, torch.Tensor],
        layout: str,
        sample: Any = None,
        token_mixing: dict[str, torch.Tensor] | None = None,
    ) -> None:
        token_mixing = dict(token_mixing or {})
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {', '.join(map(repr, LAYOUTS))}, got {layout!r}")
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if isinstance(num_subnets, bool) or not isinstance(num_subnets, int) or num_subnets < 1:
            raise ValueError(f"num_subnets must be a positive int, got {num_subnets!r}")
        names = [p.name for p in plans]
        if len(set(names)) != len(names):
            raise ValueError("plans name a layer twice; give one LayerPlan per Conv2d/Linear layer")
        if not any(p.is_logits for p in plans):
            raise ValueError("no plan is marked is_logits; the classifier's plan needs is_logits=True")
        self.model = model.eval()
        self.num_subnets = num_subnets
        self._fingerprint = architecture_fingerprint(model)
        self._plans = [
            LayerPlan(
                p.name,
                p.is_logits,
                p.a_out.clone(),
                p.a_in.clone(),
                None if p.prune_mask is None else p.prune_mask.clone(),
                int(p.positions),
            )
            for p in plans
        ]
        self._state = _RunState()
        modules = dict(model.named_modules())
        nested = {
            name: kind
            for name in channel_assignments
            if name in modules and (kind := norm_kind(modules[name])) is not None
        }
        plan_of = {p.name: p for p in self._plans}
        unknown = [name for name, m in modules.items() if is_head_attention(m) and not runs_stage_by_stage(m)]
        if unknown:
            raise UnsupportedModelError(
                [
                    (
                        name,
                        f"{type(modules[name]).__name__} has its own attention forward (rotary embeddings, "
                        "or a form the runner does not know); the runner computes new heads stage by stage "
                        "for timm's vision_transformer.Attention (ViT, DeiT), MetaFormer's and DaViT's "
                        "attention, Swin's WindowAttention, EfficientFormer's and TinyViT's Attention, "
                        "SAM's Attention without rotary embeddings and AttentionRope only: use the masked "
                        "subnets or export_subnet(s)",
                    )
                    for name in unknown[:8]
                ]
            )
        layouts = {
            name: cast(HeadLayout, head_layout(m))
            for name, m in modules.items()
            if is_head_attention(m) and f"{name}.qkv" in plan_of
        }
        # subnet index of every head: that of its first q channel
        heads = {name: plan_of[f"{name}.qkv"].a_out[layout.first_channels()] for name, layout in layouts.items()}
        for name, index in token_mixing.items():
            module = modules.get(name)
            if not isinstance(module, nn.Linear):
                raise ValueError(f"token-mixing entry for {name!r}, but the model has no such Linear")
            if index.dim() != 1:
                raise ValueError(f"token-mixing entry of {name!r} must be a 1-D tensor of subnet indices")
        layers: list[_StageLayer] = []
        for plan in self._plans:
            module = modules.get(plan.name)
            if module is None:
                raise ValueError(f"plan for layer {plan.name!r}, but the model has no such module")
            layers.append(
                _StageLayer(plan, module, num_subnets, self._state, full=layout != "delta", delta=layout != "full")
            )
        missing = [
            n
            for n, m in modules.items()
            if isinstance(m, (nn.Conv2d, nn.Linear)) and n not in set(names) and n not in token_mixing
        ]
        if missing:
            raise ValueError(
                f"no plan for the Conv2d/Linear layers {missing[:5]}; every weighted layer "
                "needs one (they would compute the full layer at every stage)"
            )
        for plan, layer in zip(self._plans, layers):
            _replace(model, plan.name, layer)
        self._layers = layers
        layer_plans = {id(layer): plan for plan, layer in zip(self._plans, layers)}
        self._splits = [
            _StageSplits(block, layer_plans, self._state) for block in model.modules() if has_fixed_splits(block)
        ]
        self._attention: list[_StageAttention] = []
        for name, head_index in heads.items():
            block = _StageAttention(modules[name], head_index, layouts[name], self._state, name)
            _replace(model, name, block)
            self._attention.append(block)
        self._tokens: list[_StageTokenLinear] = []
        for name, index in token_mixing.items():
            token = _StageTokenLinear(cast(nn.Linear, modules[name]), index, self._state, name)
            _replace(model, name, token)
            self._tokens.append(token)
        self._reference_shape = reference_shape
        self._positions: dict[_ShapeKey, dict[str, int]] = {}
        # Attention's token pairs are learnt from a forward (below), not stored in the plans.
        if (
            reference_shape is not None
            and all(p.positions > 0 for p in self._plans)
            and not self._attention
            and not self._tokens
        ):
            self._positions[reference_shape] = {p.name: int(p.positions) for p in self._plans}
        self._entries = {layer.layer_name: layer.stage_entries() for layer in layers}
        for block in self._attention:
            # per stage: its new heads (positions: the MACs of one head per sample)
            self._entries[block.block_name] = [int((block.head_index == t).sum()) for t in range(num_subnets + 1)]
        for token in self._tokens:
            self._entries[token.layer_name] = token.entries(num_subnets)
        self._channel_assignments = {name: a.to(torch.long).cpu().clone() for name, a in channel_assignments.items()}
        self._slicers: list[ChannelSlicer] = []
        parameters = dict(model.named_parameters())
        for name, assignment in self._channel_assignments.items():
            module = modules.get(name)
            parameter = None
            if module is None and name in parameters:
                owner, _, parameter = name.rpartition(".")
                module = model.get_submodule(owner) if owner else model
            if module is None:
                raise ValueError(f"channel assignment for {name!r}, but the model has no such module or parameter")
            if assignment.dim() != 1 or (
                assignment.numel() and (int(assignment.min()) < 1 or int(assignment.max()) > num_subnets + 1)
            ):
                raise ValueError(
                    f"channel assignment of {name!r} must be a 1-D tensor of subnet indices in 1..{num_subnets + 1}"
                )
            if name in nested:
                continue  # a _StageNorm below: it slices its own parameters per stage
            self._slicers.append(ChannelSlicer(module, assignment, num_subnets, parameter))
        self._norms: list[_StageNorm] = []
        for name, kind in nested.items():
            norm = _StageNorm(modules[name], kind, self._channel_assignments[name], self._state, name)
            _replace(model, name, norm)
            self._norms.append(norm)
        #: stages where the delta layout hands some op a tensor with zero channels
        self._empty_stages = [False] + [
            any(layer.delta_stage_empty(s) for layer in layers) for s in range(1, num_subnets + 1)
        ]
        self._layout: str | None = None
        #: why the runner uses the full-width layout ("" for the delta layout or before a choice)
        self._full_because = "layout='full' was requested" if layout == "full" else ""
        self._layout_checked = True  # the layout check itself runs unwrapped errors
        self._idle = [False] * (num_subnets + 1)
        self._output: Any = None
        self._inputs: Any = None
        self._key: _ShapeKey | None = None
        self._stage = 0
        self._batch = 0
        self._macs_spent = 0
        if layout != "auto":
            self._use_layout(layout)
        elif sample is not None:
            self._choose_layout(sample)
        if (self._attention or self._tokens) and sample is not None:
            self._learn_positions(sample)
        logger.debug(
            "runner built: %d stage layers, %d subnets, layout %s",
            len(layers),
            num_subnets,
            self._layout or "auto (chosen at the first input)",
        )

    # ---------------------------------------------------------------- layout
    @property
    def layout(self) -> str | None:
        """``"delta"`` or ``"full"`` (``None`` until an ``"auto"`` runner has seen an input)."""
        return self._layout

    @property
    def full_layout_reason(self) -> str:
        """Why this runner uses the full-width layout (what it holds that the delta layout does
        not support, the delta check's finding, or that ``layout="full"`` was asked for); ``""``
        for the delta layout."""
        return self._full_because if self._layout == "full" else ""

    def _use_layout(self, layout: str, checked: bool = False) -> None:
        delta = layout == "delta"
        self._layout_checked = checked
        self._layout = layout
        self._state.delta = delta
        for layer in self._layers:
            layer.keep_layout(delta)
        #: stages that change no cached value at all (no new synapse, no bias-only neuron)
        self._idle = [False] + [
            all(layer.stage_is_idle(s, delta) for layer in self._layers) for s in range(1, self.num_subnets + 1)
        ]
        self.reset()

    def _outputs_of_every_stage(self, sample: Any, delta: bool) -> list[list[torch.Tensor]]:
        self.reset()
        self._state.delta = delta
        self._inputs, self._key, self._batch = sample, _shape_key(sample), batch_size(sample)
        try:
            return [[t.clone() for t in _tensors_of(self._forward(s))] for s in range(1, self.num_subnets + 1)]
        finally:
            self.reset()

    def _choose_layout(self, sample: Any) -> None:
        """Use the delta layout if it reproduces the full-width layout on ``sample``, else the
        full-width one. The delta layout assumes that the model's forward never selects or reorders
        channels by position (``x[:, :k]``, ``split``, channel shuffle) and that every module with
        per-channel tensors is known; the check finds models that break this."""
        reason = ""
        device = next((t.device for t in self.model.parameters()), None) or next(
            (t.device for t in self.model.buffers()), None
        )
        if device is not None:
            # The check input follows the model (a net wrapped on the CPU, then moved to CUDA).
            sample = tree_map(
                lambda t: t.to(device) if isinstance(t, torch.Tensor) and t.is_floating_point() else t, sample
            )
        try:
            with torch.inference_mode():
                reference = self._outputs_of_every_stage(sample, delta=False)
                candidate = self._outputs_of_every_stage(sample, delta=True)
            for s, (ref, got) in enumerate(zip(reference, candidate), start=1):
                if len(ref) != len(got) or any(r.shape != g.shape for r, g in zip(ref, got)):
                    reason = f"subnet {s} outputs have other shapes"
                    break
                for r, g in zip(ref, got):
                    scale = float(r.abs().max()) if r.numel() else 0.0
                    if r.numel() and float((r - g).abs().max()) > _LAYOUT_RTOL * max(scale, 1e-6):
                        reason = f"subnet {s} outputs differ by {float((r - g).abs().max()):.3e}"
                        break
                if reason:
                    break
        except (LayoutMismatchError, RuntimeError, ValueError, IndexError, TypeError) as exc:
            reason = f"{type(exc).__name__}: {exc}"
        if reason:
            logger.info(
                "the delta layout does not fit this model (%s); using the full-width layout, "
                "whose element-wise work grows with the number of stages",
                reason,
            )
            self._full_because = f"the delta layout does not reproduce the full one here ({reason})"
            self._use_layout("full", checked=True)
        else:
            self._use_layout("delta", checked=True)

    # ----------------------------------------------------------------- state
    @property
    def stage(self) -> int:
        """The subnet whose logits the last call returned (0 before :meth:`start`)."""
        return self._stage

    @property
    def batch_size(self) -> int:
        return self._batch

    @property
    def macs_spent(self) -> int:
        """MACs per sample computed since :meth:`start`: equals ``net.macs(stage)``."""
        return self._macs_spent

    @property
    def macs_spent_total(self) -> int:
        """MACs computed since :meth:`start` for the whole batch."""
        return self._macs_spent * self._batch

    @property
    def plans(self) -> list[LayerPlan]:
        return list(self._plans)

    @property
    def reference_shape(self) -> _ShapeKey | None:
        """Shapes (without batch) of the inputs the plans' MACs were counted at, if known."""
        return self._reference_shape

    def assignment_hash(self) -> str:
        """SHA-256 of what defines the stages: the architecture fingerprint, the number of
        subnets, every layer plan (subnet indices of outputs and weight columns, pruning masks)
        and the per-channel assignments of BatchNorm-like modules; not the weight values."""
        digest = hashlib.sha256()
        digest.update(repr((self.num_subnets, self._fingerprint)).encode())
        for plan in self._plans:
            digest.update(repr((plan.name, plan.is_logits)).encode())
            tensors = [plan.a_out, plan.a_in] + ([] if plan.prune_mask is None else [plan.prune_mask])
            for tensor in tensors:
                values = tensor.detach().to(device="cpu", dtype=torch.int64).contiguous()
                digest.update(repr(tuple(values.shape)).encode())
                digest.update(values.numpy().tobytes())
        for name in sorted(self._channel_assignments):
            values = self._channel_assignments[name].to(torch.int64).contiguous()
            digest.update(name.encode())
            digest.update(values.numpy().tobytes())
        for token in sorted(self._tokens, key=lambda t: t.layer_name):
            digest.update(f"token:{token.layer_name}".encode())
            digest.update(
                token.channel_index.detach().to(device="cpu", dtype=torch.int64).contiguous().numpy().tobytes()
            )
        return digest.hexdigest()

    def export_onnx(self, directory: str | os.PathLike[str], **kwargs: Any) -> Path:
        """Write one ONNX graph per stage and a manifest to ``directory`` (delta layout); see
        :func:`nni_steppingnet.onnx_export.export_onnx` for the options. Needs ``onnx``."""
        from .onnx_export import export_onnx

        return export_onnx(self, directory, **kwargs)

    def _positions_for(self, inputs: Any) -> dict[str, int]:
        if inputs is not None:
            key = _shape_key(inputs)
            if key not in self._positions:
                self._learn_positions(inputs)
            return self._positions[key]
        for known in (self._key, self._reference_shape):
            if known is not None and known in self._positions:
                return self._positions[known]
        raise RuntimeError(
            "MAC counts depend on the input size and none is known yet; pass inputs, "
            "run runner.start(x) once, or build the runner with a reference_shape"
        )

    def macs(self, s: int, inputs: Any = None) -> int:
        """MACs per sample of subnet ``s`` (cumulative over stages 1..s) for the size of ``inputs``
        (default: the input of the current run, else the reference input)."""
        self._check_stage(s, "s")
        positions = self._positions_for(inputs)
        return int(
            sum(entries[t] * positions[name] for name, entries in self._entries.items() for t in range(1, s + 1))
        )

    def step_macs(self, s: int, inputs: Any = None) -> int:
        """MACs per sample of the step from subnet ``s - 1`` to ``s`` (``macs(1)`` for ``s == 1``)."""
        self._check_stage(s, "s")
        positions = self._positions_for(inputs)
        return int(sum(entries[s] * positions[name] for name, entries in self._entries.items()))

    def _check_stage(self, s: Any, label: str) -> None:
        if isinstance(s, bool) or not isinstance(s, int) or not 1 <= s <= self.num_subnets:
            raise ValueError(f"{label} must be an int in 1..{self.num_subnets}, got {s!r}")

    def reset(self) -> None:
        """Forget the current input and every cached activation."""
        for layer in self._layers:
            layer.reset()
        for block in getattr(self, "_attention", ()):
            block.reset()
        for token in getattr(self, "_tokens", ()):
            token.reset()
        for norm in getattr(self, "_norms", ()):
            norm.reset()
        self._inputs = None
        self._output = None
        self._stage = 0
        self._macs_spent = 0
        self._batch = 0

    def to(self, *args: Any, **kwargs: Any) -> IncrementalRunner:
        """Move the runner (weights, slices, index tensors) like ``nn.Module.to``; resets it."""
        self.model.to(*args, **kwargs)
        self.reset()
        return self

    # --------------------------------------------------------------- running
    def _forward(self, stage: int) -> Any:
        state = self._state
        state.stage = stage
        state.batch = batch_size(self._inputs)
        state.macs = 0
        state.positions = {}
        state.watch = []
        for layer in self._layers:
            layer._calls[0] = 0
        for token in self._tokens:
            token._calls[0] = 0
        for norm in self._norms:
            norm._calls[0] = 0
        delta = state.delta and stage > 0
        slicers = self._slicers if delta else []
        ok = False
        try:
            for slicer in slicers:
                slicer.swap(stage)
            with torch.no_grad(), EmptyChannelsMode() if delta and self._empty_stages[stage] else nullcontext():
                try:
                    output = call_model(self.model, self._inputs)
                except (RuntimeError, ValueError, IndexError) as exc:
                    if not delta or self._layout_checked or isinstance(exc, LayoutMismatchError):
                        raise
                    raise LayoutMismatchError(
                        f"stage {stage} failed in the delta layout, which was forced without the check "
                        f"(layout='delta'): {type(exc).__name__}: {exc}; build the runner with "
                        "layout='auto' (checks the delta layout and falls back) or layout='full'"
                    ) from exc
            ok = True
        finally:
            for slicer in slicers:
                slicer.restore()
            if not ok:
                self.reset()
        corrupted = []
        for layer, tensor, version, probed in state.watch:
            if tensor._version != version:
                if probed:
                    layer.copy_out = True
                    logger.debug("layer %s: the model modifies its output in place; returning copies", layer.layer_name)
                else:
                    corrupted.append(layer.layer_name)
        state.watch = []
        if state.probe:
            state.probe = False
        if corrupted:
            for layer in self._layers:
                if layer.layer_name in corrupted:
                    layer.copy_out = True
            self.reset()
            raise RuntimeError(
                f"the model modified the cached outputs of {corrupted[:5]} in place at "
                f"stage {stage} (not seen when the runner probed the model); these layers "
                "now return copies: call runner.start(x) again"
            )
        assert self._key is not None
        self._positions[self._key] = dict(state.positions)
        return output

    def start(self, x: Any) -> Any:
        """Reset the caches, compute subnet 1 on ``x`` and return its output (logits)."""
        batch = batch_size(x)
        if self._layout is None:
            self._choose_layout(_random_like(x, batch=batch))
        self.reset()
        self._inputs = x
        self._key = _shape_key(x)
        self._batch = batch
        output = self._forward(1)
        self._stage = 1
        self._macs_spent = self._state.macs
        self._keep_output(output)
        return output

    def step(self) -> Any:
        """Extend the current subnet by one stage and return the new subnet's output (logits)."""
        if self._stage == 0:
            raise RuntimeError("runner.step() called before runner.start(x); call start(x) first")
        if self._stage >= self.num_subnets:
            raise RuntimeError(
                f"runner is already at the last subnet ({self.num_subnets}); call runner.start(x) for a new input"
            )
        if self._idle[self._stage + 1]:
            # Nothing any layer would compute or write: rerunning the model would reproduce the
            # previous output exactly, so skip the elementwise work as well.
            self._stage += 1
            output = self._output
            self._keep_output(output)
            return _clone_tensors(output)
        output = self._forward(self._stage + 1)
        self._stage += 1
        self._macs_spent += self._state.macs
        self._keep_output(output)
        return output

    def _keep_output(self, output: Any) -> None:
        """Keep a private copy of ``output`` when the next stage is idle (it returns it again)."""
        following = self._stage + 1
        idle = following <= self.num_subnets and self._idle[following]
        self._output = _clone_tensors(output) if idle else None

    def _learn_positions(self, x: Any) -> None:
        """Record the output sizes for ``x``'s shape with a forward that multiplies nothing
        (stage 0); the current run (caches, stage, input) is left as it was."""
        batch_size(x)
        saved_layers = [layer.caches() for layer in self._layers]
        saved_heads = [block.heads for block in self._attention]
        saved_tokens: list[list[torch.Tensor]] = [token.caches() for token in self._tokens]
        saved = (self._inputs, self._key, self._stage, self._batch, self._macs_spent)
        for layer in self._layers:
            layer.reset()
        for token in self._tokens:
            token.reset()
        self._inputs, self._key = x, _shape_key(x)
        delta, self._state.delta = self._state.delta, False
        try:
            self._forward(0)
        finally:
            self._state.delta = delta
            for layer, caches in zip(self._layers, saved_layers):
                layer.restore_caches(caches)
            for block, heads in zip(self._attention, saved_heads):
                block.heads = heads
            for token, kept in zip(self._tokens, saved_tokens):
                token.restore_caches(kept)
            self._inputs, self._key, self._stage, self._batch, self._macs_spent = saved

    def run(
        self,
        x: Any,
        until: int | None = None,
        *,
        deadline_s: float | None = None,
        max_macs: int | None = None,
    ) -> Any:
        """Compute up to subnet ``until`` (default N), or as far as a budget allows.

        ``deadline_s``: wall-clock seconds from the call; after each stage the next step's time
        is predicted from the measured seconds per MAC of the stages run so far, but never below
        the shortest stage so far (a step reruns the model's forward, whose per-op cost dominates
        at small batches), and the run stops before a step predicted to overrun. Subnet 1 always runs (a warning is logged when it
        alone exceeds the deadline). ``max_macs``: MACs per sample; stops before a step that would
        exceed it (``ValueError`` if subnet 1 alone exceeds it). Give at most one of the three.
        Returns the output of the last subnet reached; ``runner.stage`` says which.
        """
        given = [
            name
            for name, value in (("until", until), ("deadline_s", deadline_s), ("max_macs", max_macs))
            if value is not None
        ]
        if len(given) > 1:
            raise ValueError(f"give at most one of until, deadline_s, max_macs (got {', '.join(given)})")
        if until is not None:
            self._check_stage(until, "until")
            output = self.start(x)
            while self._stage < until:
                output = self.step()
            return output
        if max_macs is not None:
            if isinstance(max_macs, bool) or not isinstance(max_macs, int) or max_macs <= 0:
                raise ValueError(f"max_macs must be a positive int (MACs per sample), got {max_macs!r}")
            first = self.macs(1, x)
            if first > max_macs:
                raise ValueError(
                    f"max_macs={max_macs:,} is below subnet 1's {first:,} MACs per sample; allow at least {first:,}"
                )
            output = self.start(x)
            while self._stage < self.num_subnets and self._macs_spent + self.step_macs(self._stage + 1) <= max_macs:
                output = self.step()
            return output
        if deadline_s is not None:
            if (
                isinstance(deadline_s, bool)
                or not isinstance(deadline_s, (int, float))
                or not math.isfinite(deadline_s)
                or deadline_s <= 0
            ):
                raise ValueError(f"deadline_s must be a positive number of seconds, got {deadline_s!r}")
            return self._run_deadline(x, float(deadline_s))
        output = self.start(x)
        while self._stage < self.num_subnets:
            output = self.step()
        return output

    def _sync(self) -> None:
        tensors = _tensors_of(self._inputs)
        if tensors and tensors[0].is_cuda:
            torch.cuda.synchronize(tensors[0].device)

    def _run_deadline(self, x: Any, deadline_s: float) -> Any:
        begin = time.perf_counter()
        end = begin + deadline_s
        output = self.start(x)
        self._sync()
        now = time.perf_counter()
        if now > end:
            logger.warning("subnet 1 alone took %.4f s, over the deadline of %.4f s", now - begin, deadline_s)
        spent_time = now - begin
        spent_macs = self._macs_spent
        # Every stage runs the model's whole forward: at small batches its per-op cost, not its
        # MACs, sets a floor under a step's time, so no step is predicted shorter than the
        # shortest stage so far.
        shortest = spent_time
        while self._stage < self.num_subnets:
            next_macs = self.step_macs(self._stage + 1)
            predicted = max(spent_time / max(spent_macs, 1) * next_macs, shortest) if next_macs else 0.0
            if now + predicted > end:
                logger.debug(
                    "deadline: stopping at subnet %d (next step predicted %.4f s, %.4f s left)",
                    self._stage,
                    predicted,
                    end - now,
                )
                break
            step_begin = now
            output = self.step()
            self._sync()
            now = time.perf_counter()
            if next_macs:
                shortest = min(shortest, now - step_begin)
            spent_time += now - step_begin
            spent_macs += next_macs
        return output

    # ----------------------------------------------------------- stage state
    def _keepers(self) -> list[_StageLayer | _StageNorm]:
        """Everything that keeps tensors for later stages in the delta layout."""
        return [*self._layers, *self._norms]

    def _kept_names(self) -> list[tuple[_StageLayer | _StageNorm, int, str]]:
        if self._layout != "delta":
            raise ValueError(
                f"the stage state exists in the delta layout only; this runner uses "
                f"layout={self._layout!r} (build it with layout='auto' or 'delta')"
            )
        if self._stage == 0:
            raise RuntimeError("the stage state is known after a run; call runner.start(x) first")
        return [
            (layer, call, f"{layer.layer_name}:{call}")
            for layer in self._keepers()
            for call in range(len(layer.delta_cached()))
        ]

    def stage_state(self) -> dict[str, torch.Tensor]:
        """What the current run keeps for later stages (delta layout), by name ``"<layer>:<call>"``:
        the inputs a layer call received so far (channels stage-major) or, for a logits layer, its
        accumulated output. :meth:`resume_stage` continues a run from it; the ONNX stage graphs
        (:mod:`nni_steppingnet.onnx_export`) read and write these tensors."""
        state = {}
        for layer, call, name in self._kept_names():
            tensor = layer.delta_cached()[call]
            if tensor is not None:
                state[name] = tensor
        return state

    def stage_io(self, s: int) -> tuple[list[str], list[str]]:
        """Names of the :meth:`stage_state` tensors stage ``s`` reads, and of those it writes
        that a later stage reads (delta layout; the names are known after a run)."""
        self._check_stage(s, "s")
        reads, writes = [], []
        for layer, _, name in self._kept_names():
            io = [layer.delta_stage_io(t) for t in range(1, self.num_subnets + 1)]
            keeps, computes, new = io[s - 1]
            written = new and any(later[1] for later in io[s:])
            if keeps and (computes or written):
                reads.append(name)
            if written:
                writes.append(name)
        return reads, writes

    def resume_stage(self, x: Any, s: int, state: Mapping[str, torch.Tensor]) -> Any:
        """Compute stage ``s`` on ``x`` from ``state``, the :meth:`stage_state` of a run of the
        same input after stage ``s - 1`` (at least the tensors :meth:`stage_io` says stage ``s``
        reads), and return its output; the run then continues with :meth:`step`. The work is
        exactly stage ``s``'s (its stage graph for export), and the control flow does not depend
        on tensor values, so a trace of this call is that stage."""
        self._check_stage(s, "s")
        if self._layout is None:
            self._choose_layout(_random_like(x, batch=batch_size(x)))
        if self._layout != "delta":
            raise ValueError(f"resume_stage needs the delta layout; this runner uses layout={self._layout!r}")
        self.reset()
        if s > 1:
            by_layer: dict[str, dict[int, torch.Tensor]] = {layer.layer_name: {} for layer in self._keepers()}
            for name, tensor in state.items():
                layer_name, _, call = name.rpartition(":")
                if layer_name not in by_layer or not call.isdigit():
                    raise ValueError(
                        f"state entry {name!r} names no layer call of this runner; pass "
                        "what runner.stage_state() returned"
                    )
                by_layer[layer_name][int(call)] = tensor
            for keeper in self._keepers():
                keeper.preload(by_layer[keeper.layer_name])
        self._inputs = x
        self._key = _shape_key(x)
        self._batch = batch_size(x)
        try:
            output = self._forward(s)
        finally:
            for keeper in self._keepers():
                keeper.preload(None)
        self._stage = s
        self._macs_spent = self.macs(s)
        self._keep_output(output)
        return output

    # ------------------------------------------------------------------ I/O
    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the runner to one file (atomically; the folder is created if needed): format
        tag, architecture fingerprint, per-layer plans (subnet indices of every output channel and
        weight column, pruning masks, reference output positions) and the weights. Entries that
        no subnet uses are stored as zeros. Load it with :meth:`load` into a freshly built model."""
        target = Path(path)
        if target.is_dir():
            raise ValueError(f"{target} is a directory; pass a file path such as {target / 'runner.pt'}")
        state = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
        for layer in self._layers:
            state[f"{layer.layer_name}.weight"] = layer.dense_weight().detach().cpu()
        payload = {
            "format": RUNTIME_FORMAT,
            "num_subnets": self.num_subnets,
            "fingerprint": [[name, kind, tensors] for name, kind, tensors in self._fingerprint],
            "plans": [p.to_dict() for p in self._plans],
            "channel_assignments": {name: a.clone() for name, a in self._channel_assignments.items()},
            "token_mixing": {t.layer_name: t.channel_index.detach().cpu().clone() for t in self._tokens},
            "reference_shape": None if self._reference_shape is None else [list(s) for s in self._reference_shape],
            "state_dict": state,
        }
        atomic_write(target, lambda handle: torch.save(payload, handle))
        logger.info("saved runner (%d subnets, %d layers) to %s", self.num_subnets, len(self._layers), target)

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        model: nn.Module,
        *,
        map_location: str | torch.device = "cpu",
        layout: str = "auto",
    ) -> IncrementalRunner:
        """Rebuild a runner saved with :meth:`save` on ``model``, a freshly built model of the same
        definition (e.g. ``timm.create_model(...)``), which the runner takes over.

        Raises :class:`~nni_steppingnet.CheckpointError` when the file is not a runner file or was
        saved from a different model definition.
        """
        source = Path(path)
        if not source.is_file():
            raise FileNotFoundError(f"runner file {source} does not exist")
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a freshly built nn.Module, got {type(model).__name__}")
        try:
            payload = torch.load(source, map_location=map_location, weights_only=True)
        except Exception as exc:  # torch.load raises many types on foreign files; name the cause
            raise CheckpointError(f"{source} is not a readable runner file: {type(exc).__name__}: {exc}") from exc
        if not isinstance(payload, dict) or payload.get("format") not in _READABLE_FORMATS:
            found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
            raise CheckpointError(
                f"{source} is not a runner file (format {found!r}, expected "
                f"{RUNTIME_FORMAT!r}); write one with IncrementalRunner.save(path)"
            )
        _compare_fingerprints(payload["fingerprint"], architecture_fingerprint(model))
        try:
            model.load_state_dict(payload["state_dict"], strict=True)
        except RuntimeError as exc:
            raise CheckpointError(f"weights in {source} do not fit this model: {exc}") from exc
        plans = [LayerPlan.from_dict(d) for d in payload["plans"]]
        reference = payload.get("reference_shape")
        key = None if reference is None else tuple(tuple(int(d) for d in s) for s in reference)
        return cls.from_plan(
            model,
            plans,
            int(payload["num_subnets"]),
            reference_shape=key,
            layout=layout,
            channel_assignments=payload.get("channel_assignments") or {},
            token_mixing=payload.get("token_mixing") or {},
        )

    def __repr__(self) -> str:
        return f"IncrementalRunner(num_subnets={self.num_subnets}, layers={len(self._layers)}, stage={self._stage})"
