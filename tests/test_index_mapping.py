"""Channel maps through split, chunk, concat, slices and view: read from autograd (._index_mapping).

The neuron positions of every layer reading a chunk must be exactly the producer's positions of
that chunk, the masked subnets isolated, and the exported subnet equal to the masked one.
torch-pruning 1.6 on its own mis-maps ``Bands``, ``Scales`` and ``DualPath`` (checked by turning
the correction off); ``Chunks`` and ``LayerScale`` it maps right in isolation, and they guard the
correction's own handling of ``chunk`` and size-1 views. The timm models at the end are the
families the correction made wrap (InceptionNeXt's layer-scale view was mis-mapped there).
"""

from __future__ import annotations

from typing import Any, Callable

import pytest
import timm
import torch
import torch.nn as nn

from nni_steppingnet import SteppingNet
from nni_steppingnet.export import export_subnet
from nni_steppingnet.macs import macs
from nni_steppingnet.sliced import compare_executions
from nni_steppingnet.testing import (
    FIXED_SPLIT_MODELS,
    isolation_report,
    randomize_bn,
    randomize_parameters,
    runner_report,
)

N = 3


class Bands(nn.Module):
    """InceptionNeXt's token mixer: split into bands, convolve all but the first, concatenate in
    the same order (torch-pruning reaches the later bands first). The widths come from the band
    convs at forward, so that an exported copy splits its pruned width (``fixed_widths`` keeps
    them as built, as timm's ``split_indexes`` does)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 12, 3, padding=1)
        self.band_hw = nn.Conv2d(3, 3, 3, padding=1, groups=3)
        self.band_w = nn.Conv2d(2, 2, (1, 3), padding=(0, 1), groups=2)
        self.head_conv = nn.Conv2d(12, 8, 1)
        self.fc = nn.Linear(8, 5)
        self.fixed_widths: tuple[int, int, int] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        bands = (self.band_hw.in_channels, self.band_w.in_channels)
        widths = self.fixed_widths or (x.shape[1] - sum(bands), *bands)
        x_id, x_hw, x_w = torch.split(x, widths, dim=1)
        x = torch.cat((x_id, self.band_hw(x_hw), self.band_w(x_w)), dim=1)
        return self.fc(self.head_conv(x).mean((2, 3)))


class Chunks(nn.Module):
    """``chunk`` (autograd's ``SplitBackward0``, which saves no sizes) into unequal chunks, used
    in reverse order."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 10, 3, padding=1)
        self.convs = nn.ModuleList([nn.Conv2d(w, 4, 1) for w in (4, 4, 2)])
        self.fc = nn.Linear(12, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = torch.relu(self.stem(x)).chunk(3, dim=1)
        outs = [conv(part) for conv, part in zip(self.convs, parts)]
        return self.fc(torch.cat(outs[::-1], dim=1).mean((2, 3)))


class Scales(nn.Module):
    """Res2Net's hierarchy: chunk i is added to the output of the conv before it, and the last
    chunk goes to the concat as it is (a split feeding a concat directly)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 12, 1)
        self.bn1 = nn.BatchNorm2d(12)
        self.convs = nn.ModuleList([nn.Conv2d(4, 4, 3, padding=1) for _ in range(2)])
        self.conv3 = nn.Conv2d(12, 6, 1)
        self.fc = nn.Linear(6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        widths = [conv.in_channels for conv in self.convs]
        chunks = torch.split(x, [*widths, x.shape[1] - sum(widths)], dim=1)
        outs, sp = [], chunks[0]
        for i, conv in enumerate(self.convs):
            sp = torch.relu(conv(sp if i == 0 else sp + chunks[i]))
            outs.append(sp)
        x = torch.cat([*outs, chunks[-1]], dim=1)
        return self.fc(self.conv3(x).mean((2, 3)))


class LayerScale(nn.Module):
    """A MetaNeXt block's layer scale, ``gamma.reshape(1, -1, 1, 1)``: a view that only adds
    size-1 dimensions, which torch-pruning mapped as a flatten of the MLP's ratio."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.fc1 = nn.Conv2d(6, 24, 1)
        self.fc2 = nn.Conv2d(24, 6, 1)
        self.gamma = nn.Parameter(torch.rand(6) + 0.5)
        self.fc = nn.Linear(6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = x + self.fc2(torch.relu(self.fc1(x))).mul(self.gamma.reshape(1, -1, 1, 1))
        return self.fc(x.mean((2, 3)))


class DualPath(nn.Module):
    """DPN's dual path block: the first ``residual`` channels of the input are a residual path
    (``x[:, :n]``, added to the first outputs of a conv), the rest a dense path concatenated with
    the conv's other outputs. The split point comes from the conv at forward, as in a
    prune-friendly model (DPN's ``num_1x1_c`` is fitted by export)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 10, 3, padding=1)
        self.residual = nn.Conv2d(10, 6, 1)
        self.dense = nn.Conv2d(10, 3, 1)
        self.fc = nn.Linear(13, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        n = self.residual.out_channels
        x = torch.cat([x[:, :n] + self.residual(x), x[:, n:], self.dense(x)], dim=1)
        return self.fc(x.mean((2, 3)))


def _positions(net: SteppingNet) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    outs = {layer.name: pos for layer, pos in zip(net.layers, net.index.out_positions)}
    ins = {layer.name: layer.in_pos for layer in net.layers}
    return outs, ins


def _wrap(model: nn.Module, seed: int, random_assignment: Callable[..., torch.Tensor]) -> SteppingNet:
    torch.manual_seed(seed)
    randomize_bn(model, seed=seed)
    net = SteppingNet(model.eval(), torch.randn(1, 3, 8, 8), N)
    random_assignment(net, seed)
    return net


def test_split_bands_map_to_their_own_channels(random_assignment: Callable[..., torch.Tensor]) -> None:
    net = _wrap(Bands(), 0, random_assignment)
    outs, ins = _positions(net)
    stem = outs["stem"]
    # a depthwise band's inputs are its outputs' neurons, which are the stem's channels 7..9, 10..11
    assert torch.equal(outs["band_hw"], stem[7:10])
    assert torch.equal(outs["band_w"], stem[10:12])
    assert torch.equal(ins["head_conv"], torch.cat([stem[:7], outs["band_hw"], outs["band_w"]]))


def test_unequal_chunks_used_in_reverse_order(random_assignment: Callable[..., torch.Tensor]) -> None:
    net = _wrap(Chunks(), 0, random_assignment)
    outs, ins = _positions(net)
    stem = outs["stem"]
    for k, (start, stop) in enumerate([(0, 4), (4, 8), (8, 10)]):
        assert torch.equal(ins[f"convs.{k}"], stem[start:stop])
    assert torch.equal(ins["fc"], torch.cat([outs["convs.2"], outs["convs.1"], outs["convs.0"]]))


def test_split_feeding_a_concat_and_residual_scales(random_assignment: Callable[..., torch.Tensor]) -> None:
    net = _wrap(Scales(), 0, random_assignment)
    outs, ins = _positions(net)
    conv1 = outs["conv1"]
    assert torch.equal(ins["convs.0"], conv1[0:4])
    # chunk 1 is added to convs.0's output: one neuron per channel pair
    assert torch.equal(outs["convs.0"], conv1[4:8])
    assert torch.equal(ins["convs.1"], conv1[4:8])
    assert torch.equal(ins["conv3"], torch.cat([outs["convs.0"], outs["convs.1"], conv1[8:12]]))


def test_layer_scale_view_is_the_identity(random_assignment: Callable[..., torch.Tensor]) -> None:
    net = _wrap(LayerScale(), 0, random_assignment)
    outs, ins = _positions(net)
    assert torch.equal(outs["fc2"], outs["stem"])
    assert torch.equal(net.channel_parameters["gamma"], outs["stem"])
    assert torch.equal(ins["fc2"], outs["fc1"])


def test_channel_slices_keep_their_offsets(random_assignment: Callable[..., torch.Tensor]) -> None:
    net = _wrap(DualPath(), 0, random_assignment)
    outs, ins = _positions(net)
    stem = outs["stem"]
    assert torch.equal(outs["residual"], stem[:6])
    assert torch.equal(ins["fc"], torch.cat([stem, outs["dense"]]))


@pytest.mark.parametrize("model_cls", [Bands, Chunks, Scales, LayerScale, DualPath])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_subnets_are_isolated(
    model_cls: type[nn.Module], seed: int, random_assignment: Callable[..., torch.Tensor]
) -> None:
    net = _wrap(model_cls(), seed, random_assignment)
    x = torch.randn(4, 3, 8, 8)
    for train in (False, True):
        report = isolation_report(net, x, train=train)
        assert report.isolated and sum(report.compared) > 0, report


# Chunks is left out: ``chunk(3)`` of a pruned width gives other chunks than the pruned layers
@pytest.mark.parametrize("model_cls", [Bands, Scales, LayerScale, DualPath])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_export_equals_masked(
    model_cls: type[nn.Module], seed: int, random_assignment: Callable[..., torch.Tensor]
) -> None:
    net = _wrap(model_cls(), seed, random_assignment)
    x = torch.randn(4, 3, 8, 8)
    for s in range(1, N + 1):
        exported = export_subnet(net, s).eval()
        with torch.no_grad(), net.subnet(s):
            expected = net.model(x)
        with torch.no_grad():
            got = exported(x)
        assert torch.allclose(got, expected, rtol=1e-5, atol=1e-6), (s, (got - expected).abs().max())


def test_export_names_a_block_whose_split_widths_are_fixed(random_assignment: Callable[..., torch.Tensor]) -> None:
    model = Bands()
    model.fixed_widths = (7, 3, 2)
    net = _wrap(model, 0, random_assignment)
    with pytest.raises(RuntimeError, match=r"export_subnet\(1\): .*still expects the original channel count"):
        export_subnet(net, 1)


@pytest.mark.parametrize(("name", "kwargs"), FIXED_SPLIT_MODELS, ids=[name for name, _ in FIXED_SPLIT_MODELS])
def test_timm_split_families_isolated_and_exported(
    name: str, kwargs: dict[str, Any], random_assignment: Callable[..., torch.Tensor]
) -> None:
    model = randomize_parameters(timm.create_model(name, pretrained=False, num_classes=10, **kwargs), seed=0)
    torch.manual_seed(0)
    randomize_bn(model, seed=0)
    x = torch.randn(2, 3, 32, 32)
    net = SteppingNet(model.eval(), x[:1], N)
    random_assignment(net, 0)
    assert isolation_report(net, x).isolated
    exported = export_subnet(net, 2).eval()
    with torch.no_grad(), net.subnet(2):
        expected = net.model(x)
    with torch.no_grad():
        got = exported(x)
    assert float((got - expected).abs().max() / expected.abs().max()) < 1e-5


def test_cspnet_wraps_though_torch_pruning_cannot_infer_a_concat(
    random_assignment: Callable[..., torch.Tensor],
) -> None:
    """CSPNet concatenates a split chunk with the output of a residual stack; torch-pruning 1.6
    infers ``None`` for the stack's width and raises ``TypeError`` summing the widths. The graph
    is finished from autograd's widths: the model wraps and is isolated, and export (which keeps
    CSPNet's two halves of ``x.split(expand_chs // 2)`` equal) computes the masked subnet."""
    model = randomize_parameters(timm.create_model("cs3darknet_s", pretrained=False, num_classes=10), seed=0)
    randomize_bn(model, seed=0)
    x = torch.randn(2, 3, 32, 32)
    net = SteppingNet(model.eval(), x[:1], N, execution="masked")
    random_assignment(net, 0)
    assert isolation_report(net, x).isolated
    exported = export_subnet(net, 2).eval()
    with torch.no_grad(), net.subnet(2):
        expected = net.model(x)
    with torch.no_grad():
        torch.testing.assert_close(exported(x), expected, rtol=1e-5, atol=1e-6)


class GatedChunks(nn.Module):
    """A gated linear unit over two chunks of one layer, ``fc2(relu(g) * i)``: channel ``j`` of
    ``g`` and of ``i`` meet in the product, a coupling torch-pruning 1.6 loses (its group keeps
    one root per channel of ``fc1`` and drops the second path into the product)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.fc1 = nn.Conv2d(6, 10, 1)
        self.fc2 = nn.Conv2d(5, 6, 1)
        self.fc = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        g, i = self.fc1(x).chunk(2, dim=1)
        return self.fc((x + self.fc2(torch.relu(g) * i)).mean((2, 3)))


class _TokenMlp(nn.Module):
    """Tokens through one timm gated MLP with a residual: ``x + mlp(x)``."""

    def __init__(self, mlp: nn.Module, dim: int) -> None:
        super().__init__()
        self.embed = nn.Linear(12, dim)
        self.mlp = mlp
        self.head = nn.Linear(dim, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        return self.head((h + self.mlp(h)).mean(1))


GATED = {
    "chunks_conv": (lambda: GatedChunks(), (3, 8, 8), "fc1", 10),
    "glu_mlp": (lambda: _TokenMlp(timm.layers.GluMlp(8, 16, act_layer=nn.SiLU), 8), (7, 12), "mlp.fc1", 16),
    "glu_mlp_gate_last": (
        lambda: _TokenMlp(timm.layers.GluMlp(8, 16, act_layer=nn.GELU, gate_last=True), 8),
        (7, 12),
        "mlp.fc1",
        16,
    ),
    "swiglu_packed": (lambda: _TokenMlp(timm.layers.SwiGLUPacked(8, 16), 8), (7, 12), "mlp.fc1", 16),
}


@pytest.mark.parametrize("name", sorted(GATED))
def test_chunks_that_meet_in_a_product_are_one_neuron(
    name: str, random_assignment: Callable[..., torch.Tensor]
) -> None:
    """``act(x1) * x2`` after ``fc1(x).chunk(2)`` (timm's GluMlp, SwiGLUPacked): channel ``j`` of
    each chunk is one neuron, so the two halves of ``fc1`` always share their indices; then
    isolation holds on random assignments, export (whose ``chunk(2)`` needs equal halves)
    equals the masked subnet with exact MACs, the runner equals it at every stage, and sliced
    execution equals masks. Before, the probe caught the leak through the product and refused."""
    build, shape, fc1, width = GATED[name]
    torch.manual_seed(0)
    model = randomize_parameters(build().eval(), seed=1)
    x = torch.randn(4, *shape)
    net = SteppingNet(model, x[:1], N)
    assert net.execution == "sliced"
    for seed in range(4):
        random_assignment(net, seed)
        out, _ = net.layer_assignment(fc1)
        half = width // 2
        assert torch.equal(out[:half], out[half:])  # one index per pair of channels
        for train in (False, True):
            report = isolation_report(net, x, train=train)
            assert report.isolated and sum(report.compared) > 0, report
    for s in range(1, N + 1):
        exported = export_subnet(net, s).eval()
        with torch.no_grad(), net.subnet(s):
            torch.testing.assert_close(exported(x), net.model(x), rtol=1e-5, atol=1e-6)
        assert macs(exported, x[:1], nonzero=True) == net.macs(s)
    for layout in ("delta", "full"):
        report = runner_report(net, x, layout=layout)
        assert max(report.errors) < 1e-5 and all(report.macs_exact), report
    assert compare_executions(net, x) == ""
