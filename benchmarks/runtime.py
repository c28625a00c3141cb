"""Incremental inference (IncrementalRunner) against exported dense subnets, on CPU.

For every model, assignment and batch size, and every subnet ``s``, in one process and
interleaved so that both sides see the same machine load (medians over ``--repeats``; by default
the clock is the CPU time of the single compute thread, so other jobs on a shared machine do not
add their preemptions to the numbers; ``--clock wall`` measures wall time):

* ``reach/export``: time to reach subnet ``s`` by ``runner.start(x)`` + ``s - 1`` steps, over the
  time of the exported dense subnet ``s`` (``net.export_subnet(s)``) run alone (target <= 1.15);
* ``step/scratch``: time of the one step ``s-1 -> s`` over the time of recomputing subnet ``s``
  from scratch, i.e. running the exported dense subnet ``s`` (for ``s = 1`` the step is ``start``);
* ``time share`` vs ``MAC share``: the step's share of the time to reach subnet N, against its
  share of subnet N's MACs (exact counts: ``net.macs(s) - net.macs(s-1)``).

Assignments: ``random`` gives every neuron group a random order and nested fractions chosen by
bisection so that ``net.macs(s) <= budget_s x full MACs`` (budget-respecting, every group keeps at
least one neuron in subnet 1); ``construct`` runs ``nni_steppingnet.construct.Constructor`` for a
few iterations on synthetic data (a real construction assignment with unstructured pruning; the
weights are untrained, which does not matter for timing).

GPU timings are not measured by this script's recorded run (no GPU was available); the runner
itself works on CUDA (``runner.to("cuda")``).

    python3 benchmarks/runtime.py --models lenet5 vgg16_cifar resnet18   # the CNNs
    python3 benchmarks/runtime.py --models vit_p4 convnext_atto --output benchmarks/results/runtime_transformers.json
    python3 benchmarks/runtime.py --models lenet5 --batches 1 --repeats 5   # quick
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import timm
import torch
import torch.nn as nn

import nni_steppingnet.models  # noqa: F401  (registers lenet5, vgg16_cifar with timm)
from nni_steppingnet import SteppingNet
from nni_steppingnet.checkpoint import atomic_write_json
from nni_steppingnet.runtime import IncrementalRunner

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "runtime.json"

#: name -> (timm name, create_model kwargs)
MODELS: dict[str, tuple[str, dict[str, Any]]] = {
    "lenet5": ("lenet5", {"width": 2.0}),
    "vgg16_cifar": ("vgg16_cifar", {}),
    "resnet18": ("resnet18", {}),
    # transformers (issue 14): the CIFAR-10 recipes' ViT (patch 4 at 32x32, 64 tokens, 6 heads)
    # and convnext_atto; both run the full-width layout (nested norms, attention)
    "vit_p4": ("vit_tiny_patch16_224", {"img_size": 32, "patch_size": 4, "embed_dim": 96, "depth": 4, "num_heads": 6}),
    "convnext_atto": ("convnext_atto", {}),
}


def _apply_fractions(net: SteppingNet, orders: list[torch.Tensor], fractions: list[float]) -> None:
    """Neuron of rank j in a group of n gets the first s with j < ceil(n * fractions[s-1])."""
    n_sub = net.num_subnets
    for group, order in zip(net.groups, orders):
        size = group.size
        bounds = torch.tensor([max(1, math.ceil(size * f)) for f in fractions])
        rank = torch.empty(size, dtype=torch.long)
        rank[order] = torch.arange(size)
        index = torch.searchsorted(bounds, rank, right=True) + 1
        group.assignment = index.clamp(max=n_sub + 1)


def random_budget_assignment(net: SteppingNet, budgets: list[float], seed: int) -> list[float]:
    """Random nested assignment with ``net.macs(s) <= budgets[s-1] * net.full_macs``.

    Returns the chosen per-subnet channel fractions.
    """
    generator = torch.Generator().manual_seed(seed)
    orders = [torch.randperm(g.size, generator=generator) for g in net.groups]
    fractions: list[float] = []
    for s, budget in enumerate(budgets, start=1):
        limit = budget * net.full_macs
        low = fractions[-1] if fractions else 0.0
        high = 1.0
        for _ in range(16):
            mid = (low + high) / 2
            _apply_fractions(net, orders, fractions + [mid] * (len(budgets) - s + 1))
            if net.macs(s) <= limit:
                low = mid
            else:
                high = mid
        fractions.append(low)
    _apply_fractions(net, orders, fractions)
    return fractions


def construct_assignment(net: SteppingNet, budgets: list[float], seed: int, img: int, iterations: int) -> None:
    from nni_steppingnet.construct import ConstructionConfig, Constructor

    generator = torch.Generator().manual_seed(seed)
    loader = [
        (torch.randn(16, 3, img, img, generator=generator), torch.randint(0, 10, (16,), generator=generator))
        for _ in range(4)
    ]
    config = ConstructionConfig(
        budgets=budgets, reference_macs=net.full_macs, batches_per_iteration=1, iterations=iterations, seed=seed
    )
    result = Constructor(net, config, loader).run()
    net.model.eval()
    if not result.all_met:
        print(f"  construction met budgets {result.budgets_met} after {result.iterations} iterations", file=sys.stderr)


#: the clock of the measurement (set by main): thread CPU time is immune to the preemptions a
#: shared machine causes (one intra-op thread does all the work); wall time is what a user sees
CLOCK: Callable[[], float] = time.thread_time


def _timed(fn: Callable[[], Any]) -> float:
    begin = CLOCK()
    fn()
    return CLOCK() - begin


def measure(
    net: SteppingNet, batch: int, repeats: int, warmup: int, seed: int, layouts: tuple[str, ...] = ("auto",)
) -> dict[str, Any]:
    """Time the runner (one per layout; the first is reported in full, the others as ratios)
    against the exported dense subnets, interleaved in every repeat."""
    n_sub = net.num_subnets
    runners = [IncrementalRunner(net, layout=layout) for layout in layouts]
    runner = runners[0]
    others: dict[str, tuple[list[list[float]], list[list[float]]]] = {
        layout: ([[] for _ in range(n_sub)], [[] for _ in range(n_sub)]) for layout in layouts[1:]
    }
    exported = [net.export_subnet(s).eval() for s in range(1, n_sub + 1)]
    x = torch.randn(batch, 3, *net.example_inputs.shape[2:], generator=torch.Generator().manual_seed(seed))
    macs = [net.macs(s) for s in range(1, n_sub + 1)]
    steps: list[list[float]] = [[] for _ in range(n_sub)]
    reach: list[list[float]] = [[] for _ in range(n_sub)]
    export: list[list[float]] = [[] for _ in range(n_sub)]
    max_err = 0.0
    with torch.inference_mode():
        for s in range(n_sub):  # correctness of what is timed
            out = runner.start(x) if s == 0 else runner.step()
            ref = exported[s](x)
            max_err = max(max_err, float((out - ref).abs().max() / ref.abs().max().clamp_min(1e-12)))
        for r in range(warmup + repeats):
            times = [_timed(lambda: runner.start(x))]
            times += [_timed(runner.step) for _ in range(1, n_sub)]
            export_times = [_timed(lambda m=m: m(x)) for m in exported]
            other_times = {}
            for layout, other in zip(layouts[1:], runners[1:]):
                other_times[layout] = [_timed(lambda o=other: o.start(x))]
                other_times[layout] += [_timed(other.step) for _ in range(1, n_sub)]
            if r < warmup:
                continue
            for layout, (o_steps, o_reach) in others.items():
                running = 0.0
                for s in range(n_sub):
                    running += other_times[layout][s]
                    o_steps[s].append(other_times[layout][s] / export_times[s])
                    o_reach[s].append(running / export_times[s])
            total = 0.0
            for s in range(n_sub):
                total += times[s]
                steps[s].append(times[s])
                reach[s].append(total)
                export[s].append(export_times[s])
    rows = []
    med_reach_n = statistics.median(reach[-1])
    for s in range(n_sub):
        step_med = statistics.median(steps[s])
        reach_med = statistics.median(reach[s])
        export_med = statistics.median(export[s])
        # Ratios per repeat (side by side), then the median.
        reach_ratio = statistics.median(a / b for a, b in zip(reach[s], export[s]))
        step_ratio = statistics.median(a / b for a, b in zip(steps[s], export[s]))
        rows.append(
            {
                "subnet": s + 1,
                "macs": macs[s],
                "step_macs": macs[s] - (macs[s - 1] if s else 0),
                "mac_ratio_of_full": macs[s] / net.full_macs,
                "step_s": step_med,
                "reach_s": reach_med,
                "export_s": export_med,
                "reach_over_export": reach_ratio,
                "step_over_scratch": step_ratio,
                "time_share": step_med / med_reach_n,
                "mac_share": (macs[s] - (macs[s - 1] if s else 0)) / macs[-1],
            }
        )
        for layout, (o_steps, o_reach) in others.items():
            rows[-1][f"reach_over_export_{layout}"] = statistics.median(o_reach[s])
            rows[-1][f"step_over_scratch_{layout}"] = statistics.median(o_steps[s])
    return {
        "batch": batch,
        "repeats": repeats,
        "max_rel_error_vs_export": max_err,
        "layout": runner.layout,
        "compared_layouts": [r.layout for r in runners[1:]],
        "rows": rows,
    }


def _table(title: str, result: dict[str, Any]) -> str:
    extra = [k[len("reach_over_export_") :] for k in result["rows"][0] if k.startswith("reach_over_export_")]
    lines = [
        f"{title}  batch {result['batch']}  layout {result['layout']}  (median of {result['repeats']}; "
        f"max rel. error vs export {result['max_rel_error_vs_export']:.1e})",
        "  s   MACs/full  step ms  reach ms  export ms  reach/export  step/scratch  time share  MAC share"
        + "".join(f"  {layout} reach/export" for layout in extra),
    ]
    for row in result["rows"]:
        lines.append(
            f"  {row['subnet']}   {row['mac_ratio_of_full']:8.3f}  {1e3 * row['step_s']:7.2f}  "
            f"{1e3 * row['reach_s']:8.2f}  {1e3 * row['export_s']:9.2f}  {row['reach_over_export']:12.2f}  "
            f"{row['step_over_scratch']:12.2f}  {row['time_share']:10.3f}  {row['mac_share']:9.3f}"
            + "".join(f"  {row['reach_over_export_' + layout]:{len(layout) + 13}.2f}" for layout in extra)
        )
    return "\n".join(lines)


def markdown(results: dict[str, Any]) -> str:
    """The results as the markdown table of benchmarks/README.md (values for s = 1 / 2 / ...)."""

    def join(values: list[float], fmt: str) -> str:
        return " / ".join(format(v, fmt) for v in values)

    extra = sorted(
        {
            k[len("reach_over_export_") :]
            for case in results["cases"]
            for r in case["results"]
            for k in r["rows"][0]
            if k.startswith("reach_over_export_")
        }
    )
    head = [
        "model",
        "assignment",
        "batch",
        "layout",
        "MACs/full",
        "reach/export",
        "step/scratch",
        "time share",
        "MAC share",
        "export ms",
        "reach ms",
    ] + [f"{layout} reach/export" for layout in extra]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for case in results["cases"]:
        for result in case["results"]:
            rows = result["rows"]
            cells = [
                case["model"],
                case["assignment"],
                str(result["batch"]),
                str(result.get("layout")),
                join([r["mac_ratio_of_full"] for r in rows], ".2f"),
                join([r["reach_over_export"] for r in rows], ".2f"),
                join([r["step_over_scratch"] for r in rows], ".2f"),
                join([r["time_share"] for r in rows], ".2f"),
                join([r["mac_share"] for r in rows], ".2f"),
                join([1e3 * r["export_s"] for r in rows], ".1f"),
                join([1e3 * r["reach_s"] for r in rows], ".1f"),
            ]
            cells += [join([r[f"reach_over_export_{layout}"] for r in rows], ".2f") for layout in extra]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["lenet5", "vgg16_cifar", "resnet18"], choices=list(MODELS))
    parser.add_argument("--assignments", nargs="+", default=["random", "construct"], choices=["random", "construct"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 64])
    parser.add_argument(
        "--budgets",
        nargs="+",
        type=float,
        default=[0.15, 0.3, 0.45, 0.6],
        help="MAC budgets as fractions of the full model (all reachable under the mask rule)",
    )
    parser.add_argument("--repeats", type=int, default=15, help="timed repeats (batch 1); batch >= 16 uses a third")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (1: the machine is shared, more threads add contention)",
    )
    parser.add_argument(
        "--clock",
        choices=["thread", "wall"],
        default="thread",
        help="thread: CPU time of the calling thread (needs --threads 1; not disturbed by "
        "other jobs on a shared machine); wall: time.perf_counter",
    )
    parser.add_argument("--construct-iterations", type=int, default=4)
    parser.add_argument("--img", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--layouts",
        nargs="+",
        default=["auto", "full"],
        choices=["auto", "delta", "full"],
        help="runner layouts, timed side by side; the first is reported in full",
    )
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument(
        "--markdown",
        type=Path,
        metavar="JSON",
        help="print the markdown table of a results file and exit (measures nothing)",
    )
    args = parser.parse_args(argv)
    if args.markdown is not None:
        print(markdown(json.loads(args.markdown.read_text(encoding="utf-8"))))
        return 0
    if any(b <= 0 for b in args.batches) or args.repeats < 1 or args.warmup < 0 or args.threads < 1:
        parser.error("batches, repeats and threads must be positive, warmup >= 0")
    if args.clock == "thread" and args.threads != 1:
        parser.error("--clock thread measures one thread's CPU time: use it with --threads 1 (or --clock wall)")
    global CLOCK
    CLOCK = time.thread_time if args.clock == "thread" else time.perf_counter
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    results: dict[str, Any] = {
        "command": "python3 benchmarks/runtime.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
        "device": "cpu",
        "threads": args.threads,
        "clock": args.clock,
        "torch": torch.__version__,
        "platform": platform.platform(),
        "processor": platform.processor(),
        "budgets": args.budgets,
        "img": args.img,
        "cases": [],
    }
    for name in args.models:
        timm_name, kwargs = MODELS[name]
        for assignment in args.assignments:
            torch.manual_seed(args.seed)
            model: nn.Module = timm.create_model(timm_name, num_classes=10, **kwargs).eval()
            net = SteppingNet(model, torch.randn(1, 3, args.img, args.img), len(args.budgets), verify=False)
            if assignment == "random":
                random_budget_assignment(net, args.budgets, args.seed)
            else:
                construct_assignment(net, args.budgets, args.seed, args.img, args.construct_iterations)
            model.eval()
            case: dict[str, Any] = {
                "model": name,
                "kwargs": kwargs,
                "assignment": assignment,
                "full_macs": net.full_macs,
                "pruned_entries": int(sum(int((~m).sum()) for m in net.prune_masks.values())),
                "results": [],
            }
            for batch in args.batches:
                repeats = args.repeats if batch < 16 else max(3, args.repeats // 3)
                result = measure(net, batch, repeats, args.warmup, args.seed, tuple(args.layouts))
                case["results"].append(result)
                print(_table(f"{name} ({assignment})", result), flush=True)
            results["cases"].append(case)
            net.remove()
    atomic_write_json(args.output, results)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
