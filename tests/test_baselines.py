"""Baselines (any-width, slimmable), the width search and the ``compare`` / ``ablate`` commands.

Structure checks are exact (mask entries, counts, bitwise-equal activations); the end-to-end
commands run on synthetic data with tiny settings.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pytest
import timm
import torch
import torch.nn as nn

import nni_steppingnet.models  # noqa: F401  (registers the paper models with timm)
from nni_steppingnet import macs
from nni_steppingnet.app import compare, compare_cli
from nni_steppingnet.baselines import (
    AnyWidthNet,
    SlimmableNet,
    SwitchableBatchNorm,
    search_widths,
    triangular_assignment,
)
from nni_steppingnet.baselines.widths import structural_macs

#: lenet5 at width 1 on 16x16 RGB: groups features.0 (6), features.4 (16), hidden.0 (120), hidden.2 (84)
HALF = [[3, 8, 60, 42], [6, 16, 120, 84]]


def _lenet5(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return timm.create_model("lenet5", num_classes=10, in_chans=3, img_size=16)


def _x(batch: int = 4, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def _randomize_bn(model: nn.Module, seed: int = 2) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=generator) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=generator) + 0.5)
                m.weight.copy_(torch.rand(m.weight.shape, generator=generator) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=generator) * 0.1)


def _wrap(cls: type, widths: list[list[int]] = HALF) -> Any:
    model = _lenet5()
    _randomize_bn(model)
    net = cls(model, _x(2), len(widths))
    net.set_widths(widths)
    net.model.eval()
    return net


def _activations(net: Any, s: int, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Outputs of every Conv/Linear layer (before BN) when subnet ``s`` runs."""
    seen: dict[str, torch.Tensor] = {}
    handles = []
    for layer in net.layers:

        def hook(module: nn.Module, args: Any, output: torch.Tensor, name: str = layer.name) -> None:
            seen[name] = output.detach().clone()

        handles.append(layer.module.register_forward_hook(hook))
    try:
        with torch.no_grad(), net.subnet(s):
            seen["logits"] = net.model(x).detach().clone()
    finally:
        for h in handles:
            h.remove()
    return seen


def _perturb_slice(net: Any, slice_index: int) -> None:
    """Add noise to every weight row, bias and BN entry of the neurons of one slice."""
    generator = torch.Generator().manual_seed(7)
    flat = net.flat_assignment()
    modules = dict(net.model.named_modules())
    with torch.no_grad():
        for k, layer in enumerate(net.layers):
            if layer.is_logits:
                continue
            rows = (flat[net.index.out_positions[k]] == slice_index).nonzero().flatten()
            weight = net.original_weight(k)
            weight[rows] += torch.randn(weight[rows].shape, generator=generator)
            if layer.module.bias is not None:
                layer.module.bias[rows] += 1.0
        for name, positions in net.channel_modules.items():
            rows = (flat[positions] == slice_index).nonzero().flatten()
            bn = modules[name]
            bn.weight[rows] += 0.5
            bn.bias[rows] += 0.5
            bn.running_mean[rows] += 0.5


# --------------------------------------------------------------------------- assignment
def test_triangular_assignment_is_exact() -> None:
    got = triangular_assignment(10, [2, 2, 5, 8], 4)
    assert got.tolist() == [1, 1, 3, 3, 3, 4, 4, 4, 5, 5]


@pytest.mark.parametrize("counts", [[3, 2, 4], [1, 2, 11], [1, 2]])
def test_triangular_assignment_rejects_bad_widths(counts: list[int]) -> None:
    with pytest.raises(ValueError, match="width"):
        triangular_assignment(10, counts, 3)


def test_set_widths_rejects_shrinking_widths_and_zero_first_width() -> None:
    net = _wrap(AnyWidthNet)
    with pytest.raises(ValueError, match=r"subnet 2, group 1: width 4 must be in \[8, 16\]"):
        net.set_widths([[3, 8, 60, 42], [6, 4, 120, 84]])
    with pytest.raises(ValueError, match=r"subnet 1, group 0: width 0 must be in \[1, 6\]"):
        net.set_widths([[0, 8, 60, 42], [6, 16, 120, 84]])
    assert net.widths == HALF  # unchanged by the rejected calls


# ----------------------------------------------------------------------------- any-width
def test_anywidth_masks_are_lower_triangular() -> None:
    net = _wrap(AnyWidthNet)
    assert net.groups[1].assignment.tolist() == [1] * 8 + [2] * 8
    conv2 = "features.4"  # out 16 (slices of 8), in 6 (slices of 3)
    m1, m2 = net.structural_mask(conv2, 1), net.structural_mask(conv2, 2)
    assert int(m1.sum()) == 8 * 3 and bool(m1[:8, :3].all())
    # subnet 2: slice-1 outputs still read only slice-1 inputs; slice-2 outputs read everything
    assert int(m2.sum()) == 8 * 3 + 8 * 6
    assert not bool(m2[:8, 3:].any()) and bool(m2[8:, :].all())
    net.validate()
    assert net.check_isolation(_x()) == []
    assert net.check_isolation(_x(), train=True) == []


