"""CIFAR-10 on real data: the paper's Table I rows (LeNet-3C1L, LeNet-5), Fig. 6 against any-width
and slimmable networks, the neuron criteria, and the Fig. 7/8 ablations.

Data: a CIFAR-10 training set as numpy arrays (``--data FILE.npz`` with ``x_train`` and
``y_train``; see docs/data.md). Every number is measured on a seeded, stratified *validation
split* (``--val-fraction``, default 0.1: 45,000 / 5,000 images) of those training images; a test
set is never read. Per case and seed:

1. the teacher (the original network, width 1.0) is trained once on the whole training part and
   shared by every method and criterion of that seed (``runs/.../seed<k>/teacher.pt``);
2. ``nni_steppingnet.baselines.compare.run_compare`` runs SteppingNet, any-width and slimmable
   with that teacher, the same data, budgets, expansion and number of subnet-batches;
3. with ``--criteria``, SteppingNet again with ``construction.criterion=class`` and ``noise``;
4. with ``--ablate`` (LeNet-3C1L), ``run_ablate``: beta suppression / distillation on and off
   (Fig. 8) and expansion 1.0 / 1.4 / 1.8 / 2.2 (Fig. 7), on the first seed.

Schedules (``--schedule``): ``paper`` is Section IV (m = 250, N_t = 300; the teacher and
retraining lengths the paper does not give are the recipes' 100 / 60 epochs) and needs a GPU;
``reduced`` is what fit a shared 2-core CPU with masked training (see ``SCHEDULES``: the methods
train on a stratified subset of the training part, ``data.train_subset``); ``cpu`` is the longer
one sliced execution allows there (all 45,000 images); ``smoke`` checks the plumbing in minutes.

Writes ``benchmarks/results/cifar10.json`` (``--json``), ``cifar10.png`` beside it, and the
block between the ``BEGIN GENERATED`` / ``END GENERATED`` markers of docs/results.md.

    python3 benchmarks/cifar10.py --data DATA_ROOT/cifar10/cifar10-train.npz --schedule reduced
    python3 benchmarks/cifar10.py --data DATA_ROOT/cifar10/cifar10-train.npz --schedule paper --device cuda
    python3 benchmarks/cifar10.py --data DATA_ROOT/cifar10/cifar10-train.npz --schedule smoke --docs none
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch

from nni_steppingnet.baselines.compare import (
    METHODS,
    check_targets,
    compare_markdown,
    plot_compare,
    run_ablate,
    run_compare,
    summarize,
    train_teacher,
)
from nni_steppingnet.checkpoint import atomic_write_json, atomic_write_text
from nni_steppingnet.config import Recipe, load_recipe

ROOT = Path(__file__).resolve().parents[1]
BEGIN = "<!-- BEGIN GENERATED: benchmarks/cifar10.py -->"
END = "<!-- END GENERATED: benchmarks/cifar10.py -->"

#: the paper's Table I rows: original accuracy and (A_i, M_i/M_t) in %
PAPER_TABLE_I: dict[str, dict[str, Any]] = {
    "lenet3c1l": {
        "network": "LeNet-3C1L",
        "original": 83.36,
        "subnets": [(68.5, 9.65), (77.38, 29.55), (79.81, 48.62), (80.4, 78.52)],
    },
    "lenet5": {
        "network": "LeNet-5",
        "original": 74.96,
        "subnets": [(51.8, 13.64), (59.56, 26.54), (68.64, 55.07), (72.03, 82.74)],
    },
}
#: case -> bundled recipe (its budgets and expansion are Section IV's)
CASES: dict[str, str] = {"lenet3c1l": "lenet3c1l_cifar10", "lenet5": "lenet5_cifar10"}
CRITERIA_EXTRA: tuple[str, ...] = ("class", "noise")

#: schedule -> case -> {"teacher": overrides of the teacher run, "methods": overrides of every method}
SCHEDULES: dict[str, dict[str, dict[str, list[str]]]] = {
    "smoke": {
        case: {
            "teacher": ["teacher.epochs=1", "data.train_subset=1000"],
            "methods": [
                "data.train_subset=1000",
                "construction.iterations=2",
                "construction.batches_per_iteration=2",
                "retraining.epochs=1",
            ],
        }
        for case in CASES
    },
    # Sized for 2 CPU cores shared with other jobs (about an hour for everything): a LeNet-3C1L
    # x1.8 subnet-batch of 128 costs ~1 s there, because masked subnets compute at full width.
    "reduced": {
        # teacher.lr 0.02: at the recipe's 0.05 the 2-epoch teacher diverged in its first epoch
        # (mean loss 2.45-2.65 > ln 10; validation accuracy 29-42% over three seeds).
        "lenet3c1l": {
            "teacher": ["teacher.epochs=2", "teacher.lr=0.02"],
            "methods": [
                "data.train_subset=3000",
                "construction.iterations=10",
                "construction.batches_per_iteration=2",
                "retraining.epochs=2",
            ],
        },
        # 6 iterations of m = 4 left SteppingNet's subnet 4 at 1.13x the original MACs (budget 0.85):
        # more, shorter iterations reach the budgets with the same number of subnet-batches.
        "lenet5": {
            "teacher": ["teacher.epochs=10"],
            "methods": [
                "data.train_subset=3000",
                "construction.iterations=10",
                "construction.batches_per_iteration=2",
                "retraining.epochs=2",
            ],
        },
    },
    # The longest LeNet-5 schedule that fit 2 shared cores for three seeds and four SteppingNet /
    # baseline runs each in about an hour, with sliced execution (every subnet trains at its own
    # cost): a 20-epoch teacher, then every method on all 45,000 training images.
    "cpu": {
        case: {
            "teacher": ["teacher.epochs=20"],
            "methods": [
                "construction.iterations=30",
                "construction.batches_per_iteration=10",
                "retraining.epochs=5",
            ],
        }
        for case in CASES
    },
    "paper": {case: {"teacher": [], "methods": []} for case in CASES},
}


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
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def _code_state() -> str:
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


def _read(path: Path) -> dict[str, Any]:
    with path.open("r", encoding="utf-8") as handle:
        return json.load(handle)


def _data_overrides(data: str, val_fraction: float) -> list[str]:
    return ["data.name=npz", f"data.root={data}", f"data.val_fraction={val_fraction}", "construction.monitor_samples=0"]


def _teacher(case: str, seed: int, base: list[str], schedule: str, out: Path, device: str) -> tuple[Path, float]:
    recipe = load_recipe(CASES[case], base + SCHEDULES[schedule][case]["teacher"] + [f"seed={seed}"])
    return train_teacher(recipe, out / case / f"seed{seed}", device=device)


def _method_recipe(
    case: str, seed: int, base: list[str], schedule: str, teacher: Path, extra: list[str] | None = None
) -> tuple[Recipe, list[str]]:
    overrides = (
        base
        + SCHEDULES[schedule][case]["teacher"]
        + SCHEDULES[schedule][case]["methods"]
        + [f"seed={seed}", f"teacher.checkpoint={teacher}"]
        + list(extra or [])
    )
    return load_recipe(CASES[case], overrides), overrides


def _variants(case: str, args: argparse.Namespace) -> dict[str, list[str]]:
    """SteppingNet variants run beside the methods: label -> extra overrides (``--criteria``: the
    class and noise criteria, labelled by name; ``--variant LABEL:KEY=VALUE,...``)."""
    variants: dict[str, list[str]] = {}
    if args.criteria and case in args.criteria_cases:
        variants.update({c: [f"construction.criterion={c}"] for c in CRITERIA_EXTRA})
    for spec in args.variants:
        label, sep, body = spec.partition(":")
        if not sep or not label.strip() or not body.strip():
            raise SystemExit(f"--variant {spec!r}: write LABEL:KEY=VALUE[,KEY=VALUE...]")
        variants[label.strip()] = [item.strip() for item in body.split(",") if item.strip()]
    return variants


def run_case(case: str, args: argparse.Namespace, base: list[str]) -> dict[str, Any]:
    """Teacher, compare (and criteria) for every seed of ``case``; returns the case's record."""
    out = Path(args.out)
    methods = [] if args.variants_only else args.methods
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}
    variants = _variants(case, args)
    runs.update({f"steppingnet ({label})": [] for label in variants})
    teachers: dict[int, dict[str, Any]] = {}
    times: dict[str, list[float]] = {}
    cli = ""
    for seed in args.seeds:
        t0 = time.perf_counter()
        teacher_path, teacher_acc = _teacher(case, seed, base, args.schedule, out, args.device)
        teachers[seed] = {
            "path": args.public(str(teacher_path)),
            "accuracy": teacher_acc,
            "time_s": time.perf_counter() - t0,
        }
        recipe, overrides = _method_recipe(case, seed, base, args.schedule, teacher_path, args.method_overrides)
        cli = args.public(
            f"nni-steppingnet compare {CASES[case]} --seeds {seed} --device {args.device} "
            + " ".join(f"--set {shlex.quote(o)}" for o in overrides)
        )
        folder = out / case / f"seed{seed}" / "compare"
        if methods:
            run_compare(recipe, folder, methods=methods, seeds=[seed], device=args.device, resume=True, progress=False)
        for method in methods:
            result = _read(folder / f"seed{seed}" / method / "results.json")
            runs[method].append(result)
            times.setdefault(method, []).append(float(result.get("wall_time_s") or 0.0))
        for label, extra in variants.items():
            variant, _ = _method_recipe(
                case, seed, base, args.schedule, teacher_path, args.method_overrides + list(extra)
            )
            sub = out / case / f"seed{seed}" / f"variant-{label}"
            run_compare(
                variant, sub, methods=["steppingnet"], seeds=[seed], device=args.device, resume=True, progress=False
            )
            result = _read(sub / f"seed{seed}" / "steppingnet" / "results.json")
            runs[f"steppingnet ({label})"].append(result)
            times.setdefault(f"steppingnet ({label})", []).append(float(result.get("wall_time_s") or 0.0))
    summary = summarize({m: r for m, r in runs.items() if r})
    if args.variants_only:
        previous = args.previous_cases.get(case)
        if previous is None or not set(args.seeds) <= set(previous.get("seeds", [])):
            raise SystemExit(
                f"--variants-only: {args.json} holds no {case} record with seeds {list(args.seeds)}; "
                "run the case in full first (without --variants-only) with these --seeds"
            )
        record = dict(previous)
        record["summary"] = {**previous["summary"], **summary}
        record["wall_time_s"] = {**previous.get("wall_time_s", {}), **times}
        return record
    targets = check_targets({m: summary[m] for m in METHODS if m in summary})
    return {
        "recipe": CASES[case],
        "schedule": args.schedule,
        "overrides": SCHEDULES[args.schedule][case],
        "seeds": list(args.seeds),
        "teachers": teachers,
        "summary": summary,
        "targets": targets,
        "wall_time_s": times,
        "cli_per_seed": cli,
        "paper_table_i": PAPER_TABLE_I[case],
        "eval_split": "validation split",
        "extra_overrides": list(args.method_overrides),
    }


