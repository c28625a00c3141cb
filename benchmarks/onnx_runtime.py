"""ONNX stage graphs in onnxruntime against exported dense subnets, with the torch runner beside.

For every model, onnxruntime thread count and batch size, and every subnet ``s`` (random
budget-respecting nested assignment, budgets 0.15 / 0.3 / 0.45 / 0.6 of the full MACs, as
``benchmarks/runtime.py``), in one process and interleaved in every repeat:

* ``ort reach/export``: time to reach subnet ``s`` with :class:`OnnxStepRunner` (``start`` +
  ``s - 1`` steps over the runner's ONNX stage graphs) over the time of the exported dense subnet
  ``s`` (``net.export_subnet(s)`` exported to ONNX) run alone in onnxruntime (target <= 1.15);
* ``ort fused/export``: the same reached in one call of the fused graph of stages ``1..s``
  (``export_onnx(..., fused=True)``; ``OnnxStepRunner.run(x, until=s)`` uses it);
* ``ort step/scratch``: one step ``s-1 -> s`` over recomputing subnet ``s`` (its dense graph);
* ``torch reach/export`` and ``torch step/scratch``: the same for :class:`IncrementalRunner` and
  the dense torch modules (torch threads = onnxruntime threads);
* ``floor``: nonzero MACs over dense MACs of subnet ``s``'s exported module. The dense export
  multiplies the zero blocks of the nesting rule (a subnet-1 neuron never reads a subnet-2 input)
  which the stage graphs skip, so ``floor`` is what reach/export would be if time followed MACs.

Every method runs ``--inner`` times in a row inside each repeat (warm caches, as in deployment,
where one model runs over and over) and the repeat keeps the median of those; ratios are taken per
repeat (side by side) and the table shows their medians over ``--repeats``. With one thread the
clock is the calling thread's CPU time (onnxruntime and torch compute on the calling thread then,
and a shared machine's preemptions do not count); with more threads it is wall time.

    nice -n 10 python3 benchmarks/onnx_runtime.py             # writes benchmarks/results/onnx_runtime.json
    python3 benchmarks/onnx_runtime.py --models lenet5 --batches 1 --threads 1 --repeats 5   # quick
    python3 benchmarks/onnx_runtime.py --markdown benchmarks/results/onnx_runtime.json        # the table
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnxruntime as ort
import timm
import torch
import torch.nn as nn
from runtime import random_budget_assignment  # benchmarks/runtime.py (this script's folder)

import nni_steppingnet.models  # noqa: F401  (registers lenet5, vgg16_cifar with timm)
from nni_steppingnet import SteppingNet
from nni_steppingnet.checkpoint import atomic_write_json
from nni_steppingnet.export import export_with_report
from nni_steppingnet.onnx_export import export_onnx, export_subnet_onnx
from nni_steppingnet.onnx_runner import OnnxStepRunner
from nni_steppingnet.runtime import IncrementalRunner

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "onnx_runtime.json"

#: name -> (timm name, create_model kwargs)
MODELS: dict[str, tuple[str, dict[str, Any]]] = {
    "vgg16_cifar": ("vgg16_cifar", {}),
    "resnet18": ("resnet18", {}),
    "mobilenetv3_small_100": ("mobilenetv3_small_100", {}),
    "lenet5": ("lenet5", {"width": 2.0}),
    # the CIFAR-10 transformer recipes' models (nested norms, attention heads): run when named
    "vit_p4": ("vit_tiny_patch16_224", {"img_size": 32, "patch_size": 4, "embed_dim": 96, "depth": 4, "num_heads": 6}),
    "convnext_atto": ("convnext_atto", {}),
}
#: what runs without --models
DEFAULT_MODELS = ("vgg16_cifar", "resnet18", "mobilenetv3_small_100", "lenet5")


def _median_time(fn: Callable[[], Any], inner: int, clock: Callable[[], float]) -> float:
    times = []
    for _ in range(inner):
        begin = clock()
        fn()
        times.append(clock() - begin)
    return statistics.median(times)


def _stage_times(
    start: Callable[[], Any], step: Callable[[], Any], n_sub: int, inner: int, clock: Callable[[], float]
) -> list[float]:
    """Per stage, the median over ``inner`` runs to subnet N of the stage's time."""
    runs = []
    for _ in range(inner):
        begin = clock()
        start()
        times = [clock() - begin]
        for _ in range(1, n_sub):
            begin = clock()
            step()
            times.append(clock() - begin)
        runs.append(times)
    return [statistics.median(run[s] for run in runs) for s in range(n_sub)]


