"""The address-space ceiling around torch-pruning's tracer (nni_steppingnet._memory)."""

from __future__ import annotations

import sys

import pytest
import torch

from nni_steppingnet._memory import address_space_ceiling

pytestmark = pytest.mark.skipif(
    sys.platform != "linux" or torch.cuda.is_initialized(), reason="the ceiling acts on Linux without CUDA only"
)


def _available() -> int:
    for line in open("/proc/meminfo").read().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    pytest.skip("no MemAvailable in /proc/meminfo")


def test_an_allocation_past_the_ceiling_raises_memory_error_and_the_limit_is_restored() -> None:
    import resource

    before = resource.getrlimit(resource.RLIMIT_AS)
    if before[0] != resource.RLIM_INFINITY:
        pytest.skip("an address-space limit is already set; the ceiling would leave it alone")
    with pytest.raises(MemoryError):
        with address_space_ceiling(0.25):
            bytearray(_available())  # twice the headroom: refused before a page is touched
    assert resource.getrlimit(resource.RLIMIT_AS) == before
    assert len(bytearray(1 << 20)) == 1 << 20


def test_a_bad_fraction_is_refused() -> None:
    with pytest.raises(ValueError, match="fraction"):
        with address_space_ceiling(0.0):
            pass
