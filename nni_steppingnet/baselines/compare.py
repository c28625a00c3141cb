"""The ``compare`` and ``ablate`` subcommands: SteppingNet against its baselines (paper Fig. 6)
and its ablations (Fig. 7 expansion ratios, Fig. 8 beta suppression / distillation).

Fairness. Every method of one seed uses the same recipe, data, teacher and budgets:

* the teacher (the original network) is trained once per seed (or loaded from
  ``teacher.checkpoint``) and handed to every method;
* SteppingNet runs through :func:`nni_steppingnet.flow.run_recipe` (construction + retraining);
* each baseline wraps the same expanded network (``steppingnet.expansion``), searches widths that
  meet the budgets with its own MAC rule (:func:`~nni_steppingnet.baselines.search_widths`), then
  trains with the same loop (:func:`nni_steppingnet.train.train_subnets_epoch`) and optimizer
  settings: first as many subnet-batches as SteppingNet's construction used (``iterations x N x
  m``; the construction's SGD settings, constant learning rate), then the recipe's retraining
  (same epochs, learning rate, cosine schedule, batch order, teacher and ``gamma``). Beta
  suppression is a SteppingNet technique; baselines use it only with ``--baseline-beta``.

Library functions here log; only :func:`main` prints tables and shows progress bars.
"""
from __future__ import annotations

import argparse
import io
import json
import logging
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from ..checkpoint import atomic_write_bytes, atomic_write_json, atomic_write_text, save_checkpoint, seed_everything
from ..config import Recipe, load_recipe, recipe_diff
from .anywidth import AnyWidthNet
from .slimmable import SlimmableNet
from .widths import SlicedNet, search_widths

__all__ = [
    "METHODS",
    "BASELINES",
    "ABLATION_VARIANTS",
    "BASELINE_FORMAT",
    "COMPARE_FORMAT",
    "add_arguments",
    "main",
    "train_teacher",
    "train_baseline",
    "run_baseline",
    "load_baseline",
    "run_compare",
    "run_ablate",
    "summarize",
    "check_targets",
    "compare_markdown",
    "plot_compare",
    "parse_list",
]

logger = logging.getLogger(__name__)

#: the methods ``compare`` knows, in report order
METHODS: tuple[str, ...] = ("steppingnet", "anywidth", "slimmable")
#: baseline name -> wrapper class
BASELINES: dict[str, type[SlicedNet]] = {"anywidth": AnyWidthNet, "slimmable": SlimmableNet}
#: ablation variant (Fig. 8) -> recipe overrides
ABLATION_VARIANTS: dict[str, tuple[str, ...]] = {
    "beta+kd": (),
    "no beta": ("construction.beta=1.0", "retraining.beta=1.0"),
    "no kd": ("retraining.gamma=1.0",),
    "no beta, no kd": ("construction.beta=1.0", "retraining.beta=1.0", "retraining.gamma=1.0"),
}
BASELINE_FORMAT = "nni_steppingnet.baseline/1"
COMPARE_FORMAT = "nni_steppingnet.compare/1"
TEACHER_FILE = "teacher.pt"
RESULTS_FILE = "results.json"

Reporter = Callable[[str, dict[str, Any]], None]


# ------------------------------------------------------------------------------ helpers
def parse_list(text: str, kind: type, what: str) -> list[Any]:
    """``"0,1,2"`` -> ``[0, 1, 2]`` (``kind`` int or float); raises ``ValueError`` naming ``what``."""
    items = [t.strip() for t in str(text).split(",") if t.strip()]
    if not items:
        raise ValueError(f"{what} must be a comma-separated list, got {text!r}")
    try:
        return [kind(t) for t in items]
    except ValueError as exc:
        raise ValueError(f"{what}: cannot read {text!r} as comma-separated {kind.__name__} values") from exc


def _check_seeds(seeds: Sequence[int]) -> list[int]:
    values = list(seeds)
    if not values:
        raise ValueError("give at least one seed")
    for s in values:
        if isinstance(s, bool) or not isinstance(s, int) or s < 0:
            raise ValueError(f"seeds must be non-negative ints, got {s!r}")
    if len(set(values)) != len(values):
        raise ValueError(f"seeds must be distinct, got {values}")
    return values


def _check_methods(methods: Sequence[str]) -> list[str]:
    values = [m.strip().lower() for m in methods]
    unknown = [m for m in values if m not in METHODS]
    if unknown or not values:
        raise ValueError(f"unknown method(s) {unknown or values}; choose from {', '.join(METHODS)}")
    if len(set(values)) != len(values):
        raise ValueError(f"methods must be distinct, got {values}")
    return [m for m in METHODS if m in values]


