"""Alternative neuron criteria (class-based, trainable noise) against hand computations."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from nni_steppingnet import SteppingNet
from nni_steppingnet.criteria import (
    CRITERIA,
    ClassScorer,
    GradientScorer,
    NoiseScorer,
    class_scores,
    group_means,
    make_scorer,
)
from nni_steppingnet.importance import ImportanceTracker


class _Small(nn.Module):
    """conv -> BN -> ReLU -> pool -> Linear hidden (no norm) -> ReLU -> classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.hidden = nn.Linear(4, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.conv(x)), inplace=True)
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.head(F.relu(self.hidden(x)))


def _net(seed: int = 0, num_subnets: int = 2) -> SteppingNet:
    torch.manual_seed(seed)
    model = _Small()
    with torch.no_grad():  # non-trivial BN affine so both gate terms matter
        model.bn.weight.uniform_(0.5, 1.5)
        model.bn.bias.uniform_(-0.5, 0.5)
    return SteppingNet(model, torch.zeros(2, 3, 6, 6), num_subnets)


def _batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(12, 3, 6, 6, generator=gen), torch.tensor([0, 1, 2] * 4)


def _keep_output(store: dict[str, torch.Tensor]) -> Any:
    """A forward hook that keeps the module's output (with its gradient) in ``store['h']``."""

    def keep(module: nn.Module, inputs: Any, out: torch.Tensor) -> None:
        out.retain_grad()
        store["h"] = out

    return keep


def test_class_scores_hand_computed() -> None:
    # two groups: neurons 0-1 and 2-4; three classes
    per_class = torch.tensor([[1.0, 3.0, 2.0, 2.0, 2.0], [4.0, 0.0, 1.0, 0.0, 5.0], [1.0, 1.0, 0.0, 3.0, 3.0]])
    member = torch.tensor([True, True, True, True, True])
    # group means per class: g0 [2, 2, 1], g1 [2, 2, 2]
    ratio = torch.tensor(
        [[0.5, 1.5, 1.0, 1.0, 1.0], [2.0, 0.0, 0.5, 0.0, 2.5], [1.0, 1.0, 0.0, 1.5, 1.5]], dtype=torch.float64
    )
    count = (ratio >= 1.0).sum(0).double()
    mean = ratio.mean(0)
    expected = (count + mean / (1 + mean)).float()
    got = class_scores(per_class, [0, 2, 5], member)
    assert torch.allclose(got, expected)
    assert got.floor().tolist() == [2.0, 2.0, 1.0, 2.0, 3.0]
    # neurons outside the subnet score 0 and do not enter their group's mean
    member = torch.tensor([True, True, True, True, False])
    got = class_scores(per_class, [0, 2, 5], member)
    assert got[4] == 0.0
    assert torch.allclose(
        group_means(per_class, [0, 2, 5], member)[:, 2], torch.tensor([2.0, 0.5, 1.5], dtype=torch.float64)
    )
    with pytest.raises(ValueError, match="threshold must be > 0"):
        class_scores(per_class, [0, 2, 5], member, threshold=0.0)


def test_class_importance_equals_per_class_gate_gradients() -> None:
    """One backward with per-sample gates gives, per class, |dL_c/dr_j| of the class's share of
    the loss: for BN neurons gamma*dL_c/dgamma + beta*dL_c/dbeta (importance.py's gate), for the
    hidden Linear the gate on its output."""
    net = _net()
    x, y = _batch()
    scorer = ClassScorer(net)
    assert scorer.num_classes == 3
    with scorer.observe(2, y):
        with net.subnet(2):
            logits = net.model(x)
        loss = F.cross_entropy(logits, y)
        with scorer.collect(subnet=2):
            loss.backward()
    scorer.close()
    model = net.model
    expected = torch.zeros(3, net.num_neurons)
    bn_pos = net.channel_modules["bn"]
    hidden_k = [k for k, layer in enumerate(net.layers) if layer.name == "hidden"][0]
    hidden_pos = net.index.out_positions[hidden_k]
    for c in range(3):
        model.zero_grad()
        store: dict[str, torch.Tensor] = {}
        handle = model.hidden.register_forward_hook(_keep_output(store))
        with net.subnet(2):
            logits = model(x)
        handle.remove()
        per_sample = F.cross_entropy(logits, y, reduction="none")
        (per_sample * (y == c)).sum().div(y.numel()).backward()
        bn_gate = model.bn.weight * model.bn.weight.grad + model.bn.bias * model.bn.bias.grad
        expected[c, bn_pos] = bn_gate.detach().abs()
        h = store["h"]
        expected[c, hidden_pos] = (h.grad * h).sum(0).detach().abs()
    assert torch.allclose(scorer.per_class[1], expected, rtol=1e-4, atol=1e-6)
    assert int(torch.count_nonzero(scorer.per_class[0])) == 0
    assert scorer.batches.tolist() == [0, 1]


