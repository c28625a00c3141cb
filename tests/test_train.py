"""Training loops: beta suppression (exact gradient ratios), KD loss (hand computation), the
per-subnet epoch (order, steps, distillation), evaluation and the BN running-statistics guard."""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Iterator

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from nni_steppingnet import SteppingNet
from nni_steppingnet.train import (
    SubnetModel,
    beta_suppression,
    evaluate,
    evaluate_model,
    kd_loss,
    make_optimizer,
    train_dense,
    train_subnets_epoch,
)

N = 3


@pytest.fixture()
def net(
    tiny_model: Callable[..., nn.Module],
    random_assignment: Callable[..., torch.Tensor],
    randomize_bn: Callable[..., nn.Module],
) -> SteppingNet:
    model = randomize_bn(tiny_model("lenet5", seed=0, in_chans=1, img_size=12, width=0.5), seed=1)
    wrapped = SteppingNet(model, torch.randn(2, 1, 12, 12), N)
    random_assignment(wrapped, seed=2)
    return wrapped


def _data(n: int = 8, seed: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 12, 12, generator=g), torch.randint(0, 10, (n,), generator=g)


def _grads(net: SteppingNet, subnet: int, beta: float | None) -> dict[str, torch.Tensor]:
    x, y = _data()
    net.model.eval()  # fixed BN statistics: both backward passes see identical activations
    net.model.zero_grad(set_to_none=True)
    with net.subnet(subnet):
        loss = F.cross_entropy(net.model(x), y)
    with beta_suppression(net, subnet, beta):
        loss.backward()
    return {name: p.grad.clone() for name, p in net.model.named_parameters() if p.grad is not None}


# -------------------------------------------------------------------- beta suppression
def test_beta_suppression_scales_gradients_exactly(net: SteppingNet) -> None:
    plain = _grads(net, 3, None)
    suppressed = _grads(net, 3, 0.5)
    flat = net.flat_assignment()
    params = dict(net.model.named_parameters())
    modules = dict(net.model.named_modules())
    checked_rows = {1: 0, 2: 0, 3: 0}

    def scale_of(positions: torch.Tensor) -> torch.Tensor:
        a = flat[positions]
        return torch.where(a < 3, 0.5 ** (3 - a).clamp_min(0).double(), torch.ones_like(a, dtype=torch.float64)).float()

    for k, layer in enumerate(net.layers):
        weight_name = next(n for n, p in params.items() if p is net.original_weight(k))
        bias_name = layer.name + ".bias"
        if layer.is_logits:
            assert torch.equal(suppressed[weight_name], plain[weight_name])
            assert torch.equal(suppressed[bias_name], plain[bias_name])
            continue
        scale = scale_of(net.index.out_positions[k])
        shape = (-1,) + (1,) * (plain[weight_name].dim() - 1)
        # Powers of two: the scaled gradient is exact.
        assert torch.equal(suppressed[weight_name], plain[weight_name] * scale.reshape(shape))
        if bias_name in plain:
            assert torch.equal(suppressed[bias_name], plain[bias_name] * scale)
        for a in (1, 2, 3):
            rows = flat[net.index.out_positions[k]] == a
            checked_rows[a] += int(rows.sum())
    for name, positions in net.channel_modules.items():
        if not isinstance(modules[name], nn.BatchNorm2d):
            continue
        scale = scale_of(positions)
        for attr in ("weight", "bias"):
            assert torch.equal(suppressed[f"{name}.{attr}"], plain[f"{name}.{attr}"] * scale)
    assert all(count > 0 for count in checked_rows.values())  # every case was exercised
    # Something was actually scaled (a gradient of a subnet-1 row is nonzero and now quartered).
    assert any(not torch.equal(suppressed[n], plain[n]) for n in plain)


class _LayerScaleNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.scale = nn.Parameter(torch.rand(8, 1, 1) + 0.5)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc((F.relu(self.stem(x)) * self.scale).mean((2, 3)))


@pytest.mark.filterwarnings("ignore:Unwrapped parameters detected")
def test_beta_suppression_scales_a_bare_layer_scale_parameter() -> None:
    torch.manual_seed(0)
    net = SteppingNet(_LayerScaleNet(), torch.randn(2, 1, 12, 12), N)
    net.groups[0].assignment = torch.tensor([1, 1, 2, 2, 3, 3, 4, 4])  # N = 3; 4 = unused
    plain = _grads(net, 3, None)["scale"].flatten()
    suppressed = _grads(net, 3, 0.5)["scale"].flatten()
    expected = torch.tensor([0.25, 0.25, 0.5, 0.5, 1, 1, 1, 1])
    assert bool((plain[:6] != 0).all())
    assert torch.equal(suppressed, plain * expected)


