"""export_subnet: a standalone, physically smaller model computing exactly subnet s."""

from __future__ import annotations

from typing import Any, Callable, Iterator

import pytest
import torch
import torch.nn as nn

from nni_steppingnet import SteppingNet, macs
from nni_steppingnet.export import export_with_report
from nni_steppingnet.testing import FOUNDATION_MODELS, small_caformer

N = 4
IMG = 32

#: The same models as tests/test_stepping.py, with the subnets to export. densenet121 exports
#: only subnets 1 and N: each of its exports rebuilds a torch-pruning graph of 120 concat groups
#: (~3 s each on the shared 2-core machine, ~25 s for all four with the float64 checks); 1 and N
#: cover both the smallest subnet and the one with only unused neurons removed.
MODELS: list[tuple[str, dict[str, Any], tuple[int, ...]]] = [
    (name, kwargs, (1, 4) if name == "densenet121" else (1, 2, 3, 4)) for name, kwargs in FOUNDATION_MODELS
]


def _inputs(batch: int, seed: int, size: int = IMG) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _run(model: nn.Module, x: torch.Tensor, train: bool = False) -> torch.Tensor:
    """Forward in eval or train mode; BN buffers are restored after a train-mode forward."""
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    was_training = model.training
    model.train(train)
    try:
        with torch.no_grad():
            return model(x)
    finally:
        model.train(was_training)
        with torch.no_grad():
            for k, v in model.named_buffers():
                v.copy_(buffers[k])


def _masked(net: SteppingNet, s: int, x: torch.Tensor, train: bool = False) -> torch.Tensor:
    with net.subnet(s):
        return _run(net.model, x, train)


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


@pytest.fixture(scope="module", params=MODELS, ids=[name for name, _, _ in MODELS])
def wrapped(
    request: pytest.FixtureRequest,
    tiny_model: Callable[..., nn.Module],
    random_assignment: Callable[..., torch.Tensor],
    randomize_bn: Callable[..., nn.Module],
) -> Iterator[tuple[SteppingNet, tuple[int, ...]]]:
    name, kwargs, subnets = request.param
    model = randomize_bn(tiny_model(name, seed=0, **kwargs), seed=1)
    net = SteppingNet(model, _inputs(2, seed=2), N)
    random_assignment(net, seed=3)
    yield net, subnets


def test_export_matches_masked_forward_and_macs(wrapped: tuple[SteppingNet, tuple[int, ...]]) -> None:
    net, subnets = wrapped
    x = _inputs(4, seed=4)
    flat = net.flat_assignment()
    dense_sizes = []
    for s in subnets:
        exported, report = export_with_report(net, s)
        assert not any(hasattr(m, "parametrizations") for m in exported.modules())
        assert exported is not net.model
        # Masked synapses are stored as zeros, so the nonzero count is exactly the subnet's MACs
        # (random weights are never exactly zero).
        assert macs(exported, x, nonzero=True) == net.macs(s) == report.nonzero_macs
        assert report.subnet == s and report.nonzero_macs <= report.dense_macs == macs(exported, x)
        assert report.torch_pruning_macs >= report.dense_macs  # it also counts BN/pool ops
        assert report.params == sum(p.numel() for p in exported.parameters())
        dense_sizes.append(report.dense_macs)
        # Physically smaller: every layer keeps exactly its channels of subnet <= s, or one
        # zeroed channel when none is left (a layer cannot have zero channels).
        for k, layer in enumerate(net.layers):
            module = exported.get_submodule(layer.name)
            width = module.out_channels if isinstance(module, nn.Conv2d) else module.out_features
            if layer.is_logits:
                assert width == layer.out_channels
                continue
            active = int((flat[net.index.out_positions[k]] <= s).sum())
            assert width == max(active, 1), f"{layer.name}: {width} channels, {active} active in subnet {s}"
            if active == 0:
                assert int(torch.count_nonzero(module.weight)) == 0
        err = _relative_error(_run(exported, x), _masked(net, s, x))
        assert err <= 1e-5, f"subnet {s}: export differs by {err:.2e} relative"
        # Train mode (batch-statistics BN) in float64: in float32 the smaller kernels' different
        # summation order, divided by the std of a batch of 4, reaches 7e-5 relative (measured),
        # which is rounding, not a wrong channel; float64 shows agreement to ~1e-12.
        try:
            net.model.double()
            err = _relative_error(
                _run(exported.double(), x.double(), train=True), _masked(net, s, x.double(), train=True)
            )
        finally:
            net.model.float()
            exported.float()
        assert err <= 1e-10, f"subnet {s} (train mode, float64): export differs by {err:.2e} relative"
    # The dense cost grows with s (grouped convs are exported densified, so it may exceed
    # full_macs; the nonzero count is the subnet's real cost).
    assert all(a < b for a, b in zip(dense_sizes, dense_sizes[1:])), dense_sizes