def run_ablation(args: argparse.Namespace, base: list[str]) -> dict[str, Any]:
    """Fig. 7 / Fig. 8 on ``--ablate-case`` (the paper: LeNet-3C1L), first seed, the schedule's
    method settings."""
    case, seed = args.ablate_case, args.seeds[0]
    out = Path(args.out)
    teacher_path, _ = _teacher(case, seed, base, args.schedule, out, args.device)
    recipe, overrides = _method_recipe(case, seed, base, args.schedule, teacher_path, args.method_overrides)
    expansions = [float(e) for e in args.expansions.split(",") if e.strip()]
    report = run_ablate(
        recipe,
        out / case / f"seed{seed}" / "ablate",
        seeds=[seed],
        expansions=expansions,
        device=args.device,
        resume=True,
        progress=False,
    )
    cli = args.public(
        f"nni-steppingnet ablate {CASES[case]} --seeds {seed} --expansions {args.expansions} "
        f"--device {args.device} " + " ".join(f"--set {shlex.quote(o)}" for o in overrides)
    )
    title = f"{PAPER_TABLE_I[case]['network']} ablations (Fig. 7, Fig. 8), seed {seed}, validation split"
    return {
        "case": case,
        "seed": seed,
        "summary": report["summary"],
        "variants": report["variants"],
        "expansions": report["expansions"],
        "cli": cli,
        "markdown": compare_markdown(report, title=title),
    }


