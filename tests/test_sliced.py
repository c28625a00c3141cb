"""Sliced execution (nni_steppingnet.sliced) against the masked execution it replaces.

Every check runs the same model and assignment masked and sliced: logits (1e-5 relative),
every parameter's gradient (1e-4 relative to its own largest entry, floored at 1e-3 of the
model's largest gradient: a bias followed by a training-mode BatchNorm has an exact gradient of
0 and carries only rounding noise in both executions), BatchNorm statistics, SGD steps,
importance scores and construction moves.
"""

from __future__ import annotations

import copy
import logging
from typing import Any, Callable

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

from nni_steppingnet import SteppingNet
from nni_steppingnet.fixed_splits import has_fixed_splits, split_widths
from nni_steppingnet.importance import ImportanceTracker
from nni_steppingnet.sliced import compare_executions, nested_assignment, relative_error
from nni_steppingnet.testing import (
    FIXED_SPLIT_MODELS,
    FOUNDATION_MODELS,
    fraction_assignment,
    randomize_bn,
    randomize_parameters,
)

N = 4
FRACTIONS = (0.3, 0.5, 0.7, 0.9)


def _vit(name: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        torch.manual_seed(0)
        return timm.create_model(
            name, pretrained=False, img_size=32, patch_size=8, depth=2, embed_dim=48, num_heads=3, num_classes=10
        )

    return build


def _convnext() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("convnext_atto", pretrained=False, num_classes=10)


def _mixer() -> nn.Module:
    torch.manual_seed(0)
    return timm.models.mlp_mixer.MlpMixer(num_classes=10, img_size=32, patch_size=8, num_blocks=2, embed_dim=32)


#: Models with nested norms (LayerNorm, LayerNorm2d) and, for ViT/DeiT, attention head neurons;
#: built small, 32x32 inputs, every parameter random.
TRANSFORMERS: dict[str, Callable[[], nn.Module]] = {
    "vit_tiny_patch16_224": _vit("vit_tiny_patch16_224"),
    "deit_tiny_patch16_224": _vit("deit_tiny_patch16_224"),
    "convnext_atto": _convnext,
    "mlp_mixer": _mixer,
}


def _model(name: str, tiny_model: Callable[..., nn.Module], **kwargs: Any) -> nn.Module:
    if name in TRANSFORMERS:
        return randomize_parameters(TRANSFORMERS[name](), seed=1)
    return randomize_bn(tiny_model(name, seed=0, **kwargs), seed=1)


def _inputs(batch: int, seed: int, size: int = 32) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _wrap(model: nn.Module, execution: str, seed: int = 4) -> SteppingNet:
    net = SteppingNet(model, _inputs(2, seed=3), N, verify=False, execution=execution)
    fraction_assignment(net, FRACTIONS, seed=seed)
    return net


# ------------------------------------------------------------------ equivalence
@pytest.mark.parametrize("name", [name for name, _ in FOUNDATION_MODELS])
def test_sliced_equals_masked_on_the_foundation_models(name: str, tiny_model: Callable[..., nn.Module]) -> None:
    """In float64, far below the required 1e-5 / 1e-4: float32 rounding differs between the two
    executions (they sum different numbers of terms), and training-mode BatchNorm on the 2x2
    maps of these nets at 32x32 amplifies it in the gradients (measured on efficientnet_b0:
    1.01e-4 for an SE bias in float32, 3e-9 in float64), which hides nothing structural."""
    kwargs = dict(FOUNDATION_MODELS)[name]
    model = randomize_bn(tiny_model(name, seed=0, **kwargs), seed=1)
    net = _wrap(model, "sliced")
    assert net.execution == "sliced"
    net.model.double()
    problem = compare_executions(net, _inputs(8, seed=5).double(), output_rtol=1e-10, grad_rtol=1e-7)
    assert problem == "", f"{name}: {problem}"


def _narrow_widths(net: SteppingNet, x: torch.Tensor) -> dict[str, tuple[int, int]]:
    """(width seen in subnet 1, full width) of the first nested norm's input and, with
    attention, of the first block's heads."""
    modules = dict(net.model.named_modules())
    seen: dict[str, tuple[int, int]] = {}
    name = net.nested_norms.names[1]
    norm = modules[name]
    dim = net.nested_norms.kinds[name].dim
    full = int(net.nested_norms.positions[name].numel())

    def norm_hook(module: nn.Module, args: Any, output: Any) -> None:
        seen["norm"] = (int(args[0].shape[dim]), full)

    handles = [norm.register_forward_hook(norm_hook)]
    if net.attention:
        block, _ = net.attention[0]

        def heads_hook(module: nn.Module, args: Any) -> None:
            seen["heads"] = (int(module.num_heads), block.num_heads)

        # registered after the sliced execution's pre-hook: sees the active heads' count
        handles.append(modules[block.name].register_forward_pre_hook(heads_hook))
    with torch.no_grad(), net.subnet(1):
        net.model(x)
    for handle in handles:
        handle.remove()
    return seen


@pytest.mark.parametrize("name", sorted(TRANSFORMERS))
def test_auto_runs_nested_norms_and_attention_heads_sliced_equal_to_masked(name: str) -> None:
    """Nested norms (ViT/DeiT/Mixer LayerNorm, ConvNeXt LayerNorm2d) and ViT/DeiT's head neurons
    in the cumulative layout: ``"auto"`` picks sliced, and every subnet of a nested assignment
    gives the masked logits (1e-5) and gradients (1e-4), in training and eval mode, float32."""
    torch.manual_seed(0)
    net = SteppingNet(_model(name, None), _inputs(2, seed=3), N, verify=False, execution="auto")  # type: ignore[arg-type]
    assert net.execution == "sliced"
    assert len(net.nested_norms) > 0
    assert bool(net.attention) == name.endswith("patch16_224")
    net.set_flat_assignment(nested_assignment(net, seed=1))
    # Subnet 1 really runs narrow.
    widths = _narrow_widths(net, _inputs(2, seed=4))
    assert widths and all(0 < got < full for got, full in widths.values()), widths
    problem = compare_executions(net, _inputs(4, seed=5))
    assert problem == "", f"{name}: {problem}"


@pytest.mark.parametrize(("name", "kwargs"), FIXED_SPLIT_MODELS, ids=[name for name, _ in FIXED_SPLIT_MODELS])
def test_fixed_split_widths_follow_the_active_channels(name: str, kwargs: dict[str, Any]) -> None:
    """InceptionNeXt's bands, FasterNet's partial conv, Res2Net's scales, DPN's dual path and
    ReXNet's shortcut run sliced: each call splits by the active channels of each chunk (the block's attributes are
    restored after it), and the logits and gradients equal the masked ones (float64: these deep
    BN nets at 32x32 amplify float32 rounding as the foundation models do)."""
    model = timm.create_model(name, pretrained=False, num_classes=10, **kwargs)
    model = randomize_bn(randomize_parameters(model, seed=1), seed=1)
    net = SteppingNet(model, _inputs(2, seed=3), N, verify=False, execution="auto")
    assert net.execution == "sliced"
    net.set_flat_assignment(nested_assignment(net, seed=1))
    block = next(m for m in net.model.modules() if has_fixed_splits(m))
    attr = next(iter(split_widths(block, lambda layer, side: 0, lambda layer, n: 0, 0)))
    built = getattr(block, attr)
    seen: list[Any] = []
    handle = block.register_forward_pre_hook(lambda module, args: seen.append(getattr(module, attr)))
    with torch.no_grad(), net.subnet(1):
        net.model(_inputs(2, seed=4))
    handle.remove()
    assert seen and seen[0] != built and getattr(block, attr) == built
    net.model.double()
    problem = compare_executions(net, _inputs(4, seed=5).double(), output_rtol=1e-10, grad_rtol=1e-7)
    assert problem == "", f"{name}: {problem}"


def test_attention_without_active_heads_and_norms_without_active_channels() -> None:
    """Sliced ViT where block 0 has no head in subnet 1 and block 1 none in any subnet (zero
    heads: an empty qkv, attention over zero heads, a proj with no input), and the residual
    group entirely in subnet 2 (nested norms over zero channels in subnet 1)."""
    net = SteppingNet(_model("vit_tiny_patch16_224", None), _inputs(2, seed=3), N, verify=False, execution="sliced")  # type: ignore[arg-type]
    flat = nested_assignment(net, seed=0)
    (_, heads0), (_, heads1) = net.attention
    flat[heads0] = torch.tensor([2, 3, N + 1])
    flat[heads1] = N + 1
    net.set_flat_assignment(flat)
    assert compare_executions(net, _inputs(4, seed=5)) == ""
    (residual,) = [group for group in net.groups if group.size == 48]  # the embedding channels
    residual.assignment = torch.full((residual.size,), 2)
    assert compare_executions(net, _inputs(4, seed=6)) == ""


class _Grouped(nn.Module):
    """A grouped conv (2 groups) and a depthwise conv between ungrouped ones, a concat, a flatten
    into a Linear: the layouts the gathered weights must follow."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(3, 4, 3, padding=1)
        self.grouped = nn.Conv2d(12, 12, 3, padding=1, groups=2)
        self.dw = nn.Conv2d(12, 12, 3, padding=1, groups=12)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(48, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.cat([F.relu(self.a(x)), F.relu(self.b(x))], 1)
        y = F.relu(self.dw(F.relu(self.grouped(y))))
        return self.fc(torch.flatten(self.pool(y), 1))


@pytest.mark.parametrize("counts", ["equal", "unequal"])
def test_grouped_depthwise_concat_and_flatten(counts: str) -> None:
    torch.manual_seed(0)
    net = SteppingNet(_Grouped(), torch.randn(2, 3, 8, 8), N, execution="sliced")
    for group in net.groups:
        if counts == "equal" and group.size == 12:
            # The same number of channels of every conv group in every subnet: a grouped kernel.
            group.assignment = torch.tensor([1, 2, 3, 4, 5, 1] * 2)
        else:
            group.assignment = torch.randint(
                1, N + 2, (group.size,), generator=torch.Generator().manual_seed(group.size)
            )
    problem = compare_executions(net, torch.randn(4, 3, 8, 8))
    assert problem == ""


def test_layers_without_active_channels() -> None:
    """A group entirely in subnet 3: its layers compute nothing in subnets 1-2 (empty tensors,
    pooling on zero channels), and the layer after it has outputs but no active input."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(6, 5, 3),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(5 * 2 * 2, 7),
        nn.ReLU(),
        nn.Linear(7, 3),
    )
    net = SteppingNet(model, torch.randn(2, 3, 16, 16), N, execution="sliced")
    sizes = [g.size for g in net.groups]
    assert sizes == [6, 5, 7]
    net.groups[0].assignment = torch.full((6,), 3)
    net.groups[1].assignment = torch.tensor([1, 1, 2, 4, 5])
    net.groups[2].assignment = torch.tensor([1, 2, 2, 3, 4, 5, 1])
    problem = compare_executions(net, torch.randn(4, 3, 16, 16))
    assert problem == ""
    with net.subnet(1):
        out = net.model(torch.randn(2, 3, 16, 16))
    assert out.shape == (2, 3)


