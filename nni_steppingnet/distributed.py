"""Data-parallel training over ``torch.distributed`` (one process per GPU or CPU worker).

``torchrun --nproc_per_node=K -m nni_steppingnet run RECIPE`` starts K processes; each calls
:func:`init_distributed`, which reads torchrun's ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` and
joins the process group (NCCL on CUDA, gloo on CPU). The pieces a SteppingNet job needs:

* :func:`wrap_ddp`: the model in :class:`~torch.nn.parallel.DistributedDataParallel`. Its forward
  is the one training calls (``with net.subnet(s): ddp(x)``); the SteppingNet's masks, sliced
  execution and gradient hooks stay on the wrapped module, and DDP averages the gradients after
  they ran. ``find_unused_parameters=True`` because a sliced subnet may leave a layer without any
  active channel.
* :func:`all_reduce_mean`: construction's importance scores (``ImportanceTracker(reduce=...)``)
  are averaged over the ranks *before* their absolute value is taken, so every rank scores each
  neuron with the gradient of the global batch's loss and makes identical moves.
* :func:`check_same_assignment`: an assignment hash (assignment and pruning masks) gathered from
  every rank after every construction iteration; ranks that disagree stop with
  :class:`RankDivergenceError` instead of training different networks.
* :class:`SyncBatchNorm1d` / :class:`SyncBatchNorm2d` (:func:`convert_sync_batchnorm`): BatchNorm
  whose training-mode statistics are those of the global batch, computed by differentiable
  all-reduces, so it works with gloo on CPU (torch's ``nn.SyncBatchNorm`` accepts only
  accelerator tensors) and inside sliced execution (it is a BatchNorm subclass: graph discovery,
  the running-statistics guard and the importance gate treat it as one). Outside a process group,
  or in eval mode, it is exactly ``nn.BatchNorm``.
* :func:`sum_over_ranks` adds evaluation counts: each rank evaluates its own non-padded part
  of the test set (``data.make_loaders(rank=..., world_size=...)``), where a padded
  ``DistributedSampler`` would count some images twice.
* :func:`broadcast_buffers`: rank 0's BatchNorm running statistics to every rank after training
  (DDP keeps the parameters equal, not the statistics each rank's last forward updated).

A rank that fails raises in its own process; torchrun then stops the others. A rank whose peer
vanished fails in its next collective (gloo and NCCL notice closed connections; the process
group's ``timeout`` bounds the rest) with :class:`DistributedError` naming the step.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import functools
import hashlib
import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Sequence, TypeVar

import torch
import torch.distributed as dist
import torch.nn as nn

if TYPE_CHECKING:
    from .stepping import SteppingNet

__all__ = [
    "PEER_LOST_MESSAGES",
    "DistributedContext",
    "DistributedError",
    "RankDivergenceError",
    "context_from_env",
    "current_context",
    "init_distributed",
    "device_for",
    "shutdown",
    "all_reduce_mean",
    "sum_over_ranks",
    "broadcast_from_main",
    "broadcast_buffers",
    "from_main",
    "assignment_hash",
    "check_same_assignment",
    "wrap_ddp",
    "SyncBatchNorm1d",
    "SyncBatchNorm2d",
    "SyncBatchNormAct2d",
    "convert_sync_batchnorm",
    "distributed_failures",
    "DEFAULT_TIMEOUT_S",
]

logger = logging.getLogger(__name__)

#: seconds a collective may wait for the other ranks before the job fails
DEFAULT_TIMEOUT_S = 600.0

T = TypeVar("T")


class DistributedError(RuntimeError):
    """A collective failed: another rank stopped, or cannot be reached."""


class RankDivergenceError(DistributedError):
    """Ranks hold different neuron assignments (they would train different networks)."""


@dataclass(frozen=True)
class DistributedContext:
    """Where this process stands in a data-parallel job (``world_size == 1``: not distributed)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes checkpoints, reports and results."""
        return self.rank == 0


def _env_int(environ: Mapping[str, str], name: str, default: int) -> int:
    raw = environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(
            f"environment variable {name}={raw!r} is not an integer; torchrun sets it, so launch with "
            "torchrun (or unset it for a single-process run)"
        ) from None


def context_from_env(environ: Mapping[str, str] | None = None) -> DistributedContext:
    """The :class:`DistributedContext` torchrun's environment describes (``RANK``, ``WORLD_SIZE``,
    ``LOCAL_RANK``); a single process when ``WORLD_SIZE`` is unset or 1."""
    env = os.environ if environ is None else environ
    world = _env_int(env, "WORLD_SIZE", 1)
    rank = _env_int(env, "RANK", 0)
    local = _env_int(env, "LOCAL_RANK", rank)
    if world < 1 or not 0 <= rank < world or local < 0:
        raise ValueError(
            f"inconsistent torchrun environment: RANK={rank}, WORLD_SIZE={world}, LOCAL_RANK={local} "
            "(need 0 <= RANK < WORLD_SIZE); launch with torchrun --nproc_per_node=K"
        )
    return DistributedContext(rank=rank, world_size=world, local_rank=local)


def current_context() -> DistributedContext:
    """The context of the process group already initialised in this process (else one process)."""
    if not (dist.is_available() and dist.is_initialized()):
        return DistributedContext()
    env = context_from_env()
    return DistributedContext(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=env.local_rank,
        backend=str(dist.get_backend()),
    )


def init_distributed(device: torch.device | str, timeout_s: float = DEFAULT_TIMEOUT_S) -> DistributedContext:
    """Join torchrun's process group when ``WORLD_SIZE > 1`` (NCCL for CUDA, gloo for CPU).

    Returns the context (``world_size == 1`` and nothing initialised for a plain run). On CUDA the
    process's device is ``cuda:LOCAL_RANK``; pass :func:`device_for` of the result to training.
    """
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be > 0 seconds, got {timeout_s!r}")
    ctx = context_from_env()
    if not ctx.enabled:
        return ctx
    if dist.is_initialized():
        return current_context()
    if not dist.is_available():
        raise DistributedError("this torch build has no torch.distributed; run a single process")
    dev = torch.device(device)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if dev.type == "cuda":
        if ctx.local_rank >= torch.cuda.device_count():
            raise DistributedError(
                f"LOCAL_RANK {ctx.local_rank} but this machine has {torch.cuda.device_count()} GPUs; "
                "start at most one process per GPU (torchrun --nproc_per_node)"
            )
        torch.cuda.set_device(ctx.local_rank)
    try:
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    except (RuntimeError, ValueError) as exc:
        raise DistributedError(
            f"rank {ctx.rank} could not join the process group ({backend}): {exc}. Check MASTER_ADDR/"
            "MASTER_PORT or the --rdzv-endpoint given to torchrun, and that every node can reach it"
        ) from exc
    logger.info("rank %d of %d joined the process group (%s)", ctx.rank, ctx.world_size, backend)
    return DistributedContext(ctx.rank, ctx.world_size, ctx.local_rank, backend)


def device_for(ctx: DistributedContext, device: torch.device) -> torch.device:
    """The device of this rank: ``cuda:LOCAL_RANK`` for a CUDA job, else ``device``."""
    if ctx.enabled and device.type == "cuda":
        return torch.device("cuda", ctx.local_rank)
    return device


def shutdown() -> None:
    """Leave the process group (nothing to do when none was initialised)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _group_active() -> bool:
    """True inside a process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _collective(what: str, fn: Callable[[], T]) -> T:
    try:
        return fn()
    except DistributedError:
        raise
    except RuntimeError as exc:  # gloo/NCCL errors (DistBackendError subclasses RuntimeError)
        rank = dist.get_rank() if dist.is_initialized() else 0
        raise DistributedError(
            f"rank {rank}: {what} failed because another rank stopped or cannot be reached "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); the first "
            "rank that failed logged the cause"
        ) from exc


#: Fragments of the ``RuntimeError`` texts gloo and NCCL raise when a peer of a collective is gone
#: (DDP's buffer broadcast raises them as plain ``RuntimeError``, not ``DistBackendError``).
PEER_LOST_MESSAGES: tuple[str, ...] = (
    "Connection closed by peer",
    "Connection reset by peer",
    "remote worker",
    "Broken pipe",
    "NCCL communicator was aborted",
)


@contextlib.contextmanager
def distributed_failures(what: str) -> Iterator[None]:
    """Turn a communication failure inside the block into :class:`DistributedError` naming
    ``what``: ``torch.distributed.DistBackendError`` (a collective whose peer vanished) and, in a
    data-parallel job, the plain ``RuntimeError`` gloo and NCCL raise from DDP's own buffer
    broadcast when a peer is gone (recognised by :data:`PEER_LOST_MESSAGES`). Other errors pass
    unchanged. Nothing changes without a process group."""
    backend_error: type[BaseException] = getattr(dist, "DistBackendError", DistributedError)
    try:
        yield
    except DistributedError:
        raise
    except RuntimeError as exc:
        text = str(exc)
        lost_peer = _group_active() and any(fragment in text for fragment in PEER_LOST_MESSAGES)
        if not (isinstance(exc, backend_error) or lost_peer):
            raise
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        first = text.splitlines()[0] if text else ""
        raise DistributedError(
            f"rank {rank}: {what} failed because another rank stopped or cannot be reached "
            f"({type(exc).__name__}: {first}); the first rank that failed logged the cause"
        ) from exc


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """The mean of ``tensor`` over all ranks (a new tensor; ``tensor`` itself when not distributed)."""
    if not _group_active():
        return tensor
    out = tensor.detach().clone()
    _collective("averaging importance scores", lambda: dist.all_reduce(out))
    return out.div_(dist.get_world_size())


def sum_over_ranks(values: Sequence[float], device: torch.device | str = "cpu") -> list[float]:
    """Element-wise sum of ``values`` over all ranks (``values`` when not distributed)."""
    if not _group_active():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    _collective("adding evaluation counts", lambda: dist.all_reduce(t))
    return [float(v) for v in t.tolist()]


def broadcast_from_main(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (pickled; the others' ``obj`` is ignored)."""
    if not _group_active():
        return obj
    box = [obj]
    _collective("receiving rank 0's run state", lambda: dist.broadcast_object_list(box, src=0))
    return box[0]


