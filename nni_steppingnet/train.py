"""Training loops: per-subnet training with beta suppression, distillation retraining (eq. 4),
dense teacher training and evaluation.

Everything here works on any :class:`SubnetModel` (a :class:`SteppingNet` or a baseline that
offers the same four members); beta suppression needs a SteppingNet's neuron assignment.
"""

from __future__ import annotations

import contextlib
import logging
import math
from typing import Any, Callable, ContextManager, Iterable, Iterator, Protocol, Sequence, runtime_checkable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._channels import parameter_channel_dim
from .data import to_device
from .hooks import SCALE
from .stepping import RunningStatsGuard, SteppingNet
from .validation import OPTIMIZERS, check_choice

__all__ = [
    "SubnetModel",
    "beta_suppression",
    "BetaSuppression",
    "RunningStatsGuard",
    "kd_loss",
    "train_subnets_epoch",
    "evaluate",
    "evaluate_model",
    "train_dense",
    "make_optimizer",
    "autocast",
    "check_amp",
    "split_batch",
    "forward_logits",
]

logger = logging.getLogger(__name__)

_AMP_MODES = ("bf16",)


@runtime_checkable
class SubnetModel(Protocol):
    """What the training loops need: a model holding ``num_subnets`` nested subnets."""

    model: nn.Module
    num_subnets: int

    def subnet(self, s: int) -> ContextManager[Any]:
        """Within this context, ``model(x)`` computes subnet ``s`` (1-based)."""
        ...

    def macs(self, s: int) -> int:
        """MACs per sample of subnet ``s``."""
        ...


# --------------------------------------------------------------------------- helpers
def check_amp(amp: str | None) -> str | None:
    """Validate an ``amp`` argument: ``None`` (full precision) or ``'bf16'``."""
    if amp is None or amp == "none":
        return None
    if amp not in _AMP_MODES:
        raise ValueError(
            f"amp must be None or 'bf16', got {amp!r} (fp16 needs a gradient scaler "
            "and is not supported; bf16 autocast works on CPU and recent GPUs)"
        )
    return amp


def autocast(device: torch.device | str, amp: str | None) -> ContextManager[Any]:
    """``torch.autocast`` in bfloat16 when ``amp == 'bf16'``, else a no-op context."""
    amp = check_amp(amp)
    if amp is None:
        return contextlib.nullcontext()
    device_type = torch.device(device).type
    return torch.autocast(device_type=device_type, dtype=torch.bfloat16)


def _check_device(device: torch.device | str) -> torch.device:
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device must be like 'cpu', 'cuda' or 'cuda:0', got {device!r}") from exc


def split_batch(batch: Any) -> tuple[Any, torch.Tensor]:
    """``(inputs, targets)`` of a batch: a pair (or longer tuple) or a dict with 'image'/'label'."""
    if isinstance(batch, (list, tuple)) and len(batch) >= 2:
        return batch[0], batch[1]
    if isinstance(batch, dict) and "image" in batch and "label" in batch:
        return batch["image"], batch["label"]
    raise ValueError(
        f"each batch must be (inputs, targets) or a dict with 'image' and 'label', got {type(batch).__name__}"
    )


def forward_logits(model: nn.Module, inputs: Any) -> torch.Tensor:
    """``model(inputs)``, or ``model(**inputs)`` for a dict of keyword inputs."""
    if isinstance(inputs, dict):
        return model(**inputs)
    return model(inputs)


def _progress(iterable: Iterable[Any], enabled: bool, desc: str, total: int | None = None) -> Iterable[Any]:
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, leave=False, dynamic_ncols=True)


def _batches(loader: Iterable[Any], max_batches: int | None) -> Iterator[Any]:
    if max_batches is not None and (
        isinstance(max_batches, bool) or not isinstance(max_batches, int) or max_batches < 1
    ):
        raise ValueError(f"max_batches must be None or a positive int, got {max_batches!r}")
    for index, batch in enumerate(loader):
        if max_batches is not None and index >= max_batches:
            return
        yield batch


def _loader_len(loader: Any, max_batches: int | None) -> int | None:
    try:
        length = len(loader)
    except TypeError:
        return max_batches
    return length if max_batches is None else min(length, max_batches)


