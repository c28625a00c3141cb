"""Training cost of a subnet: sliced execution against masks and against the exported dense subnet.

For every model, a random nested assignment keeps 30/50/70/90% of every neuron group in subnets
1-4 (``nni_steppingnet.sliced.nested_assignment``). Per subnet ``s`` one *train step* (forward,
cross-entropy, backward, SGD step with momentum and weight decay) at batch 128 on 32x32 inputs is
timed three ways, alternating in every repeat (A B C C B A):

* ``sliced``: ``with net.subnet(s)`` on the wrapped model, ``execution="sliced"``;
* ``masked``: the same net inside ``net.masked_execution()`` (every layer at full width);
* ``dense``: ``net.export_subnet(s)``, the physically smaller model torch-pruning builds.

The table gives medians over the repeats and the medians of the per-repeat ratios
``sliced / dense`` (target <= 1.1) and ``masked / sliced``. Then one construction iteration
(``Constructor.step()`` with ``--batches`` batches per subnet) is timed masked and sliced from
the same start.

Usage::

    nice -n 10 python benchmarks/train_cost.py --threads 2 --repeats 5
    nice -n 10 python benchmarks/train_cost.py --threads 1 --clock thread --repeats 3   # shared machine
    python benchmarks/train_cost.py --models lenet5 --repeats 3 --batch 32    # quick look

Writes ``benchmarks/results/train_cost.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

import nni_steppingnet.models  # noqa: F401  (registers the paper models with timm)
from nni_steppingnet import SteppingNet
from nni_steppingnet.construction.loop import ConstructionConfig, Constructor
from nni_steppingnet.sliced import nested_assignment
from nni_steppingnet.train import make_optimizer

__all__ = ["MODELS", "EXTRA_MODELS", "main"]

RESULTS = Path(__file__).resolve().parent / "results" / "train_cost.json"
NUM_SUBNETS = 4
FRACTIONS = (0.3, 0.5, 0.7, 0.9)
#: (timm name, create_model kwargs)
MODELS: dict[str, dict[str, Any]] = {
    "lenet3c1l": {"width": 1.8},
    "lenet5": {},
    "vgg16_cifar": {},
    "resnet18": {},
    "mobilenetv3_small_100": {},
}
#: Models with nested norms and attention heads, run only when named in ``--models``: a small ViT
#: (patch 8 at 32x32, 2 blocks, 3 heads of 16), ConvNeXt-atto, a two-stage Swin (windows of 4x4
#: tokens, shifted in every second block, patch merging) and a small TinyViT (interleaved heads);
#: and two families whose blocks split by widths stored at construction (InceptionNeXt, FasterNet).
EXTRA_MODELS: dict[str, dict[str, Any]] = {
    "vit_tiny_patch16_224": {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 48, "num_heads": 3},
    "convnext_atto": {},
    "swin_tiny_patch4_window7_224": {
        "img_size": 32,
        "embed_dim": 48,
        "depths": (2, 2),
        "num_heads": (3, 6),
        "window_size": 4,
    },
    "tiny_vit_5m_224": {"embed_dims": (32, 64, 96, 128), "depths": (1, 1, 2, 1), "num_heads": (1, 2, 3, 4)},
    # blocks that split by widths stored at construction (fixed_splits.py)
    "inception_next_atto": {},
    "fasternet_t0": {},
}


def _train_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, context: Callable[[], Any]
) -> None:
    optimizer.zero_grad(set_to_none=True)
    with context():
        loss = F.cross_entropy(model(x), y)
    loss.backward()
    optimizer.step()


#: ``wall``: time.perf_counter; ``thread``: CPU time of the calling thread, which with one torch
#: thread is all the compute and excludes the time other jobs on a shared machine take the core.
CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "thread": time.thread_time}


def _time(fn: Callable[[], None], iters: int, clock: Callable[[], float]) -> float:
    start = clock()
    for _ in range(iters):
        fn()
    return (clock() - start) / iters


def _wrap(name: str, execution: str, seed: int = 0) -> SteppingNet:
    torch.manual_seed(seed)
    model = timm.create_model(name, num_classes=10, **{**MODELS, **EXTRA_MODELS}[name])
    net = SteppingNet(model, torch.randn(2, 3, 32, 32), NUM_SUBNETS, execution=execution)
    net.set_flat_assignment(nested_assignment(net, seed=seed, fractions=FRACTIONS))
    return net


def _runs(
    net: SteppingNet,
    dense: nn.Module,
    s: int,
    x: torch.Tensor,
    y: torch.Tensor,
    opt_net: torch.optim.Optimizer,
    opt_dense: torch.optim.Optimizer,
) -> dict[str, Callable[[], None]]:
    def masked_ctx() -> Any:
        stack = contextlib.ExitStack()
        stack.enter_context(net.masked_execution())
        stack.enter_context(net.subnet(s))
        return stack

    return {
        "sliced": lambda: _train_step(net.model, opt_net, x, y, lambda: net.subnet(s)),
        "masked": lambda: _train_step(net.model, opt_net, x, y, masked_ctx),
        "dense": lambda: _train_step(dense, opt_dense, x, y, contextlib.nullcontext),
    }


def measure_steps(name: str, batch: int, repeats: int, iters: int, clock: Callable[[], float]) -> list[dict[str, Any]]:
    net = _wrap(name, "sliced")
    net.model.train()
    x = torch.randn(batch, 3, 32, 32)
    y = torch.randint(0, 10, (batch,))
    rows = []
    for s in range(1, NUM_SUBNETS + 1):
        dense = net.export_subnet(s).train()
        # the library's optimizer (what the flow trains with)
        sgd = lambda params: make_optimizer(params, lr=1e-3, momentum=0.9, weight_decay=5e-4)  # noqa: E731

        runs = _runs(net, dense, s, x, y, sgd(net.model.parameters()), sgd(dense.parameters()))
        for fn in runs.values():
            fn()  # warm-up (plans, allocator)
        times: dict[str, list[float]] = {k: [] for k in runs}
        order = ["sliced", "masked", "dense"]
        for r in range(repeats):
            for key in order if r % 2 == 0 else order[::-1]:
                times[key].append(_time(runs[key], iters, clock))
        ratio_dense = statistics.median(a / b for a, b in zip(times["sliced"], times["dense"]))
        ratio_masked = statistics.median(a / b for a, b in zip(times["masked"], times["sliced"]))
        rows.append(
            {
                "model": name,
                "subnet": s,
                "mac_fraction": net.macs(s) / net.full_macs,
                "sliced_s": statistics.median(times["sliced"]),
                "masked_s": statistics.median(times["masked"]),
                "dense_s": statistics.median(times["dense"]),
                "sliced_over_dense": ratio_dense,
                "masked_over_sliced": ratio_masked,
            }
        )
        print(
            f"{name:22s} s={s} MACs {100 * rows[-1]['mac_fraction']:5.1f}%  sliced "
            f"{rows[-1]['sliced_s'] * 1e3:8.1f} ms  masked {rows[-1]['masked_s'] * 1e3:8.1f} ms  dense "
            f"{rows[-1]['dense_s'] * 1e3:8.1f} ms  sliced/dense {ratio_dense:5.2f}  masked/sliced "
            f"{ratio_masked:5.2f}",
            flush=True,
        )
    return rows


def measure_construction(
    name: str, batch: int, batches: int, repeats: int, clock: Callable[[], float]
) -> dict[str, Any]:
    """One construction iteration (``batches`` batches per subnet, importance, moves), masked and
    sliced, each from a fresh copy of the same start."""
    generator = torch.Generator().manual_seed(1)
    data = [
        (torch.randn(batch, 3, 32, 32, generator=generator), torch.randint(0, 10, (batch,), generator=generator))
        for _ in range(batches)
    ]
    times: dict[str, list[float]] = {"masked": [], "sliced": []}
    order = ["sliced", "masked"]
    for r in range(repeats):
        for execution in order if r % 2 == 0 else order[::-1]:
            net = _wrap(name, execution)
            config = ConstructionConfig(
                budgets=[0.05, 0.15, 0.3, 0.5],
                reference_macs=net.full_macs,
                batches_per_iteration=batches,
                iterations=50,
                prune_threshold=0.0,
            )
            constructor = Constructor(net, config, data)
            start = clock()
            constructor.step()
            times[execution].append(clock() - start)
    result = {
        "model": name,
        "batches_per_subnet": batches,
        "masked_s": statistics.median(times["masked"]),
        "sliced_s": statistics.median(times["sliced"]),
        "masked_over_sliced": statistics.median(a / b for a, b in zip(times["masked"], times["sliced"])),
    }
    print(
        f"{name:22s} construction iteration ({batches} batches/subnet): masked {result['masked_s']:.2f} s  "
        f"sliced {result['sliced_s']:.2f} s  masked/sliced {result['masked_over_sliced']:.2f}",
        flush=True,
    )
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--models",
        default=",".join(MODELS),
        help="comma-separated subset of " + ", ".join([*MODELS, *EXTRA_MODELS]) + f" (default: {', '.join(MODELS)})",
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="wall",
        help="thread: CPU time of the main thread (use with --threads 1 on a shared machine)",
    )
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--iters", type=int, default=1, help="train steps per timing")
    parser.add_argument("--construction-batches", type=int, default=2)
    parser.add_argument("--construction-repeats", type=int, default=3, help="0: skip the construction timing")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    names = [n for n in args.models.split(",") if n]
    unknown = [n for n in names if n not in MODELS and n not in EXTRA_MODELS]
    if unknown:
        parser.error(f"unknown models {unknown}; choose from {', '.join([*MODELS, *EXTRA_MODELS])}")
    if args.repeats < 1 or args.iters < 1 or args.batch < 2:
        parser.error("--repeats and --iters must be >= 1, --batch >= 2")
    torch.set_num_threads(args.threads)
    steps, construction = [], []
    for name in names:
        steps += measure_steps(name, args.batch, args.repeats, args.iters, CLOCKS[args.clock])
    for name in names if args.construction_repeats > 0 else []:
        construction.append(
            measure_construction(
                name, args.batch, args.construction_batches, args.construction_repeats, CLOCKS[args.clock]
            )
        )
    payload = {
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "threads": args.threads,
        "clock": args.clock,
        "batch": args.batch,
        "repeats": args.repeats,
        "iters": args.iters,
        "fractions": list(FRACTIONS),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "steps": steps,
        "construction": construction,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