def test_gates_and_zero_noise_leave_the_forward_unchanged() -> None:
    net = _net()
    x, y = _batch()
    with net.subnet(1):
        reference = net.model(x)
    scorer = ClassScorer(net)
    with scorer.observe(1, y), net.subnet(1):
        gated = net.model(x)
    assert torch.allclose(gated, reference, atol=1e-6)
    scorer.close()
    noise = NoiseScorer(net, init_noise=1e-3)
    with torch.no_grad():
        noise.rho.fill_(-80.0)  # exp(-80) ~ 0: no noise
    with noise.observe(1, y), net.subnet(1):
        quiet = net.model(x)
    assert torch.allclose(quiet, reference, atol=1e-6)
    with net.subnet(1):  # outside observe() nothing is installed
        assert torch.equal(net.model(x), reference)


def test_noise_is_relative_and_constant_over_positions() -> None:
    net = _net()
    net.model.eval()  # fixed BN statistics: the conv output is the only source of change
    x, y = _batch()
    scorer = NoiseScorer(net, init_noise=0.5)
    seen: dict[str, torch.Tensor] = {}
    handle = net.model.bn.register_forward_hook(lambda m, i, o: seen.__setitem__("bn", o.detach().clone()))
    with net.subnet(2):
        net.model(x)
    clean = seen["bn"]
    # the scorer's hook was registered first, so this hook sees the noisy output
    with scorer.observe(2, y), net.subnet(2):
        net.model(x)
    handle.remove()
    noisy = seen["bn"]
    diff = noisy - clean
    # one draw per sample and channel, the same at every position
    assert torch.allclose(diff, diff[:, :, :1, :1].expand_as(diff), atol=1e-6)
    assert float(diff.abs().max()) > 0


def test_noise_rewards_noise_where_the_loss_does_not_care() -> None:
    net = _net()
    x, y = _batch()
    scorer = NoiseScorer(net, noise_weight=1.0, noise_lr=0.1, init_noise=0.05)
    start = scorer.rho.detach().clone()
    for _ in range(5):
        with scorer.observe(1, y):
            penalty = scorer.penalty(1)
            assert isinstance(penalty, torch.Tensor)
            with scorer.collect(subnet=1):
                penalty.backward()  # no task loss at all: only the reward for noise
        scorer.after_step()
    assert bool((scorer.rho[0] > start[0]).all())
    assert torch.equal(scorer.rho[1], start[1])  # subnet 2's noise was not trained
    scores = scorer.scores
    assert torch.allclose(scores[0], (-scorer.rho[0].detach()).exp())
    net.groups[0].assignment = torch.tensor([2] * net.groups[0].size)
    assert bool((scorer.scores[0, : net.groups[0].size] == 0).all())  # not in subnet 1: 0
    with torch.no_grad():
        scorer.rho.fill_(100.0)
    scorer.rho.grad = torch.zeros_like(scorer.rho)
    scorer.after_step()
    assert math.isclose(float(scorer.rho.detach().max()), math.log(10.0), rel_tol=1e-6)  # clamped


def test_criterion_is_eq3_of_the_scores() -> None:
    net = _net()
    x, y = _batch()
    scorer = ClassScorer(net)
    for k in (1, 2):
        with scorer.observe(k, y):
            with net.subnet(k):
                loss = F.cross_entropy(net.model(x), y)
            with scorer.collect(subnet=k):
                loss.backward()
    scores = scorer.scores
    assert torch.allclose(scorer.criterion(2.0), scores[0] + 2.0 * scores[1])
    assert torch.equal(scorer.normalized_scores(), scores)


