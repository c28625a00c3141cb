"""SteppingNetPruner: SteppingNet construction through NNI 3.0's compression API."""

from __future__ import annotations

import copy
import logging
from typing import Any, Callable

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrize

nni = pytest.importorskip("nni")
from nni.compression import TorchEvaluator  # noqa: E402

import nni_steppingnet.models  # noqa: E402,F401  (registers the paper models)
from nni_steppingnet import SteppingNet, macs  # noqa: E402
from nni_steppingnet.nni import SteppingNetPruner  # noqa: E402


def _data(batches: int, size: int, classes: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(2, 3, size, size, generator=gen), torch.randint(0, classes, (2,), generator=gen))
        for _ in range(batches)
    ]


def _evaluator(
    model: nn.Module,
    data: list[Any],
    counter: dict[str, int],
    dummy: torch.Tensor | None,
    epochs: int = 1000,
    weight_decay: float = 0.0,
) -> TorchEvaluator:
    """A tiny user training loop that ignores max_steps (the pruner must stop it itself)."""

    def training_step(batch: Any, model: nn.Module) -> torch.Tensor:
        counter["loss_calls"] += 1
        x, y = batch
        return F.cross_entropy(model(x), y)

    def training_func(
        model: nn.Module,
        optimizers: torch.optim.Optimizer,
        training_step: Callable[..., Any],
        lr_schedulers: Any = None,
        max_steps: int | None = None,
        max_epochs: int | None = None,
    ) -> None:
        counter["max_steps"] = -1 if max_steps is None else max_steps
        model.train()
        for _ in range(epochs):
            for batch in data:
                optimizers.zero_grad()
                loss = training_step(batch, model)
                loss.backward()
                optimizers.step()
                counter["steps"] += 1

    optimizer = nni.trace(torch.optim.SGD)(model.parameters(), lr=0.01, momentum=0.9, weight_decay=weight_decay)
    return TorchEvaluator(training_func, optimizer, training_step, dummy_input=dummy)


def _masked_plain_copy(model: nn.Module, masks: dict[str, dict[str, torch.Tensor]]) -> nn.Module:
    copy_ = copy.deepcopy(model)
    with torch.no_grad():
        for name, entry in masks.items():
            module = copy_.get_submodule(name)
            for target, mask in entry.items():
                getattr(module, target).mul_(mask)
    return copy_