# --------------------------------------------------------------- training steps
def _pair(
    name: str, tiny_model: Callable[..., nn.Module], double: bool = False, **kwargs: Any
) -> tuple[SteppingNet, SteppingNet]:
    """The same random model wrapped masked and sliced (float64 with ``double``: training
    trajectories are compared there, because float32 rounding, which differs between the two
    executions, is amplified by training-mode BatchNorm: measured on resnet18 after one SGD
    step, weights equal to 2e-6 gave gradients differing by 0.11 of their largest entry)."""
    base = _model(name, tiny_model, **kwargs)
    masked = _wrap(copy.deepcopy(base), "masked")
    sliced = _wrap(base, "sliced")
    if double:
        masked.model.double()
        sliced.model.double()
    assert (masked.execution, sliced.execution) == ("masked", "sliced")
    return masked, sliced


def _assert_same_state(masked: SteppingNet, sliced: SteppingNet, rtol: float) -> None:
    ref, got = masked.model.state_dict(), sliced.model.state_dict()
    for key, value in ref.items():
        if value.is_floating_point():
            err = relative_error(value, got[key], 1e-3)
            assert err <= rtol, f"{key} differs by {err:.2e}"
        else:
            assert torch.equal(value, got[key]), key


@pytest.mark.parametrize("name", ["lenet3c1l", "resnet18", *TRANSFORMERS])
def test_three_sgd_steps_with_momentum_and_weight_decay(name: str, tiny_model: Callable[..., nn.Module]) -> None:
    masked, sliced = _pair(name, tiny_model, double=True)
    optimizers = [
        torch.optim.SGD(net.model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4) for net in (masked, sliced)
    ]
    for step, s in enumerate((1, 3, 2)):
        x = _inputs(16, seed=10 + step).double()
        y = torch.randint(0, 10, (16,), generator=torch.Generator().manual_seed(step))
        for net, optimizer in zip((masked, sliced), optimizers):
            net.model.train()
            optimizer.zero_grad()
            with net.subnet(s):
                F.cross_entropy(net.model(x), y).backward()
            optimizer.step()
    _assert_same_state(masked, sliced, rtol=1e-9)


