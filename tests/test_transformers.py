"""Nested norms (LayerNorm/RMSNorm over channels, GroupNorm(1)) and the transformer models around
them: the norm math against an independent per-channel computation, isolation, exact MACs, the
incremental runner, export, the execution fallback and the refusals of what still cannot hold."""

from __future__ import annotations

import copy
from typing import Any, Callable, Iterator, cast

import pytest
import torch
import torch.nn as nn

from nni_steppingnet import SteppingNet
from nni_steppingnet.errors import UnsupportedModelError
from nni_steppingnet.nested_norm import (
    extend_statistics,
    nested_norm_output,
    nested_normalize,
    norm_kind,
    normalize_newest,
)
from nni_steppingnet.runtime import IncrementalRunner
from nni_steppingnet.sliced import compare_executions
from nni_steppingnet.testing import isolation_report, random_assignment, randomize_parameters

timm = pytest.importorskip("timm")
from timm.layers import LayerNorm2d  # noqa: E402
from timm.layers.grn import GlobalResponseNorm  # noqa: E402

N = 3


def _randomize_affine(module: nn.Module, seed: int) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.5 + (1.0 if p.dim() == 1 else 0.0))
    return module


# ------------------------------------------------------------------------ the norm itself
def _norm_cases() -> list[tuple[str, Callable[[], nn.Module], tuple[int, ...]]]:
    cases: list[tuple[str, Callable[[], nn.Module], tuple[int, ...]]] = [
        ("layernorm", lambda: nn.LayerNorm(10), (2, 5, 10)),
        ("layernorm2d", lambda: LayerNorm2d(10), (2, 10, 3, 4)),
        ("groupnorm1", lambda: nn.GroupNorm(1, 10), (2, 10, 3, 4)),
        ("timm_layernorm", lambda: timm.layers.LayerNorm(10), (2, 5, 10)),
    ]
    if hasattr(nn, "RMSNorm"):
        cases.append(("rmsnorm", lambda: nn.RMSNorm(10, eps=1e-6), (2, 5, 10)))
    return cases


NORM_CASES = _norm_cases()
#: timm's GlobalResponseNorm (ConvNeXt V2), in both of its layouts.
GRN_CASES: list[tuple[str, Callable[[], nn.Module], tuple[int, ...]]] = [
    ("grn_channels_last", lambda: GlobalResponseNorm(10), (2, 3, 4, 10)),
    ("grn_channels_first", lambda: GlobalResponseNorm(10, channels_last=False), (2, 10, 3, 4)),
]


@pytest.mark.parametrize(
    ("label", "build", "shape"), NORM_CASES + GRN_CASES, ids=[c[0] for c in NORM_CASES + GRN_CASES]
)
def test_nested_norm_equals_the_norm_when_every_channel_shares_one_index(
    label: str, build: Callable[[], nn.Module], shape: tuple[int, ...]
) -> None:
    module = _randomize_affine(build(), seed=1)
    kind = norm_kind(module)
    assert kind is not None, label
    x = torch.randn(shape, generator=torch.Generator().manual_seed(2)) * 3 + 1
    index = torch.ones(10, dtype=torch.long)
    weight = getattr(module, "weight", None)
    bias = getattr(module, "bias", None)
    got = nested_normalize(x, kind, index, 1, weight, bias)
    torch.testing.assert_close(got, module(x), rtol=1e-5, atol=1e-5)


#: a nested assignment of 10 channels for the prefix-formula tests: channels of index 4 are
#: inactive at ``PREFIX_ACTIVE``
PREFIX_INDEX = torch.tensor([3, 1, 4, 2, 1, 3, 4, 2, 2, 1])
PREFIX_ACTIVE = 3


def _active_channels(got: torch.Tensor, dim: int) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """``(channel, its output, its prefix)`` for the active channels of ``got`` under
    ``PREFIX_INDEX``; asserts that every inactive channel came out as zeros."""
    for c in range(PREFIX_INDEX.numel()):
        out_c = got.select(dim, c)
        if int(PREFIX_INDEX[c]) > PREFIX_ACTIVE:
            assert torch.equal(out_c, torch.zeros_like(out_c)), f"inactive channel {c} must be zero"
            continue
        yield c, out_c, (PREFIX_INDEX <= PREFIX_INDEX[c]).nonzero().flatten()


@pytest.mark.parametrize(("label", "build", "shape"), NORM_CASES, ids=[c[0] for c in NORM_CASES])
def test_nested_norm_uses_the_statistics_of_each_channels_prefix(
    label: str, build: Callable[[], nn.Module], shape: tuple[int, ...]
) -> None:
    module = _randomize_affine(build(), seed=3)
    kind = norm_kind(module)
    assert kind is not None
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(shape, generator=generator) * 2 + 0.5
    weight = cast(torch.Tensor, module.weight)
    bias = cast("torch.Tensor | None", getattr(module, "bias", None))
    got = nested_normalize(x, kind, PREFIX_INDEX, PREFIX_ACTIVE, weight, bias)
    dim = kind.dim % x.dim()
    rms = label == "rmsnorm"
    eps = float(cast(float, module.eps))
    for c, out_c, prefix in _active_channels(got, dim):
        xs = x.index_select(dim, prefix)
        reduce: tuple[int, ...] = tuple(range(dim, x.dim())) if label == "groupnorm1" else (dim,)
        if rms:
            var = (xs * xs).mean(dim=reduce, keepdim=True)
            mean = torch.zeros_like(var)
        else:
            mean = xs.mean(dim=reduce, keepdim=True)
            var = xs.var(dim=reduce, keepdim=True, unbiased=False)
        expected = ((x.narrow(dim, c, 1) - mean) / torch.sqrt(var + eps)).squeeze(dim) * weight[c]
        if bias is not None:
            expected = expected + bias[c]
        torch.testing.assert_close(out_c, expected, rtol=1e-4, atol=1e-5, msg=f"{label} channel {c}")


