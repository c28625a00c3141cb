"""Swin's patch merging (nni_steppingnet.patch_merging): the merged channels' neurons, its
torch-pruning pruner, and a square relative position bias table after export."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn as nn
from timm.models import swin_transformer, swin_transformer_v2

from nni_steppingnet import SteppingNet, macs
from nni_steppingnet.patch_merging import (
    MERGED_TOKENS,
    PatchMergingPruner,
    child_channels,
    is_patch_merging,
    merged_indices,
    patch_merging_pruners,
)
from nni_steppingnet.testing import isolation_report, random_assignment, randomize_parameters

C = 6


def _merged_input(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What the block hands its first child (the ``4C`` merged channels)."""
    first = block.norm if isinstance(block, swin_transformer.PatchMerging) else block.reduction
    seen: list[torch.Tensor] = []
    handle = first.register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    try:
        block(x)
    finally:
        handle.remove()
    return seen[0]


@pytest.mark.parametrize("cls", [swin_transformer.PatchMerging, swin_transformer_v2.PatchMerging])
@pytest.mark.parametrize("channel", [0, 4])
def test_merged_indices_are_the_channels_the_forward_fills(cls: type[nn.Module], channel: int) -> None:
    block = cls(C).eval()
    x = torch.zeros(1, 4, 4, C)
    x[..., channel] = torch.randn(1, 4, 4)
    filled = _merged_input(block, x).ne(0).flatten(0, 2).any(0).nonzero().flatten()
    assert torch.equal(filled, merged_indices(torch.tensor([channel]), C).sort().values)
    assert filled.numel() == MERGED_TOKENS


def test_child_channels_place_the_norm_by_class() -> None:
    idxs = torch.tensor([1, 3])
    v1 = child_channels(swin_transformer.PatchMerging(C), "in", idxs)
    assert [(child, side) for child, side, _ in v1] == [("norm", "out"), ("reduction", "in")]
    assert v1[0][2].tolist() == [1, 3, 7, 9, 13, 15, 19, 21]
    v2 = child_channels(swin_transformer_v2.PatchMerging(C), "out", idxs)
    assert [(child, side) for child, side, _ in v2] == [("reduction", "out"), ("norm", "out")]
    with pytest.raises(ValueError, match="side must be"):
        child_channels(swin_transformer.PatchMerging(C), "sideways", idxs)


def test_other_merging_blocks_stay_with_torch_pruning() -> None:
    class PatchMerging(nn.Module):  # same names, its own forward
        def __init__(self) -> None:
            super().__init__()
            self.norm = nn.LayerNorm(4 * C)
            self.reduction = nn.Linear(4 * C, 2 * C)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.reduction(self.norm(x))

    assert not is_patch_merging(PatchMerging())
    assert patch_merging_pruners(nn.Sequential(PatchMerging())) == {}
    with pytest.raises(ValueError, match="not a patch merging block"):
        child_channels(PatchMerging(), "in", torch.tensor([0]))


def test_pruner_removes_every_copy_of_an_input_channel() -> None:
    """SwinV2 order (reduction, then its norm): dropping input channels equals zeroing them."""
    torch.manual_seed(0)
    block = swin_transformer_v2.PatchMerging(C).eval()
    randomize_parameters(block, seed=1)
    x = torch.randn(2, 4, 4, C)
    drop = [1, 4]
    kept = [c for c in range(C) if c not in drop]
    zeroed = x.clone()
    zeroed[..., drop] = 0
    with torch.no_grad():
        expected = block(zeroed)
        PatchMergingPruner().prune_in_channels(block, drop)
        got = block(x[..., kept])
    assert block.reduction.in_features == MERGED_TOKENS * len(kept)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


def test_pruner_keeps_the_norm_parameters_of_the_kept_copies() -> None:
    torch.manual_seed(0)
    block = swin_transformer.PatchMerging(C)
    randomize_parameters(block, seed=2)
    weight, bias = block.norm.weight.detach().clone(), block.norm.bias.detach().clone()
    reduction = block.reduction.weight.detach().clone()
    PatchMergingPruner().prune_in_channels(block, [0, 5])
    keep = merged_indices(torch.tensor([1, 2, 3, 4]), C).sort().values
    assert block.norm.normalized_shape == (keep.numel(),)
    assert torch.equal(block.reduction.weight, reduction[:, keep])
    # torch-pruning's LayerNorm pruner may leave the kept channels in set order (export restores
    # the order); the values kept are those of the kept copies either way
    assert sorted(block.norm.weight.tolist()) == sorted(weight[keep].tolist())
    assert sorted(block.norm.bias.tolist()) == sorted(bias[keep].tolist())


def _swin(num_heads: tuple[int, ...], depths: tuple[int, ...], window: int, embed_dim: int) -> nn.Module:
    torch.manual_seed(0)
    model = timm.create_model(
        "swin_tiny_patch4_window7_224",
        pretrained=False,
        img_size=32,
        embed_dim=embed_dim,
        depths=depths,
        num_heads=num_heads,
        window_size=window,
        num_classes=10,
    ).eval()
    randomize_parameters(model, seed=3)
    return model


def test_merged_channels_belong_to_the_neurons_of_their_input_channels() -> None:
    x = torch.randn(2, 3, 32, 32)
    net = SteppingNet(_swin((2, 4), (1, 1), 4, embed_dim=12), x, 3)
    merged = net.channel_modules["layers.1.downsample.norm"]
    # the stage-0 residual stream, as its last block's norm reads it
    residual = net.channel_modules["layers.0.blocks.0.norm2"]
    assert residual.numel() == 12 and torch.equal(merged, residual.repeat(MERGED_TOKENS))
    names = [layer.name for layer in net.layers]
    columns = net.index.in_positions[names.index("layers.1.downsample.reduction")]
    assert torch.equal(columns, merged.expand_as(columns))
    random_assignment(net, seed=4)
    report = isolation_report(net, torch.randn(3, 3, 32, 32), train=True)
    assert report.isolated and sum(report.compared) > 0, report


def test_square_position_bias_table_after_export_still_counts_its_heads() -> None:
    """9 heads over 2x2 windows give a 9 x 9 table: its head dimension is known by the forward."""
    x = torch.randn(1, 3, 32, 32)
    net = SteppingNet(_swin((1, 9), (1, 1), 2, embed_dim=18), x, 3)
    for block, _ in net.attention:
        assert block.head_params == {"relative_position_bias_table": 1}
    random_assignment(net, seed=2)
    report = isolation_report(net, torch.randn(3, 3, 32, 32), train=True)
    assert report.isolated and sum(report.compared) > 0, report
    flat = net.flat_assignment()
    for s in range(1, 4):
        exported = net.export_subnet(s).eval()
        with torch.no_grad(), net.subnet(s):
            torch.testing.assert_close(exported(x), net.model(x), rtol=1e-5, atol=1e-6)
        kept = {block.name: int((flat[heads] <= s).sum()) for block, heads in net.attention}
        if all(count > 0 for count in kept.values()):
            assert macs(exported, x, nonzero=True) == net.macs(s)