def test_beta_suppression_is_removed_and_noop_cases(net: SteppingNet) -> None:
    plain = _grads(net, 2, None)
    _grads(net, 2, 0.5)
    after = _grads(net, 2, None)
    assert all(torch.equal(after[n], plain[n]) for n in plain)
    one = _grads(net, 2, 1.0)
    assert all(torch.equal(one[n], plain[n]) for n in plain)
    # Subnet 1 has no smaller subnet: nothing changes.
    plain1, sup1 = _grads(net, 1, None), _grads(net, 1, 0.5)
    assert all(torch.equal(sup1[n], plain1[n]) for n in plain1)


def test_beta_suppression_follows_assignment_changes(net: SteppingNet) -> None:
    for g in net.groups:
        g.assignment = torch.ones(g.size, dtype=torch.long)
    x, y = _data()
    net.model.eval()
    net.model.zero_grad(set_to_none=True)
    with net.subnet(2):
        loss = F.cross_entropy(net.model(x), y)
    plain_loss = loss.detach()
    with beta_suppression(net, 2, 0.5):
        # Changed after entering: the hooks read the assignment when they run.
        for g in net.groups:
            g.assignment = torch.full((g.size,), 2, dtype=torch.long)
        with net.subnet(2):
            loss = F.cross_entropy(net.model(x), y)
        loss.backward()
    assert torch.equal(loss.detach(), plain_loss)
    w = net.original_weight(0)
    suppressed = w.grad.clone()
    net.model.zero_grad(set_to_none=True)
    with net.subnet(2):
        F.cross_entropy(net.model(x), y).backward()
    assert torch.equal(suppressed, w.grad)  # all neurons in subnet 2 now: scale 1


def test_beta_suppression_rejects_bad_arguments(net: SteppingNet) -> None:
    for beta in (0.0, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"beta must be a number in \(0, 1\]"):
            with beta_suppression(net, 2, beta):
                pass
    with pytest.raises(ValueError, match="subnet index must be an int in 1..3"):
        with beta_suppression(net, 4, 0.9):
            pass
    with pytest.raises(TypeError, match="needs a SteppingNet"):
        with beta_suppression(nn.Linear(2, 2), 1, 0.9):  # type: ignore[arg-type]
            pass


# ---------------------------------------------------------------------------- KD loss
def test_kd_loss_hand_computed() -> None:
    student = torch.tensor([[0.0, 0.0]])
    teacher = torch.tensor([[math.log(3.0), 0.0]])  # softmax -> [0.75, 0.25]
    target = torch.tensor([0])
    ce = math.log(2.0)
    kl = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)  # KL(teacher || student)
    assert kd_loss(student, teacher, target, gamma=0.4).item() == pytest.approx(0.4 * ce + 0.6 * kl, abs=1e-6)
    assert kd_loss(student, teacher, target, gamma=1.0).item() == pytest.approx(ce, abs=1e-6)
    assert kd_loss(student, teacher, target, gamma=0.0).item() == pytest.approx(kl, abs=1e-6)
    # Temperature 2: softened teacher [sqrt3, 1] / (1 + sqrt3), scaled by T^2 = 4.
    p = math.sqrt(3.0) / (1 + math.sqrt(3.0))
    kl2 = p * math.log(p / 0.5) + (1 - p) * math.log((1 - p) / 0.5)
    assert kd_loss(student, teacher, target, gamma=0.0, temperature=2.0).item() == pytest.approx(4 * kl2, abs=1e-6)
    # Zero when the student matches the teacher.
    assert kd_loss(teacher, teacher, target, gamma=0.0).item() == pytest.approx(0.0, abs=1e-7)


def test_kd_loss_rejects_bad_arguments() -> None:
    s = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"gamma must be a number in \[0, 1\]"):
        kd_loss(s, s, torch.zeros(2, dtype=torch.long), gamma=1.5)
    with pytest.raises(ValueError, match="temperature"):
        kd_loss(s, s, torch.zeros(2, dtype=torch.long), gamma=0.5, temperature=0.0)
    with pytest.raises(ValueError, match="same shape"):
        kd_loss(s, torch.zeros(2, 4), torch.zeros(2, dtype=torch.long), gamma=0.5)