@pytest.mark.parametrize(("label", "build", "shape"), GRN_CASES, ids=[c[0] for c in GRN_CASES])
def test_nested_grn_divides_by_the_mean_response_of_each_channels_prefix(
    label: str, build: Callable[[], nn.Module], shape: tuple[int, ...]
) -> None:
    module = _randomize_affine(build(), seed=5)
    kind = norm_kind(module)
    assert kind is not None and kind.grn
    x = torch.randn(shape, generator=torch.Generator().manual_seed(6)) * 2 + 0.5
    weight, bias = cast(torch.Tensor, module.weight), cast(torch.Tensor, module.bias)
    got = nested_normalize(x, kind, PREFIX_INDEX, PREFIX_ACTIVE, weight, bias)
    dim = kind.dim % x.dim()
    spatial = tuple(d for d in range(1, x.dim()) if d != dim)
    norms = x.norm(p=2, dim=spatial, keepdim=True)
    for c, out_c, prefix in _active_channels(got, dim):
        mean = norms.index_select(dim, prefix).mean(dim=dim, keepdim=True)
        x_c = x.narrow(dim, c, 1)
        ratio = norms.narrow(dim, c, 1) / (mean + float(cast(float, module.eps)))
        expected = (x_c + bias[c] + weight[c] * x_c * ratio).squeeze(dim)
        torch.testing.assert_close(out_c, expected, rtol=1e-5, atol=1e-6, msg=f"{label} channel {c}")


@pytest.mark.parametrize(
    ("label", "build", "shape"), NORM_CASES + GRN_CASES, ids=[c[0] for c in NORM_CASES + GRN_CASES]
)
def test_statistics_extended_stage_by_stage_equal_the_nested_norm(
    label: str, build: Callable[[], nn.Module], shape: tuple[int, ...]
) -> None:
    """The runtime's delta layout: stage s hands a norm only the channels of index s, and
    extend_statistics merges them into the statistics of the channels so far; normalize_newest
    then gives those channels what the nested norm of the whole tensor gives them (a mean of 4
    and a spread of 3 so that a naive sum of squares would lose digits)."""
    module = _randomize_affine(build(), seed=7)
    kind = norm_kind(module)
    assert kind is not None
    x = torch.randn(shape, generator=torch.Generator().manual_seed(8)) * 3 + 4
    weight = cast("torch.Tensor | None", getattr(module, "weight", None))
    bias = cast("torch.Tensor | None", getattr(module, "bias", None))
    dim = kind.dim % x.dim()
    statistics = None
    before = 0
    for s in range(1, int(PREFIX_INDEX.max()) + 1):
        channels = (PREFIX_INDEX == s).nonzero().flatten()
        new = x.index_select(dim, channels)
        statistics = extend_statistics(new, kind, statistics, before)
        before += int(channels.numel())
        got = normalize_newest(
            module,
            kind,
            new,
            statistics,
            before,
            None if weight is None else weight[channels],
            None if bias is None else bias[channels],
        )
        expected = nested_norm_output(module, kind, x, PREFIX_INDEX, s, weight, bias).index_select(dim, channels)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5, msg=f"{label} stage {s}")


