"""Multi-head attention with head neurons (ViT, DeiT): heads share one index over q, k and v,
q.k and attn.v MACs follow the documented rule, construction moves whole heads at their exact
cost, export removes whole heads, and the runner computes only each stage's new heads."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from nni_steppingnet import SteppingNet
from nni_steppingnet.attention import (
    attention_macs,
    runs_sliced,
    runs_stage_by_stage,
    shared_head_parameters,
    stage_form,
)
from nni_steppingnet.construction import ConstructionConfig, Constructor
from nni_steppingnet.construction.select import neuron_costs
from nni_steppingnet.errors import UnsupportedModelError
from nni_steppingnet.macs import macs
from nni_steppingnet.runtime import IncrementalRunner
from nni_steppingnet.sliced import compare_executions
from nni_steppingnet.testing import (
    isolation_report,
    random_assignment,
    randomize_parameters,
    runner_report,
    small_caformer,
)

timm = pytest.importorskip("timm")

N = 3
DIM, HEADS, DEPTH = 48, 3, 2
TOKENS = 1 + (32 // 8) ** 2  # class token + 4x4 patches


def _vit(name: str = "vit_tiny_patch16_224") -> Any:
    torch.manual_seed(0)
    return timm.create_model(
        name, pretrained=False, img_size=32, patch_size=8, depth=DEPTH, embed_dim=DIM, num_heads=HEADS, num_classes=10
    ).eval()


def _x(batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


@pytest.fixture()
def net() -> SteppingNet:
    return SteppingNet(_vit(), _x(), N)


def test_heads_are_the_neurons_of_qkv_and_proj(net: SteppingNet) -> None:
    assert [block.name for block, _ in net.attention] == [f"blocks.{d}.attn" for d in range(DEPTH)]
    random_assignment(net, seed=2)
    head_dim = DIM // HEADS
    for block, heads in net.attention:
        assert heads.numel() == HEADS and block.head_macs == attention_macs(TOKENS, 1, head_dim)
        a_qkv, _ = net.layer_assignment(block.qkv)
        per_channel = a_qkv.reshape(3, HEADS, head_dim)
        # q, k and v channels of one head share one index; each head has its own
        flat = net.flat_assignment()
        for h in range(HEADS):
            assert bool((per_channel[:, h] == flat[heads[h]]).all())
        _, a_proj_in = net.layer_assignment(block.proj)
        assert torch.equal(a_proj_in[0], per_channel[2].flatten())


def test_attention_macs_follow_the_rule(net: SteppingNet) -> None:
    head_dim = DIM // HEADS
    attention = DEPTH * attention_macs(TOKENS, HEADS, head_dim)
    assert attention == DEPTH * 2 * TOKENS * TOKENS * DIM
    linear = sum(int(layer.module.weight.numel()) * layer.positions for layer in net.layers)
    assert net.full_macs == linear + attention
    plain = _vit()
    assert macs(plain, _x()) == net.full_macs
    # every neuron in subnet 1: subnet 1 is the whole network
    assert net.macs(1) == net.full_macs
    # one head of block 0 moved to subnet 2 leaves subnet 1 with one head's q.k and attn.v less
    block, heads = net.attention[0]
    flat = net.flat_assignment().clone()
    flat[heads[0]] = 2
    net.set_flat_assignment(flat)
    layer_macs = net.layer_macs(1)
    assert layer_macs[block.name] == attention_macs(TOKENS, HEADS - 1, head_dim)
    # proj's residual outputs stay in subnet 1 and may not read a head of subnet 2 (no backward
    # synapse): subnet 2 is the full network less those weights
    assert net.macs(2) == net.full_macs - DIM * head_dim * TOKENS


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_neurons_cost_is_exactly_what_its_move_removes(net: SteppingNet, seed: int) -> None:
    random_assignment(net, seed=seed)
    flat = net.flat_assignment()
    s = 2
    costs = neuron_costs(net, s)
    _, heads = net.attention[1]
    candidates = [int(h) for h in heads if int(flat[h]) <= s]
    assert candidates, "the seed left no head in subnet 2"
    before = net.macs(s)
    j = candidates[0]
    moved = flat.clone()
    moved[j] = s + 1
    net.set_flat_assignment(moved)
    assert before - net.macs(s) == int(costs[j])
    assert int(costs[j]) > net.attention[1][0].head_macs


@pytest.mark.parametrize("seed", [0, 3])
def test_heads_of_subnet_s_are_unchanged_in_larger_subnets(net: SteppingNet, seed: int) -> None:
    random_assignment(net, seed=seed)
    report = isolation_report(net, _x(4, seed=1), train=True)
    assert report.isolated and sum(report.compared) > 0, report


def test_export_removes_whole_heads_and_equals_the_masked_subnet(net: SteppingNet) -> None:
    random_assignment(net, seed=1)
    flat = net.flat_assignment()
    x = _x()
    for s in range(1, N + 1):
        exported = net.export_subnet(s).eval()
        for block, heads in net.attention:
            kept = int((flat[heads] <= s).sum())
            module = exported.get_submodule(block.name)
            assert module.num_heads == max(kept, 1)
            assert module.qkv.out_features == 3 * module.num_heads * block.head_dim
            assert module.proj.in_features == module.num_heads * block.head_dim
        with torch.no_grad(), net.subnet(s):
            torch.testing.assert_close(exported(x), net.model(x), rtol=1e-5, atol=1e-6)
        # a block without active heads keeps one all-zero head: dense kernels pay for it
        inactive_blocks = sum(block.head_macs for block, heads in net.attention if not bool((flat[heads] <= s).any()))
        assert macs(exported, x, nonzero=True) == net.macs(s)
        assert macs(exported, x) >= net.macs(s) + inactive_blocks


@pytest.mark.parametrize("layout", ["auto", "full"])
def test_runner_computes_only_the_new_heads_of_each_stage(net: SteppingNet, layout: str) -> None:
    """In the delta layout (what "auto" picks) qkv returns the new heads' q, k and v only and
    proj reads their outputs; in the full-width one the block keeps every head's output."""
    random_assignment(net, seed=2)
    runner = IncrementalRunner(net, layout=layout)
    assert runner.layout == ("delta" if layout == "auto" else "full")
    x = _x()
    flat = net.flat_assignment()
    with torch.no_grad():
        for s in range(1, N + 1):
            logits = runner.start(x) if s == 1 else runner.step()
            with net.subnet(s):
                torch.testing.assert_close(logits, net.model(x), rtol=1e-5, atol=1e-6)
            assert runner.macs_spent == net.macs(s)
            new_heads = sum(int((flat[heads] == s).sum()) for _, heads in net.attention)
            assert runner.step_macs(s) - _linear_step(runner, net, s) == new_heads * net.attention[0][0].head_macs