def _with(recipe: Recipe, **changes: Any) -> Recipe:
    """A copy of ``recipe`` with dotted keys (``teacher__checkpoint``) replaced, validated."""
    raw = recipe.to_dict()
    for key, value in changes.items():
        node = raw
        parts = key.split("__")
        for part in parts[:-1]:
            node = node[part]
        node[parts[-1]] = value
    return Recipe.from_dict(raw, source=recipe.source)


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    data = [float(v) for v in values]
    if not data:
        return float("nan"), float("nan")
    return statistics.fmean(data), (statistics.stdev(data) if len(data) > 1 else 0.0)


def _pct(value: float | None, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{100.0 * value:.{digits}f}"


def _pm(mean: float, std: float, n: int) -> str:
    return _pct(mean) if n <= 1 else f"{_pct(mean)} ± {_pct(std)}"


def _read_json(path: Path) -> dict[str, Any]:
    with path.open("r", encoding="utf-8") as handle:
        return json.load(handle)


def _prepare_out(out: Path, resume: bool, what: str) -> None:
    if out.exists() and any(out.iterdir()) and not resume:
        raise ValueError(f"{out} already holds {what} results; pass --resume (resume=True) to reuse "
                         "and continue them, or choose another --out folder")
    out.mkdir(parents=True, exist_ok=True)


# ------------------------------------------------------------------------------ teacher
def train_teacher(
    recipe: Recipe,
    out_dir: str | os.PathLike[str],
    *,
    device: str | torch.device = "auto",
    amp: str | None = None,
    progress: bool = False,
    data: tuple[Any, Any, Any] | None = None,
) -> tuple[Path, float]:
    """The teacher (original network) every method of ``recipe.seed`` distils from.

    Returns ``(path, test accuracy)``: ``teacher.checkpoint`` when the recipe names one, else
    ``out_dir/teacher.pt``, reused when present, otherwise trained as the flow trains it (same
    epochs, SGD settings and cosine schedule) and written atomically.
    """
    from ..flow import build_data, build_model, load_teacher, resolve_device
    from ..train import evaluate_model, train_dense

    dev = resolve_device(device)
    train_loader, test_loader, info = data if data is not None else build_data(recipe, dev)
    if recipe.teacher.checkpoint is not None:
        path = Path(recipe.teacher.checkpoint).expanduser().resolve()
        model, _ = load_teacher(path, recipe, info)
    else:
        path = (Path(out_dir) / TEACHER_FILE).resolve()
        if path.is_file():
            model, _ = load_teacher(path, recipe, info)
            logger.info("reusing teacher %s", path)
        else:
            seed_everything(recipe.seed)
            model = build_model(recipe, info, width=1.0)
            t = recipe.teacher
            losses = train_dense(model, train_loader, epochs=t.epochs, lr=t.lr, momentum=t.momentum,
                                 weight_decay=t.weight_decay, device=dev, amp=amp, progress=progress)
            save_checkpoint({"state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                             "losses": [float(v) for v in losses], "seed": recipe.seed}, path)
    accuracy = evaluate_model(model, test_loader, device=dev, amp=amp)
    logger.info("teacher (seed %d): accuracy %.4f (%s)", recipe.seed, accuracy, path)
    return path, accuracy


# ---------------------------------------------------------------------------- baselines
def train_baseline(
    net: SlicedNet,
    train_loader: Any,
    recipe: Recipe,
    *,
    teacher: torch.nn.Module | None,
    train_batches: int,
    baseline_beta: bool = False,
    device: str | torch.device = "cpu",
    amp: str | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Train a baseline with SteppingNet's loop and settings (see the module docstring).

    ``train_batches`` batches (each trains every subnet once, ascending) with the construction's
    SGD settings, then ``retraining.epochs`` epochs of distillation from ``teacher`` with the
    retraining settings, cosine schedule and the flow's per-epoch batch order. Returns the losses.
    """
    from ..train import make_optimizer, train_subnets_epoch

    if isinstance(train_batches, bool) or not isinstance(train_batches, int) or train_batches < 0:
        raise ValueError(f"train_batches must be an int >= 0, got {train_batches!r}")
    c, r = recipe.construction, recipe.retraining
    generator = getattr(train_loader, "generator", None)
    phase1: list[float] = []
    if train_batches:
        optimizer = make_optimizer(net.model.parameters(), c.lr, c.momentum, c.weight_decay)
        remaining, epoch = train_batches, 0
        per_epoch = len(train_loader)
        if per_epoch == 0:
            raise ValueError("train_loader yields no batches; give it a non-empty dataset")
        while remaining > 0:
            if isinstance(generator, torch.Generator):
                generator.manual_seed(recipe.seed + epoch)
            take = min(remaining, per_epoch)
            phase1.append(train_subnets_epoch(net, train_loader, optimizer,
                                              beta=c.beta if baseline_beta else None, device=device,
                                              amp=amp, max_batches=take, progress=progress))
            remaining -= take
            epoch += 1
    phase2: list[float] = []
    if r.epochs > 0:
        optimizer = make_optimizer(net.model.parameters(), r.lr, r.momentum, r.weight_decay)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=r.epochs)
        for epoch in range(r.epochs):
            if isinstance(generator, torch.Generator):
                generator.manual_seed(recipe.seed + 1_000_003 * (epoch + 1))
            phase2.append(train_subnets_epoch(net, train_loader, optimizer,
                                              beta=r.beta if baseline_beta else None, teacher=teacher,
                                              gamma=r.gamma, device=device, amp=amp, progress=progress,
                                              temperature=r.temperature))
            scheduler.step()
    return {"train_batches": train_batches, "subnet_steps": train_batches * net.num_subnets,
            "losses": phase1, "retraining_losses": phase2, "beta": bool(baseline_beta)}


def run_baseline(
    method: str,
    recipe: Recipe,
    out_dir: str | os.PathLike[str],
    *,
    teacher_path: str | os.PathLike[str] | None,
    train_batches: int | None = None,
    device: str | torch.device = "auto",
    amp: str | None = None,
    progress: bool = False,
    baseline_beta: bool = False,
    tolerance: float = 0.02,
    data: tuple[Any, Any, Any] | None = None,
) -> dict[str, Any]:
    """Build, size, train and evaluate one baseline (``'anywidth'`` or ``'slimmable'``) for
    ``recipe`` and write ``results.json`` (same schema as a SteppingNet run, plus ``widths``,
    ``training`` and ``isolation_ok``) and ``checkpoint.pt`` (the net's state) into ``out_dir``.

    ``train_batches`` defaults to ``construction.iterations * construction.batches_per_iteration``.
    """
    from ..flow import build_data, build_model, example_inputs, load_teacher, reference_macs, resolve_device
    from ..train import check_amp, evaluate

    if method not in BASELINES:
        raise ValueError(f"unknown baseline {method!r}; choose from {', '.join(BASELINES)}")
    amp = check_amp(amp)
    started = time.perf_counter()
    dev = resolve_device(device)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train_loader, test_loader, info = data if data is not None else build_data(recipe, dev)
    ref = reference_macs(recipe, info)
    teacher = None
    if teacher_path is not None:
        teacher, _ = load_teacher(teacher_path, recipe, info)
        teacher.to(dev).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
    if train_batches is None:
        train_batches = recipe.construction.iterations * recipe.construction.batches_per_iteration
    seed_everything(recipe.seed)
    model = build_model(recipe, info, width=recipe.steppingnet.expansion)
    n = recipe.steppingnet.num_subnets
    net = BASELINES[method](model, example_inputs(info), n)
    plan = search_widths(net, recipe.steppingnet.budgets, ref, tolerance=tolerance)
    net.model.to(dev)
    t0 = time.perf_counter()
    training = train_baseline(net, train_loader, recipe, teacher=teacher, train_batches=train_batches,
                              baseline_beta=baseline_beta, device=dev, amp=amp, progress=progress)
    training["time_s"] = time.perf_counter() - t0
    accuracies = evaluate(net, test_loader, device=dev, amp=amp)
    net.model.to("cpu")
    teacher_accuracy = None
    if teacher is not None:
        from ..train import evaluate_model

        teacher_accuracy = evaluate_model(teacher, test_loader, device=dev, amp=amp)
    problems = net.check_isolation()
    subnets = []
    for s in range(1, n + 1):
        m = net.macs(s)
        subnets.append({"index": s, "accuracy": accuracies[s - 1], "macs": m, "mac_ratio": m / ref,
                        "budget": plan.budgets[s - 1], "budget_gap": m / ref - plan.budgets[s - 1],
                        "widths": plan.counts[s - 1]})
    results: dict[str, Any] = {
        "format": BASELINE_FORMAT,
        "method": method,
        "recipe": recipe.to_dict(),
        "original": {"accuracy": teacher_accuracy, "macs": ref},
        "subnets": subnets,
        "budgets_met": plan.all_met,
        "budgets_met_per_subnet": plan.budgets_met,
        "tolerance": tolerance,
        "widths": plan.to_dict(),
        "groups": [{"name": g.name, "size": g.size} for g in net.groups],
        "expanded": {"expansion": recipe.steppingnet.expansion, "macs": net.full_macs},
        "isolation_ok": not problems,
        "training": training,
        "dataset": {"name": info.name, "num_classes": info.num_classes, "in_chans": info.in_chans,
                    "img_size": info.img_size},
        "device": str(dev),
        "amp": amp,
        "wall_time_s": time.perf_counter() - started,
    }
    save_checkpoint({"format": BASELINE_FORMAT, "method": method, "recipe": recipe.to_dict(),
                     "info": dict(results["dataset"]), "net": net.state_dict()}, out / "checkpoint.pt")
    atomic_write_json(out / RESULTS_FILE, results)
    logger.info("%s (seed %d): accuracies %s at MAC ratios %s", method, recipe.seed,
                [round(a, 4) for a in accuracies], [round(s["mac_ratio"], 4) for s in subnets])
    return results


def load_baseline(path: str | os.PathLike[str]) -> tuple[SlicedNet, Recipe]:
    """Rebuild a trained baseline from the ``checkpoint.pt`` (or its folder) that
    :func:`run_baseline` wrote; returns ``(net, recipe)`` on the CPU."""
    from ..checkpoint import load_checkpoint_file
    from ..data import DatasetInfo
    from ..errors import CheckpointError
    from ..flow import build_model, example_inputs

    source = Path(path)
    if source.is_dir():
        source = source / "checkpoint.pt"
    state = load_checkpoint_file(source)
    if state.get("format") != BASELINE_FORMAT or state.get("method") not in BASELINES or "info" not in state:
        raise CheckpointError(f"{source} is not a baseline checkpoint written by run_baseline (format "
                              f"{state.get('format')!r}, expected {BASELINE_FORMAT!r} with method and info)")
    recipe = Recipe.from_dict(state["recipe"], source=str(source))
    info = DatasetInfo(**state["info"])
    model = build_model(recipe, info, width=recipe.steppingnet.expansion)
    net = BASELINES[state["method"]](model, example_inputs(info), recipe.steppingnet.num_subnets, verify=False)
    net.load_state_dict(state["net"])
    return net, recipe


# ---------------------------------------------------------------------------- aggregation
def summarize(runs: Mapping[str, Sequence[Mapping[str, Any]]]) -> dict[str, Any]:
    """Per method (or variant): mean/std over seeds of every subnet's accuracy, MACs and MAC ratio,
    the mean error over the subnets and the original accuracy. ``runs[method]`` lists the
    ``results.json`` dicts of its seeds."""
    out: dict[str, Any] = {}
    for method, results in runs.items():
        if not results:
            continue
        n = len(results[0]["subnets"])
        subnets = []
        for i in range(n):
            acc = [r["subnets"][i]["accuracy"] for r in results]
            ratio = [r["subnets"][i]["mac_ratio"] for r in results]
            macs = [r["subnets"][i]["macs"] for r in results]
            a_mean, a_std = _mean_std(acc)
            r_mean, r_std = _mean_std(ratio)
            subnets.append({"index": i + 1, "budget": results[0]["subnets"][i].get("budget"),
                            "accuracy_mean": a_mean, "accuracy_std": a_std, "accuracies": acc,
                            "mac_ratio_mean": r_mean, "mac_ratio_std": r_std,
                            "macs_mean": statistics.fmean(macs), "macs": macs})
        errors = [statistics.fmean(1.0 - s["accuracy"] for s in r["subnets"]) for r in results]
        e_mean, e_std = _mean_std(errors)
        originals = [r["original"]["accuracy"] for r in results if r["original"].get("accuracy") is not None]
        o_mean, o_std = _mean_std(originals) if originals else (None, None)
        met = [r.get("budgets_met") for r in results]
        out[method] = {"seeds": [r["recipe"]["seed"] for r in results], "subnets": subnets,
                       "mean_error": e_mean, "mean_error_std": e_std, "mean_errors": errors,
                       "original_accuracy": o_mean, "original_accuracy_std": o_std,
                       "budgets_met": all(bool(m) for m in met)}
    return out


def check_targets(summary: Mapping[str, Any], *, reference: str = "steppingnet",
                  error_reduction: float = 0.10, largest_gap: float = 0.01) -> dict[str, Any] | None:
    """The issue's targets for ``reference`` against every other method of ``summary``: accuracy at
    or above at every budget, mean error over the subnets at least ``error_reduction`` lower
    (relative), and its largest subnet within ``largest_gap`` of the original accuracy."""
    if reference not in summary or len(summary) < 2:
        return None
    ref = summary[reference]
    out: dict[str, Any] = {"reference": reference, "against": {}}
    for method, other in summary.items():
        if method == reference:
            continue
        gaps = [a["accuracy_mean"] - b["accuracy_mean"] for a, b in zip(ref["subnets"], other["subnets"])]
        reduction = 1.0 - ref["mean_error"] / other["mean_error"] if other["mean_error"] > 0 else float("nan")
        out["against"][method] = {
            "accuracy_gaps": gaps,
            "at_or_above_every_budget": all(g >= 0 for g in gaps),
            "error_reduction": reduction,
            "error_reduction_met": bool(reduction >= error_reduction),
        }
    original = ref.get("original_accuracy")
    last = ref["subnets"][-1]["accuracy_mean"]
    out["largest_subnet_gap"] = None if original is None else original - last
    out["largest_subnet_met"] = None if original is None else bool(original - last <= largest_gap)
    return out


def compare_markdown(report: Mapping[str, Any], *, title: str = "Comparison") -> str:
    """Tables of a :func:`run_compare` / :func:`run_ablate` report: method x subnet (accuracy,
    MACs, MAC ratio), a per-method summary and, when present, the targets."""
    summary = report["summary"]
    seeds = report.get("seeds", [])
    ns = len(seeds)
    lines = [f"## {title}", "",
             f"Recipe `{report.get('recipe', {}).get('name', '?')}`, seeds {', '.join(map(str, seeds))}"
             + (" (mean ± std)" if ns > 1 else "") + "; accuracy and M_i/M_t in %.", ""]
    lines += ["| method | subnet | budget | M_i/M_t | MACs | accuracy |", "|---|---|---|---|---|---|"]
    for method, data in summary.items():
        for s in data["subnets"]:
            lines.append(f"| {method} | {s['index']} | {_pct(s['budget'])} | "
                         f"{_pm(s['mac_ratio_mean'], s['mac_ratio_std'], ns)} | {s['macs_mean']:,.0f} | "
                         f"{_pm(s['accuracy_mean'], s['accuracy_std'], ns)} |")
    lines += ["", "| method | mean error over subnets | largest subnet | original | budgets met |",
              "|---|---|---|---|---|"]
    for method, data in summary.items():
        last = data["subnets"][-1]
        original = data.get("original_accuracy")
        lines.append(f"| {method} | {_pm(data['mean_error'], data['mean_error_std'], ns)} | "
                     f"{_pm(last['accuracy_mean'], last['accuracy_std'], ns)} | "
                     f"{_pct(original) if original is not None else 'n/a'} | "
                     f"{'yes' if data['budgets_met'] else 'no'} |")
    targets = report.get("targets")
    if targets:
        lines += ["", f"Targets for {targets['reference']}"
                  + ("" if summary.get(targets["reference"], {}).get("budgets_met", True)
                     else " (note: its construction did not meet every budget)") + ":", ""]
        for method, t in targets["against"].items():
            gaps = ", ".join(f"{100 * g:+.2f}" for g in t["accuracy_gaps"])
            lines.append(f"- vs {method}: accuracy difference per subnet (points) {gaps} -> at or above at "
                         f"every budget: {'met' if t['at_or_above_every_budget'] else 'MISSED'}; relative reduction "
                         f"of the mean error {100 * t['error_reduction']:+.1f}% (target >= +10%): "
                         f"{'met' if t['error_reduction_met'] else 'MISSED'}")
        if targets.get("largest_subnet_gap") is not None:
            lines.append(f"- largest subnet {100 * targets['largest_subnet_gap']:.2f} points below the original "
                         f"(target <= 1): {'met' if targets['largest_subnet_met'] else 'MISSED'}")
    return "\n".join(lines) + "\n"


def plot_compare(
    summary: Mapping[str, Any],
    path: str | os.PathLike[str],
    *,
    title: str = "accuracy vs MACs",
    panels: Sequence[tuple[str, Sequence[str]]] | None = None,
) -> Path:
    """PNG of accuracy (%) against M_i/M_t (%): one line per method with std error bars, the
    original network as a horizontal line. ``panels`` splits methods over subplots
    (``[(panel title, [method, ...]), ...]``). Written atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = list(panels) if panels else [(title, list(summary))]
    fig = Figure(figsize=(6.2 * len(panels), 4.4), dpi=110)
    FigureCanvasAgg(fig)
    markers = "osD^v<>pX*"
    for p, (panel_title, methods) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), p + 1)
        originals = []
        for j, method in enumerate(methods):
            data = summary.get(method)
            if data is None:
                continue
            xs = [100 * s["mac_ratio_mean"] for s in data["subnets"]]
            ys = [100 * s["accuracy_mean"] for s in data["subnets"]]
            es = [100 * s["accuracy_std"] for s in data["subnets"]]
            ax.errorbar(xs, ys, yerr=es, marker=markers[j % len(markers)], capsize=3, label=method)
            if data.get("original_accuracy") is not None:
                originals.append(data["original_accuracy"])
        if originals:
            original = statistics.fmean(originals)
            ax.axhline(100 * original, color="gray", linestyle="--", linewidth=1,
                       label=f"original ({100 * original:.2f}%)")
        ax.set_xlabel("MACs relative to the original network M_i/M_t (%)")
        ax.set_ylabel("accuracy (%)")
        ax.set_title(panel_title)
        ax.grid(True, alpha=0.3)
        ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return atomic_write_bytes(path, buffer.getvalue())


# ------------------------------------------------------------------------------ runners
def _run_steppingnet(recipe: Recipe, out: Path, *, resume: bool, device: str | torch.device, amp: str | None,
                     progress: bool, reporter: Reporter | None) -> dict[str, Any]:
    from ..flow import CHECKPOINT_NAME, run_recipe

    results_path = out / RESULTS_FILE
    if results_path.is_file() and (out / CHECKPOINT_NAME).is_file():
        results = _read_json(results_path)
        if results.get("stage", "done") == "done" and not recipe_diff(results.get("recipe", {}), recipe.to_dict()):
            logger.info("reusing finished run %s", out)
            return results
    return run_recipe(recipe, out, resume=(out / CHECKPOINT_NAME).is_file() and resume, device=device,
                      amp=amp, progress=progress, reporter=reporter)


def _reuse_baseline(out: Path, recipe: Recipe) -> dict[str, Any] | None:
    path = out / RESULTS_FILE
    if not path.is_file():
        return None
    results = _read_json(path)
    differ = recipe_diff(results.get("recipe", {}), recipe.to_dict())
    if differ:
        raise ValueError(f"cannot resume {out}: its recipe differs ({'; '.join(differ[:6])}); use the "
                         "same recipe and --set values, or another --out")
    logger.info("reusing finished baseline %s", out)
    return results


def run_compare(
    recipe: Recipe | str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    methods: Sequence[str] = METHODS,
    seeds: Sequence[int] | None = None,
    device: str | torch.device = "auto",
    amp: str | None = None,
    progress: bool = False,
    resume: bool = False,
    baseline_beta: bool = False,
    tolerance: float = 0.02,
    reporter: Reporter | None = None,
) -> dict[str, Any]:
    """Run every method of ``methods`` for every seed with one teacher per seed and the recipe's
    budgets; write ``compare.json``, ``compare.md`` and ``compare.png`` into ``out_dir``.

    Layout: ``out_dir/seed<k>/teacher.pt`` and ``out_dir/seed<k>/<method>/`` (a SteppingNet run
    folder, or a baseline's ``results.json`` + ``checkpoint.pt``). With ``resume`` finished
    runs are reused and an interrupted SteppingNet run continues from its checkpoint.
    """
    from ..flow import build_data, resolve_device

    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    methods = _check_methods(methods)
    seeds = _check_seeds([recipe.seed] if seeds is None else seeds)
    if not 0 < tolerance < 1:
        raise ValueError(f"tolerance must be a fraction in (0, 1), got {tolerance!r}")
    dev = resolve_device(device)
    out = Path(out_dir)
    _prepare_out(out, resume, "compare")
    started = time.perf_counter()
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}
    for seed in seeds:
        seeded = _with(recipe, seed=seed)
        seed_dir = out / f"seed{seed}"
        data = build_data(seeded, dev)
        teacher_path, _ = train_teacher(seeded, seed_dir, device=dev, amp=amp, progress=progress, data=data)
        seeded = _with(seeded, teacher__checkpoint=str(teacher_path))
        train_batches = None
        if "steppingnet" in methods:
            results = _run_steppingnet(seeded, seed_dir / "steppingnet", resume=resume, device=dev, amp=amp,
                                       progress=progress, reporter=reporter)
            runs["steppingnet"].append(results)
            iterations = int(results.get("construction", {}).get("iterations") or seeded.construction.iterations)
            train_batches = iterations * seeded.construction.batches_per_iteration
        for method in methods:
            if method == "steppingnet":
                continue
            method_dir = seed_dir / method
            results = _reuse_baseline(method_dir, seeded) if resume else None
            if results is None:
                if reporter is not None:
                    reporter("stage", {"stage": method, "seed": seed})
                results = run_baseline(method, seeded, method_dir, teacher_path=teacher_path,
                                       train_batches=train_batches, device=dev, amp=amp, progress=progress,
                                       baseline_beta=baseline_beta, tolerance=tolerance, data=data)
            runs[method].append(results)
    summary = summarize(runs)
    report = {
        "format": COMPARE_FORMAT,
        "recipe": recipe.to_dict(),
        "methods": methods,
        "seeds": seeds,
        "baseline_beta": baseline_beta,
        "tolerance": tolerance,
        "summary": summary,
        "targets": check_targets(summary),
        "runs": {m: [_run_digest(r) for r in rs] for m, rs in runs.items()},
        "device": str(dev),
        "wall_time_s": time.perf_counter() - started,
    }
    _write_report(report, out, "compare", f"{recipe.name}: SteppingNet vs baselines",
                  [(f"{recipe.name}: accuracy vs MACs", methods)])
    return report


def run_ablate(
    recipe: Recipe | str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    seeds: Sequence[int] | None = None,
    expansions: Sequence[float] = (1.0, 1.4, 1.8, 2.2),
    variants: Sequence[str] | None = None,
    device: str | torch.device = "auto",
    amp: str | None = None,
    progress: bool = False,
    resume: bool = False,
    reporter: Reporter | None = None,
) -> dict[str, Any]:
    """SteppingNet with and without beta suppression and distillation (paper Fig. 8; see
    :data:`ABLATION_VARIANTS`) and a sweep over expansion ratios (Fig. 7), one teacher per seed;
    writes ``ablate.json``, ``ablate.md`` and ``ablate.png`` into ``out_dir``. A sweep point equal
    to the recipe's expansion reuses the ``beta+kd`` runs."""
    from ..flow import build_data, resolve_device

    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    seeds = _check_seeds([recipe.seed] if seeds is None else seeds)
    chosen = list(ABLATION_VARIANTS) if variants is None else list(variants)
    unknown = [v for v in chosen if v not in ABLATION_VARIANTS]
    if unknown:
        raise ValueError(f"unknown ablation variant(s) {unknown}; choose from {list(ABLATION_VARIANTS)}")
    expansions = [float(e) for e in expansions]
    if any(not math.isfinite(e) or e <= 0 for e in expansions):
        raise ValueError(f"expansions must be positive numbers, got {expansions}")
    if len(set(expansions)) != len(expansions):
        raise ValueError(f"expansions must be distinct, got {expansions}")
    dev = resolve_device(device)
    out = Path(out_dir)
    _prepare_out(out, resume, "ablate")
    started = time.perf_counter()
    # name -> (folder, overrides)
    plan: dict[str, tuple[str, tuple[str, ...]]] = {}
    for name in chosen:
        plan[name] = (name.replace(", ", "-").replace(" ", "-").replace("+", "-"), ABLATION_VARIANTS[name])
    sweep: list[str] = []
    for e in expansions:
        name = f"expansion {e:g}"
        sweep.append(name)
        if math.isclose(e, recipe.steppingnet.expansion) and "beta+kd" in plan:
            continue
        plan[name] = (f"expansion-{e:g}", (f"steppingnet.expansion={e}",))
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in plan}
    for seed in seeds:
        seeded = _with(recipe, seed=seed)
        seed_dir = out / f"seed{seed}"
        data = build_data(seeded, dev)
        teacher_path, _ = train_teacher(seeded, seed_dir, device=dev, amp=amp, progress=progress, data=data)
        seeded = _with(seeded, teacher__checkpoint=str(teacher_path))
        for name, (folder, overrides) in plan.items():
            variant = seeded.with_overrides(list(overrides))
            if reporter is not None:
                reporter("stage", {"stage": name, "seed": seed})
            runs[name].append(_run_steppingnet(variant, seed_dir / folder, resume=resume, device=dev, amp=amp,
                                               progress=progress, reporter=reporter))
    ordered = {name: runs[name] for name in chosen}
    for name in sweep:
        ordered[name] = runs.get(name, runs.get("beta+kd", []))
    summary = summarize(ordered)
    runs = ordered
    report = {
        "format": COMPARE_FORMAT,
        "recipe": recipe.to_dict(),
        "variants": {name: list(ABLATION_VARIANTS[name]) for name in chosen},
        "expansions": expansions,
        "seeds": seeds,
        "summary": summary,
        "runs": {m: [_run_digest(r) for r in rs] for m, rs in runs.items()},
        "device": str(dev),
        "wall_time_s": time.perf_counter() - started,
    }
    panels = [(f"{recipe.name}: beta suppression / distillation (Fig. 8)", chosen)]
    if sweep:
        panels.append((f"{recipe.name}: expansion ratio (Fig. 7)", sweep))
    _write_report(report, out, "ablate", f"{recipe.name}: SteppingNet ablations", panels)
    return report


def _run_digest(results: Mapping[str, Any]) -> dict[str, Any]:
    keep = ("method", "original", "subnets", "budgets_met", "budgets_met_per_subnet", "isolation_ok",
            "wall_time_s", "training", "widths")
    digest = {k: results[k] for k in keep if k in results}
    digest["seed"] = results.get("recipe", {}).get("seed")
    construction = results.get("construction")
    if isinstance(construction, Mapping):
        digest["construction"] = {k: construction.get(k) for k in ("iterations", "final_mac_ratios", "time_s")}
    return digest


def _write_report(report: dict[str, Any], out: Path, stem: str, title: str,
                  panels: Sequence[tuple[str, Sequence[str]]]) -> None:
    atomic_write_json(out / f"{stem}.json", report)
    atomic_write_text(out / f"{stem}.md", compare_markdown(report, title=title))
    plot_compare(report["summary"], out / f"{stem}.png", panels=panels)
    logger.info("wrote %s", ", ".join(str(out / f"{stem}.{ext}") for ext in ("json", "md", "png")))


# ---------------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    """Arguments of the ``compare`` and ``ablate`` subcommands."""
    if name not in ("compare", "ablate"):
        raise ValueError(f"baselines.compare has no subcommand {name!r}")
    parser.add_argument("recipe", help="bundled recipe name (see `nni-steppingnet recipes`) or a YAML file")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe value as in `run`, e.g. --set data.root=/data (repeatable)")
    parser.add_argument("--seeds", default=None, metavar="S1,S2,...",
                        help="seeds to repeat with (default: the recipe's seed); reports mean ± std")
    parser.add_argument("--out", default=None, help=f"output folder (default: runs/{name}-<recipe name>)")
    parser.add_argument("--resume", action="store_true", help="reuse finished runs in --out and continue the rest")
    parser.add_argument("--device", default="auto", metavar="auto|cpu|cuda[:K]",
                        help="where to run (default auto: CUDA when present)")
    parser.add_argument("--amp", choices=["bf16"], default=None, help="bfloat16 autocast")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    if name == "compare":
        parser.add_argument("--methods", default=",".join(METHODS), metavar="M1,M2,...",
                            help=f"methods to run (default: {','.join(METHODS)})")
        parser.add_argument("--baseline-beta", action="store_true",
                            help="train the baselines with beta suppression too (off by default)")
        parser.add_argument("--tolerance", type=float, default=0.02,
                            help="how far (fraction of the original MACs) a baseline's subnet may be from "
                                 "its budget (default 0.02)")
    else:
        parser.add_argument("--expansions", default="1.0,1.4,1.8,2.2", metavar="E1,E2,...",
                            help="expansion ratios of the Fig. 7 sweep (default 1.0,1.4,1.8,2.2; "
                                 "'none' to skip)")
        parser.add_argument("--variants", default=None, metavar="V1,V2,...",
                            help=f"Fig. 8 variants to run, from {', '.join(ABLATION_VARIANTS)} with ';' "
                                 "between names (default: all)")


def main(args: argparse.Namespace) -> int:
    """Run ``compare`` or ``ablate`` (dispatching on ``args.command``), print the tables."""
    command = getattr(args, "command", None)
    if command not in ("compare", "ablate"):
        raise ValueError(f"baselines.compare handles compare and ablate, not {command!r}")
    from ..flow_cli import CliReporter

    recipe = load_recipe(args.recipe, list(args.overrides or []))
    seeds = None if args.seeds is None else parse_list(args.seeds, int, "--seeds")
    out = Path(args.out) if args.out else Path("runs") / f"{command}-{recipe.name}"
    progress = not args.no_progress
    reporter = CliReporter(enabled=progress)

    def report_stage(kind: str, payload: dict[str, Any]) -> None:
        if kind == "stage" and payload.get("stage") not in ("teacher", "construction", "retraining",
                                                            "evaluation") and progress:
            print(f"[seed {payload.get('seed')}] {payload['stage']}", file=sys.stderr)
        reporter(kind, payload)

    try:
        if command == "compare":
            methods = [m for m in args.methods.split(",") if m.strip()]
            run_compare(recipe, out, methods=methods, seeds=seeds, device=args.device, amp=args.amp,
                        progress=progress, resume=args.resume, baseline_beta=args.baseline_beta,
                        tolerance=args.tolerance, reporter=report_stage)
        else:
            expansions: list[float] = []
            if args.expansions.strip().lower() not in ("", "none"):
                expansions = parse_list(args.expansions, float, "--expansions")
            variants = None if args.variants is None else [v.strip() for v in args.variants.split(";") if v.strip()]
            run_ablate(recipe, out, seeds=seeds, expansions=expansions, variants=variants,
                       device=args.device, amp=args.amp, progress=progress, resume=args.resume,
                       reporter=report_stage)
    finally:
        reporter.close()
    print((out / f"{command}.md").read_text(encoding="utf-8"))
    print(f"results: {out / (command + '.json')}, {out / (command + '.md')}, {out / (command + '.png')}")
    return 0
