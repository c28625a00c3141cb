"""``nni-steppingnet tune``: NNI hyperparameter search over a recipe.

``nni-steppingnet tune RECIPE --trials N --concurrency K [--tuner TPE] [--search-space NAME|FILE]
[--training-service local|remote] [--machines FILE] [--port P] [--gpus auto|none|0,1]
[--trials-per-gpu K] [--out DIR] [--set KEY=VALUE ...]``

builds an NNI ``Experiment`` whose trials each run the recipe's flow with the trial's parameters
(:mod:`nni_steppingnet.nni.trial`), waits for it, and writes into ``--out``:

* ``trials.json`` / ``trials.md``: every trial with its status, parameters, final metrics
  (``default`` = mean subnet accuracy, ``auc``) and intermediate results;
* ``best.yaml``: the recipe with the best trial's parameters filled in (``nni-steppingnet run
  best.yaml`` reruns it);
* ``search_space.json`` (validated) and ``trial_code/`` (the resolved recipe NNI copies to
  workers); NNI's own files go to ``nni/<experiment id>/``.

The search space (:mod:`nni_steppingnet.nni.search_space`), the tuner name (NNI's built-in
tuners) and the port (``P``, plus ``P + 1`` for the remote service) are checked before anything
starts. The NNI manager is always stopped: after success, on errors, on Ctrl-C and on SIGTERM,
and its process (and any trial it left) is checked to be gone.

A recipe may hold a ``tune:`` section (``trials``, ``concurrency``, ``tuner``, ``search_space``,
``training_service``, ``machines``, ``nni_manager_ip``, ``port``, ``gpus``, ``trials_per_gpu``,
``max_duration``); command-line options override it. NNI is imported only inside functions.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import importlib
import json
import logging
import math
import os
import shlex
import shutil
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import yaml

from ..config import Recipe, RecipeError, apply_overrides, dump_recipe, recipe_path
from .remote import MachineSpec, all_loopback, load_machines, parse_machines, to_nni_machines
from .search_space import apply_params, load_search_space, search_space_path, validate_search_space

__all__ = [
    "TuneError",
    "TuneOptions",
    "TuneResult",
    "SUPPORTED_TUNERS",
    "check_tuner",
    "check_port",
    "parse_gpus",
    "load_tune_recipe",
    "run_tune",
    "trials_markdown",
    "add_arguments",
    "main",
]

logger = logging.getLogger(__name__)

#: NNI built-in tuners that work on a plain hyperparameter search space (the others are for NAS,
#: need per-trial budgets (Hyperband, BOHB) or checkpoints (PBT)).
SUPPORTED_TUNERS: tuple[str, ...] = (
    "TPE",
    "Random",
    "Anneal",
    "Evolution",
    "GridSearch",
    "Metis",
    "GP",
    "SMAC",
    "DNGO",
    "TPE_legacy",
)
_TUNE_KEYS = (
    "trials",
    "concurrency",
    "tuner",
    "search_space",
    "training_service",
    "machines",
    "nni_manager_ip",
    "port",
    "gpus",
    "trials_per_gpu",
    "max_duration",
)
_FINAL_STATES = ("DONE", "STOPPED", "ERROR")


class TuneError(RuntimeError):
    """The experiment could not run or produced no successful trial."""


@dataclass
class TuneOptions:
    """How to run the experiment (see :func:`run_tune`)."""

    trials: int = 10
    concurrency: int = 1
    tuner: str = "TPE"
    training_service: str = "local"
    machines: list[MachineSpec] = field(default_factory=list)
    nni_manager_ip: str | None = None
    port: int = 8080
    gpus: str | Sequence[int] | None = "auto"
    trials_per_gpu: int = 1
    max_duration: str | None = None
    poll_interval: float = 2.0
    #: give up waiting after this many seconds (None: until NNI reports the end)
    timeout_s: float | None = None
    #: only check everything and write ``trial_code/`` and ``search_space.json`` (for clusters)
    prepare_only: bool = False


@dataclass
class TuneResult:
    """What :func:`run_tune` found."""

    experiment_id: str
    status: str
    trials: list[dict[str, Any]]
    best: dict[str, Any] | None
    best_recipe: Path | None
    out_dir: Path


# ---------------------------------------------------------------------------- checks
def check_tuner(name: str) -> tuple[str, bool]:
    """``(NNI's canonical name, accepts class args)`` for a supported built-in tuner.

    Raises ``ValueError`` for unknown names, tuners that do not fit a recipe search, and tuners
    whose extra packages are missing.
    """
    from nni.tools.package_utils.config_manager import get_algo_meta

    meta = get_algo_meta(str(name))
    supported = ", ".join(SUPPORTED_TUNERS)
    if meta is None or meta.algo_type != "tuner":
        raise ValueError(f"unknown tuner {name!r}; NNI's built-in tuners for this search are: {supported}")
    if meta.name not in SUPPORTED_TUNERS:
        raise ValueError(
            f"tuner {meta.name!r} does not fit a recipe search (it is for NAS, or needs "
            f"per-trial budgets or checkpoints); use one of {supported}"
        )
    module_name = (meta.class_name or "").rpartition(".")[0]
    try:
        importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(
            f"tuner {meta.name!r} needs a package that is not installed ({exc}); "
            f"install it (pip install 'nni[{meta.name}]') or choose another tuner"
        ) from exc
    return meta.name, bool(meta.accept_class_args)


def check_port(port: int, *, extra: bool = False) -> None:
    """Raise ``ValueError`` unless ``port`` (and ``port + 1`` with ``extra``) is free here."""
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65535:
        raise ValueError(f"port must be an int in 1..65534, got {port!r}")
    for p in [port, port + 1] if extra else [port]:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.settimeout(0.5)
            in_use = probe.connect_ex(("127.0.0.1", p)) == 0
        if not in_use:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                try:
                    sock.bind(("", p))
                except OSError:
                    in_use = True
        if in_use:
            what = f"port {p} is in use" + (f" (the remote service also needs {port + 1})" if p != port else "")
            raise ValueError(f"{what}; pass --port with a free port")


def parse_gpus(spec: str | Sequence[int] | None) -> list[int]:
    """``'auto'`` (every visible CUDA GPU), ``'none'``/None, ``'0,1'`` or a list -> GPU indices."""
    if spec is None:
        return []
    if isinstance(spec, str):
        text = spec.strip().lower()
        if text in ("", "none", "cpu"):
            return []
        if text == "auto":
            import torch

            count = torch.cuda.device_count() if torch.cuda.is_available() else 0
            if count and shutil.which("nvidia-smi") is None:
                logger.warning(
                    "CUDA GPUs are visible but nvidia-smi is not on PATH; NNI's GPU "
                    "scheduler needs it, so trials run on the CPU"
                )
                return []
            return list(range(count))
        parts = [p.strip() for p in text.split(",")]
        if not all(p.isdigit() for p in parts):
            raise ValueError(f"--gpus must be 'auto', 'none' or comma-separated GPU numbers like 0,1; got {spec!r}")
        indices = [int(p) for p in parts]
    else:
        indices = list(spec)
        if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in indices):
            raise ValueError(f"gpus must be GPU numbers >= 0, got {spec!r}")
    if len(set(indices)) != len(indices):
        raise ValueError(f"gpus lists a GPU twice: {indices}")
    return indices


def _check_local_gpus(indices: list[int]) -> None:
    if not indices:
        return
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise ValueError(
            f"--gpus {','.join(map(str, indices))}: this machine has no CUDA GPU; "
            "use --gpus none (trials run on the CPU)"
        )
    bad = [i for i in indices if i >= count]
    if bad:
        raise ValueError(f"--gpus: GPU(s) {bad} do not exist; this machine has {count} (0..{count - 1})")
    if shutil.which("nvidia-smi") is None:
        raise ValueError(
            "--gpus needs nvidia-smi on PATH (NNI's GPU scheduler reads it); install the "
            "NVIDIA driver tools or use --gpus none"
        )


def _check_options(options: TuneOptions) -> None:
    for name in ("trials", "concurrency", "trials_per_gpu"):
        value = getattr(options, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if options.training_service not in ("local", "remote"):
        raise ValueError(
            f"training service must be 'local' or 'remote' (for kubeflow and "
            f"frameworkcontroller see docs/nni.md), got {options.training_service!r}"
        )
    if options.training_service == "remote" and not options.machines:
        raise ValueError(
            "the remote training service needs machines: pass --machines FILE or put a "
            "tune.machines list in the recipe (see docs/nni.md)"
        )
    if options.training_service == "local" and options.machines:
        raise ValueError("machines are given but the training service is local; pass --training-service remote")
    if not isinstance(options.poll_interval, (int, float)) or options.poll_interval <= 0:
        raise ValueError(f"poll_interval must be > 0, got {options.poll_interval!r}")
    if options.timeout_s is not None and (not isinstance(options.timeout_s, (int, float)) or options.timeout_s <= 0):
        raise ValueError(f"timeout_s must be None or > 0, got {options.timeout_s!r}")


# --------------------------------------------------------------------------- recipe
def load_tune_recipe(
    name_or_path: str | os.PathLike[str], overrides: Sequence[str] = ()
) -> tuple[Recipe, dict[str, Any]]:
    """Load a recipe that may hold a ``tune:`` section; returns ``(recipe, tune section)``."""
    path = recipe_path(name_or_path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: a recipe must be a YAML mapping of sections")
    tune = raw.pop("tune", None) or {}
    if not isinstance(tune, dict):
        raise RecipeError(f"{path}: the tune section must be a mapping, got {tune!r}")
    unknown = sorted(set(tune) - set(_TUNE_KEYS))
    if unknown:
        raise RecipeError(f"{path}: unknown keys in tune: {unknown}; allowed: {', '.join(_TUNE_KEYS)}")
    recipe = Recipe.from_dict(apply_overrides(raw, overrides), source=str(path))
    return recipe, tune


def _portable_recipe(recipe: Recipe, remote: bool) -> Recipe:
    """Absolute local paths (trials run in another folder); remote paths are left as given."""
    if remote:
        return recipe
    changes = []
    if recipe.data.root is not None:
        changes.append(f"data.root={json.dumps(str(Path(recipe.data.root).expanduser().resolve()))}")
    if recipe.teacher.checkpoint is not None:
        changes.append(f"teacher.checkpoint={json.dumps(str(Path(recipe.teacher.checkpoint).expanduser().resolve()))}")
    return recipe.with_overrides(changes) if changes else recipe


# ----------------------------------------------------------------------- processes
@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt in the main thread, so the experiment still stops."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def _shielded() -> Iterator[None]:
    """Ignore Ctrl-C and SIGTERM while the manager stops (a second Ctrl-C must not orphan it)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        logger.warning("stopping the NNI manager, please wait (signal %d ignored)", signum)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _manager_process(experiment: Any) -> Any:
    proc = getattr(experiment, "_proc", None)  # NNI keeps the manager's Popen here
    return proc


def _stop_experiment(experiment: Any, timeout_s: float = 60.0) -> None:
    """Stop NNI's manager and make sure it (and every process it started) is gone."""
    with _shielded():
        _stop_and_reap(experiment, timeout_s)


def _stop_and_reap(experiment: Any, timeout_s: float) -> None:
    import psutil

    proc = _manager_process(experiment)
    family: list[psutil.Process] = []
    if proc is not None:
        with contextlib.suppress(psutil.Error):
            root = psutil.Process(proc.pid)
            family = [root] + root.children(recursive=True)
    errors: list[BaseException] = []

    def stop() -> None:
        try:
            experiment.stop()
        except Exception as exc:  # report below; the processes are killed anyway
            errors.append(exc)

    worker = threading.Thread(target=stop, name="nni-stop", daemon=True)
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive() or errors:
        logger.warning(
            "NNI did not stop cleanly (%s); killing its manager process",
            errors[0] if errors else f"no answer in {timeout_s:.0f} s",
        )
    alive = [p for p in family if _alive(p)]
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.terminate()
    _, still = psutil.wait_procs(alive, timeout=10)
    for p in still:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(still, timeout=10)
    if proc is not None:
        with contextlib.suppress(Exception):
            proc.wait(timeout=5)
    leftover = [p.pid for p in family if _alive(p)]
    if leftover:
        raise TuneError(f"NNI processes {leftover} survived stopping the experiment")


def _alive(process: Any) -> bool:
    import psutil

    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


# ------------------------------------------------------------------------- results
def _metric_data(data: Any) -> Any:
    while isinstance(data, str):
        try:
            data = json.loads(data)
        except json.JSONDecodeError:
            break
    return data


def _collect(experiment: Any) -> list[dict[str, Any]]:
    """Every trial with the parameters it really ran with.

    NNI 3.0's training services hand queued parameters to trials in the order the trial
    processes ask for them, not to the trial they were submitted with, so with concurrent trials
    its job table can show another trial's parameters. Each metric carries the id of the
    parameters the trial received; that id (and the parameters the trial echoes in its final
    result) decides the pairing here. NNI's own record is kept as ``nni_recorded_params``.
    """
    jobs = experiment.list_trial_jobs()
    metrics = experiment.get_job_metrics()
    by_id: dict[str, Any] = {}
    for job in jobs:
        for record in job.hyperParameters or []:
            by_id[str(record.parameter_id)] = record.parameters
    trials: list[dict[str, Any]] = []
    for job in sorted(jobs, key=lambda j: j.sequenceId):
        recorded = job.hyperParameters[0].parameters if job.hyperParameters else {}
        final = None
        parameter_id: str | None = None
        if job.finalMetricData:
            final = _metric_data(job.finalMetricData[0].data)
            parameter_id = str(job.finalMetricData[0].parameterId)
        used = by_id.get(parameter_id, recorded) if parameter_id is not None else recorded
        echoed = final.get("params") if isinstance(final, dict) else None
        if echoed is not None and echoed != used:
            logger.warning(
                "trial %s reports parameters %s but its metric's parameter id %s stands for "
                "%s; using what the trial reports",
                job.trialJobId,
                echoed,
                parameter_id,
                used,
            )
            used = echoed
        intermediate = [_metric_data(m.data) for m in metrics.get(job.trialJobId, []) if m.type == "PERIODICAL"]
        duration = (job.endTime - job.startTime) / 1000.0 if job.endTime and job.endTime > 0 and job.startTime else None
        entry: dict[str, Any] = {
            "trial_id": job.trialJobId,
            "sequence": job.sequenceId,
            "status": job.status,
            "params": used,
            "parameter_id": parameter_id,
            "final": final,
            "default": final.get("default") if isinstance(final, dict) else final,
            "auc": final.get("auc") if isinstance(final, dict) else None,
            "intermediate": intermediate,
            "duration_s": duration,
            "log_path": job.logPath,
        }
        if used != recorded:
            entry["nni_recorded_params"] = recorded
        trials.append(entry)
    return trials


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def trials_markdown(trials: Sequence[Mapping[str, Any]], best: Mapping[str, Any] | None) -> str:
    """A markdown table of every trial (best marked) and the best parameters."""
    keys = sorted({k for t in trials for k in (t.get("params") or {})})
    header = ["trial", "status", "default", "mean acc.", "auc", "budgets met", *keys]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for t in trials:
        final: dict[str, Any] = t["final"] if isinstance(t.get("final"), dict) else {}
        mark = " (best)" if best is not None and t["trial_id"] == best["trial_id"] else ""
        row = [
            f"{t['trial_id']}{mark}",
            str(t["status"]),
            _fmt(t.get("default")),
            _fmt(final.get("mean_accuracy")),
            _fmt(t.get("auc")),
            _fmt(final.get("budgets_met")),
            *[_fmt((t.get("params") or {}).get(k)) for k in keys],
        ]
        lines.append("| " + " | ".join(row) + " |")
    if best is not None:
        lines += [
            "",
            f"Best trial {best['trial_id']}: default {_fmt(best['default'])}, auc {_fmt(best.get('auc'))}",
            "",
            "```json",
            json.dumps(best["params"], indent=2, sort_keys=True),
            "```",
        ]
    else:
        lines += ["", "No trial succeeded."]
    return "\n".join(lines) + "\n"


def _best(trials: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    done = [
        t
        for t in trials
        if t["status"] == "SUCCEEDED"
        and isinstance(t.get("default"), (int, float))
        and math.isfinite(float(t["default"]))
    ]
    if not done:
        return None
    return max(done, key=lambda t: (float(t["default"]), float(t.get("auc") or 0.0), -t["sequence"]))


# ------------------------------------------------------------------------------ run
def run_tune(
    recipe: Recipe,
    search_space: Mapping[str, Any],
    out_dir: str | os.PathLike[str],
    options: TuneOptions | None = None,
    *,
    progress: Callable[[str], None] | None = None,
) -> TuneResult:
    """Run an NNI experiment over ``search_space`` on ``recipe`` and write its report.

    Everything is checked before NNI starts (search space, tuner, port, GPUs, machines).
    ``progress(line)`` receives a status line whenever the trial counts change. Raises
    :class:`TuneError` when the experiment fails or no trial succeeds (the report is written
    first); the NNI manager is stopped in every case.
    """
    from ..checkpoint import atomic_write_json, atomic_write_text

    options = options or TuneOptions()
    _check_options(options)
    space = validate_search_space(search_space, recipe)
    tuner, accepts_args = check_tuner(options.tuner)
    remote = options.training_service == "remote"
    gpus = parse_gpus(options.gpus)
    if not remote and not options.prepare_only:
        _check_local_gpus(gpus)
    if not options.prepare_only:
        check_port(options.port, extra=remote)

    out = Path(out_dir).expanduser().resolve()
    code_dir = out / "trial_code"
    code_dir.mkdir(parents=True, exist_ok=True)
    base = _portable_recipe(recipe, remote or options.prepare_only)
    dump_recipe(base, code_dir / "recipe.yaml")
    atomic_write_json(out / "search_space.json", space)
    # Trials use the GPU NNI schedules for them, else the CPU; on a cluster they decide themselves.
    device = "auto" if options.prepare_only else ("cuda" if gpus else "cpu")
    python = "python3" if remote or options.prepare_only else shlex.quote(sys.executable)
    command = f"{python} -m nni_steppingnet.nni.trial --recipe recipe.yaml --device {device}"
    if not remote and not gpus and not options.prepare_only:
        # CPU trials side by side: share the cores instead of each taking all of them.
        command += f" --threads {max(1, (os.cpu_count() or 1) // options.concurrency)}"
    if options.prepare_only:
        atomic_write_text(code_dir / "trial_command.txt", command + "\n")
        return TuneResult(experiment_id="", status="PREPARED", trials=[], best=None, best_recipe=None, out_dir=out)

    from nni.experiment import ExperimentConfig

    config = ExperimentConfig("remote" if remote else "local")
    config.experiment_name = f"steppingnet-{recipe.name}"
    config.trial_command = command
    config.trial_code_directory = str(code_dir)
    config.search_space = space
    config.tuner.name = tuner
    config.tuner.class_args = {"optimize_mode": "maximize"} if accepts_args else None
    config.max_trial_number = options.trials
    config.trial_concurrency = options.concurrency
    config.experiment_working_directory = str(out / "nni")
    if options.max_duration is not None:
        config.max_experiment_duration = options.max_duration
    config.trial_gpu_number = 1 if gpus else 0
    service = config.training_service
    if remote:
        service.machine_list = to_nni_machines(options.machines, gpus or None, options.trials_per_gpu if gpus else None)
        manager_ip = options.nni_manager_ip or ("127.0.0.1" if all_loopback(options.machines) else None)
        if manager_ip is not None:
            config.nni_manager_ip = manager_ip
    elif gpus:
        service.use_active_gpu = True
        service.gpu_indices = gpus
        service.max_trial_number_per_gpu = options.trials_per_gpu
    try:
        config.validate()
    except (ValueError, TypeError, AssertionError) as exc:
        raise ValueError(f"NNI rejected the experiment configuration: {exc}") from exc

    status = "NOT_STARTED"
    trials: list[dict[str, Any]] = []
    experiment = None
    try:
        with _sigterm_as_interrupt():
            experiment = _start(config, options.port, remote)
            try:
                status = _wait(experiment, options, progress)
                trials = _collect(experiment)
            finally:
                _stop_experiment(experiment)
                # NNI registers stop() to run at exit; it is done by now.
                atexit.unregister(experiment.stop)
    except KeyboardInterrupt:
        logger.warning(
            "interrupted: the NNI experiment %s was stopped",
            experiment.id if experiment is not None else "(not started)",
        )
        raise
    best = _best(trials)
    best_path: Path | None = None
    if best is not None:
        best_recipe = apply_params(base, best["params"])
        best_path = dump_recipe(best_recipe, out / "best.yaml")
    report = {
        "experiment_id": experiment.id if experiment is not None else None,
        "status": status,
        "recipe": base.to_dict(),
        "search_space": space,
        "tuner": tuner,
        "training_service": options.training_service,
        "trials": trials,
        "best": best,
    }
    atomic_write_json(out / "trials.json", report)
    atomic_write_text(out / "trials.md", trials_markdown(trials, best))
    assert experiment is not None
    result = TuneResult(
        experiment_id=experiment.id, status=status, trials=trials, best=best, best_recipe=best_path, out_dir=out
    )
    if status == "ERROR":
        raise TuneError(f"the NNI experiment failed; see {out / 'nni' / result.experiment_id / 'log'}")
    if best is None:
        failed = [t for t in trials if t["status"] != "SUCCEEDED"]
        where = f" (trial logs: {failed[0]['log_path']})" if failed else ""
        raise TuneError(f"no trial succeeded ({len(trials)} ran){where}; trials.md lists them")
    return result


def _start(config: Any, port: int, remote: bool, attempts: int = 3) -> Any:
    """Start an NNI experiment, retrying when its manager is slow to come up.

    NNI's launcher gives the manager's web server about 3 s to answer; on a loaded machine it
    can take longer, and the launcher then fails (and kills the manager). Each retry is a new
    experiment id.
    """
    from nni.experiment import Experiment
    from nni.runtime.log import stop_experiment_logging

    last: Exception | None = None
    for attempt in range(1, attempts + 1):
        experiment = Experiment(config)
        try:
            experiment.start(port)
            return experiment
        except KeyboardInterrupt:
            if _manager_process(experiment) is not None:
                _stop_experiment(experiment)
            atexit.unregister(experiment.stop)
            raise
        except Exception as exc:  # NNI raises requests/JSON/Runtime errors from its launcher
            last = exc
            atexit.unregister(experiment.stop)
            with contextlib.suppress(Exception):
                stop_experiment_logging(experiment.id)
            if _manager_process(experiment) is not None:
                _stop_experiment(experiment)
            logger.warning("NNI's manager did not start (attempt %d of %d): %s", attempt, attempts, exc)
            for _ in range(20):  # the killed manager may hold the port for a moment
                try:
                    check_port(port, extra=remote)
                    break
                except ValueError:
                    time.sleep(0.5)
    log_dir = Path(str(config.experiment_working_directory))
    raise TuneError(f"NNI's manager did not start after {attempts} attempts ({last}); see the logs under {log_dir}")


def _wait(experiment: Any, options: TuneOptions, progress: Callable[[str], None] | None) -> str:
    deadline = None if options.timeout_s is None else time.monotonic() + float(options.timeout_s)
    last = ""
    while True:
        status = experiment.get_status()
        if progress is not None:
            stats = experiment.get_job_statistics()
            counts = ", ".join(f"{s['trialJobNumber']} {s['trialJobStatus'].lower()}" for s in stats)
            line = f"{status.lower()}: {counts or 'no trials yet'}"
            if line != last:
                progress(line)
                last = line
        if status in _FINAL_STATES:
            return status
        if deadline is not None and time.monotonic() > deadline:
            logger.warning("stopping the experiment: it ran longer than %.0f s", options.timeout_s)
            return "TIMEOUT"
        time.sleep(options.poll_interval)


# ------------------------------------------------------------------------------ CLI
def add_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    parser.add_argument("recipe", help="bundled recipe name or path to a recipe YAML")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe value before searching (repeatable)",
    )
    parser.add_argument(
        "--search-space",
        default=None,
        metavar="NAME|FILE",
        help="bundled search space name or YAML/JSON file (default: "
        "search_space_<recipe>.yaml if bundled, else 'default')",
    )
    parser.add_argument("--trials", type=int, default=None, help="number of trials (default 10)")
    parser.add_argument("--concurrency", type=int, default=None, help="trials at a time (default 1)")
    parser.add_argument("--tuner", default=None, help=f"NNI tuner: {', '.join(SUPPORTED_TUNERS)} (default TPE)")
    parser.add_argument(
        "--training-service", choices=("local", "remote"), default=None, help="where trials run (default local)"
    )
    parser.add_argument(
        "--machines", default=None, metavar="FILE", help="YAML list of SSH machines for the remote service"
    )
    parser.add_argument("--nni-manager-ip", default=None, help="this machine's address as remote workers see it")
    parser.add_argument("--port", type=int, default=None, help="NNI manager/web UI port (default 8080)")
    parser.add_argument(
        "--gpus", default=None, help="GPUs for trials: auto (all visible), none, or 0,1,... (default auto)"
    )
    parser.add_argument("--trials-per-gpu", type=int, default=None, help="trials sharing one GPU (default 1)")
    parser.add_argument("--max-duration", default=None, help="NNI max experiment duration, e.g. 2h")
    parser.add_argument("--out", default=None, help="output folder (default runs/tune-<recipe name>)")
    parser.add_argument(
        "--prepare-only",
        action="store_true",
        help="check everything and write trial_code/ and search_space.json for an NNI "
        "experiment on a cluster (kubeflow, frameworkcontroller), without running",
    )


def _options_from(args: argparse.Namespace, tune: Mapping[str, Any], source: str) -> TuneOptions:
    def pick(name: str, default: Any) -> Any:
        value = getattr(args, name, None)
        if value is not None:
            return value
        return tune.get(name, default)

    options = TuneOptions(
        trials=pick("trials", 10),
        concurrency=pick("concurrency", 1),
        tuner=pick("tuner", "TPE"),
        training_service=pick("training_service", "local"),
        port=pick("port", 8080),
        gpus=pick("gpus", "auto"),
        trials_per_gpu=pick("trials_per_gpu", 1),
        max_duration=pick("max_duration", None),
        nni_manager_ip=pick("nni_manager_ip", None),
        prepare_only=bool(getattr(args, "prepare_only", False)),
    )
    if isinstance(options.gpus, (list, int)) and not isinstance(options.gpus, bool):
        gpus = options.gpus if isinstance(options.gpus, list) else [options.gpus]
        options.gpus = ",".join(str(g) for g in gpus)
    machines_ip = None
    if args.machines is not None:
        options.machines, machines_ip = load_machines(args.machines)
    elif "machines" in tune and options.training_service == "remote":
        options.machines, machines_ip = parse_machines(tune["machines"], f"{source}: tune.machines")
    if options.nni_manager_ip is None:
        options.nni_manager_ip = machines_ip
    return options


def main(args: argparse.Namespace) -> int:
    # NNI prints its own (coloured) log lines; do not print them a second time through the root
    # logger that the command line configured.
    logging.getLogger("nni").propagate = False
    recipe, tune = load_tune_recipe(args.recipe, args.overrides)
    options = _options_from(args, tune, recipe.source)
    space_name = args.search_space or tune.get("search_space")
    if space_name is None:
        try:
            search_space_path(recipe.name)
            space_name = recipe.name
        except (ValueError, FileNotFoundError):
            space_name = "default"
    space = load_search_space(space_name)
    out = Path(args.out) if args.out else Path("runs") / f"tune-{recipe.name}"
    if not options.prepare_only:
        print(
            f"tuning {recipe.name} ({recipe.source}) with {options.tuner}: {options.trials} trials, "
            f"{options.concurrency} at a time, {options.training_service} service, port {options.port}"
        )

    def progress(line: str) -> None:
        print(f"  {line}", flush=True)

    try:
        result = run_tune(recipe, space, out, options, progress=progress)
    except TuneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        print(f"report: {out / 'trials.md'}", file=sys.stderr)
        return 1
    if result.status == "PREPARED":
        code = result.out_dir / "trial_code"
        print(f"prepared {code} (recipe.yaml) and {result.out_dir / 'search_space.json'}")
        print(f"trial command: {(code / 'trial_command.txt').read_text().strip()}")
        print("see docs/nni.md for kubeflow / frameworkcontroller experiment files")
        return 0
    print()
    print((out / "trials.md").read_text(encoding="utf-8"))
    print(f"experiment {result.experiment_id}: {result.status}")
    print(f"trials: {result.out_dir / 'trials.md'}, {result.out_dir / 'trials.json'}")
    print(f"best recipe: {result.best_recipe}  (run it with: nni-steppingnet run {result.best_recipe})")
    return 0
