"""The ``nni-steppingnet`` command.

Each subcommand lives in the module that owns the capability; that module exposes
``add_arguments(parser, name)`` and ``main(args) -> int``. Modules import heavy dependencies (NNI)
inside functions, so building the parser stays fast.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import logging
import sys
from typing import Sequence

__all__ = ["main", "build_parser", "describe_os_error", "SUBCOMMANDS"]

#: errno -> what the user can do about it
_OS_ADVICE: dict[int, str] = {
    errno.EACCES: "permission denied: choose a path you may write (e.g. another --out) or fix its permissions",
    errno.EPERM: "operation not permitted: choose a path you may write (e.g. another --out) or fix its permissions",
    errno.EROFS: "the file system is read-only: choose a path on a writable disk (e.g. another --out)",
    errno.ENOTDIR: "a part of this path is a file, not a folder: choose another path (e.g. another --out)",
    errno.EEXIST: "it exists and is not a folder: choose another --out or move the file away",
    errno.EISDIR: "it is a folder where a file was expected: give a file name",
    errno.ENOSPC: "no space left on the device: free some space or choose a path on another disk",
    errno.EDQUOT: "disk quota exceeded: free some space or choose a path on another disk",
    errno.ENAMETOOLONG: "the name is too long: choose a shorter path",
    errno.ENOENT: "no such file or folder: check the path",
}

#: subcommand -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "run": ("nni_steppingnet.flow_cli", "teacher, construction, retraining and evaluation of a recipe"),
    "eval": ("nni_steppingnet.flow_cli", "evaluate every subnet of a checkpoint"),
    "export": ("nni_steppingnet.flow_cli", "export subnet s of a checkpoint as a standalone model"),
    "recipes": ("nni_steppingnet.flow_cli", "list the bundled recipes"),
    "compare": ("nni_steppingnet.app.compare_cli", "SteppingNet vs any-width vs slimmable at equal MACs"),
    "ablate": ("nni_steppingnet.app.compare_cli", "beta suppression / distillation ablation and expansion sweep"),
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


def describe_os_error(exc: OSError) -> str:
    """One line for an ``OSError``: the path it concerns, the system's reason and what to do."""
    if exc.errno is None or exc.strerror is None:
        return str(exc)  # raised by this package with its own message
    path = exc.filename if exc.filename is not None else "a file"
    if exc.filename2 is not None:
        path = f"{path} -> {exc.filename2}"
    advice = _OS_ADVICE.get(exc.errno)
    return f"{path}: {exc.strerror}" + (f" ({advice})" if advice else "")


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
    except (ValueError, OSError, RuntimeError) as exc:
        # Bad input, or a path that cannot be read or written: one clear line, not a traceback
        # (use -vv for the traceback).
        if args.verbose >= 2:
            raise
        text = describe_os_error(exc) if isinstance(exc, OSError) else str(exc)
        print(f"error: {text}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
