"""The ``nni-steppingnet`` command.

Each subcommand lives in the module that owns the capability; that module exposes
``add_arguments(parser, name)`` and ``main(args) -> int``. Modules import heavy dependencies (NNI)
inside functions, so building the parser stays fast.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Sequence

__all__ = ["main", "build_parser", "SUBCOMMANDS"]

#: subcommand -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "run": ("nni_steppingnet.flow_cli", "teacher, construction, retraining and evaluation of a recipe"),
    "eval": ("nni_steppingnet.flow_cli", "evaluate every subnet of a checkpoint"),
    "export": ("nni_steppingnet.flow_cli", "export subnet s of a checkpoint as a standalone model"),
    "recipes": ("nni_steppingnet.flow_cli", "list the bundled recipes"),
    "compare": ("nni_steppingnet.baselines.compare", "SteppingNet vs any-width vs slimmable at equal MACs"),
    "ablate": ("nni_steppingnet.baselines.compare", "beta suppression / distillation ablation and expansion sweep"),
    "tune": ("nni_steppingnet.nni.experiment", "NNI hyperparameter search over alpha, beta, gamma and budgets"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nni-steppingnet", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        command = sub.add_parser(name, help=help_text, description=help_text)
        module = importlib.import_module(module_name)
        module.add_arguments(command, name)
        command.set_defaults(_module=module_name)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    module = importlib.import_module(args._module)
    try:
        return int(module.main(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        # Bad input: one clear line, not a traceback (use -vv for the traceback).
        if args.verbose >= 2:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
