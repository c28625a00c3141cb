"""Channel splits by widths a timm block stores at construction, fitted to the channels present.

Some timm blocks split a tensor by widths fixed when they were built: InceptionNeXt's
``InceptionDWConv2d.split_indexes`` (identity, hw, w and h bands), FasterNet's
``Partial_conv3.dim_conv3`` / ``dim_untouched``, Res2Net's ``Bottle2neck.width`` (its scales) and
DPN's ``DualPathBlock.num_1x1_c`` (residual against dense path) and ReXNet's
``LinearBottleneck.in_channels`` (the outputs its shortcut is added to). torch-pruning does not know
them, so neither an exported subnet (fewer channels) nor sliced execution (the active channels
only) could run these blocks as built. Each chunk's width here is the width of a layer that reads
or writes it, as the caller counts it (:data:`LayerWidth`: the pruned layer's, or its active
channels'); a chunk no layer reads (InceptionNeXt's identity band, FasterNet's untouched part) is
the rest of the block's input; DPN's residual path and ReXNet's shortcut part, which no single
layer computes, are the present outputs among the first ``num_1x1_c`` / ``in_channels`` of the
conv they slice (:data:`OutputPrefix`).

:func:`split_widths` gives a block's attributes for one call; export sets them once, sliced
execution for each call (and restores them after it).
"""

from __future__ import annotations

from typing import Any, Callable, cast

import torch.nn as nn

__all__ = [
    "LayerWidth",
    "OutputPrefix",
    "has_fixed_splits",
    "split_widths",
    "needs_input_width",
    "halved_output",
    "fit_halves",
]

#: ``(layer, "in" | "out") -> channels present`` on that side of a Conv2d/Linear
LayerWidth = Callable[[nn.Module, str], int]
#: ``(layer, n) -> present outputs among its first n output channels``
OutputPrefix = Callable[[nn.Module, int], int]

_INCEPTION = ("timm.models.inception_next", "InceptionDWConv2d")
_FASTERNET = ("timm.models.fasternet", "Partial_conv3")
_RES2NET = ("timm.models.res2net", "Bottle2neck")
_DPN = ("timm.models.dpn", "DualPathBlock")
_REXNET = ("timm.models.rexnet", "LinearBottleneck")
_CSP = (("timm.models.cspnet", "CrossStage"), ("timm.models.cspnet", "CrossStage3"))


def _kind(module: nn.Module) -> tuple[str, str]:
    return type(module).__module__, type(module).__name__


def has_fixed_splits(module: nn.Module) -> bool:
    """Whether ``module`` is a block whose split widths :func:`split_widths` fits."""
    kind = _kind(module)
    if kind == _RES2NET:
        return int(getattr(module, "scale", 1)) > 1
    if kind == _REXNET:
        return bool(getattr(module, "use_shortcut", False))
    return kind in (_INCEPTION, _FASTERNET, _DPN)


def needs_input_width(module: nn.Module) -> bool:
    """Whether a chunk of ``module`` is read by no layer, so its width is the input's rest."""
    return _kind(module) in (_INCEPTION, _FASTERNET)


def split_widths(
    module: nn.Module, width: LayerWidth, output_prefix: OutputPrefix, input_width: int | None = None
) -> dict[str, Any]:
    """The split attributes of ``module`` for the channels present (empty if it has none).

    ``input_width`` (the block input's channels) is needed where :func:`needs_input_width`.
    Reads the block's attributes as built, so call it before setting them (or after restoring).
    """
    kind = _kind(module)
    block: Any = module  # timm's plain attributes
    if kind in (_INCEPTION, _FASTERNET) and input_width is None:
        raise ValueError(f"{type(module).__name__}: its split widths need the block's input width")
    if kind == _INCEPTION:
        bands = [width(conv, "in") for conv in (block.dwconv_hw, block.dwconv_w, block.dwconv_h)]
        return {"split_indexes": (int(input_width or 0) - sum(bands), *bands)}
    if kind == _FASTERNET:
        conv3 = width(block.partial_conv3, "in")
        return {"dim_conv3": conv3, "dim_untouched": int(input_width or 0) - conv3}
    if kind == _RES2NET and int(block.scale) > 1:
        scales = [width(conv, "in") for conv in block.convs]
        return {"width": [*scales, width(block.conv1, "out") - sum(scales)]}
    if kind == _DPN:
        if block.c1x1_c1 is not None:
            return {"num_1x1_c": width(block.c1x1_c1, "out")}
        return {"num_1x1_c": output_prefix(block.c1x1_c.conv, int(block.num_1x1_c))}
    if kind == _REXNET and block.use_shortcut:
        return {"in_channels": output_prefix(block.conv_pwl.conv, int(block.in_channels))}
    return {}


def halved_output(module: nn.Module) -> nn.Module | None:
    """The conv whose output ``module`` splits into two equal halves, or ``None``.

    CSPNet's cross stages run ``x.split(self.expand_chs // 2, dim=1)`` on ``conv_exp``'s output:
    a split by *one* width, so both halves must keep the same number of channels. Export keeps
    inactive channels in the smaller half until they do (their weights are masked, so they add
    only dense MACs) and then sets ``expand_chs`` with :func:`fit_halves`. Sliced execution has no
    such freedom; its wrap-time check finds the unequal halves and falls back to masks."""
    if _kind(module) not in _CSP:
        return None
    conv_exp: Any = getattr(module, "conv_exp", None)
    conv = getattr(conv_exp, "conv", None)
    return conv if isinstance(conv, nn.Conv2d) else None


def fit_halves(module: nn.Module) -> None:
    """Set a cross stage's ``expand_chs`` to its (pruned, even) ``conv_exp`` output width."""
    conv = halved_output(module)
    if conv is None:
        return
    width = int(cast(nn.Conv2d, conv).out_channels)
    if width % 2:
        raise RuntimeError(
            f"{type(module).__name__}: conv_exp keeps {width} channels, which do not split into two "
            "equal halves; export must keep as many channels in each half"
        )
    block: Any = module  # a plain attribute of timm's block
    block.expand_chs = width
