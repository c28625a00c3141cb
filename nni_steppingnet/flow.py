"""The end-to-end SteppingNet flow of a recipe: teacher, construction, retraining, evaluation.

:func:`run_recipe` runs the stages in order inside an output folder:

1. ``teacher``: the ORIGINAL network (``model.width``) trained with SGD and a cosine schedule, or
   loaded from ``teacher.checkpoint`` (a local file); saved as ``teacher.pt``. Its MACs are the
   reference of the budgets (the paper's M_t) and its accuracy the "Orig. Acc." column.
2. ``construction``: the Fig. 3 loop (:class:`nni_steppingnet.construct.Constructor`) on a
   SteppingNet wrapping the original architecture widened by ``steppingnet.expansion``.
3. ``retraining``: every subnet in ascending order per batch with distillation from the teacher
   (eq. 4, ``retraining.gamma``) and learning-rate suppression (``retraining.beta``).
4. ``evaluation``: test accuracy and exact MACs of every subnet; ``results.json``,
   ``results.md`` and ``accuracy_vs_macs.png``.

``checkpoint.pt`` is rewritten atomically after the teacher, after every construction iteration,
after every retraining epoch and after every stage; ``run_recipe(..., resume=True)`` continues
from it and ends with the same assignment and weights as an uninterrupted run on the same device
(all random generators and the data position are part of the checkpoint).
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Subset

from .app.parallel import global_accuracies, seed_epoch, settle_weights, whole_test_loader
from .checkpoint import (
    capture_rng,
    check_writable_dir,
    load_checkpoint_file,
    remove_stale_temporaries,
    restore_rng,
    save_checkpoint,
    seed_everything,
)
from .config import Recipe, RecipeError, load_recipe, recipe_diff
from .data import DatasetInfo, load_dataset, make_loaders
from .distributed import (
    DistributedContext,
    all_reduce_mean,
    assignment_hash,
    check_same_assignment,
    convert_sync_batchnorm,
    current_context,
    device_for,
    distributed_failures,
    from_main,
    wrap_ddp,
)
from .errors import CheckpointError
from .macs import macs as count_macs
from .report import write_report
from .stepping import SteppingNet

__all__ = [
    "STAGES",
    "RUN_FORMAT",
    "TEACHER_FORMAT",
    "CHECKPOINT_NAME",
    "TEACHER_NAME",
    "RESULTS_FORMAT",
    "Reporter",
    "LoadedCheckpoint",
    "resolve_device",
    "example_inputs",
    "build_model",
    "model_spec",
    "build_stepping_net",
    "build_data",
    "reference_macs",
    "load_teacher",
    "shared_teacher",
    "train_teacher_model",
    "run_recipe",
    "load_checkpoint",
    "evaluate_checkpoint",
    "measure_stepping",
]

logger = logging.getLogger(__name__)

STAGES: tuple[str, ...] = ("teacher", "construction", "retraining", "evaluation")
RUN_FORMAT = "nni_steppingnet.run/1"
TEACHER_FORMAT = "nni_steppingnet.teacher/1"
CHECKPOINT_NAME = "checkpoint.pt"
TEACHER_NAME = "teacher.pt"
RESULTS_FORMAT = "nni_steppingnet.results/1"

#: ``reporter(kind, payload)``. Kinds: ``'stage'`` (``{"stage", "total"}`` when a stage starts),
#: ``'iteration'`` (a construction history entry, plus ``accuracies`` on the monitor subset),
#: ``'epoch'`` (``{"stage", "epoch", "epochs", "loss"}`` after every retraining epoch) and
#: ``'final'`` (the results dict). Ignore kinds you do not know: more may be added.
Reporter = Callable[[str, dict[str, Any]], None]


# ------------------------------------------------------------------------------ building
def resolve_device(spec: str | torch.device = "auto") -> torch.device:
    """``'auto'`` (CUDA when present, else CPU), ``'cpu'``, ``'cuda'`` or ``'cuda:k'``."""
    if isinstance(spec, torch.device):
        spec = str(spec)
    if not isinstance(spec, str):
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:K', got {spec!r}")
    text = spec.strip().lower()
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if text == "cpu":
        return torch.device("cpu")
    if text == "cuda" or (text.startswith("cuda:") and text[5:].isdigit()):
        if not torch.cuda.is_available():
            raise ValueError(
                f"device {spec!r} was requested but CUDA is not available here; use --device cpu (or auto)"
            )
        device = torch.device(text)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(
                f"device {spec!r}: only {torch.cuda.device_count()} CUDA device(s) are "
                f"visible (cuda:0..cuda:{torch.cuda.device_count() - 1})"
            )
        return device
    raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:K', got {spec!r}")


def example_inputs(info: DatasetInfo) -> torch.Tensor:
    """A fixed batch of 2 random images shaped like the dataset's (for tracing and MACs)."""
    generator = torch.Generator().manual_seed(0)
    return torch.randn(2, info.in_chans, info.img_size, info.img_size, generator=generator)


def _entrypoint(name: str) -> Callable[..., nn.Module]:
    import timm
    from timm.models import model_entrypoint

    from . import models  # noqa: F401  (registers the paper models with timm)

    if not timm.is_model(name):
        raise RecipeError(f"model.name {name!r} is not a timm model")
    return model_entrypoint(name)


def _takes_img_size(entry: Callable[..., nn.Module]) -> bool:
    """Whether the entry point builds a model that takes ``img_size``: named in its signature, or
    (timm's ViT, Swin, Mixer, ... entry points pass ``**kwargs`` on) taken by an ``nn.Module``
    class of the module that defines the entry point. Passing it to a model that does not take it
    (ResNet) would fail, so the data's image size goes only where it is read."""
    params = inspect.signature(entry).parameters
    if "img_size" in params:
        return True
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return False
    module = sys.modules.get(getattr(entry, "__module__", ""))
    if module is None:
        return False
    for value in vars(module).values():
        if isinstance(value, type) and issubclass(value, nn.Module) and value.__module__ == module.__name__:
            if _init_takes(value, "img_size"):
                return True
    return False


