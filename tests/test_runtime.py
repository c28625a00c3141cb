"""IncrementalRunner: stepping reproduces every masked subnet, each step costs exactly its new MACs
(counted by torch's FlopCounterMode around the real kernels), budgets, errors and save/load.

Models are tiny (32x32 inputs, random weights and BN statistics); every check is an exact count,
an exact equality or a tolerance of 1e-5 relative to the largest logit.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, Callable

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from nni_steppingnet import CheckpointError, SteppingNet, UnsupportedModelError
from nni_steppingnet.runtime import IncrementalRunner
from nni_steppingnet.testing import FIXED_SPLIT_MODELS, FOUNDATION_MODELS

N = 4
IMG = 32
RTOL = 1e-5

#: The foundation's model list (tests/test_stepping.py): paper models and one timm CNN per family.
MODELS: list[tuple[str, dict[str, Any]]] = list(FOUNDATION_MODELS)

Builder = Callable[[str], SteppingNet]


def _inputs(batch: int, seed: int, size: int = IMG) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _randomize_biases(model: nn.Module, seed: int) -> None:
    """Nonzero Conv/Linear biases, so zero-input neurons and the logits' bias are visible."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)) and module.bias is not None:
                module.bias.copy_(torch.randn(module.bias.shape, generator=generator) * 0.1)


def _stress_assignment(net: SteppingNet, random_assignment: Callable[..., torch.Tensor], seed: int) -> None:
    """Random indices 1..N+1, then one group entirely in subnet 3 (its layers get no channel in
    subnet 1, and stages 1, 2, 4 add nothing to them) and one group only in {1, 4}."""
    random_assignment(net, seed=seed)
    middle = len(net.groups) // 2
    net.groups[middle].assignment = torch.full((net.groups[middle].size,), 3)
    other = net.groups[1 if middle != 1 else 0]
    values = torch.where(torch.arange(other.size) % 2 == 0, 1, 4)
    other.assignment = values[torch.randperm(other.size, generator=torch.Generator().manual_seed(seed))]


def _masked(net: SteppingNet, x: torch.Tensor, s: int) -> torch.Tensor:
    net.model.eval()
    with torch.no_grad(), net.subnet(s):
        return net.model(x)


