"""Data-parallel plumbing shared by the commands (``run``, ``compare``, ``ablate``, the NNI trial).

The library (:mod:`nni_steppingnet.distributed`) gives the collectives; this module holds what the
application layer does with them in every command, so that the flow and the comparison do it the
same way:

* :func:`launch`: a command's body under torchrun (join the process group, torchrun's failure
  record, leave the group), or as it is without torchrun;
* :func:`global_accuracies`: accuracies over the whole test set from every rank's part;
* :func:`whole_test_loader`: the whole test set again (for rank 0's timings);
* :func:`seed_epoch`: the per-epoch batch order (``DistributedSampler.set_epoch`` or the loader's
  generator), so that epoch ``e`` sees the same batches however the job was started;
* :func:`on_main`: a write done by rank 0 alone while the others wait for it (and get its error);
* :func:`check_same_weights`: every rank holds rank 0's weights after data-parallel training;
  :func:`settle_weights`: rank 0's BatchNorm statistics to every rank first, then that check.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any, Callable, Sequence, TypeVar

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset, Subset
from torch.utils.data.distributed import DistributedSampler

from ..distributed import (
    DEFAULT_TIMEOUT_S,
    DistributedContext,
    RankDivergenceError,
    broadcast_buffers,
    broadcast_from_main,
    context_from_env,
    from_main,
    init_distributed,
    shutdown,
    sum_over_ranks,
)

__all__ = [
    "launch",
    "global_accuracies",
    "whole_test_loader",
    "seed_epoch",
    "on_main",
    "weights_hash",
    "check_same_weights",
    "settle_weights",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")


def launch(
    body: Callable[[DistributedContext | None], int], device: torch.device, timeout_s: float | None = None
) -> int:
    """``body(ctx)`` under torchrun (``WORLD_SIZE > 1``): every rank joins the process group for
    ``device`` (resolved: ``flow.resolve_device``) (gloo on CPU, NCCL on CUDA), runs ``body`` inside torchrun's error ``record`` (its
    failure summary then shows the failing rank's traceback) and leaves the group. Without
    torchrun, ``body(None)``. Returns ``body``'s exit status."""
    if not context_from_env().enabled:
        return body(None)
    from torch.distributed.elastic.multiprocessing.errors import record

    timeout = DEFAULT_TIMEOUT_S if timeout_s is None else timeout_s
    ctx = init_distributed(device, timeout_s=timeout)
    try:
        status = record(body)(ctx)
        return 1 if status is None else int(status)
    finally:
        shutdown()


def global_accuracies(
    local: Sequence[float], test_loader: DataLoader, ctx: DistributedContext, device: torch.device | str = "cpu"
) -> list[float]:
    """Accuracies over the whole test set from this rank's accuracies ``local`` on its part
    (``test_loader``, the part ``data.make_loaders(rank=, world_size=)`` gives): the correct
    counts of every rank are added. ``local`` itself without a data-parallel job."""
    if not ctx.enabled:
        return list(local)
    count = len(test_loader.dataset)  # type: ignore[arg-type]
    totals = sum_over_ranks([round(a * count) for a in local] + [count], device)
    if totals[-1] == 0:
        raise ValueError("the test set is empty; give the recipe a dataset with test images")
    return [t / totals[-1] for t in totals[:-1]]


def whole_test_loader(test_loader: DataLoader, ctx: DistributedContext) -> DataLoader:
    """The whole test set (rank 0's anytime measurement), not this rank's part of it."""
    dataset: Dataset[Any] = test_loader.dataset
    if not ctx.enabled or not isinstance(dataset, Subset):
        return test_loader
    return DataLoader(
        dataset.dataset,
        batch_size=test_loader.batch_size,
        shuffle=False,
        num_workers=0,
        pin_memory=test_loader.pin_memory,
    )


def seed_epoch(loader: Any, seed: int) -> None:
    """Fix the batch order of the next pass over ``loader``: ``set_epoch(seed)`` of its
    ``DistributedSampler`` (one permutation shared by every rank), else ``manual_seed(seed)`` of
    its generator; nothing for a loader with neither."""
    sampler = getattr(loader, "sampler", None)
    generator = getattr(loader, "generator", None)
    if isinstance(sampler, DistributedSampler):
        sampler.set_epoch(seed)
    elif isinstance(generator, torch.Generator):
        generator.manual_seed(seed)


def on_main(ctx: DistributedContext, write: Callable[[], T], errors: tuple[type[BaseException], ...] = (OSError,)) -> T:
    """``write()`` on rank 0 alone; the other ranks wait for it and get its result, or raise the
    same error when it raised one of ``errors`` (so a full disk stops the whole job alike).
    Without a data-parallel job, just ``write()``."""
    if not ctx.enabled:
        return write()
    return from_main(write, errors)


def _tensor_digests(model: nn.Module) -> dict[str, str]:
    """SHA-256 of every state-dict entry of ``model`` (dtype and values), by name."""
    digests: dict[str, str] = {}
    for name, value in model.state_dict().items():
        tensor = value.detach().cpu().contiguous().reshape(-1)
        digest = hashlib.sha256(str(tensor.dtype).encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
        digests[name] = digest.hexdigest()
    return digests


def _combined(digests: dict[str, str]) -> str:
    digest = hashlib.sha256()
    for name in sorted(digests):
        digest.update(name.encode())
        digest.update(digests[name].encode())
    return digest.hexdigest()


def weights_hash(model: nn.Module) -> str:
    """SHA-256 of ``model``'s state dict (names, dtypes and values): equal iff the weights are."""
    return _combined(_tensor_digests(model))


def check_same_weights(model: nn.Module, ctx: DistributedContext, where: str) -> str:
    """This rank's :func:`weights_hash` of ``model`` after checking that every rank holds rank 0's
    weights; every rank raises :class:`~nni_steppingnet.distributed.RankDivergenceError` otherwise
    (a rank that differs names its first differing tensors)."""
    mine = _tensor_digests(model)
    if not ctx.enabled:
        return _combined(mine)
    main: dict[str, str] = broadcast_from_main(mine)
    differ = sorted(name for name in set(mine) | set(main) if mine.get(name) != main.get(name))
    count = int(sum_over_ranks([float(bool(differ))])[0])
    if count:
        here = f"; on rank {ctx.rank}: {', '.join(differ[:5])}" if differ else ""
        raise RankDivergenceError(
            f"{count} rank(s) hold weights that differ from rank 0's {where}{here}. Every rank must "
            "train through the same DistributedDataParallel wrapper, with the same seed, recipe and "
            "number of batches"
        )
    return _combined(mine)


def settle_weights(model: nn.Module, ctx: DistributedContext, where: str) -> str:
    """After a data-parallel training phase: rank 0's buffers (BatchNorm running statistics, which
    each rank updated with its own shard) copied to every rank, then :func:`check_same_weights`.
    Every rank then evaluates the network rank 0 saves. Returns the :func:`weights_hash`."""
    broadcast_buffers(model)
    return check_same_weights(model, ctx, where)