def _init_takes(cls: type, name: str) -> bool:
    """Whether ``cls(...)`` takes ``name``: its ``__init__`` or, through ``**kwargs`` passed on,
    a base class's (timm's ``VisionTransformerDistilled(*args, **kwargs)``)."""
    for base in cls.__mro__:
        if base is nn.Module:
            return False
        if "__init__" not in vars(base):
            continue
        try:
            params = inspect.signature(vars(base)["__init__"]).parameters
        except (TypeError, ValueError):  # not inspectable (a C extension)
            return False
        if name in params:
            return True
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            return False
    return False


def build_model(recipe: Recipe, info: DatasetInfo, width: float = 1.0) -> nn.Module:
    """The recipe's network with ``num_classes``/``in_chans``/``img_size`` from the data.

    ``width`` multiplies ``recipe.model.width``: 1.0 builds the original network, and
    ``recipe.steppingnet.expansion`` the network being constructed. The paper models take
    ``width``; timm ResNets are widened through their ``channels`` (the stem stays as it is);
    other models must keep width 1.
    """
    import timm

    name, kwargs = model_spec(recipe, info, width)
    try:
        model = timm.create_model(name, pretrained=False, **kwargs)
    except TypeError as exc:
        raise RecipeError(f"cannot build model {name!r} with {kwargs}: {exc}; check model.kwargs") from exc
    return model


def model_spec(recipe: Recipe, info: DatasetInfo, width: float = 1.0) -> tuple[str, dict[str, Any]]:
    """``(timm name, create_model kwargs)`` of :func:`build_model`: what a user needs to rebuild
    the network without this package's training code (e.g. to load an exported runner)."""
    if isinstance(width, bool) or not isinstance(width, (int, float)) or not math.isfinite(width) or width <= 0:
        raise ValueError(f"width must be a positive number, got {width!r}")
    name = recipe.model.name
    entry = _entrypoint(name)
    params = inspect.signature(entry).parameters
    total = float(recipe.model.width) * float(width)
    kwargs: dict[str, Any] = dict(recipe.model.kwargs)
    kwargs.update(num_classes=info.num_classes, in_chans=info.in_chans)
    if _takes_img_size(entry):
        kwargs["img_size"] = info.img_size
    if "width" in params:
        kwargs["width"] = total
    elif not math.isclose(total, 1.0):
        if getattr(entry, "__module__", "") == "timm.models.resnet":
            from .models import scale_width

            base = tuple(kwargs.get("channels", (64, 128, 256, 512)))
            kwargs["channels"] = tuple(scale_width(int(c), total) for c in base)
            if "stem_width" in kwargs:
                kwargs["stem_width"] = scale_width(int(kwargs["stem_width"]), total)
        else:
            raise RecipeError(
                f"model {name!r} has no width parameter, so it cannot be widened by "
                f"{total:g} (model.width x expansion); set model.width: 1.0 and "
                "steppingnet.expansion: 1.0, or use a model that takes width"
            )
    return name, kwargs


def build_data(
    recipe: Recipe, device: torch.device | str = "cpu", distributed: DistributedContext | None = None
) -> tuple[DataLoader, DataLoader, DatasetInfo]:
    """``(train_loader, test_loader, info)`` of the recipe's dataset; nothing is downloaded unless
    ``data.download`` is true. With ``data.val_fraction > 0`` the second loader reads a seeded,
    stratified hold-out of the training set (for tuning) instead of the test set. On CUDA the
    loaders use pinned memory and worker processes. In a data-parallel job (``distributed``) both
    loaders read this rank's part (see :func:`nni_steppingnet.data.make_loaders`)."""
    ctx = distributed or DistributedContext()
    d = recipe.data
    train, test, info = load_dataset(
        d.name,
        d.root,
        download=d.download,
        seed=recipe.seed,
        synthetic_size=d.synthetic_size,
        val_fraction=d.val_fraction,
        img_size=d.img_size,
        augment=d.augment,
        layout=d.layout,
        train_subset=d.train_subset,
    )
    train_loader, test_loader = make_loaders(
        train,
        test,
        batch_size=d.batch_size,
        device=device,
        num_workers=d.num_workers,
        seed=recipe.seed,
        rank=ctx.rank,
        world_size=ctx.world_size,
    )
    return train_loader, test_loader, info


def reference_macs(recipe: Recipe, info: DatasetInfo) -> int:
    """MACs per sample of the ORIGINAL network (what the budgets are fractions of)."""
    model = build_model(recipe, info, width=1.0)
    return count_macs(model, example_inputs(info))


def _monitor_loader(test_loader: DataLoader, samples: int) -> DataLoader | None:
    """The first ``samples`` test images, read without touching the global random generator."""
    if samples <= 0:
        return None
    dataset = test_loader.dataset
    count = min(samples, len(dataset))  # type: ignore[arg-type]
    subset = Subset(dataset, range(count))
    return DataLoader(
        subset,
        batch_size=test_loader.batch_size,
        shuffle=False,
        num_workers=0,
        pin_memory=test_loader.pin_memory,
        generator=torch.Generator().manual_seed(0),
    )


# ------------------------------------------------------------------------------- teacher
def _teacher_meta(recipe: Recipe, info: DatasetInfo) -> dict[str, Any]:
    return {
        "model": recipe.model.name,
        "width": float(recipe.model.width),
        "kwargs": dict(recipe.model.kwargs),
        "num_classes": info.num_classes,
        "in_chans": info.in_chans,
        "img_size": info.img_size,
    }


