"""Nested normalisation: LayerNorm, RMSNorm, one-group GroupNorm and GRN that respect the subnets.

A norm over the channel dimension mixes every channel: a larger subnet's channels would change a
smaller subnet's mean and variance, so the isolation property (activations of subnet ``s`` are
identical in every larger subnet) cannot hold with the original norm. A *nested norm* normalises a
channel of subnet ``k`` with the statistics of the active channels whose index is ``<= k`` (the
"prefix" of ``k``); adding subnet ``k + 1`` never changes an earlier channel. RMSNorm is the same
without the mean; ``GroupNorm(1, C)`` takes its prefix statistics over the prefix channels *and*
every spatial position. timm's ``GlobalResponseNorm`` (ConvNeXt V2) divides a channel's spatial
L2 norm by that norm's mean over the prefix channels (:func:`_nested_response_norm`). The
per-channel affine parameters act as before.

How it is installed: at wrap time :class:`NestedNorms` registers one forward hook on every
supported norm module (no module swap, no patched ``forward``: torch-pruning, ``state_dict`` keys
and the module types stay those of the original model). The hook recomputes the output from the
module's input with the nested statistics and returns it in place of the original one. The
per-channel index is read from the net's flat assignment through
``net.assignment_cache`` at every forward, so moving neurons updates it; channels of neurons with
an index above the active subnet (inactive, zero under the masks) are neither counted in any
prefix's denominator nor summed (they come out as zeros). Under sliced execution
(:mod:`~nni_steppingnet.sliced`) the input holds only the active channels (the cumulative layout):
the hook then takes their positions from ``net.present_channels(name)`` and normalises with their
indices and affine parameters, which gives the masked result on the channels that exist. Exported subnets keep a nested norm over
their kept channels through :class:`FixedNestedNorm`, a picklable forward hook holding the kept
channels' indices.

Departure from the paper: SteppingNet (Sun et al., 2022) targets BatchNorm CNNs and does not
define a norm over channels; this is our extension. The full network no longer computes the
original norm (its channels of subnet ``k < N`` see only prefix statistics), so a pretrained
model's outputs change when it is wrapped; distillation from the original is expected to recover
it. Measured on ``convnext_atto`` (timm, random init: no pretrained weights were reachable; 100
classes, 16 random 64x64 inputs, 4 subnets, every neuron in a uniformly random subnet 1..4): the
full network's logits change by 1.37 (``ls_init_value=1e-6``, timm's default) and 1.57
(``ls_init_value=1``) relative to the largest original logit, and the top-1 class agrees with the
original on 0% and 6% of the inputs; with every channel in subnet 1 the nested norm equals the
original to 9e-7 relative. On trained weights (CIFAR-10 validation split, ``benchmarks/
nested_norm_cost.py``, three seeds, random nested assignment with every neuron active in the full
network), the nested norms themselves cost a median 2.8 points of accuracy on a patch-4 ViT and
0.4 points on convnext_atto against the same masks with the original norms (docs/results.md).

Statistics are computed per prefix with a masked two-pass mean/variance (one pass per subnet
index present, ``N`` small) rather than the cumulative sums of x and x^2 sketched in the design
notes: the result is the same prefix statistics, without the cancellation of ``E[x^2] - E[x]^2``
on channels with a large mean (equal to the original norm to float rounding when all channels
share one index).

MACs: the norms cost no MACs (as for BatchNorm); ``net.macs(s)`` counts Conv2d/Linear weights only.
"""

from __future__ import annotations

import logging
import math
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.nn as nn

from .forwards import forward_owner
from .hooks import OutputHooks

if TYPE_CHECKING:
    from .stepping import SteppingNet

