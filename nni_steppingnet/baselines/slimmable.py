"""Slimmable networks (Yu et al., ICLR 2019) on SteppingNet's masks, MAC counter and training loop.

Subnet ``s`` is the width slice holding the first ``k_s`` neurons of every group (the triangular
assignment of :mod:`~nni_steppingnet.baselines.widths`), fully connected inside the slice:
``W[o, i]`` is active iff both ``o`` and ``i`` lie inside width ``s``. A wider subnet therefore
feeds its new channels into the narrower slice's channels, so nothing computed for a narrower
subnet can be reused (no anytime extension), and every width keeps its own BatchNorm statistics and
affine parameters (*switchable BN*): :class:`SwitchableBatchNorm` holds one copy of each BN module
per width and runs the copy of the subnet that is active.
"""

from __future__ import annotations

import copy
import logging
import weakref
from typing import Any, Sequence, cast

import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..rules import SLICES
from ..stepping import RunningStatsGuard
from .widths import SlicedNet, WidthPlan, wrap_with_widths

__all__ = ["SlimmableNet", "SwitchableBatchNorm", "make_slimmable"]

logger = logging.getLogger(__name__)


class SwitchableBatchNorm(nn.Module):
    """One private copy of a BatchNorm module per subnet width; runs the active subnet's copy.

    ``bns[s-1]`` is a deep copy of the original module (a timm ``BatchNormAct2d`` keeps its
    activation and dropout), so every width has its own running statistics and affine parameters.
    The wrapper reads the active subnet from its :class:`SlimmableNet` through a weak reference;
    without a live net it runs the widest copy.
    """

    def __init__(self, bn: nn.Module, net: SlimmableNet) -> None:
        super().__init__()
        if not isinstance(bn, _BatchNorm):
            raise TypeError(f"SwitchableBatchNorm wraps BatchNorm modules, got {type(bn).__name__}")
        self.bns = nn.ModuleList(copy.deepcopy(bn) for _ in range(net.num_subnets))
        self._net_ref = weakref.ref(net)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        net = self._net_ref()
        s = net.active_subnet if net is not None else len(self.bns)
        return self.bns[s - 1](x)

    def extra_repr(self) -> str:
        return f"widths={len(self.bns)}"


class SlimmableNet(SlicedNet):
    """Slimmable baseline: nested width slices, full connections inside each width, switchable BN.

    Wraps ``model`` in place (every ``_BatchNorm`` module is replaced by a
    :class:`SwitchableBatchNorm`). The no-backward-synapse rule deliberately does not hold, so the
    wrap-time isolation probe (``verify``) checks the model under SteppingNet's rule only (it finds
    modules torch-pruning cannot trace); the masks and :meth:`validate` follow the slimmable rule
    (:data:`nni_steppingnet.rules.SLICES`).
    ``channel_modules`` names the per-width BN copies (``<bn>.bns.<s-1>``).
    """

    method = "slimmable"
    mask_rule = SLICES

    def __init__(
        self,
        model: nn.Module,
        example_inputs: Any,
        num_subnets: int,
        width_fractions: Sequence[float] | None = None,
        *,
        classifier: nn.Module | str | None = None,
        exclude: Sequence[nn.Module] = (),
        verify: bool = True,
        execution: str = "auto",
    ) -> None:
        # SteppingNet runs the tracing probe under the nested rule (it only has to find untraced
        # channel mixing, which breaks either rule) and switches to ``mask_rule`` after it.
        super().__init__(
            model,
            example_inputs,
            num_subnets,
            width_fractions,
            classifier=classifier,
            exclude=exclude,
            verify=verify,
            execution=execution,
        )
        self._switch_batchnorm()

    def _switch_batchnorm(self) -> None:
        names = [name for name, m in self.model.named_modules() if isinstance(m, _BatchNorm) and name]
        if isinstance(self.model, _BatchNorm):
            raise ValueError("the model itself is a BatchNorm module; wrap a network that contains it")
        # SteppingNet's running-statistics guard hooks the original BN modules: detach it before
        # copying them (hooks would be copied by reference) and hook the per-width copies instead.
        guard = getattr(self, "bn_guard", None)
        if guard is not None:
            guard.remove()
        for name in names:
            parent_name, _, child = name.rpartition(".")
            parent = self.model.get_submodule(parent_name) if parent_name else self.model
            setattr(parent, child, SwitchableBatchNorm(parent.get_submodule(child), self))
            positions = self.channel_modules.pop(name, None)
            if positions is not None:
                for s in range(self.num_subnets):
                    self.channel_modules[f"{name}.bns.{s}"] = positions
        if guard is not None:
            self.bn_guard = RunningStatsGuard(self)
        # Sliced execution hooks the per-width copies too (they replace the hooked originals).
        self.refresh_execution()
        logger.debug("switchable BN for %d modules: %s", len(names), names)

    # --------------------------------------------------------------------- export
    def plain_copy(self, s: int | None = None) -> nn.Module:
        """As :meth:`SteppingNet.plain_copy`; the switchable BN modules become the plain BN copy
        of subnet ``s`` (the widest one when ``s`` is None)."""
        model = super().plain_copy(s)
        index = (self.num_subnets if s is None else s) - 1
        _unswitch(model, index)
        return model

    def remove(self) -> nn.Module:
        """Remove the masks and put the widest width's BN copy back in place of every
        switchable BN; returns the model."""
        model = super().remove()
        _unswitch(model, self.num_subnets - 1)
        return model


def make_slimmable(
    model: nn.Module,
    example_inputs: Any,
    budgets: Sequence[float],
    reference_macs: int,
    *,
    tolerance: float = 0.02,
    classifier: nn.Module | str | None = None,
    exclude: Sequence[nn.Module] = (),
    verify: bool = True,
) -> tuple[SlimmableNet, WidthPlan]:
    """Wrap ``model`` as a slimmable network with one subnet per budget, widths searched so that
    every subnet's MACs are within ``tolerance`` of ``budgets[s-1] * reference_macs``."""
    return wrap_with_widths(
        SlimmableNet,
        model,
        example_inputs,
        budgets,
        reference_macs,
        tolerance=tolerance,
        classifier=classifier,
        exclude=exclude,
        verify=verify,
    )


def _unswitch(model: nn.Module, index: int) -> None:
    """Replace every SwitchableBatchNorm in ``model`` by its BN copy ``index``."""
    names = [name for name, m in model.named_modules() if isinstance(m, SwitchableBatchNorm)]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, cast(SwitchableBatchNorm, parent.get_submodule(child)).bns[index])