def load_teacher(path: str | os.PathLike[str], recipe: Recipe, info: DatasetInfo) -> tuple[nn.Module, dict[str, Any]]:
    """Build the original network and load teacher weights from a local file.

    Accepts a ``teacher.pt`` written by a run, a plain ``state_dict`` or a dict holding one
    under ``"state_dict"`` or ``"model"``. Raises :class:`CheckpointError` naming the mismatch
    when the file belongs to another architecture. Returns ``(model, file metadata)``.
    """
    source = Path(path).expanduser()
    if not source.is_file():
        raise FileNotFoundError(
            f"teacher checkpoint not found: {source} (teacher.checkpoint must be a "
            "local file; relative paths are resolved against the working directory)"
        )
    try:
        raw = torch.load(source, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError, RuntimeError, EOFError for foreign files
        raise CheckpointError(
            f"cannot read teacher checkpoint {source}: {type(exc).__name__}: {exc}. "
            "Save the teacher with torch.save(model.state_dict(), path)"
        ) from exc
    meta: dict[str, Any] = {}
    if isinstance(raw, Mapping) and raw.get("format") == TEACHER_FORMAT:
        meta = dict(raw.get("meta") or {})
        expected = _teacher_meta(recipe, info)
        differ = [f"{k}: file {meta.get(k)!r} vs recipe {v!r}" for k, v in expected.items() if meta.get(k) != v]
        if differ:
            raise CheckpointError(
                f"teacher checkpoint {source} was saved for another network ("
                + "; ".join(differ)
                + "); point teacher.checkpoint at a teacher of "
                "this recipe's model or train one (teacher.checkpoint: null)"
            )
        state = raw["state_dict"]
        meta["accuracy"] = raw.get("accuracy")
    elif isinstance(raw, Mapping) and isinstance(raw.get("state_dict"), Mapping):
        state = raw["state_dict"]
    elif isinstance(raw, Mapping) and isinstance(raw.get("model"), Mapping) and "format" not in raw:
        state = raw["model"]
    elif isinstance(raw, Mapping) and all(isinstance(v, torch.Tensor) for v in raw.values()):
        state = raw
    else:
        raise CheckpointError(
            f"teacher checkpoint {source} holds no state_dict (found "
            f"{type(raw).__name__} with keys {list(raw)[:6] if isinstance(raw, Mapping) else '-'}); "
            "save it with torch.save(model.state_dict(), path)"
        )
    model = build_model(recipe, info, width=1.0)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())
        raise CheckpointError(
            f"teacher checkpoint {source} does not fit model {recipe.model.name!r} "
            f"(width {recipe.model.width}, {info.num_classes} classes, {info.in_chans} "
            f"input channels): {detail[:600]}"
        ) from exc
    return model, meta


def shared_teacher(
    path: str | os.PathLike[str], recipe: Recipe, info: DatasetInfo, distributed: DistributedContext | None = None
) -> nn.Module:
    """:func:`load_teacher`'s model; in a data-parallel job (``distributed``) rank 0 reads the file
    and sends the weights to every rank (the file may live on rank 0's machine only), and a bad
    file stops every rank with the same error."""
    ctx = distributed or DistributedContext()
    if not ctx.enabled:
        return load_teacher(path, recipe, info)[0]
    state = from_main(lambda: load_teacher(path, recipe, info)[0].state_dict(), (OSError, CheckpointError))
    teacher = build_model(recipe, info, width=1.0)
    teacher.load_state_dict(state)
    return teacher


def train_teacher_model(
    recipe: Recipe,
    info: DatasetInfo,
    train_loader: DataLoader,
    device: torch.device,
    *,
    amp: str | None = None,
    progress: bool = False,
    sync_bn: bool = False,
    distributed: DistributedContext | None = None,
) -> tuple[nn.Module, list[float]]:
    """A new original network (width 1) trained densely with the recipe's teacher settings on
    ``device``; returns ``(model, losses)``. In a data-parallel job (``distributed``) it trains
    through DistributedDataParallel on the rank's shard (``sync_bn``: synchronised BatchNorm) and
    every rank ends with rank 0's weights and BatchNorm statistics (checked)."""
    from .train import train_dense

    ctx = distributed or DistributedContext()
    model = build_model(recipe, info, width=1.0)
    if sync_bn:
        convert_sync_batchnorm(model)
    model.to(device)
    t = recipe.teacher
    with distributed_failures("training the teacher"):
        losses = train_dense(
            wrap_ddp(model, ctx, device),
            train_loader,
            epochs=t.epochs,
            lr=t.lr,
            momentum=t.momentum,
            weight_decay=t.weight_decay,
            optimizer=t.optimizer,
            device=device,
            amp=amp,
            progress=progress and ctx.is_main,
        )
    settle_weights(model, ctx, "after training the teacher")
    return model, [float(v) for v in losses]


def _save_teacher(
    path: Path, model: nn.Module, recipe: Recipe, info: DatasetInfo, accuracy: float | None, losses: Sequence[float]
) -> None:
    save_checkpoint(
        {
            "format": TEACHER_FORMAT,
            "meta": _teacher_meta(recipe, info),
            "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "accuracy": accuracy,
            "losses": list(losses),
        },
        path,
    )


# ------------------------------------------------------------------------------- helpers
def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().tolist()
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        return value.item()
    return value


def _check_stages(stages: Sequence[str]) -> list[str]:
    if isinstance(stages, str):
        raise ValueError(f"stages must be a sequence of stage names, got the string {stages!r}")
    chosen = list(stages)
    unknown = [s for s in chosen if s not in STAGES]
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; stages are {', '.join(STAGES)}")
    if chosen != sorted(chosen, key=STAGES.index) or len(set(chosen)) != len(chosen):
        raise ValueError(f"stages must be distinct and in the order {', '.join(STAGES)}, got {chosen}")
    return chosen


@dataclass
class _RunState:
    """What checkpoint.pt holds, in memory."""

    recipe: dict[str, Any]
    info: dict[str, Any]
    device: str
    reference_macs: int
    stage: str = "teacher"
    completed: list[str] = field(default_factory=list)
    stage_state: dict[str, Any] | None = None
    net: dict[str, Any] | None = None
    teacher_accuracy: float | None = None
    teacher_losses: list[float] = field(default_factory=list)
    history: list[dict[str, Any]] = field(default_factory=list)
    retraining_losses: list[float] = field(default_factory=list)
    wall_time_s: float = 0.0
    stage_times_s: dict[str, float] = field(default_factory=dict)
    results: dict[str, Any] | None = None
    #: the global random generators when the checkpoint was written
    rng: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["format"] = RUN_FORMAT
        return out


def _read_run_state(path: Path) -> _RunState:
    raw = load_checkpoint_file(path)
    if raw.get("format") != RUN_FORMAT:
        raise CheckpointError(f"{path} is not a run checkpoint (format {raw.get('format')!r}, expected {RUN_FORMAT!r})")
    names = {f.name for f in dataclasses.fields(_RunState)}
    missing = sorted({"recipe", "info", "device", "reference_macs"} - set(raw))
    if missing:
        raise CheckpointError(f"{path} lacks {missing}; it is damaged or from another version")
    return _RunState(**{k: v for k, v in raw.items() if k in names})


