"""Helpers for testing SteppingNet on a model: the project's model list, random nested
assignments and an isolation checker with its own forward hooks.

Use them to check a model of your own before constructing subnets on it::

    import timm, torch
    from nni_steppingnet import SteppingNet
    from nni_steppingnet.testing import random_assignment, randomize_bn, isolation_report

    model = randomize_bn(timm.create_model("resnet18", num_classes=10), seed=1)
    net = SteppingNet(model, torch.randn(2, 3, 32, 32), 4)
    random_assignment(net, seed=3)          # every subnet gets neurons of every group
    report = isolation_report(net, torch.randn(4, 3, 32, 32), train=True)
    assert report.isolated, report.where    # bitwise: smaller subnets never change

The checker is independent of :meth:`SteppingNet.check_isolation` (it hooks every Conv/Linear
itself, records repeated calls of a module, and compares with exact equality), so the two
can check each other. The project's tests and benchmarks use these helpers.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn as nn

from .runtime import IncrementalRunner
from .stepping import SteppingNet

__all__ = [
    "FOUNDATION_MODELS",
    "FIXED_SPLIT_MODELS",
    "small_caformer",
    "random_assignment",
    "fraction_assignment",
    "randomize_bn",
    "randomize_parameters",
    "subnet_activations",
    "IsolationReport",
    "isolation_report",
    "RunnerReport",
    "runner_report",
    "TINY_RUN_OVERRIDES",
]

logger = logging.getLogger(__name__)

#: ``--set`` overrides that shrink a bundled recipe to a run of seconds (64 synthetic 16x16 images,
#: a quarter-width LeNet-3C1L), for tests of the whole flow and the CLI.
TINY_RUN_OVERRIDES: tuple[str, ...] = (
    "data.name=synthetic",
    "data.synthetic_size=64",
    "data.batch_size=16",
    "model.width=0.25",
    "steppingnet.expansion=1.5",
    "teacher.epochs=1",
    "construction.iterations=4",
    "construction.batches_per_iteration=2",
    "construction.monitor_samples=16",
    "retraining.epochs=2",
)

#: ``(timm name, extra create_model kwargs)``: the paper models and one timm CNN per family the
#: design names (residual, inverted residual with SE, EfficientNet, grouped convs, dense concat).
#: ``vgg16_cifar`` runs at width 0.5 to stay fast; its structure is unchanged. The paper models
#: are registered with timm by importing :mod:`nni_steppingnet.models`.
FOUNDATION_MODELS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("lenet3c1l", {}),
    ("lenet5", {}),
    ("vgg16_cifar", {"width": 0.5}),
    ("resnet18", {}),
    ("mobilenetv3_small_100", {}),
    ("efficientnet_b0", {}),
    ("regnetx_002", {}),
    ("densenet121", {}),
)

#: timm models whose blocks split by widths stored at construction (:mod:`.fixed_splits`), with
#: the arguments that keep them small: Res2Net cut to one block per stage but the first (two:
#: the second adds each scale to the previous one's output).
FIXED_SPLIT_MODELS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("inception_next_atto", {}),
    ("fasternet_t0", {}),
    ("res2net50_26w_4s", {"layers": [2, 1, 1, 1]}),
    ("dpn48b", {}),
    ("rexnet_100", {}),
)


def small_caformer(num_classes: int = 4) -> nn.Module:
    """A small timm CAFormer: two SepConv stages (``LayerNorm2dNoBias``), then two attention
    stages (MetaFormer's ``Attention``, whose ``reshape(B, N, C)`` takes the output width from
    the input's channels; ``LayerNormNoBias``) and the ``res_scale`` layer scales of timm's
    default."""
    from timm.models import metaformer

    return metaformer.MetaFormer(
        num_classes=num_classes,
        depths=(1, 1, 1, 1),
        dims=(16, 32, 64, 64),
        token_mixers=[metaformer.SepConv] * 2 + [metaformer.Attention] * 2,
        norm_layers=[metaformer.LayerNorm2dNoBias] * 2 + [metaformer.LayerNormNoBias] * 2,
    )


def random_assignment(net: SteppingNet, seed: int, num_subnets: int | None = None) -> torch.Tensor:
    """Give every neuron a random index in ``1..num_subnets + 1`` (default ``net.num_subnets``);
    every group with at least ``num_subnets`` neurons gets each of ``1..num_subnets`` at least
    once. Returns ``net.flat_assignment()``."""
    n = net.num_subnets if num_subnets is None else num_subnets
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= net.num_subnets:
        raise ValueError(f"num_subnets must be an int in 1..{net.num_subnets}, got {n!r}")
    generator = torch.Generator().manual_seed(seed)
    for group in net.groups:
        values = torch.randint(1, n + 2, (group.size,), generator=generator)
        if group.size >= n:
            # Every subnet gains at least one neuron of every group that is large enough.
            slots = torch.randperm(group.size, generator=generator)[:n]
            values[slots] = torch.arange(1, n + 1)
        group.assignment = values
    return net.flat_assignment()


def fraction_assignment(net: SteppingNet, fractions: Sequence[float], seed: int) -> torch.Tensor:
    """Random indices whose cumulative share of every group's neurons is about ``fractions``
    (one non-decreasing value in (0, 1] per subnet; MACs grow roughly with their squares).
    Returns ``net.flat_assignment()``."""
    values = [float(f) for f in fractions]
    if (
        len(values) != net.num_subnets
        or any(not 0 < f <= 1 for f in values)
        or any(a > b for a, b in zip(values, values[1:]))
    ):
        raise ValueError(f"fractions must be {net.num_subnets} non-decreasing values in (0, 1], got {values}")
    generator = torch.Generator().manual_seed(seed)
    bounds = torch.tensor(values[:-1])
    for group in net.groups:
        u = torch.rand(group.size, generator=generator)
        index = 1 + (u.unsqueeze(1) >= bounds).sum(1)
        if values[-1] < 1:
            index[u >= values[-1]] = net.num_subnets + 1
        group.assignment = index
    return net.flat_assignment()


def randomize_parameters(model: nn.Module, seed: int = 0) -> nn.Module:
    """Every parameter random, as training leaves them: timm zeroes biases, heads and
    GlobalResponseNorm and starts layer scales at 1e-6, which hides a leak through them (a branch
    scaled by 1e-6 is below every tolerance; a GRN at zero is the identity). Matrices and kernels
    get ``N(0, 1 / fan_in)``; tokens and position embeddings (leading size 1) ``N(0, 0.3^2)``; norm weights and scales (``gamma``, ``*scale*``) ``1 + N(0, 0.3^2)``;
    every other parameter ``N(0, 0.3^2)``. Buffers (BatchNorm statistics) are left to
    :func:`randomize_bn`. Call it before wrapping: a wrapped model's weights sit behind
    parametrizations. Returns ``model``."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            is_norm = "norm" in type(module).__name__.lower()
            for name, param in module.named_parameters(recurse=False):
                # Leading size 1: class tokens and position embeddings, broadcast over the batch.
                if param.dim() >= 2 and param.shape[0] > 1 and not is_norm:
                    fan_in = max(param[0].numel(), 1)
                    param.copy_(torch.randn(param.shape, generator=generator) / fan_in**0.5)
                    continue
                scale_like = (is_norm and name == "weight") or "gamma" in name or "scale" in name
                centre = 1.0 if scale_like else 0.0
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3 + centre)
    return model


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BatchNorm statistics and affine parameters (fresh BNs are identities, which
    would hide a leak through them). Returns ``model``."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if not isinstance(module, nn.modules.batchnorm._BatchNorm):
                continue
            mean, var = module.running_mean, module.running_var
            if mean is None or var is None:
                continue
            shape = mean.shape
            mean.copy_(torch.randn(shape, generator=generator) * 0.1)
            var.copy_(torch.rand(shape, generator=generator) + 0.5)
            if module.affine and module.weight is not None and module.bias is not None:
                module.weight.copy_(torch.rand(shape, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(shape, generator=generator) * 0.1)
    return model


def subnet_activations(net: SteppingNet, x: Any, train: bool = False) -> dict[int, dict[str, list[torch.Tensor]]]:
    """Per subnet ``s``: every call's output of every Conv/Linear (for the classifier: its input,
    since the logits change with ``s`` by design), from forward hooks of our own.

    Every subnet's forward starts from the same RNG state (dropout draws the same masks); the
    model's buffers (BN running statistics) and train/eval mode are restored afterwards.
    """
    model = net.model
    current: dict[str, list[torch.Tensor]] = {}
    handles = []
    for layer in net.layers:

        def hook(
            module: nn.Module, args: Any, output: torch.Tensor, name: str = layer.name, logits: bool = layer.is_logits
        ) -> None:
            current.setdefault(name, []).append((args[0] if logits else output).detach().clone())

        handles.append(layer.module.register_forward_hook(hook))
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    was_training = model.training
    model.train(train)
    result: dict[int, dict[str, list[torch.Tensor]]] = {}
    try:
        with torch.no_grad():
            for s in range(1, net.num_subnets + 1):
                current.clear()
                # Masked: channels are compared at their original positions (and bitwise
                # isolation is a property of the masked execution).
                with net.subnet(s), net.masked_execution(), torch.random.fork_rng(devices=[]):
                    model(**x) if isinstance(x, dict) else model(x)
                result[s] = dict(current)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
        with torch.no_grad():
            for k, v in model.named_buffers():
                v.copy_(buffers[k])
    return result


@dataclass(frozen=True)
class IsolationReport:
    """Outcome of :func:`isolation_report`."""

    #: channel comparisons made, per smaller subnet ``s`` (index ``s - 1``; the last is 0)
    compared: tuple[int, ...]
    #: worst relative difference found (0.0 when isolated)
    worst: float
    #: where the worst difference is, e.g. ``"features.3 subnet 1 vs 2"`` ("" when isolated)
    where: str

    @property
    def isolated(self) -> bool:
        """Every compared channel is bitwise equal."""
        return self.worst == 0.0 and not self.where


def isolation_report(net: SteppingNet, x: Any, train: bool = False) -> IsolationReport:
    """Check that the channels of every subnet ``s`` are bitwise identical in every larger
    subnet, layer by layer (:func:`subnet_activations`); for the classifier its input features
    of neurons with index ``<= s`` are compared (a Linear reads them on the last dimension, a
    1x1-conv head on dimension 1)."""
    acts = subnet_activations(net, x, train)
    compared = [0] * net.num_subnets
    worst, where = 0.0, ""
    for k, layer in enumerate(net.layers):
        a_out, a_in = net.layer_assignment(k)
        # Channels are dim 1 of a Conv2d's tensors and the last dim of a Linear's (tokens first).
        dim = 1 if isinstance(layer.module, nn.Conv2d) else -1
        index = a_in[0] if layer.is_logits else a_out
        for s in range(1, net.num_subnets):
            keep = (index <= s).nonzero().flatten()
            for call, small in enumerate(acts[s].get(layer.name, [])):
                small = small.index_select(dim, keep)
                for t in range(s + 1, net.num_subnets + 1):
                    large = acts[t][layer.name][call].index_select(dim, keep)
                    compared[s - 1] += keep.numel()
                    if not torch.equal(small, large):
                        err = float((small - large).abs().max() / large.abs().max().clamp_min(1e-12))
                        if err > worst or not where:
                            worst, where = max(err, worst), f"{layer.name} subnet {s} vs {t}"
    return IsolationReport(compared=tuple(compared), worst=worst, where=where)


@dataclass(frozen=True)
class RunnerReport:
    """Outcome of :func:`runner_report`."""

    #: the layout the runner used
    layout: str
    #: per stage ``s``: the largest difference between the runner's logits and the masked subnet's,
    #: relative to the largest masked logit
    errors: tuple[float, ...]
    #: per stage ``s``: ``runner.macs_spent == net.macs(s)``
    macs_exact: tuple[bool, ...]

    @property
    def worst(self) -> float:
        return max(self.errors)

    def exact(self, rtol: float = 1e-5) -> bool:
        """Every stage within ``rtol`` of the masked subnet, at exactly its MACs."""
        return self.worst <= rtol and all(self.macs_exact)


def runner_report(net: SteppingNet, x: torch.Tensor, layout: str = "auto") -> RunnerReport:
    """Step an :class:`~nni_steppingnet.IncrementalRunner` of ``net`` through every subnet on
    ``x`` and compare each stage with the masked subnet (``with net.subnet(s): net.model(x)``,
    in eval mode; the model's mode is restored)."""
    runner = IncrementalRunner(net, layout=layout)
    was_training = net.model.training
    net.model.eval()
    errors, exact = [], []
    try:
        with torch.no_grad():
            for s in range(1, net.num_subnets + 1):
                logits = runner.start(x) if s == 1 else runner.step()
                with net.subnet(s):
                    expected = net.model(x)
                scale = expected.abs().max().clamp_min(1e-12)
                errors.append(float((logits - expected).abs().max() / scale))
                exact.append(runner.macs_spent == net.macs(s))
    finally:
        net.model.train(was_training)
    return RunnerReport(layout=str(runner.layout), errors=tuple(errors), macs_exact=tuple(exact))