def _linear_step(runner: IncrementalRunner, net: SteppingNet, s: int) -> int:
    names = {block.name for block, _ in net.attention}
    previous = {} if s == 1 else net.layer_macs(s - 1)
    return sum(v - previous.get(k, 0) for k, v in net.layer_macs(s).items() if k not in names)


def test_runner_delta_layout_holds_only_the_new_heads(net: SteppingNet) -> None:
    """At stage s the block's input and output hold the residual channels of index s only, and
    its qkv Linear returns the q, k and v channels of the heads of index s."""
    random_assignment(net, seed=3)
    runner = IncrementalRunner(net, layout="delta")
    flat = net.flat_assignment()
    block, heads = net.attention[0]
    widths: list[tuple[int, int]] = []
    qkv = runner.model.get_submodule(block.qkv)
    handle = qkv.register_forward_hook(lambda mod, args, out: widths.append((args[0].shape[-1], out.shape[-1])))
    try:
        with torch.no_grad():
            for s in range(1, N + 1):
                runner.start(_x()) if s == 1 else runner.step()
    finally:
        handle.remove()
    names = [layer.name for layer in net.layers]
    residual = flat[net.index.in_positions[names.index(block.qkv)][0]]
    expected = [
        (int((residual == s).sum()), 3 * block.head_dim * int((flat[heads] == s).sum())) for s in range(1, N + 1)
    ]
    assert widths == expected


