"""Neuron importance (eq. 2) and the selection criterion (eq. 3), against hand computations."""
from __future__ import annotations

import math
from typing import Any, Callable

import pytest
import torch
import torch.nn as nn

from nni_steppingnet import SteppingNet
from nni_steppingnet.importance import ImportanceTracker, criterion
from nni_steppingnet.train import beta_suppression


def _two_layer(num_subnets: int = 3) -> SteppingNet:
    """x[3] -> Linear(3, 2) -> ReLU -> Linear(2, 2) (classifier), with hand-picked weights."""
    model = nn.Sequential(nn.Linear(3, 2), nn.ReLU(), nn.Linear(2, 2))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, 0.0, 1.0], [0.5, -1.0, 2.0]]))
        model[0].bias.copy_(torch.tensor([0.5, 3.0]))
        model[2].weight.copy_(torch.tensor([[1.0, 2.0], [-1.0, 1.0]]))
        model[2].bias.copy_(torch.tensor([0.0, 0.0]))
    return SteppingNet(model, torch.zeros(2, 3), num_subnets)


X = torch.tensor([[1.0, 2.0, 0.0], [0.0, 1.0, -1.0]])
COEF = torch.tensor([1.0, 2.0])


def _backward(net: SteppingNet, tracker: ImportanceTracker | None, subnet: int, coef: torch.Tensor) -> None:
    with net.subnet(subnet):
        out = net.model(X)
    loss = (out * coef).sum()
    if tracker is None:
        loss.backward()
    else:
        with tracker.collect(subnet=subnet):
            loss.backward()


def test_scores_match_hand_computation() -> None:
    # z = W1 x (pre-bias): sample 1 -> [1, -1.5], sample 2 -> [-1, -3]; h = z + b1 -> [1.5, 1.5],
    # [-0.5, 0]: ReLU passes only sample 1. dL/d relu = W2^T coef = [-1, 4].
    # dL/dr_0 = -1 * 1 = -1, dL/dr_1 = 4 * -1.5 = -6 -> |.| = [1, 6].
    net = _two_layer()
    tracker = ImportanceTracker(net)
    _backward(net, tracker, 2, COEF)
    assert tracker.scores.shape == (3, 2)
    assert torch.allclose(tracker.scores, torch.tensor([[0.0, 0.0], [1.0, 6.0], [0.0, 0.0]]))
    # The absolute value is taken per batch: the opposite loss adds, it does not cancel.
    _backward(net, tracker, 2, -COEF)
    assert torch.allclose(tracker.scores[1], torch.tensor([2.0, 12.0]))
    assert tracker.batches.tolist() == [0, 2, 0]


def test_masked_neuron_scores_zero_and_no_collection_outside_context() -> None:
    net = _two_layer()
    net.groups[0].assignment = torch.tensor([1, 2])
    tracker = ImportanceTracker(net)
    # In subnet 1 neuron 1 is masked (its pre-bias sum is 0); neuron 0 is unchanged.
    _backward(net, tracker, 1, COEF)
    assert torch.allclose(tracker.scores[0], torch.tensor([1.0, 0.0]))
    _backward(net, None, 1, COEF)  # outside collect(): ignored
    _backward(net, None, 3, COEF)
    assert torch.allclose(tracker.scores, torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 0.0]]))
    tracker.reset()
    assert int(torch.count_nonzero(tracker.scores)) == 0 and tracker.batches.tolist() == [0, 0, 0]


def test_collect_rejects_bad_subnet_and_nesting() -> None:
    tracker = ImportanceTracker(_two_layer())
    with pytest.raises(ValueError, match="subnet must be an int in 1..3"):
        with tracker.collect(subnet=4):
            pass
    with tracker.collect(subnet=1):
        with pytest.raises(RuntimeError, match="does not nest"):
            with tracker.collect(subnet=2):
                pass


def test_tracker_must_be_created_before_suppression() -> None:
    net = _two_layer()
    with beta_suppression(net, 2, 0.5):
        with pytest.raises(RuntimeError, match="before entering beta_suppression"):
            ImportanceTracker(net)
    ImportanceTracker(net)  # fine once the suppression has ended


def test_suppression_does_not_change_scores() -> None:
    net = _two_layer()
    net.groups[0].assignment = torch.tensor([1, 2])
    tracker = ImportanceTracker(net)
    _backward(net, tracker, 3, COEF)
    plain = tracker.scores.clone()
    tracker.reset()
    with beta_suppression(net, 3, 0.5):
        _backward(net, tracker, 3, COEF)
    assert torch.equal(tracker.scores, plain)