def test_compress_resnet18_masks_compute_each_subnet_exactly() -> None:
    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=4)
    architecture = copy.deepcopy(model)
    example = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    counter = {"steps": 0, "loss_calls": 0}
    evaluator = _evaluator(model, _data(3, 16, 4, seed=2), counter, example)
    config_list = [{"op_types": ["Conv2d", "Linear"], "exclude_op_names": ["layer4.1.conv1"]}]
    pruner = SteppingNetPruner(
        model,
        config_list,
        evaluator,
        [0.5, 0.8],
        batches_per_iteration=1,
        iterations=1,
        retraining_steps=2,
        gamma=0.5,
        subnet=1,
    )
    assert pruner.teacher is not None  # gamma < 1 with retraining: a frozen copy distils
    compressed, masks = pruner.compress()
    assert compressed is model

    # The user loop ignored max_steps and would run 3000 steps: the pruner stopped it after one
    # construction iteration (N * m = 2 subnet-batches) and 2 retraining steps; the 4th
    # optimizer.step() ends the loop, so the line after it never counts that step.
    assert counter["loss_calls"] == 4
    assert counter["steps"] == 3
    assert counter["max_steps"] == 2 * 1 * 1 + 2
    assert len(pruner.history) == 1
    assert pruner.result is not None and pruner.result.iterations == 1
    reference = pruner.reference_macs
    assert pruner.subnet_macs[0] <= 0.5 * reference
    assert pruner.result.budgets_met[0]

    weighted = {name for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    assert set(masks) == weighted
    for name, entry in masks.items():
        weight = compressed.get_submodule(name)._nni_wrapper.weight
        assert entry["weight"].shape == weight.shape and entry["weight"].dtype == torch.float32
        assert set(torch.unique(entry["weight"]).tolist()) <= {0.0, 1.0}
    assert set(masks["fc"]) == {"weight", "bias"} and bool(masks["fc"]["bias"].all())
    assert not bool(masks["layer1.0.conv1"]["weight"].all())  # neurons moved out of subnet 1

    # The layer outside config_list kept every output channel in subnet 1: its neuron group never
    # moved while others did.
    assert pruner.excluded_layers == ["layer4.1.conv1"]
    state = pruner.stepping_state
    assert state is not None
    groups = {g["name"]: g["assignment"] for g in state["groups"]}
    assert bool((groups["layer4.1.conv1"] == 1).all())
    assert any(bool((a > 1).any()) for a in groups.values())

    # The full SteppingNet comes back from stepping_state; NNI's masks reproduce every subnet.
    reference_model = copy.deepcopy(architecture)
    # Masked: NNI's masks compute exactly what the masked execution does (bitwise).
    net = SteppingNet(reference_model, example, 2, verify=False, execution="masked")
    net.load_state_dict(state)
    for s in (1, 2):  # every row of the excluded layer reads the same (subnet-1) inputs
        rows = net.structural_mask("layer4.1.conv1", s)
        assert torch.equal(rows, rows[:1].expand_as(rows))
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    compressed.eval()
    reference_model.eval()
    for s in (1, 2):
        subnet_masks = pruner.select_subnet(s)
        assert pruner.subnet == s
        with torch.no_grad(), net.subnet(s):
            expected = reference_model(x)
        with torch.no_grad():
            got = compressed(x)
        assert torch.equal(got, expected)
        # The masks alone, applied to a plain copy's weights, give the same function.
        pruner.unwrap_model()
        plain = _masked_plain_copy(model, subnet_masks).eval()
        pruner.wrap_model()
        with torch.no_grad():
            assert torch.equal(plain(x), expected)
        assert net.macs(s) == pruner.subnet_macs[s - 1]
    with pytest.raises(RuntimeError, match="already ran"):
        pruner.compress()


def _lenet() -> nn.Module:
    return timm.create_model("lenet3c1l", num_classes=4, img_size=16, width=0.25)


def test_pruner_loop_is_exactly_the_constructor() -> None:
    """Driven through NNI's evaluator with the same batches and SGD settings, the pruner ends with
    the same assignment, pruning masks, weights and BN statistics as Constructor.run()."""
    from torch.utils.data import DataLoader, TensorDataset

    from nni_steppingnet.construct import ConstructionConfig, Constructor

    torch.manual_seed(0)
    base = timm.create_model("lenet3c1l", num_classes=4, img_size=16, width=0.5)
    example = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    data = _data(5, 16, 4, seed=1)
    loader = DataLoader(
        TensorDataset(torch.cat([b[0] for b in data]), torch.cat([b[1] for b in data])), batch_size=2, shuffle=False
    )
    settings = {"budgets": [0.4, 0.8], "batches_per_iteration": 2, "iterations": 3}

    reference = copy.deepcopy(base)
    net = SteppingNet(reference, example, 2)
    constructor = Constructor(
        net,
        ConstructionConfig(reference_macs=net.full_macs, lr=0.01, momentum=0.9, weight_decay=5e-4, **settings),
        loader,
    )
    expected = constructor.run()
    constructor.close()

    model = copy.deepcopy(base)
    counter = {"steps": 0, "loss_calls": 0}
    evaluator = _evaluator(model, list(loader), counter, example, weight_decay=5e-4)  # the Constructor's SGD
    pruner = SteppingNetPruner(
        model,
        [{"op_types": ["Conv2d", "Linear"]}],
        evaluator,
        settings["budgets"],
        batches_per_iteration=2,
        iterations=3,
    )
    pruner.compress()
    assert pruner.result is not None and expected.iterations == pruner.result.iterations == 3
    assert pruner.result.macs == expected.macs
    assert [h["loss"] for h in pruner.history] == [h["loss"] for h in constructor.history]
    state = pruner.stepping_state
    assert state is not None
    for mine, theirs in zip(state["groups"], net.state_dict()["groups"]):
        assert torch.equal(mine["assignment"], theirs["assignment"])
    assert set(state["prune_masks"]) == set(net.prune_masks)
    assert all(torch.equal(state["prune_masks"][k], net.prune_masks[k]) for k in net.prune_masks)
    theirs_model = net.model_state_dict()
    assert set(state["model"]) == set(theirs_model)
    for key, value in theirs_model.items():  # weights and BN running statistics, bit for bit
        assert torch.equal(state["model"][key], value), key


def test_training_loop_that_ends_early_leaves_budgets_unmet(caplog: pytest.LogCaptureFixture) -> None:
    torch.manual_seed(0)
    model = _lenet()
    example = torch.randn(2, 3, 16, 16)
    counter = {"steps": 0, "loss_calls": 0}
    evaluator = _evaluator(model, _data(1, 16, 4, seed=0), counter, example, epochs=1)
    pruner = SteppingNetPruner(
        model, [{"op_types": ["Conv2d"]}], evaluator, [0.3, 0.6], batches_per_iteration=2, iterations=2
    )
    with caplog.at_level(logging.WARNING, logger="nni_steppingnet.nni.pruner"):
        _, masks = pruner.compress()
    assert counter["steps"] == 1
    assert pruner.result is not None and pruner.result.iterations == 0 and not pruner.result.all_met
    assert "before the construction finished" in caplog.text
    # No iteration ran: every neuron is still in subnet 1, so the masks are all ones.
    assert all(bool(entry["weight"].all()) for entry in masks.values())


def test_budgets_met_at_start_skip_training() -> None:
    model = _lenet()
    counter = {"steps": 0, "loss_calls": 0}
    evaluator = _evaluator(model, _data(1, 16, 4, seed=0), counter, torch.randn(2, 3, 16, 16))
    # A reference of twice the model's MACs: subnet 1 (every neuron) meets 0.5 from the start.
    pruner = SteppingNetPruner(
        model,
        [{"op_types": ["Conv2d", "Linear"]}],
        evaluator,
        [0.5, 1.0],
        reference_macs=2 * macs(model, torch.randn(2, 3, 16, 16)),
    )
    _, masks = pruner.compress()
    assert counter["steps"] == 0
    assert pruner.result is not None and pruner.result.all_met and pruner.result.iterations == 0
    assert set(masks) == {"features.0", "features.3", "features.7", "classifier"}


@pytest.mark.parametrize(
    ("config_list", "kwargs", "error", "match"),
    [
        ([{"op_types": ["Conv2d"], "sparse_ratio": 0.5}], {}, ValueError, "sets the sparsity"),
        ([{"op_types": ["BatchNorm2d"]}], {}, ValueError, "Conv2d and Linear"),
        ([{"op_names": ["features.99"]}], {}, ValueError, "does not have"),
        ([{"op_types": ["Conv2d"], "colour": "red"}], {}, ValueError, "unknown keys"),
        ([], {}, ValueError, "non-empty list"),
        ([{"op_types": ["Conv2d"]}], {"budgets": [0.6, 0.3]}, ValueError, "ascending"),
        # budgets above 1 are refused exactly as the recipes refuse them (one shared check)
        ([{"op_types": ["Conv2d"]}], {"budgets": [0.6, 1.2]}, ValueError, r"budgets\[1\] = 1.2 must be in \(0, 1\]"),
        ([{"op_types": ["Conv2d"]}], {"subnet": 3}, ValueError, "subnet must be an int in 1..2"),
        ([{"op_types": ["Conv2d"]}], {"beta": 1.5}, ValueError, "beta"),
        ([{"op_types": ["Conv2d"]}], {"gamma": -0.1}, ValueError, "gamma"),
        ([{"op_types": ["Conv2d"]}], {"batches_per_iteration": 0}, ValueError, "batches_per_iteration"),
        ([{"op_types": ["Conv2d"]}], {"no_dummy": True}, ValueError, "example_inputs"),
        ([{"op_types": ["Conv2d"]}], {"evaluator": "train.py"}, TypeError, "NNI evaluator"),
        ([{"op_types": ["Conv2d"]}], {"reference_macs": -5}, ValueError, "reference_macs"),
    ],
)
def test_bad_arguments_raise_clear_errors(
    config_list: list[dict[str, Any]], kwargs: dict[str, Any], error: type[Exception], match: str
) -> None:
    model = _lenet()
    counter = {"steps": 0, "loss_calls": 0}
    dummy = None if kwargs.pop("no_dummy", False) else torch.randn(2, 3, 16, 16)
    evaluator = kwargs.pop("evaluator", None) or _evaluator(model, _data(1, 16, 4, seed=0), counter, dummy)
    budgets = kwargs.pop("budgets", [0.3, 0.6])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(error, match=match):
        SteppingNetPruner(model, config_list, evaluator, budgets, **kwargs)
    # A rejected call leaves the model as it was: no masks, no NNI wrappers.
    assert not any(parametrize.is_parametrized(m) or hasattr(m, "_nni_wrapper") for m in model.modules())
    assert model.state_dict().keys() == before.keys()