def test_export_is_a_copy(tiny_model: Callable[..., nn.Module], random_assignment: Callable[..., torch.Tensor]) -> None:
    net = SteppingNet(tiny_model("lenet5"), _inputs(2, seed=0), N)
    random_assignment(net, seed=5)
    x = _inputs(2, seed=6)
    net.model.eval()
    exported = net.export_subnet(2)
    assert not exported.training
    before = _run(exported, x)
    with torch.no_grad():
        for k in range(len(net.layers)):
            net.original_weight(k).mul_(2.0)
    assert torch.equal(_run(exported, x), before)
    assert not torch.equal(_masked(net, 2, x), before)
    net.model.train()
    assert net.export_subnet(2).training, "export keeps the model's mode"


def test_export_of_groups_entirely_above_s_keeps_one_zeroed_channel(
    tiny_model: Callable[..., nn.Module],
    random_assignment: Callable[..., torch.Tensor],
    randomize_bn: Callable[..., nn.Module],
) -> None:
    net = SteppingNet(randomize_bn(tiny_model("lenet5"), seed=1), _inputs(2, seed=0), N)
    random_assignment(net, seed=7)
    names = [g.name for g in net.groups]
    assert names[:3] == ["features.0", "features.4", "hidden.0"]
    # conv2 (features.4) entirely in subnet 3, hidden.0 entirely unused.
    net.groups[1].assignment = torch.full((net.groups[1].size,), 3, dtype=torch.long)
    net.groups[2].assignment = torch.full((net.groups[2].size,), N + 1, dtype=torch.long)
    x = _inputs(4, seed=8)
    for s in (1, 2, N):
        exported = net.export_subnet(s)
        conv2, hidden0 = exported.get_submodule("features.4"), exported.get_submodule("hidden.0")
        assert hidden0.out_features == 1 and int(torch.count_nonzero(hidden0.weight)) == 0
        expected_conv2 = 1 if s < 3 else net.groups[1].size
        assert conv2.out_channels == expected_conv2
        if s < 3:
            assert int(torch.count_nonzero(conv2.weight)) == 0
        err = _relative_error(_run(exported, x), _masked(net, s, x))
        assert err <= 1e-5, f"subnet {s}: {err:.2e}"
        assert macs(exported, x, nonzero=True) == net.macs(s)


class _ChannelStateNet(nn.Module):
    """timm modules with per-channel state torch-pruning does not shrink: BlurPool2d's filter
    repeated per channel and metaformer's Scale (its ``shape`` holds the width)."""

    def __init__(self) -> None:
        super().__init__()
        from timm.layers.blur_pool import BlurPool2d
        from timm.models.metaformer import Scale

        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.blur = BlurPool2d(channels=8, stride=2)
        self.scale = Scale(8, init_value=1.5)
        self.c2 = nn.Conv2d(8, 6, 3, padding=1)
        self.fc = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.c1(x))
        x = self.scale(self.blur(x))
        return self.fc(self.c2(x).mean((2, 3)))