@pytest.mark.parametrize("name", ["resnet18", "vit_tiny_patch16_224"])
def test_importance_scores_are_equal(name: str, tiny_model: Callable[..., nn.Module]) -> None:
    masked, sliced = _pair(name, tiny_model)
    trackers = [ImportanceTracker(net) for net in (masked, sliced)]
    x, y = _inputs(16, seed=20), torch.randint(0, 10, (16,), generator=torch.Generator().manual_seed(0))
    for net, tracker in zip((masked, sliced), trackers):
        net.model.train()
        for s in range(1, N + 1):
            with net.subnet(s):
                loss = F.cross_entropy(net.model(x), y)
            with tracker.collect(subnet=s):
                loss.backward()
    ref, got = trackers[0].scores, trackers[1].scores
    assert float(ref.abs().max()) > 0
    assert relative_error(ref, got) <= 1e-4


def test_one_construction_iteration_is_equal(tiny_model: Callable[..., nn.Module]) -> None:
    from nni_steppingnet.construction.loop import ConstructionConfig, Constructor

    masked, sliced = _pair("lenet3c1l", tiny_model, double=True, width=1.8)
    generator = torch.Generator().manual_seed(0)
    data = [(_inputs(16, seed=30 + i).double(), torch.randint(0, 10, (16,), generator=generator)) for i in range(2)]
    results = []
    for net in (masked, sliced):
        config = ConstructionConfig(
            budgets=[0.1, 0.2, 0.3, 0.45],
            reference_macs=net.full_macs,
            batches_per_iteration=2,
            iterations=20,
            prune_threshold=0.0,
        )
        constructor = Constructor(net, config, data)
        constructor.tracker.reset()
        constructor.step()
        results.append(constructor)
    assert torch.equal(masked.flat_assignment(), sliced.flat_assignment())
    assert relative_error(results[0].tracker.scores, results[1].tracker.scores) <= 1e-4
    _assert_same_state(masked, sliced, rtol=1e-9)
    # The constructed net: sliced still equals masked.
    assert compare_executions(sliced, _inputs(8, seed=40).double(), output_rtol=1e-10, grad_rtol=1e-7) == ""


