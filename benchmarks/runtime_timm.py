"""IncrementalRunner on every timm family the sweep wraps: which layout it picks, and exactness.

For every model that ``benchmarks/timm_sweep.py`` recorded as ``ok`` (read from its results file),
the model is built with every parameter random (``testing.randomize_parameters``: none left at
timm's zero or unit init) and random BatchNorm statistics at the sweep's input size,
wrapped with 4 subnets and a random assignment (every subnet gains neurons in every group that
is large enough), and run through ``IncrementalRunner(net)`` (``layout="auto"``). Recorded per
model: the layout the runner chose (``delta``, or ``full`` after the check found the delta layout
does not fit), the largest difference between the logits after each step and the masked
subnet's logits (relative to the largest logit), and whether ``runner.macs_spent == net.macs(s)``
at every stage; and the execution ``execution="auto"`` picked for training (``sliced``, or
``masked`` with the check's logged reason). One torch thread; nothing is timed.

    python3 benchmarks/runtime_timm.py                  # writes results/runtime_timm.json
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn as nn

import nni_steppingnet.models  # noqa: F401  (registers lenet5, vgg16_cifar with timm)
from nni_steppingnet import SteppingNet
from nni_steppingnet.checkpoint import atomic_write_json
from nni_steppingnet.runtime import IncrementalRunner
from nni_steppingnet.testing import randomize_parameters

ROOT = Path(__file__).resolve().parents[1]
SWEEP = ROOT / "benchmarks" / "results" / "timm_sweep.json"
RESULTS = ROOT / "benchmarks" / "results" / "runtime_timm.json"
NUM_SUBNETS = 4


def _randomize(net: SteppingNet, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    n = net.num_subnets
    for group in net.groups:
        values = torch.randint(1, n + 2, (group.size,), generator=generator)
        if group.size >= n:
            values[torch.randperm(group.size, generator=generator)[:n]] = torch.arange(1, n + 1)
        group.assignment = values
    with torch.no_grad():
        for module in net.model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.running_mean is not None:
                module.running_mean.normal_(0.0, 0.5, generator=generator)
                module.running_var.uniform_(0.5, 2.0, generator=generator)


class _WarningsOf(logging.Handler):
    """Collects the warnings of one logger while in its ``with`` block."""

    def __init__(self, logger_name: str) -> None:
        super().__init__(logging.WARNING)
        self.logger = logging.getLogger(logger_name)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())

    def __enter__(self) -> _WarningsOf:
        self.logger.addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        self.logger.removeHandler(self)


def _build(model_name: str, x: torch.Tensor) -> nn.Module:
    """The model as the sweep built it: timm's defaults, else ``img_size`` set to the input's
    (ViTs fix their input size at construction)."""
    model = timm.create_model(model_name, num_classes=10, pretrained=False).eval()
    try:
        with torch.no_grad():
            model(x[:1])
    except Exception:  # the default size does not fit; the sweep then passed img_size
        model = timm.create_model(model_name, num_classes=10, pretrained=False, img_size=x.shape[-1]).eval()
    return model


def check(model_name: str, shape: list[int], seed: int) -> dict[str, Any]:
    begin = time.perf_counter()
    torch.manual_seed(seed)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    # every parameter off timm's init (zero biases, 1e-6 layer scales and unit norms hide
    # mistakes: the export's permuted LayerNorm parameters passed every check at timm's init)
    model = randomize_parameters(_build(model_name, x), seed=seed + 2)
    reasons = _WarningsOf("nni_steppingnet.sliced")
    with reasons:
        net = SteppingNet(model, x[:1], NUM_SUBNETS, verify=False)
    execution = net.execution
    _randomize(net, seed + 1)
    runner = IncrementalRunner(net)
    errors, macs_ok = [], True
    with torch.inference_mode():
        for s in range(1, NUM_SUBNETS + 1):
            out = runner.start(x) if s == 1 else runner.step()
            with net.subnet(s):
                ref = net.model(x)
            errors.append(float((out - ref).abs().max() / ref.abs().max().clamp_min(1e-12)))
            macs_ok &= runner.macs_spent == net.macs(s)
    net.remove()
    return {
        "model": model_name,
        "input": shape,
        "layout": runner.layout,
        "execution": execution,
        "masked_because": reasons.messages[0] if execution == "masked" and reasons.messages else "",
        "max_rel_error": max(errors),
        "macs_exact": macs_ok,
        "seconds": round(time.perf_counter() - begin, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", type=Path, default=SWEEP, help="results file of benchmarks/timm_sweep.py")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if not args.sweep.is_file():
        parser.error(f"{args.sweep} does not exist; run benchmarks/timm_sweep.py first")
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    sweep = json.loads(args.sweep.read_text(encoding="utf-8"))
    models = [(r["model"], r.get("input") or [2, 3, 64, 64]) for r in sweep["results"] if r["status"] == "ok"]
    rows = []
    print(f"{'model':28} {'layout':7} {'training':9} {'max rel. error':>15} {'MACs exact':>11} {'s':>6}")
    for name, shape in models:
        try:
            row = check(name, shape, args.seed)
        except Exception as exc:  # recorded, not fatal: the table shows which model failed and why
            row = {"model": name, "input": shape, "layout": "error", "error": f"{type(exc).__name__}: {exc}"}
        rows.append(row)
        if row["layout"] == "error":
            print(f"{name:28} error   {row['error'][:100]}", flush=True)
        else:
            print(
                f"{name:28} {row['layout']:7} {row['execution']:9} {row['max_rel_error']:15.1e} {str(row['macs_exact']):>11} "
                f"{row['seconds']:6.1f}",
                flush=True,
            )
    summary: dict[str, int] = {
        layout: sum(r["layout"] == layout for r in rows) for layout in ("delta", "full", "error")
    }
    summary |= {f"trains {e}": sum(r.get("execution") == e for r in rows) for e in ("sliced", "masked")}
    atomic_write_json(
        args.output,
        {
            "command": "python3 benchmarks/runtime_timm.py " + " ".join(argv or sys.argv[1:]),
            "torch": torch.__version__,
            "timm": timm.__version__,
            "summary": summary,
            "results": rows,
        },
    )
    print(f"summary: {summary}; wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
