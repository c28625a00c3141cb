"""The ``run``, ``eval``, ``export`` and ``recipes`` subcommands of ``nni-steppingnet``.

``cli.py`` builds one sub-parser per command with :func:`add_arguments` and calls :func:`main`,
which dispatches on ``args.command``. Only this module prints and shows progress bars; the flow
itself (:mod:`nni_steppingnet.flow`) only logs.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path
from typing import Any, Iterable

__all__ = [
    "add_arguments",
    "add_distributed_arguments",
    "main",
    "CliReporter",
    "check_output_not_input",
    "export_inputs",
    "resume_command",
    "RUN_FILES",
]

#: the files a run writes into its folder (flow.CHECKPOINT_NAME, flow.TEACHER_NAME and
#: report.RESULTS_*; spelled out so building the parser imports neither)
RUN_FILES: tuple[str, ...] = ("checkpoint.pt", "teacher.pt", "results.json", "results.md", "accuracy_vs_macs.png")


def _same_file(a: Path, b: Path) -> bool:
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    return a.resolve() == b.resolve()


def check_output_not_input(
    out: str | os.PathLike[str], inputs: Iterable[str | os.PathLike[str] | None], *, option: str = "--out"
) -> None:
    """Refuse to write ``out`` when it is one of ``inputs`` (the same file, links and relative
    paths resolved): a command never overwrites what it reads. Every export kind and ``run``
    call it before writing anything. Raises ``ValueError`` naming both paths and the fix."""
    target = Path(out).expanduser()
    for item in inputs:
        if item is None:
            continue
        source = Path(item).expanduser()
        if _same_file(target, source):
            raise ValueError(
                f"{option}: writing {target} would overwrite {source}, an input of this command; "
                f"choose another {option}"
            )


def add_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    """Add the arguments of subcommand ``name`` (run, eval, export or recipes) to ``parser``."""
    if name == "run":
        parser.add_argument("recipe", help="bundled recipe name (see `nni-steppingnet recipes`) or a YAML file")
        parser.add_argument(
            "--set",
            dest="overrides",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="override a recipe value, e.g. --set construction.beta=0.8 (repeatable; "
            "values are YAML: --set steppingnet.budgets=[0.2,0.4,0.6,0.8])",
        )
        parser.add_argument("--out", default=None, help="output folder (default: runs/<recipe name>)")
        parser.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
        _device_argument(parser)
        parser.add_argument("--amp", choices=["bf16"], default=None, help="bfloat16 autocast")
        parser.add_argument(
            "--download", action="store_true", help="allow downloading the dataset into data.root (network access)"
        )
        parser.add_argument("--no-progress", action="store_true", help="no progress bars")
        add_distributed_arguments(parser)
    elif name == "eval":
        parser.add_argument("checkpoint", help="a run's checkpoint.pt (or its folder)")
        _device_argument(parser)
        parser.add_argument("--data-root", default=None, help="dataset folder, if it moved since the run")
    elif name == "export":
        parser.add_argument("checkpoint", help="a run's checkpoint.pt (or its folder)")
        what = parser.add_mutually_exclusive_group()
        what.add_argument("--subnet", type=int, help="export subnet s (1-based) as a physically smaller module")
        what.add_argument(
            "--runner",
            action="store_true",
            help="export all subnets as one IncrementalRunner file (anytime inference that "
            "steps from subnet s to s+1 computing only the new MACs)",
        )
        parser.add_argument(
            "--out",
            default=None,
            help="file (.pt/.pth) to write (default: subnet<s>.pt or runner.pt beside the "
            "checkpoint); with --subnet the state_dict goes to <stem>.state_dict.pt "
            "beside it",
        )
        parser.add_argument(
            "--onnx",
            default=None,
            metavar="PATH",
            help="write ONNX instead: with --subnet s, the dense subnet as one graph (PATH ends "
            "in .onnx); otherwise one graph per stage of the anytime runner and "
            "manifest.json in folder PATH (run it with OnnxStepRunner or `python -m "
            "nni_steppingnet.onnx_runner PATH IMAGES.npy`, no torch needed)",
        )
        parser.add_argument(
            "--mean",
            type=float,
            nargs="+",
            default=None,
            help="with --onnx: the per-channel mean the inputs were normalised with (recorded in the manifest)",
        )
        parser.add_argument("--std", type=float, nargs="+", default=None, help="with --onnx: the per-channel std")
    elif name == "recipes":
        parser.add_argument("--keys", action="store_true", help="list every recipe key with its default")
    else:
        raise ValueError(f"flow_cli has no subcommand {name!r}")


def add_distributed_arguments(parser: argparse.ArgumentParser) -> None:
    """``--sync-bn`` and ``--dist-timeout``: the options of a command that trains under torchrun
    (``run``, ``compare``, ``ablate``)."""
    parser.add_argument(
        "--sync-bn",
        action="store_true",
        help="under torchrun: BatchNorm statistics over the global batch of all ranks (SyncBatchNorm)",
    )
    parser.add_argument(
        "--dist-timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="under torchrun: how long a rank waits for the others before the job fails (default 600)",
    )


def _device_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device", default="auto", metavar="auto|cpu|cuda[:K]", help="where to run (default auto: CUDA when present)"
    )


class CliReporter:
    """Progress bars for the flow's stages, driven by :data:`nni_steppingnet.flow.Reporter` events."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self._bar: Any = None

    def __call__(self, kind: str, payload: dict[str, Any]) -> None:
        if kind == "stage":
            self.close()
            if self.enabled and payload.get("stage") in ("construction", "retraining"):
                from tqdm.auto import tqdm

                self._bar = tqdm(
                    total=payload.get("total"),
                    initial=payload.get("done", 0),
                    desc=str(payload["stage"]),
                    unit="it" if payload["stage"] == "construction" else "epoch",
                    dynamic_ncols=True,
                    file=sys.stderr,
                )
        elif kind == "iteration" and self._bar is not None:
            ratios = " ".join(f"{r:.3f}" for r in payload.get("mac_ratios", []))
            accs = payload.get("accuracies")
            acc_text = (" acc " + " ".join(f"{a:.3f}" for a in accs)) if accs else ""
            self._bar.set_postfix_str(f"MACs {ratios}{acc_text}")
            self._bar.update(1)
        elif kind == "epoch" and self._bar is not None:
            self._bar.set_postfix_str(f"loss {payload.get('loss', float('nan')):.4f}")
            self._bar.update(1)
        elif kind == "final":
            self.close()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def resume_command(args: argparse.Namespace, out: Path, resume: bool = True) -> str:
    """The ``nni-steppingnet run`` command line of ``args`` with ``--out`` spelled out (and
    ``--resume`` when ``resume``): what continues an interrupted run."""
    words = ["nni-steppingnet", "run", str(args.recipe)]
    for item in args.overrides or []:
        words += ["--set", item]
    words += ["--out", str(out)]
    if resume:
        words.append("--resume")
    if args.device != "auto":
        words += ["--device", args.device]
    if args.amp:
        words += ["--amp", args.amp]
    if args.download:
        words.append("--download")
    if args.no_progress:
        words.append("--no-progress")
    if getattr(args, "sync_bn", False):
        words.append("--sync-bn")
    return shlex.join(words)