# ---------------------------------------------------------------------- baselines
def test_baselines_run_sliced(tiny_model: Callable[..., nn.Module]) -> None:
    from nni_steppingnet.baselines.anywidth import AnyWidthNet
    from nni_steppingnet.baselines.slimmable import SlimmableNet

    for cls in (AnyWidthNet, SlimmableNet):
        model = randomize_bn(tiny_model("resnet18", seed=0), seed=1)
        net = cls(model, _inputs(2, seed=3), N, verify=False)
        assert net.execution == "sliced", cls.__name__
        assert compare_executions(net, _inputs(8, seed=5)) == "", cls.__name__


# ------------------------------------------------------------------ auto / errors
class _UnknownChannelBuffer(nn.Module):
    """A per-channel buffer the dependency graph cannot see (not a parameter): fine with masks,
    impossible to slice."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3)
        self.register_buffer("shift", torch.linspace(-1, 1, 6).reshape(6, 1, 1))
        self.fc = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.conv(x) + self.shift)
        return self.fc(y.mean((2, 3)))


def test_auto_falls_back_to_masks_with_a_logged_reason(caplog: pytest.LogCaptureFixture) -> None:
    torch.manual_seed(0)
    with caplog.at_level(logging.WARNING, logger="nni_steppingnet.sliced"):
        net = SteppingNet(_UnknownChannelBuffer(), torch.randn(2, 3, 8, 8), N)
    assert net.execution == "masked"
    assert any("sliced execution does not reproduce" in r.getMessage() for r in caplog.records)
    # Masked execution keeps working after the fallback.
    with net.subnet(1):
        assert net.model(torch.randn(2, 3, 8, 8)).shape == (2, 4)


def test_auto_chooses_sliced_on_a_fitting_model(tiny_model: Callable[..., nn.Module]) -> None:
    net = SteppingNet(tiny_model("lenet5", seed=0), _inputs(2, seed=3), N)
    assert net.execution == "sliced"
    assert net.set_execution("masked") == "masked"
    assert net.set_execution("sliced") == "sliced"


class _DropoutHead(nn.Module):
    """Conv, BatchNorm and a dropout before the classifier: the dropout draws one value per
    element, so on the sliced (narrower) tensor it cannot draw the masked execution's mask."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3)
        self.bn = nn.BatchNorm2d(16)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn(self.conv(x))).mean((2, 3))
        return self.fc(F.dropout(self.drop(y), 0.2, self.training))