def make_optimizer(
    params: Iterable[Any],
    lr: float,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    kind: str = "sgd",
) -> torch.optim.Optimizer:
    """The optimizer ``kind`` (one of :data:`~nni_steppingnet.validation.OPTIMIZERS`).

    ``"sgd"``: SGD with momentum and weight decay (the paper's optimizer, and the only one the
    construction and retraining use: beta suppression scales gradients, which Adam's per-weight
    normalisation would undo). ``"adamw"``: AdamW with ``betas=(momentum, 0.999)`` and decoupled
    ``weight_decay``, for teachers that SGD trains poorly (transformers).
    """
    check_choice("kind", kind, OPTIMIZERS)
    for name, value, low in (("lr", lr, 0.0), ("momentum", momentum, 0.0), ("weight_decay", weight_decay, 0.0)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < low:
            raise ValueError(f"{name} must be a finite number >= {low}, got {value!r}")
    if lr <= 0:
        raise ValueError(f"lr must be > 0, got {lr!r}")
    if momentum >= 1:
        raise ValueError(f"momentum must be < 1, got {momentum!r}")
    params = list(params)
    if not params:
        raise ValueError("make_optimizer got no parameters")
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=float(lr), betas=(float(momentum), 0.999), weight_decay=float(weight_decay))
    return torch.optim.SGD(params, lr=float(lr), momentum=float(momentum), weight_decay=float(weight_decay))


