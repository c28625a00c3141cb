"""SteppingNet foundation: isolation of nested subnets, masks, MACs, validation and state I/O.

Models are tiny (32x32 inputs, batch <= 4, random weights); every check is an exact equality, an
exact count or a clear error.
"""

from __future__ import annotations

import io
from typing import Any, Callable, Iterator

import pytest
import torch
import torch.nn as nn

from nni_steppingnet import CheckpointError, SteppingNet, UnsupportedModelError, macs
from nni_steppingnet.testing import FOUNDATION_MODELS, isolation_report, subnet_activations

N = 4
IMG = 32

#: The paper models and one timm CNN per family the design names (nni_steppingnet.testing).
MODELS: list[tuple[str, dict[str, Any]]] = list(FOUNDATION_MODELS)


def _parametrized(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if hasattr(m, "parametrizations")]


def _inputs(batch: int, seed: int, size: int = IMG) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module", params=MODELS, ids=[name for name, _ in MODELS])
def wrapped(
    request: pytest.FixtureRequest,
    tiny_model: Callable[..., nn.Module],
    random_assignment: Callable[..., torch.Tensor],
    randomize_bn: Callable[..., nn.Module],
) -> Iterator[SteppingNet]:
    name, kwargs = request.param
    model = randomize_bn(tiny_model(name, seed=0, **kwargs), seed=1)
    net = SteppingNet(model, _inputs(2, seed=2), N)
    random_assignment(net, seed=3)
    yield net


# ------------------------------------------------------------------ activation isolation
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_smaller_subnet_activations_are_identical_in_every_larger_subnet(wrapped: SteppingNet, train: bool) -> None:
    """Every Conv/Linear output of subnet s (for the classifier: every input feature of subnet
    <= s) is bitwise equal in every larger subnet. Exact: a masked weight is an exact 0, 0 * x == 0
    adds nothing to the sum, the shapes (hence the CPU kernels and their summation order) are the
    same in every subnet, and BN statistics are per channel."""
    net = wrapped
    x = _inputs(4, seed=4)  # batch >= 2 for batch-statistics BN in train mode
    before = {k: v.clone() for k, v in net.model.named_buffers()}
    report = isolation_report(net, x, train=train)
    assert report.isolated, (
        f"channels differ in a larger subnet (train={train}): {report.where}, relative {report.worst:.3e}"
    )
    assert all(c > 0 for c in report.compared[:-1]), f"nothing compared for some subnet: {report.compared}"
    # The library's own probe agrees, and BN running stats are restored by both.
    assert net.check_isolation(x, train=train) == []
    after = dict(net.model.named_buffers())
    assert all(torch.equal(before[k], after[k]) for k in before)


class _MixChannels(nn.Module):
    """Adds the mean over channels: mixing that the masks do not capture (a leak)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + x.mean(dim=1, keepdim=True)


def test_isolation_checker_reports_a_leak() -> None:
    """The checker can fail: a channel mean after the first conv lets subnet 2's channels change
    subnet 1's (the net is wrapped with verify=False, which would have refused the model)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        _MixChannels(),
        nn.Conv2d(4, 4, 3),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 2),
    )
    net = SteppingNet(model, _inputs(2, seed=2, size=8), 2, verify=False)
    for group in net.groups:
        group.assignment = torch.tensor([1, 1, 2, 2])[: group.size]
    report = isolation_report(net, _inputs(2, seed=5, size=8))
    assert not report.isolated and report.worst > 0 and report.where.startswith("2 subnet 1 vs 2")
    assert net.check_isolation(_inputs(2, seed=5, size=8))  # the library's probe agrees
    acts = subnet_activations(net, _inputs(2, seed=5, size=8))
    assert set(acts) == {1, 2} and all(len(calls) == 1 for calls in acts[1].values())


def test_macs_strictly_grow_with_the_subnet(wrapped: SteppingNet) -> None:
    net = wrapped
    counts = [net.macs(s) for s in range(1, net.num_subnets + 1)]
    assert all(a < b for a, b in zip(counts, counts[1:])), counts
    assert counts[-1] <= net.full_macs
    assert counts == [sum(net.layer_macs(s).values()) for s in range(1, net.num_subnets + 1)]
    # Every neuron in subnet 1 (the wrap-time default) makes subnet 1 the full model.
    saved = net.flat_assignment()
    for g in net.groups:
        g.assignment = torch.ones(g.size, dtype=torch.long)
    try:
        assert [net.macs(s) for s in range(1, net.num_subnets + 1)] == [net.full_macs] * net.num_subnets
    finally:
        net.set_flat_assignment(saved)