def test_scores_equal_activation_gradient_product_on_cnn(
    tiny_model: Callable[..., nn.Module], random_assignment: Callable[..., torch.Tensor]
) -> None:
    """Tracker (weight x weight-gradient form) == sum of grad x pre-bias output per channel."""
    model = tiny_model("lenet5", seed=0, in_chans=1, img_size=12, width=0.5)
    net = SteppingNet(model, torch.randn(2, 1, 12, 12), 3)
    random_assignment(net, seed=1)
    tracker = ImportanceTracker(net)
    expected = torch.zeros(net._num_neurons + 1, dtype=torch.float64)
    saved: dict[int, torch.Tensor] = {}

    def make_hook(k: int) -> Any:
        def hook(module: nn.Module, args: Any, output: torch.Tensor) -> None:
            bias = module.bias
            pre = output.detach().clone()
            if bias is not None:
                pre = pre - bias.detach().reshape((1, -1) + (1,) * (output.dim() - 2))

            def grad_hook(grad: torch.Tensor) -> None:
                dims = [d for d in range(grad.dim()) if d != 1]
                saved[k] = (grad.double() * pre.double()).sum(dims)
            output.register_hook(grad_hook)
        return hook

    handles = [layer.module.register_forward_hook(make_hook(k))
               for k, layer in enumerate(net.layers) if not layer.is_logits]
    x = torch.randn(4, 1, 12, 12, generator=torch.Generator().manual_seed(5))
    y = torch.tensor([0, 1, 2, 3])
    model.train()
    for _ in range(2):
        saved.clear()
        with net.subnet(2):
            loss = nn.functional.cross_entropy(model(x), y)
        with tracker.collect(subnet=2):
            loss.backward()
        for k, per_channel in saved.items():
            expected.index_add_(0, net._out_pos[k], per_channel.abs())
    for h in handles:
        h.remove()
    got = tracker.scores[1].double()
    assert got.abs().sum() > 0
    assert torch.allclose(got, expected[:-1], rtol=1e-4, atol=1e-7)
    assert int(torch.count_nonzero(tracker.scores[0])) == 0


def test_criterion_hand_computed() -> None:
    scores = torch.tensor([[1.0, 2.0, 3.0, 4.0], [10.0, 20.0, 30.0, 40.0], [100.0, 200.0, 300.0, 400.0]])
    assignment = torch.tensor([1, 2, 3, 4])
    m = criterion(scores, assignment, alpha_growth=1.5)
    # alpha = 1, 1.5, 2.25; a neuron counts only subnets >= its own.
    assert m[0].item() == pytest.approx(1 + 1.5 * 10 + 2.25 * 100)
    assert m[1].item() == pytest.approx(1.5 * 20 + 2.25 * 200)  # ignores subnet 1's score 2
    assert m[2].item() == pytest.approx(2.25 * 300)
    assert math.isinf(m[3].item())  # unused neuron
    assert criterion(scores, assignment, alpha_growth=1.0)[1].item() == pytest.approx(220.0)


def test_criterion_rejects_bad_inputs() -> None:
    scores = torch.zeros(3, 4)
    with pytest.raises(ValueError, match="one per neuron"):
        criterion(scores, torch.ones(5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"values must be in 1..4"):
        criterion(scores, torch.tensor([1, 2, 5, 1]))
    with pytest.raises(ValueError, match="alpha_growth"):
        criterion(scores, torch.ones(4, dtype=torch.long), alpha_growth=0.0)
    with pytest.raises(ValueError, match=r"\[N, num_neurons\]"):
        criterion(torch.zeros(4), torch.ones(4, dtype=torch.long))


def test_tracker_state_round_trip() -> None:
    net = _two_layer()
    tracker = ImportanceTracker(net)
    _backward(net, tracker, 1, COEF)
    other = ImportanceTracker(net)
    other.load_state_dict(tracker.state_dict())
    assert torch.equal(other.scores, tracker.scores) and torch.equal(other.batches, tracker.batches)
    assert torch.equal(other.criterion(), criterion(tracker.scores, net.flat_assignment()[:-1]))
    with pytest.raises(ValueError, match="shape"):
        other.scores = torch.zeros(2, 2)