def _session(path: Path, threads: int) -> Any:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def measure(
    net: SteppingNet,
    runner: IncrementalRunner,
    stage_dir: Path,
    dense_paths: list[Path],
    dense_modules: list[nn.Module],
    threads: int,
    batch: int,
    repeats: int,
    warmup: int,
    inner: int,
    seed: int,
) -> dict[str, Any]:
    n_sub = net.num_subnets
    clock = time.thread_time if threads == 1 else time.perf_counter
    torch.set_num_threads(threads)
    stepper = OnnxStepRunner(stage_dir, threads=threads)
    dense = [_session(path, threads) for path in dense_paths]
    x = torch.randn(batch, *net.example_inputs.shape[1:], generator=torch.Generator().manual_seed(seed))
    xn = x.numpy()
    errors = {"ort_vs_torch_runner": 0.0, "ort_dense_vs_torch_dense": 0.0}
    with torch.inference_mode():
        for s in range(n_sub):  # correctness of what is timed
            ref = runner.start(x) if s == 0 else runner.step()
            got = stepper.start(xn) if s == 0 else stepper.step()
            scale = float(ref.abs().max())
            errors["ort_vs_torch_runner"] = max(
                errors["ort_vs_torch_runner"], float(np.abs(got - ref.numpy()).max()) / scale
            )
            dense_ref = dense_modules[s](x).numpy()
            dense_got = dense[s].run(None, {"input": xn})[0]
            errors["ort_dense_vs_torch_dense"] = max(
                errors["ort_dense_vs_torch_dense"],
                float(np.abs(dense_got - dense_ref).max()) / float(np.abs(dense_ref).max()),
            )
        series: dict[str, list[list[float]]] = {
            key: [[] for _ in range(n_sub)]
            for key in ("ort_step", "ort_reach", "ort_fused", "ort_dense", "torch_step", "torch_reach", "torch_dense")
        }
        for r in range(warmup + repeats):
            ort_steps = _stage_times(lambda: stepper.start(xn), stepper.step, n_sub, inner, clock)
            ort_dense = [_median_time(lambda d=d: d.run(None, {"input": xn}), inner, clock) for d in dense]
            ort_fused = [_median_time(lambda s=s: stepper.run(xn, until=s), inner, clock) for s in range(1, n_sub + 1)]
            torch_steps = _stage_times(lambda: runner.start(x), runner.step, n_sub, inner, clock)
            torch_dense = [_median_time(lambda m=m: m(x), inner, clock) for m in dense_modules]
            if r < warmup:
                continue
            for s in range(n_sub):
                series["ort_step"][s].append(ort_steps[s])
                series["ort_reach"][s].append(sum(ort_steps[: s + 1]))
                series["ort_dense"][s].append(ort_dense[s])
                series["ort_fused"][s].append(ort_fused[s])
                series["torch_step"][s].append(torch_steps[s])
                series["torch_reach"][s].append(sum(torch_steps[: s + 1]))
                series["torch_dense"][s].append(torch_dense[s])

    def ratio(top: str, bottom: str, s: int) -> float:
        return statistics.median(a / b for a, b in zip(series[top][s], series[bottom][s]))

    rows = []
    for s in range(n_sub):
        rows.append(
            {
                "subnet": s + 1,
                "ort_reach_over_export": ratio("ort_reach", "ort_dense", s),
                "ort_fused_over_export": ratio("ort_fused", "ort_dense", s),
                "ort_step_over_scratch": ratio("ort_step", "ort_dense", s),
                "torch_reach_over_export": ratio("torch_reach", "torch_dense", s),
                "torch_step_over_scratch": ratio("torch_step", "torch_dense", s),
                "ort_reach_over_torch_reach": ratio("ort_reach", "torch_reach", s),
                **{f"{key}_s": statistics.median(values[s]) for key, values in series.items()},
            }
        )
    return {
        "threads": threads,
        "batch": batch,
        "repeats": repeats,
        "inner": inner,
        "clock": "thread" if threads == 1 else "wall",
        "max_rel_errors": errors,
        "rows": rows,
    }


def _join(values: list[float], fmt: str) -> str:
    return " / ".join(format(v, fmt) for v in values)


