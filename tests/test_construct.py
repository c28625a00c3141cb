"""Subnet construction (Fig. 3): movement rules with a controlled criterion, pruning with
revival, stopping, config validation, and exact resume through state_dict."""

from __future__ import annotations

import io
import math
from typing import Any, Callable

import pytest
import torch
import torch.nn as nn

from nni_steppingnet import CheckpointError, SteppingNet
from nni_steppingnet.construct import ConstructionConfig, Constructor
from nni_steppingnet.data import load_dataset, make_loaders

IMG = 8


def _net(tiny_model: Callable[..., nn.Module], num_subnets: int, seed: int = 0) -> SteppingNet:
    model = tiny_model("lenet3c1l", seed=seed, num_classes=4, in_chans=3, img_size=IMG, width=0.25)
    return SteppingNet(model, torch.randn(2, 3, IMG, IMG), num_subnets)


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(4, 3, IMG, IMG, generator=g), torch.randint(0, 4, (4,), generator=g))]


def _layer(net: SteppingNet, name: str) -> int:
    return next(k for k, layer in enumerate(net.layers) if layer.name == name)


def _scores_low_in(net: SteppingNet, layer: str) -> torch.Tensor:
    """Criterion: the neurons of ``layer`` first (ascending by position), every other one later."""
    scores = torch.full((net.num_neurons,), 1000.0) + torch.arange(net.num_neurons, dtype=torch.float64)
    positions = net.index.out_positions[_layer(net, layer)]
    scores[positions] = torch.arange(positions.numel(), dtype=torch.float64)
    return scores


def _config(net: SteppingNet, budgets: list[float], **kwargs: Any) -> ConstructionConfig:
    return ConstructionConfig(budgets=budgets, reference_macs=net.full_macs, **kwargs)


# ------------------------------------------------------------------------- movement
def test_quantum_is_just_exceeded(tiny_model: Callable[..., nn.Module]) -> None:
    net = _net(tiny_model, 3)
    # the paper's selection (landing="ahead" would first move an expensive conv neuron)
    c = Constructor(net, _config(net, [0.05, 0.5, 0.9], iterations=10, landing="defer"), _batches())
    p_t = net.macs(3)
    assert c.initial_macs == p_t == net.full_macs
    quantum = (p_t - 0.05 * net.full_macs) / 10
    assert c.quantum == pytest.approx(quantum)
    cost = c.neuron_costs(1)
    scores = _scores_low_in(net, "features.7")  # the last conv: its neurons share no synapse
    order = net.index.out_positions[_layer(net, "features.7")]
    moved, counts, moved_macs = c.move(scores)
    taken = int(counts[0])
    assert taken >= 1 and counts[1:] == [0, 0]
    assert torch.equal(moved.nonzero().flatten(), order[:taken].sort().values)  # lowest M first
    assert float(cost[order[:taken]].sum()) >= quantum > float(cost[order[: taken - 1]].sum())
    assert moved_macs[0] == p_t - net.macs(1) == int(cost[order[:taken]].sum())  # estimate exact here
    assert net.flat_assignment()[order[:taken]].tolist() == [2] * taken


def test_flow_condition(tiny_model: Callable[..., nn.Module]) -> None:
    net = _net(tiny_model, 3)
    budgets = [0.05, 0.4, 0.9]
    c = Constructor(net, _config(net, budgets, iterations=10, landing="defer"), _batches())
    p = [b * net.full_macs for b in budgets]
    # All neurons start in subnet 1: what subnet 1 passes on stays below subnet 2's share.
    moved, counts, _ = c.move(_scores_low_in(net, "features.7"))
    assert counts[0] > 0
    assert net.macs(2) > p[1] and net.macs(2) - net.macs(1) <= p[1] - p[0]
    assert counts[1] == 0 and counts[2] == 0
    assert int((net.flat_assignment()[:-1] == 3).sum()) == 0
    # Give subnet 2 more than its share: now it passes neurons on to subnet 3.
    conv2 = net.groups[[g.name for g in net.groups].index("features.3")]
    conv2.assignment = torch.tensor([1] + [2] * (conv2.size - 1))
    assert net.macs(2) - net.macs(1) > p[1] - p[0] and net.macs(2) > p[1]
    before = net.flat_assignment()[:-1].clone()
    scores = torch.arange(net.num_neurons, dtype=torch.float64)
    moved, counts, _ = c.move(scores)
    after = net.flat_assignment()[:-1]
    from_two = ((before == 2) & (after == 3)).nonzero().flatten()
    assert counts[1] == from_two.numel() > 0
    # The ones moved on are the lowest-M neurons of subnet 2 (not those just moved in).
    candidates = (before == 2).nonzero().flatten()
    assert torch.equal(from_two, candidates[: from_two.numel()])


