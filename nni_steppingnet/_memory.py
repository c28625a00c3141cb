"""A ceiling on the process's address space while torch-pruning traces a model.

torch-pruning 1.6 maps channel indices through every reshape it traces. A chain of them (MaxViT's
window and grid partitions, NesT's blocks) multiplies the indices at each step, so the index
lists can grow until the machine's memory is gone. The kernel's OOM killer then ends the whole
process, the user's included. NesT and SAM2's Hiera were killed that way in the timm sweep.

Within :func:`address_space_ceiling`, an allocation beyond half the memory available when it was
entered raises ``MemoryError`` instead, which the caller turns into a refusal by name. Half
leaves the rest of the machine its memory, and the tracer of a model it supports needs far less.
NesT at 64x64 took 5 minutes to fail at 90% of 23 GB. It is
Linux only, and a no-op once CUDA is initialised (CUDA reserves far more address space than it
uses) or when a tighter limit is already set.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Iterator

import torch

__all__ = ["address_space_ceiling"]


def _meminfo_bytes(field: str) -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _address_space_bytes() -> int | None:
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    import resource

    return pages * resource.getpagesize()


@contextlib.contextmanager
def address_space_ceiling(fraction: float = 0.5) -> Iterator[None]:
    """Within the context, the process may grow its address space by ``fraction`` of the memory
    available on entry; an allocation beyond it raises ``MemoryError``."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")
    if sys.platform != "linux" or torch.cuda.is_initialized():
        yield
        return
    import resource

    available, current = _meminfo_bytes("MemAvailable"), _address_space_bytes()
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    if available is None or current is None:
        yield
        return
    ceiling = current + int(available * fraction)
    if hard != resource.RLIM_INFINITY:
        ceiling = min(ceiling, hard)
    if soft != resource.RLIM_INFINITY and soft <= ceiling:
        yield  # a tighter limit is already in place
        return
    resource.setrlimit(resource.RLIMIT_AS, (ceiling, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
