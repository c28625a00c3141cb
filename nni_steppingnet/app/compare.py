"""Orchestration of ``compare`` and ``ablate``: SteppingNet against its baselines (paper Fig. 6)
and its ablations (Fig. 7 expansion ratios, Fig. 8 beta suppression / distillation).

Fairness. Every method of one seed uses the same recipe, data, teacher and budgets:

* the teacher (the original network) is trained once per seed (or loaded from
  ``teacher.checkpoint``) and handed to every method;
* SteppingNet runs through :func:`nni_steppingnet.flow.run_recipe` (construction + retraining);
* each baseline wraps the same expanded network (``steppingnet.expansion``), searches widths that
  meet the budgets with its own MAC rule (:func:`~nni_steppingnet.baselines.search_widths`), then
  trains with the same loop (:func:`nni_steppingnet.train.train_subnets_epoch`) and optimizer
  settings: first as many subnet-batches as SteppingNet's construction used (``iterations x N x
  m``; the construction's SGD settings, constant learning rate), then the recipe's retraining
  (same epochs, learning rate, cosine schedule, batch order, teacher and ``gamma``). Beta
  suppression is a SteppingNet technique; baselines use it only with ``--baseline-beta``.

Functions here log; the command line (:mod:`nni_steppingnet.app.compare_cli`) prints tables and
shows progress bars. Statistics and tables: :mod:`.compare_report`; the figure: :mod:`.compare_plot`.

Data parallel. Under torchrun (``distributed``, default: the process group this process joined)
every method trains through DistributedDataParallel on the rank's shard of the training set
(``data.batch_size`` per rank): the teacher, the baselines (:func:`train_baseline` with a DDP
``forward_module``) and SteppingNet (:func:`~nni_steppingnet.flow.run_recipe`, whose construction
averages the importance over the ranks and checks the assignments every iteration). Accuracies
add every rank's counts on its part of the test set. After each training phase every rank takes
rank 0's BatchNorm running statistics (each rank updated its own with its shard) and checks that
it holds rank 0's weights (``weights_hash`` in every method's results), so the accuracies are those
of the network rank 0 saves, over the whole test set. Rank 0 alone reads and writes
the output folder (teachers, checkpoints, results, reports); the others wait for it and stop with
the same error when a read or write fails. With ``sync_bn`` BatchNorm layers use the statistics of
the global batch (:func:`nni_steppingnet.distributed.convert_sync_batchnorm`).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from ..baselines.anywidth import AnyWidthNet
from ..baselines.slimmable import SlimmableNet
from ..baselines.widths import SlicedNet, search_widths
from ..checkpoint import atomic_write_json, atomic_write_text, load_checkpoint_file, save_checkpoint, seed_everything
from ..config import Recipe, load_recipe, recipe_diff
from ..data import DatasetInfo
from ..distributed import (
    DistributedContext,
    convert_sync_batchnorm,
    current_context,
    device_for,
    distributed_failures,
    from_main,
    wrap_ddp,
)
from ..errors import CheckpointError
from ..flow import (
    CHECKPOINT_NAME,
    build_data,
    build_model,
    example_inputs,
    reference_macs,
    resolve_device,
    run_recipe,
    shared_teacher,
    train_teacher_model,
)
from ..train import check_amp, evaluate, evaluate_model, make_optimizer, train_subnets_epoch
from .compare_plot import plot_compare
from .compare_report import check_targets, compare_markdown, summarize
from .compare_spec import (
    ABLATION_VARIANTS,
    BASELINE_FORMAT,
    COMPARE_FORMAT,
    METHODS,
    RESULTS_FILE,
    TEACHER_FILE,
    parse_list,
)
from .parallel import global_accuracies, on_main, seed_epoch, settle_weights

__all__ = [
    "METHODS",
    "BASELINES",
    "ABLATION_VARIANTS",
    "BASELINE_FORMAT",
    "COMPARE_FORMAT",
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

logger = logging.getLogger(__name__)

#: baseline name -> wrapper class
BASELINES: dict[str, type[SlicedNet]] = {"anywidth": AnyWidthNet, "slimmable": SlimmableNet}

Reporter = Callable[[str, dict[str, Any]], None]


# ------------------------------------------------------------------------------ helpers
def _check_seeds(seeds: Sequence[int]) -> list[int]:
    values = list(seeds)
    if not values:
        raise ValueError("give at least one seed")
    for s in values:
        if isinstance(s, bool) or not isinstance(s, int) or s < 0:
            raise ValueError(f"seeds must be non-negative ints, got {s!r}")
    if len(set(values)) != len(values):
        raise ValueError(f"seeds must be distinct, got {values}")
    return values


def _check_methods(methods: Sequence[str]) -> list[str]:
    values = [m.strip().lower() for m in methods]
    unknown = [m for m in values if m not in METHODS]
    if unknown or not values:
        raise ValueError(f"unknown method(s) {unknown or values}; choose from {', '.join(METHODS)}")
    if len(set(values)) != len(values):
        raise ValueError(f"methods must be distinct, got {values}")
    return [m for m in METHODS if m in values]


def _with(recipe: Recipe, **changes: Any) -> Recipe:
    """A copy of ``recipe`` with dotted keys (``teacher__checkpoint``) replaced, validated."""
    raw = recipe.to_dict()
    for key, value in changes.items():
        node = raw
        parts = key.split("__")
        for part in parts[:-1]:
            node = node[part]
        node[parts[-1]] = value
    return Recipe.from_dict(raw, source=recipe.source)


def _read_json(path: Path) -> dict[str, Any]:
    with path.open("r", encoding="utf-8") as handle:
        return json.load(handle)


def _prepare_out(out: Path, resume: bool, what: str) -> None:
    if out.exists() and any(out.iterdir()) and not resume:
        raise ValueError(
            f"{out} already holds {what} results; pass --resume (resume=True) to reuse "
            "and continue them, or choose another --out folder"
        )
    out.mkdir(parents=True, exist_ok=True)


# ------------------------------------------------------------------------------ teacher
def train_teacher(
    recipe: Recipe,
    out_dir: str | os.PathLike[str],
    *,
    device: str | torch.device = "auto",
    amp: str | None = None,
    progress: bool = False,
    data: tuple[Any, Any, Any] | None = None,
    sync_bn: bool = False,
    distributed: DistributedContext | None = None,
) -> tuple[Path, float]:
    """The teacher (original network) every method of ``recipe.seed`` distils from.

    Returns ``(path, test accuracy)``: ``teacher.checkpoint`` when the recipe names one, else
    ``out_dir/teacher.pt``, reused when present, otherwise trained as the flow trains it (same
    epochs, optimizer and cosine schedule) and written atomically. In a data-parallel job
    (``distributed``) it trains through DDP (``sync_bn``: synchronised BatchNorm), rank 0 alone
    reads and writes the file, and the accuracy covers every rank's part of the test set.
    """
    ctx = distributed or DistributedContext()
    dev = device_for(ctx, resolve_device(device))
    train_loader, test_loader, info = data if data is not None else build_data(recipe, dev, ctx)
    if recipe.teacher.checkpoint is not None:
        path = Path(recipe.teacher.checkpoint).expanduser().resolve()
        model = shared_teacher(path, recipe, info, ctx)
    else:
        path = (Path(out_dir) / TEACHER_FILE).resolve()
        if on_main(ctx, path.is_file):
            model = shared_teacher(path, recipe, info, ctx)
            logger.info("reusing teacher %s", path)
        else:
            seed_everything(recipe.seed)
            model, losses = train_teacher_model(
                recipe, info, train_loader, dev, amp=amp, progress=progress, sync_bn=sync_bn, distributed=ctx
            )
            teacher_state = {
                "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                "losses": losses,
                "seed": recipe.seed,
            }
            on_main(ctx, lambda: save_checkpoint(teacher_state, path))
    accuracy = global_accuracies([evaluate_model(model, test_loader, device=dev, amp=amp)], test_loader, ctx, dev)[0]
    logger.info("teacher (seed %d): accuracy %.4f (%s)", recipe.seed, accuracy, path)
    return path, accuracy


# ---------------------------------------------------------------------------- baselines
def train_baseline(
    net: SlicedNet,
    train_loader: Any,
    recipe: Recipe,
    *,
    teacher: torch.nn.Module | None,
    train_batches: int,
    baseline_beta: bool = False,
    device: str | torch.device = "cpu",
    amp: str | None = None,
    progress: bool = False,
    forward_module: torch.nn.Module | None = None,
) -> dict[str, Any]:
    """Train a baseline with SteppingNet's loop and settings (see the module docstring).

    ``train_batches`` batches (each trains every subnet once, ascending) with the construction's
    SGD settings, then ``retraining.epochs`` epochs of distillation from ``teacher`` with the
    retraining settings, cosine schedule and the flow's per-epoch batch order. Returns the losses.
    ``forward_module``: a DistributedDataParallel wrapper of ``net.model`` in a data-parallel job
    (``train_loader`` then reads the rank's shard through a ``DistributedSampler``).
    """
    if isinstance(train_batches, bool) or not isinstance(train_batches, int) or train_batches < 0:
        raise ValueError(f"train_batches must be an int >= 0, got {train_batches!r}")
    c, r = recipe.construction, recipe.retraining
    phase1: list[float] = []
    if train_batches:
        optimizer = make_optimizer(net.model.parameters(), c.lr, c.momentum, c.weight_decay)
        remaining, epoch = train_batches, 0
        per_epoch = len(train_loader)
        if per_epoch == 0:
            raise ValueError("train_loader yields no batches; give it a non-empty dataset")
        while remaining > 0:
            seed_epoch(train_loader, recipe.seed + epoch)
            take = min(remaining, per_epoch)
            phase1.append(
                train_subnets_epoch(
                    net,
                    train_loader,
                    optimizer,
                    beta=c.beta if baseline_beta else None,
                    device=device,
                    amp=amp,
                    max_batches=take,
                    progress=progress,
                    forward_module=forward_module,
                )
            )
            remaining -= take
            epoch += 1
    phase2: list[float] = []
    if r.epochs > 0:
        optimizer = make_optimizer(net.model.parameters(), r.lr, r.momentum, r.weight_decay)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=r.epochs)
        for epoch in range(r.epochs):
            seed_epoch(train_loader, recipe.seed + 1_000_003 * (epoch + 1))
            phase2.append(
                train_subnets_epoch(
                    net,
                    train_loader,
                    optimizer,
                    beta=r.beta if baseline_beta else None,
                    teacher=teacher,
                    gamma=r.gamma,
                    device=device,
                    amp=amp,
                    progress=progress,
                    temperature=r.temperature,
                    forward_module=forward_module,
                )
            )
            scheduler.step()
    return {
        "train_batches": train_batches,
        "subnet_steps": train_batches * net.num_subnets,
        "losses": phase1,
        "retraining_losses": phase2,
        "beta": bool(baseline_beta),
    }


def run_baseline(
    method: str,
    recipe: Recipe,
    out_dir: str | os.PathLike[str],
    *,
    teacher_path: str | os.PathLike[str] | None,
    train_batches: int | None = None,
    device: str | torch.device = "auto",
    amp: str | None = None,
    progress: bool = False,
    baseline_beta: bool = False,
    tolerance: float = 0.02,
    data: tuple[Any, Any, Any] | None = None,
    sync_bn: bool = False,
    distributed: DistributedContext | None = None,
) -> dict[str, Any]:
    """Build, size, train and evaluate one baseline (``'anywidth'`` or ``'slimmable'``) for
    ``recipe`` and write ``results.json`` (same schema as a SteppingNet run, plus ``widths``,
    ``training`` and ``isolation_ok``) and ``checkpoint.pt`` (the net's state) into ``out_dir``.

    ``train_batches`` defaults to ``construction.iterations * construction.batches_per_iteration``.
    In a data-parallel job (``distributed``) the net trains through DDP (``sync_bn``: synchronised
    BatchNorm), every rank takes rank 0's BatchNorm statistics and checks that it holds rank 0's
    weights (``weights_hash``), the accuracies add every rank's part of the test set and rank 0
    alone writes ``out_dir``.
    """
    if method not in BASELINES:
        raise ValueError(f"unknown baseline {method!r}; choose from {', '.join(BASELINES)}")
    amp = check_amp(amp)
    started = time.perf_counter()
    ctx = distributed or DistributedContext()
    dev = device_for(ctx, resolve_device(device))
    out = Path(out_dir)
    on_main(ctx, lambda: out.mkdir(parents=True, exist_ok=True))
    train_loader, test_loader, info = data if data is not None else build_data(recipe, dev, ctx)
    ref = reference_macs(recipe, info)
    teacher = None
    if teacher_path is not None:
        teacher = shared_teacher(teacher_path, recipe, info, ctx)
        teacher.to(dev).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
    if train_batches is None:
        train_batches = recipe.construction.iterations * recipe.construction.batches_per_iteration
    seed_everything(recipe.seed)
    model = build_model(recipe, info, width=recipe.steppingnet.expansion)
    if sync_bn:
        convert_sync_batchnorm(model)
    n = recipe.steppingnet.num_subnets
    net = BASELINES[method](model, example_inputs(info), n, execution=recipe.steppingnet.execution)
    plan = search_widths(net, recipe.steppingnet.budgets, ref, tolerance=tolerance)
    net.model.to(dev)
    t0 = time.perf_counter()
    with distributed_failures(f"training the {method} baseline"):
        training = train_baseline(
            net,
            train_loader,
            recipe,
            teacher=teacher,
            train_batches=train_batches,
            baseline_beta=baseline_beta,
            device=dev,
            amp=amp,
            progress=progress and ctx.is_main,
            forward_module=wrap_ddp(net.model, ctx, dev),
        )
    training["time_s"] = time.perf_counter() - t0
    weights = settle_weights(net.model, ctx, f"after training the {method} baseline")
    accuracies = global_accuracies(evaluate(net, test_loader, device=dev, amp=amp), test_loader, ctx, dev)
    net.model.to("cpu")
    teacher_accuracy = None
    if teacher is not None:
        local = evaluate_model(teacher, test_loader, device=dev, amp=amp)
        teacher_accuracy = global_accuracies([local], test_loader, ctx, dev)[0]
    problems = net.check_isolation()
    subnets: list[dict[str, Any]] = []
    for s in range(1, n + 1):
        m = net.macs(s)
        subnets.append(
            {
                "index": s,
                "accuracy": accuracies[s - 1],
                "macs": m,
                "mac_ratio": m / ref,
                "budget": plan.budgets[s - 1],
                "budget_gap": m / ref - plan.budgets[s - 1],
                "widths": plan.counts[s - 1],
            }
        )
    results: dict[str, Any] = {
        "format": BASELINE_FORMAT,
        "method": method,
        "recipe": recipe.to_dict(),
        "original": {"accuracy": teacher_accuracy, "macs": ref},
        "subnets": subnets,
        "budgets_met": plan.all_met,
        "budgets_met_per_subnet": plan.budgets_met,
        "tolerance": tolerance,
        "widths": plan.to_dict(),
        "groups": [{"name": g.name, "size": g.size} for g in net.groups],
        "expanded": {"expansion": recipe.steppingnet.expansion, "macs": net.full_macs},
        "isolation_ok": not problems,
        "training": training,
        "dataset": {
            "name": info.name,
            "num_classes": info.num_classes,
            "in_chans": info.in_chans,
            "img_size": info.img_size,
        },
        "device": str(dev),
        "amp": amp,
        "world_size": ctx.world_size,
        "sync_bn": bool(sync_bn),
        "weights_hash": weights,
        "wall_time_s": time.perf_counter() - started,
    }
    checkpoint = {
        "format": BASELINE_FORMAT,
        "method": method,
        "recipe": recipe.to_dict(),
        "info": dict(results["dataset"]),
        "net": net.state_dict(),
    }

    def write() -> None:
        save_checkpoint(checkpoint, out / "checkpoint.pt")
        atomic_write_json(out / RESULTS_FILE, results)

    on_main(ctx, write)
    logger.info(
        "%s (seed %d): accuracies %s at MAC ratios %s",
        method,
        recipe.seed,
        [round(a, 4) for a in accuracies],
        [round(s["mac_ratio"], 4) for s in subnets],
    )
    return results


def load_baseline(path: str | os.PathLike[str]) -> tuple[SlicedNet, Recipe]:
    """Rebuild a trained baseline from the ``checkpoint.pt`` (or its folder) that
    :func:`run_baseline` wrote; returns ``(net, recipe)`` on the CPU."""
    source = Path(path)
    if source.is_dir():
        source = source / "checkpoint.pt"
    state = load_checkpoint_file(source)
    if state.get("format") != BASELINE_FORMAT or state.get("method") not in BASELINES or "info" not in state:
        raise CheckpointError(
            f"{source} is not a baseline checkpoint written by run_baseline (format "
            f"{state.get('format')!r}, expected {BASELINE_FORMAT!r} with method and info)"
        )
    recipe = Recipe.from_dict(state["recipe"], source=str(source))
    info = DatasetInfo(**state["info"])
    model = build_model(recipe, info, width=recipe.steppingnet.expansion)
    net = BASELINES[state["method"]](model, example_inputs(info), recipe.steppingnet.num_subnets, verify=False)
    net.load_state_dict(state["net"])
    return net, recipe


# ------------------------------------------------------------------------------ runners
def _run_steppingnet(
    recipe: Recipe,
    out: Path,
    *,
    resume: bool,
    device: str | torch.device,
    amp: str | None,
    progress: bool,
    reporter: Reporter | None,
    sync_bn: bool = False,
    distributed: DistributedContext | None = None,
) -> dict[str, Any]:
    ctx = distributed or DistributedContext()

    def finished() -> tuple[dict[str, Any] | None, bool]:
        """(the finished run's results or None, whether a checkpoint exists) as rank 0 sees them."""
        results_path = out / RESULTS_FILE
        has_checkpoint = (out / CHECKPOINT_NAME).is_file()
        if results_path.is_file() and has_checkpoint:
            results = _read_json(results_path)
            if results.get("stage", "done") == "done" and not recipe_diff(results.get("recipe", {}), recipe.to_dict()):
                return results, has_checkpoint
        return None, has_checkpoint

    done, has_checkpoint = from_main(finished, (OSError, ValueError))
    if done is not None:
        logger.info("reusing finished run %s", out)
        return done
    return run_recipe(
        recipe,
        out,
        resume=has_checkpoint and resume,
        device=device,
        amp=amp,
        progress=progress and ctx.is_main,
        reporter=reporter if ctx.is_main else None,
        sync_bn=sync_bn,
        distributed=ctx,
    )


def _reuse_baseline(out: Path, recipe: Recipe) -> dict[str, Any] | None:
    path = out / RESULTS_FILE
    if not path.is_file():
        return None
    results = _read_json(path)
    differ = recipe_diff(results.get("recipe", {}), recipe.to_dict())
    if differ:
        raise ValueError(
            f"cannot resume {out}: its recipe differs ({'; '.join(differ[:6])}); use the "
            "same recipe and --set values, or another --out"
        )
    logger.info("reusing finished baseline %s", out)
    return results


def _seed_setup(
    recipe: Recipe,
    seed: int,
    out: Path,
    dev: torch.device,
    amp: str | None,
    progress: bool,
    sync_bn: bool,
    ctx: DistributedContext,
) -> tuple[Recipe, Path, tuple[Any, Any, Any], Path]:
    """One seed's recipe, folder, data and teacher (shared by every method of that seed); the
    returned recipe names the teacher checkpoint."""
    seeded = _with(recipe, seed=seed)
    seed_dir = out / f"seed{seed}"
    data = build_data(seeded, dev, ctx)
    teacher_path, _ = train_teacher(
        seeded, seed_dir, device=dev, amp=amp, progress=progress, data=data, sync_bn=sync_bn, distributed=ctx
    )
    return _with(seeded, teacher__checkpoint=str(teacher_path)), seed_dir, data, teacher_path


def run_compare(
    recipe: Recipe | str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    methods: Sequence[str] = METHODS,
    seeds: Sequence[int] | None = None,
    device: str | torch.device = "auto",
    amp: str | None = None,
    progress: bool = False,
    resume: bool = False,
    baseline_beta: bool = False,
    tolerance: float = 0.02,
    reporter: Reporter | None = None,
    sync_bn: bool = False,
    distributed: DistributedContext | None = None,
) -> dict[str, Any]:
    """Run every method of ``methods`` for every seed with one teacher per seed and the recipe's
    budgets; write ``compare.json``, ``compare.md`` and ``compare.png`` into ``out_dir``.

    Layout: ``out_dir/seed<k>/teacher.pt`` and ``out_dir/seed<k>/<method>/`` (a SteppingNet run
    folder, or a baseline's ``results.json`` + ``checkpoint.pt``). With ``resume`` finished
    runs are reused and an interrupted SteppingNet run continues from its checkpoint.

    ``distributed``: the data-parallel context (default: the process group this process joined,
    if any; see the module docstring): every method trains through DDP, rank 0 alone writes and
    reports. ``sync_bn``: synchronised BatchNorm in every trained network (no effect on one
    process). ``device='cuda'`` means ``cuda:LOCAL_RANK`` in a data-parallel job.
    """
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    methods = _check_methods(methods)
    seeds = _check_seeds([recipe.seed] if seeds is None else seeds)
    if not 0 < tolerance < 1:
        raise ValueError(f"tolerance must be a fraction in (0, 1), got {tolerance!r}")
    ctx = distributed or current_context()
    dev = device_for(ctx, resolve_device(device))
    out = Path(out_dir)
    on_main(ctx, lambda: _prepare_out(out, resume, "compare"), (ValueError, OSError))
    reporter = reporter if ctx.is_main else None
    started = time.perf_counter()
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}
    for seed in seeds:
        seeded, seed_dir, data, teacher_path = _seed_setup(recipe, seed, out, dev, amp, progress, sync_bn, ctx)
        train_batches = None
        if "steppingnet" in methods:
            stepping = _run_steppingnet(
                seeded,
                seed_dir / "steppingnet",
                resume=resume,
                device=dev,
                amp=amp,
                progress=progress,
                reporter=reporter,
                sync_bn=sync_bn,
                distributed=ctx,
            )
            runs["steppingnet"].append(stepping)
            iterations = int(stepping.get("construction", {}).get("iterations") or seeded.construction.iterations)
            train_batches = iterations * seeded.construction.batches_per_iteration
        for method in methods:
            if method == "steppingnet":
                continue
            method_dir = seed_dir / method
            results = (
                from_main(functools.partial(_reuse_baseline, method_dir, seeded), (OSError, ValueError))
                if resume
                else None
            )
            if results is None:
                if reporter is not None:
                    reporter("stage", {"stage": method, "seed": seed})
                results = run_baseline(
                    method,
                    seeded,
                    method_dir,
                    teacher_path=teacher_path,
                    train_batches=train_batches,
                    device=dev,
                    amp=amp,
                    progress=progress,
                    baseline_beta=baseline_beta,
                    tolerance=tolerance,
                    data=data,
                    sync_bn=sync_bn,
                    distributed=ctx,
                )
            runs[method].append(results)
    summary = summarize(runs)
    report = {
        "format": COMPARE_FORMAT,
        "recipe": recipe.to_dict(),
        "methods": methods,
        "seeds": seeds,
        "baseline_beta": baseline_beta,
        "tolerance": tolerance,
        "summary": summary,
        "targets": check_targets(summary),
        "runs": {m: [_run_digest(r) for r in rs] for m, rs in runs.items()},
        "device": str(dev),
        "world_size": ctx.world_size,
        "sync_bn": bool(sync_bn),
        "wall_time_s": time.perf_counter() - started,
    }
    on_main(
        ctx,
        lambda: _write_report(
            report,
            out,
            "compare",
            f"{recipe.name}: SteppingNet vs baselines",
            [(f"{recipe.name}: accuracy vs MACs", methods)],
        ),
    )
    return report


def run_ablate(
    recipe: Recipe | str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    seeds: Sequence[int] | None = None,
    expansions: Sequence[float] = (1.0, 1.4, 1.8, 2.2),
    variants: Sequence[str] | None = None,
    device: str | torch.device = "auto",
    amp: str | None = None,
    progress: bool = False,
    resume: bool = False,
    reporter: Reporter | None = None,
    sync_bn: bool = False,
    distributed: DistributedContext | None = None,
) -> dict[str, Any]:
    """SteppingNet with and without beta suppression and distillation (paper Fig. 8; see
    :data:`ABLATION_VARIANTS`) and a sweep over expansion ratios (Fig. 7), one teacher per seed;
    writes ``ablate.json``, ``ablate.md`` and ``ablate.png`` into ``out_dir``. A sweep point equal
    to the recipe's expansion reuses the ``beta+kd`` runs. ``sync_bn`` and ``distributed`` as in
    :func:`run_compare`."""
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    seeds = _check_seeds([recipe.seed] if seeds is None else seeds)
    chosen = list(ABLATION_VARIANTS) if variants is None else list(variants)
    unknown = [v for v in chosen if v not in ABLATION_VARIANTS]
    if unknown:
        raise ValueError(f"unknown ablation variant(s) {unknown}; choose from {list(ABLATION_VARIANTS)}")
    expansions = [float(e) for e in expansions]
    if any(not math.isfinite(e) or e <= 0 for e in expansions):
        raise ValueError(f"expansions must be positive numbers, got {expansions}")
    if len(set(expansions)) != len(expansions):
        raise ValueError(f"expansions must be distinct, got {expansions}")
    ctx = distributed or current_context()
    dev = device_for(ctx, resolve_device(device))
    out = Path(out_dir)
    on_main(ctx, lambda: _prepare_out(out, resume, "ablate"), (ValueError, OSError))
    reporter = reporter if ctx.is_main else None
    started = time.perf_counter()
    # name -> (folder, overrides)
    plan: dict[str, tuple[str, tuple[str, ...]]] = {}
    for name in chosen:
        plan[name] = (name.replace(", ", "-").replace(" ", "-").replace("+", "-"), ABLATION_VARIANTS[name])
    sweep: list[str] = []
    for e in expansions:
        name = f"expansion {e:g}"
        sweep.append(name)
        if math.isclose(e, recipe.steppingnet.expansion) and "beta+kd" in plan:
            continue
        plan[name] = (f"expansion-{e:g}", (f"steppingnet.expansion={e}",))
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in plan}
    for seed in seeds:
        seeded, seed_dir, data, teacher_path = _seed_setup(recipe, seed, out, dev, amp, progress, sync_bn, ctx)
        for name, (folder, overrides) in plan.items():
            variant = seeded.with_overrides(list(overrides))
            if reporter is not None:
                reporter("stage", {"stage": name, "seed": seed})
            runs[name].append(
                _run_steppingnet(
                    variant,
                    seed_dir / folder,
                    resume=resume,
                    device=dev,
                    amp=amp,
                    progress=progress,
                    reporter=reporter,
                    sync_bn=sync_bn,
                    distributed=ctx,
                )
            )
    ordered = {name: runs[name] for name in chosen}
    for name in sweep:
        ordered[name] = runs.get(name, runs.get("beta+kd", []))
    summary = summarize(ordered)
    runs = ordered
    report = {
        "format": COMPARE_FORMAT,
        "recipe": recipe.to_dict(),
        "variants": {name: list(ABLATION_VARIANTS[name]) for name in chosen},
        "expansions": expansions,
        "seeds": seeds,
        "summary": summary,
        "runs": {m: [_run_digest(r) for r in rs] for m, rs in runs.items()},
        "device": str(dev),
        "world_size": ctx.world_size,
        "sync_bn": bool(sync_bn),
        "wall_time_s": time.perf_counter() - started,
    }
    panels = [(f"{recipe.name}: beta suppression / distillation (Fig. 8)", chosen)]
    if sweep:
        panels.append((f"{recipe.name}: expansion ratio (Fig. 7)", sweep))
    on_main(ctx, lambda: _write_report(report, out, "ablate", f"{recipe.name}: SteppingNet ablations", panels))
    return report


def _run_digest(results: Mapping[str, Any]) -> dict[str, Any]:
    keep = (
        "method",
        "original",
        "subnets",
        "budgets_met",
        "budgets_met_per_subnet",
        "isolation_ok",
        "wall_time_s",
        "training",
        "widths",
        "weights_hash",
        "assignment_hash",
        "world_size",
    )
    digest = {k: results[k] for k in keep if k in results}
    digest["seed"] = results.get("recipe", {}).get("seed")
    construction = results.get("construction")
    if isinstance(construction, Mapping):
        digest["construction"] = {k: construction.get(k) for k in ("iterations", "final_mac_ratios", "time_s")}
    return digest


def _write_report(
    report: dict[str, Any], out: Path, stem: str, title: str, panels: Sequence[tuple[str, Sequence[str]]]
) -> None:
    atomic_write_json(out / f"{stem}.json", report)
    atomic_write_text(out / f"{stem}.md", compare_markdown(report, title=title))
    plot_compare(report["summary"], out / f"{stem}.png", panels=panels)
    logger.info("wrote %s", ", ".join(str(out / f"{stem}.{ext}") for ext in ("json", "md", "png")))