# ---------------------------------------------------------------------- epoch / eval
class _Recorder(nn.Module):
    """A fake subnet model: logits = linear(x) + the active subnet index (recorded per call)."""

    def __init__(self, num_subnets: int) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 3)
        self.num_subnets = num_subnets
        self.active = num_subnets
        self.calls: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(self.active)
        return self.linear(x) + float(self.active)


class _FakeTarget:
    def __init__(self, num_subnets: int) -> None:
        self.model = _Recorder(num_subnets)
        self.num_subnets = num_subnets

    @contextlib.contextmanager
    def subnet(self, s: int) -> Iterator[None]:
        previous, self.model.active = self.model.active, s
        try:
            yield None
        finally:
            self.model.active = previous

    def macs(self, s: int) -> int:
        return 12 * s


class _CountingSGD(torch.optim.SGD):
    def __init__(self, params: Any) -> None:
        super().__init__(params, lr=0.1)
        self.steps = 0

    def step(self, closure: Any = None) -> Any:
        self.steps += 1
        return super().step(closure)


def _loader(batches: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(5, 4, generator=g), torch.randint(0, 3, (5,), generator=g)) for _ in range(batches)]


def test_train_subnets_epoch_order_steps_and_mean_loss() -> None:
    target = _FakeTarget(3)
    assert isinstance(target, SubnetModel)
    opt = _CountingSGD(target.model.parameters())
    losses: list[float] = []
    mean = train_subnets_epoch(target, _loader(2), opt, on_step=lambda s, loss: losses.append(loss))
    assert target.model.calls == [1, 2, 3, 1, 2, 3]
    assert opt.steps == 6
    assert mean == pytest.approx(sum(losses) / 6)
    limited = _FakeTarget(2)
    limited_opt = _CountingSGD(limited.model.parameters())
    train_subnets_epoch(limited, _loader(5), limited_opt, max_batches=2)
    assert limited.model.calls == [1, 2, 1, 2] and limited_opt.steps == 4
    with pytest.raises(ValueError, match="needs a SteppingNet"):
        train_subnets_epoch(_FakeTarget(2), _loader(1), opt, beta=0.9)


def test_train_subnets_epoch_with_teacher_uses_kd_loss() -> None:
    torch.manual_seed(0)
    target = _FakeTarget(2)
    teacher = nn.Linear(4, 3)
    teacher.train()
    data = _loader(1)
    opt = torch.optim.SGD(target.model.parameters(), lr=0.0)  # lr 0: the weights stay put
    got = train_subnets_epoch(target, data, opt, teacher=teacher, gamma=0.4)
    x, y = data[0]
    with torch.no_grad():
        t = teacher(x)
        expected = [kd_loss(target.model.linear(x) + s, t, y, 0.4).item() for s in (1, 2)]
    assert got == pytest.approx(sum(expected) / 2, rel=1e-6)
    assert teacher.training  # mode restored


def test_train_subnets_epoch_on_steppingnet_with_beta_bf16(net: SteppingNet) -> None:
    x, y = _data(16)
    loader = [(x[:8], y[:8]), (x[8:], y[8:])]
    opt = make_optimizer(net.model.parameters(), lr=0.01)
    before = [p.detach().clone() for p in net.model.parameters()]
    loss = train_subnets_epoch(net, loader, opt, beta=0.9, amp="bf16")
    assert math.isfinite(loss)
    assert any(not torch.equal(b, p) for b, p in zip(before, net.model.parameters()))
    with pytest.raises(ValueError, match="amp must be None or 'bf16'"):
        train_subnets_epoch(net, loader, opt, amp="fp16")


def test_running_stats_guard_keeps_inactive_channels(net: SteppingNet) -> None:
    """Every SteppingNet installs the guard at wrap time, so any training loop gets it (the
    masked execution needs it; sliced execution never computes inactive channels)."""
    x, _ = _data()
    bn = net.model.features[1]
    name = "features.1"
    inactive = net.flat_assignment()[net.channel_modules[name]] > 1
    assert inactive.any() and (~inactive).any()
    mean, var = bn.running_mean.clone(), bn.running_var.clone()
    net.model.train()
    with net.subnet(1), net.masked_execution():
        net.model(x).sum().backward()
    assert torch.equal(bn.running_mean[inactive], mean[inactive])
    assert torch.equal(bn.running_var[inactive], var[inactive])
    assert not torch.equal(bn.running_mean[~inactive], mean[~inactive])  # active ones still update
    # A copy of the model carries no guard hooks (they would use this net's assignment).
    copy = net.plain_copy()
    assert not any(m._forward_pre_hooks for m in copy.modules())
    net.bn_guard.remove()
    with net.subnet(1), net.masked_execution():
        net.model(x)  # guard removed: the zeros of inactive channels leak in again
    assert not torch.equal(bn.running_mean[inactive], mean[inactive])


