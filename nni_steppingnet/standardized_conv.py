"""Nested weight standardisation: timm's StdConv2d and ScaledStdConv2d that respect the subnets.

timm's ``StdConv2d`` (BiT ResNet-V2) and ``ScaledStdConv2d`` (NFNet, NF-ResNet, NF-RegNet), and
their ``...Same`` variants, standardise every weight row in their forward: ``(w - mean) / std``
over the row's whole fan-in (``ScaledStdConv2d`` then multiplies by ``gain * gamma /
sqrt(fan_in)``). Under the masks a row's masked synapses are zeros, and standardising turns them
into ``-mean / std``: the row reads the input channels of larger subnets (the wrap-time probe's
leak at ``stages.0.0.downsample.conv`` of ``nf_regnet_b0``), and its mean and variance would
move with the subnet. A parametrization of the weight cannot mend it, since the module
subtracts its own mean again.

A *nested standardisation* standardises row ``o`` over its **support**, the synapses the mask
keeps for it (inputs ``i`` with ``a(i) <= a(o)``, times any unstructured pruning mask), and
keeps zeros elsewhere. The support of an active row does not depend on the active subnet, so
the standardised row, and with it the row's output, is the same in every subnet that contains
it. How it is installed: at wrap time :class:`NestedStandardizedConvs` registers one forward hook
on each such layer, which recomputes the convolution from the layer's input with the nested
standardised weight and returns it in place of the module's output (the module types,
``state_dict`` keys and torch-pruning's view of the model stay those of the original; the
layer's convolution runs twice, the price of not replacing modules). ``net.plain_copy`` (and
with it export and the incremental runtime) swaps each such layer for a plain ``nn.Conv2d``
(timm's ``Conv2dSame`` for dynamic same padding) holding the standardised weight
(:func:`bake_standardized_convs`). Sliced execution is refused on these models by name: it
gathers the active columns, which changes the fan-in a standardising forward sees.

Departure from the original model (as for the nested norms): with every input channel in one
subnet the nested standardisation equals timm's to float rounding (a test checks it); under a
nested assignment a row of subnet ``k`` standardises over its support only, so the full network
no longer computes the original function and distillation has to recover it. The gain and the
``gamma / sqrt(fan_in)`` scale of ``ScaledStdConv2d`` are kept as built (the scale from the full
fan-in). MACs: as for any Conv2d (the standardisation of the weight costs none per sample).
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.nn as nn
import torch.nn.functional as F

from .forwards import forward_owner
from .hooks import OutputHooks

if TYPE_CHECKING:
    from .stepping import SteppingNet

__all__ = [
    "is_standardized_conv",
    "standardized_kind",
    "standardized_weight",
    "standardized_conv_output",
    "NestedStandardizedConvs",
    "bake_standardized_convs",
]

#: timm's weight-standardising convolutions: (module, class) of the forward they run
_STANDARDIZED = (
    ("timm.layers.std_conv", "StdConv2d"),
    ("timm.layers.std_conv", "StdConv2dSame"),
    ("timm.layers.std_conv", "ScaledStdConv2d"),
    ("timm.layers.std_conv", "ScaledStdConv2dSame"),
)


def is_standardized_conv(module: nn.Module) -> bool:
    """True when ``module`` runs the forward of one of timm's weight-standardising convs."""
    return isinstance(module, nn.Conv2d) and forward_owner(module) in _STANDARDIZED


def standardized_kind(module: nn.Module) -> str:
    """The timm class whose standardising forward ``module`` runs (its name in messages: a
    wrapped layer's own class is torch's generated ``Parametrized...`` one)."""
    owner = forward_owner(module)
    return owner[1] if owner is not None else type(module).__name__