def _net_state(state: _RunState) -> dict[str, Any] | None:
    if state.net is not None:
        return state.net
    if state.stage_state is not None and isinstance(state.stage_state.get("construction"), Mapping):
        return state.stage_state["construction"].get("net")
    return None


def build_stepping_net(recipe: Recipe, info: DatasetInfo, verify: bool = True, sync_bn: bool = False) -> SteppingNet:
    """The SteppingNet being constructed: the original widened by ``steppingnet.expansion``
    (with ``sync_bn``, its BatchNorm layers synchronised over the ranks of a data-parallel job)."""
    model = build_model(recipe, info, width=recipe.steppingnet.expansion)
    if sync_bn:
        convert_sync_batchnorm(model)
    return SteppingNet(
        model,
        example_inputs(info),
        recipe.steppingnet.num_subnets,
        verify=verify,
        execution=recipe.steppingnet.execution,
    )


def _evaluate_net(
    net: SteppingNet,
    recipe: Recipe,
    info: DatasetInfo,
    test_loader: DataLoader,
    device: torch.device,
    amp: str | None,
    ref_macs: int,
    teacher_accuracy: float | None,
    combine: Callable[[Sequence[float]], list[float]] | None = None,
) -> dict[str, Any]:
    from .train import evaluate

    accuracies = evaluate(net, test_loader, device=device, amp=amp)
    if combine is not None:
        accuracies = combine(accuracies)  # a data-parallel job: every rank's part of the test set
    budgets = recipe.steppingnet.budgets
    subnets = []
    for s in range(1, net.num_subnets + 1):
        m = net.macs(s)
        subnets.append(
            {
                "index": s,
                "accuracy": accuracies[s - 1],
                "macs": m,
                "mac_ratio": m / ref_macs,
                "budget": budgets[s - 1],
                "budget_gap": m / ref_macs - budgets[s - 1],
            }
        )
    met = [sub["macs"] <= sub["budget"] * ref_macs for sub in subnets]
    return {
        "original": {"accuracy": teacher_accuracy, "macs": ref_macs},
        "subnets": subnets,
        "budgets_met": all(met),
        "budgets_met_per_subnet": met,
        "expanded": {"expansion": recipe.steppingnet.expansion, "macs": net.full_macs},
        "dataset": dataclasses.asdict(info),
    }


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_stepping(
    net: SteppingNet,
    loader: DataLoader,
    *,
    device: str | torch.device = "cpu",
    reference_macs: int | None = None,
    repeats: int = 1,
) -> dict[str, Any]:
    """Anytime inference over ``loader``: stepping with the runtime against recomputing.

    Every batch is run twice. (a) An :class:`~nni_steppingnet.runtime.IncrementalRunner` starts
    at subnet 1 and steps to N, each step computing only the neurons the next subnet adds.
    (b) Each exported subnet (:meth:`SteppingNet.export_subnet`, a physically smaller dense
    module) runs from scratch, as a deployment without reuse would when it upgrades from
    subnet s-1 to s. The first batch is run once before timing (warm-up). With ``repeats`` > 1
    the loader is passed that many times and each time is the median of the passes (tiny models
    take microseconds per image, where one pass is at the mercy of other processes).

    Returns ``{"layout", "samples", "steps": [...]}``; step ``s`` holds ``accuracy`` (stepping),
    ``exported_accuracy``, ``macs_stepping`` (MACs per image spent to reach subnet s by stepping:
    ``net.macs(s)``), ``macs_recompute`` (running exported subnets 1..s one after the other:
    ``sum(net.macs(k) for k <= s)``), ``macs_subnet`` (subnet s alone), their ratios to
    ``reference_macs`` when given, and the measured seconds for the whole loader:
    ``time_step_s`` (this step), ``time_stepping_s`` (steps 1..s), ``time_subnet_s`` (exported
    subnet s alone) and ``time_recompute_s`` (exported subnets 1..s).
    """
    from .runtime import IncrementalRunner

    dev = resolve_device(device)
    n = net.num_subnets
    was_training = net.model.training
    net.model.eval()
    try:
        runner = IncrementalRunner(net).to(dev)
        exported = [net.export_subnet(s).to(dev).eval() for s in range(1, n + 1)]
    finally:
        net.model.train(was_training)
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be a positive int, got {repeats!r}")
    correct_step, correct_exp = [0] * n, [0] * n
    passes_step: list[list[float]] = []
    passes_exp: list[list[float]] = []
    samples = 0
    warmed = False
    with torch.inference_mode():
        for repeat in range(repeats):
            time_step, time_exp = [0.0] * n, [0.0] * n
            for x, y in loader:
                x, y = x.to(dev), y.to(dev)
                if not warmed:
                    runner.start(x)
                    for _ in range(n - 1):
                        runner.step()
                    for module in exported:
                        module(x)
                    warmed = True
                for s in range(n):
                    _synchronize(dev)
                    t0 = time.perf_counter()
                    logits = runner.start(x) if s == 0 else runner.step()
                    _synchronize(dev)
                    time_step[s] += time.perf_counter() - t0
                    if repeat == 0:
                        correct_step[s] += int((logits.argmax(1) == y).sum())
                for s, module in enumerate(exported):
                    _synchronize(dev)
                    t0 = time.perf_counter()
                    logits = module(x)
                    _synchronize(dev)
                    time_exp[s] += time.perf_counter() - t0
                    if repeat == 0:
                        correct_exp[s] += int((logits.argmax(1) == y).sum())
                if repeat == 0:
                    samples += int(y.shape[0])
            if samples == 0:
                raise ValueError("measure_stepping needs a loader with at least one batch")
            passes_step.append(time_step)
            passes_exp.append(time_exp)
    time_step = [statistics.median(p[s] for p in passes_step) for s in range(n)]
    time_exp = [statistics.median(p[s] for p in passes_exp) for s in range(n)]
    steps: list[dict[str, Any]] = []
    macs = [net.macs(s) for s in range(1, n + 1)]
    for s in range(n):
        entry: dict[str, Any] = {
            "subnet": s + 1,
            "accuracy": correct_step[s] / samples,
            "exported_accuracy": correct_exp[s] / samples,
            "macs_step": macs[s] - (macs[s - 1] if s else 0),
            "macs_stepping": macs[s],
            "macs_subnet": macs[s],
            "macs_recompute": sum(macs[: s + 1]),
            "time_step_s": time_step[s],
            "time_stepping_s": sum(time_step[: s + 1]),
            "time_subnet_s": time_exp[s],
            "time_recompute_s": sum(time_exp[: s + 1]),
        }
        if reference_macs:
            for key in ("macs_stepping", "macs_recompute"):
                entry[key.replace("macs_", "mac_ratio_")] = entry[key] / reference_macs
        steps.append(entry)
    return {"layout": runner.layout, "samples": samples, "device": str(dev), "repeats": repeats, "steps": steps}


