"""Shared pytest fixtures: small models and random subnet assignments (fixtures only).

The factories are session-scoped (they hold no state), so module-scoped fixtures may use them.
"""
from __future__ import annotations

from typing import Any, Callable

import pytest
import timm
import torch
import torch.nn as nn

import nni_steppingnet.models  # noqa: F401  (registers lenet3c1l, lenet5, vgg16_cifar with timm)
from nni_steppingnet import SteppingNet

__all__ = ["tiny_model", "random_assignment", "randomize_bn"]

TinyModelFactory = Callable[..., nn.Module]
RandomAssignment = Callable[..., torch.Tensor]
RandomizeBN = Callable[..., nn.Module]


@pytest.fixture(scope="session", autouse=True)
def _one_thread() -> Any:
    """Tiny models on a shared 2-core machine: intra-op threads only add contention (measured:
    a regnetx_002 forward at 32x32 took 0.05 s with 1 thread, 4.6 s with 2 while other jobs ran)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _tiny_model(name: str, seed: int = 0, num_classes: int = 10, **kwargs: Any) -> nn.Module:
    torch.manual_seed(seed)
    return timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)


def _random_assignment(net: SteppingNet, seed: int, num_subnets: int | None = None) -> torch.Tensor:
    n = net.num_subnets if num_subnets is None else num_subnets
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= net.num_subnets:
        raise ValueError(f"num_subnets must be an int in 1..{net.num_subnets}, got {n!r}")
    generator = torch.Generator().manual_seed(seed)
    for group in net.groups:
        values = torch.randint(1, n + 2, (group.size,), generator=generator)
        if group.size >= n:
            # Every subnet gains at least one neuron of every group that is large enough.
            slots = torch.randperm(group.size, generator=generator)[:n]
            values[slots] = torch.arange(1, n + 1)
        group.assignment = values
    return net.flat_assignment()


def _randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.running_mean is not None:
                shape = module.running_mean.shape
                module.running_mean.copy_(torch.randn(shape, generator=generator) * 0.1)
                module.running_var.copy_(torch.rand(shape, generator=generator) + 0.5)
                if module.affine:
                    module.weight.copy_(torch.rand(shape, generator=generator) + 0.5)
                    module.bias.copy_(torch.randn(shape, generator=generator) * 0.1)
    return model


@pytest.fixture(scope="session")
def tiny_model() -> TinyModelFactory:
    """``tiny_model(name, seed=0, num_classes=10, **timm_kwargs)``: a timm model, random weights
    drawn after ``torch.manual_seed(seed)`` (the paper models are registered)."""
    return _tiny_model


@pytest.fixture(scope="session")
def random_assignment() -> RandomAssignment:
    """``random_assignment(net, seed, num_subnets=None)``: give every neuron a random index in
    1..num_subnets+1 (default ``net.num_subnets``); every group with at least ``num_subnets``
    neurons gets each of 1..num_subnets at least once. Returns ``net.flat_assignment()``."""
    return _random_assignment


@pytest.fixture(scope="session")
def randomize_bn() -> RandomizeBN:
    """``randomize_bn(model, seed=0)``: random BN running stats and affine parameters, so that a
    channel read from the wrong place changes the output (fresh BN is the identity in eval)."""
    return _randomize_bn
