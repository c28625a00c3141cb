"""The ``compare`` and ``ablate`` subcommands (arguments and printing).

Building the parser imports only :mod:`.compare_spec`; :func:`main` imports the orchestration
(torch, torch-pruning) when a command runs.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from pathlib import Path
from typing import Any

from ..config import load_recipe
from ..flow_cli import CliReporter, add_distributed_arguments
from .compare_spec import ABLATION_VARIANTS, METHODS, parse_list

__all__ = ["add_arguments", "main"]

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    """Arguments of the ``compare`` and ``ablate`` subcommands."""
    if name not in ("compare", "ablate"):
        raise ValueError(f"compare_cli has no subcommand {name!r}")
    parser.add_argument("recipe", help="bundled recipe name (see `nni-steppingnet recipes`) or a YAML file")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe value as in `run`, e.g. --set data.root=/data (repeatable)",
    )
    parser.add_argument(
        "--seeds",
        default=None,
        metavar="S1,S2,...",
        help="seeds to repeat with (default: the recipe's seed); reports mean ± std",
    )
    parser.add_argument("--out", default=None, help=f"output folder (default: runs/{name}-<recipe name>)")
    parser.add_argument("--resume", action="store_true", help="reuse finished runs in --out and continue the rest")
    parser.add_argument(
        "--device", default="auto", metavar="auto|cpu|cuda[:K]", help="where to run (default auto: CUDA when present)"
    )
    parser.add_argument("--amp", choices=["bf16"], default=None, help="bfloat16 autocast")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_distributed_arguments(parser)
    if name == "compare":
        parser.add_argument(
            "--methods",
            default=",".join(METHODS),
            metavar="M1,M2,...",
            help=f"methods to run (default: {','.join(METHODS)})",
        )
        parser.add_argument(
            "--baseline-beta",
            action="store_true",
            help="train the baselines with beta suppression too (off by default)",
        )
        parser.add_argument(
            "--tolerance",
            type=float,
            default=0.02,
            help="how far (fraction of the original MACs) a baseline's subnet may be from its budget (default 0.02)",
        )
    else:
        parser.add_argument(
            "--expansions",
            default="1.0,1.4,1.8,2.2",
            metavar="E1,E2,...",
            help="expansion ratios of the Fig. 7 sweep (default 1.0,1.4,1.8,2.2; 'none' to skip)",
        )
        parser.add_argument(
            "--variants",
            default=None,
            metavar="V1,V2,...",
            help=f"Fig. 8 variants to run, from {', '.join(ABLATION_VARIANTS)} with ';' between names (default: all)",
        )


def main(args: argparse.Namespace) -> int:
    """Run ``compare`` or ``ablate`` (dispatching on ``args.command``), print the tables.

    Under torchrun (``WORLD_SIZE > 1``) every rank runs the command in one process group; rank 0
    alone shows progress, writes and prints."""
    command = getattr(args, "command", None)
    if command not in ("compare", "ablate"):
        raise ValueError(f"compare_cli handles compare and ablate, not {command!r}")
    from ..flow import resolve_device
    from .parallel import launch

    return launch(
        lambda ctx: _main(args, command, ctx), resolve_device(args.device), getattr(args, "dist_timeout", None)
    )


def _main(args: argparse.Namespace, command: str, ctx: Any) -> int:
    # Imported here, not at the top: building the parser must not import torch-pruning.
    compare = importlib.import_module("nni_steppingnet.app.compare")
    main_rank = ctx is None or ctx.is_main
    recipe = load_recipe(args.recipe, list(args.overrides or []))
    seeds = None if args.seeds is None else parse_list(args.seeds, int, "--seeds")
    out = Path(args.out) if args.out else Path("runs") / f"{command}-{recipe.name}"
    progress = main_rank and not args.no_progress
    reporter = CliReporter(enabled=progress)

    def report_stage(kind: str, payload: dict[str, Any]) -> None:
        if (
            kind == "stage"
            and payload.get("stage") not in ("teacher", "construction", "retraining", "evaluation")
            and progress
        ):
            print(f"[seed {payload.get('seed')}] {payload['stage']}", file=sys.stderr)
        reporter(kind, payload)

    common: dict[str, Any] = {
        "seeds": seeds,
        "device": args.device,
        "amp": args.amp,
        "progress": progress,
        "resume": args.resume,
        "reporter": report_stage,
        "sync_bn": bool(getattr(args, "sync_bn", False)),
        "distributed": ctx,
    }
    try:
        if command == "compare":
            methods = [m for m in args.methods.split(",") if m.strip()]
            compare.run_compare(
                recipe,
                out,
                methods=methods,
                baseline_beta=args.baseline_beta,
                tolerance=args.tolerance,
                **common,
            )
        else:
            expansions: list[float] = []
            if args.expansions.strip().lower() not in ("", "none"):
                expansions = parse_list(args.expansions, float, "--expansions")
            variants = None if args.variants is None else [v.strip() for v in args.variants.split(";") if v.strip()]
            compare.run_ablate(recipe, out, expansions=expansions, variants=variants, **common)
    finally:
        reporter.close()
    if not main_rank:
        return 0
    print((out / f"{command}.md").read_text(encoding="utf-8"))
    print(f"results: {out / (command + '.json')}, {out / (command + '.md')}, {out / (command + '.png')}")
    return 0