# ------------------------------------------------------------------------------ the flow
def run_recipe(
    recipe: Recipe | str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    resume: bool = False,
    device: str | torch.device = "auto",
    amp: str | None = None,
    progress: bool = False,
    reporter: Reporter | None = None,
    stages: Sequence[str] = STAGES,
    sync_bn: bool = False,
    distributed: DistributedContext | None = None,
) -> dict[str, Any]:
    """Run (or with ``resume`` continue) a recipe in ``out_dir`` and return the results dict.

    Args:
        recipe: a :class:`Recipe`, or a bundled recipe name / YAML path.
        out_dir: the run folder (created). Holding a ``checkpoint.pt`` already is an error unless
            ``resume`` is given; ``resume`` needs one and the same recipe (``data.root``,
            ``data.download``, ``data.num_workers`` and ``description`` may differ).
        device: ``'auto'``, ``'cpu'``, ``'cuda'`` or ``'cuda:K'``. On CUDA, cuDNN is put in
            deterministic mode (same seed, same result).
        amp: ``None`` or ``'bf16'``.
        progress: show tqdm progress bars of the training loops.
        reporter: ``reporter(kind, payload)``; see :data:`Reporter`.
        stages: the stages to run, a subsequence of :data:`STAGES`. A skipped ``teacher`` uses
            ``teacher.checkpoint`` (or none: no distillation, no original accuracy); a skipped
            ``construction`` needs a completed one in the checkpoint; a skipped ``retraining``
            evaluates the constructed subnets as they are; without ``evaluation`` no results are
            written and the returned dict only lists the completed stages.
        sync_bn: synchronise BatchNorm statistics over the ranks of a data-parallel job
            (:func:`nni_steppingnet.distributed.convert_sync_batchnorm`); no effect on one process.
        distributed: the data-parallel context (default: the process group this process joined,
            if any; :func:`nni_steppingnet.distributed.init_distributed` joins torchrun's). With
            more than one rank every stage trains through DistributedDataParallel on the rank's
            shard of the data (``data.batch_size`` per rank), construction averages the importance
            over the ranks and checks after every iteration that all ranks hold the same
            assignment, evaluation adds every rank's counts, and rank 0 alone writes the folder,
            reports and measures the anytime runtime. ``device='cuda'`` means ``cuda:LOCAL_RANK``.

    Returns:
        the ``results.json`` dict: ``original`` (``accuracy``, ``macs``), ``subnets`` (``index``,
        ``accuracy``, ``macs``, ``mac_ratio``, ``budget``, ``budget_gap``), ``budgets_met``,
        ``budgets_met_per_subnet``, ``recipe``, ``wall_time_s``, ``construction`` (summary and
        history), ``retraining`` and ``teacher`` (losses), ``dataset``, ``expanded``, ``device``,
        ``isolation_ok``, ``stage_times_s``, ``stepping`` (:func:`measure_stepping` on the test
        set, or None when the runtime or export does not support the model), ``weights_hash``
        (:func:`nni_steppingnet.app.parallel.weights_hash` of the evaluated model, equal on every
        rank) and ``assignment_hash`` (:func:`nni_steppingnet.distributed.assignment_hash`).

    Before anything else the output folder is created, proven writable with a real test write
    (an ``OSError`` naming the folder otherwise) and cleared of temporary files that interrupted
    atomic writes left. Warnings (budgets unmet, a resume on another device, a skipped anytime
    measurement) go to the ``nni_steppingnet.flow`` logger: like every logger of this package it
    prints nothing until the application configures logging (``logging.basicConfig()``; the
    ``nni-steppingnet`` command does); ``results["budgets_met"]`` holds the outcome either way.
    """
    started = time.perf_counter()
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    run = _FlowRun(
        recipe,
        Path(out_dir),
        resume=resume,
        device=device,
        amp=amp,
        progress=progress,
        reporter=reporter,
        stages=stages,
        started=started,
        sync_bn=sync_bn,
        distributed=distributed or current_context(),
    )
    with distributed_failures(f"the run in {out_dir}"):
        return run.run()