# ----------------------------------------------------------------- beta suppression
class BetaSuppression:
    """Gradient hooks that scale the gradient of every weight row / bias / BN parameter whose
    output neuron has subnet index ``i < subnet`` by ``beta ** (subnet - i)``.

    The hooks read the neuron assignment when they run, so they follow moves. Set
    :attr:`subnet` between backward passes to reuse the hooks; :meth:`remove` detaches them.
    The classifier (logits) layer is never scaled: its outputs belong to every subnet. The hooks
    go through ``net.hooks`` with priority :data:`~nni_steppingnet.hooks.SCALE`, after every
    observer (the importance tracker sees the unscaled gradient).
    """

    def __init__(self, net: SteppingNet, subnet: int, beta: float) -> None:
        if not isinstance(net, SteppingNet):
            raise TypeError(f"beta suppression needs a SteppingNet, got {type(net).__name__}")
        _check_beta(beta)
        net.check_subnet(subnet)
        self.net = net
        self.subnet = int(subnet)
        self.beta = float(beta)
        self._handles: list[Any] = []
        modules = dict(net.model.named_modules())
        try:
            for k, layer in enumerate(net.layers):
                if layer.is_logits:
                    continue
                positions = net.index.out_positions[k]
                self._hook(net.original_weight(k), positions)
                bias = getattr(layer.module, "bias", None)
                if isinstance(bias, torch.Tensor):
                    self._hook(bias, positions)
            for name, positions in net.channel_modules.items():
                module = modules.get(name)
                if module is None:
                    continue
                for attr in ("weight", "bias"):
                    param = getattr(module, attr, None)
                    if isinstance(param, nn.Parameter) and param.dim() >= 1 and param.shape[0] == positions.numel():
                        self._hook(param, positions)
            parameters = dict(net.model.named_parameters())
            for name, positions in net.channel_parameters.items():
                param = parameters.get(name)
                # Bare per-channel parameters (layer scale [C, 1, 1]) with channels first.
                if (
                    param is not None
                    and param.dim() >= 1
                    and parameter_channel_dim(param) == 0
                    and param.shape[0] == positions.numel()
                ):
                    self._hook(param, positions)
        except BaseException:
            self.remove()
            raise

    def _hook(self, param: torch.Tensor, positions: torch.Tensor) -> None:
        if not param.requires_grad:
            return

        def hook(grad: torch.Tensor) -> torch.Tensor | None:
            if self.subnet == 1:
                return None  # no smaller subnet to protect
            scale = self._scale(positions, grad)
            return grad * scale.reshape(scale.shape + (1,) * (grad.dim() - 1))

        self._handles.append(self.net.hooks.add_gradient_hook(param, hook, priority=SCALE))

    def _scale(self, positions: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        subnet, beta = self.subnet, self.beta

        def build(flat: torch.Tensor) -> torch.Tensor:
            a_out = flat[positions].to(torch.float64)
            exponent = (subnet - a_out).clamp_min(0)
            scale = torch.pow(torch.tensor(beta, dtype=torch.float64), exponent)
            return scale.to(device=grad.device, dtype=grad.dtype)

        # Positions tensors live as long as the net, so their id is a stable key.
        key = ("beta_suppression", id(positions), subnet, beta, grad.device, grad.dtype)
        return self.net.assignment_cache(key, build)

    def remove(self) -> None:
        """Detach every hook."""
        for handle in self._handles:
            handle.remove()
        self._handles = []


def _check_beta(beta: float) -> None:
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not math.isfinite(beta) or not 0.0 < beta <= 1.0:
        raise ValueError(f"beta must be a number in (0, 1], got {beta!r}")


@contextlib.contextmanager
def beta_suppression(net: SteppingNet, subnet: int, beta: float | None) -> Iterator[None]:
    """While active, the gradient of every weight row, bias and BN parameter whose output neuron
    has subnet index ``i < subnet`` is scaled by ``beta ** (subnet - i)`` (paper III-A2).

    Use it around the backward pass of subnet ``subnet``'s loss. ``beta`` of ``1.0`` or ``None``
    is a no-op. For plain SGD (no momentum, no weight decay) scaling the gradient is exactly
    scaling those weights' learning rate, as the paper describes; with momentum or weight decay
    it is the gradient that is scaled (the decay term and the momentum of earlier steps are not).
    The logits layer is never scaled: its outputs belong to every subnet.
    """
    if beta is None or beta == 1.0:
        if beta is not None:
            _check_beta(beta)
        yield None
        return
    hooks = BetaSuppression(net, subnet, beta)
    try:
        yield None
    finally:
        hooks.remove()


# --------------------------------------------------------------------------- losses
def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    targets: torch.Tensor,
    gamma: float,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Distillation loss of eq. (4): ``gamma * CE(student, targets) + (1 - gamma) * KL``.

    ``KL = KL(softmax(teacher / T) || softmax(student / T))`` averaged over the batch
    (``batchmean``) and multiplied by ``T**2`` (Hinton et al.: keeps the gradient scale
    independent of ``T``; no effect at the default ``T = 1``). The paper's eq. (4) writes the KL
    term as ``sum Y_k log(Y_pre_k / Y_k)`` with the student in the numerator; we use the
    standard ``KL(teacher || student) = sum Y_pre_k log(Y_pre_k / Y_k)`` of Hinton's distillation
    (the paper's reference [15]), which is non-negative and zero when the student matches.
    """
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be a number in [0, 1], got {gamma!r}")
    if (
        isinstance(temperature, bool)
        or not isinstance(temperature, (int, float))
        or not math.isfinite(temperature)
        or temperature <= 0
    ):
        raise ValueError(f"temperature must be a positive number, got {temperature!r}")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} must have the same shape"
        )
    student = student_logits.float()
    teacher = teacher_logits.detach().float()
    ce = F.cross_entropy(student, targets)
    if gamma == 1.0:
        return ce
    t = float(temperature)
    kl = F.kl_div(
        F.log_softmax(student / t, dim=-1), F.log_softmax(teacher / t, dim=-1), reduction="batchmean", log_target=True
    ) * (t * t)
    return gamma * ce + (1.0 - gamma) * kl


# ------------------------------------------------------------------------ training
def train_subnets_epoch(
    target: SubnetModel,
    loader: Iterable[Any],
    optimizer: torch.optim.Optimizer,
    *,
    beta: float | None = None,
    teacher: nn.Module | None = None,
    gamma: float = 1.0,
    device: torch.device | str = "cpu",
    amp: str | None = None,
    max_batches: int | None = None,
    progress: bool = False,
    temperature: float = 1.0,
    scheduler: Any = None,
    on_step: Callable[[int, float], None] | None = None,
    forward_module: nn.Module | None = None,
) -> float:
    """One epoch of per-subnet training (paper III-A2 / III-B).

    For every batch and for ``s = 1..N`` in ascending order: forward subnet ``s``, loss
    (cross entropy, or :func:`kd_loss` against ``teacher`` when given), backward (under
    :func:`beta_suppression` when ``target`` is a SteppingNet and ``beta`` is given), one
    ``optimizer.step()``. The teacher runs once per batch in eval mode without gradients.

    Args:
        scheduler: optional LR scheduler stepped once per batch (after all subnets).
        on_step: optional ``callback(subnet, loss)`` after every optimizer step.
        forward_module: the module called for the forward when it is not ``target.model``: a
            ``DistributedDataParallel`` wrapper of it in a data-parallel job.

    Returns:
        the mean loss over all (batch, subnet) steps (``nan`` for an empty loader).
    """
    device = _check_device(device)
    amp = check_amp(amp)
    num = int(target.num_subnets)
    if beta is not None:
        _check_beta(beta)
    if teacher is not None:
        teacher.to(device)
        teacher_was_training = teacher.training
        teacher.eval()
    target.model.to(device)
    target.model.train()
    model = target.model if forward_module is None else forward_module
    hooks: BetaSuppression | None = None
    if beta is not None and beta != 1.0:
        if not isinstance(target, SteppingNet):
            raise ValueError(
                "beta suppression needs a SteppingNet target (it reads the neuron "
                f"assignment); got {type(target).__name__}: pass beta=None"
            )
        hooks = BetaSuppression(target, 1, beta)
    total, steps = 0.0, 0
    try:
        batches = _progress(_batches(loader, max_batches), progress, "train", _loader_len(loader, max_batches))
        for batch in batches:
            inputs, targets = split_batch(to_device(batch, device))
            teacher_logits = None
            if teacher is not None:
                with torch.no_grad(), autocast(device, amp):
                    teacher_logits = forward_logits(teacher, inputs).float()
            for s in range(1, num + 1):
                optimizer.zero_grad(set_to_none=True)
                with target.subnet(s), autocast(device, amp):
                    logits = forward_logits(model, inputs)
                if teacher_logits is not None:
                    loss = kd_loss(logits, teacher_logits, targets, gamma, temperature)
                else:
                    loss = F.cross_entropy(logits.float(), targets)
                if hooks is not None:
                    hooks.subnet = s
                loss.backward()
                optimizer.step()
                value = float(loss.detach())
                total += value
                steps += 1
                if on_step is not None:
                    on_step(s, value)
            if scheduler is not None:
                scheduler.step()
    finally:
        if hooks is not None:
            hooks.remove()
        if teacher is not None and teacher_was_training:
            teacher.train()
    return total / steps if steps else float("nan")


def train_dense(
    model: nn.Module,
    loader: Iterable[Any],
    *,
    epochs: int,
    lr: float,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    optimizer: str = "sgd",
    device: torch.device | str = "cpu",
    amp: str | None = None,
    progress: bool = False,
    max_batches: int | None = None,
) -> list[float]:
    """Train a plain model (the teacher) with ``optimizer`` (:func:`make_optimizer`'s ``kind``)
    and a per-epoch cosine schedule.

    Returns the mean training loss of every epoch.
    """
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
        raise ValueError(f"epochs must be an int >= 0, got {epochs!r}")
    device = _check_device(device)
    amp = check_amp(amp)
    model.to(device)
    step_rule = make_optimizer(model.parameters(), lr, momentum, weight_decay, kind=optimizer)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(step_rule, T_max=max(epochs, 1))
    losses: list[float] = []
    epoch_iter = _progress(range(epochs), progress, "teacher")
    for epoch in epoch_iter:
        model.train()
        total, steps = 0.0, 0
        for batch in _batches(loader, max_batches):
            inputs, targets = split_batch(to_device(batch, device))
            step_rule.zero_grad(set_to_none=True)
            with autocast(device, amp):
                logits = forward_logits(model, inputs)
            loss = F.cross_entropy(logits.float(), targets)
            loss.backward()
            step_rule.step()
            total += float(loss.detach())
            steps += 1
        scheduler.step()
        losses.append(total / steps if steps else float("nan"))
        logger.info("teacher epoch %d/%d: loss %.4f", epoch + 1, epochs, losses[-1])
    return losses


# ---------------------------------------------------------------------- evaluation
def evaluate(
    target: SubnetModel,
    loader: Iterable[Any],
    *,
    device: torch.device | str = "cpu",
    subnets: Sequence[int] | None = None,
    amp: str | None = None,
    max_batches: int | None = None,
) -> list[float]:
    """Top-1 accuracy in [0, 1] of every subnet in ``subnets`` (default ``1..N``).

    Runs in eval mode without gradients and reads the loader once (every subnet sees each batch).
    The model's training mode is restored afterwards.
    """
    device = _check_device(device)
    num = int(target.num_subnets)
    chosen = list(range(1, num + 1)) if subnets is None else list(subnets)
    for s in chosen:
        if isinstance(s, bool) or not isinstance(s, int) or not 1 <= s <= num:
            raise ValueError(f"subnets must hold ints in 1..{num}, got {s!r}")
    if not chosen:
        return []
    model = target.model
    model.to(device)
    was_training = model.training
    model.eval()
    correct = [0] * len(chosen)
    seen = 0
    try:
        with torch.no_grad():
            for batch in _batches(loader, max_batches):
                inputs, targets = split_batch(to_device(batch, device))
                for j, s in enumerate(chosen):
                    with target.subnet(s), autocast(device, amp):
                        logits = forward_logits(model, inputs)
                    correct[j] += int((logits.argmax(-1) == targets).sum())
                seen += int(targets.shape[0])
    finally:
        model.train(was_training)
    if seen == 0:
        raise ValueError("evaluate got an empty loader")
    return [c / seen for c in correct]


def evaluate_model(
    model: nn.Module,
    loader: Iterable[Any],
    *,
    device: torch.device | str = "cpu",
    amp: str | None = None,
    max_batches: int | None = None,
) -> float:
    """Top-1 accuracy in [0, 1] of a plain model (eval mode, no gradients)."""
    device = _check_device(device)
    model.to(device)
    was_training = model.training
    model.eval()
    correct, seen = 0, 0
    try:
        with torch.no_grad():
            for batch in _batches(loader, max_batches):
                inputs, targets = split_batch(to_device(batch, device))
                with autocast(device, amp):
                    logits = forward_logits(model, inputs)
                correct += int((logits.argmax(-1) == targets).sum())
                seen += int(targets.shape[0])
    finally:
        model.train(was_training)
    if seen == 0:
        raise ValueError("evaluate_model got an empty loader")
    return correct / seen