def _run(args: argparse.Namespace) -> int:
    """``run``; under torchrun (``WORLD_SIZE > 1``) every rank runs it, joined in one process group."""
    from .app.parallel import launch
    from .flow import resolve_device

    return launch(lambda ctx: _run_recipe(args, ctx), resolve_device(args.device), args.dist_timeout)


def _run_recipe(args: argparse.Namespace, ctx: Any) -> int:
    from .config import load_recipe, recipe_path
    from .flow import CHECKPOINT_NAME, run_recipe
    from .report import RESULTS_MD, RESULTS_PNG, results_markdown

    main_rank = ctx is None or ctx.is_main

    overrides = list(args.overrides or [])
    if args.download:
        overrides.append("data.download=true")
    recipe = load_recipe(args.recipe, overrides)
    out = Path(args.out) if args.out else Path("runs") / recipe.name
    inputs = [recipe_path(args.recipe), recipe.teacher.checkpoint]
    for name in RUN_FILES:
        check_output_not_input(out / name, inputs)
    reporter = CliReporter(enabled=main_rank and not args.no_progress)
    try:
        results = run_recipe(
            recipe,
            out,
            resume=args.resume,
            device=args.device,
            amp=args.amp,
            progress=main_rank and not args.no_progress,
            reporter=reporter,
            sync_bn=args.sync_bn,
            distributed=ctx,
        )
    except KeyboardInterrupt:
        reporter.close()
        if not main_rank:
            return 130
        if (out / CHECKPOINT_NAME).is_file():
            print(f"interrupted; continue the run with: {resume_command(args, out)}", file=sys.stderr)
        else:
            print(
                f"interrupted before the first checkpoint; start again with: {resume_command(args, out, resume=False)}",
                file=sys.stderr,
            )
        return 130
    finally:
        reporter.close()
    if not main_rank:
        return 0
    print(results_markdown(results))
    print(
        f"results: {out / 'results.json'}, {out / RESULTS_MD}, {out / RESULTS_PNG}; checkpoint: {out / 'checkpoint.pt'}"
    )
    return 0


