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
rooted at ``qkv``). :func:`head_of_channel` folds that group's channel indices into head indices,
as torch-pruning's own pruners do with ``num_heads={qkv: H}``.

Supported: timm's ``vision_transformer.Attention`` layout (ViT, DeiT, and every model whose
attention has a fused ``qkv`` Linear with ``3 * num_heads * head_dim`` outputs, a ``proj``
Linear, and ``num_heads``/``head_dim`` attributes), without q/k normalisation, output
normalisation or gating. Other attention blocks are refused by name at wrap time.

MACs (the rule :func:`attention_macs` implements): per sample and per active head, ``q.k``
costs ``T * T * head_dim`` and ``attn.v`` another ``T * T * head_dim`` for ``T`` tokens; the
softmax and scaling cost none (as activations and BatchNorm cost none elsewhere). A head is
active in subnet ``s`` iff its index is ``<= s``. The ``qkv`` and ``proj`` Linears count as every
Linear does (active weight entries x tokens).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

__all__ = [
    "AttentionSpec",
    "is_head_attention",
    "unsupported_attention_reason",
    "head_of_channel",
    "attention_macs",
    "attention_tokens",
    "set_num_heads",
]


@dataclass
class AttentionSpec:
    """One multi-head attention block whose heads are neurons."""

    name: str
    qkv: str
    proj: str
    num_heads: int
    head_dim: int
    #: tokens per sample, from a traced forward
    tokens: int = 0

    @property
    def head_macs(self) -> int:
        """MACs per sample of one active head's ``q.k`` and ``attn.v``."""
        return attention_macs(self.tokens, 1, self.head_dim)


def _fused_layout(module: nn.Module) -> bool:
    qkv, proj = getattr(module, "qkv", None), getattr(module, "proj", None)
    heads, head_dim = getattr(module, "num_heads", None), getattr(module, "head_dim", None)
    return (
        isinstance(qkv, nn.Linear)
        and isinstance(proj, nn.Linear)
        and isinstance(heads, int)
        and isinstance(head_dim, int)
        and qkv.out_features == 3 * heads * head_dim
        and proj.in_features == heads * head_dim
    )


def unsupported_attention_reason(module: nn.Module) -> str | None:
    """Why an attention block with the fused ``qkv`` layout cannot use head neurons (``None``:
    supported, or not such a block)."""
    if not _fused_layout(module):
        return None
    for child in ("q_norm", "k_norm", "norm"):
        if not isinstance(getattr(module, child, nn.Identity()), nn.Identity):
            return (
                f"{type(module).__name__}.{child} normalises q/k or the attention output; "
                "head neurons support attention without qk_norm/scale_norm (create the model with "
                "qk_norm=False, scale_norm=False)"
            )
    if getattr(module, "gate", None) is not None:
        return f"{type(module).__name__} is gated; head neurons support ungated attention (gated=False)"
    if type(module).forward is not _timm_attention_forward():
        return (
            f"{type(module).__name__} has the fused qkv layout but its own forward (relative position "
            "bias, windows or rotary embeddings); only timm's vision_transformer.Attention forward "
            "is supported as head neurons so far"
        )
    return None


def _timm_attention_forward() -> Any:
    try:
        from timm.models.vision_transformer import Attention
    except ImportError:  # timm is a dependency; without it no module can match
        return None
    return Attention.forward


def is_head_attention(module: nn.Module) -> bool:
    """True for an attention block whose heads become neurons."""
    return _fused_layout(module) and unsupported_attention_reason(module) is None


def head_of_channel(channels: torch.Tensor, num_heads: int, head_dim: int) -> torch.Tensor:
    """Head of every ``qkv`` output channel index (``[q | k | v]``, each ``num_heads * head_dim``
    wide, head-major inside)."""
    return (channels % (num_heads * head_dim)) // head_dim


def attention_macs(tokens: int, heads: int, head_dim: int) -> int:
    """MACs per sample of ``q.k`` and ``attn.v`` for ``heads`` heads over ``tokens`` tokens."""
    return 2 * tokens * tokens * heads * head_dim


def attention_tokens(model: nn.Module, run: Any) -> dict[str, int]:
    """Tokens per sample at the input of every head-attention block, from ``run()`` (a forward)."""
    seen: dict[str, int] = {}
    handles = []
    for name, module in model.named_modules():
        if _fused_layout(module):

            def hook(mod: nn.Module, args: Any, name: str = name) -> None:
                x = args[0]
                seen[name] = int(x.shape[-2])

            handles.append(module.register_forward_pre_hook(hook))
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    return seen


def set_num_heads(module: nn.Module) -> None:
    """After torch-pruning removed whole heads from ``qkv``/``proj``: the block's head count."""
    qkv = module.qkv
    assert isinstance(qkv, nn.Linear)
    heads = qkv.out_features // (3 * int(module.head_dim))
    module.num_heads = heads
    if hasattr(module, "attn_dim"):
        module.attn_dim = heads * int(module.head_dim)