# --------------------------------------------------------------------- a hand-built model
class _NormNet(nn.Module):
    """Conv -> LayerNorm2d -> conv -> GELU -> GroupNorm(1) -> conv, a residual add, a
    channels-last LayerNorm and a Linear classifier: every kind of nested norm once."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.ln2d = LayerNorm2d(8)
        self.c2 = nn.Conv2d(8, 12, 3, padding=1)
        self.act = nn.GELU()
        self.gn = nn.GroupNorm(1, 12)
        self.c3 = nn.Conv2d(12, 8, 1)
        self.ln = nn.LayerNorm(8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.c1(x)
        x = x + self.c3(self.gn(self.act(self.c2(self.ln2d(x)))))
        x = self.ln(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.fc(x.mean((2, 3)))


SIZE = 8


def _inputs(batch: int, seed: int, size: int = SIZE) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _norm_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = _NormNet().eval()
    for name in ("ln2d", "gn", "ln"):
        _randomize_affine(model.get_submodule(name), seed=seed + 7)
    return model


@pytest.fixture
def norm_net() -> SteppingNet:
    return SteppingNet(_norm_net(), _inputs(2, seed=0), N, execution="masked")


def test_hand_built_norms_become_nested_norms(norm_net: SteppingNet) -> None:
    assert sorted(norm_net.nested_norms.names) == ["gn", "ln", "ln2d"]
    flat = random_assignment(norm_net, seed=3)
    for name, positions in norm_net.nested_norms.positions.items():
        assert torch.equal(norm_net.nested_norms.channel_index(name), flat[positions])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_hand_built_subnets_are_isolated_bitwise(norm_net: SteppingNet, seed: int) -> None:
    random_assignment(norm_net, seed=seed)
    for train in (False, True):
        report = isolation_report(norm_net, _inputs(4, seed=seed + 10), train=train)
        assert report.isolated, report
        assert sum(report.compared) > 0


def test_the_nested_norm_is_what_breaks_nothing_the_plain_norm_would(norm_net: SteppingNet) -> None:
    """Control: with the hooks removed, the same assignment leaks through the LayerNorms."""
    random_assignment(norm_net, seed=0)
    norm_net.nested_norms.remove()
    report = isolation_report(norm_net, _inputs(4, seed=10))
    assert not report.isolated, "a plain LayerNorm must mix subnets (else the test proves nothing)"


def _group(net: SteppingNet, size: int) -> torch.Tensor:
    (group,) = [g for g in net.groups if g.size == size]
    return group.assignment


@pytest.mark.parametrize("seed", [0, 5])
def test_hand_built_macs_are_exact(norm_net: SteppingNet, seed: int) -> None:
    """MACs from the group assignments, computed here without the library's masks: norms cost
    nothing; a weight W[o, i] counts iff a(i) <= a(o) <= s (classifier: a(i) <= s)."""
    random_assignment(norm_net, seed=seed)
    res, mid = _group(norm_net, 8), _group(norm_net, 12)
    positions = SIZE * SIZE
    for s in range(1, N + 1):
        c1 = int((res <= s).sum()) * 3 * 9 * positions
        c2 = sum(int(((res <= a) & (a <= s)).sum()) * 9 for a in mid.tolist()) * positions
        c3 = sum(int(((mid <= a) & (a <= s)).sum()) for a in res.tolist()) * positions
        fc = 5 * int((res <= s).sum())
        assert norm_net.macs(s) == c1 + c2 + c3 + fc, s


def _assert_runner_equals_masked(
    net: SteppingNet, x: torch.Tensor, rtol: float, atol: float, layout: str = "auto"
) -> IncrementalRunner:
    """The runner's logits after every step equal the masked subnet's, and it spends exactly
    ``net.macs(s)``; returns the runner (reset to no stage)."""
    runner = IncrementalRunner(net, layout=layout)
    with torch.no_grad():
        for s in range(1, N + 1):
            logits = runner.start(x) if s == 1 else runner.step()
            with net.subnet(s):
                expected = net.model(x)
            torch.testing.assert_close(logits, expected, rtol=rtol, atol=atol)
            assert runner.macs_spent == net.macs(s)
    return runner


@pytest.mark.parametrize("layout", ["auto", "full"])
@pytest.mark.parametrize("seed", [0, 1])
def test_hand_built_runner_matches_masked_subnets(norm_net: SteppingNet, seed: int, layout: str) -> None:
    random_assignment(norm_net, seed=seed)
    runner = _assert_runner_equals_masked(norm_net, _inputs(3, seed=20), rtol=1e-5, atol=1e-6, layout=layout)
    # "auto" checks the delta layout on a random input and keeps it
    assert runner.layout == ("delta" if layout == "auto" else "full")


def test_delta_layout_norms_see_only_the_new_channels(norm_net: SteppingNet) -> None:
    """In the delta layout a nested norm gets the channels of index s only and normalises them
    with the statistics of every channel so far (kept from the earlier stages): the logits equal
    the masked subnet's at every stage (above), and no stage hands a norm an earlier channel."""
    flat = random_assignment(norm_net, seed=3)
    runner = IncrementalRunner(norm_net, layout="delta")
    seen: dict[str, list[int]] = {"ln2d": [], "gn": [], "ln": []}
    handles = [
        runner.model.get_submodule(name).register_forward_pre_hook(
            lambda mod, args, name=name: seen[name].append(int(args[0].shape[-1 if name == "ln" else 1]))
        )
        for name in seen
    ]
    try:
        with torch.no_grad():
            for s in range(1, N + 1):
                runner.start(_inputs(2, seed=21)) if s == 1 else runner.step()
    finally:
        for handle in handles:
            handle.remove()
    for name, widths in seen.items():
        channels = flat[norm_net.nested_norms.positions[name]]
        assert widths == [int((channels == s).sum()) for s in range(1, N + 1)], name