__all__ = [
    "NormKind",
    "norm_kind",
    "unsupported_norm_reason",
    "nested_normalize",
    "nested_norm_output",
    "affine_parameters",
    "extend_statistics",
    "normalize_newest",
    "NestedNorms",
    "FixedNestedNorm",
    "kept_channels",
    "kept_indices",
    "install_fixed",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class NormKind:
    """How a supported norm reduces: ``dim`` is the channel dimension (1 or -1), ``rms`` skips the
    mean, ``spatial`` also reduces every dimension after the channel one (GroupNorm(1))."""

    dim: int
    rms: bool
    spatial: bool
    eps: float
    #: timm's GlobalResponseNorm (ConvNeXt V2): divides each channel's spatial L2 norm by the
    #: mean of that norm over channels, then ``x + bias + weight * x * ratio``.
    grn: bool = False
    #: timm's norm-act modules (``LayerNormAct2d``, ``GroupNorm1Act``, ...): the norm, then the
    #: module's own ``drop`` and ``act`` (elementwise), as their forward does.
    act: bool = False


# The class that defines a norm's forward decides what it computes: a subclass that only changes
# __init__ (metaformer's LayerNorm2dNoBias: bias=None) computes what its base does, while one that
# overrides forward (GroupNorm1Act appends an activation) must be known by its own name.
# (module, class) -> (channel dim, rms, spatial); the classes of _NORM_ACT_MODULE then apply
# their own drop and act.
_FORWARDS: dict[tuple[str, str], tuple[int, bool, bool]] = {
    ("torch.nn.modules.normalization", "LayerNorm"): (-1, False, False),
    ("torch.nn.modules.normalization", "RMSNorm"): (-1, True, False),
    ("torch.nn.modules.normalization", "GroupNorm"): (1, False, True),
    ("timm.layers.norm", "LayerNorm"): (-1, False, False),
    ("timm.layers.norm", "LayerNormFp32"): (-1, False, False),
    ("timm.layers.norm", "LayerNorm2d"): (1, False, False),
    ("timm.layers.norm", "LayerNorm2dFp32"): (1, False, False),
    ("timm.layers.norm", "RmsNorm"): (-1, True, False),
    ("timm.layers.norm", "RmsNormFp32"): (-1, True, False),
    ("timm.layers.norm", "RmsNorm2d"): (1, True, False),
    ("timm.layers.norm", "RmsNorm2dFp32"): (1, True, False),
    ("timm.layers.norm", "GroupNorm"): (1, False, True),
    ("timm.layers.norm", "GroupNorm1"): (1, False, True),
    ("timm.layers.norm_act", "LayerNormAct"): (-1, False, False),
    ("timm.layers.norm_act", "LayerNormActFp32"): (-1, False, False),
    ("timm.layers.norm_act", "LayerNormAct2d"): (1, False, False),
    ("timm.layers.norm_act", "LayerNormAct2dFp32"): (1, False, False),
    ("timm.layers.norm_act", "RmsNormAct"): (-1, True, False),
    ("timm.layers.norm_act", "RmsNormActFp32"): (-1, True, False),
    ("timm.layers.norm_act", "RmsNormAct2d"): (1, True, False),
    ("timm.layers.norm_act", "RmsNormAct2dFp32"): (1, True, False),
    ("timm.layers.norm_act", "GroupNormAct"): (1, False, True),
    ("timm.layers.norm_act", "GroupNorm1Act"): (1, False, True),
}
_NORM_ACT_MODULE = "timm.layers.norm_act"


def _eps(module: nn.Module) -> float:
    eps = getattr(module, "eps", None)
    if eps is None:  # torch RMSNorm(eps=None): the dtype's epsilon, resolved at forward
        return -1.0
    return float(eps)


def norm_kind(module: nn.Module) -> NormKind | None:
    """The :class:`NormKind` of a norm over channels this module supports, else ``None``."""
    name = type(module).__name__
    if name == "GlobalResponseNorm" and type(module).__module__.startswith("timm."):
        channel_dim = int(getattr(module, "channel_dim", -1))
        return NormKind(dim=1 if channel_dim == 1 else -1, rms=False, spatial=False, eps=_eps(module), grn=True)
    owner = forward_owner(module)
    known = None if owner is None else _FORWARDS.get(owner)
    if owner is None or known is None:
        return None
    dim, rms, spatial = known
    act = owner[0] == _NORM_ACT_MODULE
    if spatial:
        if getattr(module, "num_groups", None) != 1:
            return None
    else:
        shape = getattr(module, "normalized_shape", None)
        if shape is None or len(tuple(shape)) != 1:
            return None
    if act and not all(isinstance(getattr(module, part, None), nn.Module) for part in ("drop", "act")):
        return None
    return NormKind(dim=dim, rms=rms, spatial=spatial, eps=_eps(module), act=act)


def unsupported_norm_reason(module: nn.Module) -> str | None:
    """Why a norm over channels cannot become a nested norm (``None``: supported or not a norm)."""
    name = type(module).__name__
    if norm_kind(module) is not None:
        return None
    overridden = forward_owner(module) not in _FORWARDS
    if isinstance(module, nn.GroupNorm):
        if module.num_groups == module.num_channels:
            return None  # per-channel: no mixing
        if module.num_groups == 1 and overridden:
            return (
                f"{name} ({type(module).__module__}) overrides GroupNorm's forward in a way the nested "
                "norm does not know (a fused activation or another computation); use torch's or "
                "timm's GroupNorm / GroupNorm1 / GroupNorm1Act"
            )
        return (
            f"GroupNorm with {module.num_groups} groups over {module.num_channels} channels "
            "normalises across channels within a group; only GroupNorm with 1 group (a nested "
            "norm) or one group per channel is supported"
        )
    if isinstance(module, nn.LayerNorm):
        shape = tuple(module.normalized_shape)
        if len(shape) != 1:
            return (
                f"{name} normalises over {len(shape)} dimensions {shape}; only a LayerNorm over "
                "the channel dimension alone can become a nested norm"
            )
        return (
            f"{name} ({type(module).__module__}) overrides LayerNorm's forward in a way the nested "
            "norm does not know (another channel layout or computation); use timm's "
            "LayerNorm/LayerNorm2d/LayerNormAct2d or torch's LayerNorm"
        )
    if "norm" in name.lower() and hasattr(module, "normalized_shape"):
        return f"{name} normalises over channels and is not a norm the nested norm knows"
    return None


def nested_normalize(
    x: torch.Tensor,
    kind: NormKind,
    index: torch.Tensor,
    active: int,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """Nested norm of ``x``: channel ``c`` (along ``kind.dim``) with index ``index[c] <= active``
    is normalised with the statistics of the channels whose index is ``<= index[c]``; channels
    with a larger index come out as zeros. ``index`` is a long tensor on ``x``'s device."""
    dim = kind.dim % x.dim()
    channels = int(x.shape[dim])
    if index.numel() != channels:
        raise ValueError(
            f"nested norm: the index has {index.numel()} entries but the input has {channels} "
            f"channels along dim {dim} (input shape {tuple(x.shape)})"
        )
    view = [1] * x.dim()
    view[dim] = channels
    if kind.grn:
        return _nested_response_norm(x, kind, index, active, weight, bias, dim, view)
    reduce = tuple(range(dim, x.dim())) if kind.spatial else (dim,)
    positions = 1
    for d in reduce:
        if d != dim:
            positions *= int(x.shape[d])
    eps = kind.eps if kind.eps >= 0 else float(torch.finfo(x.dtype).eps)
    scale = torch.zeros_like(x)
    shift = torch.zeros_like(x)
    levels = sorted({int(v) for v in index.tolist() if int(v) <= active})
    for k in levels:
        prefix = (index <= k).to(x.dtype).view(view)
        count = float(int((index <= k).sum())) * positions
        members = (index == k).to(x.dtype).view(view)
        if kind.rms:
            mean = None
            var = (x * x * prefix).sum(dim=reduce, keepdim=True) / count
        else:
            mean = (x * prefix).sum(dim=reduce, keepdim=True) / count
            var = ((x - mean) ** 2 * prefix).sum(dim=reduce, keepdim=True) / count
        inv = torch.rsqrt(var + eps)
        scale = scale + members * inv
        if mean is not None:
            shift = shift + members * (mean * inv)
    y = x * scale - shift
    if weight is not None:
        y = y * weight.view(view)
    if bias is not None:
        active_mask = (index <= active).to(x.dtype).view(view)
        y = y + bias.view(view) * active_mask
    return y


def _nested_response_norm(
    x: torch.Tensor,
    kind: NormKind,
    index: torch.Tensor,
    active: int,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    dim: int,
    view: list[int],
) -> torch.Tensor:
    """Nested GlobalResponseNorm: channel ``c``'s spatial L2 norm is divided by the mean of that
    norm over the channels whose index is ``<= index[c]`` (timm divides by the mean over every
    channel, so a larger subnet's channels would rescale a smaller subnet's); channels with an
    index above ``active`` come out as zeros."""
    spatial = tuple(d for d in range(1, x.dim()) if d != dim)
    norms = x.norm(p=2, dim=spatial, keepdim=True)
    denominator = torch.zeros_like(norms)
    for k in sorted({int(v) for v in index.tolist() if int(v) <= active}):
        prefix = (index <= k).to(x.dtype).view(view)
        mean = (norms * prefix).sum(dim=dim, keepdim=True) / float(int((index <= k).sum()))
        denominator = denominator + (index == k).to(x.dtype).view(view) * mean
    active_mask = (index <= active).view(view)
    ratio = torch.where(active_mask, norms / (denominator + kind.eps), torch.zeros_like(norms))
    response = x * ratio
    if weight is not None:
        response = response * weight.view(view)
    if bias is not None:
        response = response + bias.view(view)
    return torch.where(active_mask, x + response, torch.zeros_like(x))


def _reduced(x: torch.Tensor, kind: NormKind) -> tuple[int, tuple[int, ...], int]:
    """(channel dim, the dims a norm reduces, positions per channel in that reduction)."""
    dim = kind.dim % x.dim()
    if kind.grn:
        return dim, (dim,), 1
    reduce = tuple(range(dim, x.dim())) if kind.spatial else (dim,)
    positions = math.prod(int(x.shape[d]) for d in reduce if d != dim)
    return dim, reduce, positions


def _grn_norms(x: torch.Tensor, dim: int) -> torch.Tensor:
    return x.norm(p=2, dim=tuple(d for d in range(1, x.dim()) if d != dim), keepdim=True)


def extend_statistics(
    x: torch.Tensor, kind: NormKind, previous: torch.Tensor | None, previous_channels: int
) -> torch.Tensor:
    """The statistics a nested norm needs over ``previous_channels`` earlier channels (summarised
    by ``previous``, this function's earlier result, ``None`` for none) and the channels of ``x``,
    as one tensor with the batch first (the runtime's delta layout keeps it between stages):
    mean and sum of squared deviations (merged with Chan et al.'s update, stable in float32), the
    mean square for RMSNorm, the sum of the channels' spatial L2 norms for GlobalResponseNorm."""
    dim, reduce, positions = _reduced(x, kind)
    channels = int(x.shape[dim])
    if kind.grn:
        total = _grn_norms(x, dim).sum(dim=dim, keepdim=True)
        return total if previous is None else previous + total
    if kind.rms:
        square = (x * x).mean(dim=reduce, keepdim=True)
        if previous is None:
            return square
        earlier, added = previous_channels * positions, channels * positions
        return (previous * earlier + square * added) / (earlier + added)
    mean = x.mean(dim=reduce, keepdim=True)
    squares = ((x - mean) ** 2).sum(dim=reduce, keepdim=True)
    if previous is None:
        return torch.cat([mean, squares], dim)
    old_mean, old_squares = previous.narrow(dim, 0, 1), previous.narrow(dim, 1, 1)
    before, new = float(previous_channels * positions), float(channels * positions)
    delta = mean - old_mean
    merged_mean = old_mean + delta * (new / (before + new))
    merged_squares = old_squares + squares + delta * delta * (before * new / (before + new))
    return torch.cat([merged_mean, merged_squares], dim)


def normalize_newest(
    module: nn.Module,
    kind: NormKind,
    x: torch.Tensor,
    statistics: torch.Tensor,
    channels: int,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """What nested norm ``module`` returns for channels ``x`` that all have the largest index so
    far, from :func:`extend_statistics` over every one of the ``channels`` channels so far (those
    of ``x`` included): their prefix is every channel, so this equals :func:`nested_norm_output`
    on all of them, restricted to ``x``'s. ``weight`` and ``bias`` are ``x``'s channels' own."""
    dim, _, positions = _reduced(x, kind)
    view = [1] * x.dim()
    view[dim] = int(x.shape[dim])
    eps = kind.eps if kind.eps >= 0 else float(torch.finfo(x.dtype).eps)
    if kind.grn:
        ratio = _grn_norms(x, dim) / (statistics / channels + eps)
        response = x * ratio
        if weight is not None:
            response = response * weight.view(view)
        if bias is not None:
            response = response + bias.view(view)
        y = x + response
    else:
        if kind.rms:
            y = x * torch.rsqrt(statistics + eps)
        else:
            mean, squares = statistics.narrow(dim, 0, 1), statistics.narrow(dim, 1, 1)
            y = (x - mean) * torch.rsqrt(squares / (channels * positions) + eps)
        if weight is not None:
            y = y * weight.view(view)
        if bias is not None:
            y = y + bias.view(view)
    if kind.act:
        y = module.get_submodule("act")(module.get_submodule("drop")(y))
    return y


def nested_norm_output(
    module: nn.Module,
    kind: NormKind,
    x: torch.Tensor,
    index: torch.Tensor,
    active: int,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """What nested norm ``module`` returns for input ``x``: :func:`nested_normalize`, then for a
    norm-act module its own ``drop`` and ``act`` (the order of timm's forward). Every hook that
    stands in for a nested norm's forward (training, exported subnets, the runtime) calls this."""
    y = nested_normalize(x, kind, index, active, weight, bias)
    if kind.act:
        drop, act = module.get_submodule("drop"), module.get_submodule("act")
        y = act(drop(y))
    return y


def affine_parameters(module: nn.Module) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """A norm's ``weight`` and ``bias`` (``None`` for one it lacks or holds as ``None``)."""
    weight = getattr(module, "weight", None)
    bias = getattr(module, "bias", None)
    return (
        weight if isinstance(weight, torch.Tensor) else None,
        bias if isinstance(bias, torch.Tensor) else None,
    )


def _present(tensor: torch.Tensor | None, present: torch.Tensor) -> torch.Tensor | None:
    """The ``present`` channels of a per-channel affine tensor (as it is when already sliced)."""
    if tensor is None or tensor.shape[0] == present.numel():
        return tensor
    return tensor.index_select(0, present)


class NestedNorms(OutputHooks):
    """The nested norms of a :class:`~nni_steppingnet.SteppingNet` (installed at wrap time).

    ``positions`` maps every nested norm's module name to the flat neuron positions of its
    channels (from ``net.channel_modules``). The hooks read ``net.active_subnet`` and the
    assignment at forward time.
    """

    def __init__(self, net: SteppingNet, positions: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self._net_ref = weakref.ref(net)
        self.positions = dict(positions)
        self.kinds: dict[str, NormKind] = {}
        modules = dict(net.model.named_modules())
        for name in self.positions:
            module = modules[name]
            kind = norm_kind(module)
            assert kind is not None, name
            self.kinds[name] = kind
            self.add(module, self._hook(name, kind))

    def __len__(self) -> int:
        return len(self.kinds)

    @property
    def names(self) -> list[str]:
        """Module names of the nested norms."""
        return list(self.kinds)

    def channel_index(self, name: str, device: torch.device | None = None) -> torch.Tensor:
        """Subnet index of every channel of norm ``name`` under the current assignment."""
        net = self._net_ref()
        if net is None:
            raise RuntimeError("the SteppingNet of these nested norms no longer exists")
        positions = self.positions[name]
        where = torch.device("cpu") if device is None else device
        return cast(
            torch.Tensor,
            net.assignment_cache(("nested_norm", name, where), lambda flat: flat[positions].to(where)),
        )

    def _hook(self, name: str, kind: NormKind) -> Any:
        ref = self._net_ref

        def hook(module: nn.Module, args: Any, output: Any) -> Any:
            net = ref()
            if net is None or not args or not isinstance(args[0], torch.Tensor):
                return None
            x = args[0]
            index = self.channel_index(name, x.device)
            weight, bias = affine_parameters(module)
            present = net.present_channels(name, x.device)
            if present is not None:
                # Sliced execution: the input holds only these channels (cumulative layout).
                # Its affine parameters are gathered here (the sliced execution has put the full
                # ones back by now; gathering a slice again is a no-op).
                index = index.index_select(0, present)
                weight, bias = (_present(t, present) for t in (weight, bias))
            y = nested_norm_output(module, kind, x, index, net.active_subnet, weight, bias)
            return y.to(output.dtype) if isinstance(output, torch.Tensor) else y

        return hook


class FixedNestedNorm:
    """Forward hook of a nested norm with a fixed channel index (exported subnets): picklable,
    so ``torch.save(model)`` keeps it."""

    def __init__(self, kind: NormKind, index: torch.Tensor, active: int) -> None:
        self.kind = kind
        self.index = index.detach().to(torch.long).cpu().clone()
        self.active = int(active)

    def __call__(self, module: nn.Module, args: Any, output: Any) -> Any:
        x = args[0]
        weight, bias = affine_parameters(module)
        y = nested_norm_output(module, self.kind, x, self.index.to(x.device), self.active, weight, bias)
        return y.to(output.dtype) if isinstance(output, torch.Tensor) else y


def kept_channels(
    flat: torch.Tensor, positions: torch.Tensor, s: int, also: torch.Tensor | None = None
) -> torch.Tensor:
    """Positions (ascending) of the channels an export of subnet ``s`` keeps: the active ones,
    those ``also`` (bool over the flat vector) marks, and one channel, the lowest index, when none
    is kept otherwise (a layer cannot have zero channels)."""
    index = flat[positions]
    keep = index <= s
    if also is not None:
        keep = keep | also[positions]
    if not bool(keep.any()) and index.numel():
        keep[int(torch.argmin(index))] = True
    return keep.nonzero().flatten()


def kept_indices(flat: torch.Tensor, positions: torch.Tensor, s: int, also: torch.Tensor | None = None) -> torch.Tensor:
    """Subnet indices of the channels an export of subnet ``s`` keeps, in channel order
    (:func:`kept_channels`)."""
    return flat[positions][kept_channels(flat, positions, s, also)]


def install_fixed(model: nn.Module, kinds: dict[str, NormKind], indices: dict[str, torch.Tensor], s: int) -> None:
    """Register a :class:`FixedNestedNorm` of subnet ``s`` on every named norm of ``model`` (an
    exported copy whose norms hold only the kept channels, indices in ``indices``)."""
    for name, kind in kinds.items():
        module = model.get_submodule(name)
        index = indices[name]
        weight, _ = affine_parameters(module)
        width = int(weight.shape[0]) if weight is not None else index.numel()
        if width != index.numel():
            raise RuntimeError(
                f"exported norm {name!r} has {width} channels but {index.numel()} kept channel "
                "indices; torch-pruning removed a different set of channels than the assignment says"
            )
        module.register_forward_hook(FixedNestedNorm(kind, index, s))
