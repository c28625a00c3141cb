"""Reports of a run: the Table-I style markdown table and the accuracy-vs-MACs plot.

Both read the ``results.json`` dict written by :func:`nni_steppingnet.flow.run_recipe`
(accuracies in [0, 1], ``mac_ratio`` = subnet MACs / original MACs). The plot uses matplotlib's
object API on the Agg canvas, so it never opens a window or changes the global backend.
"""
from __future__ import annotations

import io
import logging
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from .checkpoint import atomic_write_bytes, atomic_write_json, atomic_write_text

__all__ = [
    "results_markdown",
    "table_markdown",
    "subnet_table_markdown",
    "plot_accuracy_vs_macs",
    "write_report",
    "RESULTS_JSON",
    "RESULTS_MD",
    "RESULTS_PNG",
]

logger = logging.getLogger(__name__)

RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"
RESULTS_PNG = "accuracy_vs_macs.png"


def _pct(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{100.0 * float(value):.{digits}f}%"


def _check_results(results: Mapping[str, Any]) -> None:
    for key in ("original", "subnets"):
        if key not in results:
            raise ValueError(f"results dict lacks {key!r}; pass the dict returned by run_recipe "
                             "or read from results.json")


def table_markdown(results: Mapping[str, Any]) -> str:
    """One row in the layout of the paper's Table I: original accuracy, then A_i and M_i/M_t."""
    _check_results(results)
    subnets = results["subnets"]
    header = ["Network", "Dataset", "Orig. Acc."]
    row = [str(results.get("recipe", {}).get("model", {}).get("name", "?")),
           str(results.get("dataset", {}).get("name", "?")),
           _pct(results["original"].get("accuracy"))]
    for sub in subnets:
        i = sub["index"]
        header += [f"A_{i}", f"M_{i}/M_t"]
        row += [_pct(sub.get("accuracy")), _pct(sub["mac_ratio"])]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), "| " + " | ".join(row) + " |"]
    return "\n".join(lines)


def subnet_table_markdown(results: Mapping[str, Any]) -> str:
    """Per-subnet details: accuracy, MACs, MAC ratio, budget and whether the budget is met."""
    _check_results(results)
    met = results.get("budgets_met_per_subnet") or [None] * len(results["subnets"])
    lines = ["| Subnet | Accuracy | MACs | M_i/M_t | Budget | Budget met |", "|---|---|---|---|---|---|"]
    for sub, ok in zip(results["subnets"], met):
        flag = "n/a" if ok is None else ("yes" if ok else "no")
        lines.append(f"| {sub['index']} | {_pct(sub.get('accuracy'))} | {int(sub['macs']):,} | "
                     f"{_pct(sub['mac_ratio'])} | {_pct(sub.get('budget'))} | {flag} |")
    original = results["original"]
    lines.append(f"| original | {_pct(original.get('accuracy'))} | {int(original['macs']):,} | 100.00% | | |")
    return "\n".join(lines)


def results_markdown(results: Mapping[str, Any]) -> str:
    """The full ``results.md`` text: title, Table-I row, per-subnet table and run facts."""
    _check_results(results)
    recipe = results.get("recipe", {})
    name = recipe.get("name", "run")
    parts = [f"# SteppingNet results: {name}", ""]
    if recipe.get("description"):
        parts += [str(recipe["description"]), ""]
    parts += ["Accuracy A_i of subnet i and its MACs M_i relative to the original network's MACs M_t "
              "(as in Table I of the SteppingNet paper).", "", table_markdown(results), "",
              subnet_table_markdown(results), ""]
    facts = []
    expanded = results.get("expanded")
    if expanded:
        facts.append(f"- constructed network: expansion {expanded.get('expansion')} of the original, "
                     f"{int(expanded.get('macs', 0)):,} MACs when fully active")
    if "budgets_met" in results:
        facts.append(f"- all budgets met: {'yes' if results['budgets_met'] else 'no'}")
    construction = results.get("construction") or {}
    if "iterations" in construction:
        facts.append(f"- construction iterations: {construction['iterations']}")
    if "wall_time_s" in results:
        facts.append(f"- wall time: {float(results['wall_time_s']):.1f} s on {results.get('device', '?')}")
    if facts:
        parts += facts + [""]
    return "\n".join(parts)


def plot_accuracy_vs_macs(
    results: Mapping[str, Any],
    path: str | os.PathLike[str],
    *,
    extra: Mapping[str, Sequence[tuple[float, float]]] | None = None,
    title: str | None = None,
) -> Path:
    """Write a PNG of accuracy (%) against M_i/M_t (%) of every subnet, with the original
    network's accuracy as a dashed line. ``extra`` adds named series of ``(mac_ratio, accuracy)``
    points (e.g. baselines). Written atomically."""
    _check_results(results)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.0, 4.2), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    subs = [s for s in results["subnets"] if s.get("accuracy") is not None]
    xs = [100.0 * float(s["mac_ratio"]) for s in subs]
    ys = [100.0 * float(s["accuracy"]) for s in subs]
    ax.plot(xs, ys, marker="o", label="SteppingNet subnets")
    for s, x, y in zip(subs, xs, ys):
        ax.annotate(str(s["index"]), (x, y), textcoords="offset points", xytext=(4, -12), fontsize=8)
    for name, points in (extra or {}).items():
        if points:
            ax.plot([100.0 * p[0] for p in points], [100.0 * p[1] for p in points], marker="s",
                    linestyle="--", label=name)
    original = results["original"].get("accuracy")
    if original is not None:
        ax.axhline(100.0 * float(original), color="gray", linestyle="--", linewidth=1,
                   label=f"original ({_pct(original)})")
    for s in results["subnets"]:
        if s.get("budget") is not None:
            ax.axvline(100.0 * float(s["budget"]), color="lightgray", linestyle=":", linewidth=1)
    ax.set_xlabel("MACs relative to the original network M_i/M_t (%)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title or f"{results.get('recipe', {}).get('name', 'SteppingNet')}: accuracy vs MACs")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return atomic_write_bytes(path, buffer.getvalue())


def write_report(results: Mapping[str, Any], out_dir: str | os.PathLike[str]) -> dict[str, Path]:
    """Write ``results.json``, ``results.md`` and ``accuracy_vs_macs.png`` into ``out_dir``."""
    folder = Path(out_dir)
    paths = {
        "json": atomic_write_json(folder / RESULTS_JSON, dict(results)),
        "md": atomic_write_text(folder / RESULTS_MD, results_markdown(results)),
        "png": plot_accuracy_vs_macs(results, folder / RESULTS_PNG),
    }
    logger.info("wrote %s", ", ".join(str(p) for p in paths.values()))
    return paths