def test_gradient_scorer_is_the_tracker() -> None:
    net = _net()
    x, y = _batch()
    scorer, tracker = GradientScorer(net), ImportanceTracker(net)
    with scorer.observe(2, y):
        with net.subnet(2):
            loss = F.cross_entropy(net.model(x), y) + scorer.penalty(2)
        with scorer.collect(subnet=2), tracker.collect(subnet=2):
            loss.backward()
    scorer.after_step()
    assert torch.equal(scorer.scores, tracker.scores) and float(scorer.scores.sum()) > 0
    assert torch.equal(scorer.criterion(1.5), tracker.criterion(1.5))


def test_state_round_trip_and_errors() -> None:
    net = _net()
    x, y = _batch()
    for name in CRITERIA:
        scorer = make_scorer(name, net)
        with scorer.observe(1, y):
            with net.subnet(1):
                loss = F.cross_entropy(net.model(x), y) + scorer.penalty(1)
            with scorer.collect(subnet=1):
                loss.backward()
        scorer.after_step()
        state = scorer.state_dict()
        other = make_scorer(name, net)
        other.load_state_dict(state)
        assert torch.equal(other.scores, scorer.scores), name
        scorer.close()
        other.close()
    with pytest.raises(ValueError, match="unknown criterion 'taylor'; choose from gradient, class, noise"):
        make_scorer("taylor", net)
    scorer = ClassScorer(net)
    with pytest.raises(RuntimeError, match="inside observe"):
        with scorer.collect(subnet=1):
            pass
    with pytest.raises(ValueError, match="subnet must be an int in 1..2"):
        with scorer.observe(3, y):
            pass
    with pytest.raises(ValueError, match="shape"):
        scorer.load_state_dict({"per_class": torch.zeros(1, 3, 2), "batches": torch.zeros(2)})
    with pytest.raises(ValueError, match="noise_weight must be a positive number"):
        NoiseScorer(net, noise_weight=0.0)
    with pytest.raises(ValueError, match="num_classes must be an int >= 2"):
        ClassScorer(net, num_classes=1)
    with pytest.raises(TypeError, match="needs a SteppingNet"):
        ClassScorer(nn.Linear(2, 2))  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["class", "noise"])
def test_construction_runs_with_each_criterion(name: str) -> None:
    from torch.utils.data import DataLoader, TensorDataset

    from nni_steppingnet.construction import ConstructionConfig, Constructor

    net = _net()
    gen = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(48, 3, 6, 6, generator=gen), torch.arange(48) % 3)
    reference = net.macs(2)
    config = ConstructionConfig(
        budgets=[0.4, 0.8], reference_macs=reference, batches_per_iteration=2, iterations=4, criterion=name
    )
    constructor = Constructor(net, config, DataLoader(data, batch_size=12, shuffle=True))
    assert type(constructor.tracker).name == name
    result = constructor.run()
    assert result.all_met and all(r <= b for r, b in zip(result.mac_ratios, [0.4, 0.8]))
    assert int(constructor.tracker.batches.sum()) == 0  # reset after the last iteration
    with pytest.raises(ValueError, match="criterion must be one of gradient, class, noise"):
        ConstructionConfig(budgets=[0.4, 0.8], reference_macs=reference, criterion="taylor")


@pytest.mark.parametrize("name", ["class", "noise"])
def test_sliced_and_masked_execution_score_alike(name: str) -> None:
    """Under sliced execution a layer's output holds only the subnet's channels; the scorers map
    them back to their neurons and score as under masks (up to float rounding)."""
    results = []
    for execution in ("masked", "sliced"):
        net = _net()
        if not hasattr(net, "set_execution"):
            pytest.skip("this SteppingNet has a single (masked) execution")
        net.groups[0].assignment = torch.tensor([1, 2, 1, 2])  # conv/BN channels 1 and 3 in subnet 2
        net.set_execution(execution)
        torch.manual_seed(5)
        scorer = make_scorer(name, net)
        x, y = _batch()
        with scorer.observe(1, y):
            with net.subnet(1):
                loss = F.cross_entropy(net.model(x), y) + scorer.penalty(1)
            with scorer.collect(subnet=1):
                loss.backward()
        scorer.after_step()
        results.append(scorer.scores.clone())
        scorer.close()
    assert torch.allclose(results[0], results[1], rtol=1e-4, atol=1e-6)
    assert float(results[0][0].abs().sum()) > 0