# ---------------------------------------------------------------- unsupported models
@pytest.mark.parametrize(
    ("name", "kwargs", "expected"),
    [
        # LayerNorms are nested norms and ViT heads are neurons now (tests/test_transformers.py,
        # tests/test_attention.py); attention with a norm over q and k is still refused.
        ("vit_tiny_patch16_224", {"img_size": IMG, "qk_norm": True}, {"blocks.0.attn": "qk_norm"}),
    ],
    ids=["vit-qk-norm"],
)
def test_norm_and_attention_models_are_rejected_by_module_name(
    tiny_model: Callable[..., nn.Module], name: str, kwargs: dict[str, Any], expected: dict[str, str]
) -> None:
    model = tiny_model(name, **kwargs)
    with pytest.raises(UnsupportedModelError) as info:
        SteppingNet(model, _inputs(1, seed=0), N)
    reasons = dict(info.value.problems)
    for module_name, word in expected.items():
        assert module_name in reasons, f"{module_name} not named in {sorted(reasons)[:8]}"
        assert word in reasons[module_name]
        assert module_name in str(info.value)
    assert not _parametrized(model), "a rejected model must be left unwrapped"


class _TokenMixing(nn.Module):
    """Self-attention built only from 1x1 convs (as in EfficientFormerV2/EfficientViT): no module
    type gives it away, the product of two activations does."""

    def __init__(self, channels: int = 8) -> None:
        super().__init__()
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).flatten(2).chunk(3, dim=1)
        attn = (q.transpose(1, 2) @ k).softmax(-1)
        return self.proj((v @ attn.transpose(1, 2)).reshape(x.shape))


class _TokenMixingNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.mixer = _TokenMixing(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.mixer(torch.relu(self.stem(x))).mean((2, 3)))


def test_attention_built_from_convs_is_rejected_before_tracing() -> None:
    model = _TokenMixingNet()
    with pytest.raises(UnsupportedModelError) as info:
        SteppingNet(model, _inputs(1, seed=0, size=8), N)
    reasons = dict(info.value.problems)
    assert "mixer" in reasons and "multiplies two activations" in reasons["mixer"], reasons
    assert not _parametrized(model)


class _ConcatFlatten(nn.Module):
    """``fc(flatten(cat([a(x), b(x)])))``: torch-pruning couples a and b and maps only a's
    features into fc, leaving b's unmapped (checked with torch-pruning 1.6)."""

    def __init__(self, ca: int, cb: int, hw: int) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, ca, 3, padding=1)
        self.b = nn.Conv2d(3, cb, 3, padding=1)
        self.fc = nn.Linear((ca + cb) * hw * hw, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(torch.cat([self.a(x), self.b(x)], 1), 1))


@pytest.mark.parametrize(
    ("ca", "cb", "hw"), [(2, 3, 4), (3, 3, 4), (4, 2, 2), (8, 8, 3)], ids=["2+3ch", "3+3ch", "4+2ch", "8+8ch"]
)
def test_mistraced_concat_flatten_linear_raises(ca: int, cb: int, hw: int) -> None:
    model = _ConcatFlatten(ca, cb, hw)
    with pytest.raises(UnsupportedModelError) as info:
        SteppingNet(model, _inputs(2, seed=0, size=hw), 3)
    # one of the layers around the mis-traced concat is named (which one depends on the widths)
    assert {"a", "b", "fc (input)"} & {name for name, _ in info.value.problems}, info.value.problems
    assert not _parametrized(model)


# ------------------------------------------------------------------------ bad input
@pytest.fixture
def lenet(tiny_model: Callable[..., nn.Module]) -> SteppingNet:
    return SteppingNet(tiny_model("lenet5"), _inputs(2, seed=0), N)


