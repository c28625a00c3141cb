"""Overhead of SteppingNet's masked forward+backward on the CPU.

(a) Masking machinery: subnet N of a freshly wrapped net (every neuron in subnet 1, so every
    weight is active) against ``net.plain_copy()``, the same architecture and weights without
    masks. Target: at most 1.3x.
(b) Informative: masked subnet s of a budget-like random assignment (channel fractions
    0.5/0.71/0.87/1.0, i.e. about 25/50/75/100% of the MACs) against ``net.export_subnet(s)``
    run dense: what a physically smaller model saves (why export and the runtime exist).

Each measurement is one training step (forward, cross-entropy, backward, ``zero_grad``) at batch
128 and 32x32 inputs. The two sides run alternately (ABBA order) in every repeat; the table shows
the medians of >= 5 repeats and the median of the per-repeat ratios.

Usage::

    python benchmarks/mask_overhead.py --repeats 9 --threads 1 --clock thread   # shared machine
    python benchmarks/mask_overhead.py --repeats 9 --threads 1,2                # wall clock
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

import nni_steppingnet.models  # noqa: F401  (registers lenet5)
from nni_steppingnet import SteppingNet
from nni_steppingnet.testing import fraction_assignment

__all__ = ["measure_pair", "budget_assignment", "main"]

RESULTS = Path(__file__).resolve().parent / "results" / "mask_overhead.json"
NUM_SUBNETS = 4
#: Cumulative channel fraction per subnet; MACs scale roughly with its square (25/50/75/100%).
CHANNEL_FRACTIONS = (0.5, 0.71, 0.87, 1.0)


def _step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()


#: ``wall``: time.perf_counter; ``thread``: CPU time of the calling thread, which with one torch
#: thread is all the compute and excludes the time other jobs on a shared machine take the core.
CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "thread": time.thread_time}


def _timed(fn: Callable[[], None], iters: int, clock: Callable[[], float]) -> float:
    start = clock()
    for _ in range(iters):
        fn()
    return (clock() - start) / iters


def measure_pair(
    a: Callable[[], None], b: Callable[[], None], repeats: int, min_seconds: float = 0.3, clock: str = "wall"
) -> dict[str, Any]:
    """Alternate ``a`` and ``b`` (ABBA), return per-step medians and the median ratio a/b."""
    if clock not in CLOCKS:
        raise ValueError(f"clock must be one of {sorted(CLOCKS)}, got {clock!r}")
    tick = CLOCKS[clock]
    for _ in range(2):  # warm-up: allocator, mask caches, oneDNN primitives
        a()
        b()
    single = max(_timed(b, 1, tick), 1e-6)
    iters = max(1, math.ceil(min_seconds / single))
    times_a, times_b = [], []
    for r in range(repeats):
        if r % 2 == 0:
            times_a.append(_timed(a, iters, tick))
            times_b.append(_timed(b, iters, tick))
        else:
            times_b.append(_timed(b, iters, tick))
            times_a.append(_timed(a, iters, tick))
    ratios = [ta / tb for ta, tb in zip(times_a, times_b)]
    return {
        "iters_per_repeat": iters,
        "a_median_s": statistics.median(times_a),
        "b_median_s": statistics.median(times_b),
        "ratio_of_medians": statistics.median(times_a) / statistics.median(times_b),
        "median_ratio": statistics.median(ratios),
        "ratios": [round(v, 4) for v in ratios],
    }


def budget_assignment(net: SteppingNet, seed: int) -> None:
    """Random per-neuron indices with cumulative channel fractions ``CHANNEL_FRACTIONS``
    (:func:`nni_steppingnet.testing.fraction_assignment`)."""
    fraction_assignment(net, CHANNEL_FRACTIONS, seed)


def _model(name: str) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, num_classes=10)


def run_model(name: str, batch: int, img: int, repeats: int, clock: str = "wall") -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, img, img, generator=generator)
    y = torch.randint(0, 10, (batch,), generator=generator)

    # (a) all weights active: the masking machinery alone.
    net = SteppingNet(_model(name), x[:2], NUM_SUBNETS)
    plain = net.plain_copy()
    net.model.train()
    plain.train()
    with torch.no_grad(), net.subnet(NUM_SUBNETS):
        same = torch.equal(net.model(x[:4]), plain(x[:4]))

    def masked_full() -> None:
        with net.subnet(NUM_SUBNETS):
            _step(net.model, x, y)

    result = measure_pair(masked_full, lambda: _step(plain, x, y), repeats, clock=clock)
    rows.append(
        {
            "model": name,
            "case": "a",
            "subnet": NUM_SUBNETS,
            "mac_fraction": 1.0,
            "versus": "plain_copy",
            "outputs_equal": same,
            **result,
        }
    )

    # (b) budget-like subnets: masked vs exported dense.
    net.remove()
    net = SteppingNet(_model(name), x[:2], NUM_SUBNETS)
    budget_assignment(net, seed=1)
    net.model.train()
    for s in range(1, NUM_SUBNETS):
        exported = net.export_subnet(s)
        exported.train()

        def masked_s(s: int = s) -> None:
            with net.subnet(s):
                _step(net.model, x, y)

        result = measure_pair(masked_s, lambda exported=exported: _step(exported, x, y), repeats, clock=clock)
        rows.append(
            {
                "model": name,
                "case": "b",
                "subnet": s,
                "mac_fraction": round(net.macs(s) / net.full_macs, 4),
                "versus": "export_subnet",
                **result,
            }
        )
    return rows


def _write_json(path: Path, payload: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(payload, handle, indent=1)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; results are for everyone to read
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _table(rows: Sequence[dict[str, Any]]) -> str:
    lines = [
        f"{'threads':>7s} {'model':10s} {'case':4s} {'s':>2s} {'MACs':>6s} {'masked ms':>10s} "
        f"{'other ms':>9s} {'other':14s} {'ratio':>6s} {'median r':>8s}"
    ]
    for r in rows:
        lines.append(
            f"{r['threads']:>7d} {r['model']:10s} {r['case']:4s} {r['subnet']:>2d} "
            f"{100 * r['mac_fraction']:5.1f}% {1000 * r['a_median_s']:10.1f} "
            f"{1000 * r['b_median_s']:9.1f} {r['versus']:14s} {r['ratio_of_medians']:6.3f} "
            f"{r['median_ratio']:8.3f}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="lenet5,resnet18")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--img-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=7, help="alternating repeats per pair (>= 5)")
    parser.add_argument("--threads", default="1", help="comma-separated torch thread counts to run")
    parser.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="wall",
        help="thread: CPU time of the calling thread (only with --threads 1)",
    )
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.repeats < 5:
        parser.error("--repeats must be at least 5 (medians of fewer repeats are noise)")
    threads = [int(t) for t in args.threads.split(",") if t]
    if not threads or min(threads) < 1:
        parser.error("--threads must list positive integers, e.g. 1,2")
    if args.clock == "thread" and threads != [1]:
        parser.error("--clock thread measures one thread's CPU time: use it with --threads 1")
    rows: list[dict[str, Any]] = []
    for t in threads:
        torch.set_num_threads(t)
        for name in [m for m in args.models.split(",") if m]:
            print(f"measuring {name} with {t} thread(s) ...", file=sys.stderr, flush=True)
            for row in run_model(name, args.batch, args.img_size, args.repeats, args.clock):
                row["threads"] = t
                row["clock"] = args.clock
                rows.append(row)
    payload = {
        "versions": {"torch": torch.__version__, "timm": timm.__version__},
        "settings": {
            "batch": args.batch,
            "img_size": args.img_size,
            "repeats": args.repeats,
            "num_subnets": NUM_SUBNETS,
            "channel_fractions": CHANNEL_FRACTIONS,
            "device": "cpu",
            "cpu_count": os.cpu_count(),
            "clock": args.clock,
        },
        "rows": rows,
    }
    _write_json(args.output, payload)
    print(_table(rows))
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
