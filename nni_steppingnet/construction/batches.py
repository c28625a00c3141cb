"""The construction loop's data and randomness: a seeded, resumable batch stream and the global
RNG state saved in construction checkpoints."""

from __future__ import annotations

import logging
import random
from typing import Any, Iterable, Iterator, Mapping

import numpy as np
import torch
from torch.utils.data.distributed import DistributedSampler

__all__ = ["BatchStream", "rng_state", "set_rng_state"]

logger = logging.getLogger(__name__)


class BatchStream:
    """An endless, seeded, resumable stream of batches over a loader.

    Epoch ``e`` is shuffled by reseeding the loader's generator (and a ``RandomSampler``'s own
    generator) with ``seed + e``; the iterator is created, and its first batch drawn, under a
    forked CPU RNG seeded with ``seed + e`` so that neither depends on (nor changes) the global RNG.
    The position ``(epoch, batch)`` resumes exactly: reopening epoch ``e`` skips ``batch`` batches.
    With persistent DataLoader workers the workers' own augmentation RNG is not part of the state.
    A ``DistributedSampler`` gets ``set_epoch(seed + e)``, so the ranks of a data-parallel job
    read disjoint shards of one permutation per epoch.
    """

    def __init__(self, loader: Iterable[Any], seed: int) -> None:
        self.loader = loader
        self.seed = int(seed)
        self.epoch = 0
        self.batch = 0
        self._iter: Iterator[Any] | None = None
        self._pending: list[Any] = []

    def _reseed(self, epoch_seed: int) -> None:
        generator = getattr(self.loader, "generator", None)
        if isinstance(generator, torch.Generator):
            generator.manual_seed(epoch_seed)
        sampler = getattr(self.loader, "sampler", None)
        sampler_gen = getattr(sampler, "generator", None)
        if isinstance(sampler_gen, torch.Generator) and sampler_gen is not generator:
            sampler_gen.manual_seed(epoch_seed)
        if isinstance(sampler, DistributedSampler):
            # Every rank shuffles with the same epoch seed and reads its own shard of it.
            sampler.set_epoch(epoch_seed)

    def _open(self) -> None:
        """Open the iterator of ``self.epoch`` positioned at ``self.batch``."""
        for _ in range(2):
            epoch_seed = self.seed + self.epoch
            with torch.random.fork_rng(devices=[]):
                torch.default_generator.manual_seed(epoch_seed)
                self._reseed(epoch_seed)
                iterator = iter(self.loader)
                self._pending = []
                try:
                    for _ in range(self.batch):
                        next(iterator)
                    if self.batch == 0:
                        # The sampler draws its seed lazily: draw the first batch in the fork too.
                        self._pending = [next(iterator)]
                except StopIteration:
                    if self.batch == 0:
                        raise ValueError(
                            "train_loader yielded no batches; give it a non-empty "
                            "dataset (and drop_last=False for small datasets)"
                        ) from None
                    self.epoch += 1
                    self.batch = 0
                    continue
            self._iter = iterator
            return
        raise RuntimeError("unreachable")  # pragma: no cover

    def next(self) -> Any:
        if self._iter is None:
            self._open()
        assert self._iter is not None
        if self._pending:
            item = self._pending.pop()
        else:
            try:
                item = next(self._iter)
            except StopIteration:
                self.epoch += 1
                self.batch = 0
                self._open()
                item = self._pending.pop()
        self.batch += 1
        return item

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batch": self.batch, "seed": self.seed}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self.epoch = int(state["epoch"])
        self.batch = int(state["batch"])
        self._iter = None
        self._pending = []


def rng_state() -> dict[str, Any]:
    """Python's, numpy's and torch's global RNG states, in the form construction checkpoints
    store (numpy's key as a tensor, tuples as lists)."""
    np_state: Any = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": _to_lists(random.getstate()),
        "numpy": [
            str(np_state[0]),
            torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            int(np_state[2]),
            int(np_state[3]),
            float(np_state[4]),
        ],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _to_lists(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_to_lists(v) for v in value]
    return value


def _to_tuples(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_to_tuples(v) for v in value)
    return value


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore a :func:`rng_state`."""
    torch.set_rng_state(state["torch"])
    random.setstate(_to_tuples(state["python"]))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), int(pos), int(has_gauss), float(cached)))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