# ------------------------------------------------------------------------------ reporting
def _paper_rows(case: str, record: dict[str, Any]) -> list[str]:
    """Table I layout: the paper's row, then ours per method (mean of the seeds)."""
    paper = PAPER_TABLE_I[case]
    header = "| source | Orig. Acc. | " + " | ".join(f"A_{i} | M_{i}/M_t" for i in range(1, 5)) + " | mean error |"
    rows = [header, "|" + "---|" * 11]
    cells = " | ".join(f"{a:.2f} | {m:.2f}" for a, m in paper["subnets"])
    paper_error = sum(100 - a for a, _ in paper["subnets"]) / 4
    rows.append(
        f"| paper Table I ({paper['network']}, CIFAR-10 test set) | {paper['original']:.2f} | {cells} | "
        f"{paper_error:.2f} |"
    )
    for method, data in record["summary"].items():
        cells = " | ".join(f"{100 * s['accuracy_mean']:.2f} | {100 * s['mac_ratio_mean']:.2f}" for s in data["subnets"])
        original = data.get("original_accuracy")
        rows.append(
            f"| ours, {method} ({len(data['seeds'])} seeds, validation split) | "
            f"{'n/a' if original is None else f'{100 * original:.2f}'} | {cells} | "
            f"{100 * data['mean_error']:.2f} |"
        )
    return rows


