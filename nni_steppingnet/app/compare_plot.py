"""The accuracy-vs-MACs figure of ``compare`` / ``ablate`` reports."""

from __future__ import annotations

import io
import logging
import os
import statistics
from pathlib import Path
from typing import Any, Mapping, Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ..checkpoint import atomic_write_bytes

__all__ = ["plot_compare"]

logger = logging.getLogger(__name__)


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
            ax.axhline(
                100 * original, color="gray", linestyle="--", linewidth=1, label=f"original ({100 * original:.2f}%)"
            )
        ax.set_xlabel("MACs relative to the original network M_i/M_t (%)")
        ax.set_ylabel("accuracy (%)")
        ax.set_title(panel_title)
        ax.grid(True, alpha=0.3)
        ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return atomic_write_bytes(path, buffer.getvalue())