class _ByInput(nn.Module):
    """Predicts x[:, 0] (the label) in subnets >= 2 and label + 1 in subnet 1."""

    def __init__(self) -> None:
        super().__init__()
        self.active = 2
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        label = x[:, 0].long() + (1 if self.active == 1 else 0)
        return F.one_hot(label % 4, 4).float() + self.dummy


def test_evaluate_and_evaluate_model() -> None:
    model = _ByInput()
    target = _FakeTarget(3)
    target.model = model  # type: ignore[assignment]
    labels = torch.tensor([0, 1, 2, 3, 1, 2])
    x = torch.stack([labels.float(), torch.zeros(6)], 1)
    loader = [(x[:4], labels[:4]), (x[4:], labels[4:])]
    model.train()
    assert evaluate(target, loader) == [0.0, 1.0, 1.0]
    assert evaluate(target, loader, subnets=[1]) == [0.0]
    assert model.training  # restored
    assert evaluate_model(model, loader) == 1.0
    with pytest.raises(ValueError, match=r"subnets must hold ints in 1..3"):
        evaluate(target, loader, subnets=[4])
    with pytest.raises(ValueError, match="empty loader"):
        evaluate(target, [])


def test_train_dense_learns_separable_data() -> None:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 4, generator=g)
    x[:, 0] = x[:, 0].sign() * (1.0 + x[:, 0].abs())  # a margin of 2 along the first axis
    y = (x[:, 0] > 0).long()
    loader = [(x[i : i + 16], y[i : i + 16]) for i in range(0, 64, 16)]
    model = nn.Linear(4, 2)
    losses = train_dense(model, loader, epochs=15, lr=0.1)
    assert len(losses) == 15 and losses[-1] < losses[0]
    assert evaluate_model(model, loader) == 1.0
    with pytest.raises(ValueError, match="epochs must be an int >= 0"):
        train_dense(model, loader, epochs=-1, lr=0.1)
    with pytest.raises(ValueError, match="lr must be"):
        make_optimizer(model.parameters(), lr=0.0)
    with pytest.raises(ValueError, match="kind must be one of 'sgd', 'adamw', got 'adam'"):
        make_optimizer(model.parameters(), lr=0.1, kind="adam")


def test_train_dense_with_adamw_is_torch_adamw_under_a_cosine_schedule() -> None:
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(32, 4, generator=g), torch.randint(0, 2, (32,), generator=g)
    loader = [(x[i : i + 8], y[i : i + 8]) for i in range(0, 32, 8)]
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    reference = nn.Linear(4, 2)
    reference.load_state_dict(model.state_dict())
    train_dense(model, loader, epochs=3, lr=0.01, momentum=0.8, weight_decay=0.05, optimizer="adamw")
    # The same steps written out with torch's AdamW: betas=(momentum, 0.999), decoupled decay.
    opt = torch.optim.AdamW(reference.parameters(), lr=0.01, betas=(0.8, 0.999), weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=3)
    for _ in range(3):
        for inputs, targets in loader:
            opt.zero_grad()
            torch.nn.functional.cross_entropy(reference(inputs), targets).backward()
            opt.step()
        schedule.step()
    for mine, theirs in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=0)


def test_make_optimizer_sgd_takes_torchs_plain_sgd_steps() -> None:
    """The same updates as torch's plain SGD loop (the paper's optimizer, nothing fused)."""
    g = torch.Generator().manual_seed(4)
    mine = [nn.Parameter(torch.randn(300, 7, generator=g)), nn.Parameter(torch.randn(11, generator=g))]
    plain = [nn.Parameter(p.detach().clone()) for p in mine]
    opt = make_optimizer(mine, lr=0.1, momentum=0.9, weight_decay=5e-4)
    reference = torch.optim.SGD(plain, lr=0.1, momentum=0.9, weight_decay=5e-4, foreach=False)
    for _ in range(4):
        for a, b in zip(mine, plain):
            grad = torch.randn(a.shape, generator=g)
            a.grad, b.grad = grad.clone(), grad.clone()
        opt.step()
        reference.step()
    for a, b in zip(mine, plain):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