@pytest.mark.parametrize(
    "values",
    [
        lambda size: torch.zeros(size, dtype=torch.long),
        lambda size: torch.full((size,), N + 2, dtype=torch.long),
        lambda size: torch.full((size,), -1, dtype=torch.long),
    ],
    ids=["zero", "N+2", "negative"],
)
def test_assignment_values_outside_range_raise(lenet: SteppingNet, values: Callable[[int], torch.Tensor]) -> None:
    group = lenet.groups[0]
    with pytest.raises(ValueError, match=rf"allowed are 1\.\.{N} \(subnets\) and {N + 1} \(unused\)"):
        group.assignment = values(group.size)
    assert torch.equal(group.assignment, torch.ones(group.size, dtype=torch.long)), "a rejected value must not stick"


@pytest.mark.parametrize(
    "bad",
    [
        lambda size: torch.ones(size + 1, dtype=torch.long),
        lambda size: torch.ones(size - 1, dtype=torch.long),
        lambda size: torch.ones(1, size, dtype=torch.long),
        lambda size: torch.ones(size),
        lambda size: torch.ones(size, dtype=torch.bool),
    ],
    ids=["too-long", "too-short", "2-D", "float", "bool"],
)
def test_assignment_of_wrong_shape_or_type_raises(lenet: SteppingNet, bad: Callable[[int], torch.Tensor]) -> None:
    group = lenet.groups[0]
    with pytest.raises(ValueError, match=f"group {group.name!r}"):
        group.assignment = bad(group.size)


@pytest.mark.parametrize("delta", [-2, -1, 1, 2], ids=["short2", "short1", "long1", "long2"])
def test_flat_assignment_of_wrong_length_raises(lenet: SteppingNet, delta: int) -> None:
    total = sum(g.size for g in lenet.groups)
    assert lenet.flat_assignment().numel() == total + 1
    for good in (total, total + 1):  # with or without the trailing input slot
        lenet.set_flat_assignment(torch.full((good,), 2, dtype=torch.long))
        assert all(bool((g.assignment == 2).all()) for g in lenet.groups)
        assert lenet.macs(1) == 0  # nothing in subnet 1, so not even the classifier reads anything
        lenet.set_flat_assignment(torch.ones(good, dtype=torch.long))
    bad = total + 1 + delta if delta > 0 else total + delta
    with pytest.raises(ValueError, match=f"length {total}"):
        lenet.set_flat_assignment(torch.ones(bad, dtype=torch.long))


@pytest.mark.parametrize("s", [0, N + 1, -1, True, 2.0, "2"], ids=repr)
def test_subnet_index_outside_range_raises(lenet: SteppingNet, s: Any) -> None:
    message = rf"subnet index must be an int in 1\.\.{N}"
    with pytest.raises(ValueError, match=message):
        with lenet.subnet(s):
            pass
    with pytest.raises(ValueError, match=message):
        lenet.macs(s)
    with pytest.raises(ValueError, match=message):
        lenet.layer_macs(s)
    with pytest.raises(ValueError, match=message):
        lenet.export_subnet(s)
    with pytest.raises(ValueError, match=message):
        lenet.structural_mask(0, s)
    with pytest.raises(ValueError, match=message):
        lenet.weight_mask(0, s)
    assert lenet.active_subnet == N


@pytest.mark.parametrize("n", [0, -1, True, 2.5], ids=repr)
def test_bad_num_subnets_raises(tiny_model: Callable[..., nn.Module], n: Any) -> None:
    model = tiny_model("lenet5")
    with pytest.raises(ValueError, match="num_subnets must be a positive int"):
        SteppingNet(model, _inputs(2, seed=0), n)
    assert not _parametrized(model)


def test_wrapping_twice_raises_and_remove_restores_the_plain_model(tiny_model: Callable[..., nn.Module]) -> None:
    model = tiny_model("lenet5")
    x = _inputs(2, seed=0)
    keys = list(model.state_dict())
    plain = {k: v.clone() for k, v in model.state_dict().items()}
    model.eval()
    with torch.no_grad():
        expected = model(x)
    net = SteppingNet(model, x, N)
    assert list(model.state_dict()) != keys  # parametrized keys while wrapped
    with pytest.raises(ValueError, match="already has parametrizations"):
        SteppingNet(model, x, N)
    net.groups[0].assignment = torch.full((net.groups[0].size,), 2, dtype=torch.long)
    returned = net.remove()
    assert returned is model
    assert list(model.state_dict()) == keys
    assert all(torch.equal(v, plain[k]) for k, v in model.state_dict().items())
    assert not _parametrized(model)
    assert len(model._forward_pre_hooks) == 0
    assert all(
        type(m).__name__ in {"Conv2d", "Linear"} for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))
    )
    with torch.no_grad():
        assert torch.equal(model(x), expected)
    again = SteppingNet(model, x, N)  # a removed wrapper leaves a wrappable model
    assert len(again.groups) == len(net.groups)


