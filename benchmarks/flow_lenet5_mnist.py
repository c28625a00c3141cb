"""Benchmark: the whole SteppingNet flow (``lenet5_mnist`` recipe) on local MNIST files.

    python benchmarks/flow_lenet5_mnist.py --data-root ../shared/data

1. Runs the ``lenet5_mnist`` recipe (teacher, construction, retraining, evaluation) and prints the
   Table-I style table and the wall time.
2. Measures the cost of one construction iteration (m batches for each of the N subnets, with
   importance tracking, beta suppression, neuron moves and pruning) against plain SGD training of
   the same expanded network (no SteppingNet wrapper) for the same number of subnet-batches
   (N x m), side by side in this process, ``--repeats`` times; reports medians and their ratio.

Writes ``benchmarks/results/flow_lenet5_mnist.json`` (atomically). The recipe's settings are
modest so that the run finishes in about 15 minutes on 2 CPU cores; change them with ``--set``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import logging
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from nni_steppingnet.checkpoint import atomic_write_json, seed_everything
from nni_steppingnet.config import load_recipe
from nni_steppingnet.construct import ConstructionConfig, Constructor
from nni_steppingnet.flow import build_data, build_model, build_stepping_net, reference_macs, resolve_device, run_recipe
from nni_steppingnet.flow_cli import CliReporter
from nni_steppingnet.report import results_markdown
from nni_steppingnet.train import make_optimizer

RESULTS = Path(__file__).resolve().parent / "results" / "flow_lenet5_mnist.json"


def _plain_steps(model: torch.nn.Module, loader: Any, steps: int, lr: float, device: torch.device) -> float:
    """Seconds for ``steps`` plain SGD steps (CE loss) on ``model``, cycling through ``loader``."""
    optimizer = make_optimizer(model.parameters(), lr)
    model.train()
    batches = iter(loader)

    def one() -> None:
        nonlocal batches
        try:
            x, y = next(batches)
        except StopIteration:
            batches = iter(loader)
            x, y = next(batches)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()

    for _ in range(3):  # warm-up
        one()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        one()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def measure_iteration_cost(recipe: Any, device: torch.device, repeats: int) -> dict[str, Any]:
    """Median seconds of one construction iteration vs plain training of the same batches."""
    train_loader, _, info = build_data(recipe, device)
    ref = reference_macs(recipe, info)
    c = recipe.construction
    n = recipe.steppingnet.num_subnets
    steps = n * c.batches_per_iteration
    construct_s: list[float] = []
    plain_s: list[float] = []
    for r in range(repeats):
        plain_first = r % 2 == 0  # alternate the order so neither side always runs first

        def plain_run(r: int = r) -> None:
            seed_everything(recipe.seed + r)
            plain = build_model(recipe, info, width=recipe.steppingnet.expansion).to(device)
            plain_s.append(_plain_steps(plain, train_loader, steps, c.lr, device))

        if plain_first:
            plain_run()
        seed_everything(recipe.seed + r)
        net = build_stepping_net(recipe, info)
        config = ConstructionConfig(
            budgets=list(recipe.steppingnet.budgets),
            reference_macs=ref,
            batches_per_iteration=c.batches_per_iteration,
            iterations=c.iterations,
            alpha_growth=c.alpha_growth,
            beta=c.beta,
            prune_threshold=c.prune_threshold,
            lr=c.lr,
            momentum=c.momentum,
            weight_decay=c.weight_decay,
            seed=recipe.seed,
        )
        constructor = Constructor(net, config, train_loader, device=device)
        constructor.step()  # warm-up (and the first, all-in-subnet-1 iteration)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        constructor.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        construct_s.append(time.perf_counter() - start)
        constructor.close()
        if not plain_first:
            plain_run()
        print(
            f"  repeat {r + 1}/{repeats}: construction iteration {construct_s[-1]:.3f} s, "
            f"plain training of the same {steps} subnet-batches {plain_s[-1]:.3f} s "
            f"(ratio {construct_s[-1] / plain_s[-1]:.2f})",
            flush=True,
        )
    ratios = [a / b for a, b in zip(construct_s, plain_s)]
    return {
        "subnet_batches_per_iteration": steps,
        "batch_size": recipe.data.batch_size,
        "construction_iteration_s": construct_s,
        "plain_training_s": plain_s,
        "median_construction_iteration_s": statistics.median(construct_s),
        "median_plain_training_s": statistics.median(plain_s),
        "ratio_of_medians": statistics.median(construct_s) / statistics.median(plain_s),
        "median_ratio": statistics.median(ratios),
        "repeats": repeats,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", required=True, help="folder holding MNIST/raw/ (torchvision layout)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default=None, help="run folder (default: runs/bench-flow_lenet5_mnist-<time>)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--repeats", type=int, default=3, help="repeats of the iteration-cost measurement")
    parser.add_argument("--skip-run", action="store_true", help="only measure the iteration cost")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")

    recipe = load_recipe("lenet5_mnist", [f"data.root={args.data_root}", *args.overrides])
    device = resolve_device(args.device)
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = Path(args.out) if args.out else Path("runs") / f"bench-flow_lenet5_mnist-{stamp}"
    report: dict[str, Any] = {
        "benchmark": "flow_lenet5_mnist",
        "date": stamp,
        "machine": {
            "platform": platform.platform(),
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "device": str(device),
        },
        "recipe": recipe.to_dict(),
        "run_dir": str(out),
    }
    if not args.skip_run:
        print(f"running recipe {recipe.name} on {device} into {out} ...", flush=True)
        reporter = CliReporter(enabled=sys.stderr.isatty())
        start = time.perf_counter()
        try:
            results = run_recipe(recipe, out, device=device, progress=False, reporter=reporter)
        finally:
            reporter.close()
        wall = time.perf_counter() - start
        print(results_markdown(results))
        print(
            f"wall time of the whole flow: {wall:.1f} s "
            f"(stages: {', '.join(f'{k} {v:.1f} s' for k, v in results['stage_times_s'].items())})"
        )
        summary = {k: v for k, v in results.items() if k != "construction"}
        summary["construction"] = {k: v for k, v in results["construction"].items() if k != "history"}
        report["results"] = summary
        report["wall_time_s"] = wall
    print(f"measuring one construction iteration vs plain training ({args.repeats} repeats) ...", flush=True)
    timing = measure_iteration_cost(recipe, device, args.repeats)
    report["iteration_cost"] = timing
    print()
    print("| measurement | median (s) |")
    print("|---|---|")
    print(
        f"| construction iteration ({timing['subnet_batches_per_iteration']} subnet-batches) | "
        f"{timing['median_construction_iteration_s']:.3f} |"
    )
    print(f"| plain training, same subnet-batches | {timing['median_plain_training_s']:.3f} |")
    print(f"| ratio of medians | {timing['ratio_of_medians']:.2f}x |")
    print(f"| median of per-repeat ratios | {timing['median_ratio']:.2f}x |")
    atomic_write_json(RESULTS, report)
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