@pytest.mark.parametrize("seed", [0, 1])
def test_hand_built_export_matches_masked_subnets(norm_net: SteppingNet, seed: int) -> None:
    flat = random_assignment(norm_net, seed=seed)
    x = _inputs(3, seed=21)
    for s in range(1, N + 1):
        exported = norm_net.export_subnet(s).eval()
        ln = exported.get_submodule("ln")
        assert isinstance(ln, nn.LayerNorm)
        assert ln.weight.numel() == int((flat[norm_net.nested_norms.positions["ln"]] <= s).sum())
        with torch.no_grad():
            with norm_net.subnet(s):
                expected = norm_net.model(x)
            torch.testing.assert_close(exported(x), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_hand_built_norms_run_sliced_equal_to_masked(seed: int) -> None:
    """LayerNorm2d, GroupNorm(1) and LayerNorm as nested norms in the cumulative layout, on random
    assignments (unused neurons, channels of one subnet only): "auto" picks sliced, and logits,
    gradients and the norms' own inputs agree with the masked execution. In float64: in float32
    at one thread, seed 2's ``c1.bias`` gradient (a bias just before a norm, nearly cancelled)
    differs by 1.15e-4 of its largest entry from rounding alone (1e-9 in float64)."""
    net = SteppingNet(_norm_net().double(), _inputs(2, seed=0).double(), N, execution="auto")
    assert net.execution == "sliced"
    random_assignment(net, seed=seed)
    assert compare_executions(net, _inputs(4, seed=seed + 10).double()) == ""


def _norm_act_cases() -> list[tuple[str, Callable[[], nn.Module]]]:
    from timm.layers.norm_act import GroupNorm1Act, LayerNormAct2d, RmsNormAct2d
    from timm.models.metaformer import GroupNorm1NoBias, LayerNorm2dNoBias

    return [
        ("groupnorm1act_relu", lambda: GroupNorm1Act(8)),
        ("layernormact2d_gelu", lambda: LayerNormAct2d(8, act_layer=nn.GELU)),
        ("rmsnormact2d_silu", lambda: RmsNormAct2d(8, act_layer=nn.SiLU)),
        ("metaformer_layernorm2d_nobias", lambda: LayerNorm2dNoBias(8)),
        ("metaformer_groupnorm1_nobias", lambda: GroupNorm1NoBias(8)),
    ]


NORM_ACT_CASES = _norm_act_cases()


class _OneNormNet(nn.Module):
    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = norm
        self.c2 = nn.Conv2d(8, 6, 3, padding=1)
        self.fc = nn.Linear(6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.c2(self.norm(self.c1(x))).mean((2, 3)))


@pytest.mark.parametrize(("label", "build"), NORM_ACT_CASES, ids=[c[0] for c in NORM_ACT_CASES])
def test_norm_act_and_no_bias_norms_keep_their_forward_as_nested_norms(
    label: str, build: Callable[[], nn.Module]
) -> None:
    """timm's norm-act modules apply an activation after the norm, metaformer's NoBias norms drop
    the bias: with every neuron in subnet 1 the nested norm is the original module's forward (a
    GroupNorm1Act once lost its activation here: 0.18 off), and on random assignments the
    subnets are isolated, sliced equals masked, and the runner and exports equal the masks."""
    torch.manual_seed(0)
    model = _OneNormNet(_randomize_affine(build(), seed=1)).double().eval()
    x = _inputs(3, seed=4).double()
    with torch.no_grad():
        original = model(x)
    net = SteppingNet(model, x[:2], N, execution="auto")
    assert net.nested_norms.names == ["norm"], label
    assert net.execution == "sliced"
    for group in net.groups:
        group.assignment = torch.ones(group.size, dtype=torch.long)
    with torch.no_grad(), net.subnet(N):
        torch.testing.assert_close(net.model(x), original, rtol=1e-10, atol=1e-10)
    random_assignment(net, seed=2)
    for train in (False, True):
        report = isolation_report(net, x, train=train)
        assert report.isolated and sum(report.compared) > 0, report
    assert compare_executions(net, x) == ""
    _assert_runner_equals_masked(net, x, rtol=1e-8, atol=1e-10)
    for s in range(1, N + 1):
        exported = net.export_subnet(s).eval()
        with torch.no_grad(), net.subnet(s):
            torch.testing.assert_close(exported(x), net.model(x), rtol=1e-8, atol=1e-10)


def test_a_norm_subclass_with_its_own_forward_is_refused_by_name() -> None:
    class ScaledGroupNorm(nn.GroupNorm):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return 2 * super().forward(x)

    assert norm_kind(ScaledGroupNorm(1, 8)) is None
    with pytest.raises(UnsupportedModelError, match="norm: ScaledGroupNorm .* overrides GroupNorm's forward"):
        SteppingNet(_OneNormNet(ScaledGroupNorm(1, 8)), _inputs(2, seed=0), N)


def test_remove_restores_the_original_norms() -> None:
    model = _norm_net()
    reference = copy.deepcopy(model)
    x = _inputs(2, seed=30)
    net = SteppingNet(model, _inputs(2, seed=0), N, execution="masked")
    random_assignment(net, seed=0)
    with torch.no_grad():
        assert not torch.allclose(net.model(x), reference(x))
        net.remove()
        torch.testing.assert_close(model(x), reference(x))


# ------------------------------------------------------------------------------ timm models
def _convnext() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(
        "convnext_atto", pretrained=False, num_classes=10, dims=(16, 24, 32, 40), depths=(1, 1, 1, 1)
    ).eval()


def _vit(name: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        torch.manual_seed(0)
        return timm.create_model(
            name, pretrained=False, img_size=32, patch_size=8, depth=2, embed_dim=48, num_heads=3, num_classes=10
        ).eval()

    return build


def _convnextv2() -> nn.Module:
    """ConvNeXt V2 with random GRN parameters: timm starts them at zero, where GRN is the
    identity and a plain GRN would pass the isolation probe only to break it once trained."""
    torch.manual_seed(0)
    model = timm.create_model(
        "convnextv2_atto", pretrained=False, num_classes=10, dims=(16, 24, 32, 40), depths=(1, 1, 1, 1)
    ).eval()
    for module in model.modules():
        if isinstance(module, GlobalResponseNorm):
            _randomize_affine(module, seed=7)
    return model


def _swin() -> nn.Module:
    """Two stages of two blocks (windows, then shifted windows) joined by patch merging; the
    shifted block runs timm's fused attention, the others its unfused one."""
    torch.manual_seed(0)
    model = timm.create_model(
        "swin_tiny_patch4_window7_224",
        pretrained=False,
        img_size=32,
        embed_dim=24,
        depths=(2, 2),
        num_heads=(2, 4),
        window_size=4,
        num_classes=10,
    ).eval()
    model.layers[0].blocks[1].attn.fused_attn = True
    return model


TIMM_MODELS: dict[str, Callable[[], nn.Module]] = {
    "convnext_atto": _convnext,
    "convnextv2_atto": _convnextv2,
    "vit_tiny_patch16_224": _vit("vit_tiny_patch16_224"),
    "deit_tiny_patch16_224": _vit("deit_tiny_patch16_224"),
    # a hybrid: convs, then transformers over patches folded into the batch
    "mobilevit_xxs": lambda: timm.create_model("mobilevit_xxs", pretrained=False, num_classes=10).eval(),
    "swin_tiny_patch4_window7_224": _swin,
}
TIMM_SIZES = {"mobilevit_xxs": 64}


@pytest.mark.parametrize("name", sorted(TIMM_MODELS))
@pytest.mark.parametrize("parameters", ["timm_init", "random"])
def test_timm_model_downstream_exact(name: str, parameters: str) -> None:
    """At timm's init and with every parameter random (timm's unit norms and zero biases hid
    the export's permuted LayerNorm parameters)."""
    x = _inputs(2, seed=0, size=TIMM_SIZES.get(name, 32))
    torch.manual_seed(0)
    model = TIMM_MODELS[name]()
    if parameters == "random":
        randomize_parameters(model, seed=5)
    net = SteppingNet(model, x, N, execution="auto")
    assert len(net.nested_norms) > 0
    assert net.execution == "sliced"
    flat = random_assignment(net, seed=1)
    assert (flat[:-1] <= N).any()
    report = isolation_report(net, x)
    assert report.isolated and sum(report.compared) > 0, report
    macs = [net.macs(s) for s in range(1, N + 1)]
    assert macs == sorted(macs) and macs[0] < macs[-1]
    _assert_runner_equals_masked(net, x, rtol=1e-5, atol=1e-6)
    for s in (1, N):
        exported = net.export_subnet(s).eval()
        with torch.no_grad(), net.subnet(s):
            torch.testing.assert_close(exported(x), net.model(x), rtol=1e-5, atol=1e-6)


# -------------------------------------------------------------------------------- refusals
class _Wrap(nn.Module):
    def __init__(self, norm: nn.Module, channels_last: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = norm
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(self.conv(x)).mean((2, 3)))


@pytest.mark.parametrize(
    ("norm", "words"),
    [
        (nn.GroupNorm(2, 8), ("GroupNorm with 2 groups", "1 group")),
        (nn.LayerNorm([8, SIZE, SIZE]), ("3 dimensions", "channel dimension")),
    ],
    ids=["groupnorm2", "layernorm-3d"],
)
def test_norms_that_cannot_nest_are_refused_by_name(norm: nn.Module, words: tuple[str, ...]) -> None:
    model = _Wrap(norm)
    with pytest.raises(UnsupportedModelError) as info:
        SteppingNet(model, _inputs(1, seed=0), N)
    reasons = dict(info.value.problems)
    assert "norm" in reasons
    for word in words:
        assert word in reasons["norm"]


class _AffineFreeNorm(nn.Module):
    """conv -> a norm over channels (channels last) -> pooled Linear: timm's qwen3_vit ends in a
    ``LayerNorm(elementwise_affine=False)``."""

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = norm
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(self.conv(x).permute(0, 2, 3, 1))
        return self.fc(y.mean((1, 2)))


@pytest.mark.parametrize("seed", [0, 1])
def test_layernorm_without_affine_nests(seed: int) -> None:
    """torch-pruning groups an affine-free LayerNorm with the conv before it; its channels are
    the conv's neurons (width from ``normalized_shape``): subnets stay isolated bitwise, and
    removing the nested norm breaks isolation (so the check can fail)."""
    net = SteppingNet(
        randomize_parameters(_AffineFreeNorm(nn.LayerNorm(8, elementwise_affine=False))), _inputs(1, 0), N
    )
    assert net.nested_norms.names == ["norm"]
    flat = random_assignment(net, seed=seed)
    assert torch.equal(net.nested_norms.channel_index("norm"), flat[net.nested_norms.positions["norm"]])
    for train in (False, True):
        report = isolation_report(net, _inputs(4, seed=seed + 10), train=train)
        assert report.isolated, report
        assert sum(report.compared) > 0
    x = _inputs(3, seed=21)
    for s in range(1, N + 1):
        with torch.no_grad(), net.subnet(s):
            expected = net.model(x)
        torch.testing.assert_close(net.export_subnet(s).eval()(x), expected, rtol=1e-5, atol=1e-6)
    net.nested_norms.remove()
    assert not isolation_report(net, _inputs(4, seed=seed + 10)).isolated


def test_a_norm_torch_pruning_cannot_trace_without_affine_is_refused_by_name() -> None:
    """timm's RmsNorm without affine parameters is no torch-pruning node: none of its channels
    map to neurons, and the wrap says so by name."""
    with pytest.raises(UnsupportedModelError) as info:
        SteppingNet(_AffineFreeNorm(timm.layers.RmsNorm(8, affine=False)), _inputs(1, seed=0), N)
    assert "norm" in dict(info.value.problems)
    assert "affine=True" in str(info.value)


def _one_block_mixer(**kwargs: Any) -> nn.Module:
    """A one-block MLP-Mixer at 32x32 (patch 8, dim 32) with timm's ``MlpMixer`` options."""
    return timm.models.mlp_mixer.MlpMixer(
        num_classes=10, img_size=32, patch_size=8, num_blocks=1, embed_dim=32, **kwargs
    )


REFUSED: dict[str, tuple[Callable[[], nn.Module], str, str]] = {
    "vit_qk_norm": (
        lambda: timm.create_model(
            "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=1, qk_norm=True, num_classes=10
        ),
        "blocks.0.attn",
        "qk_norm=False",
    ),
    # SwinV2's continuous position bias is an MLP over the relative coordinates, shared by heads
    "swinv2": (
        lambda: timm.create_model(
            "swinv2_tiny_window8_256",
            pretrained=False,
            img_size=32,
            embed_dim=24,
            depths=(1,),
            num_heads=(2,),
            window_size=4,
            num_classes=10,
        ),
        "layers.0.blocks.0.attn",
        "cpb_mlp",
    ),
    # spatial gating multiplies the token-mixed half of the channels with the other half
    "gmlp": (
        lambda: _one_block_mixer(
            mlp_ratio=6, block_layer=timm.models.mlp_mixer.SpatialGatingBlock, mlp_layer=timm.layers.GatedMlp
        ),
        "blocks.0.mlp_channels.gate",
        "spatial gating",
    ),
    # a gated token MLP (gMixer): refused before torch-pruning's tracer, which never finishes on it
    "gmixer": (
        lambda: _one_block_mixer(mlp_ratio=(1.0, 4.0), mlp_layer=timm.layers.GluMlp, act_layer=nn.SiLU),
        "blocks.0",
        "plain Mlp",
    ),
}


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_models_still_refused_are_named(name: str) -> None:
    build, module, word = REFUSED[name]
    torch.manual_seed(0)
    model: Any = build().eval()
    with pytest.raises(UnsupportedModelError) as info:
        SteppingNet(model, _inputs(1, seed=0, size=32), N)
    reasons = dict(info.value.problems)
    assert module in reasons, sorted(reasons)[:6]
    assert word in reasons[module]


def test_saved_runner_keeps_its_nested_norms(norm_net: SteppingNet, tmp_path: Any) -> None:
    random_assignment(norm_net, seed=4)
    x = _inputs(2, seed=22)
    path = tmp_path / "runner.pt"
    IncrementalRunner(norm_net).save(path)
    loaded = IncrementalRunner.load(path, _NormNet())
    assert loaded.layout == "delta"
    with torch.no_grad():
        for s in range(1, N + 1):
            logits = loaded.start(x) if s == 1 else loaded.step()
            with norm_net.subnet(s):
                torch.testing.assert_close(logits, norm_net.model(x), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------ token mixing (Mixer, ResMLP)
MIXER_BLOCKS, MIXER_DIM, MIXER_TOKENS = 2, 32, (32 // 8) ** 2


def _mixer(kind: str) -> nn.Module:
    """A small MLP-Mixer or ResMLP with every parameter random (timm zeroes the head and the
    biases, which would hide channels that leak)."""
    torch.manual_seed(0)
    mixer = timm.models.mlp_mixer
    extra: dict[str, Any] = {}
    if kind == "resmlp":
        extra = {"block_layer": mixer.ResBlock, "norm_layer": mixer.Affine, "mlp_ratio": 4}
    model = mixer.MlpMixer(
        num_classes=10, img_size=32, patch_size=8, num_blocks=MIXER_BLOCKS, embed_dim=MIXER_DIM, **extra
    ).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            centre = 1.0 if name.endswith(("alpha", "norm1.weight", "norm2.weight", "norm.weight")) else 0.0
            p.copy_(torch.randn(p.shape, generator=generator) * 0.3 + centre)
    return model


MIXERS = ("mixer", "resmlp")
TOKEN_LINEARS = {
    "mixer": [f"blocks.{b}.mlp_tokens.{fc}" for b in range(MIXER_BLOCKS) for fc in ("fc1", "fc2")],
    "resmlp": [f"blocks.{b}.linear_tokens" for b in range(MIXER_BLOCKS)],
}


@pytest.fixture(params=MIXERS)
def mixer_net(request: pytest.FixtureRequest) -> tuple[str, SteppingNet]:
    kind = str(request.param)
    return kind, SteppingNet(_mixer(kind), _inputs(2, seed=0, size=32), N, execution="masked")


def test_token_mixing_linears_are_no_neurons_and_keep_the_residual_group(mixer_net: tuple[str, SteppingNet]) -> None:
    kind, net = mixer_net
    assert [t.name for t in net.token_mixing] == TOKEN_LINEARS[kind]
    layers = {layer.name for layer in net.layers}
    assert not layers & set(TOKEN_LINEARS[kind]), "token-mixing Linears must not be masked layers"
    # the residual stream is one group of embed_dim neurons read by every block and the head
    (residual,) = [g for g in net.group_specs if g.size == MIXER_DIM]
    head = next(layer for layer in net.layers if layer.is_logits)
    stem = net.index.out_positions[net.index.layer("stem.proj")]
    for token in net.token_mixing:
        assert torch.equal(token.positions, stem), token.name
        assert torch.equal(token.positions, head.in_pos)
    assert residual.size == MIXER_DIM
    # the parameters of a token Linear stay unmasked: no parametrization on them
    for name in TOKEN_LINEARS[kind]:
        assert not hasattr(net.model.get_submodule(name), "parametrizations")


@pytest.mark.parametrize("seed", [0, 1])
def test_mixer_subnets_are_isolated(mixer_net: tuple[str, SteppingNet], seed: int) -> None:
    _, net = mixer_net
    random_assignment(net, seed=seed)
    for train in (False, True):
        report = isolation_report(net, _inputs(4, seed=seed + 10, size=32), train=train)
        assert report.isolated, report
        assert sum(report.compared) > 0


def _count_macs(model: nn.Module, x: torch.Tensor) -> int:
    """MACs per sample of a dense model from forward hooks, counted here: every Conv2d/Linear
    spends (nonzero weight entries) x (output elements per output channel)."""
    total = [0]

    def hook(module: nn.Module, args: Any, output: torch.Tensor) -> None:
        weight = cast(torch.Tensor, module.weight)
        per_channel = output.numel() // (x.shape[0] * int(weight.shape[0]))
        total[0] += int(torch.count_nonzero(weight)) * per_channel

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for handle in handles:
            handle.remove()
    return total[0]


@pytest.mark.parametrize("seed", [0, 3])
def test_mixer_macs_are_exact_and_token_linears_cost_in_x_out_per_active_channel(
    mixer_net: tuple[str, SteppingNet], seed: int
) -> None:
    kind, net = mixer_net
    flat = random_assignment(net, seed=seed)
    x = _inputs(2, seed=5, size=32)
    for s in range(1, N + 1):
        active = int((flat[net.token_mixing[0].positions] <= s).sum())
        layer_macs = net.layer_macs(s)
        for token in net.token_mixing:
            module = cast(nn.Linear, net.model.get_submodule(token.name))
            assert layer_macs[token.name] == module.in_features * module.out_features * active, token.name
        exported = net.export_subnet(s).eval()
        assert net.macs(s) == _count_macs(exported, x), s
        # the exported token Linears run over the kept channels only
        first = cast(nn.Linear, exported.get_submodule(TOKEN_LINEARS[kind][0]))
        assert first.in_features == MIXER_TOKENS
    assert net.macs(N) < net.full_macs
    full = _mixer(kind)
    assert _count_macs(full, x) == net.full_macs


@pytest.mark.parametrize("seed", [0, 1])
def test_mixer_export_matches_masked_subnets(mixer_net: tuple[str, SteppingNet], seed: int) -> None:
    _, net = mixer_net
    flat = random_assignment(net, seed=seed)
    x = _inputs(3, seed=21, size=32)
    for s in range(1, N + 1):
        exported = net.export_subnet(s).eval()
        kept = int((flat[net.token_mixing[0].positions] <= s).sum())
        assert exported.get_submodule("stem.proj").out_channels == kept
        with torch.no_grad():
            with net.subnet(s):
                expected = net.model(x)
            torch.testing.assert_close(exported(x), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("layout", ["auto", "full"])
@pytest.mark.parametrize("seed", [0, 2])
def test_mixer_runner_matches_masked_subnets_at_their_macs(
    mixer_net: tuple[str, SteppingNet], seed: int, layout: str
) -> None:
    """Delta layout (what "auto" keeps): a token-mixing Linear runs over the new channels it
    gets; full-width: over the new channels of its full-width input, keeping the others."""
    _, net = mixer_net
    random_assignment(net, seed=seed)
    macs = [net.macs(s) for s in range(1, N + 1)]
    assert macs == sorted(macs) and macs[0] < macs[-1]
    runner = _assert_runner_equals_masked(net, _inputs(3, seed=20, size=32), rtol=1e-5, atol=1e-6, layout=layout)
    assert runner.layout == ("delta" if layout == "auto" else "full")
    assert [runner.macs(s) for s in range(1, N + 1)] == macs


def test_saved_mixer_runner_reloads(mixer_net: tuple[str, SteppingNet], tmp_path: Any) -> None:
    kind, net = mixer_net
    random_assignment(net, seed=4)
    x = _inputs(2, seed=22, size=32)
    path = tmp_path / "runner.pt"
    runner = IncrementalRunner(net)
    runner.save(path)
    loaded = IncrementalRunner.load(path, _mixer(kind))
    assert loaded.layout == "delta"
    assert loaded.assignment_hash() == runner.assignment_hash()
    with torch.no_grad():
        for s in range(1, N + 1):
            logits = loaded.start(x) if s == 1 else loaded.step()
            with net.subnet(s):
                torch.testing.assert_close(logits, net.model(x), rtol=1e-5, atol=1e-6)
            assert loaded.macs_spent == net.macs(s)


def test_mixer_sliced_execution_equals_masked() -> None:
    """MLP-Mixer's LayerNorms are nested norms; sliced execution runs them over the active
    channels (and the token Linears over those channels only)."""
    net = SteppingNet(_mixer("mixer"), _inputs(2, seed=0, size=32), N, execution="auto")
    assert net.execution == "sliced"
    random_assignment(net, seed=6)
    assert compare_executions(net, _inputs(3, seed=23, size=32)) == ""


def test_resmlp_sliced_execution_equals_masked() -> None:
    """ResMLP has no norm over channels (Affine is per channel): sliced execution runs the token
    Linears over the active channels only and must reproduce the masked subnets."""
    net = SteppingNet(_mixer("resmlp"), _inputs(2, seed=0, size=32), N, execution="auto")
    assert net.execution == "sliced"
    random_assignment(net, seed=6)
    x = _inputs(3, seed=23, size=32)
    with torch.no_grad():
        for s in range(1, N + 1):
            with net.subnet(s):
                sliced = net.model(x)
                with net.masked_execution():
                    masked = net.model(x)
            torch.testing.assert_close(sliced, masked, rtol=1e-5, atol=1e-6)


def test_affine_parameters_are_per_channel_and_exported_with_their_channels() -> None:
    net = SteppingNet(_mixer("resmlp"), _inputs(2, seed=0, size=32), N, execution="masked")
    flat = random_assignment(net, seed=7)
    stem = net.index.out_positions[net.index.layer("stem.proj")]
    for name in ("blocks.0.norm1.alpha", "blocks.0.norm1.beta", "blocks.1.norm2.alpha", "norm.alpha", "blocks.0.ls1"):
        assert torch.equal(net.channel_parameters[name], stem), name
    exported = net.export_subnet(2)
    kept = int((flat[stem] <= 2).sum())
    assert exported.get_submodule("blocks.0.norm1").alpha.shape == (1, 1, kept)
    assert exported.get_submodule("norm").beta.shape == (1, 1, kept)


def test_token_mixing_block_reading_something_else_is_refused_by_name() -> None:
    """A block that looks like a Mixer block but applies mlp_tokens without the transpose."""

    class NotTransposed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 16, 8, stride=8)
            self.norm1 = nn.LayerNorm(16)
            self.mlp_tokens = timm.layers.Mlp(16, 8)
            self.fc = nn.Linear(16, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.conv(x).flatten(2).transpose(1, 2)
            x = x + self.mlp_tokens(self.norm1(x))
            return self.fc(x.mean(1))

    with pytest.raises(UnsupportedModelError) as info:
        SteppingNet(NotTransposed().eval(), _inputs(1, seed=0, size=32), N)
    reasons = dict(info.value.problems)
    assert "mlp_tokens.fc1" in reasons and "transposed output" in reasons["mlp_tokens.fc1"]


def test_moving_a_residual_neuron_costs_its_token_mixing_macs(mixer_net: tuple[str, SteppingNet]) -> None:
    """Construction's per-neuron cost includes the token-mixing work of the channel, so a move
    frees exactly what net.macs says."""
    from nni_steppingnet.construction.select import neuron_costs

    _, net = mixer_net
    token = net.token_mixing[0]
    j = int(token.positions[3])
    before = net.macs(1)
    cost = neuron_costs(net, 1)[j]
    token_share = sum(t.channel_macs for t in net.token_mixing if bool((t.positions == j).any()))
    assert token_share > 0 and float(cost) > token_share
    flat = net.flat_assignment().clone()
    flat[j] = 2
    net.set_flat_assignment(flat)
    assert before - net.macs(1) == int(cost)


@pytest.mark.parametrize("name", ["convnext_atto", "convnextv2_atto"])
def test_randomize_parameters_leaves_no_parameter_at_timms_zero_init(name: str) -> None:
    """timm starts biases, layer scales (1e-6) and GRN at zero; a checker on such weights cannot
    see a leak through them (the GRN bug passed one). Every parameter must move off them."""
    model = timm.create_model(name, num_classes=10)
    tiny = [k for k, p in model.named_parameters() if float(p.detach().abs().max()) < 1e-5]
    assert tiny, "timm's init no longer zeroes anything: this test checks nothing"
    randomize_parameters(model, seed=0)
    for k, p in model.named_parameters():
        assert float(p.detach().std()) > 0.01, k
    scales = [p for k, p in model.named_parameters() if k.endswith("gamma") or k.endswith("grn.weight")]
    assert scales and all(abs(float(p.detach().mean()) - 1.0) < 0.3 for p in scales)
    again = randomize_parameters(timm.create_model(name, num_classes=10), seed=0)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters()))
