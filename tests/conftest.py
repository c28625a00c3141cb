"""Shared pytest fixtures: small models and random subnet assignments (fixtures only).

The factories are session-scoped (they hold no state), so module-scoped fixtures may use them.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Iterator

import pytest
import timm
import torch
import torch.nn as nn

import nni_steppingnet.models  # noqa: F401  (registers lenet3c1l, lenet5, vgg16_cifar with timm)
from nni_steppingnet import testing

__all__ = ["tiny_model", "random_assignment", "randomize_bn", "no_orphans", "forget_nni_experiments"]

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


# The helpers live in the library (nni_steppingnet.testing) so benchmarks and users share them.
_random_assignment = testing.random_assignment
_randomize_bn = testing.randomize_bn


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


# ----------------------------------------------------- NNI experiments (psutil/NNI load lazily)
def _alive(process: Any) -> bool:
    import psutil

    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


@pytest.fixture
def forget_nni_experiments() -> Iterator[None]:
    """Drop the experiments a test started from NNI's registry (~/nni-experiments/.experiment)."""
    from nni.tools.nnictl.config_utils import Experiments

    before = set(Experiments().get_all_experiments())
    yield
    registry = Experiments()
    for experiment_id in set(registry.get_all_experiments()) - before:
        registry.remove_experiment(experiment_id)


@pytest.fixture
def no_orphans() -> Iterator[dict[int, Any]]:
    """Watch every process this test starts (NNI manager, trials): none may outlive the test."""
    import psutil

    me = psutil.Process()
    before = {p.pid for p in me.children(recursive=True)}
    seen: dict[int, psutil.Process] = {}
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            try:
                for p in me.children(recursive=True):
                    if p.pid not in before:
                        seen.setdefault(p.pid, p)
            except psutil.Error:
                pass
            stop.wait(0.2)

    watcher = threading.Thread(target=sample, daemon=True)
    watcher.start()
    yield seen
    stop.set()
    watcher.join()
    left = [p for p in seen.values() if _alive(p)]
    described = []
    for p in left:
        try:
            described.append((p.pid, " ".join(p.cmdline())[:120]))
            p.kill()
        except psutil.Error:
            pass
    assert not left, f"processes left behind: {described}"
