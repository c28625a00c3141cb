"""SteppingImportance: SteppingNet's criterion M inside torch-pruning's pruners."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
import torch_pruning as tp

import nni_steppingnet.models  # noqa: F401  (registers the paper models)
from nni_steppingnet import SteppingNet
from nni_steppingnet.importance import ImportanceTracker, criterion, normalize_scores
from nni_steppingnet.nni.tp_importance import SteppingImportance

CONVS = ("features.0", "features.3", "features.7")


def _net(num_subnets: int = 2) -> tuple[SteppingNet, torch.Tensor]:
    torch.manual_seed(0)
    model = timm.create_model("lenet3c1l", num_classes=4, img_size=16, width=0.5)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    return SteppingNet(model, x, num_subnets), x


def _handmade_scores(net: SteppingNet) -> torch.Tensor:
    """Subnet 1 ranks neurons one way, subnet 2 the opposite way (M of subnet 1 follows subnet 1)."""
    n = net.num_neurons
    gen = torch.Generator().manual_seed(5)
    first = torch.randperm(n, generator=gen).float()
    # A narrow spread around a large mean: after the per-group normalisation subnet 2's row
    # varies less than subnet 1's, so M of subnet 1 still follows subnet 1's order.
    second = n + (n - first) * 0.1 + torch.rand(n, generator=gen) * 0.01
    return torch.stack([first, second])


def _kept_rows(pruned: torch.Tensor, original: torch.Tensor) -> list[int]:
    """Indices of ``original``'s output channels that survive in ``pruned`` (in order)."""
    kept = []
    for row in pruned:
        matches = [i for i in range(original.shape[0]) if torch.equal(original[i], row)]
        assert len(matches) == 1
        kept.append(matches[0])
    return kept


@pytest.mark.parametrize("subnet", [1, 2])
def test_base_pruner_removes_the_lowest_criterion_channels(subnet: int) -> None:
    net, x = _net()
    scores = _handmade_scores(net)
    plain = net.plain_copy()
    original = {name: plain.get_submodule(name).weight.detach().clone() for name in CONVS}
    importance = SteppingImportance(net, scores, subnet=subnet, alpha_growth=1.5, model=plain)
    pruner = tp.pruner.BasePruner(
        plain, x, importance=importance, pruning_ratio=0.5, ignored_layers=[plain.get_classifier()]
    )
    pruner.step()

    alpha = torch.tensor([1.0, 1.5])
    # eq. (3) for subnet i (k = i..N) of the scores normalised per group and subnet row.
    scores = normalize_scores(scores, net.index.offsets, net.flat_assignment()[:-1])
    m = (scores * alpha.unsqueeze(1))[subnet - 1 :].sum(0)
    previous_kept: list[int] | None = None
    for k, name in enumerate(CONVS):
        positions = net.index.out_positions[k]
        layer_m = m[positions]
        size = positions.numel()
        removed = size - int(plain.get_submodule(name).weight.shape[0])
        assert removed == size // 2
        expected = sorted(torch.argsort(layer_m, stable=True)[removed:].tolist())
        weight = plain.get_submodule(name).weight.detach()
        source = original[name] if previous_kept is None else original[name][:, previous_kept]
        assert _kept_rows(weight, source) == expected
        previous_kept = expected
    # Different subnets rank differently: the test would not notice a criterion that ignores it.
    other = (scores * alpha.unsqueeze(1))[2 - subnet :].sum(0)
    first = net.index.out_positions[0]
    assert torch.argsort(m[first])[:4].tolist() != torch.argsort(other[first])[:4].tolist()


def test_scores_come_from_the_tracker_of_the_net() -> None:
    net, x = _net()
    tracker = ImportanceTracker(net)
    y = torch.tensor([0, 1])
    for k in (1, 2):
        with net.subnet(k):
            loss = F.cross_entropy(net.model(x), y)
        with tracker.collect(subnet=k):
            loss.backward()
    assert bool((tracker.scores > 0).any())
    plain = net.plain_copy()
    importance = SteppingImportance(net, tracker, subnet=1, alpha_growth=2.0, model=plain)
    normalized = normalize_scores(tracker.scores, net.index.offsets, net.flat_assignment()[:-1])
    expected = criterion(normalized, torch.ones(net.num_neurons, dtype=torch.long), 2.0)
    assert torch.equal(importance.criterion(), expected)
    graph = tp.DependencyGraph().build_dependency(plain, example_inputs=x)
    scored = 0
    names = {m: n for n, m in plain.named_modules()}
    for group in graph.get_all_groups(root_module_types=[torch.nn.Conv2d, torch.nn.Linear]):
        root = group[0].dep.target.module
        value = importance(group)
        if names[root] == "classifier":
            assert value is None  # the logits hold no neurons: torch-pruning skips the group
            continue
        k = [layer.name for layer in net.layers].index(names[root])
        assert torch.equal(value, expected[net.index.out_positions[k]])
        scored += 1
    assert scored == len(CONVS)
    # The tracker is read on every call: more importance changes the scores (another batch: the
    # same batch again would only scale a row, which the per-group normalisation undoes).
    before = importance.criterion().clone()
    with net.subnet(2):
        loss = F.cross_entropy(net.model(x.flip(0)), y)
    with tracker.collect(subnet=2):
        loss.backward()
    assert not torch.equal(importance.criterion(), before)


def test_bad_inputs_raise_clear_errors() -> None:
    net, x = _net()
    n = net.num_neurons
    with pytest.raises(ValueError, match=rf"shape \(2, {n}\)"):
        SteppingImportance(net, torch.zeros(3, n))
    with pytest.raises(ValueError, match="subnet must be an int in 1..2"):
        SteppingImportance(net, torch.zeros(2, n), subnet=3)
    with pytest.raises(ValueError, match="alpha_growth"):
        SteppingImportance(net, torch.zeros(2, n), alpha_growth=0)
    with pytest.raises(TypeError, match="ImportanceTracker or"):
        SteppingImportance(net, [[0.0] * n] * 2)  # type: ignore[arg-type]
    other, _ = _net()
    with pytest.raises(ValueError, match="another SteppingNet"):
        SteppingImportance(net, ImportanceTracker(other))
    with pytest.raises(ValueError, match="no module 'features.0'"):
        SteppingImportance(net, torch.zeros(2, n), model=torch.nn.Sequential(torch.nn.Linear(2, 2)))
    # After a physical pruning step the channel map is stale: a clear error, not wrong scores.
    plain = net.plain_copy()
    importance = SteppingImportance(net, torch.rand(2, n), model=plain)
    pruner = tp.pruner.BasePruner(
        plain, x, importance=importance, pruning_ratio=0.5, iterative_steps=2, ignored_layers=[plain.get_classifier()]
    )
    pruner.step()
    with pytest.raises(ValueError, match="was pruned since"):
        pruner.step()