def broadcast_buffers(module: nn.Module) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics, ...) into every rank's ``module``, in place.

    DistributedDataParallel keeps the parameters equal, but each rank's last training forward
    updates its running statistics with its own shard (without ``--sync-bn``), so after training
    the ranks' eval-mode networks differ slightly. Call this after a data-parallel training phase,
    before evaluating or saving: every rank then holds the network rank 0 saves. Nothing happens
    without a process group."""
    if not _group_active():
        return
    for name, buffer in module.named_buffers():
        # gloo cannot broadcast bool tensors; a collective needs a contiguous one
        box = buffer.to(torch.uint8) if buffer.dtype == torch.bool else buffer.contiguous()
        _collective(f"receiving rank 0's buffer {name}", functools.partial(dist.broadcast, box, src=0))
        if box is not buffer:
            with torch.no_grad():
                buffer.copy_(box)


def from_main(read: Callable[[], T], errors: tuple[type[BaseException], ...]) -> T:
    """``read()`` run on rank 0 alone and its result sent to every rank; when it raises one of
    ``errors``, every rank raises that same error (so a bad folder stops the whole job alike).
    Without a process group, just ``read()``."""
    if not _group_active():
        return read()
    outcome: tuple[bool, Any] | None = None
    if dist.get_rank() == 0:
        try:
            outcome = (True, read())
        except errors as exc:
            outcome = (False, exc)
    outcome = broadcast_from_main(outcome)
    assert outcome is not None
    if not outcome[0]:
        raise outcome[1]
    return outcome[1]  # type: ignore[no-any-return]


def assignment_hash(net: SteppingNet) -> str:
    """SHA-256 of the neuron assignment and the pruning masks: equal iff the subnets are equal."""
    digest = hashlib.sha256()
    digest.update(net.flat_assignment().detach().cpu().to(torch.int64).numpy().tobytes())
    for name in sorted(net.prune_masks):
        digest.update(name.encode())
        digest.update(net.prune_masks[name].detach().cpu().to(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def check_same_assignment(net: SteppingNet, where: str) -> str:
    """Gather every rank's :func:`assignment_hash`; raise :class:`RankDivergenceError` when they differ.

    Returns this rank's hash. Every rank raises (they all see the gathered hashes), so the job
    stops as a whole."""
    mine = assignment_hash(net)
    if not _group_active():
        return mine
    hashes: list[Any] = [None] * dist.get_world_size()
    _collective(f"comparing assignments {where}", lambda: dist.all_gather_object(hashes, mine))
    if len(set(hashes)) > 1:
        groups: dict[str, list[int]] = {}
        for rank, value in enumerate(hashes):
            groups.setdefault(str(value), []).append(rank)
        detail = "; ".join(f"ranks {ranks}: {h[:12]}" for h, ranks in groups.items())
        raise RankDivergenceError(
            f"the ranks hold different neuron assignments {where} ({detail}). Every rank must make the "
            "same moves: use the gradient criterion with its scores averaged over ranks (the flow "
            "does this), the same seed and the same recipe on every rank"
        )
    return mine


def wrap_ddp(model: nn.Module, ctx: DistributedContext, device: torch.device) -> nn.Module:
    """``model`` in DistributedDataParallel (``model`` itself when not distributed).

    Rank 0's parameters and buffers are broadcast to the others when the wrapper is built.
    """
    if not ctx.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [device.index if device.index is not None else ctx.local_rank] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=True)


# ---------------------------------------------------------------------------- SyncBatchNorm
def _all_reduce_autograd(tensor: torch.Tensor) -> torch.Tensor:
    from torch.distributed.nn.functional import all_reduce

    return _collective("synchronising BatchNorm statistics", lambda: all_reduce(tensor))


def _sync_batch_norm(bn: nn.BatchNorm1d | nn.BatchNorm2d, x: torch.Tensor) -> torch.Tensor:
    """Training-mode batch norm with the statistics of the global batch (two-pass variance)."""
    dims = [0, *range(2, x.dim())]
    shape = [1, x.shape[1]] + [1] * (x.dim() - 2)
    xf = x.float()
    count = torch.tensor([float(x.numel() // max(x.shape[1], 1))], dtype=torch.float64, device=x.device)
    with torch.no_grad():
        _collective("synchronising BatchNorm sample counts", lambda: dist.all_reduce(count))
    n = float(count.item())
    if n <= 1:
        raise ValueError(
            f"BatchNorm in training mode needs more than one value per channel over all ranks, got {n:g}; "
            "use a larger batch"
        )
    mean = _all_reduce_autograd(xf.sum(dims)) / n
    centred = xf - mean.reshape(shape)
    var = _all_reduce_autograd((centred * centred).sum(dims)) / n
    y = centred * torch.rsqrt(var + bn.eps).reshape(shape)
    if bn.weight is not None:
        y = y * bn.weight.reshape(shape)
    if bn.bias is not None:
        y = y + bn.bias.reshape(shape)
    if bn.track_running_stats and bn.running_mean is not None and bn.running_var is not None:
        with torch.no_grad():
            if bn.num_batches_tracked is not None:
                bn.num_batches_tracked.add_(1)
            momentum = (
                1.0 / float(bn.num_batches_tracked)
                if bn.momentum is None and bn.num_batches_tracked is not None
                else float(bn.momentum or 0.0)
            )
            bn.running_mean.mul_(1 - momentum).add_(mean.detach().to(bn.running_mean.dtype), alpha=momentum)
            unbiased = var.detach() * (n / (n - 1))
            bn.running_var.mul_(1 - momentum).add_(unbiased.to(bn.running_var.dtype), alpha=momentum)
    return y.to(x.dtype)


def _synchronised(bn: nn.Module) -> bool:
    return bool(bn.training) and _group_active()


class SyncBatchNorm1d(nn.BatchNorm1d):
    """``nn.BatchNorm1d`` whose training statistics come from every rank's batch (any device)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not _synchronised(self):
            return super().forward(input)
        return _sync_batch_norm(self, input)


class SyncBatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` whose training statistics come from every rank's batch (any device)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not _synchronised(self):
            return super().forward(input)
        return _sync_batch_norm(self, input)


def _batchnorm_act_type() -> type[nn.Module] | None:
    """timm's ``BatchNormAct2d`` (None when timm is not installed)."""
    try:
        from timm.layers.norm_act import BatchNormAct2d
    except ImportError:
        return None
    return BatchNormAct2d  # type: ignore[no-any-return]


def _make_sync_batchnorm_act() -> type[nn.Module] | None:
    base = _batchnorm_act_type()
    if base is None:
        return None

    class _SyncBatchNormAct2d(base):  # type: ignore[misc, valid-type]
        """timm's ``BatchNormAct2d`` (BatchNorm, then its ``drop`` and ``act``) whose training
        statistics come from every rank's batch; outside a process group, or in eval mode, it is
        exactly ``BatchNormAct2d``."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if not _synchronised(self):
                return super().forward(x)  # type: ignore[no-any-return]
            if x.ndim != 4:
                raise ValueError(f"{type(self).__name__} expects a 4D input (N, C, H, W), got {x.ndim}D")
            return self.act(self.drop(_sync_batch_norm(self, x)))  # type: ignore[no-any-return]

    _SyncBatchNormAct2d.__name__ = _SyncBatchNormAct2d.__qualname__ = "SyncBatchNormAct2d"
    _SyncBatchNormAct2d.__module__ = __name__
    return _SyncBatchNormAct2d


#: timm's ``BatchNormAct2d`` with global-batch statistics (None when timm is not installed);
#: :func:`convert_sync_batchnorm` builds it from a ``BatchNormAct2d``, keeping its ``act``/``drop``.
SyncBatchNormAct2d: type[nn.Module] | None = _make_sync_batchnorm_act()


def _as_subclass(module: nn.Module, cls: type[nn.Module]) -> nn.Module:
    """A ``cls`` instance holding ``module``'s attributes, parameters, buffers and submodules
    (the same tensors: ``cls`` subclasses ``type(module)`` and only changes ``forward``)."""
    new = cls.__new__(cls)
    new.__dict__.update({k: copy.copy(v) if isinstance(v, dict) else v for k, v in module.__dict__.items()})
    return new


def convert_sync_batchnorm(model: nn.Module) -> nn.Module:
    """Replace every ``BatchNorm1d``/``BatchNorm2d`` of ``model`` (in place) by its synchronised
    version, keeping parameters, buffers and state-dict keys; returns ``model``.

    timm's ``BatchNormAct2d`` (BatchNorm followed by its activation and dropout) becomes
    :data:`SyncBatchNormAct2d`, which keeps its ``act`` and ``drop`` modules and the same
    parameter and buffer tensors. Other BatchNorm subclasses keep per-rank statistics (logged).
    Call it before wrapping the model in a SteppingNet (which records its modules)."""
    if type(model) in (nn.BatchNorm1d, nn.BatchNorm2d):
        raise ValueError("convert_sync_batchnorm needs a model holding BatchNorm layers, not a BatchNorm itself")
    bn_act = _batchnorm_act_type()
    if bn_act is not None and type(model) is bn_act:
        raise ValueError("convert_sync_batchnorm needs a model holding BatchNorm layers, not a BatchNormAct2d itself")
    replaced = 0
    skipped: list[str] = []
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if bn_act is not None and SyncBatchNormAct2d is not None and type(child) is bn_act:
                setattr(parent, name, _as_subclass(child, SyncBatchNormAct2d))
                replaced += 1
                continue
            kind: type[nn.Module] | None = None
            if type(child) is nn.BatchNorm2d:
                kind = SyncBatchNorm2d
            elif type(child) is nn.BatchNorm1d:
                kind = SyncBatchNorm1d
            if kind is None:
                synced = (SyncBatchNorm1d, SyncBatchNorm2d) + ((SyncBatchNormAct2d,) if SyncBatchNormAct2d else ())
                if isinstance(child, nn.modules.batchnorm._BatchNorm) and not isinstance(child, synced):
                    skipped.append(f"{name} ({type(child).__name__})")
                continue
            assert isinstance(child, (nn.BatchNorm1d, nn.BatchNorm2d))
            new = kind(
                child.num_features,
                eps=child.eps,
                momentum=child.momentum,
                affine=child.affine,
                track_running_stats=child.track_running_stats,
            )
            new.load_state_dict(child.state_dict())
            new.train(child.training)
            p = next(iter(child.parameters()), None)
            if p is not None:
                new.to(p.device)
            setattr(parent, name, new)
            replaced += 1
    logger.info("SyncBatchNorm: %d BatchNorm layers synchronised", replaced)
    if skipped:
        logger.warning(
            "SyncBatchNorm: %d BatchNorm subclasses keep per-rank statistics (only BatchNorm1d/2d and "
            "timm's BatchNormAct2d are converted): %s",
            len(skipped),
            ", ".join(skipped[:6]),
        )
    return model