def test_saved_runner_keeps_its_heads(net: SteppingNet, tmp_path: Any) -> None:
    random_assignment(net, seed=5)
    runner = IncrementalRunner(net)
    x = _x()
    with torch.no_grad():
        outputs = [runner.start(x), runner.step(), runner.step()]
        path = tmp_path / "vit.runner"
        runner.save(path)
        loaded = IncrementalRunner.load(path, _vit())
        again = [loaded.start(x), loaded.step(), loaded.step()]
    for a, b in zip(outputs, again):
        torch.testing.assert_close(a, b)
    assert loaded.macs_spent == net.macs(N)


def test_construction_moves_heads_under_the_budgets(net: SteppingNet) -> None:
    data = [(torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))) for _ in range(2)]
    config = ConstructionConfig(
        budgets=[0.3, 0.6, 0.9], reference_macs=net.full_macs, iterations=2, batches_per_iteration=1, seed=0
    )
    Constructor(net, config, data).run()
    flat = net.flat_assignment()
    moved_heads = sum(int((flat[heads] > 1).sum()) for _, heads in net.attention)
    assert moved_heads > 0
    report = isolation_report(net, _x())
    assert report.isolated, report
    macs_now = [net.macs(s) for s in range(1, N + 1)]
    assert macs_now == sorted(macs_now) and macs_now[0] < net.full_macs


