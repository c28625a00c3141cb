"""Neuron importance (eq. 2) and the selection criterion (eq. 3), against hand computations."""

from __future__ import annotations

import math
from typing import Any, Callable

import pytest
import torch
import torch.nn as nn

from nni_steppingnet import SteppingNet
from nni_steppingnet.importance import ImportanceTracker, criterion, norm_gated_modules, normalize_scores
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


def test_tracker_created_inside_suppression_sees_unscaled_gradient() -> None:
    """The hook registry orders by priority, not creation: a tracker created while beta
    suppression is active still reads the gradient before it is scaled, and the suppression
    still scales what the optimizer sees."""
    net = _two_layer()
    net.groups[0].assignment = torch.tensor([1, 2])
    reference = ImportanceTracker(net)
    _backward(net, reference, 3, COEF)
    plain = reference.scores.clone()
    plain_grad = net.original_weight(0).grad.clone()
    reference.close()
    net.model.zero_grad(set_to_none=True)
    with beta_suppression(net, 3, 0.5):
        late = ImportanceTracker(net)
        _backward(net, late, 3, COEF)
    assert torch.equal(late.scores, plain)
    scaled = net.original_weight(0).grad
    assert torch.allclose(scaled[0], plain_grad[0] * 0.25)  # neuron in subnet 1: beta^(3-1)
    assert torch.allclose(scaled[1], plain_grad[1] * 0.5)  # neuron in subnet 2: beta^(3-2)


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
    """Tracker (weight x weight-gradient form) == sum of grad x output per channel, where the
    output is the conv/linear's pre-bias output for plain neurons and the BatchNorm's whole output
    (gamma * xhat + beta) for neurons that pass through a BatchNorm."""
    model = tiny_model("lenet5", seed=0, in_chans=1, img_size=12, width=0.5)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):  # non-trivial gamma and beta
                module.weight.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(2))
                module.bias.uniform_(-0.5, 0.5, generator=torch.Generator().manual_seed(3))
    # Masked: the hooks below read every channel at its original position.
    net = SteppingNet(model, torch.randn(2, 1, 12, 12), 3, execution="masked")
    random_assignment(net, seed=1)
    tracker = ImportanceTracker(net)
    gated = norm_gated_modules(net)
    assert gated and bool(tracker.norm_gated.any()) and not bool(tracker.norm_gated.all())
    modules = dict(model.named_modules())
    expected = torch.zeros(net.num_neurons + 1, dtype=torch.float64)
    saved: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def make_hook(name: str, positions: torch.Tensor, keep: torch.Tensor) -> Any:
        def hook(module: nn.Module, args: Any, output: torch.Tensor) -> None:
            bias = module.bias
            pre = output.detach().clone()
            if bias is not None and not isinstance(module, nn.BatchNorm2d):
                pre = pre - bias.detach().reshape((1, -1) + (1,) * (output.dim() - 2))

            def grad_hook(grad: torch.Tensor) -> None:
                dims = [d for d in range(grad.dim()) if d != 1]
                saved[name] = (positions[keep], (grad.double() * pre.double()).sum(dims)[keep])

            output.register_hook(grad_hook)

        return hook

    handles = []
    for k, layer in enumerate(net.layers):
        if not layer.is_logits:
            keep = ~tracker.norm_gated[net.index.out_positions[k]]
            handles.append(layer.module.register_forward_hook(make_hook(layer.name, net.index.out_positions[k], keep)))
    for name, positions in gated.items():
        handles.append(
            modules[name].register_forward_hook(
                make_hook(name, positions, torch.ones(positions.numel(), dtype=torch.bool))
            )
        )
    x = torch.randn(4, 1, 12, 12, generator=torch.Generator().manual_seed(5))
    y = torch.tensor([0, 1, 2, 3])
    model.train()
    for _ in range(2):
        saved.clear()
        with net.subnet(2):
            loss = nn.functional.cross_entropy(model(x), y)
        with tracker.collect(subnet=2):
            loss.backward()
        for positions, per_channel in saved.values():
            expected.index_add_(0, positions, per_channel.abs())
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
    flat = net.flat_assignment()[:-1]
    assert torch.equal(other.criterion(), criterion(normalize_scores(tracker.scores, net.index.offsets, flat), flat))
    with pytest.raises(ValueError, match="shape"):
        other.scores = torch.zeros(2, 2)