def _eval(args: argparse.Namespace) -> int:
    from .flow import evaluate_checkpoint
    from .report import subnet_table_markdown, table_markdown

    results = evaluate_checkpoint(args.checkpoint, device=args.device, data_root=args.data_root)
    if results.get("stage") != "done":
        print(
            f"note: the run stopped in stage {results.get('stage')!r}; these are its current subnets", file=sys.stderr
        )
    print(table_markdown(results))
    print()
    print(subnet_table_markdown(results))
    return 0


def _export(args: argparse.Namespace) -> int:
    import torch

    from .checkpoint import save_atomic, save_checkpoint
    from .export import export_with_report
    from .flow import load_checkpoint

    onnx = getattr(args, "onnx", None)
    if args.subnet is None and not getattr(args, "runner", False) and onnx is None:
        raise ValueError("export needs one of --subnet s, --runner or --onnx DIR")
    if onnx is not None and args.out is not None:
        raise ValueError("--out names the .pt file; with --onnx the ONNX file or folder is the --onnx value")
    if onnx is None and (getattr(args, "mean", None) is not None or getattr(args, "std", None) is not None):
        raise ValueError("--mean/--std are recorded in an ONNX export; add --onnx PATH")
    loaded = load_checkpoint(args.checkpoint)
    net = loaded.net
    if onnx is not None:
        return _export_onnx(loaded, args)
    if getattr(args, "runner", False):
        return _export_runner(loaded, args.out)
    net.check_subnet(args.subnet)
    out = Path(args.out) if args.out else loaded.path.parent / f"subnet{args.subnet}.pt"
    if out.suffix not in (".pt", ".pth"):
        raise ValueError(f"--out must be a file name ending in .pt or .pth, got {out}")
    state_path = out.with_name(f"{out.stem}.state_dict{out.suffix}")
    check_output_not_input(out, export_inputs(loaded))
    check_output_not_input(state_path, export_inputs(loaded))
    net.model.eval()
    module, report = export_with_report(net, args.subnet)
    module.eval()
    with torch.no_grad(), net.subnet(args.subnet):
        expected = net.model(net.example_inputs)
    with torch.no_grad():
        got = module(net.example_inputs)
    max_diff = float((expected - got).abs().max())
    save_atomic(module, out)
    save_checkpoint({k: v for k, v in module.state_dict().items()}, state_path)
    ratio = report.nonzero_macs / loaded.reference_macs
    print(
        f"subnet {args.subnet} of {loaded.recipe.name}: {report.nonzero_macs:,} nonzero MACs "
        f"({100 * ratio:.2f}% of the original), {report.dense_macs:,} dense MACs "
        f"(torch-pruning counter: {report.torch_pruning_macs:,}), {report.params:,} params"
    )
    print(f"max |exported - subnet| on the example inputs: {max_diff:.3g}")
    print(f"module: {out} (torch.load(path, weights_only=False)); state_dict: {state_path}")
    return 0


def _export_runner(loaded: Any, out_arg: str | None) -> int:
    import torch

    from .flow import model_spec
    from .runtime import IncrementalRunner

    net = loaded.net
    out = Path(out_arg) if out_arg else loaded.path.parent / "runner.pt"
    if out.suffix not in (".pt", ".pth"):
        raise ValueError(f"--out must be a file name ending in .pt or .pth, got {out}")
    check_output_not_input(out, export_inputs(loaded))
    net.model.eval()
    runner = IncrementalRunner(net)
    x = torch.randn(4, *net.example_inputs.shape[1:], generator=torch.Generator().manual_seed(0))
    worst = 0.0
    with torch.inference_mode():
        for s in range(1, net.num_subnets + 1):
            got = runner.start(x) if s == 1 else runner.step()
            with net.subnet(s):
                expected = net.model(x)
            worst = max(worst, float((got - expected).abs().max() / expected.abs().max().clamp_min(1e-12)))
    runner.save(out)
    name, kwargs = model_spec(loaded.recipe, loaded.info, width=loaded.recipe.steppingnet.expansion)
    shares = ", ".join(f"{100 * net.macs(s) / loaded.reference_macs:.2f}%" for s in range(1, net.num_subnets + 1))
    print(
        f"runner for {net.num_subnets} subnets of {loaded.recipe.name} ({runner.layout} layout): MACs per "
        f"subnet {shares} of the original"
    )
    print(f"max relative |runner - subnet| on random inputs, over all subnets: {worst:.3g}")
    args_text = ", ".join([repr(name)] + [f"{k}={v!r}" for k, v in kwargs.items()])
    print(
        f"runner: {out}; load it with IncrementalRunner.load({str(out)!r}, timm.create_model({args_text})) "
        "after `import nni_steppingnet.models` for the paper models"
    )
    return 0


