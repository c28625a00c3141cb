"""Export the stepping runtime as ONNX: one graph per stage, plus a JSON manifest.

Each stage of an :class:`~nni_steppingnet.IncrementalRunner` (delta layout) becomes one ONNX
graph, traced from :class:`StageFunction`, a small module whose ``forward(x, *kept)`` drives the
runner's public stage API (:meth:`~nni_steppingnet.IncrementalRunner.resume_stage`,
:meth:`~nni_steppingnet.IncrementalRunner.stage_state`, :meth:`~nni_steppingnet.IncrementalRunner.stage_io`):

* stage 1: ``input -> logits, kept tensors later stages read``;
* stage ``s``: ``input (if it reads it), kept tensors -> logits, kept tensors it changes``.

A kept tensor is what one layer call keeps for later stages: the inputs it received so far
(channels stage-major; a stage appends its new input channels) or, for the classifier, its
accumulated logits. Every graph has a dynamic batch dimension; the other dimensions are fixed at
export. ``manifest.json`` records the stage order, every graph's input and output names, shapes
and dtypes, the MACs per sample of every stage, the opset, the input normalisation (when known),
the runner's :meth:`~nni_steppingnet.IncrementalRunner.assignment_hash`, a SHA-256 of every
graph file and of the manifest itself. :class:`nni_steppingnet.onnx_runner.OnnxStepRunner` runs
the directory with onnxruntime alone.

Tracing uses the TorchScript-based exporter (``torch.onnx.export(..., dynamo=False)``): the stage
function is plain tensor code once its stage is fixed (its Python control flow depends on the
plans, never on tensor values), which tracing records exactly, while the torch.export-based
exporter would have to capture the runner's Python objects. Stages that give some layer no
channel run ops on tensors with zero channels; some of those ops raise in PyTorch, and an
exception inside a trace corrupts it (checked: a segmentation fault at the end of tracing), so
during export such ops run outside the trace and their (empty) results enter the graph as
zero-sized constants whose batch dimension follows the input.

:func:`export_subnet_onnx` writes one dense subnet (``net.export_subnet(s)``) as a single graph.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Sequence

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map

from .onnx_runner import MANIFEST_NAME, ONNX_FORMAT, file_sha256, manifest_sha256

if TYPE_CHECKING:
    from .runtime import IncrementalRunner

__all__ = [
    "StageFunction",
    "TracedStepRunner",
    "export_onnx",
    "check_export",
    "export_subnet_onnx",
    "DEFAULT_OPSET",
    "INPUT_NAME",
    "OUTPUT_NAME",
]

logger = logging.getLogger(__name__)

#: ONNX opset of the exported graphs (onnxruntime >= 1.14 runs it).
DEFAULT_OPSET = 17
#: Names of the image input and the logits output in every graph.
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
#: Batch size of the tracing input (not 1, so that no batch-1 shortcut is recorded).
_TRACE_BATCH = 2
#: Batch size of the export check (differs from the tracing batch: the batch axis is dynamic).
_CHECK_BATCH = 3
#: Largest difference, relative to the largest logit, between onnxruntime and the torch runner.
_CHECK_RTOL = 1e-4


class _EmptyOperandsMode(TorchFunctionMode):
    """While tracing: an op whose tensor operands (2-D and up) all have no elements runs outside
    the trace, and its empty results enter the trace as new zero-sized tensors whose first
    dimension follows the operand's (the batch stays dynamic). Ops with a non-empty operand, or
    with a non-empty result, are traced as usual."""

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        # Metadata reads (the runner's slicer stamps a parameter by data_ptr, version, dtype and
        # device) compute nothing; sizing their operand would trace a parameter outside the
        # traced module (a ViT's cls_token) and fail.
        if func is torch.Tensor.data_ptr or getattr(func, "__name__", "") == "__get__":
            return func(*args, **kwargs)
        leaves = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor) and t.dim() >= 2]
        if not leaves or any(t.numel() for t in leaves) or not torch.jit.is_tracing():
            return func(*args, **kwargs)
        # torch's tracer has no public pause (and its stubs omit the setter).
        tracing = torch._C._get_tracing_state()
        torch._C._set_tracing_state(None)  # type: ignore[attr-defined]
        try:
            result = _call_widened(func, args, kwargs, leaves[0])
        finally:
            torch._C._set_tracing_state(tracing)  # type: ignore[attr-defined]
        outputs = [t for t in tree_flatten(result)[0] if isinstance(t, torch.Tensor)]
        if not outputs or any(t.numel() for t in outputs):
            return func(*args, **kwargs)
        source = leaves[0]

        def remake(item: Any) -> Any:
            if not isinstance(item, torch.Tensor):
                return item
            if item.dim() >= 1 and item.shape[0] == source.shape[0]:
                return torch.zeros((source.size(0), *item.shape[1:]), dtype=item.dtype, device=item.device)
            return torch.zeros(item.shape, dtype=item.dtype, device=item.device)

        return tree_map(remake, result)


def _call_widened(func: Any, args: Any, kwargs: Mapping[str, Any], empty: torch.Tensor) -> Any:
    """``func(*args, **kwargs)``; when it refuses empty operands, the result of the call with every
    empty tensor widened to size 1, narrowed back to size 0 (as the runtime's empty-channel mode)."""
    try:
        return func(*args, **kwargs)
    except (RuntimeError, ValueError, IndexError):
        dims = [d for d, size in enumerate(empty.shape) if size == 0 and d > 0]
        if not dims:
            raise
        dim = dims[0]

        def widen(item: Any) -> Any:
            if isinstance(item, torch.Tensor) and item.numel() == 0 and item.dim() > 0:
                return torch.zeros(
                    [1 if size == 0 else size for size in item.shape], dtype=item.dtype, device=item.device
                )
            return item

        result = func(*tree_map(widen, args), **tree_map(widen, dict(kwargs)))
        return tree_map(
            lambda t: t.narrow(dim, 0, 0) if isinstance(t, torch.Tensor) and t.dim() > dim and t.shape[dim] == 1 else t,
            result,
        )


class StageFunction(nn.Module):
    """Stage ``s`` of a runner as a function: ``forward(x, *kept) -> (logits, *written)``.

    ``kept`` are the tensors named ``reads`` (as :meth:`IncrementalRunner.stage_state` names
    them) from the run after stage ``s - 1``; the outputs are the model output and the tensors
    named ``writes`` after stage ``s``. With ``until=t`` it computes stages ``s..t`` in one call
    (a fused graph) and returns subnet ``t``'s output and kept tensors. It drives the runner
    (whose caches it overwrites), so one runner serves one stage function at a time.
    """

    def __init__(
        self, runner: IncrementalRunner, s: int, reads: Sequence[str], writes: Sequence[str], until: int | None = None
    ) -> None:
        super().__init__()
        self.runner = runner
        self.s = int(s)
        self.until = self.s if until is None else int(until)
        self.reads = list(reads)
        self.writes = list(writes)

    def forward(self, x: torch.Tensor, *kept: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if len(kept) != len(self.reads):
            raise ValueError(
                f"stage {self.s} reads {len(self.reads)} kept tensors ({self.reads[:3]}...), got {len(kept)}"
            )
        output = self.runner.resume_stage(x, self.s, dict(zip(self.reads, kept)))
        for _ in range(self.s, self.until):
            output = self.runner.step()
        if not isinstance(output, torch.Tensor):
            raise TypeError(
                f"the model returns {type(output).__name__}; ONNX stage export needs a model "
                "whose forward returns one logits tensor"
            )
        state = self.runner.stage_state()
        return (output, *[state[name] for name in self.writes])


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence the exporter's expected warnings: the TorchScript path is deprecated (but it is the
    one that traces the runner's Python code), and shapes read as Python ints are fixed on purpose
    (every dimension but the batch is fixed at export)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning, message=".*torch.jit.*")
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
        yield


def _graph_io_names(path: Path) -> tuple[list[str], list[str]]:
    """Names of an ONNX graph's inputs (without initializers) and outputs."""
    import onnx

    graph = onnx.load(str(path)).graph
    initializers = {init.name for init in graph.initializer}
    return [v.name for v in graph.input if v.name not in initializers], [v.name for v in graph.output]


def _spec(name: str, tensor: torch.Tensor, state: str | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "name": name,
        "shape": [None, *[int(d) for d in tensor.shape[1:]]],
        "dtype": str(tensor.dtype).replace("torch.", ""),
    }
    if state is not None:
        spec["state"] = state
    return spec


def _check_normalization(normalization: Mapping[str, Any] | None, channels: int) -> dict[str, list[float]] | None:
    if normalization is None:
        return None
    if not isinstance(normalization, Mapping) or set(normalization) != {"mean", "std"}:
        raise ValueError(
            f"normalization must be a mapping with keys 'mean' and 'std' (per-channel lists), got {normalization!r}"
        )
    values = {}
    for key in ("mean", "std"):
        raw = normalization[key]
        items = [raw] if isinstance(raw, (int, float)) else list(raw)
        if len(items) == 1:
            items = items * channels
        if len(items) != channels or not all(isinstance(v, (int, float)) for v in items):
            raise ValueError(
                f"normalization {key} must be one number or {channels} numbers (one per input channel), got {raw!r}"
            )
        values[key] = [float(v) for v in items]
    if any(v <= 0 for v in values["std"]):
        raise ValueError(f"normalization std must be positive, got {values['std']}")
    return values


def _prepare_directory(directory: Path) -> None:
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"{directory} is a file; pass a folder for the stage graphs")
    if directory.is_dir():
        entries = [p.name for p in directory.iterdir()]
        if entries and MANIFEST_NAME not in entries:
            raise ValueError(
                f"{directory} is not empty and holds no earlier export ({entries[:3]}...); pass a new or empty folder"
            )
        for name in entries:
            if name == MANIFEST_NAME or (name.startswith(("stage", "reach")) and name.endswith(".onnx")):
                (directory / name).unlink()
    directory.mkdir(parents=True, exist_ok=True)