# ----------------------------------------------------------------- masks in forward
def test_masks_apply_in_forward_and_never_overwrite_weights(
    tiny_model: Callable[..., nn.Module], random_assignment: Callable[..., torch.Tensor]
) -> None:
    net = SteppingNet(tiny_model("lenet5"), _inputs(2, seed=0), N)
    random_assignment(net, seed=5)
    model = net.model
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    x, target = _inputs(4, seed=6), torch.tensor([0, 1, 2, 3])
    model.train()
    for s in (2, 1, 4, 3):
        model.zero_grad(set_to_none=True)
        with net.subnet(s):
            for k, layer in enumerate(net.layers):
                mask = net.weight_mask(k, s)
                # What the layer uses in forward is the raw weight times the subnet's mask.
                assert torch.equal(layer.module.weight, net.original_weight(k) * mask)
            loss = nn.functional.cross_entropy(model(x), target)
        loss.backward()
        for k, layer in enumerate(net.layers):
            grad = net.original_weight(k).grad
            mask = net.weight_mask(k, s)
            assert grad is not None
            assert int(torch.count_nonzero(grad[mask == 0])) == 0, f"{layer.name}: masked weight got a gradient"
            assert int(torch.count_nonzero(grad[mask == 1])) > 0, f"{layer.name}: no active weight got a gradient"
    # Forwards and backwards never wrote into any parameter.
    assert all(torch.equal(v, params[k]) for k, v in model.named_parameters())


def test_training_mode_and_no_grad_inside_subnet(
    tiny_model: Callable[..., nn.Module], random_assignment: Callable[..., torch.Tensor]
) -> None:
    net = SteppingNet(tiny_model("resnet18"), _inputs(2, seed=0), N)
    random_assignment(net, seed=7)
    model, x = net.model, _inputs(2, seed=8)
    model.train()
    with net.subnet(2):
        out = model(x)
    assert out.requires_grad
    out.sum().backward()
    assert net.original_weight(0).grad is not None
    model.eval()
    with torch.no_grad(), net.subnet(2):
        quiet = model(x)
    with net.subnet(2):
        loud = model(x)
    assert not quiet.requires_grad and loud.requires_grad
    assert torch.equal(quiet, loud.detach())
    with torch.inference_mode(), net.subnet(3):
        assert torch.equal(model(x), _run(net, 3, x))


