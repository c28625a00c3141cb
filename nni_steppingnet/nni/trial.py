"""NNI trial of ``nni-steppingnet tune``: one recipe run with the parameters NNI chose.

Run by NNI as ``python -m nni_steppingnet.nni.trial --recipe recipe.yaml``. The trial

1. asks NNI for its parameters (``nni.get_next_parameter()``) and turns them into recipe
   overrides (:func:`nni_steppingnet.nni.search_space.params_to_overrides`);
2. runs the recipe's flow (:func:`nni_steppingnet.flow.run_recipe`) in ``$NNI_OUTPUT_DIR/run``,
   reporting an intermediate result after every construction iteration: ``default`` is the mean
   accuracy of the subnets on the recipe's monitor samples (the fraction of budgets met when
   ``construction.monitor_samples`` is 0);
3. reports the final result :func:`trial_metrics`: ``default`` (the mean test accuracy of the
   subnets, minus 1 when a MAC budget is missed so that such trials always rank last), ``auc``
   (area under the anytime accuracy-MAC curve, :func:`anytime_auc`), the per-subnet accuracies
   and MAC ratios, and ``params``: the parameters it received, echoed so that every metric can be
   checked against the parameters NNI gave that trial.

Outside NNI (standalone) ``--params '{"beta": 0.8}'`` supplies the parameters.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

__all__ = ["anytime_auc", "trial_metrics", "intermediate_metric", "build_parser", "main"]

logger = logging.getLogger(__name__)


def anytime_auc(subnets: Sequence[Mapping[str, Any]]) -> float:
    """Area under the anytime accuracy curve over MAC ratios 0..1.

    ``A(x)`` is the accuracy of the largest subnet whose MAC ratio (MACs / original MACs) is at
    most ``x`` (0 when none fits); the result is ``integral_0^1 A(x) dx`` in [0, 1]. Ratios above
    1 (an expanded network) are capped at 1.
    """
    points = sorted((min(max(float(s["mac_ratio"]), 0.0), 1.0), float(s["accuracy"])) for s in subnets)
    area = 0.0
    for i, (ratio, accuracy) in enumerate(points):
        upper = points[i + 1][0] if i + 1 < len(points) else 1.0
        area += accuracy * max(upper - ratio, 0.0)
    return area


def intermediate_metric(entry: Mapping[str, Any]) -> dict[str, Any]:
    """The intermediate result of one construction iteration (``default`` must be a number)."""
    accuracies = entry.get("accuracies")
    met = entry.get("budgets_met") or []
    if accuracies:
        default = float(sum(accuracies) / len(accuracies))
    else:
        default = float(sum(bool(m) for m in met) / len(met)) if met else 0.0
    out: dict[str, Any] = {"default": default, "iteration": int(entry.get("iteration", 0))}
    if entry.get("mac_ratios") is not None:
        out["mac_ratios"] = [float(r) for r in entry["mac_ratios"]]
    if accuracies:
        out["accuracies"] = [float(a) for a in accuracies]
    return out


def trial_metrics(results: Mapping[str, Any], params: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """The final result of a trial from ``run_recipe``'s results dict."""
    subnets = list(results["subnets"])
    accuracies = [float(s["accuracy"]) for s in subnets]
    mean = sum(accuracies) / len(accuracies)
    met = bool(results.get("budgets_met", False))
    return {
        "default": mean if met else mean - 1.0,
        "mean_accuracy": mean,
        "auc": anytime_auc(subnets),
        "budgets_met": met,
        "accuracies": accuracies,
        "mac_ratios": [float(s["mac_ratio"]) for s in subnets],
        "original_accuracy": results.get("original", {}).get("accuracy"),
        "params": dict(params),
        "overrides": list(overrides),
        "recipe": results.get("recipe"),
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m nni_steppingnet.nni.trial", description="one NNI trial of nni-steppingnet tune"
    )
    parser.add_argument("--recipe", required=True, help="the resolved recipe YAML written by tune")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:K (default auto)")
    parser.add_argument("--out", default=None, help="run folder (default $NNI_OUTPUT_DIR/run)")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (tune sets cores / concurrency for CPU trials)"
    )
    parser.add_argument(
        "--params", default=None, help="JSON parameters for a standalone run (NNI supplies them otherwise)"
    )
    return parser


def _finite(value: Any) -> Any:
    """JSON for NNI's manager must not hold NaN/inf (JavaScript's JSON.parse rejects them)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import nni  # inside an NNI trial this routes the root logger to the trial's log file

    if not logging.getLogger().handlers:  # standalone run
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    if args.threads is not None:
        if args.threads < 1:
            print("error: --threads must be >= 1", file=sys.stderr)
            return 2
        import torch

        torch.set_num_threads(args.threads)

    from ..checkpoint import atomic_write_json
    from ..config import load_recipe
    from ..flow import run_recipe
    from .search_space import params_to_overrides

    params = nni.get_next_parameter() or {}
    if args.params is not None:
        if nni.get_experiment_id() != "STANDALONE":
            print("error: --params is only for standalone runs; NNI supplies the parameters", file=sys.stderr)
            return 2
        params = json.loads(args.params)
        if not isinstance(params, dict):
            print("error: --params must be a JSON object", file=sys.stderr)
            return 2
    recipe = load_recipe(args.recipe)
    overrides = params_to_overrides(params, recipe)
    recipe = recipe.with_overrides(overrides)
    out = Path(args.out) if args.out else Path(os.environ.get("NNI_OUTPUT_DIR", ".")) / "run"
    logger.info("trial %s: parameters %s -> overrides %s", nni.get_trial_id(), params, overrides)

    def reporter(kind: str, payload: dict[str, Any]) -> None:
        if kind == "iteration":
            nni.report_intermediate_result(_finite(intermediate_metric(payload)))

    results = run_recipe(recipe, out, device=args.device, reporter=reporter)
    metrics = _finite(trial_metrics(results, params, overrides))
    metrics["trial_id"] = nni.get_trial_id()
    atomic_write_json(out / "trial.json", metrics)
    nni.report_final_result(metrics)
    print(
        f"trial {metrics['trial_id']}: mean accuracy {metrics['mean_accuracy']:.4f}, auc "
        f"{metrics['auc']:.4f}, budgets met {metrics['budgets_met']}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