def export_onnx(
    runner: IncrementalRunner,
    directory: str | os.PathLike[str],
    *,
    input_shape: Sequence[int] | None = None,
    opset: int = DEFAULT_OPSET,
    normalization: Mapping[str, Any] | None = None,
    check: bool = True,
    model_name: str | None = None,
    fused: bool = False,
) -> Path:
    """Write one ONNX graph per stage of ``runner`` and ``manifest.json`` into ``directory``.

    ``input_shape``: the input shape without batch (default: the runner's reference shape, the
    net's example input); the batch dimension of every graph is dynamic, the others are fixed.
    ``normalization``: ``{"mean": [...], "std": [...]}`` the model's inputs were normalised with
    (recorded for :meth:`OnnxStepRunner.preprocess`; the graphs take normalised inputs).
    ``check``: run every stage in onnxruntime at another batch size than the trace and compare its
    logits with the torch runner's (relative tolerance 1e-4; raises ``RuntimeError`` beyond).
    ``fused``: also write ``reach<s>.onnx`` for ``s >= 2``, stages ``1..s`` fused into one graph
    that returns subnet ``s``'s logits and what later stages read: one onnxruntime call reaches
    subnet ``s`` (``OnnxStepRunner.run(x, until=s)`` and ``max_macs=`` use it) and stepping
    continues from there; it saves the per-call overhead of ``s - 1`` steps (at batch 1 on
    LeNet-5 a call costs about as much as the stage's arithmetic; see docs/deploy.md).
    The runner must use the delta layout (``ValueError`` otherwise) and is reset afterwards.
    Returns the manifest's path. The folder may be new, empty or an earlier export (replaced).
    """
    if isinstance(opset, bool) or not isinstance(opset, int) or not 9 <= opset <= 20:
        raise ValueError(f"opset must be an int in 9..20 (the TorchScript exporter's range), got {opset!r}")
    if input_shape is None:
        reference = runner.reference_shape
        if reference is None or len(reference) != 1:
            raise ValueError("the runner knows no single reference input shape; pass input_shape=(C, H, W)")
        input_shape = reference[0]
    shape = [int(d) for d in input_shape]
    if not shape or any(d < 1 for d in shape):
        raise ValueError(f"input_shape must be positive sizes without the batch, e.g. (3, 32, 32), got {input_shape!r}")
    norm = _check_normalization(normalization, shape[0])
    root = Path(directory)
    device = next((p.device for p in runner.model.parameters()), torch.device("cpu"))
    dtype = next((p.dtype for p in runner.model.parameters() if p.is_floating_point()), torch.float32)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(_TRACE_BATCH, *shape, generator=generator).to(device=device, dtype=dtype)
    num = runner.num_subnets
    with torch.no_grad():
        outputs = [runner.start(x)]  # an "auto" runner picks its layout here
        if runner.layout != "delta":
            raise ValueError(
                f"ONNX stage export needs the delta layout; this runner uses {runner.layout!r} because of "
                f"{runner.full_layout_reason}. Export the subnets as whole models instead "
                "(nni_steppingnet.onnx_export.export_subnet_onnx)"
            )
        states = [runner.stage_state()]
        for _ in range(2, num + 1):
            outputs.append(runner.step())
            states.append(runner.stage_state())
    if not isinstance(outputs[0], torch.Tensor):
        raise TypeError(
            f"the model returns {type(outputs[0]).__name__}; ONNX stage export needs a model whose "
            "forward returns one logits tensor"
        )
    io = [runner.stage_io(s) for s in range(1, num + 1)]
    keys: list[str] = []
    for reads, writes in io:
        keys += [k for k in [*reads, *writes] if k not in keys]
    state_name = {key: f"state{i}" for i, key in enumerate(keys)}
    _prepare_directory(root)

    def write(
        function: StageFunction,
        path: Path,
        args: tuple[torch.Tensor, ...],
        reads: list[str],
        writes: list[str],
        label: str,
    ) -> dict[str, Any]:
        input_names = [INPUT_NAME, *[state_name[k] for k in reads]]
        output_names = [OUTPUT_NAME, *[f"{state_name[k]}_new" for k in writes]]
        logger.info("exporting %s (%d kept tensors read, %d written)", label, len(reads), len(writes))
        with torch.no_grad(), _EmptyOperandsMode(), _quiet_exporter():
            torch.onnx.export(
                function.eval(),
                args,
                str(path),
                input_names=input_names,
                output_names=output_names,
                dynamic_axes={name: {0: "batch"} for name in [*input_names, *output_names]},
                opset_version=opset,
                do_constant_folding=True,
                dynamo=False,
            )
        # The exporter drops inputs the graph does not use (stages after the first read the image
        # from the first layer's kept inputs, not from the input).
        graph_inputs, graph_outputs = _graph_io_names(path)
        given = dict(zip(input_names, args))
        if any(name not in given for name in graph_inputs) or graph_outputs != output_names:
            raise RuntimeError(
                f"{label}: the exported graph has inputs {graph_inputs} and outputs "
                f"{graph_outputs[:4]}..., expected a subset of {input_names[:4]}... and "
                f"{output_names[:4]}...; please report this with the model"
            )
        last = function.until
        outs = [_spec(OUTPUT_NAME, outputs[last - 1])] + [
            _spec(f"{state_name[k]}_new", states[last - 1][k], state=state_name[k]) for k in writes
        ]
        return {
            "file": path.name,
            "sha256": file_sha256(path),
            "inputs": [_spec(name, given[name]) for name in graph_inputs],
            "outputs": outs,
        }

    stages: list[dict[str, Any]] = []
    for s, (reads, writes) in enumerate(io, start=1):
        args = (x, *[states[s - 2][k] for k in reads]) if s > 1 else (x,)
        entry = write(
            StageFunction(runner, s, reads, writes), root / f"stage{s}.onnx", args, reads, writes, f"stage {s} of {num}"
        )
        stages.append(
            {"stage": s, "macs": int(runner.step_macs(s, x)), "macs_cumulative": int(runner.macs(s, x)), **entry}
        )
    reach: list[dict[str, Any]] = []
    if fused:
        for s in range(2, num + 1):
            # What subnet s leaves for the stages after it (the values after stage s).
            later = {k for reads, _ in io[s:] for k in reads}
            writes = [k for k in keys if k in later and k in states[s - 1]]
            entry = write(
                StageFunction(runner, 1, [], writes, until=s),
                root / f"reach{s}.onnx",
                (x,),
                [],
                writes,
                f"stages 1..{s} fused",
            )
            reach.append({"stage": s, "macs_cumulative": int(runner.macs(s, x)), **entry})
    runner.reset()
    logits_shape = [None, *[int(d) for d in outputs[0].shape[1:]]]
    manifest: dict[str, Any] = {
        "format": ONNX_FORMAT,
        "model": model_name or type(runner.model).__name__,
        "num_subnets": num,
        "opset": opset,
        "assignment_hash": runner.assignment_hash(),
        "input": {"name": INPUT_NAME, "shape": [None, *shape], "dtype": str(dtype).replace("torch.", "")},
        "output": {"name": OUTPUT_NAME, "shape": logits_shape, "dtype": str(outputs[0].dtype).replace("torch.", "")},
        "normalization": norm,
        "state": [{"name": state_name[k], "key": k} for k in keys],
        "stages": stages,
        "reach": reach,
        "torch_version": torch.__version__,
    }
    manifest["manifest_sha256"] = manifest_sha256(manifest)
    target = root / MANIFEST_NAME
    temporary = target.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(manifest, indent=1) + "\n")
    os.replace(temporary, target)
    logger.info("wrote %d stage graphs and %s to %s", num, MANIFEST_NAME, root)
    if check:
        worst = check_export(runner, root)
        logger.info("export check: max relative |onnxruntime - torch runner| = %.3g", worst)
    return target