def _run(net: SteppingNet, s: int, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad(), net.subnet(s):
        return net.model(x)


def test_nested_and_failing_subnet_contexts(
    tiny_model: Callable[..., nn.Module], random_assignment: Callable[..., torch.Tensor]
) -> None:
    net = SteppingNet(tiny_model("lenet5"), _inputs(2, seed=0), N)
    random_assignment(net, seed=9)
    net.model.eval()
    x = _inputs(2, seed=10)
    expected = {s: _run(net, s, x) for s in range(1, N + 1)}
    assert not torch.equal(expected[1], expected[N])
    assert net.active_subnet == N
    with torch.no_grad():
        assert torch.equal(net.model(x), expected[N])  # outside any context: the largest subnet
        with net.subnet(3):
            assert net.active_subnet == 3
            with net.subnet(1):
                assert net.active_subnet == 1
                assert torch.equal(net.model(x), expected[1])
            assert net.active_subnet == 3
            assert torch.equal(net.model(x), expected[3])
        assert net.active_subnet == N
        with pytest.raises(RuntimeError, match="boom"):
            with net.subnet(2):
                raise RuntimeError("boom")
        assert net.active_subnet == N
        with net.subnet(2):
            with pytest.raises(ValueError):
                with net.subnet(N + 1):
                    pass
            assert net.active_subnet == 2
            assert torch.equal(net.model(x), expected[2])


def test_in_place_assignment_edit_is_picked_up(tiny_model: Callable[..., nn.Module]) -> None:
    # Masked: the hook reads conv1's channel 0 at its original position.
    net = SteppingNet(tiny_model("lenet5"), _inputs(2, seed=0), N, execution="masked")
    conv1, conv2 = net.layers[0], net.layers[1]
    group = net.groups[0]
    assert group.name == conv1.name and group.size == conv1.module.out_channels
    captured: dict[str, torch.Tensor] = {}
    handle = conv1.module.register_forward_hook(lambda m, a, out: captured.__setitem__("out", out.detach()))
    x = _inputs(2, seed=11)
    before = net.macs(1)
    _run(net, 1, x)  # fills the mask caches
    group.assignment[0] = 2  # in place: no setter call
    # Neuron 0 of conv1 leaves subnet 1: its own weights (in_chans x 5 x 5 per position) and
    # every conv2 weight reading it (conv2.out x 5 x 5 per position) become inactive.
    k1, k2 = conv1.module.kernel_size, conv2.module.kernel_size
    own = conv1.module.in_channels * k1[0] * k1[1] * conv1.positions
    read = conv2.module.out_channels * k2[0] * k2[1] * conv2.positions
    assert net.macs(1) == before - own - read
    # In subnet 2 the neuron is back, but conv2's neurons (all in subnet 1) still may not read it.
    assert net.macs(2) == before - read
    bias = 0.0 if conv1.module.bias is None else float(conv1.module.bias[0])
    _run(net, 1, x)  # channel 0 has no active weight in subnet 1: its output is the bias
    assert torch.equal(captured["out"][:, 0], torch.full_like(captured["out"][:, 0], bias))
    assert int(torch.count_nonzero(captured["out"][:, 1] - bias)) > 0
    _run(net, 2, x)
    assert int(torch.count_nonzero(captured["out"][:, 0] - bias)) > 0
    handle.remove()
    group.assignment[1] = N + 2  # invalid, in place
    with pytest.raises(ValueError, match=rf"group {group.name!r} has values in \[1, {N + 2}\]"):
        net.model(x)
    with pytest.raises(ValueError, match="allowed are"):
        net.macs(1)
    group.assignment[1] = N + 1
    _run(net, 1, x)  # valid again


# ---------------------------------------------------------------------------- MACs
class _HandBuilt(nn.Module):
    """conv1 3->4 (3x3, no padding) on 6x6 -> 4x4, BN, grouped conv2 4->4 (groups=2, 3x3,
    padding 1) -> 4x4, flatten (64 features), fc 64->5."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1, groups=2)
        self.fc = nn.Linear(64, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.conv2(x))
        return self.fc(torch.flatten(x, 1))


def test_macs_match_a_hand_count() -> None:
    torch.manual_seed(0)
    model = _HandBuilt()
    x = _inputs(2, seed=0, size=6)
    # Dense, by hand: conv1 4 out x 3 in x 9 x 16 positions = 1728; conv2 4 out x 2 in-per-group
    # x 9 x 16 = 1152; fc 64 x 5 = 320.
    assert macs(model, x) == 1728 + 1152 + 320 == 3200
    net = SteppingNet(model, x, 2)
    assert net.full_macs == 3200
    assert [g.name for g in net.groups] == ["conv1", "conv2"]
    net.groups[0].assignment = torch.tensor([1, 2, 1, 3])
    net.groups[1].assignment = torch.tensor([2, 1, 3, 1])
    # conv1 (inputs are the image, index 1): active outputs s=1 {0, 2}; s=2 {0, 1, 2}.
    conv1 = {1: 2 * 27 * 16, 2: 3 * 27 * 16}
    # conv2, groups=2: out 0 (a=2) reads in 0 (a=1), 1 (a=2) -> 2 columns from s=2;
    # out 1 (a=1) reads in 0 (1), not 1 (2) -> 1 column; out 2 (a=3) never;
    # out 3 (a=1) reads in 2 (1), not 3 (3) -> 1 column. Each column: 9 weights x 16 positions.
    conv2 = {1: 2 * 9 * 16, 2: 4 * 9 * 16}
    # fc reads flatten: feature c*16+p belongs to conv2 channel c; logits read a(c) <= s.
    fc = {1: 2 * 16 * 5, 2: 3 * 16 * 5}
    for s in (1, 2):
        assert net.layer_macs(s) == {"conv1": conv1[s], "conv2": conv2[s], "fc": fc[s]}
        assert net.macs(s) == conv1[s] + conv2[s] + fc[s]
    assert (net.macs(1), net.macs(2)) == (1312, 2112)
    # Unstructured pruning multiplies in: drop 5 weights of conv1's channel 0 (active in both).
    prune = torch.ones_like(net.original_weight("conv1"), dtype=torch.bool)
    prune[0, 0, 0, :] = False
    prune[0, 1, 1, :2] = False
    net.prune_masks["conv1"] = prune
    net.invalidate()
    assert (net.macs(1), net.macs(2)) == (1312 - 5 * 16, 2112 - 5 * 16)


def test_macs_helper_counts_nonzero_weights_by_hand() -> None:
    model = _HandBuilt()
    x = _inputs(3, seed=0, size=6)
    with torch.no_grad():
        model.conv1.weight[1] = 0.0  # 27 weights x 16 positions
        model.conv2.weight[3, 1] = 0.0  # 9 weights x 16 positions
        model.fc.weight[:, :10] = 0.0  # 50 weights x 1
    assert macs(model, x) == 3200  # dense kernel: zeros cost the same
    assert macs(model, x, nonzero=True) == 3200 - 27 * 16 - 9 * 16 - 50
    assert macs(model, x[:1], nonzero=True) == macs(model, x, nonzero=True)  # per sample


# ---------------------------------------------------------------------- state I/O
def test_state_dict_round_trip_into_a_fresh_wrap(
    tiny_model: Callable[..., nn.Module],
    random_assignment: Callable[..., torch.Tensor],
    randomize_bn: Callable[..., nn.Module],
) -> None:
    x = _inputs(2, seed=12)
    net = SteppingNet(randomize_bn(tiny_model("resnet18", seed=1), seed=2), x, N)
    random_assignment(net, seed=13)
    name = net.layers[3].name
    net.prune_masks[name] = (
        torch.rand(net.original_weight(name).shape, generator=torch.Generator().manual_seed(0)) > 0.3
    )
    net.invalidate()
    net.model.eval()
    expected = {s: _run(net, s, x) for s in range(1, N + 1)}
    buffer = io.BytesIO()
    torch.save(net.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)

    fresh = SteppingNet(tiny_model("resnet18", seed=99), x, N)
    fresh.model.eval()
    assert not torch.equal(_run(fresh, N, x), expected[N])
    fresh.load_state_dict(state)
    assert torch.equal(fresh.flat_assignment(), net.flat_assignment())
    assert set(fresh.prune_masks) == {name} and torch.equal(fresh.prune_masks[name], net.prune_masks[name])
    for s in range(1, N + 1):
        assert torch.equal(_run(fresh, s, x), expected[s])
        assert fresh.macs(s) == net.macs(s)
    assert list(fresh.model_state_dict()) == list(net.model_state_dict())


def test_loading_into_a_different_model_raises_checkpoint_error(tiny_model: Callable[..., nn.Module]) -> None:
    x = _inputs(2, seed=0)
    state = SteppingNet(tiny_model("lenet5"), x, N).state_dict()
    other = SteppingNet(tiny_model("lenet3c1l"), x, N)
    with pytest.raises(CheckpointError, match="different model"):
        other.load_state_dict(state)
    wider = SteppingNet(tiny_model("lenet5", width=2.0), x, N)
    with pytest.raises(CheckpointError, match="neuron groups differ"):
        wider.load_state_dict(state)
    fewer = SteppingNet(tiny_model("lenet5"), x, N - 1)
    with pytest.raises(CheckpointError, match=f"state has {N} subnets"):
        fewer.load_state_dict(state)
    with pytest.raises(CheckpointError, match="not a SteppingNet state"):
        fewer.load_state_dict({"format": "something else"})
    assert torch.equal(other.flat_assignment(), torch.ones_like(other.flat_assignment()))


def test_replacing_an_assignment_twice_never_serves_stale_masks(lenet: SteppingNet) -> None:
    """Caches must not key on id(): a freed assignment tensor's id can be reused at once."""
    group = lenet.groups[0]
    for k in range(50):
        values = torch.full((group.size,), 1 + k % 2, dtype=torch.long)
        group.assignment = values.clone()
        group.assignment = values  # replaced again with no forward in between
        expected = lenet.structural_mask(0, 1, lenet.flat_assignment()).sum()
        assert lenet.weight_mask(0, 1).sum() == expected * lenet.weight_mask(0, 1)[0, 0].numel()


def test_hook_registry_orders_by_priority_and_removes_its_dispatcher() -> None:
    from nni_steppingnet.hooks import OBSERVE, SCALE, HookRegistry

    registry = HookRegistry()
    param = nn.Parameter(torch.ones(3))
    seen: list[tuple[str, torch.Tensor]] = []
    scale = registry.add_gradient_hook(param, lambda g: seen.append(("scale", g.clone())) or g * 2, priority=SCALE)
    observe = registry.add_gradient_hook(param, lambda g: seen.append(("observe", g.clone())), priority=OBSERVE)
    (param * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    assert [name for name, _ in seen] == ["observe", "scale"]  # created second, runs first
    assert torch.equal(seen[0][1], torch.tensor([1.0, 2.0, 3.0]))
    assert torch.equal(param.grad, torch.tensor([2.0, 4.0, 6.0]))
    assert registry.count() == 2
    scale.remove()
    observe.remove()
    observe.remove()  # idempotent
    assert registry.count() == 0 and not param._backward_hooks
    with pytest.raises(TypeError, match="priority must be an int"):
        registry.add_gradient_hook(param, lambda g: None, priority="first")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("name", "kwargs", "size", "heads"),
    [
        ("repvit_m0_9", {}, 64, ["head.head.l", "head.head_dist.l"]),
        ("deit_tiny_distilled_patch16_224", {"img_size": 32, "patch_size": 8, "depth": 1}, 32, ["head", "head_dist"]),
    ],
    ids=["repvit", "deit_distilled"],
)
def test_every_head_of_a_distilled_model_is_a_logits_layer(
    name: str, kwargs: dict[str, Any], size: int, heads: list[str]
) -> None:
    """timm's get_classifier() names both heads (a container, or a tuple): both keep their
    outputs in every subnet, the subnets stay isolated and the runner and export are exact."""
    import timm

    from nni_steppingnet.graph import timm_heads
    from nni_steppingnet.testing import random_assignment, randomize_parameters, runner_report

    torch.manual_seed(0)
    model = randomize_parameters(timm.create_model(name, pretrained=False, num_classes=10, **kwargs).eval(), seed=2)
    assert len(timm_heads(model)) == 2
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    net = SteppingNet(model, x[:1], N)
    assert [layer.name for layer in net.layers if layer.is_logits] == heads
    random_assignment(net, seed=1)
    report = isolation_report(net, x, train=True)
    assert report.isolated and sum(report.compared) > 0, report
    report = runner_report(net, x)
    assert report.exact(), report
    for s in range(1, N + 1):
        with torch.no_grad(), net.subnet(s):
            torch.testing.assert_close(net.export_subnet(s).eval()(x), net.model(x), rtol=1e-5, atol=1e-6)


def test_channels_first_position_embedding_follows_its_channels() -> None:
    """PiT adds a ``[1, C, H, W]`` position embedding to its NCHW patch embedding: its channels
    are dim 1 (torch-pruning's default, the last dim, is the map's width), in the graph, export
    and the runner alike."""
    import timm

    from nni_steppingnet._channels import channels_first_parameters, parameter_channel_dim
    from nni_steppingnet.testing import random_assignment, randomize_parameters, runner_report

    assert parameter_channel_dim(torch.zeros(1, 96, 7, 7)) == 1
    assert parameter_channel_dim(torch.zeros(1, 7, 7, 96)) == 3  # channels-last stays last
    assert parameter_channel_dim(torch.zeros(1, 1, 96)) == 2
    torch.manual_seed(0)
    model = randomize_parameters(timm.create_model("pit_ti_224", pretrained=False, num_classes=10, img_size=64), seed=2)
    model.eval()
    assert [dim for _, dim in channels_first_parameters(model)] == [1]
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    net = SteppingNet(model, x[:1], N)
    assert net.channel_parameters["pos_embed"].numel() == model.pos_embed.shape[1]
    random_assignment(net, seed=1)
    report = isolation_report(net, x, train=True)
    assert report.isolated and sum(report.compared) > 0, report
    report = runner_report(net, x)
    assert report.exact(), report
    for s in range(1, N + 1):
        exported = net.export_subnet(s).eval()
        kept = int((net.flat_assignment()[net.channel_parameters["pos_embed"]] <= s).sum())
        assert exported.pos_embed.shape[1] == max(kept, 1)  # export keeps one channel of an empty group
        with torch.no_grad(), net.subnet(s):
            torch.testing.assert_close(exported(x), net.model(x), rtol=1e-5, atol=1e-6)