def test_auto_check_leaves_dropout_out_and_training_runs_sliced_with_it() -> None:
    torch.manual_seed(0)
    net = SteppingNet(_DropoutHead(), torch.randn(2, 3, 8, 8), N)
    assert net.execution == "sliced"
    net.set_flat_assignment(nested_assignment(net, seed=0))
    x = torch.randn(4, 3, 8, 8)
    assert compare_executions(net, x) == ""
    # Outside the check, dropout acts in sliced training: outputs differ between two draws,
    # and eval mode is deterministic.
    net.model.train()
    with net.subnet(2):
        torch.manual_seed(1)
        first = net.model(x)
        torch.manual_seed(2)
        second = net.model(x)
    assert not torch.equal(first, second)
    net.model.eval()
    with net.subnet(2), torch.no_grad():
        assert torch.equal(net.model(x), net.model(x))


@pytest.mark.parametrize("name", ["legacy_seresnet18", "selecsls42", "xception41"])
def test_auto_runs_sliced_where_only_float32_rounding_differs(name: str) -> None:
    """These timm models used to fall back to masks: legacy_seresnet18 through its head's dropout
    (0.64 relative in the logits), selecsls42 and xception41 through float32 rounding that their
    deep training-mode BatchNorm stacks over a few values per channel amplify past 1e-5 (6.5e-5 and
    3.0e-5); in float64 they agree to 1e-10. The float64 recheck leaves the model as it was:
    float32, every parameter and buffer bitwise equal to a net wrapped masked."""
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    masked = SteppingNet(timm.create_model(name, num_classes=10), x, N, verify=False, execution="masked")
    torch.manual_seed(0)
    auto = SteppingNet(timm.create_model(name, num_classes=10), x, N, verify=False, execution="auto")
    assert auto.execution == "sliced"
    expected = {**dict(masked.model.named_parameters()), **dict(masked.model.named_buffers())}
    got = {**dict(auto.model.named_parameters()), **dict(auto.model.named_buffers())}
    assert expected.keys() == got.keys()
    for key, tensor in got.items():
        assert tensor.dtype == expected[key].dtype, key
        assert torch.equal(tensor, expected[key]), key


def test_bad_execution_is_a_clear_error(tiny_model: Callable[..., nn.Module]) -> None:
    with pytest.raises(ValueError, match="execution must be one of"):
        SteppingNet(tiny_model("lenet5", seed=0), _inputs(2, seed=3), N, execution="fast")


def test_sliced_is_cheaper_and_plain_copies_are_unaffected(tiny_model: Callable[..., nn.Module]) -> None:
    """Subnet 1 really runs narrow (the first conv computes 30% of its channels) and a plain
    copy of the model is an ordinary full-width model."""
    net = _wrap(tiny_model("lenet5", seed=0), "sliced")
    seen: list[int] = []
    first = net.layers[0].module
    handle = first.register_forward_hook(lambda m, a, out: seen.append(int(out.shape[1])))
    with net.subnet(1):
        net.model(_inputs(2, seed=1))
    handle.remove()
    active = int((net.layer_assignment(0)[0] <= 1).sum())
    assert seen == [active] and active < first.out_channels
    copy_out = net.plain_copy(1)(_inputs(2, seed=1))
    with net.subnet(1):
        ref = net.model(_inputs(2, seed=1))
    assert relative_error(ref.detach(), copy_out.detach()) <= 1e-5


# ---------------------------------------------------------------- dtypes / layout
def test_bf16_autocast_and_channels_last(tiny_model: Callable[..., nn.Module]) -> None:
    masked, sliced = _pair("resnet18", tiny_model)
    x = _inputs(4, seed=6).to(memory_format=torch.channels_last)
    for net in (masked, sliced):
        net.model.to(memory_format=torch.channels_last).eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        with masked.subnet(2):
            ref = masked.model(x)
        with sliced.subnet(2):
            got = sliced.model(x)
    assert got.dtype == torch.bfloat16
    # bf16 rounds to 3 significant digits; the two executions sum different numbers of terms.
    assert relative_error(ref.float(), got.float()) <= 5e-2
    with torch.no_grad(), sliced.subnet(2):
        full = sliced.model(x)
    assert relative_error(full, got.float()) <= 5e-2
    problem = compare_executions(sliced, x)
    assert problem == ""


def test_nested_assignment_fractions(tiny_model: Callable[..., nn.Module]) -> None:
    net = _wrap(tiny_model("lenet5", seed=0), "masked")
    flat = nested_assignment(net, seed=0)
    group = net.groups[0]
    counts = [int((flat[: group.size] <= s).sum()) for s in range(1, N + 1)]
    assert counts == [max(1, round(f * group.size)) for f in FRACTIONS]
    with pytest.raises(ValueError, match="fractions"):
        nested_assignment(net, fractions=[0.5, 0.2, 0.7, 0.9])