@pytest.mark.parametrize("seed", [0, 1])
def test_export_shrinks_blurpool_and_metaformer_scale(
    seed: int, random_assignment: Callable[..., torch.Tensor]
) -> None:
    pytest.importorskip("timm")
    torch.manual_seed(seed)
    net = SteppingNet(_ChannelStateNet(), torch.randn(2, 3, 16, 16), 3)
    random_assignment(net, seed=seed)
    x = torch.randn(3, 3, 16, 16)
    flat = net.flat_assignment()
    for s in range(1, 4):
        exported = net.export_subnet(s).eval()
        kept = int((flat[net.index.out_positions[0]] <= s).sum())
        assert exported.scale.shape[0] == exported.scale.scale.numel() == kept
        with torch.no_grad(), net.subnet(s):
            expected = net.model(x)
        torch.testing.assert_close(exported(x), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_export_keeps_layer_norm_channels_in_order(seed: int, random_assignment: Callable[..., torch.Tensor]) -> None:
    """torch-pruning 1.6's LayerNorm pruner keeps channels in set order: with 64 channels the
    kept weight and bias came out permuted against the conv before them (hidden when the norm's
    weight is 1 and its bias 0, timm's init)."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 64, 3, padding=1),
        timm.layers.LayerNorm2d(64),
        nn.Conv2d(64, 16, 3, padding=1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 4),
    )
    with torch.no_grad():
        model[1].weight.copy_(torch.rand(64) + 0.5)
        model[1].bias.copy_(torch.randn(64))
    net = SteppingNet(model, torch.randn(2, 3, 8, 8), 4)
    random_assignment(net, seed=seed)
    x = torch.randn(3, 3, 8, 8)
    for s in range(1, 5):
        exported = net.export_subnet(s).eval()
        with torch.no_grad(), net.subnet(s):
            expected = net.model(x)
        torch.testing.assert_close(exported(x), expected, rtol=1e-5, atol=1e-6)


def _fixed_width_models() -> dict[str, Callable[[], nn.Module]]:
    """Small timm models whose forward fixes one width by another: DaViT's attention takes its
    head width from the input (``C // num_heads``), MetaFormer's ``reshape(B, N, C)``s its heads'
    output with the input's ``C``, and CSPNet's cross stage splits ``conv_exp`` into two halves
    of ``expand_chs // 2``."""
    timm = pytest.importorskip("timm")
    return {
        "davit": lambda: timm.create_model(
            "davit_tiny", pretrained=False, num_classes=4, depths=(1, 1), embed_dims=(32, 64), num_heads=(2, 4)
        ),
        "caformer": small_caformer,
        "cs3darknet_s": lambda: timm.create_model("cs3darknet_s", pretrained=False, num_classes=4),
    }


def _nonzero_subnet_macs(net: SteppingNet, s: int) -> int:
    """``net.macs(s)`` less the active weight entries that are exactly zero at random init."""
    total = net.macs(s)
    for k, layer in enumerate(net.layers):
        zeros = net.weight_mask(k, s).bool() & (net.original_weight(k).detach() == 0)
        total -= int(zeros.sum()) * layer.positions
    return total


@pytest.mark.parametrize("name", ["davit", "caformer", "cs3darknet_s"])
def test_export_keeps_inactive_neurons_where_a_forward_fixes_one_width_by_another(
    name: str, random_assignment: Callable[..., torch.Tensor]
) -> None:
    from nni_steppingnet.attention import head_layout, reads_input_width
    from nni_steppingnet.fixed_splits import halved_output
    from nni_steppingnet.testing import randomize_parameters

    torch.manual_seed(0)
    model = randomize_parameters(_fixed_width_models()[name]().eval(), seed=1)
    x = _inputs(2, seed=2)
    net = SteppingNet(model, x[:1], N)
    padded = 0
    for seed in (0, 1):
        flat = random_assignment(net, seed=seed)
        for s in range(1, N + 1):
            exported = net.export_subnet(s).eval()
            torch.testing.assert_close(exported(x), _masked(net, s, x), rtol=1e-5, atol=1e-6)
            assert macs(exported, x, nonzero=True) == _nonzero_subnet_macs(net, s)
            for block, heads in net.attention:
                module = exported.get_submodule(block.name)
                assert reads_input_width(module)
                kept_heads = module.qkv.out_features // head_layout(module).qkv_width
                assert module.qkv.in_features == kept_heads * block.head_dim
                padded += kept_heads - int((flat[heads] <= s).sum())
            for block_name, block in exported.named_modules():
                conv = halved_output(block)
                if conv is None:
                    continue
                assert conv.out_channels == block.expand_chs
                positions = net.index.out_positions[net.index.layer(f"{block_name}.conv_exp.conv")]
                padded += conv.out_channels - int((flat[positions] <= s).sum())
    assert padded > 0, "no assignment needed extra neurons: the test exercised nothing"
