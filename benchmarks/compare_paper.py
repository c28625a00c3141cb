"""SteppingNet against any-width and slimmable networks (paper Fig. 6) on two local cases.

Cases (four budgets each, three seeds by default, one teacher per seed shared by all methods):

* ``mnist-lenet5``: LeNet-5 on MNIST (``--data-root`` holds ``MNIST/raw``), expansion 2.0,
  budgets 15/30/60/85% (the paper's LeNet-5 budgets);
* ``digits-lenet3c1l``: LeNet-3C1L on scikit-learn's 8x8 digits, expansion 1.8, budgets
  10/30/50/85% (the paper's LeNet-3C1L budgets).

Every method runs through ``nni_steppingnet.baselines.compare.run_compare`` (the ``compare``
subcommand). The script prints the tables, writes ``benchmarks/results/compare_paper.json`` and
regenerates the block between the ``BEGIN GENERATED`` / ``END GENERATED`` markers of
``docs/results.md`` (the hand-written notes around it stay). ``--resume`` reuses finished runs.

    python3 benchmarks/compare_paper.py --data-root /work/shared/data
    python3 benchmarks/compare_paper.py --quick --cases digits-lenet3c1l   # smoke test, ~1 min
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from nni_steppingnet.baselines.compare import compare_markdown, run_compare
from nni_steppingnet.checkpoint import atomic_write_json, atomic_write_text
from nni_steppingnet.config import load_recipe

ROOT = Path(__file__).resolve().parents[1]
BEGIN = "<!-- BEGIN GENERATED: benchmarks/compare_paper.py -->"
END = "<!-- END GENERATED -->"

#: the paper's Table I rows for the same networks (CIFAR-10): original accuracy, (A_i, M_i/M_t) in %
PAPER_TABLE_I: dict[str, dict[str, Any]] = {
    "mnist-lenet5": {
        "network": "LeNet-5",
        "dataset": "Cifar10",
        "original": 74.96,
        "subnets": [(51.8, 13.64), (59.56, 26.54), (68.64, 55.07), (72.03, 82.74)],
    },
    "digits-lenet3c1l": {
        "network": "LeNet-3C1L",
        "dataset": "Cifar10",
        "original": 83.36,
        "subnets": [(68.5, 9.65), (77.38, 29.55), (79.81, 48.62), (80.4, 78.52)],
    },
}

#: case -> (bundled recipe, overrides); the schedule keys are added by ``_schedule``
CASES: dict[str, tuple[str, list[str]]] = {
    "mnist-lenet5": ("lenet5_mnist", []),
    "digits-lenet3c1l": (
        "quickstart",
        ["model.width=1.0", "steppingnet.expansion=1.8", "steppingnet.budgets=[0.1,0.3,0.5,0.85]"],
    ),
}

#: case -> schedule (teacher epochs, construction N_t, m, retraining epochs) of the measured run
SCHEDULES: dict[str, dict[str, int]] = {
    "mnist-lenet5": {
        "teacher.epochs": 2,
        "construction.iterations": 30,
        "construction.batches_per_iteration": 10,
        "retraining.epochs": 1,
    },
    "digits-lenet3c1l": {
        "teacher.epochs": 15,
        "construction.iterations": 40,
        "construction.batches_per_iteration": 8,
        "retraining.epochs": 15,
    },
}
QUICK: dict[str, int] = {
    "teacher.epochs": 1,
    "construction.iterations": 2,
    "construction.batches_per_iteration": 2,
    "retraining.epochs": 1,
}


def _overrides(case: str, data_root: str | None, quick: bool) -> list[str]:
    recipe, extra = CASES[case]
    schedule = QUICK if quick else SCHEDULES[case]
    out = list(extra) + [f"{k}={v}" for k, v in schedule.items()] + ["construction.monitor_samples=0"]
    if case.startswith("mnist"):
        if not data_root:
            raise SystemExit("mnist-lenet5 needs --data-root DIR with DIR/MNIST/raw/ holding the idx files")
        out.append(f"data.root={data_root}")
    return out


def _machine() -> dict[str, Any]:
    cpu = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def _code_state() -> str:
    """``<commit>`` plus ``+ uncommitted changes`` when the package differs from it."""
    import subprocess

    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "nni_steppingnet"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return commit + (" + uncommitted changes" if dirty else "")


def _paper_md(case: str) -> str:
    row = PAPER_TABLE_I[case]
    header = "| source | Orig. Acc. | " + " | ".join(f"A_{i} | M_{i}/M_t" for i in range(1, 5)) + " |"
    cells = " | ".join(f"{a:.2f} | {m:.2f}" for a, m in row["subnets"])
    return "\n".join(
        [
            header,
            "|" + "---|" * 10,
            f"| paper Table I, {row['network']} on {row['dataset']} | {row['original']:.2f} | {cells} |",
        ]
    )


def _ours_md(case: str, report: dict[str, Any]) -> str:
    rows = []
    for method, data in report["summary"].items():
        cells = " | ".join(f"{100 * s['accuracy_mean']:.2f} | {100 * s['mac_ratio_mean']:.2f}" for s in data["subnets"])
        original = data.get("original_accuracy")
        rows.append(
            f"| ours, {method} ({len(data['seeds'])} seeds, mean) | "
            f"{'n/a' if original is None else f'{100 * original:.2f}'} | {cells} |"
        )
    return "\n".join(rows)


def _times_md(report: dict[str, Any]) -> str:
    """Per seed, each method's wall time over SteppingNet's (the methods of a seed run one after
    the other), then the median over seeds."""
    runs = report["runs"]
    base = runs.get("steppingnet")
    lines = ["| method | median wall time per run (s) | median ratio to steppingnet (per seed) |", "|---|---|---|"]
    for method, items in runs.items():
        times = [float(r.get("wall_time_s") or float("nan")) for r in items]
        ratio = "n/a"
        if base:
            ratio = (
                f"{statistics.median(t / float(b.get('wall_time_s') or float('nan')) for t, b in zip(times, base)):.2f}"
            )
        lines.append(f"| {method} | {statistics.median(times):.0f} | {ratio} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, from {', '.join(CASES)}")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--data-root", default=None, help="folder holding MNIST/raw (for mnist-lenet5)")
    parser.add_argument(
        "--out", default=str(ROOT / "runs" / "compare_paper"), help="run folders (teachers, checkpoints; git-ignored)"
    )
    parser.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "compare_paper.json"))
    parser.add_argument(
        "--docs",
        default=str(ROOT / "docs" / "results.md"),
        help="markdown file whose generated block is rewritten ('none' to skip)",
    )
    parser.add_argument("--quick", action="store_true", help="tiny schedule (smoke test, numbers meaningless)")
    parser.add_argument("--resume", action="store_true", help="reuse finished runs in --out")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        raise SystemExit(f"unknown case(s) {unknown}; choose from {', '.join(CASES)}")
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    command = "python3 benchmarks/compare_paper.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    results: dict[str, Any] = {
        "command": command,
        "machine": _machine(),
        "code": _code_state(),
        "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "quick": args.quick,
        "cases": {},
    }
    sections = []
    for case in cases:
        name, _ = CASES[case]
        overrides = _overrides(case, args.data_root, args.quick)
        recipe = load_recipe(name, overrides)
        t0 = time.perf_counter()
        report = run_compare(
            recipe, Path(args.out) / case, seeds=seeds, device=args.device, resume=args.resume, progress=False
        )
        elapsed = time.perf_counter() - t0
        cli = f"nni-steppingnet compare {name} --seeds {','.join(map(str, seeds))} --device {args.device} " + " ".join(
            f"--set {shlex.quote(o)}" for o in overrides
        )
        results["cases"][case] = {
            "recipe": name,
            "overrides": overrides,
            "cli": cli,
            "wall_time_s": elapsed,
            "summary": report["summary"],
            "targets": report["targets"],
            "paper_table_i": PAPER_TABLE_I[case],
            "runs": report["runs"],
        }
        table = compare_markdown(report, title=f"{case}")
        sections.append(
            "\n".join(
                [
                    table.rstrip(),
                    "",
                    "Beside the paper's Table I row for the same network (on CIFAR-10; accuracies and M_i/M_t in %):",
                    "",
                    _paper_md(case),
                    _ours_md(case, report),
                    "",
                    "Wall time of one run (teacher excluded; the methods of a seed ran one after the other on "
                    "a machine shared with other jobs, so only the ratios are indicative):",
                    "",
                    _times_md(report),
                    "",
                    f"Equivalent CLI: `{cli}`",
                    "",
                ]
            )
        )
        print(table)
    atomic_write_json(args.json, results)
    block = "\n".join(
        [
            BEGIN,
            "",
            f"Generated by `{command}`; machine: {results['machine']['cpu']}, "
            f"{results['machine']['cores']} cores shared with other jobs, torch "
            f"{results['machine']['torch']} on {args.device} with {args.threads} thread(s); code "
            f"{results['code']}, started {results['started']}"
            + (" — QUICK smoke-test schedule, numbers are meaningless" if args.quick else "")
            + ".",
            "",
            *sections,
            END,
        ]
    )
    if args.docs.lower() != "none":
        docs = Path(args.docs)
        text = docs.read_text(encoding="utf-8") if docs.is_file() else ""
        if BEGIN in text and END in text:
            head, _, rest = text.partition(BEGIN)
            _, _, tail = rest.partition(END)
            text = head + block + tail
        else:
            text = text.rstrip() + ("\n\n" if text else "") + block + "\n"
        atomic_write_text(docs, text)
    print(f"wrote {args.json}" + ("" if args.docs.lower() == "none" else f" and {args.docs}"))
    print(json.dumps({c: v["targets"] for c, v in results["cases"].items()}, indent=1)[:4000])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
