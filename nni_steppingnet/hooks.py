"""One ordered registry for the gradient and forward hooks that act on a SteppingNet's model.

Several parts of the library hook the same tensors: the importance tracker reads the gradient of
every Conv/Linear weight and norm-layer parameter, beta suppression scales those gradients, the
running-statistics guard wraps every BatchNorm forward. Their order matters (the importance must
see the gradient *before* suppression scales it), and PyTorch runs tensor hooks in the order they
were registered. The registry installs one dispatcher per tensor or module and calls the hooks
registered through it by ascending ``priority`` (ties: registration order), whatever the order in
which their owners were created.

Priorities in use (later work picks a number relative to these):

* :data:`OBSERVE` (0): read the unscaled gradient (``ImportanceTracker``);
* :data:`SCALE` (100): return a modified gradient (``BetaSuppression``);
* :data:`GUARD` (0): forward pre/post hooks that save and restore module state
  (``RunningStatsGuard``).

A gradient hook returns ``None`` (observe) or the new gradient, which later hooks then see. A
module-swapping execution mode registers its hooks on the modules it runs through the same
registry, so the order holds there as well.
"""

from __future__ import annotations

import itertools
import logging
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn as nn

__all__ = ["HookRegistry", "HookHandle", "OutputHooks", "OBSERVE", "SCALE", "GUARD"]

logger = logging.getLogger(__name__)

#: Priority of hooks that only read the gradient as autograd produced it.
OBSERVE = 0
#: Priority of hooks that replace the gradient (they run after every observer).
SCALE = 100
#: Priority of forward hooks that save/restore module state around a forward.
GUARD = 0

GradientHook = Callable[[torch.Tensor], "torch.Tensor | None"]
ForwardPreHook = Callable[[nn.Module, Any], None]
ForwardHook = Callable[[nn.Module, Any, Any], None]


@dataclass
class _Slot:
    """The hooks of one tensor or module, and the PyTorch handles of its dispatchers."""

    entries: dict[int, tuple[int, Any]] = field(default_factory=dict)
    handles: list[Any] = field(default_factory=list)

    def ordered(self) -> list[Any]:
        return [fn for _, (_, fn) in sorted(self.entries.items(), key=lambda item: (item[1][0], item[0]))]


class HookHandle:
    """Removes one hook registered through a :class:`HookRegistry` (idempotent)."""

    def __init__(self, registry: HookRegistry, table: str, key: int, entry: int) -> None:
        self._registry = weakref.ref(registry)
        self._table = table
        self._key = key
        self._entry = entry

    def remove(self) -> None:
        registry = self._registry()
        if registry is not None:
            registry.discard(self._table, self._key, self._entry)


