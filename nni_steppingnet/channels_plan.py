"""Per-channel plans shared by the incremental runtime and sliced training.

Both the runtime (:mod:`nni_steppingnet.runtime`) and sliced execution
(:mod:`nni_steppingnet.sliced`) run the model's own ``forward`` on tensors that hold only some of
a layer's channels: the runtime's delta layout holds the channels with subnet index ``== s``,
sliced training the channels with index ``<= s`` (the cumulative layout), both in ascending
original channel order. Modules with per-channel parameters or buffers (BatchNorm, PReLU, a layer
scale) must then see only those channels, and ops that refuse tensors with zero channels must
still run. This module holds the pieces both need:

* :func:`channel_index` -- the channels of a stage in either layout;
* :class:`ChannelSlicer` -- swaps a module's per-channel tensors for the slices of one stage,
  detached and cached (inference) or differentiable with running statistics written back
  (training);
* :class:`EmptyChannelsMode` -- lets channel-local ops run on tensors with zero channels.
"""

from __future__ import annotations

import logging
from typing import Any, cast

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map

from ._channels import parameter_channel_dim
from .forwards import forward_owner

__all__ = ["ChannelSlicer", "EmptyChannelsMode", "channel_index", "CHANNEL_LAYOUTS"]

logger = logging.getLogger(__name__)

#: ``"delta"``: channels with index ``== s``; ``"cumulative"``: channels with index ``<= s``.
CHANNEL_LAYOUTS = ("delta", "cumulative")


def channel_index(assignment: torch.Tensor, s: int, layout: str) -> torch.Tensor:
    """Channels (ascending) a tensor holds at stage ``s``: index ``== s`` (``"delta"``) or
    ``<= s`` (``"cumulative"``), for the per-channel subnet indices ``assignment``."""
    if layout not in CHANNEL_LAYOUTS:
        raise ValueError(f"layout must be one of {CHANNEL_LAYOUTS}, got {layout!r}")
    chosen = assignment == s if layout == "delta" else assignment <= s
    return chosen.nonzero().flatten()


#: layer scales whose forward views their parameter to a shape stored at construction, by the
#: class defining ``forward`` -> that attribute (MetaFormer's ``Scale``: ``scale.view(self.shape)``)
_VIEWED_SCALES: dict[tuple[str, str], str] = {("timm.models.metaformer", "Scale"): "shape"}


