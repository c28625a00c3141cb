"""Which class's ``forward`` a module runs: how the package recognises timm's blocks.

The class that defines a module's ``forward`` decides what it computes: a subclass that only
changes ``__init__`` (metaformer's ``LayerNorm2dNoBias``) computes what its base does, a
parametrized layer (torch's generated ``Parametrized...`` class) runs its original class's
forward, and one that overrides ``forward`` must be known by its own name. Recognising by the
defining class, never by ``isinstance`` or a module's own class name, keeps such subclasses apart.
:func:`runs_forward` resolves the names it is given by import, so a class known under another
module's name (timm's ``vision_transformer.Attention`` is ``timm.layers.attention.Attention``)
matches; a module that cannot be imported matches nothing.
"""

from __future__ import annotations

import importlib
from collections.abc import Collection
from typing import Any

import torch.nn as nn

__all__ = ["forward_owner", "runs_forward"]


def forward_owner(module: nn.Module) -> tuple[str, str] | None:
    """``(module name, class name)`` of the class in ``module``'s MRO that defines ``forward``
    (``None``: no class does)."""
    for cls in type(module).__mro__:
        if "forward" in vars(cls):
            return cls.__module__, cls.__name__
    return None


def runs_forward(module: nn.Module, forwards: Collection[tuple[str, str]]) -> bool:
    """True when ``module`` runs the ``forward`` of one of the classes named ``(module name,
    class name)`` (resolved by import: re-exported names match)."""
    forward = getattr(type(module), "forward", None)
    return forward is not None and any(forward is _forward_of(name, cls) for name, cls in forwards)


def _forward_of(module_name: str, class_name: str) -> Any:
    try:
        return getattr(importlib.import_module(module_name), class_name).forward
    except (ImportError, AttributeError):  # an optional dependency without the class: no module matches
        return None