def test_neurons_leaving_last_subnet_become_unused(tiny_model: Callable[..., nn.Module]) -> None:
    net = _net(tiny_model, 2)
    c = Constructor(net, _config(net, [0.3, 0.6], iterations=1), _batches())
    for g in net.groups:  # half of every group in subnet 2: subnet 2 holds far more than its share
        g.assignment = torch.tensor([1] * (g.size // 2) + [2] * (g.size - g.size // 2))
    p1, p2 = 0.3 * net.full_macs, 0.6 * net.full_macs
    before = net.flat_assignment()[:-1].clone()
    assert net.macs(2) > p2 and net.macs(2) - net.macs(1) > p2 - p1
    moved, counts, _ = c.move(torch.arange(net.num_neurons, dtype=torch.float64))
    after = net.flat_assignment()[:-1]
    assert counts[1] == int(((before == 2) & (after == 3)).sum()) > 0
    assert set(after[before == 2].tolist()) <= {2, 3}
    # The last iteration moves the whole remaining amount: both budgets are met now.
    assert net.macs(1) <= p1 and net.macs(2) <= p2


def test_last_neuron_of_a_group_stays(tiny_model: Callable[..., nn.Module]) -> None:
    net = _net(tiny_model, 1)
    c = Constructor(net, _config(net, [0.001], iterations=1), _batches())
    c.move(torch.arange(net.num_neurons, dtype=torch.float64))
    for g in net.groups:
        assert int((g.assignment <= 1).sum()) == 1, g.name
    assert net.macs(1) > 0.001 * net.full_macs  # unreachable: reported, not forced
    assert c.result().budgets_met == [False]


def test_pruning_revives_moved_neurons(tiny_model: Callable[..., nn.Module]) -> None:
    net = _net(tiny_model, 2)
    c = Constructor(net, _config(net, [0.3, 0.6], prune_threshold=0.05), _batches())
    k2, k3 = _layer(net, "features.3"), _layer(net, "features.7")
    w2 = net.original_weight(k2)
    with torch.no_grad():
        w2[:, 0] = 0.001  # input channel 0 of conv2: tiny in every row
        w2[5] = 0.001  # output channel 5 of conv2: a whole tiny row
    moved = torch.zeros(net.num_neurons, dtype=torch.bool)
    neuron = int(net.index.out_positions[k2][5])
    moved[neuron] = True
    c.prune(torch.zeros_like(moved))
    mask = net.prune_masks["features.3"]
    assert not mask[5].any() and not mask[:, 0].any()
    # Moving conv2's neuron 5 revives its row and the conv3 column reading it, but not column 0.
    weight3 = net.original_weight(k3)
    with torch.no_grad():
        weight3[:, 5] = 0.001
    c.prune(torch.zeros_like(moved))
    assert not net.prune_masks["features.7"][:, 5].any()
    c.prune(moved)
    mask = net.prune_masks["features.3"]
    assert mask[5].all()
    assert not mask[torch.arange(mask.shape[0]) != 5][:, 0].any()
    assert net.prune_masks["features.7"][:, 5].all()
    assert torch.equal(
        net.weight_mask(k2, 2)[5].bool(), net.structural_mask(k2, 2)[5].unsqueeze(-1).unsqueeze(-1).expand_as(mask[5])
    )
    with pytest.raises(ValueError, match="bool mask of shape"):
        c.prune(torch.zeros(3, dtype=torch.bool))


# ------------------------------------------------------------------------------ loop
def _loader(seed: int = 0) -> Any:
    train, _, _ = load_dataset("synthetic", synthetic_size=64, img_size=IMG, seed=seed)
    loader, _ = make_loaders(train, train, batch_size=16, seed=seed)
    return loader


def test_run_meets_budgets_and_reports(tiny_model: Callable[..., nn.Module]) -> None:
    net = _net(tiny_model, 3)
    budgets = [0.2, 0.45, 0.7]
    c = Constructor(net, _config(net, budgets, batches_per_iteration=1, iterations=4), _loader())
    seen: list[dict[str, Any]] = []
    result = c.run(callback=seen.append)
    assert result.all_met and result.budgets_met == [True, True, True]
    assert result.iterations == len(c.history) == len(seen) <= 4
    assert result.macs == [net.macs(s) for s in (1, 2, 3)]
    assert all(m <= b * net.full_macs for m, b in zip(result.macs, budgets))
    entry = seen[-1]
    assert set(entry) >= {"iteration", "macs", "mac_ratios", "budgets_met", "loss", "moved"}
    assert entry["mac_ratios"] == [m / net.full_macs for m in entry["macs"]]
    assert math.isfinite(entry["loss"])
    assert c.done
    with pytest.raises(RuntimeError, match="construction is finished"):
        c.step()
    net.validate()


def test_met_budgets_stop_at_once(tiny_model: Callable[..., nn.Module]) -> None:
    net = _net(tiny_model, 2)
    # Budgets are fractions in (0, 1] of the reference: a reference twice the net's MACs makes
    # subnet 1 (every neuron) meet 0.5 from the start.
    c = Constructor(net, ConstructionConfig(budgets=[0.5, 1.0], reference_macs=2 * net.full_macs), _batches())
    assert c.done
    result = c.run()
    assert result.iterations == 0 and result.all_met


def test_resume_matches_uninterrupted_run(tiny_model: Callable[..., nn.Module]) -> None:
    def config(net: SteppingNet) -> ConstructionConfig:
        # 3 subnets x 3 batches per iteration over 4 batches per epoch: resumes mid-epoch.
        return _config(net, [0.2, 0.5, 0.8], batches_per_iteration=3, iterations=6, prune_threshold=0.02)

    torch.manual_seed(123)
    net_a = _net(tiny_model, 3)
    full = Constructor(net_a, config(net_a), _loader())
    for _ in range(4):
        full.step()

    torch.manual_seed(123)
    net_b = _net(tiny_model, 3)
    first = Constructor(net_b, config(net_b), _loader())
    for _ in range(2):
        first.step()
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    torch.manual_seed(999)  # the resumed process starts from another RNG state
    net_c = _net(tiny_model, 3, seed=7)  # different initial weights: all restored from the state
    resumed = Constructor(net_c, config(net_c), _loader())
    buffer.seek(0)
    resumed.load_state_dict(torch.load(buffer))
    for _ in range(2):
        resumed.step()

    assert sum(sum(e["moved"]) for e in full.history) > 0
    assert int((net_a.flat_assignment() > 1).sum()) > 0
    assert torch.equal(net_c.flat_assignment(), net_a.flat_assignment())
    assert sorted(net_c.prune_masks) == sorted(net_a.prune_masks) != []
    for name, mask in net_a.prune_masks.items():
        assert torch.equal(net_c.prune_masks[name], mask)
    state_a, state_c = net_a.model_state_dict(), net_c.model_state_dict()
    assert all(torch.equal(state_a[k], state_c[k]) for k in state_a)
    assert [e["loss"] for e in resumed.history] == [e["loss"] for e in full.history]
    assert resumed.iteration == full.iteration == 4


def test_load_state_rejects_other_config(tiny_model: Callable[..., nn.Module]) -> None:
    net = _net(tiny_model, 2)
    c = Constructor(net, _config(net, [0.3, 0.6]), _batches())
    state = c.state_dict()
    other = Constructor(net, _config(net, [0.3, 0.7]), _batches())
    with pytest.raises(CheckpointError, match="budgets: saved"):
        other.load_state_dict(state)
    with pytest.raises(CheckpointError, match="not a construction state"):
        other.load_state_dict({"format": "x"})


def test_config_and_constructor_validation(tiny_model: Callable[..., nn.Module]) -> None:
    with pytest.raises(ValueError, match="strictly ascending"):
        ConstructionConfig(budgets=[0.5, 0.3], reference_macs=10)
    with pytest.raises(ValueError, match=r"budgets\[0\] = 0.0 must be in \(0, 1\]"):
        ConstructionConfig(budgets=[0.0, 0.3], reference_macs=10)
    with pytest.raises(ValueError, match=r"budgets\[1\] = 1.5 must be in \(0, 1\]"):
        ConstructionConfig(budgets=[0.5, 1.5], reference_macs=10)
    assert ConstructionConfig(budgets=[0.1], reference_macs=10, beta=None).beta is None
    with pytest.raises(ValueError, match="reference_macs must be a positive int"):
        ConstructionConfig(budgets=[0.1], reference_macs=0)
    with pytest.raises(ValueError, match="iterations must be a positive int"):
        ConstructionConfig(budgets=[0.1], reference_macs=10, iterations=0)
    with pytest.raises(ValueError, match=r"beta must be in \(0, 1\]"):
        ConstructionConfig(budgets=[0.1], reference_macs=10, beta=1.5)
    net = _net(tiny_model, 2)
    with pytest.raises(ValueError, match="one budget per subnet"):
        Constructor(net, _config(net, [0.3]), _batches())
    with pytest.raises(ValueError, match="yielded no batches"):
        Constructor(net, _config(net, [0.3, 0.6], batches_per_iteration=1), []).step()
    c = Constructor(net, _config(net, [0.3, 0.6]), _batches())
    with pytest.raises(ValueError, match="one per neuron"):
        c.move(torch.zeros(3))


def test_marginal_costs_sum_to_exact_mac_reduction(
    tiny_model: Callable[..., nn.Module], random_assignment: Callable[..., torch.Tensor]
) -> None:
    from nni_steppingnet.construction.select import CostTable

    net = _net(tiny_model, 2)
    random_assignment(net, seed=4)
    flat = net.flat_assignment()
    in_one = (flat[:-1] == 1).nonzero().flatten()
    chosen = in_one[torch.randperm(in_one.numel(), generator=torch.Generator().manual_seed(0))[:6]]
    layers_hit = {
        k
        for k in range(len(net.layers))
        for j in chosen.tolist()
        if bool((net.index.out_positions[k] == j).any()) and not net.layers[k].is_logits
    }
    assert len(layers_hit) >= 2  # connected neurons: their shared synapses must count once
    table = CostTable(net, 1)
    alone = sum(table.cost_of(j) for j in chosen.tolist())
    total = sum(table.take(j) for j in chosen.tolist())
    before = net.macs(1)
    flat[chosen] = 2
    net.set_flat_assignment(flat)
    assert total == before - net.macs(1)
    assert alone > total  # the per-neuron estimate double-counts shared synapses


def test_last_approach_lands_just_under_the_budget(tiny_model: Callable[..., nn.Module]) -> None:
    from nni_steppingnet.construction.select import CostTable

    net = _net(tiny_model, 1)
    conv2, conv3 = (net.index.out_positions[_layer(net, name)] for name in ("features.3", "features.7"))
    table = CostTable(net, 1)
    cost2, cost3 = table.cost_of(int(conv2[0])), table.cost_of(int(conv3[0]))
    assert cost2 > 2 * cost3
    amount = 1.5 * cost2  # two conv2 neurons (the lowest M) would overshoot by 0.5 * cost2
    budget = net.full_macs - amount
    c = Constructor(net, _config(net, [budget / net.full_macs], iterations=1), _batches())
    scores = torch.full((net.num_neurons,), 1000.0, dtype=torch.float64)
    scores[conv2] = torch.arange(conv2.numel(), dtype=torch.float64)
    scores[conv3] = 100.0 + torch.arange(conv3.numel(), dtype=torch.float64)
    moved, counts, moved_macs = c.move(scores)
    assert net.macs(1) <= budget
    assert budget - net.macs(1) < cost3 < 0.5 * cost2
    assert bool(moved[conv2[0]]) and not bool(moved[conv2[1]])  # passed over: it would overshoot
    assert moved_macs[0] == net.full_macs - net.macs(1)


# ------------------------------------------------------------------- dead neurons
def _row_macs(net: SteppingNet, layer: str, row: int, s: int) -> int:
    """MACs of subnet ``s`` spent on output channel ``row`` of ``layer`` (its incoming synapses)."""
    k = _layer(net, layer)
    return int(net.weight_mask(k, s)[row].sum()) * net.layers[k].positions


def _row_macs_full(net: SteppingNet, k: int, row: int) -> int:
    """MACs of output channel ``row`` of layer ``k`` with every weight of the row active."""
    return int(net.original_weight(k)[row].numel()) * net.layers[k].positions


def test_neuron_no_weight_reads_is_retired_with_exact_macs(tiny_model: Callable[..., nn.Module]) -> None:
    net = _net(tiny_model, 3)
    c = Constructor(net, _config(net, [0.2, 0.5, 0.9], iterations=5), _batches())
    k1, k2, k3 = (_layer(net, name) for name in ("features.0", "features.3", "features.7"))
    j, i = 4, 2  # conv2 neuron j: conv3 reads it only through pruned weights; conv1 neuron i: only j reads it
    neuron_j, neuron_i = int(net.index.out_positions[k2][j]), int(net.index.out_positions[k1][i])
    prune3 = torch.ones_like(net.original_weight(k3), dtype=torch.bool)
    prune3[:, j] = False
    prune2 = torch.ones_like(net.original_weight(k2), dtype=torch.bool)
    prune2[:, i] = False
    prune2[j, i] = True
    net.prune_masks = {"features.7": prune3, "features.3": prune2}
    net.invalidate()
    assert c.dead_neurons(final=False).nonzero().flatten().tolist() == [neuron_j]
    before = [net.macs(s) for s in (1, 2, 3)]
    drop = [_row_macs(net, "features.3", j, s) + _row_macs(net, "features.0", i, s) for s in (1, 2, 3)]
    assert all(d > 0 for d in drop)
    retired = c.retire_dead(final=False)
    flat = net.flat_assignment()
    assert retired == [2, 0, 0]  # j, then i, which only j read
    assert int(flat[neuron_j]) == int(flat[neuron_i]) == 4  # N + 1: unused
    assert int((flat[:-1] == 4).sum()) == 2
    assert [net.macs(s) for s in (1, 2, 3)] == [b - d for b, d in zip(before, drop)]
    assert not bool(c.dead_neurons(final=True).any())
    assert c.retire_dead() == [0, 0, 0]


def test_neuron_whose_consumers_sit_in_smaller_subnets_retires_at_the_end(tiny_model: Callable[..., nn.Module]) -> None:
    net = _net(tiny_model, 3)
    c = Constructor(net, _config(net, [0.2, 0.5, 0.9], iterations=5), _batches())
    k2 = _layer(net, "features.3")
    conv2 = net.groups[[g.name for g in net.groups].index("features.3")]
    conv3 = net.groups[[g.name for g in net.groups].index("features.7")]
    conv2.assignment = torch.tensor([1] * (conv2.size - 2) + [2, 3])
    conv3.assignment = torch.ones(conv3.size, dtype=torch.long)  # every consumer in subnet 1
    late = net.index.out_positions[k2][-2:].tolist()
    # During construction the consumers may still move up: not dead yet.
    assert not bool(c.dead_neurons(final=False).any())
    assert c.dead_neurons(final=True).nonzero().flatten().tolist() == late
    before = [net.macs(s) for s in (1, 2, 3)]
    rows = [_row_macs(net, "features.3", conv2.size - 2, s) for s in (1, 2, 3)]
    rows3 = [_row_macs(net, "features.3", conv2.size - 1, s) for s in (1, 2, 3)]
    assert rows[0] == rows3[0] == rows3[1] == 0 and rows[1] > 0 and rows3[2] > 0
    assert c.retire_dead(final=True) == [0, 1, 1]
    assert conv2.assignment[-2:].tolist() == [4, 4]
    assert [net.macs(s) for s in (1, 2, 3)] == [before[0], before[1] - rows[1], before[2] - rows[2] - rows3[2]]


@pytest.mark.parametrize("frozen", [None, 3])
def test_retiring_keeps_a_group_and_frozen_neurons(tiny_model: Callable[..., nn.Module], frozen: int | None) -> None:
    net = _net(tiny_model, 2)
    c = Constructor(net, _config(net, [0.3, 0.9], iterations=5), _batches())
    k3 = _layer(net, "features.7")
    net.prune_masks = {"classifier": torch.zeros_like(net.original_weight(_layer(net, "classifier")), dtype=torch.bool)}
    net.invalidate()
    # Nothing reads conv3 (the classifier is pruned away): all of it is dead.
    assert bool(c.dead_neurons(final=False)[net.index.out_positions[k3]].all())
    if frozen is not None:
        c.frozen = torch.zeros(net.num_neurons, dtype=torch.bool)
        c.frozen[net.index.out_positions[k3][frozen]] = True
    before = net.macs(2)
    retired = c.retire_dead(final=False)
    conv3 = net.groups[[g.name for g in net.groups].index("features.7")]
    # One neuron stays so no subnet loses the layer: the frozen one, else the group's first.
    kept = 0 if frozen is None else frozen
    assert (conv3.assignment <= 2).nonzero().flatten().tolist() == [kept]
    assert retired == [conv3.size - 1, 0]
    assert net.macs(2) == before - sum(_row_macs_full(net, k3, row) for row in range(conv3.size) if row != kept)


def test_step_reports_retired(tiny_model: Callable[..., nn.Module]) -> None:
    net = _net(tiny_model, 2)
    c = Constructor(net, _config(net, [0.3, 0.6], iterations=2, batches_per_iteration=1), _loader())
    entry = c.step()
    assert len(entry["retired"]) == 2 and all(isinstance(v, int) for v in entry["retired"])
    assert entry["macs"] == [net.macs(1), net.macs(2)]


# ------------------------------------------------------------------- per-group move limit
def test_at_most_half_of_a_group_leaves_per_selection(tiny_model: Callable[..., nn.Module]) -> None:
    net = _net(tiny_model, 2)
    c = Constructor(net, _config(net, [0.3, 0.9], iterations=1), _batches())
    conv3 = net.index.out_positions[_layer(net, "features.7")]
    scores = _scores_low_in(net, "features.7")  # conv3's neurons have the lowest M
    flat = net.flat_assignment()
    amount = float(c.neuron_costs(1)[conv3].sum())  # would take all of conv3
    none = torch.zeros(net.num_neurons, dtype=torch.bool)
    chosen = c.select(1, amount, flat, scores, none, cap=float("inf"))
    from_conv3 = [j for j in chosen if j in set(conv3.tolist())]
    assert len(from_conv3) == conv3.numel() // 2
    assert from_conv3 == conv3[: conv3.numel() // 2].tolist()  # lowest M first
    assert len(chosen) > len(from_conv3)  # the rest of the amount came from other groups
    c.group_move_limit = False
    chosen = c.select(1, amount, flat, scores, none, cap=float("inf"))
    assert len([j for j in chosen if j in set(conv3.tolist())]) == conv3.numel() - 1  # the last stays


# ------------------------------------------------------------- landing and floors
def test_a_budget_no_neuron_fits_is_passed_by_the_cheapest_neuron_at_once(tiny_model: Callable[..., nn.Module]) -> None:
    from nni_steppingnet.construction.select import move_neurons

    for landing, left in (("defer", 3), ("defer", 1), ("now", 3)):
        net = _net(tiny_model, 1)
        costs = Constructor(net, _config(net, [0.5]), _batches()).neuron_costs(1)
        cheapest = float(costs.min())
        budget = net.full_macs - 0.5 * cheapest  # every neuron passes it: waiting cannot help
        scores = -torch.arange(net.num_neurons, dtype=torch.float64)  # the cheapest is not first
        moved, counts, moved_macs = move_neurons(
            net, scores, [budget], 0.0, left, landing=landing, min_group_fraction=0.0
        )
        assert int(counts[0]) == 1 and net.macs(1) <= budget, (landing, left)
        # "defer" searches beyond the window: the cheapest neuron, not a costlier one lower in M
        if landing == "defer":
            assert moved_macs[0] == cheapest, (landing, left)


def test_group_floor_keeps_a_fraction_of_the_uniform_width(tiny_model: Callable[..., nn.Module]) -> None:
    from nni_steppingnet.construction.select import move_neurons

    kept = {}
    for fraction in (0.0, 1.0):
        net = _net(tiny_model, 1)
        conv3 = net.index.out_positions[_layer(net, "features.7")]
        scores = _scores_low_in(net, "features.7")  # conv3's neurons move first
        budget = 0.05 * net.full_macs
        # quantum = all MACs: one call moves the whole excess, so only the floor stops conv3
        move_neurons(
            net, scores, [budget], net.full_macs, 5, group_limit=False, min_group_fraction=fraction, landing="defer"
        )
        kept[fraction] = int((net.flat_assignment()[conv3] == 1).sum())
        width = math.sqrt(budget / net.full_macs)
        floor = max(1, int(fraction * width * conv3.numel()))
        assert kept[fraction] == floor, (fraction, kept[fraction], floor, conv3.numel())
    assert kept[1.0] > kept[0.0] == 1
    # the last iteration drops the floor: the budget comes first
    net = _net(tiny_model, 1)
    conv3 = net.index.out_positions[_layer(net, "features.7")]
    move_neurons(net, _scores_low_in(net, "features.7"), [0.05 * net.full_macs], net.full_macs, 1, group_limit=False)
    assert int((net.flat_assignment()[conv3] == 1).sum()) == 1


def test_ahead_takes_the_expensive_group_first_when_the_cheap_groups_cannot_pay(
    tiny_model: Callable[..., nn.Module],
) -> None:
    from nni_steppingnet.construction.select import move_neurons, neuron_costs

    moved_from_expensive = {}
    for landing in ("defer", "ahead"):
        net = _net(tiny_model, 1)
        cost = neuron_costs(net, 1)
        group_of = net.index.group_of
        mean_cost = [float(cost[group_of == g].mean()) for g in range(len(net.groups))]
        expensive = max(range(len(mean_cost)), key=lambda g: mean_cost[g])
        members = (group_of == expensive).nonzero().flatten()
        # the expensive group ranks last by M: "defer" leaves it while the cheap groups can pay
        scores = torch.arange(net.num_neurons, dtype=torch.float64)
        scores[members] = 1000.0 + torch.arange(members.numel(), dtype=torch.float64)
        budget = 0.3 * net.full_macs
        width = math.sqrt(0.3)
        spare = 0.0
        for g in range(len(net.groups)):
            if g != expensive:
                in_group = cost[group_of == g].sort().values
                spare += float(in_group[: in_group.numel() - max(1, int(width * in_group.numel()))].sum())
        assert spare < net.full_macs - budget  # down to their floors, the cheap groups cannot pay
        move_neurons(net, scores, [budget], 0.0, 5, landing=landing, min_group_fraction=1.0)
        flat = net.flat_assignment()
        moved_from_expensive[landing] = int((flat[members] == 2).sum())
        assert net.macs(1) >= budget  # iterations are left: neither landing passes the budget
        if landing == "ahead":
            assert int(flat[members[0]]) == 2  # its lowest-M neuron
    assert moved_from_expensive["defer"] == 0 < moved_from_expensive["ahead"], moved_from_expensive


def test_landing_and_floor_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="landing must be one of 'defer', 'now'"):
        ConstructionConfig(budgets=[0.1], reference_macs=10, landing="later")
    with pytest.raises(ValueError, match=r"min_group_fraction must be in \[0, 1\]"):
        ConstructionConfig(budgets=[0.1], reference_macs=10, min_group_fraction=1.5)
