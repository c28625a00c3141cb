"""Deprecated location of the ``compare`` / ``ablate`` orchestration, kept for one release.

The application code moved to :mod:`nni_steppingnet.app` (orchestration in
:mod:`~nni_steppingnet.app.compare`, statistics and tables in
:mod:`~nni_steppingnet.app.compare_report`, the figure in :mod:`~nni_steppingnet.app.compare_plot`,
the subcommands in :mod:`~nni_steppingnet.app.compare_cli`). This module only re-exports those
names; it is part of the application layer, and the library never imports it.
"""

from __future__ import annotations

from ..app.compare import (
    ABLATION_VARIANTS,
    BASELINE_FORMAT,
    BASELINES,
    COMPARE_FORMAT,
    METHODS,
    check_targets,
    compare_markdown,
    load_baseline,
    parse_list,
    plot_compare,
    run_ablate,
    run_baseline,
    run_compare,
    summarize,
    train_baseline,
    train_teacher,
)
from ..app.compare_cli import add_arguments, main

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