def check_export(
    runner: IncrementalRunner, directory: str | os.PathLike[str], batch: int = _CHECK_BATCH, rtol: float = _CHECK_RTOL
) -> float:
    """Run every stage of the export in ``directory`` with onnxruntime and the torch runner on the
    same random input (``batch`` samples) and return the largest difference relative to the
    largest logit of its stage; raises ``RuntimeError`` beyond ``rtol``."""
    import numpy as np

    from .onnx_runner import OnnxStepRunner

    onnx_runner = OnnxStepRunner(directory, expect_hash=runner.assignment_hash(), threads=1)
    shape = [int(d) for d in onnx_runner.input_shape[1:] if d is not None]
    device = next((p.device for p in runner.model.parameters()), torch.device("cpu"))
    x = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(1))
    worst = 0.0
    with torch.no_grad():
        for s in range(1, runner.num_subnets + 1):
            ref = (runner.start(x.to(device)) if s == 1 else runner.step()).float().cpu().numpy()
            got = onnx_runner.start(x.numpy()) if s == 1 else onnx_runner.step()
            scale = max(float(np.abs(ref).max()), 1e-12)
            error = float(np.abs(got - ref).max()) / scale
            worst = max(worst, error)
            if error > rtol:
                runner.reset()
                raise RuntimeError(
                    f"stage {s} of the ONNX export differs from the torch runner by {error:.3g} "
                    f"of the largest logit (tolerance {rtol}); please report this with the model"
                )
    runner.reset()
    return worst