# ------------------------------------------------------------ BatchNorm gate and normalisation
class _ConvBN(nn.Module):
    """conv(3->4) -> BN -> ReLU -> pool -> Linear(4->3) classifier."""

    def __init__(self, affine: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4, affine=affine)
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.relu(self.bn(self.conv(x)))), 1))


def _conv_bn_scores(affine: bool = True, dead_gamma: int | None = None) -> tuple[SteppingNet, ImportanceTracker]:
    torch.manual_seed(0)
    model = _ConvBN(affine)
    with torch.no_grad():
        if affine:
            model.bn.weight.copy_(torch.tensor([1.0, 0.8, 1.2, 0.9]))
            model.bn.bias.copy_(torch.tensor([0.1, -0.1, 0.2, 0.0]))
            if dead_gamma is not None:
                model.bn.weight[dead_gamma] = 0.0
                model.bn.bias[dead_gamma] = 0.0
    net = SteppingNet(model, torch.randn(2, 3, 6, 6), 2)
    tracker = ImportanceTracker(net)
    g = torch.Generator().manual_seed(1)
    model.train()
    for _ in range(3):
        x, y = torch.randn(8, 3, 6, 6, generator=g), torch.randint(0, 3, (8,), generator=g)
        with net.subnet(2):
            loss = nn.functional.cross_entropy(model(x), y)
        with tracker.collect(subnet=2):
            loss.backward()
        model.zero_grad()
    return net, tracker


def test_conv_before_batchnorm_gets_importance_from_the_bn_output() -> None:
    net, tracker = _conv_bn_scores()
    conv = net.index.out_positions[0]
    assert bool(tracker.norm_gated[conv].all())
    bn_scores = tracker.scores[1, conv]
    assert bool((bn_scores > 1e-4).all()), bn_scores
    # The paper's gate at the conv output: BN normalises its scale away, so its gradient is ~0.
    net_plain, plain_tracker = _conv_bn_scores(affine=False)
    assert not bool(plain_tracker.norm_gated.any())  # affine=False: falls back to eq. (2)
    assert float(plain_tracker.scores[1, net_plain.index.out_positions[0]].max()) < 1e-5
    assert float(bn_scores.min()) > 1e3 * float(plain_tracker.scores[1, net_plain.index.out_positions[0]].max())


def test_channel_with_zero_gamma_ranks_lowest() -> None:
    net, tracker = _conv_bn_scores(dead_gamma=2)
    conv = net.index.out_positions[0]
    m = tracker.criterion()[conv]
    assert float(m[2]) == 0.0 and bool((m[[0, 1, 3]] > 0).all())
    assert int(torch.argmin(m)) == 2


def test_normalisation_makes_groups_of_different_scale_comparable() -> None:
    # Two groups of 3 neurons; group 1 is 1000x larger but ranks the same way inside.
    raw = torch.tensor([[1.0, 2.0, 3.0, 1000.0, 2000.0, 3000.0]])
    normed = normalize_scores(raw, [0, 3, 6])
    assert torch.allclose(normed[0, :3], normed[0, 3:])
    assert torch.allclose(normed[0, :3], torch.tensor([0.5, 1.0, 1.5]))
    # Without it the criterion would move every neuron of group 0 before any of group 1.
    assignment = torch.ones(6, dtype=torch.long)
    order_raw = torch.argsort(criterion(raw, assignment), stable=True).tolist()
    order = torch.argsort(criterion(normed, assignment), stable=True).tolist()
    assert order_raw[:3] == [0, 1, 2]
    assert sorted(order[:2]) == [0, 3] and sorted(order[2:4]) == [1, 4]
    # The mean of row k runs over the group's neurons in subnet k only; zero rows stay zero.
    two = torch.tensor([[2.0, 4.0, 0.0, 10.0], [1.0, 1.0, 6.0, 0.0]])
    normed = normalize_scores(two, [0, 3, 4], torch.tensor([1, 1, 2, 1]))
    assert torch.allclose(normed, torch.tensor([[2 / 3, 4 / 3, 0.0, 1.0], [0.375, 0.375, 2.25, 0.0]]))
    with pytest.raises(ValueError, match="offsets"):
        normalize_scores(two, [0, 3])