def test_anywidth_wider_slice_does_not_change_narrower_slice() -> None:
    net = _wrap(AnyWidthNet)
    x = _x()
    before = _activations(net, 2, x)
    _perturb_slice(net, 2)
    after = _activations(net, 2, x)
    flat = net.flat_assignment()
    for k, layer in enumerate(net.layers):
        if layer.is_logits:
            continue
        keep = (flat[net.index.out_positions[k]] == 1).nonzero().flatten()
        assert torch.equal(before[layer.name][:, keep], after[layer.name][:, keep]), layer.name
    assert not torch.equal(before["logits"], after["logits"])  # the perturbation does reach subnet 2


def test_anywidth_subnet_one_is_its_own_network() -> None:
    """Subnet 1's logits do not depend on slice-2 weights at all (computation reuse)."""
    net = _wrap(AnyWidthNet)
    x = _x()
    before = _activations(net, 1, x)["logits"]
    _perturb_slice(net, 2)
    assert torch.equal(before, _activations(net, 1, x)["logits"])


# ----------------------------------------------------------------------------- slimmable
def test_slimmable_masks_are_full_inside_each_width_without_reuse() -> None:
    slim, anyw = _wrap(SlimmableNet), _wrap(AnyWidthNet)
    conv2 = "features.4"
    s1, s2 = slim.structural_mask(conv2, 1), slim.structural_mask(conv2, 2)
    assert int(s1.sum()) == 8 * 3 and bool(s1[:8, :3].all())
    assert int(s2.sum()) == 16 * 6  # everything inside width 2
    # a synapse from a wider input (rank 3 >= k_1 = 3) into a narrow output (rank 0 < k_1 = 8)
    assert not bool(s1[0, 3]) and bool(s2[0, 3])
    assert not bool(anyw.structural_mask(conv2, 2)[0, 3])
    # flattened conv -> linear: hidden.0 reads 16 channels x 4 positions
    h1 = slim.structural_mask("hidden.0", 1)
    assert int(h1.sum()) == 60 * 8 * 4
    logits = slim.structural_mask("classifier", 1)
    assert int(logits.sum()) == 10 * 42  # every logit, inputs of width 1 only
    slim.validate()
    with pytest.raises(ValueError, match="no isolation to probe"):
        slim.validate(probe=True)


def test_slimmable_wider_slice_changes_narrower_slice() -> None:
    """No reuse: perturbing slice-2 neurons changes slice-1 channels when subnet 2 runs."""
    net = _wrap(SlimmableNet)
    x = _x()
    before = _activations(net, 2, x)
    before_1 = _activations(net, 1, x)["logits"]
    _perturb_slice(net, 2)
    after = _activations(net, 2, x)
    flat = net.flat_assignment()
    conv2 = next(k for k, layer in enumerate(net.layers) if layer.name == "features.4")
    keep = (flat[net.index.out_positions[conv2]] == 1).nonzero().flatten()
    assert not torch.equal(before["features.4"][:, keep], after["features.4"][:, keep])
    assert torch.equal(before_1, _activations(net, 1, x)["logits"])  # subnet 1 never reads slice 2
    assert net.check_isolation(x) != []


def test_slimmable_has_private_batchnorm_per_width() -> None:
    net = _wrap(SlimmableNet)
    switches = [m for m in net.model.modules() if isinstance(m, SwitchableBatchNorm)]
    assert len(switches) == 2 and all(len(m.bns) == 2 for m in switches)
    assert sorted(net.channel_modules) == [
        "features.1.bns.0",
        "features.1.bns.1",
        "features.5.bns.0",
        "features.5.bns.1",
    ]
    bn = net.model.features[1]
    # the running-statistics guard hooks the per-width copies (and nothing else)
    hooked = [
        n
        for n, m in net.model.named_modules()
        if m._forward_pre_hooks and (not n or isinstance(m, nn.modules.batchnorm._BatchNorm))
    ]
    assert hooked == ["", "features.1.bns.0", "features.1.bns.1", "features.5.bns.0", "features.5.bns.1"]
    stats = [b.running_mean.clone() for b in bn.bns]
    net.model.train()
    with net.subnet(2):
        net.model(_x())
    assert torch.equal(bn.bns[0].running_mean, stats[0])  # width 1's statistics untouched
    assert not torch.equal(bn.bns[1].running_mean, stats[1])
    with net.subnet(1):
        net.model(_x(seed=5))
    assert not torch.equal(bn.bns[0].running_mean, stats[0])
    assert not torch.equal(bn.bns[0].running_mean, bn.bns[1].running_mean)
    # affine parameters are private too: subnet 1's loss gives no gradient to width 2's BN
    net.model.zero_grad(set_to_none=True)
    with net.subnet(1):
        net.model(_x()).sum().backward()
    assert bn.bns[0].weight.grad is not None and bn.bns[1].weight.grad is None