class _FlowRun:
    """One call of :func:`run_recipe`: the stages as methods sharing the run state."""

    def __init__(
        self,
        recipe: Recipe,
        out: Path,
        *,
        resume: bool,
        device: str | torch.device,
        amp: str | None,
        progress: bool,
        reporter: Reporter | None,
        stages: Sequence[str],
        started: float,
        sync_bn: bool = False,
        distributed: DistributedContext | None = None,
    ) -> None:
        from .train import check_amp

        self.recipe = recipe
        self.out = out
        self.chosen = _check_stages(stages)
        self.amp = check_amp(amp)
        self.ctx = distributed or DistributedContext()
        self.sync_bn = bool(sync_bn)
        self.dev = device_for(self.ctx, resolve_device(device))
        self.ddp_net: nn.Module | None = None
        self.progress = progress
        self.reporter = reporter
        self.started = started
        self.ckpt_path = out / CHECKPOINT_NAME
        self.teacher_path = out / TEACHER_NAME
        self.previous = self._previous_state(resume)
        # A resumed run restores the random generators at the point of the code where the
        # checkpoint was written, so everything after it draws what an uninterrupted run draws.
        self.resume_rng = self.previous.rng if self.previous is not None else None
        self.teacher: nn.Module | None = None
        self.net: SteppingNet | None = None

    # ------------------------------------------------------------------------- plumbing
    def _previous_state(self, resume: bool) -> _RunState | None:
        """Rank 0 reads the folder and every rank gets its state (or the same error)."""
        return from_main(lambda: self._read_previous_state(resume), (ValueError, OSError, CheckpointError))

    def _read_previous_state(self, resume: bool) -> _RunState | None:
        if self.ckpt_path.exists():
            if not resume:
                raise ValueError(
                    f"{self.out} already holds a run ({CHECKPOINT_NAME}); pass --resume "
                    "(resume=True) to continue it, or choose another --out folder"
                )
            previous = _read_run_state(self.ckpt_path)
            differ = recipe_diff(previous.recipe, self.recipe.to_dict())
            if differ:
                raise ValueError(
                    f"cannot resume {self.out}: the recipe differs from the one it was started "
                    "with (" + "; ".join(differ[:8]) + "); resume with the same recipe and "
                    "--set values, or start a new run with another --out"
                )
            if previous.device != str(self.dev):
                logger.warning(
                    "resuming a run started on %s on %s: the result may differ from an uninterrupted run",
                    previous.device,
                    self.dev,
                )
            return previous
        if resume:
            raise FileNotFoundError(
                f"cannot resume: no {CHECKPOINT_NAME} in {self.out}; run without --resume to start the recipe there"
            )
        return None

    def report(self, kind: str, payload: dict[str, Any]) -> None:
        if self.reporter is not None and self.ctx.is_main:
            self.reporter(kind, payload)

    def save(self) -> None:
        """Rewrite checkpoint.pt (atomically) with the state and the random generators now
        (rank 0 only: every rank holds the same state)."""
        if not self.ctx.is_main:
            return
        state = self.state
        state.wall_time_s = self.elapsed_before + (time.perf_counter() - self.started)
        state.rng = capture_rng()
        save_checkpoint(state.to_dict(), self.ckpt_path)

    def restore_once(self) -> None:
        if self.resume_rng is not None:
            restore_rng(self.resume_rng)
            self.resume_rng = None

    def add_time(self, stage: str, seconds: float) -> None:
        self.state.stage_times_s[stage] = self.state.stage_times_s.get(stage, 0.0) + seconds

    def net_forward(self) -> nn.Module:
        """The module training calls: ``net.model``, or one DDP wrapper of it for the whole run."""
        assert self.net is not None
        if not self.ctx.enabled:
            return self.net.model
        if self.ddp_net is None:
            self.net.model.to(self.dev)
            self.ddp_net = wrap_ddp(self.net.model, self.ctx, self.dev)
        return self.ddp_net

    def global_accuracy(self, local: Sequence[float]) -> list[float]:
        """Accuracies over the whole test set from each rank's accuracies on its part."""
        return global_accuracies(local, self.test_loader, self.ctx, self.dev)

    def full_test_loader(self) -> DataLoader:
        """The whole test set (rank 0's anytime measurement), not this rank's part of it."""
        return whole_test_loader(self.test_loader, self.ctx)

    def shared_teacher(self, path: str | os.PathLike[str]) -> nn.Module:
        """The teacher of ``path`` read by rank 0 and sent to every rank."""
        return shared_teacher(path, self.recipe, self.info, self.ctx)

    # ----------------------------------------------------------------------------- run
    def run(self) -> dict[str, Any]:
        recipe, dev = self.recipe, self.dev
        seed_everything(recipe.seed)
        if dev.type == "cuda":
            torch.backends.cudnn.deterministic = True
            torch.backends.cudnn.benchmark = False
        self.train_loader, self.test_loader, self.info = build_data(recipe, dev, self.ctx)
        self.ref_macs = reference_macs(recipe, self.info)
        # Before any training (after the inputs, so bad data leaves no folder behind): a folder
        # that cannot be written fails now, not after the teacher trained.
        if self.ctx.is_main:
            check_writable_dir(self.out)
            for stale in remove_stale_temporaries(self.out):
                logger.info("removed %s, left by an interrupted write", stale)
        if self.ctx.enabled:
            logger.info(
                "rank %d of %d on %s: %d training images in this rank's shard",
                self.ctx.rank,
                self.ctx.world_size,
                dev,
                len(self.train_loader.sampler),  # type: ignore[arg-type]
            )
        self.state = self.previous or _RunState(
            recipe=recipe.to_dict(), info=dataclasses.asdict(self.info), device=str(dev), reference_macs=self.ref_macs
        )
        if self.state.reference_macs != self.ref_macs:
            raise CheckpointError(
                f"{self.ckpt_path}: reference MACs {self.state.reference_macs} differ from "
                f"this recipe's original network ({self.ref_macs}); the model or data changed"
            )
        self.state.recipe = recipe.to_dict()  # runtime keys (data.root, ...) follow the current call
        self.elapsed_before = self.state.wall_time_s
        self.setup_s = time.perf_counter() - self.started

        self.teacher_stage()
        if self.state.stage == "construction" and self.state.stage_state is None:
            self.restore_once()  # checkpoint written right after the teacher
        self.construction_stage()
        self.retraining_stage()
        self.restore_once()
        if "evaluation" not in self.chosen:
            return {"completed": list(self.state.completed), "stage": self.state.stage, "recipe": recipe.to_dict()}
        return self.evaluation_stage()

    # -------------------------------------------------------------------------- stages
    def teacher_stage(self) -> None:
        from .train import evaluate_model

        recipe, info, state, dev = self.recipe, self.info, self.state, self.dev
        teacher: nn.Module | None = None
        if "teacher" in state.completed:
            teacher = self.shared_teacher(self.teacher_path)
        elif "teacher" in self.chosen:
            t0 = time.perf_counter()
            self.report("stage", {"stage": "teacher", "total": recipe.teacher.epochs})
            losses: list[float] = []
            if recipe.teacher.checkpoint is not None:
                teacher = self.shared_teacher(recipe.teacher.checkpoint)
                logger.info("teacher loaded from %s", recipe.teacher.checkpoint)
            else:
                teacher, losses = train_teacher_model(
                    recipe,
                    info,
                    self.train_loader,
                    dev,
                    amp=self.amp,
                    progress=self.progress,
                    sync_bn=self.sync_bn,
                    distributed=self.ctx,
                )
            local = evaluate_model(teacher, self.test_loader, device=dev, amp=self.amp)
            state.teacher_accuracy = self.global_accuracy([local])[0]
            state.teacher_losses = [float(v) for v in losses]
            if self.ctx.is_main:
                _save_teacher(self.teacher_path, teacher, recipe, info, state.teacher_accuracy, losses)
            state.completed.append("teacher")
            state.stage = "construction"
            self.add_time("teacher", time.perf_counter() - t0)
            self.save()
            logger.info("teacher accuracy %.4f", state.teacher_accuracy)
        elif recipe.teacher.checkpoint is not None:
            teacher = self.shared_teacher(recipe.teacher.checkpoint)
            local = evaluate_model(teacher, self.test_loader, device=dev, amp=self.amp)
            state.teacher_accuracy = self.global_accuracy([local])[0]
        else:
            logger.warning("no teacher: retraining uses cross entropy only and the original accuracy is unknown")
        if teacher is not None:
            teacher.to(dev).eval()
            for p in teacher.parameters():
                p.requires_grad_(False)
        self.teacher = teacher

    def construction_stage(self) -> None:
        from .construct import ConstructionConfig, Constructor
        from .train import evaluate

        recipe, info, state, dev = self.recipe, self.info, self.state, self.dev
        in_progress = state.stage == "construction" and state.stage_state is not None
        if "construction" in state.completed or in_progress:
            self.net = build_stepping_net(recipe, info, verify=False, sync_bn=self.sync_bn)
            saved_net = _net_state(state)
            if saved_net is not None:
                self.net.load_state_dict(saved_net)
            self.net.model.to(dev)
        if "construction" in state.completed:
            return
        if "construction" not in self.chosen:
            raise ValueError(
                "the 'construction' stage is skipped but the run has no completed "
                "construction to continue from; include it in the stages"
            )
        if self.net is None:
            self.net = build_stepping_net(recipe, info, sync_bn=self.sync_bn)
        net = self.net
        c = recipe.construction
        config = ConstructionConfig.from_settings(
            recipe.steppingnet.budgets, self.ref_macs, dataclasses.asdict(c), seed=recipe.seed
        )
        constructor = Constructor(
            net,
            config,
            self.train_loader,
            device=dev,
            amp=self.amp,
            forward_module=self.net_forward(),
            reduce=all_reduce_mean if self.ctx.enabled else None,
        )
        try:
            if in_progress:
                assert state.stage_state is not None
                constructor.load_state_dict(state.stage_state["construction"])
                self.restore_once()
            # The monitor is informative only (rank 0 reports it on the first images of its part).
            monitor = _monitor_loader(self.test_loader, c.monitor_samples) if self.ctx.is_main else None
            self.report("stage", {"stage": "construction", "total": c.iterations, "done": constructor.iteration})
            state.stage = "construction"
            while not constructor.done:
                t_iter = time.perf_counter()
                entry = dict(constructor.step())
                if self.ctx.enabled:
                    entry["assignment_hash"] = check_same_assignment(
                        net, f"after construction iteration {constructor.iteration}"
                    )
                entry["time_s"] = time.perf_counter() - t_iter
                if monitor is not None:
                    entry["accuracies"] = evaluate(net, monitor, device=dev, amp=self.amp)
                state.history.append(_jsonable(entry))
                state.net = None  # the constructor state holds the net
                state.stage_state = {"construction": constructor.state_dict()}
                self.add_time("construction", time.perf_counter() - t_iter)
                self.save()
                self.report("iteration", dict(state.history[-1]))
            result = constructor.result()
        finally:
            constructor.close()
        if not result.all_met:
            logger.warning(
                "construction ended after %d iterations without meeting every budget: MAC ratios %s vs budgets %s",
                result.iterations,
                [round(r, 4) for r in result.mac_ratios],
                recipe.steppingnet.budgets,
            )
        state.completed.append("construction")
        state.stage = "retraining"
        state.stage_state = None
        state.net = net.state_dict()
        self.save()

    def retraining_stage(self) -> None:
        from .train import make_optimizer, train_subnets_epoch

        recipe, state, dev, net = self.recipe, self.state, self.dev, self.net
        assert net is not None
        r = recipe.retraining
        if "retraining" in state.completed:
            return
        if "retraining" in self.chosen and r.epochs > 0:
            optimizer = make_optimizer(net.model.parameters(), r.lr, r.momentum, r.weight_decay)
            scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=r.epochs)
            start_epoch = 0
            if state.stage == "retraining" and state.stage_state is not None:
                optimizer.load_state_dict(state.stage_state["optimizer"])
                scheduler.load_state_dict(state.stage_state["scheduler"])
                start_epoch = int(state.stage_state["epoch"])
            self.restore_once()  # checkpoint written after construction or after a retraining epoch
            state.stage = "retraining"
            self.report("stage", {"stage": "retraining", "total": r.epochs, "done": start_epoch})
            for epoch in range(start_epoch, r.epochs):
                t_epoch = time.perf_counter()
                # Epoch e always sees the same batch order, however the run was interrupted.
                seed_epoch(self.train_loader, recipe.seed + 1_000_003 * (epoch + 1))
                loss = train_subnets_epoch(
                    net,
                    self.train_loader,
                    optimizer,
                    beta=r.beta,
                    teacher=self.teacher,
                    gamma=r.gamma,
                    device=dev,
                    amp=self.amp,
                    progress=self.progress,
                    temperature=r.temperature,
                    forward_module=self.net_forward(),
                )
                scheduler.step()
                state.retraining_losses.append(float(loss))
                state.net = net.state_dict()
                state.stage_state = {
                    "epoch": epoch + 1,
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                }
                self.add_time("retraining", time.perf_counter() - t_epoch)
                self.save()
                self.report(
                    "epoch", {"stage": "retraining", "epoch": epoch + 1, "epochs": r.epochs, "loss": float(loss)}
                )
                logger.info("retraining epoch %d/%d: loss %.4f", epoch + 1, r.epochs, loss)
        if "retraining" in self.chosen or r.epochs == 0:
            state.completed.append("retraining")
            state.stage = "evaluation"
            state.stage_state = None
            state.net = net.state_dict()
            self.save()

    def measure_anytime(self, net: SteppingNet) -> dict[str, Any] | None:
        """:func:`measure_stepping` on the test set, or None (logged) where the runtime or export
        does not support the model."""
        try:
            # Median of 3 passes on small test sets (digits: 360 images take milliseconds).
            full_test = self.full_test_loader()
            repeats = 3 if len(full_test.dataset) <= 5000 else 1  # type: ignore[arg-type]
            stepping = measure_stepping(net, full_test, device=self.dev, reference_macs=self.ref_macs, repeats=repeats)
        except Exception as exc:  # the runtime or export may not support a model: report, don't fail the run
            logger.warning(
                "anytime measurement (IncrementalRunner vs exported subnets) skipped: %s: %s", type(exc).__name__, exc
            )
            return None
        for step in stepping["steps"]:
            logger.info(
                "step %d: accuracy %.4f, %d MACs by stepping vs %d recomputing, %.3f s vs %.3f s",
                step["subnet"],
                step["accuracy"],
                step["macs_stepping"],
                step["macs_recompute"],
                step["time_stepping_s"],
                step["time_recompute_s"],
            )
        return stepping

    def evaluation_stage(self) -> dict[str, Any]:
        recipe, state, dev, net = self.recipe, self.state, self.dev, self.net
        assert net is not None
        t0 = time.perf_counter()
        # Every rank evaluates rank 0's network (its BatchNorm statistics, checked weights).
        weights = settle_weights(net.model, self.ctx, "before the evaluation")
        results = _evaluate_net(
            net,
            recipe,
            self.info,
            self.test_loader,
            dev,
            self.amp,
            self.ref_macs,
            state.teacher_accuracy,
            combine=self.global_accuracy,
        )
        problems = net.check_isolation() if self.ctx.is_main else []
        if problems:
            logger.error("subnet isolation check failed: %s", problems[:4])
        # Rank 0 alone measures the anytime runtime (timings, on the whole test set).
        stepping = self.measure_anytime(net) if self.ctx.is_main else None
        self.add_time("evaluation", time.perf_counter() - t0)
        state.wall_time_s = self.elapsed_before + (time.perf_counter() - self.started)
        last = state.history[-1] if state.history else {}
        results = _jsonable(
            {
                "format": RESULTS_FORMAT,
                "recipe": recipe.to_dict(),
                **results,
                "isolation_ok": not problems,
                "stepping": stepping,
                "construction": {
                    "iterations": len(state.history),
                    "final_macs": last.get("macs"),
                    "final_mac_ratios": last.get("mac_ratios"),
                    "budgets_met": last.get("budgets_met"),
                    "time_s": state.stage_times_s.get("construction"),
                    "history": state.history,
                },
                "retraining": {"epochs": len(state.retraining_losses), "losses": state.retraining_losses},
                "teacher": {"epochs": len(state.teacher_losses), "losses": state.teacher_losses},
                "device": str(dev),
                "world_size": self.ctx.world_size,
                "sync_bn": self.sync_bn,
                "weights_hash": weights,
                "assignment_hash": assignment_hash(net),
                "amp": self.amp,
                "wall_time_s": state.wall_time_s,
                "stage_times_s": dict(state.stage_times_s),
                "setup_time_s": self.setup_s,
            }
        )
        if "evaluation" not in state.completed:
            state.completed.append("evaluation")
        state.stage = "done"
        state.results = results
        self.save()
        if self.ctx.is_main:
            write_report(results, self.out)
        self.report("final", results)
        return results