class HookRegistry:
    """Ordered gradient hooks per tensor and forward (pre) hooks per module.

    Owned by a :class:`~nni_steppingnet.SteppingNet` (``net.hooks``); every hook the library
    puts on the wrapped model goes through it.
    """

    def __init__(self) -> None:
        self._counter = itertools.count()
        self._tables: dict[str, dict[int, _Slot]] = {"grad": {}, "pre": {}, "post": {}}

    # ------------------------------------------------------------- registration
    def add_gradient_hook(self, tensor: torch.Tensor, hook: GradientHook, *, priority: int) -> HookHandle:
        """Call ``hook(grad)`` when the gradient of ``tensor`` is computed, in ``priority`` order."""
        if not isinstance(tensor, torch.Tensor) or not tensor.requires_grad:
            raise ValueError(f"add_gradient_hook needs a tensor that requires grad, got {type(tensor).__name__}")
        slot = self._slot("grad", tensor)
        if not slot.handles:
            slot.handles.append(tensor.register_hook(_gradient_dispatcher(slot)))
        return self._add("grad", tensor, slot, hook, priority)

    def add_forward_pre_hook(self, module: nn.Module, hook: ForwardPreHook, *, priority: int) -> HookHandle:
        """Call ``hook(module, args)`` before ``module``'s forward, in ``priority`` order."""
        slot = self._slot("pre", module)
        if not slot.handles:
            slot.handles.append(module.register_forward_pre_hook(_pre_dispatcher(slot)))
        return self._add("pre", module, slot, hook, priority)

    def add_forward_hook(self, module: nn.Module, hook: ForwardHook, *, priority: int) -> HookHandle:
        """Call ``hook(module, args, output)`` after ``module``'s forward, in ``priority`` order."""
        slot = self._slot("post", module)
        if not slot.handles:
            slot.handles.append(module.register_forward_hook(_post_dispatcher(slot)))
        return self._add("post", module, slot, hook, priority)

    def count(self) -> int:
        """Number of hooks registered now (all kinds)."""
        return sum(len(slot.entries) for table in self._tables.values() for slot in table.values())

    # ----------------------------------------------------------------- removal
    def discard(self, table: str, key: int, entry: int) -> None:
        """Remove one hook (what :meth:`HookHandle.remove` calls)."""
        slot = self._tables[table].get(key)
        if slot is None:
            return
        slot.entries.pop(entry, None)
        if not slot.entries:
            for handle in slot.handles:
                handle.remove()
            del self._tables[table][key]

    def detach_from(self, model: nn.Module) -> None:
        """Drop the dispatchers from a deep copy of a hooked model (module hooks are copied by
        reference; tensor hooks are not copied with parameters)."""
        ids = {
            handle.id for table in ("pre", "post") for slot in self._tables[table].values() for handle in slot.handles
        }
        for module in model.modules():
            for hook_id in ids:
                module._forward_pre_hooks.pop(hook_id, None)
                module._forward_hooks.pop(hook_id, None)

    def clear(self) -> None:
        """Remove every hook and dispatcher."""
        for table in self._tables.values():
            for slot in table.values():
                for handle in slot.handles:
                    handle.remove()
            table.clear()

    # ---------------------------------------------------------------- internals
    def _slot(self, table: str, target: Any) -> _Slot:
        return self._tables[table].setdefault(id(target), _Slot())

    def _add(self, table: str, target: Any, slot: _Slot, hook: Any, priority: int) -> HookHandle:
        if not callable(hook):
            raise TypeError(f"hook must be callable, got {type(hook).__name__}")
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise TypeError(f"priority must be an int (e.g. hooks.OBSERVE, hooks.SCALE), got {priority!r}")
        entry = next(self._counter)
        slot.entries[entry] = (priority, hook)
        return HookHandle(self, table, id(target), entry)


def _gradient_dispatcher(slot: _Slot) -> Callable[[torch.Tensor], torch.Tensor | None]:
    def dispatch(grad: torch.Tensor) -> torch.Tensor | None:
        changed = None
        for hook in slot.ordered():
            result = hook(grad if changed is None else changed)
            if result is not None:
                changed = result
        return changed

    return dispatch


def _pre_dispatcher(slot: _Slot) -> Callable[[nn.Module, Any], None]:
    def dispatch(module: nn.Module, args: Any) -> None:
        for hook in slot.ordered():
            hook(module, args)

    return dispatch


def _post_dispatcher(slot: _Slot) -> Callable[[nn.Module, Any, Any], None]:
    def dispatch(module: nn.Module, args: Any, output: Any) -> None:
        for hook in slot.ordered():
            hook(module, args, output)

    return dispatch


class OutputHooks:
    """Forward hooks that replace a module's output, registered straight on the modules (the
    registry's post hooks observe and cannot return a new output): the nested norms' and the
    nested weight standardisation's. Their ids let a deep copy of the model drop them."""

    def __init__(self) -> None:
        self._handles: list[Any] = []

    def add(self, module: nn.Module, hook: Callable[[nn.Module, Any, Any], Any]) -> None:
        """Register ``hook(module, args, output) -> new output or None`` on ``module``."""
        self._handles.append(module.register_forward_hook(hook))

    def hook_ids(self) -> set[int]:
        """PyTorch hook ids (to drop them from deep copies of the model)."""
        return {int(h.id) for h in self._handles}

    def detach_from(self, model: nn.Module) -> None:
        """Drop these hooks from a deep copy of the hooked model."""
        ids = self.hook_ids()
        for module in model.modules():
            for hook_id in ids:
                module._forward_hooks.pop(hook_id, None)

    def remove(self) -> None:
        """Detach the hooks (the modules compute their own forward again)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