class _OwnAttention(torch.nn.Module):
    """timm's fused qkv layout with its own forward: manual products (``q @ k^T``, ``attn @ v``)
    with a fixed temperature; ``head_major=False`` reads the qkv channels as ``[H, 3, D]``, which mixes the q, k and v of
    different heads under the ``[3, H, D]`` map."""

    def __init__(self, dim: int, heads: int, head_major: bool = True) -> None:
        super().__init__()
        self.num_heads, self.head_dim = heads, dim // heads
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.proj = torch.nn.Linear(dim, dim)
        self.temperature = 0.7
        self.head_major = head_major

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        if self.head_major:
            qkv = self.qkv(x).reshape(b, t, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        else:
            qkv = self.qkv(x).reshape(b, t, self.num_heads, 3, self.head_dim).permute(3, 0, 2, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = ((q @ k.transpose(-2, -1)) * self.temperature).softmax(-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, t, -1))


class _TinyTransformer(torch.nn.Module):
    def __init__(self, head_major: bool = True) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Conv2d(3, 24, 8, stride=8)
        self.attn = _OwnAttention(24, 3, head_major)
        self.fc = torch.nn.Linear(24, 24)
        self.head = torch.nn.Linear(24, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(x).flatten(2).transpose(1, 2)
        tokens = tokens + self.attn(tokens)
        tokens = tokens + torch.relu(self.fc(tokens))
        return self.head(tokens.mean(1))


def test_an_attention_with_its_own_forward_has_head_neurons_and_counted_products(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level("WARNING", logger="nni_steppingnet.sliced"):
        net = SteppingNet(_TinyTransformer(), _x(), N)
    # sliced execution knows timm's attention forwards only; "auto" falls back, naming the block
    assert net.execution == "masked"
    assert "(attn)" in caplog.text and "vision_transformer.Attention" in caplog.text
    with pytest.raises(UnsupportedModelError) as refused:
        net.set_execution("sliced")
    assert "attn" in dict(refused.value.problems) and "execution='masked' or 'auto'" in str(refused.value)
    assert net.execution == "masked"
    ((block, heads),) = net.attention
    tokens = (32 // 8) ** 2
    assert block.head_macs == attention_macs(tokens, 1, 8)
    for seed in (0, 1):
        random_assignment(net, seed=seed)
        report = isolation_report(net, _x(4, seed=2), train=False)
        assert report.isolated and sum(report.compared) > 0, report
    for s in range(1, N + 1):
        exported = net.export_subnet(s).eval()
        with torch.no_grad(), net.subnet(s):
            torch.testing.assert_close(exported(_x()), net.model(_x()), rtol=1e-5, atol=1e-6)
        assert macs(exported, _x(), nonzero=True) == net.macs(s)
    with pytest.raises(UnsupportedModelError) as info:
        IncrementalRunner(net)
    assert "attn" in dict(info.value.problems) and "vision_transformer.Attention" in str(info.value)


def test_an_attention_that_mixes_heads_is_refused_by_the_probe() -> None:
    model = _TinyTransformer(head_major=False)
    with pytest.raises(UnsupportedModelError) as info:
        SteppingNet(model, _x(), N)
    assert any("change" in why for _, why in info.value.problems), info.value.problems


def test_parameters_that_are_not_per_head_are_refused_by_name() -> None:
    model = _TinyTransformer()
    # a separate q bias (one value per channel, as BEiT's q_bias): no dimension of num_heads
    model.attn.register_parameter("q_bias", torch.nn.Parameter(torch.zeros(24)))
    with pytest.raises(UnsupportedModelError) as info:
        SteppingNet(model, _x(), N)
    reasons = dict(info.value.problems)
    assert "attn" in reasons and "q_bias" in reasons["attn"] and "not one tensor per head" in reasons["attn"]


def _swin() -> Any:
    torch.manual_seed(0)
    # one stage of two blocks: window attention, then shifted windows; relative position bias
    return timm.create_model(
        "swin_tiny_patch4_window7_224",
        pretrained=False,
        img_size=32,
        embed_dim=24,
        depths=(2,),
        num_heads=(2,),
        window_size=4,
        num_classes=10,
    ).eval()


def test_swin_window_attention_has_head_neurons() -> None:
    x = _x()
    net = SteppingNet(_swin(), x, N)
    assert [block.name for block, _ in net.attention] == ["layers.0.blocks.0.attn", "layers.0.blocks.1.attn"]
    for block, _ in net.attention:
        assert block.head_params == {"relative_position_bias_table": 1}
        # 4 windows of 4x4 tokens at 32 px / patch 4: per head 4 * 16 * 16 * 2 * head_dim
        assert block.head_macs == 4 * attention_macs(16, 1, 12)
    assert macs(_swin(), x) == net.full_macs
    random_assignment(net, seed=1)
    report = isolation_report(net, _x(4, seed=3), train=True)
    assert report.isolated and sum(report.compared) > 0, report
    flat = net.flat_assignment()
    for s in range(1, N + 1):
        exported = net.export_subnet(s).eval()
        for block, heads in net.attention:
            module = exported.get_submodule(block.name)
            kept = max(int((flat[heads] <= s).sum()), 1)
            assert module.num_heads == kept
            assert module.relative_position_bias_table.shape[1] == kept
        with torch.no_grad(), net.subnet(s):
            torch.testing.assert_close(exported(x), net.model(x), rtol=1e-5, atol=1e-6)
        assert macs(exported, x, nonzero=True) == net.macs(s)
    # The runner adds the new heads' relative position bias (and the shifted windows' mask) to
    # their q.k, in timm's fused and unfused attention alike.
    for fused in (False, True):
        for block, _ in net.attention:
            net.model.get_submodule(block.name).fused_attn = fused  # type: ignore[assignment]
        report = runner_report(net, x)
        assert report.exact(), report
    # Sliced execution gives the table the active heads for each call, and a block without an
    # active head runs one masked phantom head (Swin's reshape infers the head width with -1).
    assert net.execution == "sliced"
    _, heads = net.attention[1]
    flat = net.flat_assignment()
    flat[heads] = N
    net.set_flat_assignment(flat)
    assert compare_executions(net, _x(3, seed=4)) == ""


# ----------------------------------------------- interleaved heads (EfficientFormer, TinyViT)
def _tiny_vit() -> Any:
    # four stages; stages 2-4 attend, with TinyViT's pre-norm inside the attention block
    return timm.create_model(
        "tiny_vit_5m_224",
        pretrained=False,
        num_classes=10,
        embed_dims=(16, 32, 48, 64),
        depths=(1, 1, 1, 1),
        num_heads=(1, 2, 3, 4),
    )


def _efficientformer() -> Any:
    # the last stage's 7x7 attention is fixed at 224 px input
    return timm.create_model(
        "efficientformer_l1",
        pretrained=False,
        num_classes=10,
        depths=(1, 1, 1, 2),
        embed_dims=(8, 16, 24, 32),
        num_vit=1,
    )


@pytest.mark.parametrize(
    ("build", "size"), [(_tiny_vit, 64), (_efficientformer, 224)], ids=["tiny_vit", "efficientformer"]
)
def test_interleaved_heads_are_neurons_downstream(build: Any, size: int) -> None:
    """qkv outputs one [q k v] block per head: the head layout groups those channels (not the
    stacked [q | k | v] order, which fits the same shapes), torch-pruning's identity map to proj
    is replaced by it, export removes whole heads (num_heads, the attention widths and the
    per-head biases follow) and the runner computes the new heads only, in both layouts."""
    from nni_steppingnet.attention import head_layout
    from nni_steppingnet.testing import randomize_parameters

    torch.manual_seed(0)
    model = randomize_parameters(build().eval(), seed=2)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    net = SteppingNet(model, x[:1], N)
    assert net.attention and all(block.layout is not None and block.layout.interleaved for block, _ in net.attention)
    assert all(block.head_params == {"attention_biases": 0} for block, _ in net.attention)
    assert macs(randomize_parameters(build().eval(), seed=2), x[:1]) == net.full_macs
    flat = random_assignment(net, seed=3)
    report = isolation_report(net, x, train=True)
    assert report.isolated and sum(report.compared) > 0, report
    for s in range(1, N + 1):
        exported = net.export_subnet(s).eval()
        with torch.no_grad(), net.subnet(s):
            expected = net.model(x)
        torch.testing.assert_close(exported(x), expected, rtol=1e-5, atol=1e-6)
        for block, heads in net.attention:
            module = exported.get_submodule(block.name)
            kept = max(int((flat[heads] <= s).sum()), 1)
            layout = head_layout(module)
            assert module.num_heads == kept and layout is not None and layout.num_heads == kept
            assert module.attention_biases.shape[0] == kept
    # sliced training == masked, also with a block whose heads are all in the largest subnet
    # (float64: a bias before a training-mode BatchNorm has an exact gradient of zero, and only
    # float32 rounding noise otherwise)
    assert net.execution == "sliced"
    _, heads = net.attention[-1]
    flat[heads] = N
    net.set_flat_assignment(flat)
    net.model.double()
    assert compare_executions(net, x.double()) == ""
    net.model.float()
    random_assignment(net, seed=3)
    for layout_name in ("auto", "full"):
        report = runner_report(net, x, layout=layout_name)
        assert report.layout == ("delta" if layout_name == "auto" else "full")
        assert report.exact(), report


def test_interleaved_layout_is_known_by_the_forward_not_the_shapes() -> None:
    """TinyViT's attention with attn_ratio=1 has qkv = 3 * heads * d outputs, the stacked
    layout's shapes; only its forward says the channels are interleaved."""
    from nni_steppingnet.attention import head_layout

    block = timm.models.tiny_vit.Attention(dim=16, key_dim=4, num_heads=4, attn_ratio=1, resolution=(4, 4))
    layout = head_layout(block)
    assert layout is not None and layout.interleaved and layout.qkv_width == 12
    channels = torch.arange(48)
    assert layout.qkv_head(channels).tolist() == [c // 12 for c in range(48)]
    stacked = head_layout(timm.models.vision_transformer.Attention(dim=16, num_heads=4))
    assert stacked is not None and not stacked.interleaved
    assert stacked.qkv_head(channels).tolist() == [(c % 16) // 4 for c in range(48)]


# ----------------------------------------------- shared position tables (SAM)
def _samvit() -> Any:
    # two blocks at 32 px, patch 8 (4x4 tokens): a windowed block (2x2 windows) and a global
    # one, both with SAM's decomposed relative position tables rel_pos_h / rel_pos_w; the neck's
    # convs and LayerNorm2d, then pooling and the head
    return timm.create_model(
        "samvit_base_patch16",
        pretrained=False,
        img_size=32,
        patch_size=8,
        embed_dim=24,
        depth=2,
        num_heads=3,
        window_size=2,
        global_attn_indexes=(1,),
        neck_chans=16,
        use_rel_pos=True,
        num_classes=10,
    ).eval()


def test_sam_position_tables_are_shared_by_the_heads_and_kept_whole() -> None:
    """SAM's ``rel_pos_h``/``rel_pos_w`` (``[2S - 1, head_dim]``) multiply every head's q: they
    are no neurons, keep their shape in export, and torch-pruning's lost map from qkv's heads to
    proj's inputs (SAM's ``reshape(3, B * heads, N, -1)``) is replaced by the head layout."""
    model = randomize_parameters(_samvit(), seed=2)
    x = _x(2, seed=1)
    net = SteppingNet(model, x[:1], N)
    assert [block.name for block, _ in net.attention] == ["blocks.0.attn", "blocks.1.attn"]
    for block, _ in net.attention:
        assert block.head_params == {}
        assert shared_head_parameters(model.get_submodule(block.name)) == ["rel_pos_h", "rel_pos_w"]
    flat = random_assignment(net, seed=3)
    for train in (False, True):
        report = isolation_report(net, x, train=train)
        assert report.isolated and sum(report.compared) > 0, report
    for s in range(1, N + 1):
        exported = net.export_subnet(s).eval()
        for block, heads in net.attention:
            module = exported.get_submodule(block.name)
            assert module.num_heads == max(int((flat[heads] <= s).sum()), 1)
            assert module.rel_pos_h.shape == model.get_submodule(block.name).rel_pos_h.shape
        with torch.no_grad(), net.subnet(s):
            expected = net.model(x)
        torch.testing.assert_close(exported(x), expected, rtol=1e-5, atol=1e-6)
        assert macs(exported, x[:1], nonzero=True) == net.macs(s)


@pytest.mark.parametrize("seed", [3, 4])
def test_sam_runs_stage_by_stage_and_sliced(seed: int) -> None:
    """SAM's attention on a ``[B, H, W, C]`` grid: the runner adds each new head's decomposed
    position bias (from its q and the shared tables) and counts the bias einsums
    (``T * (h + w) * head_dim`` per head) with q.k and attn.v, so its logits and MACs equal
    the masked subnet's at every stage, in both layouts; sliced execution runs SAM's own
    forward on the active heads and equals masks (outputs and gradients)."""
    model = randomize_parameters(_samvit(), seed=2)
    x = _x(2, seed=1)
    net = SteppingNet(model, x[:1], N)
    assert net.execution == "sliced"
    # windowed block: four 2x2 windows of 4 tokens; global block: 16 tokens on a 4x4 grid
    head_dim = 24 // 3
    expected = {
        "blocks.0.attn": 4 * (4 * 4 * 2 * head_dim + 4 * (2 + 2) * head_dim),
        "blocks.1.attn": 16 * 16 * 2 * head_dim + 16 * (4 + 4) * head_dim,
    }
    assert {block.name: block.head_macs for block, _ in net.attention} == expected
    random_assignment(net, seed=seed)
    for layout in ("delta", "full"):
        report = runner_report(net, x, layout=layout)
        assert max(report.errors) < 1e-5 and all(report.macs_exact), report
    # in float32 the gradient of pos_embed (summed over every token) differs by rounding, up to
    # 4e-4 relative on these random weights; in float64 sliced and masked agree to 1e-9
    double = SteppingNet(randomize_parameters(_samvit(), seed=2).double(), x[:1].double(), N)
    random_assignment(double, seed=seed)
    assert compare_executions(double, x.double(), output_rtol=1e-9, grad_rtol=1e-9) == ""


def test_sam_with_rotary_embeddings_is_no_form_the_runner_or_sliced_execution_knows() -> None:
    """Rotary embeddings rotate q and k by position: neither the runner's decomposed form nor
    sliced execution computes them, so the block is refused by name (the whole model never gets
    that far today: torch-pruning's grouping of a rotary SAM does not finish)."""
    sam = timm.models.vision_transformer_sam
    plain = sam.Attention(dim=24, num_heads=3, use_rel_pos=True, input_size=(4, 4))
    rotary = sam.Attention(
        dim=24, num_heads=3, rope=timm.layers.RotaryEmbeddingCat(8, in_pixels=False, feat_shape=[4, 4])
    )
    assert stage_form(plain) == "decomposed" and runs_sliced(plain)
    assert stage_form(rotary) is None and not runs_stage_by_stage(rotary) and not runs_sliced(rotary)


# ------------------------------------- attention over the input's width (MetaFormer, DaViT)
def _davit() -> Any:
    # each stage: a window-attention block and a channel-attention block
    return timm.create_model(
        "davit_tiny", pretrained=False, num_classes=4, depths=(1, 1), embed_dims=(24, 48), num_heads=(2, 3)
    )


@pytest.mark.parametrize(("name", "build"), [("caformer", small_caformer), ("davit", _davit)])
@pytest.mark.parametrize("seed", [0, 1])
def test_attention_over_the_input_width_runs_stage_by_stage(name: str, build: Any, seed: int) -> None:
    """MetaFormer's attention and DaViT's window and channel attention take their widths from
    the input's channels, so sliced execution cannot run their forwards (refused by name, auto
    falls back to masks); the runner computes their new heads itself (channel attention: softmax
    over each head's ``k^T v``, ``2 * T * head_dim^2`` MACs per head) and equals the masked
    subnet with exact MACs at every stage, in the delta layout too."""
    torch.manual_seed(0)
    model = randomize_parameters(build().eval(), seed=2)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(seed))
    net = SteppingNet(model, x[:1], N)
    assert net.execution == "masked"
    with pytest.raises(UnsupportedModelError) as refused:
        net.set_execution("sliced")
    assert set(dict(refused.value.problems)) == {block.name for block, _ in net.attention}
    assert "input's channels" in str(refused.value)
    if name == "davit":
        channel = [b for b, _ in net.attention if type(model.get_submodule(b.name)).__name__ == "ChannelAttention"]
        tokens = (64 // 4) ** 2  # stage 1: stride-4 stem
        assert channel and channel[0].head_macs == 2 * tokens * channel[0].head_dim ** 2
    random_assignment(net, seed=seed)
    for layout in ("auto", "full"):
        report = runner_report(net, x, layout=layout)
        assert max(report.errors) < 1e-5 and all(report.macs_exact), report
        # MetaFormer's res_scale views its parameter to a stored shape ([C, 1, 1]): each stage
        # gets its own, so the delta layout fits
        assert report.layout == ("delta" if layout == "auto" else "full")


# ------------------------------------------------ rotary embeddings (AttentionRope: Qwen3-ViT)
@pytest.mark.parametrize("seed", [0, 1])
def test_rotary_attention_runs_stage_by_stage_and_sliced(seed: int) -> None:
    """Qwen3-ViT's ``AttentionRope`` takes its rotary embeddings as the ``rope`` argument: the
    runner rotates the new heads' q and k with them (elementwise: no MACs), so logits and MACs
    equal the masked subnet's at every stage in both layouts; sliced execution runs the block's
    own forward on the active heads and equals masks."""
    torch.manual_seed(0)
    model = timm.create_model(
        "qwen3_vit_88m",
        pretrained=False,
        img_size=32,
        patch_size=8,
        embed_dim=48,
        depth=2,
        num_heads=3,
        pos_embed_grid_size=4,
        num_classes=10,
    ).eval()
    model = randomize_parameters(model, seed=2)
    x = _x(2, seed=seed)
    net = SteppingNet(model, x[:1], N)
    assert net.execution == "sliced"
    assert [type(model.get_submodule(b.name)).__name__ for b, _ in net.attention] == ["AttentionRope"] * 2
    ropes: list[bool] = []
    handle = model.get_submodule("encoder.blocks.0.attn").register_forward_pre_hook(
        lambda mod, args, kwargs: ropes.append(kwargs.get("rope") is not None), with_kwargs=True
    )
    try:
        model(x)
    finally:
        handle.remove()
    assert ropes == [True]  # the embeddings reach the block (so the runner must apply them)
    random_assignment(net, seed=seed)
    for layout in ("delta", "full"):
        report = runner_report(net, x, layout=layout)
        assert max(report.errors) < 1e-5 and all(report.macs_exact), report
    assert compare_executions(net, x) == ""
