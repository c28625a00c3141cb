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
    "stepping_table_markdown",
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
            raise ValueError(
                f"results dict lacks {key!r}; pass the dict returned by run_recipe or read from results.json"
            )


def table_markdown(results: Mapping[str, Any]) -> str:
    """One row in the layout of the paper's Table I: original accuracy, then A_i and M_i/M_t."""
    _check_results(results)
    subnets = results["subnets"]
    header = ["Network", "Dataset", "Orig. Acc."]
    row = [
        str(results.get("recipe", {}).get("model", {}).get("name", "?")),
        str(results.get("dataset", {}).get("name", "?")),
        _pct(results["original"].get("accuracy")),
    ]
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
        lines.append(
            f"| {sub['index']} | {_pct(sub.get('accuracy'))} | {int(sub['macs']):,} | "
            f"{_pct(sub['mac_ratio'])} | {_pct(sub.get('budget'))} | {flag} |"
        )
    original = results["original"]
    lines.append(f"| original | {_pct(original.get('accuracy'))} | {int(original['macs']):,} | 100.00% | | |")
    return "\n".join(lines)


def _ms_per_image(seconds: float, samples: int) -> str:
    return f"{1000.0 * float(seconds) / max(int(samples), 1):.3f}"


def stepping_table_markdown(results: Mapping[str, Any]) -> str:
    """Anytime inference (``results["stepping"]``, :func:`nni_steppingnet.flow.measure_stepping`):
    per step, the accuracy reached and the MACs and time spent to reach it by stepping with the
    runtime, against running exported subnets 1..s one after the other. Empty when absent."""
    stepping = results.get("stepping")
    if not stepping or not stepping.get("steps"):
        return ""
    samples = int(stepping.get("samples", 1))
    ref = (results.get("original") or {}).get("macs")
    lines = [
        "| Step to subnet | Accuracy | MACs spent: stepping | MACs: recomputing 1..s | Time stepping "
        "(ms/image) | Time recomputing 1..s (ms/image) | Subnet s alone (ms/image) |",
        "|---|---|---|---|---|---|---|",
    ]

    def macs(value: int) -> str:
        share = f" ({100.0 * value / ref:.1f}%)" if ref else ""
        return f"{int(value):,}{share}"

    for step in stepping["steps"]:
        lines.append(
            f"| {step['subnet']} | {_pct(step['accuracy'])} | {macs(step['macs_stepping'])} | "
            f"{macs(step['macs_recompute'])} | {_ms_per_image(step['time_stepping_s'], samples)} | "
            f"{_ms_per_image(step['time_recompute_s'], samples)} | "
            f"{_ms_per_image(step['time_subnet_s'], samples)} |"
        )
    return "\n".join(lines)


def results_markdown(results: Mapping[str, Any]) -> str:
    """The full ``results.md`` text: title, Table-I row, per-subnet table and run facts."""
    _check_results(results)
    recipe = results.get("recipe", {})
    name = recipe.get("name", "run")
    parts = [f"# SteppingNet results: {name}", ""]
    if recipe.get("description"):
        parts += [str(recipe["description"]), ""]
    parts += [
        "Accuracy A_i of subnet i and its MACs M_i relative to the original network's MACs M_t "
        "(as in Table I of the SteppingNet paper).",
        "",
        table_markdown(results),
        "",
        subnet_table_markdown(results),
        "",
    ]
    stepping = stepping_table_markdown(results)
    if stepping:
        info = results["stepping"]
        parts += [
            f"Anytime inference over the {int(info.get('samples', 0)):,} test images "
            f"({info.get('layout')} layout): the IncrementalRunner steps from subnet 1 to s "
            "computing only the new neurons, against running the exported subnets 1..s from "
            "scratch one after the other (MACs per image, % of the original network).",
            "",
            stepping,
            "",
        ]
    facts = []
    expanded = results.get("expanded")
    if expanded:
        facts.append(
            f"- constructed network: expansion {expanded.get('expansion')} of the original, "
            f"{int(expanded.get('macs', 0)):,} MACs when fully active"
        )
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
    points (e.g. baselines). With ``results["stepping"]`` a second panel shows the reuse:
    accuracy against the cumulative MACs spent to reach each subnet by stepping, against
    recomputing the exported subnets one after the other. Written atomically."""
    _check_results(results)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    stepping = results.get("stepping") or {}
    steps = stepping.get("steps") or []
    fig = Figure(figsize=(11.0, 4.2) if steps else (6.0, 4.2), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 2 if steps else 1, 1)
    subs = [s for s in results["subnets"] if s.get("accuracy") is not None]
    xs = [100.0 * float(s["mac_ratio"]) for s in subs]
    ys = [100.0 * float(s["accuracy"]) for s in subs]
    ax.plot(xs, ys, marker="o", label="SteppingNet subnets")
    for s, x, y in zip(subs, xs, ys):
        ax.annotate(str(s["index"]), (x, y), textcoords="offset points", xytext=(4, -12), fontsize=8)
    for name, points in (extra or {}).items():
        if points:
            ax.plot(
                [100.0 * p[0] for p in points], [100.0 * p[1] for p in points], marker="s", linestyle="--", label=name
            )
    original = results["original"].get("accuracy")
    if original is not None:
        ax.axhline(
            100.0 * float(original), color="gray", linestyle="--", linewidth=1, label=f"original ({_pct(original)})"
        )
    for s in results["subnets"]:
        if s.get("budget") is not None:
            ax.axvline(100.0 * float(s["budget"]), color="lightgray", linestyle=":", linewidth=1)
    ax.set_xlabel("MACs relative to the original network M_i/M_t (%)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title or f"{results.get('recipe', {}).get('name', 'SteppingNet')}: accuracy vs MACs")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    ref = results["original"].get("macs")
    if steps and ref:
        right = fig.add_subplot(1, 2, 2)
        acc = [100.0 * float(step["accuracy"]) for step in steps]
        for key, label, style, offset in (
            ("macs_stepping", "stepping (IncrementalRunner, reuses earlier subnets)", "-", (4, -12)),
            ("macs_recompute", "recomputing exported subnets 1..s", "--", (4, 6)),
        ):
            xs = [100.0 * float(step[key]) / float(ref) for step in steps]
            right.plot(xs, acc, marker="o", linestyle=style, label=label)
            for step, x, y in zip(steps, xs, acc):
                right.annotate(str(step["subnet"]), (x, y), textcoords="offset points", xytext=offset, fontsize=8)
        right.set_xlabel("cumulative MACs per image to reach subnet s (% of the original)")
        right.set_ylabel("accuracy (%)")
        right.set_title("anytime inference: computation reuse")
        right.grid(True, alpha=0.3)
        right.legend(loc="lower right", fontsize=8)
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