def test_slimmable_export_and_state_round_trip() -> None:
    net = _wrap(SlimmableNet)
    x = _x()
    for s in (1, 2):
        exported = net.export_subnet(s).eval()
        assert not any(isinstance(m, SwitchableBatchNorm) for m in exported.modules())
        with torch.no_grad(), net.subnet(s):
            expected = net.model(x)
        torch.testing.assert_close(exported(x), expected, rtol=1e-5, atol=1e-5)
    other = SlimmableNet(_lenet5(seed=3), _x(2), 2)
    other.load_state_dict(net.state_dict())
    other.model.eval()
    assert other.widths == HALF
    for s in (1, 2):
        with torch.no_grad(), net.subnet(s), other.subnet(s):
            assert torch.equal(other.model(x), net.model(x))


# ----------------------------------------------------------------------------- budgets
CASES = [
    # (model, image size, channels, expansion, budgets): the paper's budgets for the two cases
    ("lenet5", 28, 1, 2.0, [0.15, 0.3, 0.6, 0.85]),
    ("lenet3c1l", 8, 1, 1.8, [0.1, 0.3, 0.5, 0.85]),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_both_baselines_meet_budgets_within_two_points(case: tuple[str, int, int, float, list[float]]) -> None:
    name, size, chans, expansion, budgets = case
    x = torch.randn(2, chans, size, size)
    reference = macs(timm.create_model(name, in_chans=chans, img_size=size), x)
    nets = {}
    for cls in (AnyWidthNet, SlimmableNet):
        net = cls(timm.create_model(name, in_chans=chans, img_size=size, width=expansion), x, len(budgets))
        plan = search_widths(net, budgets, reference)
        ratios = [net.macs(s) / reference for s in range(1, len(budgets) + 1)]
        assert plan.all_met and plan.mac_ratios == ratios
        assert all(abs(r - b) <= 0.02 for r, b in zip(ratios, budgets)), (cls.__name__, ratios)
        assert [structural_macs(net, s) for s in range(1, 5)] == [net.macs(s) for s in range(1, 5)]
        widths = net.widths
        assert widths == plan.counts
        assert all(a <= b for row, nxt in zip(widths, widths[1:]) for a, b in zip(row, nxt))
        nets[cls] = net
    # the same widths cost fewer MACs under any-width's triangular rule (equal in subnet 1)
    anyw, slim = nets[AnyWidthNet], nets[SlimmableNet]
    slim.set_widths(anyw.widths)
    assert anyw.macs(1) == slim.macs(1)
    assert all(anyw.macs(s) < slim.macs(s) for s in range(2, 5))


def test_unreachable_budget_is_reported_not_raised() -> None:
    """Unexpanded lenet5: any-width's triangular slices top out below 85% of the original."""
    x = torch.randn(2, 3, 16, 16)
    reference = macs(_lenet5(), x)
    net = AnyWidthNet(_lenet5(), x, 4)
    plan = search_widths(net, [0.15, 0.3, 0.6, 0.85], reference)
    assert plan.budgets_met == [True, True, True, False]
    assert net.widths[-1] == [6, 16, 120, 84]  # it used every neuron trying
    assert plan.mac_ratios[-1] < 0.83


@pytest.mark.parametrize(
    ("budgets", "message"),
    [
        ([0.3, 0.2], "strictly ascending"),
        ([0.1, 0.2, 0.3], "one MAC budget per subnet"),
        ([0.0, 0.5], "positive fractions"),
    ],
)
def test_search_widths_rejects_bad_budgets(budgets: list[float], message: str) -> None:
    net = _wrap(AnyWidthNet)
    with pytest.raises(ValueError, match=message):
        search_widths(net, budgets, 1000)


# ---------------------------------------------------------------------- compare / ablate
TINY = [
    "data.name=synthetic",
    "data.synthetic_size=64",
    "data.batch_size=32",
    "data.img_size=8",
    "model.width=0.25",
    "teacher.epochs=1",
    "construction.iterations=2",
    "construction.batches_per_iteration=1",
    "retraining.epochs=1",
    "construction.monitor_samples=0",
    # The budgets the assertions below check (the quickstart recipe's own are smaller).
    "steppingnet.budgets=[0.15,0.3,0.5,0.85]",
]


def _cli(command: str, argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    compare_cli.add_arguments(parser, command)
    args = parser.parse_args(argv)
    args.command = command
    return args


def _sets(values: list[str]) -> list[str]:
    return [item for v in values for item in ("--set", v)]


def test_compare_on_synthetic_writes_table_plot_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cmp"
    args = _cli("compare", ["quickstart", "--out", str(out), "--device", "cpu", "--no-progress", *_sets(TINY)])
    assert compare_cli.main(args) == 0
    table = (out / "compare.md").read_text()
    assert capsys.readouterr().out.startswith(table)
    rows = [line for line in table.splitlines() if line.startswith("| ") and line.split("|")[2].strip().isdigit()]
    assert [(r.split("|")[1].strip(), int(r.split("|")[2])) for r in rows] == [
        (m, s) for m in ("steppingnet", "anywidth", "slimmable") for s in (1, 2, 3, 4)
    ]
    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads((out / "compare.json").read_text())
    assert list(report["summary"]) == ["steppingnet", "anywidth", "slimmable"]
    budgets = [0.15, 0.3, 0.5, 0.85]
    for method in ("anywidth", "slimmable"):
        run = report["runs"][method][0]
        assert [abs(s["mac_ratio"] - b) <= 0.02 for s, b in zip(run["subnets"], budgets)] == [True] * 4
        # same schedule as SteppingNet's construction: iterations x m batches, every subnet each
        assert run["training"]["train_batches"] == report["runs"]["steppingnet"][0]["construction"]["iterations"]
    assert report["runs"]["anywidth"][0]["isolation_ok"] is True
    assert report["runs"]["slimmable"][0]["isolation_ok"] is False
    assert set(report["targets"]["against"]) == {"anywidth", "slimmable"}
    # the baseline checkpoints load back with their widths and exact MACs
    net, recipe = compare.load_baseline(out / "seed0" / "slimmable")
    assert isinstance(net, SlimmableNet) and recipe.seed == 0
    assert net.widths == report["runs"]["slimmable"][0]["widths"]["counts"]
    assert [net.macs(s) for s in range(1, 5)] == [s["macs"] for s in report["runs"]["slimmable"][0]["subnets"]]
    # a second run into the same folder needs --resume, and then reuses every finished run
    with pytest.raises(ValueError, match="--resume"):
        compare_cli.main(args)
    again = _cli(
        "compare",
        [
            "quickstart",
            "--out",
            str(out),
            "--device",
            "cpu",
            "--no-progress",
            "--resume",
            "--methods",
            "anywidth",
            *_sets(TINY),
        ],
    )
    assert compare_cli.main(again) == 0
    assert json.loads((out / "compare.json").read_text())["summary"]["anywidth"] == report["summary"]["anywidth"]


def test_ablate_on_synthetic_runs_variants_and_sweep(tmp_path: Path) -> None:
    out = tmp_path / "abl"
    args = _cli(
        "ablate",
        [
            "quickstart",
            "--out",
            str(out),
            "--device",
            "cpu",
            "--no-progress",
            "--variants",
            "beta+kd;no kd",
            "--expansions",
            "1.8,1.0",
            *_sets(TINY),
        ],
    )
    assert compare_cli.main(args) == 0
    report = json.loads((out / "ablate.json").read_text())
    assert list(report["summary"]) == [
        "beta+kd",
        "no kd",
        "expansion 1.8",
        "expansion 1",
    ]
    # expansion 1.8 is the recipe's own: reused, not rerun
    assert report["summary"]["expansion 1.8"] == report["summary"]["beta+kd"]
    assert sorted(p.name for p in (out / "seed0").iterdir()) == ["beta-kd", "expansion-1", "no-kd", "teacher.pt"]
    assert (out / "ablate.png").read_bytes()[:4] == b"\x89PNG"
    assert "| no kd | 4 |" in (out / "ablate.md").read_text()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--methods", "steppingnet,bogus"], "unknown method"),
        (["--seeds", "0,x"], "--seeds"),
        (["--seeds", "1,1"], "distinct"),
    ],
)
def test_compare_rejects_bad_arguments(tmp_path: Path, argv: list[str], message: str) -> None:
    args = _cli(
        "compare", ["quickstart", "--out", str(tmp_path / "x"), "--device", "cpu", "--no-progress", *argv, *_sets(TINY)]
    )
    with pytest.raises(ValueError, match=message):
        compare_cli.main(args)


def test_old_compare_path_reexports_the_application_module() -> None:
    """``nni_steppingnet.baselines.compare`` stays importable for one release (a re-export)."""
    from nni_steppingnet.baselines import compare as old

    assert old.run_compare is compare.run_compare and old.main is compare_cli.main
    assert old.summarize is compare.summarize and old.plot_compare is compare.plot_compare
