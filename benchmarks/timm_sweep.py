"""Sweep timm: one model per family, wrapped with SteppingNet and checked for subnet isolation.

For every timm family (the module under ``timm.models`` a model is registered in, from
``timm.list_modules()`` / ``timm.list_models(module=...)``) the smallest-looking model is built
with random weights (``pretrained=False``, ``num_classes=10``, then every parameter drawn off
timm's init by ``nni_steppingnet.testing.randomize_parameters``: zero biases, 1e-6 layer scales
and zero GlobalResponseNorms would hide a leak through them) at a small input (1x3x64x64, or
the smallest size the family runs at), wrapped with 4 subnets and a random assignment, and
checked exactly like ``tests/test_stepping.py``: with our own forward hooks, every Conv/Linear
output channel of subnet <= s (and every classifier input feature of subnet <= s) must be
bitwise identical in every larger subnet, in eval and in train mode. Also checked: MACs grow
strictly with s, and ``export_subnet(2)`` matches the masked forward with nonzero MACs equal to
``macs(2)`` less its active weights that are exactly zero.

Categories: ``ok``; ``unsupported`` (``UnsupportedModelError``, reason recorded);
``cannot-build`` (timm itself cannot create or run the model at that size: not our crash);
``export-unsupported`` (wrap and isolation pass, ``export_subnet`` raises its clear error naming a
module torch-pruning cannot shrink);
``crash`` (any other exception from our code, traceback head recorded); ``violation`` (a check
above failed silently: a bug); ``timeout``.

Models run in one worker process (imports are paid once) with a per-model ``signal.alarm``
limit; the parent restarts the worker if it dies or hangs past the limit.

Usage::

    python benchmarks/timm_sweep.py --max-models 200 --timeout 120 --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import re
import select
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Sequence

__all__ = ["pick_models", "check_model", "main"]

RESULTS = Path(__file__).resolve().parent / "results" / "timm_sweep.json"
NUM_SUBNETS = 4
#: Name fragments that mark a small variant, best first.
SMALL_MARKERS: tuple[str, ...] = (
    "002",
    "18",
    "_b0",
    "atto",
    "femto",
    "pico",
    "nano",
    "xxs",
    "tiny",
    "small",
    "mini",
    "xs",
    "lite",
    "050",
    "_s",
)
#: timm families we never pick from: local test-only architectures.
_SKIP_PREFIX = "test_"
#: Further models swept besides a family's smallest-looking one: architectures of the family
#: that the library supports differently (mlp_mixer's pick is a gMLP, refused by name; MLP-Mixer
#: and ResMLP wrap with token-mixing Linears, nni_steppingnet.token_mixing).
#: Outcomes of one model, best first (a family takes the best of its models' outcomes).
STATUSES: tuple[str, ...] = ("ok", "export-unsupported", "unsupported", "cannot-build", "timeout", "crash", "violation")

EXTRA_MODELS: dict[str, tuple[str, ...]] = {"mlp_mixer": ("mixer_s32_224", "resmlp_12_224")}


# --------------------------------------------------------------------------- picking
def _smallness(name: str) -> tuple[int, int, int, str]:
    marker = next((k for k, m in enumerate(SMALL_MARKERS) if m in name), len(SMALL_MARKERS))
    numbers = [int(n) for n in re.findall(r"\d+", name)]
    # Without a marker, the first number is usually depth or width: dla34 before dla102x2.
    return marker, numbers[0] if numbers else 10**9, len(name), name


def pick_models(max_models: int | None = None, families: Sequence[str] = ()) -> list[tuple[str, str]]:
    """(family, model) for every timm family, the smallest-looking model of each."""
    import timm

    chosen: list[tuple[str, str]] = []
    for family in timm.list_modules():
        if families and family not in families:
            continue
        names = [n for n in timm.list_models(module=family) if not n.startswith(_SKIP_PREFIX)]
        if names:
            chosen.append((family, min(names, key=_smallness)))
        chosen.extend((family, name) for name in EXTRA_MODELS.get(family, ()) if name in names)
    return chosen[:max_models] if max_models else chosen


# ---------------------------------------------------------------------------- checking
class _Timeout(BaseException):
    """Per-model time limit; a BaseException so that library ``except Exception`` blocks (e.g.
    the tracer's "could not trace" handler) do not turn it into a model verdict."""


def _alarm(signum: int, frame: Any) -> None:
    raise _Timeout()


def _build(name: str, sizes: Sequence[int]) -> tuple[Any, Any, int]:
    """Create ``name`` and find an input size it runs at; raises on failure (cannot-build)."""
    import timm
    import torch

    errors = []
    for size in sizes:
        for kwargs in ({}, {"img_size": size}):
            try:
                torch.manual_seed(0)
                model = timm.create_model(name, pretrained=False, num_classes=10, **kwargs)
                model.eval()
                x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
                with torch.no_grad():
                    out = model(x)
                if not isinstance(out, torch.Tensor) or out.shape != (2, 10):
                    raise RuntimeError(f"output is not [2, 10] logits: {getattr(out, 'shape', type(out))}")
                return model, x, size
            except _Timeout:
                raise
            except Exception as exc:  # timm cannot build/run it this way; try the next
                errors.append(f"{size}px {kwargs or ''}: {type(exc).__name__}: {str(exc)[:160]}")
    raise RuntimeError("; ".join(errors[-2:]))


def _randomize(net: Any, seed: int) -> None:
    """Random nested assignment and non-trivial BN statistics (``nni_steppingnet.testing``)."""
    from nni_steppingnet.testing import random_assignment, randomize_bn

    random_assignment(net, seed=seed)
    randomize_bn(net.model, seed=seed + 1)


def _nonzero_macs(net: Any, s: int) -> int:
    """``net.macs(s)`` less the active weight entries that are exactly zero (timm's random init
    has some: rdnet_tiny, vit_base_patch16_18x2_224), the count ``macs(..., nonzero=True)`` of
    the exported subnet must reproduce."""
    per_layer = net.layer_macs(s)
    for k, layer in enumerate(net.layers):
        active = net.weight_mask(k, s).bool()
        zeros = int((active & (net.original_weight(k).detach() == 0)).sum())
        per_layer[layer.name] -= zeros * layer.positions
    return int(sum(per_layer.values()))


def _isolation(net: Any, x: Any, train: bool) -> tuple[int, float, str]:
    """(channels compared, worst relative difference, where): ``nni_steppingnet.testing``'s
    checker, independent of ``SteppingNet.check_isolation``."""
    from nni_steppingnet.testing import isolation_report

    report = isolation_report(net, x, train=train)
    return sum(report.compared), report.worst, report.where


def check_model(family: str, name: str, sizes: Sequence[int], export: bool) -> dict[str, Any]:
    """Build, wrap and check one model; returns its result record."""
    import torch

    from nni_steppingnet import SteppingNet, UnsupportedModelError, macs
    from nni_steppingnet.testing import randomize_parameters

    record: dict[str, Any] = {"family": family, "model": name}
    try:
        model, x, size = _build(name, sizes)
    except _Timeout:
        raise
    except Exception as exc:
        record.update(status="cannot-build", reason=str(exc)[:400])
        return record
    record["input"] = [2, 3, size, size]
    try:
        randomize_parameters(model, seed=2)
        net = SteppingNet(model, x[:1], NUM_SUBNETS)
    except UnsupportedModelError as exc:
        kinds = sorted({_kind(reason) for _, reason in exc.problems})
        record.update(
            status="unsupported",
            kinds=kinds,
            problems=len(exc.problems),
            reason=f"{exc.problems[0][0]}: {exc.problems[0][1]}"[:300],
        )
        return record
    except _Timeout:
        raise
    except Exception:
        record.update(status="crash", stage="wrap", traceback=_tail())
        return record
    try:
        _randomize(net, seed=3)
        record.update(groups=len(net.groups), layers=len(net.layers), full_macs=net.full_macs)
        counts = [net.macs(s) for s in range(1, NUM_SUBNETS + 1)]
        record["macs"] = counts
        problems = []
        if not all(a < b for a, b in zip(counts, counts[1:])):
            problems.append(f"MACs do not grow strictly: {counts}")
        for train in (False, True):
            compared, worst, where = _isolation(net, x, train)
            record[f"compared_{'train' if train else 'eval'}"] = compared
            if worst > 0:
                problems.append(f"{'train' if train else 'eval'}: {where} differs by {worst:.2e} relative")
            if compared == 0:
                problems.append("nothing compared")
        if export:
            from nni_steppingnet.export import export_subnet

            try:
                exported = export_subnet(net, 2)
            except RuntimeError as exc:
                if not str(exc).startswith("export_subnet("):
                    raise
                # Masked subnets work; export names the module torch-pruning cannot shrink.
                record.update(
                    status="export-unsupported" if not problems else "violation",
                    problems=problems,
                    reason=str(exc)[:300],
                )
                return record
            exported.eval()
            with torch.no_grad(), net.subnet(2):
                expected = net.model(x)
            with torch.no_grad():
                got = exported(x)
            err = float((got - expected).abs().max() / expected.abs().max().clamp_min(1e-12))
            record["export_rel_err"] = err
            nonzero = macs(exported, x, nonzero=True)
            expected_nonzero = _nonzero_macs(net, 2)
            if err > 1e-5:
                problems.append(f"export differs by {err:.2e} relative")
            if nonzero != expected_nonzero:
                problems.append(f"export nonzero MACs {nonzero} != nonzero MACs of masked subnet 2 {expected_nonzero}")
        record.update(status="violation" if problems else "ok", problems=problems)
    except _Timeout:
        raise
    except Exception:
        record.update(status="crash", stage="check", traceback=_tail())
    return record


def _kind(reason: str) -> str:
    for key, kind in (
        ("LayerNorm", "LayerNorm"),
        ("GroupNorm", "GroupNorm"),
        ("attention", "attention"),
        ("LocalResponseNorm", "LocalResponseNorm"),
        ("Conv1d", "Conv1d"),
        ("shuffle", "channel/pixel shuffle"),
        ("transposed", "ConvTranspose"),
        ("could not trace", "torch-pruning trace failed"),
        ("not in any neuron group", "untraced output channels"),
        ("mapped channel", "untraced concat/reshape"),
        ("claimed by two", "ambiguous concat/reshape"),
        ("change by", "isolation probe"),
        ("never called", "layer never called"),
    ):
        if key in reason:
            return kind
    return reason[:80]


def _tail(lines: int = 6) -> str:
    return "".join(traceback.format_exc().strip().splitlines(keepends=True)[-lines:])


# ----------------------------------------------------------------------------- worker
def _worker(args: argparse.Namespace) -> int:
    import torch

    import nni_steppingnet.models  # noqa: F401  (registers the paper models)

    torch.set_num_threads(args.threads)
    signal.signal(signal.SIGALRM, _alarm)
    sizes = [int(s) for s in args.sizes.split(",")]
    for item in args.models.split(","):
        family, name = item.split(":")
        start = time.perf_counter()
        signal.alarm(args.timeout)
        try:
            record = check_model(family, name, sizes, export=not args.no_export)
        except _Timeout:
            record = {"family": family, "model": name, "status": "timeout", "reason": f"over {args.timeout} s"}
        finally:
            signal.alarm(0)
        record["seconds"] = round(time.perf_counter() - start, 2)
        print(json.dumps(record), flush=True)
    return 0


def _run_all(models: list[tuple[str, str]], args: argparse.Namespace) -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = []
    pending = list(models)
    while pending:
        command = [
            sys.executable,
            __file__,
            "--worker",
            "--models",
            ",".join(f"{f}:{n}" for f, n in pending),
            "--timeout",
            str(args.timeout),
            "--threads",
            str(args.threads),
            "--sizes",
            args.sizes,
        ]
        if args.no_export:
            command.append("--no-export")
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        assert proc.stdout is not None
        while pending:
            ready, _, _ = select.select([proc.stdout], [], [], args.timeout + 60)
            line = proc.stdout.readline() if ready else ""
            if not line:
                family, name = pending.pop(0)
                hung = not ready
                if hung:
                    proc.kill()
                proc.wait()
                record = {
                    "family": family,
                    "model": name,
                    "status": "timeout" if hung else "crash",
                    "reason": "worker hung past the limit"
                    if hung
                    else f"worker process died (exit code {proc.returncode})",
                }
                results.append(record)
                _progress(len(results), len(models), record)
                break
            record = json.loads(line)
            pending.pop(0)
            results.append(record)
            _progress(len(results), len(models), record)
        else:
            proc.wait()
    return results


def _progress(done: int, total: int, record: dict[str, Any]) -> None:
    detail = record.get("reason") or "; ".join(record.get("problems", [])) or ""
    print(
        f"[{done:3d}/{total}] {record['status']:12s} {record['model']:36s} "
        f"{record.get('seconds', 0):6.1f}s {detail[:90]}",
        file=sys.stderr,
        flush=True,
    )


def _write_json(path: Path, payload: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(payload, handle, indent=1)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; results are for everyone to read
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def family_counts(results: Sequence[dict[str, Any]]) -> dict[str, int]:
    """Families per status: a family with several models swept (``EXTRA_MODELS``) takes the best
    status among them (``ok`` first, in the order of :data:`STATUSES`)."""
    best: dict[str, str] = {}
    for r in results:
        status = r["status"]
        held = best.get(r["family"])
        if held is None or STATUSES.index(status) < STATUSES.index(held):
            best[r["family"]] = status
    return {k: sum(v == k for v in best.values()) for k in STATUSES}


def _table(results: list[dict[str, Any]]) -> str:
    rows = [f"{'family':26s} {'model':34s} {'status':12s} {'groups':>6s} {'s':>5s}  detail"]
    for r in results:
        detail = r.get("reason") or "; ".join(r.get("problems", [])) or ""
        if r["status"] == "unsupported":
            detail = ", ".join(r.get("kinds", []))
        if r["status"] == "crash" and r.get("traceback"):
            detail = r["traceback"].strip().splitlines()[-1]
        rows.append(
            f"{r['family']:26s} {r['model']:34s} {r['status']:12s} {r.get('groups', ''):>6} "
            f"{r.get('seconds', 0):5.1f}  {detail[:100]}"
        )
    counts = family_counts(results)
    rows.append("")
    rows.append(
        "summary: "
        + ", ".join(f"{k} {v}" for k, v in sorted(counts.items()) if v)
        + f" (of {sum(counts.values())} families, {len(results)} models)"
    )
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-models", type=int, default=None, help="stop after this many families")
    parser.add_argument("--families", default="", help="comma-separated timm families (default: all)")
    parser.add_argument("--timeout", type=int, default=120, help="seconds per model")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--sizes", default="64,96,128,160,224", help="input sizes to try, in order")
    parser.add_argument("--no-export", action="store_true", help="skip the export_subnet check")
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument(
        "--merge",
        action="store_true",
        help="replace only the swept families' rows in an existing --output and recount (with --families)",
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--models", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.timeout < 1 or args.threads < 1:
        parser.error("--timeout and --threads must be positive")
    if args.worker:
        return _worker(args)
    families = [f for f in args.families.split(",") if f]
    models = pick_models(args.max_models, families)
    if not models:
        parser.error(f"no timm family matches --families {args.families!r}")
    print(
        f"sweeping {len(models)} timm families ({args.threads} thread(s), {args.timeout} s per model)", file=sys.stderr
    )
    previous: list[dict[str, Any]] = []
    swept: set[str] = set()
    merged_before: set[str] = set()
    if args.merge:
        if not args.output.is_file():
            parser.error(f"--merge: {args.output} does not exist; run the whole sweep first")
        earlier = json.loads(args.output.read_text(encoding="utf-8"))
        previous = earlier["results"]
        merged_before = set(earlier.get("merged_families", []))
    start = time.perf_counter()
    results = _run_all(models, args)
    if args.merge:
        swept = {r["family"] for r in results}
        results = sorted([r for r in previous if r["family"] not in swept] + results, key=lambda r: r["family"])
    import timm
    import torch
    import torch_pruning

    payload = {
        "versions": {"timm": timm.__version__, "torch": torch.__version__, "torch_pruning": torch_pruning.__version__},
        "settings": {
            "num_subnets": NUM_SUBNETS,
            "threads": args.threads,
            "timeout_s": args.timeout,
            "sizes": args.sizes,
            "export_check": not args.no_export,
            "parameters": "randomize_parameters(seed=2), then BN statistics randomize_bn(seed=4)",
            "families_total": len(__import__("timm").list_modules()),
        },
        "wall_s": round(time.perf_counter() - start, 1),
        # with --merge: every family swept by a --merge run since the last whole sweep (wall_s is
        # this run's); the other rows are the whole sweep's
        "merged_families": sorted(swept | merged_before) if args.merge else [],
        "counts": family_counts(results),
        "model_counts": {k: sum(r["status"] == k for r in results) for k in STATUSES},
        "results": results,
    }
    _write_json(args.output, payload)
    print(_table(results))
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