# ------------------------------------------------------------------------- checkpoints
@dataclass
class LoadedCheckpoint:
    """A run checkpoint loaded back: the SteppingNet (weights, assignment, masks) and its recipe."""

    net: SteppingNet
    recipe: Recipe
    info: DatasetInfo
    stage: str
    completed: list[str]
    reference_macs: int
    teacher_accuracy: float | None
    results: dict[str, Any] | None
    path: Path


def load_checkpoint(path: str | os.PathLike[str]) -> LoadedCheckpoint:
    """Rebuild the SteppingNet of a run checkpoint (``checkpoint.pt`` or its folder) on the CPU."""
    source = Path(path)
    if source.is_dir():
        source = source / CHECKPOINT_NAME
    state = _read_run_state(source)
    recipe = Recipe.from_dict(state.recipe, source=str(source))
    info = DatasetInfo(**state.info)
    net_state = _net_state(state)
    if net_state is None:
        raise CheckpointError(
            f"{source} was saved before construction started (stage {state.stage!r}); "
            "there is no SteppingNet in it yet: resume the run first"
        )
    net = build_stepping_net(recipe, info, verify=False)
    net.load_state_dict(net_state)
    return LoadedCheckpoint(
        net=net,
        recipe=recipe,
        info=info,
        stage=state.stage,
        completed=list(state.completed),
        reference_macs=int(state.reference_macs),
        teacher_accuracy=state.teacher_accuracy,
        results=state.results,
        path=source,
    )