def _export_onnx(loaded: Any, args: argparse.Namespace) -> int:
    """``export --onnx``: the dense subnet (with --subnet) or the runner's stage graphs."""
    from .onnx_export import export_onnx, export_subnet_onnx
    from .runtime import IncrementalRunner

    net = loaded.net
    target = Path(args.onnx)
    check_output_not_input(target, export_inputs(loaded), option="--onnx")
    normalization = None
    if args.mean is not None or args.std is not None:
        if args.mean is None or args.std is None:
            raise ValueError("give both --mean and --std (or neither)")
        normalization = {"mean": args.mean, "std": args.std}
    net.model.eval()
    if args.subnet is not None:
        net.check_subnet(args.subnet)
        module = net.export_subnet(args.subnet).eval()
        export_subnet_onnx(module, target, net.example_inputs)
        print(
            f"subnet {args.subnet} of {loaded.recipe.name} ({net.macs(args.subnet):,} MACs per sample): {target} "
            f"(input 'input' {[None, *net.example_inputs.shape[1:]]}, output 'logits', dynamic batch)"
        )
        return 0
    if target.suffix == ".onnx":
        raise ValueError(
            f"--onnx without --subnet writes a folder of stage graphs, got the file name {target}; "
            "pass a folder, or add --subnet s for one dense subnet"
        )
    runner = IncrementalRunner(net)
    manifest = export_onnx(runner, target, normalization=normalization, model_name=loaded.recipe.model.name)
    shares = ", ".join(f"{100 * net.macs(s) / loaded.reference_macs:.2f}%" for s in range(1, net.num_subnets + 1))
    print(
        f"{net.num_subnets} stage graphs of {loaded.recipe.name} in {target} (checked against the torch runner); "
        f"MACs per subnet {shares} of the original; manifest: {manifest}"
    )
    if normalization is None:
        print(
            "note: no --mean/--std given, so the manifest records no input normalisation; the graphs take "
            "inputs normalised as in training"
        )
    print(f"run it without torch: python -m nni_steppingnet.onnx_runner {target} IMAGES.npy")
    return 0


def export_inputs(loaded: Any) -> list[Path | str | None]:
    """What an export of ``loaded`` (a :class:`~nni_steppingnet.flow.LoadedCheckpoint`) must never
    overwrite: the checkpoint, the other files of its run folder and the run's teacher file."""
    folder = loaded.path.parent
    return [loaded.path, *(folder / name for name in RUN_FILES), loaded.recipe.teacher.checkpoint]


def _recipes(args: argparse.Namespace) -> int:
    from .config import describe_keys, recipe_descriptions, recipes_dir

    if getattr(args, "keys", False):
        rows = describe_keys()
        width = max(len(key) for key, _, _ in rows)
        for key, default, doc in rows:
            print(f"{key:<{width}}  {default!r:<14} {doc}")
        return 0
    descriptions = recipe_descriptions()
    if not descriptions:
        print(f"no recipes found in {recipes_dir()}")
        return 1
    width = max(len(name) for name in descriptions)
    for name, text in descriptions.items():
        print(f"{name:<{width}}  {text}")
    return 0


def main(args: argparse.Namespace) -> int:
    """Run the subcommand named by ``args.command``."""
    handlers = {"run": _run, "eval": _eval, "export": _export, "recipes": _recipes}
    handler = handlers.get(str(getattr(args, "command", None)))
    if handler is None:
        raise ValueError(f"flow_cli handles {', '.join(handlers)}, not {getattr(args, 'command', None)!r}")
    return handler(args)