class ChannelSlicer:
    """Swaps the per-channel tensors of a BatchNorm-like module for the slices of one stage.

    When a tensor holds only some channels, a module with per-channel parameters or buffers
    (BatchNorm, PReLU, ...) must see only those channels. The module's own ``forward`` runs
    unchanged; for the duration of one call its parameters and buffers whose first dimension is
    the channel count are replaced by the stage's slices. With ``parameter``, only that bare
    parameter of the module is sliced, along its channel dimension (a layer scale ``[C, 1, 1]``
    multiplied in the owner's ``forward``).

    Two uses:

    * :meth:`swap` (the runtime): detached slices, cached per device, dtype and storage, so
      moving the model invalidates them;
    * :meth:`swap_differentiable` (training): parameters are gathered with ``index_select``, so
      their gradients land in the full parameters at the sliced positions (zeros elsewhere);
      buffers are gathered copies, and :meth:`restore` writes back the ones the forward changed
      (BatchNorm's running statistics) into the sliced channels only.

    ``layout`` (:data:`CHANNEL_LAYOUTS`) chooses which channels stage ``s`` holds.

    A norm whose ``normalized_shape`` is its channel count (LayerNorm, RMSNorm over channels) gets
    the stage's channel count there for the call as well, so its own ``forward`` accepts the
    narrower input; so does a layer scale that views its parameter to a stored ``shape``
    (MetaFormer's ``Scale``).
    """

    def __init__(
        self,
        module: nn.Module,
        assignment: torch.Tensor,
        num_subnets: int,
        parameter: str | None = None,
        *,
        layout: str = "delta",
    ) -> None:
        self.module = module
        width = int(assignment.numel())
        self.index = [torch.empty(0, dtype=torch.long)] + [
            channel_index(assignment, s, layout) for s in range(1, num_subnets + 1)
        ]
        #: stages whose slice is every channel in order (nothing to swap)
        self.whole = [False] + [int(index.numel()) == width for index in self.index[1:]]
        #: (table kind, attribute name, channel dim)
        self.names: list[tuple[str, str, int]]
        if parameter is not None:
            param = module._parameters[parameter]
            if param is None:
                raise ValueError(f"parameter {parameter!r} of {type(module).__name__} is None; nothing to slice")
            self.names = [("p", parameter, parameter_channel_dim(param))]
        else:
            self.names = [
                ("p", n, 0)
                for n, t in module.named_parameters(recurse=False)
                if t is not None and t.dim() >= 1 and t.shape[0] == width
            ]
            self.names += [
                ("b", n, 0)
                for n, t in module.named_buffers(recurse=False)
                if t is not None and t.dim() >= 1 and t.shape[0] == width
            ]
        #: the attribute holding the shape the module's forward gives its channels (swapped along
        #: with the tensors): a norm's ``normalized_shape`` of its channel count, or the
        #: ``shape`` a layer scale is viewed to (:data:`_VIEWED_SCALES`, ``[C, 1, 1]``)
        self.shape_attribute: str | None = None
        attribute = _VIEWED_SCALES.get(forward_owner(module) or ("", "")) or (
            "normalized_shape" if parameter is None else None
        )
        shape = getattr(module, attribute, None) if attribute is not None else None
        if isinstance(shape, tuple) and shape and shape[0] == width and all(d == 1 for d in shape[1:]):
            self.shape_attribute = attribute
        self._saved_shape: tuple[int, ...] | None = None
        self._saved: list[tuple[str, str, Any]] = []
        #: buffers to write back after a differentiable swap: (full, slice, index, dim)
        self._written: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]] = []
        #: name -> (stamp of the module's tensor, its slice per stage)
        self._cache: dict[str, tuple[tuple[Any, ...], list[torch.Tensor]]] = {}
        self._device_index: dict[tuple[int, torch.device], torch.Tensor] = {}

    def _index(self, s: int, device: torch.device) -> torch.Tensor:
        index = self._device_index.get((s, device))
        if index is None:
            index = self._device_index[(s, device)] = self.index[s].to(device)
        return index

    def index_on(self, s: int, device: torch.device) -> torch.Tensor:
        """The channels stage ``s`` holds (ascending, long), on ``device`` (cached)."""
        return self._index(s, device)

    def _swap_shape(self, s: int) -> None:
        attribute = self.shape_attribute
        if attribute is not None:
            module = self.module
            saved = self._saved_shape = cast("tuple[int, ...]", getattr(module, attribute))
            # plain attributes (nn.Module's stubs type attributes as Tensor | Module)
            setattr(module, attribute, (int(self.index[s].numel()), *saved[1:]))

    def swap(self, s: int) -> None:
        """Replace the per-channel tensors by detached, cached slices of stage ``s``."""
        module = self.module
        self._swap_shape(s)
        saved = self._saved
        for kind, name, dim in self.names:
            table: dict[str, Any] = module._parameters if kind == "p" else module._buffers
            tensor = table[name]
            assert tensor is not None
            stamp = (tensor.data_ptr(), tensor._version, tensor.dtype, tensor.device)
            cached = self._cache.get(name)
            if cached is None or cached[0] != stamp:
                parts = [tensor.detach().index_select(dim, index.to(tensor.device)) for index in self.index]
                cached = (stamp, parts)
                self._cache[name] = cached
            saved.append((kind, name, tensor))
            table[name] = cached[1][s]

    def swap_differentiable(self, s: int) -> None:
        """Replace the per-channel tensors by slices of stage ``s`` that keep the autograd link
        to the full parameters; buffers changed by the forward are written back by
        :meth:`restore`. Does nothing when stage ``s`` holds every channel in order."""
        if self.whole[s]:
            return
        module = self.module
        self._swap_shape(s)
        for kind, name, dim in self.names:
            table: dict[str, Any] = module._parameters if kind == "p" else module._buffers
            tensor = table[name]
            if tensor is None:
                continue
            index = self._index(s, tensor.device)
            part = tensor.index_select(dim, index)
            self._saved.append((kind, name, tensor))
            if kind == "b":
                self._written.append((tensor, part, index, dim))
            table[name] = part

    def restore(self) -> None:
        """Put the full tensors back (after :meth:`swap` or :meth:`swap_differentiable`)."""
        module = self.module
        if self._saved_shape is not None:
            setattr(module, cast(str, self.shape_attribute), self._saved_shape)
            self._saved_shape = None
        for kind, name, tensor in self._saved:
            (module._parameters if kind == "p" else module._buffers)[name] = tensor
        self._saved = []
        for full, part, index, dim in self._written:
            # Always (not only when the version changed): BatchNorm updates its running
            # statistics in place without bumping the version counter. Through .data: a tracked
            # in-place write into a buffer the graph may have saved would fail at backward.
            full.data.index_copy_(dim, index, part.detach().to(full.dtype))
        self._written = []


class EmptyChannelsMode(TorchFunctionMode):
    """Lets channel-local ops run on tensors with zero channels.

    A stage may give a layer no channel; its tensors then have zero channels, and some PyTorch
    ops (``max_pool2d``, ``avg_pool2d``, ``interpolate``) refuse empty inputs. Only when such a
    call fails, it is repeated with every empty tensor widened to one zero channel and the result
    narrowed back to zero channels along the same dimension (differentiable: the narrowed result
    has no elements, so no gradient flows through the zeros). Activate the mode only for stages
    where some layer returns an empty tensor.
    """

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        try:
            return func(*args, **kwargs)
        except (RuntimeError, ValueError, IndexError):
            leaves = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
            empty = [t for t in leaves if t.numel() == 0 and t.dim() >= 2]
            if not empty:
                raise
            dims = [d for d, size in enumerate(empty[0].shape) if size == 0 and d > 0]
            if not dims:
                raise
            dim = dims[0]

            def widen(item: Any) -> Any:
                # Per-channel vectors (BatchNorm's statistics and affine) are empty as well.
                if isinstance(item, torch.Tensor) and item.numel() == 0 and item.dim() > 0:
                    shape = [1 if size == 0 else size for size in item.shape]
                    return torch.zeros(shape, dtype=item.dtype, device=item.device)
                return item

            result = func(*tree_map(widen, args), **tree_map(widen, kwargs))

            def narrow(item: Any) -> Any:
                if isinstance(item, torch.Tensor) and item.dim() > dim and item.shape[dim] == 1:
                    return item.narrow(dim, 0, 0)
                return item

            return tree_map(narrow, result)
