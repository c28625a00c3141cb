"""Exact multiply-accumulate counts for Conv2d/Linear layers."""

from __future__ import annotations

from typing import Any, cast

import torch
import torch.nn as nn

from ._inputs import batch_size, call_model, probe_forward
from .attention import HeadLayout, head_layout, is_head_attention, product_macs

__all__ = ["macs", "layer_positions"]


def layer_positions(model: nn.Module, example_inputs: Any) -> dict[str, int]:
    """Per-sample output positions (conv: H*W, linear: tokens) of every Conv2d/Linear, by name."""
    batch = batch_size(example_inputs)
    seen: dict[str, int] = {}
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):

            def hook(mod: nn.Module, args: Any, output: torch.Tensor, name: str = name) -> None:
                channels = mod.out_channels if isinstance(mod, nn.Conv2d) else cast(nn.Linear, mod).out_features
                seen[name] = seen.get(name, 0) + output.numel() // (batch * int(channels))

            handles.append(module.register_forward_hook(hook))
    probe_forward(model, example_inputs, handles)
    return seen


def macs(model: nn.Module, example_inputs: Any, *, nonzero: bool = False) -> int:
    """MACs per sample of ``model``'s Conv2d/Linear layers, plus ``q.k`` and ``attn.v`` of its
    multi-head attention blocks (:func:`~nni_steppingnet.attention.product_macs`).

    With ``nonzero=True`` only nonzero weight entries count (the work of a sparse kernel);
    otherwise every weight entry counts (the work of a dense kernel).
    """
    positions = layer_positions(model, example_inputs)
    modules = dict(model.named_modules())
    total = 0
    for name, count in positions.items():
        weight = modules[name].weight
        entries = int(torch.count_nonzero(weight)) if nonzero else weight.numel()
        total += entries * count
    heads = {name: m for name, m in model.named_modules() if is_head_attention(m)}
    if heads:
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                products = product_macs(model, lambda: call_model(model, example_inputs), batch_size(example_inputs))
        finally:
            model.train(was_training)
        for name, count in products.items():
            block = heads[name]
            if nonzero:
                # A sparse kernel skips a head whose q, k and v weights are all zero (export keeps
                # one such head in a block without active heads).
                layout = cast(HeadLayout, head_layout(block))
                rows = layout.rows_by_head(block.qkv.weight)
                count = count * int(rows.ne(0).flatten(1).any(-1).sum()) // layout.num_heads
            total += count
    return int(total)