def standardized_weight(module: nn.Module, weight: torch.Tensor, support: torch.Tensor) -> torch.Tensor:
    """``weight`` with every row standardised over its ``support`` (a weight-shaped 0/1 mask)
    as ``module`` standardises over its whole row: biased variance, ``module.eps``, and for
    ``ScaledStdConv2d`` times ``gain * scale``. Zero outside the support (an empty row stays 0)."""
    out = weight.shape[0]
    rows = weight.reshape(out, -1)
    keep = support.reshape(out, -1).to(rows.dtype)
    count = keep.sum(1, keepdim=True).clamp_min(1)
    mean = (rows * keep).sum(1, keepdim=True) / count
    centred = (rows - mean) * keep
    var = (centred * centred).sum(1, keepdim=True) / count
    standardized = centred * torch.rsqrt(var + float(cast(float, module.eps)))
    gain = getattr(module, "gain", None)
    if isinstance(gain, torch.Tensor):
        standardized = standardized * (gain.reshape(out, 1) * float(cast(float, module.scale)))
    return standardized.reshape(weight.shape)


def _uses_same_pad(module: nn.Module) -> bool:
    return bool(getattr(module, "same_pad", False))


def standardized_conv_output(module: nn.Conv2d, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The convolution of ``module`` with ``weight`` (its dynamic same padding included)."""
    if _uses_same_pad(module):
        from timm.layers.padding import pad_same

        x = pad_same(x, list(module.kernel_size), list(module.stride), list(module.dilation))
    padding = cast(Any, module.padding)
    return F.conv2d(x, weight, module.bias, module.stride, padding, module.dilation, module.groups)


class NestedStandardizedConvs(OutputHooks):
    """The nested weight standardisation of a :class:`~nni_steppingnet.SteppingNet`'s
    standardising convs (installed at wrap time on the layers ``names``)."""

    def __init__(self, net: SteppingNet, names: list[str]) -> None:
        super().__init__()
        self._net_ref = weakref.ref(net)
        self.names = list(names)
        modules = dict(net.model.named_modules())
        for name in self.names:
            self.add(modules[name], self._hook(name))

    def __len__(self) -> int:
        return len(self.names)

    def _hook(self, name: str) -> Any:
        ref = self._net_ref

        def hook(module: nn.Module, args: Any, output: Any) -> Any:
            net = ref()
            if net is None or not args or not isinstance(args[0], torch.Tensor):
                return None
            x = args[0]
            weight = cast(torch.Tensor, module.weight)  # the masked weight of the active subnet
            s, device, dtype = net.active_subnet, weight.device, weight.dtype
            support = cast(
                torch.Tensor,
                net.assignment_cache(
                    ("standardized-support", name, s, device, dtype),
                    lambda flat: net.weight_mask(name, s).to(device=device, dtype=dtype),
                ),
            )
            conv = cast(nn.Conv2d, module)
            return standardized_conv_output(conv, x, standardized_weight(conv, weight, support))

        return hook


def _plain_conv(module: nn.Conv2d, weight: torch.Tensor) -> nn.Conv2d:
    """A plain conv with ``module``'s geometry holding ``weight``."""
    geometry: dict[str, Any] = {
        "kernel_size": module.kernel_size,
        "stride": module.stride,
        "dilation": module.dilation,
        "groups": module.groups,
        "bias": module.bias is not None,
    }
    conv: nn.Conv2d
    if _uses_same_pad(module):
        from timm.layers import Conv2dSame

        conv = Conv2dSame(module.in_channels, module.out_channels, **geometry)
    else:
        conv = nn.Conv2d(module.in_channels, module.out_channels, padding=cast(Any, module.padding), **geometry)
    conv = conv.to(device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        conv.weight.copy_(weight)
        if module.bias is not None and conv.bias is not None:
            conv.bias.copy_(module.bias)
    conv.train(module.training)
    return conv


def bake_standardized_convs(model: nn.Module, supports: dict[str, torch.Tensor]) -> None:
    """Replace every standardising conv ``name`` of ``model`` (an unmasked copy) by a plain conv
    holding its weight standardised over ``supports[name]``."""
    for name, support in supports.items():
        module = cast(nn.Conv2d, model.get_submodule(name))
        weight = module.weight.detach()
        baked = _plain_conv(module, standardized_weight(module, weight, support.to(weight)).detach())
        baked.weight.requires_grad_(module.weight.requires_grad)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, baked)
