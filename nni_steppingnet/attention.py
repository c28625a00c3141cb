"""Multi-head self-attention as neurons: one subnet index per head.

Inside a head, ``q . k`` sums over the head's channels and ``attn . v`` mixes every token, so a
per-channel index cannot hold there; across heads nothing mixes until the output projection. The
neurons of an attention block are therefore its *heads*: head ``h`` owns its ``q``, ``k`` and
``v`` channels (``3 * head_dim`` output channels of the fused ``qkv`` Linear) and the
``head_dim`` input channels of ``proj`` that read it. The mask rule then says: head ``h`` reads
only residual channels with index ``<= a(h)``, and a residual channel ``c`` of ``proj``'s output
reads only heads with ``a(h) <= a(c)``; ``q.k`` and ``attn.v`` of head ``h`` see only its own
channels, so adding subnet ``s + 1`` never changes a head of subnet ``s``.

The coupling comes from torch-pruning's dependency graph: it maps ``qkv``'s output channels to
``proj``'s input channels through the ``reshape -> permute -> unbind`` of the forward (the group
rooted at ``qkv``). :meth:`HeadLayout.qkv_head` folds that group's channel indices into head indices,
as torch-pruning's own pruners do with ``num_heads={qkv: H}``.

Supported: every attention block with timm's fused layout: a ``qkv`` Linear with
``3 * num_heads * head_dim`` outputs (``[q | k | v]``, head-major inside each), a ``proj`` Linear
reading ``num_heads * head_dim`` features, ``num_heads``/``head_dim`` attributes, and no q/k
normalisation, output normalisation or gating; and EfficientFormer's and TinyViT's LeViT-style
blocks, whose ``qkv`` outputs one ``[q k v]`` block of ``2 * key_dim + val_dim`` channels per
head (:class:`HeadLayout`, recognised by their forward). For those torch-pruning 1.6 maps
``qkv``'s outputs to ``proj``'s inputs as the identity, past ``proj``'s width, so the graph and
export take ``proj``'s head channels from the layout instead. Whatever else its forward does per head
(relative position bias, rotary embeddings, windows) cannot mix heads if the layout holds; the
wrap-time isolation probe checks it on a random assignment, so a forward that does mix is
refused there by name. The incremental runner computes new heads stage by stage for the
forwards it knows (:func:`stage_form`): timm's ViT, MetaFormer and DaViT window attention (plain
softmax attention), Swin's ``WindowAttention`` (relative position bias per head, shifted-window
mask), EfficientFormer's and TinyViT's interleaved blocks, SAM's attention (decomposed relative
position bias from each head's ``q``), DaViT's ``ChannelAttention`` (softmax over ``k^T v``,
``head_dim x head_dim`` per head) and timm's ``AttentionRope`` with a fused ``qkv`` (rotary
embeddings of each head's q and k: Qwen3-ViT); it refuses other forwards by name. Sliced execution runs the
block's own forward on the active heads and so needs a forward whose widths follow ``num_heads``
(:func:`runs_sliced`). Other attention blocks are refused at wrap time.

MACs (the rule :func:`product_macs` implements): the matrix products of two activations that
run inside the block (``q @ k^T``, ``attn @ v``, ``scaled_dot_product_attention``), counted as
they run on the example input: ``batch x M x K x N`` for an ``[M, K] @ [K, N]`` product, and
``Tq x Tk x (D + Dv)`` per head for ``scaled_dot_product_attention``; per sample and divided
evenly over the heads. For ViT that is ``2 * T * T * head_dim`` per head for ``T`` tokens
(:func:`attention_macs`); with windows it is the windows' token pairs; SAM adds its two bias
einsums, ``T * (h + w) * head_dim`` per head on an ``h x w`` grid; DaViT's channel attention is
``2 * T * head_dim^2`` per head (:func:`stage_head_macs` gives each form's count). The softmax, scaling and
bias cost none (as activations and BatchNorm cost none elsewhere). A head is active in subnet
``s`` iff its index is ``<= s``. The ``qkv`` and ``proj`` Linears count as every Linear does
(active weight entries x tokens).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, cast

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from .forwards import runs_forward

__all__ = [
    "AttentionSpec",
    "HeadLayout",
    "head_layout",
    "is_interleaved_attention",
    "is_head_attention",
    "unsupported_attention_reason",
    "head_of_channel",
    "head_dim_of",
    "head_parameters",
    "shared_head_parameters",
    "untraced_parameters",
    "slice_head_parameters",
    "attention_macs",
    "product_macs",
    "runs_stage_by_stage",
    "runs_sliced",
    "stage_form",
    "stage_head_macs",
    "decomposed_position_bias",
    "rotary_embedded",
    "is_vit_attention",
    "is_window_attention",
    "window_position_bias",
    "head_widths",
    "clear_bias_cache",
    "set_num_heads",
    "reads_input_width",
]


@dataclass(frozen=True)
class HeadLayout:
    """Where the channels of every head are, in ``qkv``'s outputs and ``proj``'s inputs.

    *Stacked* (timm's ViT and Swin): ``qkv`` outputs ``[q | k | v]``, each ``num_heads x
    key_dim`` wide and head-major inside (``key_dim == val_dim``). *Interleaved* (EfficientFormer's
    and TinyViT's LeViT-style attention): ``qkv`` outputs one ``[q k v]`` block per head,
    ``2 * key_dim + val_dim`` wide. Either way ``proj`` reads head ``h``'s ``val_dim`` channels at
    ``h * val_dim``."""

    num_heads: int
    key_dim: int
    val_dim: int
    interleaved: bool = False

    @property
    def qkv_width(self) -> int:
        """``qkv`` output channels of one head."""
        return 2 * self.key_dim + self.val_dim

    @property
    def pair_macs(self) -> int:
        """MACs of one head per query-key token pair: ``key_dim`` for q.k, ``val_dim`` for attn.v."""
        return self.key_dim + self.val_dim

    def qkv_head(self, channels: torch.Tensor) -> torch.Tensor:
        """Head of every ``qkv`` output channel index."""
        if self.interleaved:
            return channels // self.qkv_width
        return (channels % (self.num_heads * self.key_dim)) // self.key_dim

    def proj_head(self, channels: torch.Tensor) -> torch.Tensor:
        """Head of every ``proj`` input channel index."""
        return channels // self.val_dim

    def channels_of(self, head: int) -> torch.Tensor:
        """The ``qkv`` output channels of ``head``, ascending (its q, k and v)."""
        if self.interleaved:
            return torch.arange(head * self.qkv_width, (head + 1) * self.qkv_width)
        width = self.num_heads * self.key_dim
        within = torch.arange(head * self.key_dim, (head + 1) * self.key_dim)
        return torch.cat([within + part * width for part in range(3)])

    def first_channels(self) -> torch.Tensor:
        """The first ``qkv`` output channel (a q channel) of every head."""
        step = self.qkv_width if self.interleaved else self.key_dim
        return torch.arange(self.num_heads) * step

    def rows_by_head(self, weight: torch.Tensor) -> torch.Tensor:
        """``qkv``'s weight rows grouped by head: ``[num_heads, qkv_width, in]``."""
        if self.interleaved:
            return weight.reshape(self.num_heads, self.qkv_width, -1)
        rows = weight.reshape(3, self.num_heads, self.key_dim, -1).transpose(0, 1)
        return rows.reshape(self.num_heads, self.qkv_width, -1)


@dataclass
class AttentionSpec:
    """One multi-head attention block whose heads are neurons."""

    name: str
    qkv: str
    proj: str
    #: where each head's channels are in ``qkv`` and ``proj``
    layout: HeadLayout
    #: MACs per sample of the block's activation products over all heads (:func:`product_macs`)
    macs: int = 0
    #: per-head parameters of the block (relative position bias): attribute -> head dimension
    head_params: dict[str, int] = field(default_factory=dict)

    @property
    def num_heads(self) -> int:
        return self.layout.num_heads

    @property
    def head_dim(self) -> int:
        """``proj`` input channels of one head (the value width)."""
        return self.layout.val_dim

    @property
    def head_macs(self) -> int:
        """MACs per sample of one active head's ``q.k`` and ``attn.v``."""
        return self.macs // self.num_heads


def head_dim_of(module: nn.Module) -> int | None:
    """The per-head width of a fused-qkv block: its ``head_dim`` attribute, else ``qkv``'s outputs
    over ``3 * num_heads`` (Swin's ``WindowAttention`` keeps no ``head_dim``)."""
    qkv, heads = getattr(module, "qkv", None), getattr(module, "num_heads", None)
    if not isinstance(qkv, nn.Linear) or not isinstance(heads, int) or heads < 1:
        return None
    head_dim = getattr(module, "head_dim", None)
    if isinstance(head_dim, int):
        return head_dim
    if qkv.out_features % (3 * heads):
        return None
    return qkv.out_features // (3 * heads)


#: LeViT-style attention whose qkv outputs one [q k v] block per head: (timm module, class)
_INTERLEAVED_FORWARDS = (("timm.models.efficientformer", "Attention"), ("timm.models.tiny_vit", "Attention"))


def is_interleaved_attention(module: nn.Module) -> bool:
    """True when ``module`` runs EfficientFormer's or TinyViT's attention forward (``qkv``
    reshaped to ``[B, N, heads, 2 * key_dim + val_dim]`` and split into q, k, v; a learnt bias per
    head and token offset, ``attention_biases[:, attention_bias_idxs]``; TinyViT's pre-norm)."""
    return runs_forward(module, _INTERLEAVED_FORWARDS)


def head_layout(module: nn.Module) -> HeadLayout | None:
    """The head layout of a multi-head attention block (``None``: not one this module knows).

    Interleaved blocks are recognised by their forward, never by shapes alone: an interleaved
    ``qkv`` of ``3 * heads * d`` outputs (TinyViT with ``attn_ratio=1``) fits the stacked layout's
    shapes but not its channel order."""
    qkv, proj, heads = getattr(module, "qkv", None), getattr(module, "proj", None), getattr(module, "num_heads", None)
    if not isinstance(qkv, nn.Linear) or not isinstance(proj, nn.Linear) or not isinstance(heads, int) or heads < 1:
        return None
    if is_interleaved_attention(module):
        key_dim, val_dim = getattr(module, "key_dim", None), getattr(module, "val_dim", None)
        if not (isinstance(key_dim, int) and isinstance(val_dim, int)):
            return None
        if qkv.out_features != heads * (2 * key_dim + val_dim) or proj.in_features != heads * val_dim:
            return None
        return HeadLayout(heads, key_dim, val_dim, interleaved=True)
    head_dim = head_dim_of(module)
    if head_dim is None or qkv.out_features != 3 * heads * head_dim or proj.in_features != heads * head_dim:
        return None
    return HeadLayout(heads, head_dim, head_dim)


def _fused_layout(module: nn.Module) -> bool:
    return head_layout(module) is not None


def head_parameters(module: nn.Module) -> dict[str, int]:
    """Per-head parameters held by the block itself (a relative position bias table
    ``[(2w-1)^2, H]``): attribute name -> the dimension of size ``num_heads``. Parameters with
    no such dimension, or more than one, are not listed (:func:`unsupported_attention_reason`
    names them)."""
    heads = int(cast(int, module.num_heads))
    found = {}
    # SAM's tables can have 2S - 1 == num_heads rows: shared by the heads whatever their shape
    shared = shared_head_parameters(module)
    for name, param in module.named_parameters(recurse=False):
        if name in shared:
            continue
        dims = [d for d, size in enumerate(param.shape) if size == heads]
        if len(dims) > 1 and name == "relative_position_bias_table" and is_window_attention(module):
            # Swin's table is [(2w-1)^2, heads]: 9 heads over 2x2 windows make it 9 x 9
            dims = [param.dim() - 1]
        if len(dims) == 1:
            found[name] = dims[0]
    return found


#: attention whose heads all read the same position tables (timm module, class)
_SHARED_TABLE_FORWARDS = (("timm.models.vision_transformer_sam", "Attention"),)


def shared_head_parameters(module: nn.Module) -> list[str]:
    """Parameters every head reads whole: SAM's decomposed relative position embeddings
    ``rel_pos_h``/``rel_pos_w`` (``[2S - 1, head_dim]``, multiplied with each head's ``q``).
    Heads are removed whole, never channels inside a head, so these keep their shape in every
    subnet and in export; a masked head's ``q`` is zero, so its bias is too."""
    if not runs_forward(module, _SHARED_TABLE_FORWARDS):
        return []
    return [name for name in ("rel_pos_h", "rel_pos_w") if isinstance(getattr(module, name, None), nn.Parameter)]


def untraced_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The block's per-head and shared-by-heads tensors, which torch-pruning must not trace as
    channels of whatever they are added to or multiplied with (its ``ignored_params``)."""
    names = [*head_parameters(module), *shared_head_parameters(module)]
    return [cast(nn.Parameter, getattr(module, name)) for name in names]


def unsupported_attention_reason(module: nn.Module) -> str | None:
    """Why an attention block with the fused ``qkv`` layout cannot use head neurons (``None``:
    supported, or not such a block)."""
    if not _fused_layout(module):
        return None
    # TinyViT's ``norm`` is the block's pre-norm (over its input), a nested norm like any other
    checked = ("q_norm", "k_norm") if is_interleaved_attention(module) else ("q_norm", "k_norm", "norm")
    for child in checked:
        if not isinstance(getattr(module, child, nn.Identity()), nn.Identity):
            return (
                f"{type(module).__name__}.{child} normalises q/k or the attention output; "
                "head neurons support attention without qk_norm/scale_norm (create the model with "
                "qk_norm=False, scale_norm=False)"
            )
    if getattr(module, "gate", None) is not None:
        return f"{type(module).__name__} is gated; head neurons support ungated attention (gated=False)"
    layers = [
        name
        for name, child in module.named_modules()
        if name and name not in ("qkv", "proj") and isinstance(child, (nn.Linear, nn.Conv1d, nn.Conv2d))
    ]
    if layers:
        return (
            f"{type(module).__name__} has layers besides qkv and proj ({', '.join(layers[:3])}): a relative "
            "position MLP or pooling convs are not supported as head neurons yet"
        )
    per_head = [*head_parameters(module), *shared_head_parameters(module)]
    # the layers' own parameters, and TinyViT's pre-norm (a nested norm of the residual channels)
    prefixes = ("qkv.", "proj.", "norm.") if is_interleaved_attention(module) else ("qkv.", "proj.")
    own = [name for name, _ in module.named_parameters() if not name.startswith(prefixes) and name not in per_head]
    if own:
        return (
            f"{type(module).__name__} has parameters besides qkv and proj that are not one tensor per head "
            f"({', '.join(own[:3])}): separate q/v biases or nested position modules are not supported "
            "as head neurons yet"
        )
    return None


def is_head_attention(module: nn.Module) -> bool:
    """True for an attention block whose heads become neurons."""
    return _fused_layout(module) and unsupported_attention_reason(module) is None


def is_vit_attention(module: nn.Module) -> bool:
    """True when ``module`` runs timm's ``vision_transformer.Attention`` forward (ViT, DeiT)."""
    return runs_forward(module, (("timm.models.vision_transformer", "Attention"),))


def is_window_attention(module: nn.Module) -> bool:
    """True when ``module`` runs timm's Swin ``WindowAttention`` forward: fused qkv, a relative
    position bias per head from ``relative_position_bias_table[relative_position_index]`` and the
    shifted windows' ``mask`` argument."""
    return runs_forward(module, (("timm.models.swin_transformer", "WindowAttention"),))


#: the attention forwards the incremental runner computes head by head, by how they compute:
#: (timm module, class) -> form (:func:`stage_form`)
_STAGE_FORMS: tuple[tuple[tuple[str, str], str], ...] = (
    (("timm.models.vision_transformer", "Attention"), "plain"),
    (("timm.models.metaformer", "Attention"), "plain"),
    (("timm.models.davit", "WindowAttention"), "plain"),
    (("timm.models.swin_transformer", "WindowAttention"), "window"),
    (("timm.models.efficientformer", "Attention"), "interleaved"),
    (("timm.models.tiny_vit", "Attention"), "interleaved"),
    (("timm.models.vision_transformer_sam", "Attention"), "decomposed"),
    (("timm.models.davit", "ChannelAttention"), "channel"),
    (("timm.layers.attention", "AttentionRope"), "rotary"),
)

#: forms whose timm forward takes its widths from ``num_heads`` (or infers them with ``-1``), so
#: that it runs on the active heads alone (MetaFormer and DaViT take them from the input's width)
_SLICED_FORWARDS = (
    ("timm.models.vision_transformer", "Attention"),
    ("timm.models.swin_transformer", "WindowAttention"),
    *_INTERLEAVED_FORWARDS,
    ("timm.models.vision_transformer_sam", "Attention"),
    ("timm.layers.attention", "AttentionRope"),
)


def stage_form(module: nn.Module) -> str | None:
    """How the incremental runner computes this block's heads (``None``: a forward it does not
    know, refused by name): ``"plain"`` softmax attention over tokens (timm's ViT, MetaFormer and
    DaViT window attention), ``"window"`` (Swin: a relative position bias per head and the
    shifted windows' mask), ``"interleaved"`` (EfficientFormer, TinyViT: ``[q k v]`` per head, a
    learnt bias per head and token offset), ``"decomposed"`` (SAM on a ``[B, H, W, C]`` grid: the
    bias of each head from its ``q`` and the shared ``rel_pos_h``/``rel_pos_w``; rotary
    embeddings are not computed stage by stage), ``"channel"`` (DaViT's channel attention:
    softmax over ``k^T v``) and ``"rotary"`` (timm's ``AttentionRope``, Qwen3-ViT and EVA-style
    blocks with a fused ``qkv``: the ``rope`` argument rotates each head's q and k past the
    prefix tokens, elementwise, so it costs no MACs)."""
    for forward, form in _STAGE_FORMS:
        if runs_forward(module, (forward,)):
            if form == "decomposed" and getattr(module, "rope", None) is not None:
                return None
            return form
    return None


def runs_stage_by_stage(module: nn.Module) -> bool:
    """True when the incremental runner computes this block's new heads stage by stage
    (:func:`stage_form`)."""
    return stage_form(module) is not None


def runs_sliced(module: nn.Module) -> bool:
    """True when sliced execution runs this block's own forward on its active heads (timm's ViT
    attention, Swin's window attention, EfficientFormer's and TinyViT's interleaved attention,
    SAM's attention without rotary embeddings, ``AttentionRope``: its rotary embeddings come in
    as an argument, per token)."""
    return runs_forward(module, _SLICED_FORWARDS) and getattr(module, "rope", None) is None


def stage_head_macs(form: str, layout: HeadLayout, tokens: int, grid: tuple[int, int] | None = None) -> int:
    """MACs of one head's activation products over one row of ``tokens`` tokens (a sample, or a
    window), as :func:`product_macs` counts them: ``tokens^2 * (key_dim + val_dim)`` for
    softmax attention over tokens, plus SAM's bias einsums ``tokens * (h + w) * key_dim`` on an
    ``h x w`` ``grid`` (``None``: no position tables), and ``2 * tokens * key_dim * val_dim``
    for DaViT's channel attention."""
    if form == "channel":
        return 2 * tokens * layout.key_dim * layout.val_dim
    cost = tokens * tokens * layout.pair_macs
    if form == "decomposed" and grid is not None:
        cost += tokens * (grid[0] + grid[1]) * layout.key_dim
    return cost


def rotary_embedded(
    module: nn.Module, q: torch.Tensor, k: torch.Tensor, rope: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """q and k (``[rows, heads, tokens, key_dim]``) rotated by ``rope`` past the block's prefix
    tokens, as timm's ``AttentionRope`` does (``num_prefix_tokens``, ``rotate_half``)."""
    from timm.layers import apply_rot_embed_cat

    prefix = int(getattr(module, "num_prefix_tokens", 0))
    half = bool(getattr(module, "rotate_half", False))

    def rotated(t: torch.Tensor) -> torch.Tensor:
        turned = apply_rot_embed_cat(t[:, :, prefix:, :], rope, half=half)
        return torch.cat([t[:, :, :prefix, :], turned], dim=2)

    return rotated(q), rotated(k)


def decomposed_position_bias(module: nn.Module, q: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """SAM's attention bias of the heads in ``q`` (``[rows, heads, tokens, key_dim]`` on an
    ``h x w`` ``grid``): timm's ``get_decomposed_rel_pos_bias`` with the block's shared tables
    ``rel_pos_h``/``rel_pos_w``, ``[rows, heads, tokens, tokens]``."""
    from timm.models.vision_transformer_sam import get_decomposed_rel_pos_bias

    rows, heads, tokens, dim = q.shape
    bias = get_decomposed_rel_pos_bias(
        q.reshape(rows * heads, tokens, dim),
        cast(torch.Tensor, module.rel_pos_h),
        cast(torch.Tensor, module.rel_pos_w),
        grid,
        grid,
    )
    return bias.reshape(rows, heads, tokens, tokens)


def window_position_bias(module: nn.Module) -> torch.Tensor:
    """Swin's relative position bias of every head, ``[num_heads, N, N]`` for windows of ``N``
    tokens (what ``WindowAttention`` adds to ``q.k``)."""
    table = cast(torch.Tensor, module.relative_position_bias_table)
    index = cast(torch.Tensor, module.relative_position_index)
    tokens = index.shape[0]
    return table[index.reshape(-1)].reshape(tokens, tokens, -1).permute(2, 0, 1)


def head_of_channel(channels: torch.Tensor, num_heads: int, head_dim: int) -> torch.Tensor:
    """Head of every ``qkv`` output channel index (``[q | k | v]``, each ``num_heads * head_dim``
    wide, head-major inside): :meth:`HeadLayout.qkv_head` of the stacked layout."""
    return HeadLayout(num_heads, head_dim, head_dim).qkv_head(channels)


def attention_macs(tokens: int, heads: int, head_dim: int) -> int:
    """MACs per sample of ``q.k`` and ``attn.v`` for ``heads`` heads over ``tokens`` tokens."""
    return 2 * tokens * tokens * heads * head_dim


_PRODUCTS = {
    torch.matmul,
    torch.Tensor.matmul,
    torch.Tensor.__matmul__,
    torch.bmm,
    torch.Tensor.bmm,
    torch.baddbmm,
    torch.einsum,
    F.scaled_dot_product_attention,
}


def _product_cost(func: Any, args: Any, kwargs: Any) -> int:
    """MACs of one product of two activations (0 for an op it does not count)."""
    tensors = [a for a in (*args, *(kwargs or {}).values()) if isinstance(a, torch.Tensor)]
    if func is F.scaled_dot_product_attention:
        q, k, v = tensors[:3]
        return math.prod(q.shape[:-2]) * q.shape[-2] * k.shape[-2] * (q.shape[-1] + v.shape[-1])
    if func is torch.einsum:
        return _einsum_cost(args[0], tensors[:2]) if isinstance(args[0], str) and len(tensors) >= 2 else 0
    a, b = tensors[0], tensors[-1]
    if func is torch.baddbmm:
        a, b = tensors[1], tensors[2]
    if a.dim() < 2 or b.dim() < 2:
        return 0
    batch = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    return math.prod(batch) * a.shape[-2] * a.shape[-1] * b.shape[-1]


def _einsum_cost(equation: str, operands: list[torch.Tensor]) -> int:
    """MACs of a two-operand einsum: output elements x the sizes of the contracted labels."""
    inputs, _, output = equation.replace(" ", "").partition("->")
    terms = inputs.split(",")[:2]
    sizes: dict[str, int] = {}
    for term, tensor in zip(terms, operands):
        letters = term.replace("...", "")
        trailing = tensor.shape[tensor.dim() - len(letters) :] if "..." in term else tensor.shape
        for letter, size in zip(letters, trailing):
            sizes[letter] = int(size)
    labels = "".join(t.replace("...", "") for t in terms)
    if not _:
        output = "".join(sorted(c for c in set(labels) if labels.count(c) == 1))
    contracted = [c for c in sizes if c not in output]
    out = torch.einsum(equation, *[torch.empty(t.shape, device="meta") for t in operands])
    return int(out.numel()) * math.prod(sizes[c] for c in contracted)


class _ProductCounter(TorchFunctionMode):
    """Adds the MACs of every product of two activations to the innermost watched block."""

    def __init__(self, parameters: set[int], stack: list[str]) -> None:
        super().__init__()
        self.parameters = parameters
        self.stack = stack
        self.macs: dict[str, int] = {}

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func in _PRODUCTS and self.stack:
            tensors = [a for a in (*args, *(kwargs or {}).values()) if isinstance(a, torch.Tensor)]
            activations = [t for t in tensors if id(t) not in self.parameters and t.dim() >= 2]
            if len(activations) >= 2:
                name = self.stack[-1]
                self.macs[name] = self.macs.get(name, 0) + _product_cost(func, args, kwargs)
        return func(*args, **(kwargs or {}))


def product_macs(model: nn.Module, run: Callable[[], Any], batch: int) -> dict[str, int]:
    """MACs per sample of the activation products inside every head-attention block, from one
    forward ``run()`` on a batch of ``batch`` samples (blocks never called are absent)."""
    parameters = {id(p) for p in model.parameters()}
    stack: list[str] = []
    handles = []
    called: set[str] = set()
    for name, module in model.named_modules():
        if is_head_attention(module):

            def enter(mod: nn.Module, args: Any, name: str = name) -> None:
                stack.append(name)
                called.add(name)

            def leave(mod: nn.Module, args: Any, output: Any) -> None:
                stack.pop()

            handles.append(module.register_forward_pre_hook(enter))
            handles.append(module.register_forward_hook(leave))
    counter = _ProductCounter(parameters, stack)
    try:
        with counter:
            run()
    finally:
        for handle in handles:
            handle.remove()
    return {name: counter.macs.get(name, 0) // batch for name in called}


#: attention whose forward takes its widths from the input's channels ``C``: ``C // num_heads`` as
#: the head width (DaViT) or ``reshape(B, N, C)`` of the heads' output (MetaFormer, BEiT), so an
#: exported block must keep as many residual channels as head channels: (timm module, class)
_INPUT_WIDTH_FORWARDS = (
    ("timm.models.davit", "WindowAttention"),
    ("timm.models.davit", "ChannelAttention"),
    ("timm.models.metaformer", "Attention"),
    ("timm.models.beit", "Attention"),
)


def reads_input_width(module: nn.Module) -> bool:
    """True when ``module``'s forward needs its input's channels to equal its heads' channels
    (:data:`_INPUT_WIDTH_FORWARDS`); export then keeps extra inactive heads or residual channels
    until they do."""
    return runs_forward(module, _INPUT_WIDTH_FORWARDS)


def head_widths(layout: HeadLayout) -> dict[str, int]:
    """The int attributes timm derives from a block's head count, with their width per head:
    ``attn_dim`` (ViT), ``attention_dim`` (MetaFormer); EfficientFormer's
    ``key_attn_dim``/``val_attn_dim`` and TinyViT's ``out_dim`` (interleaved). A block holds those
    it has."""
    widths = {"attn_dim": layout.val_dim, "attention_dim": layout.val_dim}
    if layout.interleaved:
        widths.update(key_attn_dim=layout.key_dim, val_attn_dim=layout.val_dim, out_dim=layout.val_dim)
    return widths


def clear_bias_cache(module: nn.Module) -> None:
    """Empty EfficientFormer's and TinyViT's ``attention_bias_cache`` (the gathered biases they
    keep in eval mode), after their heads changed."""
    if isinstance(getattr(module, "attention_bias_cache", None), dict):
        state: Any = module  # a plain attribute (nn.Module's stubs type attributes as Tensor | Module)
        state.attention_bias_cache = {}


def set_num_heads(module: nn.Module, layout: HeadLayout) -> None:
    """After whole heads were removed from ``qkv``/``proj``: the block's head count, the widths
    timm derives from it (:func:`head_widths`) and a cleared bias cache (:func:`clear_bias_cache`)."""
    qkv = module.qkv
    assert isinstance(qkv, nn.Linear)
    heads = qkv.out_features // layout.qkv_width
    # plain attributes of the block (nn.Module's stubs type attributes as Tensor | Module)
    state: Any = module
    state.num_heads = heads
    for attr, per_head in head_widths(layout).items():
        if isinstance(getattr(module, attr, None), int):
            setattr(state, attr, heads * per_head)
    clear_bias_cache(module)


def slice_head_parameters(module: nn.Module, dims: dict[str, int], kept: torch.Tensor) -> None:
    """Keep the ``kept`` heads of every per-head parameter (:func:`head_parameters`) in place of
    the full tensors (torch-pruning never sees them: they are its ``ignored_params``)."""
    for name, dim in dims.items():
        param = cast(nn.Parameter, getattr(module, name))
        sliced = param.detach().index_select(dim, kept.to(param.device)).clone()
        setattr(module, name, nn.Parameter(sliced, requires_grad=param.requires_grad))