def _case_markdown(case: str, record: dict[str, Any]) -> str:
    report = {
        "summary": record["summary"],
        "seeds": record["seeds"],
        "targets": record["targets"],
        "recipe": {"name": record["recipe"]},
    }
    teacher_accs = ", ".join(f"seed {s}: {100 * t['accuracy']:.2f}%" for s, t in record["teachers"].items())
    times = ", ".join(f"{m} {sum(v) / len(v):.0f} s" for m, v in record["wall_time_s"].items())
    return "\n".join(
        [
            compare_markdown(report, title=f"{PAPER_TABLE_I[case]['network']} on CIFAR-10 (validation split)").rstrip(),
            "",
            "Table I layout (accuracies and M_i/M_t in %; ours on the validation split, the paper's on the test set):",
            "",
            *_paper_rows(case, record),
            "",
            f"Teachers (original network, trained once per seed and shared): {teacher_accs}. Mean wall time "
            f"per run: {times}.",
            "",
            f"Schedule `{record['schedule']}`: teacher {' '.join(record['overrides']['teacher']) or 'as the recipe'}; "
            f"methods {' '.join(record['overrides']['methods'] + record.get('extra_overrides', [])) or 'as the recipe'}"
            " (later keys win).",
            "",
            f"One seed's equivalent CLI: `{record['cli_per_seed']}`",
            "",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="CIFAR-10 training arrays (.npz with x_train, y_train)")
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, from {', '.join(CASES)}")
    parser.add_argument("--schedule", choices=list(SCHEDULES), default="reduced")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--val-fraction", type=float, default=0.1)
    parser.add_argument(
        "--criteria", action="store_true", help="also run SteppingNet with the class and noise criteria"
    )
    parser.add_argument(
        "--criteria-cases", default=",".join(CASES), help="cases the --criteria runs cover (default: all)"
    )
    parser.add_argument(
        "--ablate", action="store_true", help="also run the Fig. 7/8 ablations (--ablate-case, first seed)"
    )
    parser.add_argument(
        "--variant",
        dest="variants",
        action="append",
        default=[],
        metavar="LABEL:KEY=VALUE[,KEY=VALUE]",
        help="also run SteppingNet with these overrides, reported as 'steppingnet (LABEL)' (repeatable)",
    )
    parser.add_argument(
        "--methods",
        default=",".join(METHODS),
        help=f"comma-separated methods to run, from {', '.join(METHODS)} (default: all; a subset resumes "
        "or completes a run, e.g. one baseline on seeds that already have the others; the case's record in "
        "--json then holds only these methods, so give a new --json to keep the earlier one)",
    )
    parser.add_argument("--ablate-only", action="store_true", help="run only the ablations")
    parser.add_argument(
        "--variants-only",
        action="store_true",
        help="run only the teachers and the --variant runs and add them to the cases already in --json "
        "(run with the same --seeds and --schedule)",
    )
    parser.add_argument(
        "--merge",
        action="store_true",
        help="keep the other cases already in --json (e.g. cases run with different --seeds)",
    )
    parser.add_argument("--expansions", default="1.0,1.4,1.8,2.2")
    parser.add_argument(
        "--ablate-case",
        choices=list(CASES),
        default="lenet3c1l",
        help="network of the ablations (the paper's Figs. 7-8: lenet3c1l)",
    )
    parser.add_argument("--out", default=str(ROOT / "runs" / "cifar10"), help="run folders (git-ignored)")
    parser.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "cifar10.json"))
    parser.add_argument(
        "--docs",
        default=str(ROOT / "docs" / "results.md"),
        help="markdown file whose generated block is rewritten ('none' to skip)",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra recipe override for every method (not the teacher), e.g. retraining.epochs=6",
    )
    parser.add_argument(
        "--data-label",
        default=None,
        help="how reports spell the --data path (e.g. DATA_ROOT/cifar10/cifar10-train.npz)",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    data = Path(args.data).expanduser()
    if not data.is_file():
        raise SystemExit(f"--data {data}: no such file; give the CIFAR-10 training arrays (see docs/data.md)")
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        raise SystemExit(f"unknown case(s) {unknown}; choose from {', '.join(CASES)}")
    args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    args.criteria_cases = [c.strip() for c in args.criteria_cases.split(",") if c.strip()]
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown_methods = sorted(set(args.methods) - set(METHODS))
    if unknown_methods or not args.methods:
        raise SystemExit(f"--methods {unknown_methods or '(empty)'}: choose one or more of {', '.join(METHODS)}")
    base = _data_overrides(str(data.resolve()), args.val_fraction)
    args.method_overrides = list(args.overrides)
    label = args.data_label

    def public(text: str) -> str:
        """Reports name the data by its label and run folders relative to the repository."""
        if label:
            text = text.replace(str(data.resolve()), label).replace(args.data, label)
        return text.replace(str(Path(args.out).resolve()) + "/", "RUNS/")

    args.public = public
    command = public(
        "python3 benchmarks/cifar10.py "
        + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    )
    json_path = Path(args.json)
    previous = _read(json_path) if json_path.is_file() else {}
    args.previous_cases = previous.get("cases", {})
    if args.variants_only and not args.variants:
        raise SystemExit("--variants-only: name the runs with --variant LABEL:KEY=VALUE")
    results: dict[str, Any] = {
        "command": command,
        "machine": _machine(),
        "code": _code_state(),
        "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "schedule": args.schedule,
        "eval_split": "validation split",
        "val_fraction": args.val_fraction,
        "cases": dict(previous.get("cases", {})) if args.ablate_only or args.merge or args.variants_only else {},
        "ablation": previous.get("ablation"),
    }
    sections: list[str] = []
    if not args.ablate_only:
        for case in cases:
            record = run_case(case, args, base)
            results["cases"][case] = record
            print(_case_markdown(case, record))
    if args.ablate or args.ablate_only:
        results["ablation"] = run_ablation(args, base)
        print(results["ablation"]["markdown"])
    for case, record in results["cases"].items():
        sections.append(_case_markdown(case, record))
    if results.get("ablation"):
        ablation = results["ablation"]
        sections += [ablation["markdown"].rstrip(), "", f"Equivalent CLI: `{ablation['cli']}`", ""]
    atomic_write_json(json_path, results)
    panels_summary: dict[str, Any] = {}
    panels: list[tuple[str, list[str]]] = []
    for case, record in results["cases"].items():
        names = [f"{case}: {m}" for m in record["summary"]]
        panels_summary.update({f"{case}: {m}": v for m, v in record["summary"].items()})
        panels.append((f"{PAPER_TABLE_I[case]['network']}, CIFAR-10 validation split", names))
    if panels:
        plot_compare(panels_summary, json_path.with_suffix(".png"), panels=panels)
    block = "\n".join(
        [
            BEGIN,
            "",
            f"Generated by `{command}`; machine: {results['machine']['cpu']}, "
            f"{results['machine']['cores']} cores shared with other jobs, torch "
            f"{results['machine']['torch']} on {args.device} with {args.threads} thread(s); code "
            f"{results['code']}, started {results['started']}. Every accuracy is on a seeded, "
            f"stratified validation split ({100 * args.val_fraction:g}%) of the CIFAR-10 training "
            "images; the test set was not used. Plot: `benchmarks/results/cifar10.png`.",
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
    print(f"wrote {json_path}" + ("" if args.docs.lower() == "none" else f" and {args.docs}"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
