"""Statistics and markdown of ``compare`` / ``ablate`` reports: mean and spread over seeds, the
issue's targets, the tables."""

from __future__ import annotations

import logging
import math
import statistics
from typing import Any, Mapping, Sequence

__all__ = ["summarize", "check_targets", "compare_markdown", "mean_std"]

logger = logging.getLogger(__name__)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
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
            a_mean, a_std = mean_std(acc)
            r_mean, r_std = mean_std(ratio)
            subnets.append(
                {
                    "index": i + 1,
                    "budget": results[0]["subnets"][i].get("budget"),
                    "accuracy_mean": a_mean,
                    "accuracy_std": a_std,
                    "accuracies": acc,
                    "mac_ratio_mean": r_mean,
                    "mac_ratio_std": r_std,
                    "macs_mean": statistics.fmean(macs),
                    "macs": macs,
                }
            )
        errors = [statistics.fmean(1.0 - s["accuracy"] for s in r["subnets"]) for r in results]
        e_mean, e_std = mean_std(errors)
        originals = [r["original"]["accuracy"] for r in results if r["original"].get("accuracy") is not None]
        o_mean, o_std = mean_std(originals) if originals else (None, None)
        met = [r.get("budgets_met") for r in results]
        out[method] = {
            "seeds": [r["recipe"]["seed"] for r in results],
            "subnets": subnets,
            "mean_error": e_mean,
            "mean_error_std": e_std,
            "mean_errors": errors,
            "original_accuracy": o_mean,
            "original_accuracy_std": o_std,
            "budgets_met": all(bool(m) for m in met),
        }
    return out


def check_targets(
    summary: Mapping[str, Any],
    *,
    reference: str = "steppingnet",
    error_reduction: float = 0.10,
    largest_gap: float = 0.01,
) -> dict[str, Any] | None:
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
    lines = [
        f"## {title}",
        "",
        f"Recipe `{report.get('recipe', {}).get('name', '?')}`, seeds {', '.join(map(str, seeds))}"
        + (" (mean ± std)" if ns > 1 else "")
        + "; accuracy and M_i/M_t in %.",
        "",
    ]
    lines += ["| method | subnet | budget | M_i/M_t | MACs | accuracy |", "|---|---|---|---|---|---|"]
    for method, data in summary.items():
        for s in data["subnets"]:
            lines.append(
                f"| {method} | {s['index']} | {_pct(s['budget'])} | "
                f"{_pm(s['mac_ratio_mean'], s['mac_ratio_std'], ns)} | {s['macs_mean']:,.0f} | "
                f"{_pm(s['accuracy_mean'], s['accuracy_std'], ns)} |"
            )
    lines += [
        "",
        "| method | mean error over subnets | largest subnet | original | budgets met |",
        "|---|---|---|---|---|",
    ]
    for method, data in summary.items():
        last = data["subnets"][-1]
        original = data.get("original_accuracy")
        lines.append(
            f"| {method} | {_pm(data['mean_error'], data['mean_error_std'], ns)} | "
            f"{_pm(last['accuracy_mean'], last['accuracy_std'], ns)} | "
            f"{_pct(original) if original is not None else 'n/a'} | "
            f"{'yes' if data['budgets_met'] else 'no'} |"
        )
    targets = report.get("targets")
    if targets:
        lines += [
            "",
            f"Targets for {targets['reference']}"
            + (
                ""
                if summary.get(targets["reference"], {}).get("budgets_met", True)
                else " (note: its construction did not meet every budget)"
            )
            + ":",
            "",
        ]
        for method, t in targets["against"].items():
            gaps = ", ".join(f"{100 * g:+.2f}" for g in t["accuracy_gaps"])
            lines.append(
                f"- vs {method}: accuracy difference per subnet (points) {gaps} -> at or above at "
                f"every budget: {'met' if t['at_or_above_every_budget'] else 'MISSED'}; relative reduction "
                f"of the mean error {100 * t['error_reduction']:+.1f}% (target >= +10%): "
                f"{'met' if t['error_reduction_met'] else 'MISSED'}"
            )
        if targets.get("largest_subnet_gap") is not None:
            lines.append(
                f"- largest subnet {100 * targets['largest_subnet_gap']:.2f} points below the original "
                f"(target <= 1): {'met' if targets['largest_subnet_met'] else 'MISSED'}"
            )
    return "\n".join(lines) + "\n"
