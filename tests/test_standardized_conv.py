"""Nested weight standardisation (timm's StdConv2d / ScaledStdConv2d): isolation, equality with
timm's forward where every input shares one subnet, export, runtime and the sliced refusal."""

from __future__ import annotations

import copy
from typing import Any, Callable

import pytest
import torch
import torch.nn as nn

from nni_steppingnet import SteppingNet, UnsupportedModelError, macs
from nni_steppingnet.standardized_conv import is_standardized_conv
from nni_steppingnet.testing import isolation_report, randomize_parameters, runner_report

timm = pytest.importorskip("timm")
std_conv = timm.layers.std_conv

N = 3


def _std_net() -> nn.Module:
    """Every standardising conv of timm: StdConv2d (BiT), ScaledStdConv2d (NF-ResNet) and their
    SAME variants with dynamic padding (stride 2: dm_nfnet's ``same_pad``)."""
    return nn.Sequential(
        std_conv.StdConv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        std_conv.ScaledStdConv2d(8, 12, 3),
        nn.ReLU(),
        std_conv.ScaledStdConv2dSame(12, 10, 3, stride=2),
        nn.ReLU(),
        std_conv.StdConv2dSame(10, 8, 3, stride=2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    )


def _built(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = randomize_parameters(_std_net().eval(), seed=seed + 1)
    assert [bool(getattr(m, "same_pad", False)) for m in model if is_standardized_conv(m)] == [
        False,
        False,
        True,
        True,
    ]
    return model


def _inputs(batch: int = 3, seed: int = 5) -> torch.Tensor:
    return torch.randn(batch, 3, 17, 17, generator=torch.Generator().manual_seed(seed))


def test_with_one_subnet_for_every_input_it_equals_timms_standardisation() -> None:
    model = _built()
    original = copy.deepcopy(model)
    x = _inputs()
    net = SteppingNet(model, x[:1], N)
    net.set_flat_assignment(torch.ones_like(net.flat_assignment()))
    assert len(net.standardized_convs) == 4
    with torch.no_grad():
        torch.testing.assert_close(net.model(x), original(x), rtol=1e-5, atol=1e-6)


def test_without_the_nested_standardisation_the_masked_zeros_leak(
    random_assignment: Callable[..., torch.Tensor],
) -> None:
    """The reason for the hook: timm's forward turns masked zeros into -mean/std."""
    model = _built()
    x = _inputs()
    net = SteppingNet(model, x[:1], N)
    random_assignment(net, seed=0)
    net.standardized_convs.remove()
    assert not isolation_report(net, x).isolated


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_subnets_are_isolated_bitwise(seed: int, random_assignment: Callable[..., torch.Tensor]) -> None:
    x = _inputs()
    net = SteppingNet(_built(seed), x[:1], N)
    random_assignment(net, seed=seed)
    for train in (False, True):
        report = isolation_report(net, x, train=train)
        assert sum(report.compared) > 0
        assert report.isolated, report.where


def test_a_masked_synapse_gets_no_gradient(random_assignment: Callable[..., torch.Tensor]) -> None:
    x = _inputs()
    net = SteppingNet(_built(), x[:1], N)
    random_assignment(net, seed=3)
    for s in range(1, N + 1):
        net.model.zero_grad()
        with net.subnet(s):
            net.model(x).square().sum().backward()
        for k, layer in enumerate(net.layers):
            grad = net.original_weight(k).grad
            assert grad is not None
            masked = ~net.weight_mask(k, s).bool()
            assert bool((grad[masked] == 0).all()), layer.name


@pytest.mark.parametrize("seed", [0, 1])
def test_export_and_runner_equal_the_masked_subnets(seed: int, random_assignment: Callable[..., torch.Tensor]) -> None:
    x = _inputs()
    net = SteppingNet(_built(seed), x[:1], N)
    random_assignment(net, seed=seed)
    for s in range(1, N + 1):
        exported = net.export_subnet(s).eval()
        assert not any(is_standardized_conv(m) for m in exported.modules())
        with torch.no_grad(), net.subnet(s):
            expected = net.model(x)
        with torch.no_grad():
            torch.testing.assert_close(exported(x), expected, rtol=1e-5, atol=1e-6)
        assert macs(exported, x, nonzero=True) == net.macs(s)
    report = runner_report(net, x)
    assert max(report.errors) < 1e-5, report.errors
    assert all(report.macs_exact)


def test_plain_copy_holds_plain_convs_computing_the_same() -> None:
    x = _inputs()
    net = SteppingNet(_built(), x[:1], N)
    plain = net.plain_copy().eval()
    kinds = [type(plain.get_submodule(name)) for name in net.standardized_convs.names]
    assert kinds == [nn.Conv2d, nn.Conv2d, timm.layers.Conv2dSame, timm.layers.Conv2dSame]
    with torch.no_grad():
        torch.testing.assert_close(plain(x), net.model(x), rtol=1e-5, atol=1e-6)


def test_sliced_execution_is_refused_by_name() -> None:
    x = _inputs()
    with pytest.raises(UnsupportedModelError) as info:
        SteppingNet(_built(), x[:1], N, execution="sliced")
    reasons: dict[str, Any] = dict(info.value.problems)
    assert "0" in reasons and "standardises" in reasons["0"]
    assert SteppingNet(_built(), x[:1], N, execution="auto").execution == "masked"


def test_remove_restores_timms_forward() -> None:
    model = _built()
    original = copy.deepcopy(model)
    x = _inputs()
    net = SteppingNet(model, x[:1], N)
    restored = net.remove()
    with torch.no_grad():
        torch.testing.assert_close(restored(x), original(x))