def _assert_close(out: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    scale = float(ref.abs().max())
    assert scale > 0, f"{what}: reference logits are all zero; the check would be vacuous"
    err = float((out - ref).abs().max())
    assert err <= RTOL * scale, f"{what}: max abs error {err:.3e} > {RTOL} x max logit {scale:.3e}"


@pytest.fixture(scope="module")
def build(
    tiny_model: Callable[..., nn.Module],
    random_assignment: Callable[..., torch.Tensor],
    randomize_bn: Callable[..., nn.Module],
) -> Builder:
    """``build(name)``: a cached SteppingNet over a random-weight model with the stress assignment."""
    cache: dict[str, SteppingNet] = {}
    kwargs = dict(MODELS)

    def get(name: str) -> SteppingNet:
        if name not in cache:
            model = randomize_bn(tiny_model(name, seed=0, **kwargs[name]), seed=1)
            _randomize_biases(model, seed=2)
            net = SteppingNet(model, _inputs(1, seed=3), N, verify=False)
            _stress_assignment(net, random_assignment, seed=4)
            cache[name] = net
        return cache[name]

    return get


# ------------------------------------------------------------------------------ exactness
@pytest.mark.parametrize("layout", ["auto", "full"])
@pytest.mark.parametrize("name", [name for name, _ in MODELS])
def test_each_step_matches_masked_subnet_and_costs_exactly_its_new_macs(build: Builder, name: str, layout: str) -> None:
    net = build(name)
    flat = net.flat_assignment()
    hidden = [net.layer_assignment(k, flat)[0] for k, layer in enumerate(net.layers) if not layer.is_logits]
    assert any(int((a == 1).sum()) == 0 for a in hidden), "no layer without a channel in subnet 1"
    assert any(int((a == s).sum()) == 0 < int((a <= N).sum()) for a in hidden for s in range(2, N + 1)), (
        "no stage that adds nothing to a layer"
    )
    runner = IncrementalRunner(net, layout=layout)
    # Every model of the foundation's list fits the delta layout (the check would fall back).
    assert runner.layout == ("delta" if layout == "auto" else "full")
    macs = [0] + [net.macs(s) for s in range(1, N + 1)]
    for batch in (1, 8):
        x = _inputs(batch, seed=10 + batch)
        refs = [_masked(net, x, s) for s in range(1, N + 1)]
        with torch.inference_mode():
            for s in range(1, N + 1):
                with FlopCounterMode(display=False) as counter:
                    out = runner.start(x) if s == 1 else runner.step()
                assert runner.stage == s
                _assert_close(out, refs[s - 1], f"{name} batch {batch} subnet {s}")
                assert runner.macs_spent == macs[s]
                assert runner.macs_spent_total == macs[s] * batch
                assert counter.get_total_flops() == 2 * (macs[s] - macs[s - 1]) * batch
                assert runner.step_macs(s) == macs[s] - macs[s - 1]
                assert runner.macs(s) == macs[s]


def _channels_seen_by_batchnorms(runner: IncrementalRunner, x: torch.Tensor) -> list[dict[str, int]]:
    seen: list[dict[str, int]] = []

    def hook(name: str) -> Callable[..., None]:
        def record(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            seen[-1][name] = seen[-1].get(name, 0) + int(args[0].shape[1])

        return record

    handles = [
        m.register_forward_pre_hook(hook(n)) for n, m in runner.model.named_modules() if isinstance(m, nn.BatchNorm2d)
    ]
    try:
        with torch.inference_mode():
            for s in range(1, N + 1):
                seen.append({})
                runner.start(x) if s == 1 else runner.step()
    finally:
        for handle in handles:
            handle.remove()
    return seen


@pytest.mark.parametrize("name", ["resnet18", "densenet121", "mobilenetv3_small_100"])
def test_delta_layout_runs_elementwise_work_once_per_channel(build: Builder, name: str) -> None:
    """Each stage normalises only the channels it adds: over all stages every channel of a
    BatchNorm is seen once, where the full-width layout sees all of them at every stage."""
    net = build(name)
    flat = net.flat_assignment()
    x = _inputs(2, seed=13)
    delta = _channels_seen_by_batchnorms(IncrementalRunner(net), x)
    full = _channels_seen_by_batchnorms(IncrementalRunner(net, layout="full"), x)
    checked = 0
    for bn_name, positions in net.channel_modules.items():
        if not isinstance(net.model.get_submodule(bn_name), nn.BatchNorm2d):
            continue
        a = flat[positions]
        for s in range(1, N + 1):
            if bn_name in delta[s - 1] or int((a == s).sum()):
                assert delta[s - 1].get(bn_name, 0) == int((a == s).sum()), f"{bn_name} at stage {s}"
            assert full[s - 1][bn_name] == a.numel()
        checked += 1
    assert checked > 5


class _LayerScale(nn.Module):
    """A per-channel parameter used directly in forward (layer scale, as in FastViT):
    torch-pruning lists it as a bare parameter, and the delta layout slices it per stage."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.scale = nn.Parameter(torch.rand(8, 1, 1) + 0.5)
        self.conv = nn.Conv2d(8, 6, 3, padding=1)
        self.fc = nn.Linear(6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x)) * self.scale
        return self.fc(F.adaptive_avg_pool2d(self.conv(x), 1).flatten(1))


class _BufferScale(_LayerScale):
    """The same scale as a buffer: torch-pruning does not see it, so the delta layout cannot
    slice it, and the runner must fall back to the full-width layout."""

    def __init__(self) -> None:
        super().__init__()
        del self.scale
        self.register_buffer("scale", torch.rand(8, 1, 1) + 0.5)


# torch-pruning warns about the bare parameter; that is the point of the model.
@pytest.mark.filterwarnings("ignore:Unwrapped parameters detected")
def test_bare_per_channel_parameter_is_sliced_in_the_delta_layout() -> None:
    torch.manual_seed(0)
    net = SteppingNet(_LayerScale().eval(), _inputs(1, seed=0, size=16), N)
    assert set(net.channel_parameters) == {"scale"}
    generator = torch.Generator().manual_seed(1)
    for group in net.groups:
        group.assignment = torch.randint(1, N + 1, (group.size,), generator=generator)
    runner = IncrementalRunner(net)
    assert runner.layout == "delta"
    x = _inputs(2, seed=1, size=16)
    with torch.inference_mode():
        for s in range(1, N + 1):
            _assert_close(runner.start(x) if s == 1 else runner.step(), _masked(net, x, s), f"layer scale {s}")
    assert runner.model.scale.shape == (8, 1, 1)  # restored after every stage


class _ModifiesConvInput(nn.Module):
    """Scales a conv's input in place after the conv read it: the delta layout keeps the first
    stage's input by reference, so the layout check must see the difference and fall back."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.stem(x))
        y = self.conv(h)
        h.mul_(0.5)
        return self.fc(F.adaptive_avg_pool2d(y + h, 1).flatten(1))


@pytest.mark.parametrize("model_class", [_BufferScale, _ModifiesConvInput])
def test_model_outside_the_delta_layout_falls_back_to_full_width(
    model_class: type[nn.Module], caplog: pytest.LogCaptureFixture
) -> None:
    from nni_steppingnet.runtime import LayoutMismatchError

    torch.manual_seed(0)
    net = SteppingNet(model_class().eval(), _inputs(1, seed=0, size=16), N)
    generator = torch.Generator().manual_seed(1)
    for group in net.groups:
        group.assignment = torch.randint(1, N + 1, (group.size,), generator=generator)
    with caplog.at_level(logging.INFO, logger="nni_steppingnet.runtime"):
        runner = IncrementalRunner(net)
    assert runner.layout == "full"
    assert any("delta layout does not fit" in r.getMessage() for r in caplog.records)
    x = _inputs(2, seed=1, size=16)
    with torch.inference_mode():
        for s in range(1, N + 1):
            _assert_close(runner.start(x) if s == 1 else runner.step(), _masked(net, x, s), f"fallback {s}")
    if model_class is _BufferScale:
        forced = IncrementalRunner(net, layout="delta")
        with pytest.raises(LayoutMismatchError, match="layout='auto'"):
            forced.run(x)
    with pytest.raises(ValueError, match="layout must be one of"):
        IncrementalRunner(net, layout="cumulative")


def test_construction_produced_net_with_pruning(tiny_model: Callable[..., nn.Module]) -> None:
    from nni_steppingnet.construct import ConstructionConfig, Constructor

    model = tiny_model("lenet5", seed=0, width=2.0)
    x = _inputs(2, seed=1)
    net = SteppingNet(model, x, N)
    generator = torch.Generator().manual_seed(2)
    loader = [
        (torch.randn(8, 3, IMG, IMG, generator=generator), torch.randint(0, 10, (8,), generator=generator))
        for _ in range(2)
    ]
    config = ConstructionConfig(
        budgets=[0.1, 0.25, 0.5, 0.8],
        reference_macs=net.full_macs,
        batches_per_iteration=1,
        iterations=4,
        prune_threshold=0.02,
    )
    Constructor(net, config, loader).run()
    assert sum(int((~m).sum()) for m in net.prune_masks.values()) > 0, "construction pruned nothing"
    assert int(net.flat_assignment()[:-1].max()) > 1, "construction moved no neuron"
    runner = IncrementalRunner(net)
    with torch.inference_mode():
        for s in range(1, N + 1):
            out = runner.start(x) if s == 1 else runner.step()
            _assert_close(out, _masked(net, x, s), f"constructed subnet {s}")
            assert runner.macs_spent == net.macs(s)


class _SE(nn.Module):
    def __init__(self, channels: int, reduced: int) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(channels, reduced, 1)
        self.expand = nn.Conv2d(reduced, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.expand(F.relu(self.reduce(x.mean((2, 3), keepdim=True)))))


class _Structures(nn.Module):
    """Reflect padding, residual + depthwise, grouped conv, SE, concat, in-place activations right
    after biased convs, adaptive pooling (any input size) and flatten -> Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, padding_mode="reflect", bias=False)
        self.bn0 = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.grouped = nn.Conv2d(8, 12, 3, padding=1, groups=2, bias=False)
        self.bn2 = nn.BatchNorm2d(12)
        self.se = _SE(12, 4)
        self.branch = nn.Conv2d(8, 6, 1)
        self.act = nn.Hardswish(inplace=True)
        self.head = nn.Conv2d(18, 16, 1, stride=2)
        self.act2 = nn.Hardswish(inplace=True)
        self.fc = nn.Linear(16 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn0(self.stem(x)))
        x = x + self.bn1(self.dw(x))
        y = self.se(F.relu(self.bn2(self.grouped(x))))
        z = self.act(self.branch(x))
        x = self.act2(self.head(torch.cat([y, z], 1)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 2), 1))


def _structures_net(randomize_bn: Callable[..., nn.Module], seed: int = 0) -> SteppingNet:
    torch.manual_seed(seed)
    model = randomize_bn(_Structures(), seed=seed + 1)
    _randomize_biases(model, seed=seed + 2)
    net = SteppingNet(model, _inputs(1, seed=seed + 3, size=16), N)
    generator = torch.Generator().manual_seed(seed + 4)
    for group in net.groups:
        group.assignment = torch.randint(1, N + 2, (group.size,), generator=generator)
    groups = {g.name: g for g in net.groups}
    # The stem/dw group starts at subnet 2: the branch conv's subnet-1 neurons have no input at
    # stage 1 and output only their bias (then an in-place Hardswish).
    groups["dw"].assignment = torch.tensor([2, 2, 3, 4, 2, 3, 5, 4])
    groups["branch"].assignment = torch.tensor([1, 1, 2, 3, 4, 1])
    return net


def test_general_structures_and_hand_set_pruning(randomize_bn: Callable[..., nn.Module]) -> None:
    net = _structures_net(randomize_bn)
    generator = torch.Generator().manual_seed(7)
    for layer in net.layers:
        weight = net.original_weight(layer.name)
        net.prune_masks[layer.name] = torch.rand(weight.shape, generator=generator) > 0.3
    net.invalidate()
    runner = IncrementalRunner(net)
    for batch in (1, 8):
        x = _inputs(batch, seed=batch, size=16)
        with torch.inference_mode():
            for s in range(1, N + 1):
                out = runner.start(x) if s == 1 else runner.step()
                _assert_close(out, _masked(net, x, s), f"structures batch {batch} subnet {s}")
                assert runner.macs_spent == net.macs(s)
    # Pruned entries are not counted: the dense count of the same masks is larger.
    net.prune_masks = {}
    net.invalidate()
    assert runner.macs(N) < net.macs(N)


# --------------------------------------------------------------------------- budgets and API
@pytest.fixture(scope="module")
def lenet(build: Builder) -> SteppingNet:
    return build("lenet5")


def test_step_before_start_and_after_last_subnet_raise(lenet: SteppingNet) -> None:
    runner = IncrementalRunner(lenet)
    assert runner.stage == 0
    with pytest.raises(RuntimeError, match=r"before runner.start\(x\)"):
        runner.step()
    runner.run(_inputs(2, seed=0))
    assert runner.stage == N
    with pytest.raises(RuntimeError, match=f"already at the last subnet \\({N}\\)"):
        runner.step()
    with pytest.raises(ValueError, match="batch dimension"):
        runner.start(torch.tensor(1.0))
    with pytest.raises(RuntimeError, match="got 4 input channels at stage 1.*check its shape"):
        runner.start(torch.randn(2, 4, IMG, IMG))
    assert runner.stage == 0
    with pytest.raises(TypeError, match="expects a SteppingNet"):
        IncrementalRunner(lenet.model)  # type: ignore[arg-type]


def test_run_until_and_max_macs(lenet: SteppingNet) -> None:
    runner = IncrementalRunner(lenet)
    x = _inputs(3, seed=5)
    macs = [lenet.macs(s) for s in range(1, N + 1)]
    out = runner.run(x, until=2)
    assert runner.stage == 2 and runner.macs_spent == macs[1]
    _assert_close(out, _masked(lenet, x, 2), "until=2")
    runner.run(x)
    assert runner.stage == N
    out = runner.run(x, max_macs=macs[2])
    assert runner.stage == 3 and runner.macs_spent == macs[2]
    _assert_close(out, _masked(lenet, x, 3), "max_macs=macs(3)")
    runner.run(x, max_macs=macs[2] - 1)
    assert runner.stage == 2
    runner.run(x, max_macs=10**12)
    assert runner.stage == N
    with pytest.raises(ValueError, match=f"below subnet 1's {macs[0]:,} MACs"):
        runner.run(x, max_macs=macs[0] - 1)
    for bad in (
        {"until": 0},
        {"until": N + 1},
        {"until": 2.0},
        {"max_macs": 0},
        {"max_macs": True},
        {"deadline_s": 0.0},
        {"deadline_s": float("nan")},
        {"until": 2, "max_macs": 10},
    ):
        with pytest.raises(ValueError):
            runner.run(x, **bad)


def test_max_macs_at_an_input_size_never_seen(randomize_bn: Callable[..., nn.Module]) -> None:
    net = _structures_net(randomize_bn, seed=10)
    runner = IncrementalRunner(net)
    x = _inputs(2, seed=0, size=24)  # the net was traced at 16x16
    predicted = [runner.macs(s, x) for s in range(1, N + 1)]
    assert predicted[0] > net.macs(1)  # more output positions at 24x24
    out = runner.run(x, max_macs=predicted[1])
    assert runner.stage == 2 and runner.macs_spent == predicted[1]
    _assert_close(out, _masked(net, x, 2), "24x24 subnet 2")
    with FlopCounterMode(display=False) as counter:
        runner.step()
    assert counter.get_total_flops() == 2 * 2 * (predicted[2] - predicted[1])


@pytest.mark.parametrize("layout", ["auto", "full"])
def test_asking_macs_for_another_size_mid_run_keeps_the_run(
    randomize_bn: Callable[..., nn.Module], layout: str
) -> None:
    net = _structures_net(randomize_bn, seed=20)
    runner = IncrementalRunner(net, layout=layout)
    x = _inputs(2, seed=1, size=16)
    with torch.inference_mode():
        runner.start(x)
        assert runner.macs(2, _inputs(1, seed=2, size=24)) > runner.macs(2)  # a forward at 24x24
        out = runner.step()
    assert runner.stage == 2 and runner.macs_spent == net.macs(2)
    _assert_close(out, _masked(net, x, 2), f"{layout}: subnet 2 after a MAC query at another size")


def test_deadline(lenet: SteppingNet, caplog: pytest.LogCaptureFixture) -> None:
    runner = IncrementalRunner(lenet)
    x = _inputs(2, seed=6)
    out = runner.run(x, deadline_s=1e6)
    assert runner.stage == N
    _assert_close(out, _masked(lenet, x, N), "deadline 1e6 s")
    with caplog.at_level(logging.WARNING, logger="nni_steppingnet.runtime"):
        out = runner.run(x, deadline_s=1e-9)
    assert runner.stage == 1
    _assert_close(out, _masked(lenet, x, 1), "deadline 1 ns")
    assert any("over the deadline" in r.getMessage() for r in caplog.records)


def test_deadline_never_predicts_a_step_cheaper_than_the_cheapest_stage(
    tiny_model: Callable[..., nn.Module], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a clock where every stage takes one second whatever its MACs, a 1.5 s deadline
    allows subnet 1 only; seconds-per-MAC alone would predict the small step 2 to fit."""
    import nni_steppingnet.runtime as runtime_module

    net = SteppingNet(tiny_model("lenet5", seed=4), _inputs(1, seed=0), N, verify=False)
    for group in net.groups:
        values = torch.ones(group.size, dtype=torch.long)
        values[-3:] = torch.tensor([2, 3, 4])[: min(3, group.size)]
        group.assignment = values
    runner = IncrementalRunner(net)
    assert 0 < runner.step_macs(2) < 0.5 * runner.macs(1), "step 2 must be cheap in MACs"
    x = _inputs(2, seed=14)
    ticks = iter(range(1000))
    monkeypatch.setattr(runtime_module.time, "perf_counter", lambda: float(next(ticks)))
    out = runner.run(x, deadline_s=1.5)
    monkeypatch.undo()
    assert runner.stage == 1
    _assert_close(out, _masked(net, x, 1), "deadline 1.5 fake seconds")


def test_works_without_inference_mode_and_in_float64(lenet: SteppingNet) -> None:
    runner = IncrementalRunner(lenet)
    x = _inputs(2, seed=8)
    out = runner.start(x)  # grad mode on: the runner uses no_grad itself
    assert not out.requires_grad
    _assert_close(out, _masked(lenet, x, 1), "grad mode subnet 1")
    runner.to(torch.float64)
    assert runner.stage == 0  # moving resets the caches
    model64 = lenet.model.double()
    try:
        x64 = x.double()
        for s in range(1, N + 1):
            out = runner.start(x64) if s == 1 else runner.step()
            assert out.dtype == torch.float64
            ref = _masked(lenet, x64, s)
            assert float((out - ref).abs().max()) <= 1e-12 * float(ref.abs().max())
        runner.start(x64)
        runner.model.double()  # moving the model directly drops the caches
        with pytest.raises(RuntimeError, match="no cached output of the earlier stages"):
            runner.step()
        assert runner.stage == 0
    finally:
        model64.float()


def test_runner_is_independent_of_later_changes_to_the_net(
    tiny_model: Callable[..., nn.Module], random_assignment: Callable[..., torch.Tensor]
) -> None:
    net = SteppingNet(tiny_model("lenet5", seed=3), _inputs(1, seed=0), N, verify=False)
    random_assignment(net, seed=1)
    x = _inputs(2, seed=2)
    runner = IncrementalRunner(net)
    before = runner.run(x, until=2).clone()
    random_assignment(net, seed=9)
    with torch.no_grad():
        net.original_weight("features.0").mul_(2.0)
    assert torch.equal(runner.run(x, until=2), before)


def test_idle_stage_skips_the_forward_and_returned_logits_are_the_callers(
    tiny_model: Callable[..., nn.Module], randomize_bn: Callable[..., nn.Module]
) -> None:
    model = randomize_bn(tiny_model("lenet5", seed=5), seed=6)
    net = SteppingNet(model, _inputs(1, seed=0), N, verify=False)
    generator = torch.Generator().manual_seed(7)
    choices = torch.tensor([1, 2, 4, 5])  # no neuron in subnet 3: stage 3 is idle
    for group in net.groups:
        group.assignment = choices[torch.randint(0, 4, (group.size,), generator=generator)]
    assert net.macs(3) == net.macs(2) < net.macs(4)
    runner = IncrementalRunner(net)
    forwards: list[int] = []
    runner.model.register_forward_pre_hook(lambda module, args: forwards.append(1))
    x = _inputs(4, seed=8)
    runner.start(x)
    out = runner.step()
    _assert_close(out, _masked(net, x, 2), "subnet 2")
    out.mul_(0.0)  # the caller's tensor, not the runner's cache
    assert len(forwards) == 2
    with FlopCounterMode(display=False) as counter:
        out = runner.step()
    assert len(forwards) == 2 and counter.get_total_flops() == 0
    assert runner.stage == 3 and runner.macs_spent == net.macs(3)
    _assert_close(out, _masked(net, x, 3), "idle subnet 3")
    out.add_(1.0)
    _assert_close(runner.step(), _masked(net, x, 4), "subnet 4 after the caller changed outputs")
    assert len(forwards) == 3


def test_layer_with_custom_forward_is_rejected() -> None:
    class ScaledConv(nn.Conv2d):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x) * 2.0

    model = nn.Sequential(ScaledConv(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    net = SteppingNet(model, torch.randn(1, 3, 8, 8), 2, verify=False)
    with pytest.raises(UnsupportedModelError, match=r"- 0: .*ScaledConv overrides forward\(\)"):
        IncrementalRunner(net)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_cuda_matches_cpu(lenet: SteppingNet) -> None:
    runner = IncrementalRunner(lenet)
    x = _inputs(8, seed=9)
    cpu = [runner.run(x, until=s).clone() for s in range(1, N + 1)]
    runner.to("cuda")
    with torch.inference_mode():
        for s in range(1, N + 1):
            out = runner.start(x.cuda()) if s == 1 else runner.step()
            assert out.is_cuda
            _assert_close(out.cpu(), cpu[s - 1], f"cuda subnet {s}")
            assert runner.macs_spent == lenet.macs(s)


# ------------------------------------------------------------------------------ save / load
def test_save_load_round_trip(build: Builder, tmp_path: Path) -> None:
    net = build("resnet18")
    runner = IncrementalRunner(net)
    path = tmp_path / "runner.pt"
    runner.save(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runner.pt"]  # no temp file left
    loaded = IncrementalRunner.load(path, timm.create_model("resnet18", num_classes=10))
    assert loaded.layout == runner.layout == "delta"  # BatchNorm channel plans travel too
    x = _inputs(2, seed=11)
    with torch.inference_mode():
        for s in range(1, N + 1):
            a = runner.start(x) if s == 1 else runner.step()
            b = loaded.start(x) if s == 1 else loaded.step()
            assert torch.equal(a, b), f"subnet {s} differs after save/load"
            assert loaded.macs_spent == net.macs(s)
    assert loaded.macs(N) == net.macs(N)  # reference input size travels with the file
    with pytest.raises(CheckpointError, match=r"module 'layer2' in the file, 'layer1\.2' in this model"):
        IncrementalRunner.load(path, timm.create_model("resnet34", num_classes=10))


def test_load_into_a_different_width_names_the_module(tiny_model: Callable[..., nn.Module], tmp_path: Path) -> None:
    net = SteppingNet(tiny_model("lenet5", width=2.0), _inputs(1, seed=0), N, verify=False)
    path = tmp_path / "lenet.pt"
    IncrementalRunner(net).save(path)
    with pytest.raises(
        CheckpointError,
        match=r"'features\.0' is torch\.nn\.modules\.conv\.Conv2d with "
        r"weight \(12, 3, 5, 5\).*weight \(9, 3, 5, 5\)",
    ):
        IncrementalRunner.load(path, timm.create_model("lenet5", num_classes=10, width=1.5))
    with pytest.raises(CheckpointError, match="different model"):
        IncrementalRunner.load(path, timm.create_model("lenet5", num_classes=7, width=2.0))


def test_load_rejects_foreign_and_missing_files(tiny_model: Callable[..., nn.Module], tmp_path: Path) -> None:
    model = tiny_model("lenet5")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a runner file"):
        IncrementalRunner.load(tmp_path / "other.pt", model)
    (tmp_path / "text.pt").write_text("hello")
    with pytest.raises(CheckpointError, match="not a readable runner file"):
        IncrementalRunner.load(tmp_path / "text.pt", model)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        IncrementalRunner.load(tmp_path / "missing.pt", model)
    net = SteppingNet(model, _inputs(1, seed=0), N, verify=False)
    with pytest.raises(ValueError, match="is a directory"):
        IncrementalRunner(net).save(tmp_path)


_LOAD_WITHOUT_TRAINING = textwrap.dedent("""
    import sys
    import torch
    torch.set_num_threads(1)
    sys.modules["torch_pruning"] = None          # any import of torch_pruning now fails
    try:
        import nni_steppingnet
    except ImportError as exc:
        print("PACKAGE-NEEDS-TORCH-PRUNING", exc)
        raise SystemExit(0)
    import timm
    import nni_steppingnet.models
    from nni_steppingnet.runtime import IncrementalRunner
    runner = IncrementalRunner.load(sys.argv[1], timm.create_model("lenet5", num_classes=10))
    expected = torch.load(sys.argv[2])
    out = runner.run(expected["x"], until=3)
    assert torch.equal(out, expected["out"]), "loaded runner computes different logits"
    assert "nni_steppingnet.stepping" not in sys.modules and "nni_steppingnet.graph" not in sys.modules
    print("LOADED-OK")
""")


def test_load_needs_no_training_code(lenet: SteppingNet, tmp_path: Path) -> None:
    runner = IncrementalRunner(lenet)
    x = _inputs(2, seed=12)
    torch.save({"x": x, "out": runner.run(x, until=3)}, tmp_path / "expected.pt")
    runner.save(tmp_path / "runner.pt")
    result = subprocess.run(
        [sys.executable, "-c", _LOAD_WITHOUT_TRAINING, str(tmp_path / "runner.pt"), str(tmp_path / "expected.pt")],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    if "PACKAGE-NEEDS-TORCH-PRUNING" in result.stdout:
        pytest.skip(
            "nni_steppingnet/__init__.py imports torch_pruning eagerly (via stepping.py), so the "
            "package cannot be imported without it; runtime.py itself does not need it"
        )
    assert "LOADED-OK" in result.stdout


@pytest.mark.parametrize(("name", "kwargs"), FIXED_SPLIT_MODELS, ids=[name for name, _ in FIXED_SPLIT_MODELS])
def test_fixed_split_blocks_run_the_delta_layout_exactly(
    name: str, kwargs: dict[str, Any], random_assignment: Callable[..., Any]
) -> None:
    """Blocks that split by widths stored at construction (.fixed_splits) split each stage's new
    channels: ``"auto"`` keeps the delta layout, every stage equals the masked subnet and spends
    exactly its MACs."""
    from nni_steppingnet.testing import randomize_bn, randomize_parameters, runner_report

    model = randomize_parameters(timm.create_model(name, pretrained=False, num_classes=10, **kwargs), seed=0)
    randomize_bn(model, seed=0)
    x = torch.randn(2, 3, 32, 32)
    net = SteppingNet(model.eval(), x[:1], 4)
    random_assignment(net, 0)
    report = runner_report(net, x)
    assert report.layout == "delta"
    assert max(report.errors) < 1e-5 and all(report.macs_exact), report