def evaluate_checkpoint(
    path: str | os.PathLike[str],
    *,
    device: str | torch.device = "auto",
    data_root: str | None = None,
    amp: str | None = None,
) -> dict[str, Any]:
    """Evaluate every subnet of a checkpoint on the recipe's test set.

    Returns a dict with ``original``, ``subnets``, ``budgets_met``, ``budgets_met_per_subnet``,
    ``recipe`` and ``stage`` (the same schema as ``results.json``). Only the checkpoint is read:
    the original network's accuracy is the one the run recorded in it (``teacher.pt`` is
    evaluated only when the checkpoint has none, and an unreadable one is then a warning).
    """
    from .train import evaluate_model

    loaded = load_checkpoint(path)
    recipe = loaded.recipe
    if data_root is not None:
        recipe = recipe.with_overrides([f"data.root={data_root}"])
    dev = resolve_device(device)
    _, test_loader, info = build_data(recipe, dev)
    if dataclasses.asdict(info) != dataclasses.asdict(loaded.info):
        raise CheckpointError(f"the dataset now reads as {info} but the checkpoint was trained on {loaded.info}")
    teacher_accuracy = loaded.teacher_accuracy
    teacher_file = loaded.path.parent / TEACHER_NAME
    if teacher_accuracy is None and teacher_file.is_file():
        try:
            teacher, _ = load_teacher(teacher_file, recipe, info)
        except (CheckpointError, OSError) as exc:
            logger.warning("original accuracy unknown: %s", exc)
        else:
            teacher_accuracy = evaluate_model(teacher, test_loader, device=dev, amp=amp)
    loaded.net.model.to(dev)
    results = _evaluate_net(loaded.net, recipe, info, test_loader, dev, amp, loaded.reference_macs, teacher_accuracy)
    return _jsonable(
        {"format": RESULTS_FORMAT, "recipe": recipe.to_dict(), **results, "stage": loaded.stage, "device": str(dev)}
    )