def markdown(results: dict[str, Any]) -> str:
    """The results as the markdown table of benchmarks/README.md (values for s = 1 / 2 / ...)."""
    head = [
        "model",
        "threads",
        "batch",
        "MACs/full",
        "floor (nonzero/dense MACs)",
        "ort reach/export",
        "ort fused/export",
        "ort step/scratch",
        "torch reach/export",
        "torch step/scratch",
        "ort dense ms",
        "ort reach ms",
        "torch reach ms",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for case in results["cases"]:
        for result in case["results"]:
            rows = result["rows"]
            cells = [
                case["model"],
                str(result["threads"]),
                str(result["batch"]),
                _join(case["mac_ratio_of_full"], ".2f"),
                _join(case["floor"], ".2f"),
                _join([r["ort_reach_over_export"] for r in rows], ".2f"),
                _join([r["ort_fused_over_export"] for r in rows], ".2f"),
                _join([r["ort_step_over_scratch"] for r in rows], ".2f"),
                _join([r["torch_reach_over_export"] for r in rows], ".2f"),
                _join([r["torch_step_over_scratch"] for r in rows], ".2f"),
                _join([1e3 * r["ort_dense_s"] for r in rows], ".2f"),
                _join([1e3 * r["ort_reach_s"] for r in rows], ".2f"),
                _join([1e3 * r["torch_reach_s"] for r in rows], ".2f"),
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), choices=list(MODELS))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 64])
    parser.add_argument(
        "--threads", nargs="+", type=int, default=[1, 2], help="onnxruntime intra-op threads (torch uses as many)"
    )
    parser.add_argument("--budgets", nargs="+", type=float, default=[0.15, 0.3, 0.45, 0.6])
    parser.add_argument("--repeats", type=int, default=9, help="timed repeats at batch 1 (batch >= 16: a third)")
    parser.add_argument(
        "--inner", type=int, default=3, help="runs in a row per method and repeat at batch 1 (batch >= 16: 1)"
    )
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--img", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
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
    if (
        any(b <= 0 for b in args.batches)
        or any(t <= 0 for t in args.threads)
        or args.repeats < 1
        or args.inner < 1
        or args.warmup < 0
    ):
        parser.error("batches, threads, repeats and inner must be positive, warmup >= 0")
    logging.basicConfig(level=logging.WARNING)
    results: dict[str, Any] = {
        "command": "python3 benchmarks/onnx_runtime.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
        "device": "cpu",
        "torch": torch.__version__,
        "onnxruntime": ort.__version__,
        "platform": platform.platform(),
        "processor": platform.processor(),
        "budgets": args.budgets,
        "img": args.img,
        "cases": [],
    }
    with tempfile.TemporaryDirectory() as scratch:
        for name in args.models:
            timm_name, kwargs = MODELS[name]
            torch.manual_seed(args.seed)
            torch.set_num_threads(1)
            model: nn.Module = timm.create_model(timm_name, num_classes=10, **kwargs).eval()
            net = SteppingNet(model, torch.randn(1, 3, args.img, args.img), len(args.budgets), verify=False)
            random_budget_assignment(net, args.budgets, args.seed)
            model.eval()
            runner = IncrementalRunner(net)
            stage_dir = Path(scratch) / name / "stages"
            export_onnx(runner, stage_dir, fused=True)
            dense_modules, dense_paths, floors = [], [], []
            for s in range(1, net.num_subnets + 1):
                module, report = export_with_report(net, s)
                module.eval()
                dense_modules.append(module)
                dense_paths.append(
                    export_subnet_onnx(module, Path(scratch) / name / f"dense{s}.onnx", net.example_inputs)
                )
                floors.append(report.nonzero_macs / report.dense_macs)
            case: dict[str, Any] = {
                "model": name,
                "kwargs": kwargs,
                "full_macs": net.full_macs,
                "macs": [net.macs(s) for s in range(1, net.num_subnets + 1)],
                "mac_ratio_of_full": [net.macs(s) / net.full_macs for s in range(1, net.num_subnets + 1)],
                "floor": floors,
                "results": [],
            }
            for threads in args.threads:
                for batch in args.batches:
                    big = batch >= 16
                    result = measure(
                        net,
                        runner,
                        stage_dir,
                        dense_paths,
                        dense_modules,
                        threads,
                        batch,
                        max(3, args.repeats // 3) if big else args.repeats,
                        args.warmup,
                        1 if big else args.inner,
                        args.seed,
                    )
                    case["results"].append(result)
                    rows = result["rows"]
                    print(
                        f"{name} threads {threads} batch {batch}: floor {_join(floors, '.2f')}; ort reach/export "
                        f"{_join([r['ort_reach_over_export'] for r in rows], '.2f')}; fused "
                        f"{_join([r['ort_fused_over_export'] for r in rows], '.2f')}; torch reach/export "
                        f"{_join([r['torch_reach_over_export'] for r in rows], '.2f')}; errors "
                        f"{result['max_rel_errors']}",
                        flush=True,
                    )
            results["cases"].append(case)
            net.remove()
    atomic_write_json(args.output, results)
    print(markdown(results))
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