def export_subnet_onnx(
    module: nn.Module, path: str | os.PathLike[str], example_input: torch.Tensor, *, opset: int = DEFAULT_OPSET
) -> Path:
    """Write ``module`` (e.g. ``net.export_subnet(s)``, a dense subnet) as one ONNX graph with a
    dynamic batch dimension; ``example_input`` fixes the other dimensions. Returns the path."""
    target = Path(path)
    if target.suffix != ".onnx":
        raise ValueError(f"the ONNX file name must end in .onnx, got {target}")
    if not isinstance(example_input, torch.Tensor) or example_input.dim() < 2:
        raise ValueError("example_input must be a batched tensor, e.g. torch.randn(1, 3, 32, 32)")
    target.parent.mkdir(parents=True, exist_ok=True)
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad(), _quiet_exporter():
            torch.onnx.export(
                module,
                (example_input,),
                str(target),
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                opset_version=opset,
                do_constant_folding=True,
                dynamo=False,
            )
    finally:
        module.train(was_training)
    return target


class TracedStepRunner:
    """The stages of an :class:`~nni_steppingnet.IncrementalRunner` as frozen TorchScript graphs.

    Each stage is traced once from :class:`StageFunction` (the same graphs the ONNX export
    writes) and frozen; ``start``/``step`` then run one graph per stage without the model's
    Python ``forward``, whose per-op dispatch dominates at batch 1. Measured on resnet18 at
    32x32, batch 1, one CPU thread (random budget assignment 0.15/0.3/0.45/0.6): reaching subnet
    4 took 6.2 ms traced, 11.1 ms with the runner, 6.9 ms for the exported dense subnet 4.

    ``cuda_graphs=True`` (CUDA only, fixed ``batch_size``) also captures every stage as a CUDA
    graph on static buffers (the graph of stage ``s`` reads the outputs that the graphs before
    it wrote) and ``start`` copies the input into the static input and replays; this path has
    not been run on a GPU in this project (no GPU was available), so it is unchecked.

    The graphs keep every dimension of the input but the batch (``input_shape``, default the
    runner's reference shape); ``start(x)`` refuses other shapes. Needs the delta layout.
    """

    def __init__(
        self,
        runner: IncrementalRunner,
        *,
        input_shape: Sequence[int] | None = None,
        cuda_graphs: bool = False,
        batch_size: int | None = None,
    ) -> None:
        if input_shape is None:
            reference = runner.reference_shape
            if reference is None or len(reference) != 1:
                raise ValueError("the runner knows no single reference input shape; pass input_shape=(C, H, W)")
            input_shape = reference[0]
        self.input_shape = tuple(int(d) for d in input_shape)
        self.num_subnets = runner.num_subnets
        parameter = next(iter(runner.model.parameters()), None)
        self.device = parameter.device if parameter is not None else torch.device("cpu")
        dtype = parameter.dtype if parameter is not None else torch.float32
        if cuda_graphs:
            if self.device.type != "cuda" or not torch.cuda.is_available():
                raise ValueError(
                    f"cuda_graphs=True needs the runner on a CUDA device (runner.to('cuda')); it is on {self.device}"
                )
            if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
                raise ValueError(f"cuda_graphs=True needs a fixed batch_size (a positive int), got {batch_size!r}")
        x = torch.randn(_TRACE_BATCH, *self.input_shape, generator=torch.Generator().manual_seed(0)).to(
            device=self.device, dtype=dtype
        )
        with torch.no_grad():
            runner.start(x)  # an "auto" runner picks its layout here
            if runner.layout != "delta":
                raise ValueError(
                    f"stage graphs need the delta layout; this runner uses {runner.layout!r} because of "
                    f"{runner.full_layout_reason}"
                )
            states = [runner.stage_state()]
            for _ in range(2, self.num_subnets + 1):
                runner.step()
                states.append(runner.stage_state())
        self._macs = [0] + [int(runner.step_macs(s, x)) for s in range(1, self.num_subnets + 1)]
        self._graphs: list[tuple[Any, list[str], list[str]]] = []
        for s in range(1, self.num_subnets + 1):
            reads, writes = runner.stage_io(s)
            args = (x, *[states[s - 2][k] for k in reads]) if s > 1 else (x,)
            with torch.no_grad(), _EmptyOperandsMode(), _quiet_exporter():
                traced = torch.jit.trace(StageFunction(runner, s, reads, writes).eval(), args, check_trace=False)
                # Freezing inlines the weights as constants (TorchScript is deprecated in favour of
                # torch.compile, which cannot capture the runner's Python objects as one graph).
                self._graphs.append((torch.jit.freeze(traced.eval()), reads, writes))
        runner.reset()
        self._values: dict[str, torch.Tensor] = {}
        self._stage = 0
        self._batch = 0
        self._cuda: list[tuple[Any, torch.Tensor]] | None = None
        self._static_input: torch.Tensor | None = None
        if cuda_graphs:
            assert batch_size is not None
            self._capture(batch_size, dtype)

    def _capture(self, batch: int, dtype: torch.dtype) -> None:
        """Capture every stage as a CUDA graph on static buffers (after warm-up runs on a side
        stream, as ``torch.cuda.graphs`` asks)."""
        static_x = torch.zeros(batch, *self.input_shape, device=self.device, dtype=dtype)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side), torch.no_grad():
            for _ in range(2):
                values: dict[str, torch.Tensor] = {}
                for graph, reads, writes in self._graphs:
                    outputs = graph(static_x, *[values[k] for k in reads])
                    values.update(zip(writes, outputs[1:]))
        torch.cuda.current_stream(self.device).wait_stream(side)
        captured: list[tuple[Any, torch.Tensor]] = []
        static: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for graph, reads, writes in self._graphs:
                cuda_graph = torch.cuda.CUDAGraph()
                inputs = [static[k] for k in reads]
                with torch.cuda.graph(cuda_graph):
                    outputs = graph(static_x, *inputs)
                static.update(zip(writes, outputs[1:]))
                captured.append((cuda_graph, outputs[0]))
        self._static_input = static_x
        self._cuda = captured

    @property
    def stage(self) -> int:
        return self._stage

    @property
    def macs_spent(self) -> int:
        """MACs per sample computed since :meth:`start` (the runner's ``macs(stage)``)."""
        return sum(self._macs[1 : self._stage + 1])

    def step_macs(self, s: int) -> int:
        return self._macs[s]

    def start(self, x: torch.Tensor) -> torch.Tensor:
        """Compute subnet 1 on ``x`` (shape ``[batch, *input_shape]``) and return its logits."""
        if not isinstance(x, torch.Tensor) or tuple(x.shape[1:]) != self.input_shape or x.dim() < 2:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(
                f"x must be a tensor of shape [batch, {', '.join(map(str, self.input_shape))}] "
                f"(the traced input size), got {got}"
            )
        self._values = {}
        self._batch = int(x.shape[0])
        self._stage = 0
        if self._cuda is not None:
            assert self._static_input is not None
            if tuple(x.shape) != tuple(self._static_input.shape):
                raise ValueError(
                    f"the CUDA graphs were captured for batch {self._static_input.shape[0]}, got {x.shape[0]}"
                )
            self._static_input.copy_(x)
        else:
            self._values["input"] = x
        return self._advance()

    def step(self) -> torch.Tensor:
        """Run the next stage and return its subnet's logits."""
        if self._stage == 0:
            raise RuntimeError("step() called before start(x); call start(x) first")
        return self._advance()

    def _advance(self) -> torch.Tensor:
        if self._stage >= self.num_subnets:
            raise RuntimeError(f"already at the last subnet ({self.num_subnets}); call start(x) for a new input")
        s = self._stage + 1
        if self._cuda is not None:
            cuda_graph, logits = self._cuda[s - 1]
            cuda_graph.replay()
            self._stage = s
            return logits.clone()
        graph, reads, writes = self._graphs[s - 1]
        with torch.no_grad():
            outputs = graph(self._values["input"], *[self._values[k] for k in reads])
        self._values.update(zip(writes, outputs[1:]))
        self._stage = s
        return outputs[0]

    def run(self, x: torch.Tensor, until: int | None = None) -> torch.Tensor:
        """Compute up to subnet ``until`` (default N) and return its logits."""
        last = self.num_subnets if until is None else until
        if isinstance(last, bool) or not isinstance(last, int) or not 1 <= last <= self.num_subnets:
            raise ValueError(f"until must be an int in 1..{self.num_subnets}, got {until!r}")
        logits = self.start(x)
        while self._stage < last:
            logits = self.step()
        return logits
