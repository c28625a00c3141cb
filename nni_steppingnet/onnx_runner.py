"""Anytime inference over exported ONNX stage graphs, on onnxruntime and numpy alone.

A directory written by :func:`nni_steppingnet.onnx_export.export_onnx` (or
``nni-steppingnet export CKPT --onnx DIR``) holds one ONNX graph per stage and ``manifest.json``.
Stage 1 maps the input to the logits of subnet 1 and the tensors later stages read; stage ``s``
maps the input and the tensors kept by earlier stages to the logits of subnet ``s`` and the
tensors it adds, so that stepping from subnet ``s - 1`` to ``s`` costs exactly the MACs subnet
``s`` adds. :class:`OnnxStepRunner` has the API of :class:`~nni_steppingnet.IncrementalRunner`
(``start``, ``step``, ``stage``, ``macs_spent``, ``run(x, until= | deadline_s= | max_macs=)``)
and imports neither torch nor anything that does, so it runs where only onnxruntime is installed.

The manifest carries a SHA-256 of every graph file and of its own content: a directory whose
files were mixed from different exports or edited is refused, as is one exported from another
model when the caller passes the expected ``assignment_hash``. The hashes detect accidents and
mix-ups, not an attacker (who can recompute them).

``python -m nni_steppingnet.onnx_runner DIR IMAGES.npy`` prints every stage's predictions, time
and MACs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

__all__ = [
    "OnnxStepRunner",
    "ManifestError",
    "MANIFEST_NAME",
    "ONNX_FORMAT",
    "OPTIMIZATION_LEVELS",
    "file_sha256",
    "manifest_sha256",
    "read_manifest",
    "main",
]

logger = logging.getLogger(__name__)

#: Name of the manifest inside an export directory.
MANIFEST_NAME = "manifest.json"
#: Format tag of the manifest.
ONNX_FORMAT = "nni_steppingnet.onnx_stages/1"
#: ``optimization=`` values and onnxruntime's graph optimisation level each selects.
OPTIMIZATION_LEVELS = ("all", "extended", "basic", "disable")
_HASH_KEY = "manifest_sha256"
_NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16, "float64": np.float64}


class ManifestError(ValueError):
    """An export directory is missing, incomplete, modified or from another model."""


def file_sha256(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a file's bytes (hex)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def manifest_sha256(manifest: Mapping[str, Any]) -> str:
    """SHA-256 of the manifest's content without its own hash entry (canonical JSON)."""
    body = {key: value for key, value in manifest.items() if key != _HASH_KEY}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()


def read_manifest(directory: str | os.PathLike[str], *, expect_hash: str | None = None) -> dict[str, Any]:
    """Read and check ``directory/manifest.json``: format, own hash, every graph file's hash and,
    when given, the expected assignment hash. Raises :class:`ManifestError` naming the problem."""
    root = Path(directory)
    path = root / MANIFEST_NAME
    if not root.is_dir():
        raise ManifestError(
            f"{root} is not a directory; pass the folder written by "
            "`nni-steppingnet export CKPT --onnx DIR` or runner.export_onnx(DIR)"
        )
    if not path.is_file():
        raise ManifestError(
            f"{root} has no {MANIFEST_NAME}; it is not an ONNX stage export (write one with "
            "`nni-steppingnet export CKPT --onnx DIR` or runner.export_onnx(DIR))"
        )
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(f"{path} is not readable JSON ({exc}); export the directory again") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != ONNX_FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise ManifestError(
            f"{path} has format {found!r}, expected {ONNX_FORMAT!r}; export the directory "
            "again with this version of nni_steppingnet"
        )
    recorded = manifest.get(_HASH_KEY)
    actual = manifest_sha256(manifest)
    if recorded != actual:
        raise ManifestError(
            f"{path} was modified after export (its content hashes to {actual[:12]}..., the "
            f"manifest records {str(recorded)[:12]}...); export the directory again instead "
            "of editing the manifest"
        )
    if expect_hash is not None and manifest.get("assignment_hash") != expect_hash:
        raise ManifestError(
            f"{root} was exported from another model or assignment (assignment hash "
            f"{str(manifest.get('assignment_hash'))[:12]}..., expected {expect_hash[:12]}...); "
            "export this model's runner with runner.export_onnx(DIR)"
        )
    stages = manifest.get("stages")
    num_subnets = manifest.get("num_subnets")
    if not isinstance(stages, list) or not isinstance(num_subnets, int) or len(stages) != num_subnets:
        raise ManifestError(
            f"{path} lists {len(stages) if isinstance(stages, list) else 'no'} stages for "
            f"num_subnets={num_subnets!r}; export the directory again"
        )
    for index, stage in enumerate(stages, start=1):
        if stage.get("stage") != index:
            raise ManifestError(f"{path}: stage entry {index} is numbered {stage.get('stage')!r}; export again")
    for stage in [*stages, *manifest.get("reach", [])]:
        index = stage.get("stage")
        graph = root / str(stage.get("file"))
        if not graph.is_file():
            raise ManifestError(
                f"{root} lacks {stage.get('file')}, stage {index}'s graph; copy the whole export directory"
            )
        digest = file_sha256(graph)
        if digest != stage.get("sha256"):
            raise ManifestError(
                f"{graph} is not the graph this manifest was written with (sha256 {digest[:12]}..., "
                f"manifest {str(stage.get('sha256'))[:12]}...): the directory mixes files of "
                "different exports or a graph was modified; export the directory again"
            )
    return manifest


class _Graph:
    """One onnxruntime session with the names it reads and writes."""

    __slots__ = ("session", "inputs", "outputs", "states")

    def __init__(self, session: Any, inputs: list[str], outputs: list[str], states: list[str | None]) -> None:
        self.session = session
        self.inputs = inputs  # graph inputs: the image and/or kept tensors
        self.outputs = outputs  # logits first, then the kept tensors it writes
        self.states = states  # per output: the kept tensor it replaces (None: logits)


class OnnxStepRunner:
    """Anytime inference over an ONNX stage export, with onnxruntime (no torch).

    ``OnnxStepRunner(directory)``; ``start(x)`` runs stage 1 on ``x`` (a float32 numpy array of
    the exported input shape, any batch size) and returns subnet 1's logits; ``step()`` runs the
    next stage from the tensors earlier stages kept. ``stage`` and ``macs_spent`` (per sample,
    equal to the torch runner's ``net.macs(stage)``) say where the run is.

    Options: ``expect_hash`` refuses a directory exported from another model or assignment (the
    torch runner's :meth:`~nni_steppingnet.IncrementalRunner.assignment_hash`); ``threads``:
    onnxruntime's intra-op threads (default: its own choice); ``optimization``: onnxruntime's graph
    optimisation level per stage graph (``"all"``: constant folding, node fusions and layout
    optimisations; see :data:`OPTIMIZATION_LEVELS`); ``optimized_dir``: also write the optimised
    graph of every stage there (``stage<s>.optimized.onnx``), e.g. to inspect the fusions;
    ``providers``: onnxruntime execution providers (default CPU); ``fused``: use the fused graphs
    of stages ``1..s`` when the export has them (``run(x, until=s)`` and ``run(x, max_macs=m)``
    then reach their subnet in one call; ``start``/``step`` and deadline runs always step).
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        expect_hash: str | None = None,
        threads: int | None = None,
        optimization: str = "all",
        optimized_dir: str | os.PathLike[str] | None = None,
        providers: Sequence[str] | None = None,
        fused: bool = True,
    ) -> None:
        import onnxruntime as ort

        if optimization not in OPTIMIZATION_LEVELS:
            raise ValueError(
                f"optimization must be one of {', '.join(map(repr, OPTIMIZATION_LEVELS))}, got {optimization!r}"
            )
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
            raise ValueError(f"threads must be a positive int (or None for onnxruntime's default), got {threads!r}")
        self.directory = Path(directory)
        self.manifest = read_manifest(self.directory, expect_hash=expect_hash)
        self.num_subnets: int = int(self.manifest["num_subnets"])
        spec = self.manifest["input"]
        self._input_name = str(spec["name"])
        self._input_shape = [None if d is None else int(d) for d in spec["shape"]]
        self._input_dtype = np.dtype(_NUMPY_DTYPES.get(str(spec["dtype"]), np.float32))
        self._output_name = str(self.manifest["output"]["name"])
        levels = {
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        }
        if optimized_dir is not None:
            Path(optimized_dir).mkdir(parents=True, exist_ok=True)
        providers = list(providers or ["CPUExecutionProvider"])

        def load(entry: Mapping[str, Any]) -> _Graph:
            options = ort.SessionOptions()
            options.graph_optimization_level = levels[optimization]
            options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
            options.inter_op_num_threads = 1
            if threads is not None:
                options.intra_op_num_threads = threads
            options.log_severity_level = 3
            if optimized_dir is not None:
                options.optimized_model_filepath = str(
                    Path(optimized_dir) / entry["file"].replace(".onnx", ".optimized.onnx")
                )
            session = ort.InferenceSession(str(self.directory / entry["file"]), options, providers=providers)
            self._check_session(session, entry)
            outputs = [
                (str(spec["name"]), None if spec.get("state") is None else str(spec["state"]))
                for spec in entry["outputs"]
            ]
            if not outputs or outputs[0] != (self._output_name, None):
                raise ManifestError(
                    f"{entry['file']}: the manifest lists {outputs[:1]} first, expected the "
                    f"logits output {self._output_name!r}; export the directory again"
                )
            return _Graph(
                session,
                [str(spec["name"]) for spec in entry["inputs"]],
                [name for name, _ in outputs],
                [state for _, state in outputs],
            )

        self._graphs: list[_Graph | None] = [None] + [load(stage) for stage in self.manifest["stages"]]
        #: fused graphs of stages 1..s (exported with fused=True), by s
        self._reach: dict[int, _Graph] = (
            {int(entry["stage"]): load(entry) for entry in self.manifest.get("reach", [])} if fused else {}
        )
        self._macs = [0] + [int(stage["macs"]) for stage in self.manifest["stages"]]
        self._values: dict[str, np.ndarray] = {}
        self._stage = 0
        self._batch = 0
        self._macs_spent = 0

    def _check_session(self, session: Any, stage: Mapping[str, Any]) -> None:
        """The graph's inputs and outputs are those the manifest names, with its shapes (a graph of
        another model, even with recomputed hashes, has other names or shapes)."""
        for label, specs, found in (
            ("inputs", stage["inputs"], session.get_inputs()),
            ("outputs", stage["outputs"], session.get_outputs()),
        ):
            want = {str(spec["name"]): list(spec["shape"]) for spec in specs}
            got = {item.name: list(item.shape) for item in found}
            if sorted(want) != sorted(got):
                raise ManifestError(
                    f"{stage['file']} has {label} {sorted(got)}, the manifest says {sorted(want)}: "
                    "the graph does not belong to this manifest; export the directory again"
                )
            for name, dims in want.items():
                # Dimensions the graph leaves symbolic (strings or None) are not compared.
                if len(dims) != len(got[name]) or any(
                    isinstance(a, int) and isinstance(b, int) and a != b for a, b in zip(dims, got[name])
                ):
                    raise ManifestError(
                        f"{stage['file']}: {label[:-1]} {name} has shape {got[name]}, the manifest "
                        f"says {dims}: the graph does not belong to this manifest; export the "
                        "directory again"
                    )

    # ------------------------------------------------------------------ state
    @property
    def stage(self) -> int:
        """The subnet whose logits the last call returned (0 before :meth:`start`)."""
        return self._stage

    @property
    def batch_size(self) -> int:
        return self._batch

    @property
    def macs_spent(self) -> int:
        """MACs per sample computed since :meth:`start` (the manifest's MACs of stages 1..stage)."""
        return self._macs_spent

    @property
    def macs_spent_total(self) -> int:
        """MACs computed since :meth:`start` for the whole batch."""
        return self._macs_spent * self._batch

    @property
    def assignment_hash(self) -> str:
        return str(self.manifest["assignment_hash"])

    @property
    def input_shape(self) -> list[int | None]:
        """The input shape the graphs take (``None``: the batch dimension, any size)."""
        return list(self._input_shape)

    def macs(self, s: int) -> int:
        """MACs per sample of subnet ``s`` (stages 1..s) at the exported input size."""
        self._check_stage(s, "s")
        return sum(self._macs[1 : s + 1])

    def step_macs(self, s: int) -> int:
        """MACs per sample of stage ``s`` (from subnet ``s - 1`` to ``s``)."""
        self._check_stage(s, "s")
        return self._macs[s]

    def _check_stage(self, s: Any, label: str) -> None:
        if isinstance(s, bool) or not isinstance(s, int) or not 1 <= s <= self.num_subnets:
            raise ValueError(f"{label} must be an int in 1..{self.num_subnets}, got {s!r}")

    def reset(self) -> None:
        """Forget the current input and every kept tensor."""
        self._values = {}
        self._stage = 0
        self._batch = 0
        self._macs_spent = 0

    def preprocess(self, images: np.ndarray) -> np.ndarray:
        """Raw images to the graphs' input: uint8 scaled to [0, 1], then ``(x - mean) / std`` with
        the manifest's normalisation; ``N x C x H x W`` or ``N x H x W x C`` (moved to channels
        first). Raises when the manifest records no normalisation."""
        norm = self.manifest.get("normalization")
        if not norm:
            raise ValueError(
                "the manifest records no input normalisation (the export did not know it); "
                "normalise the images as in training and pass them to start()/run()"
            )
        array = np.asarray(images)
        channels = self._input_shape[1]
        if array.ndim == 4 and array.shape[1] != channels and array.shape[-1] == channels:
            array = np.moveaxis(array, -1, 1)
        x = array.astype(np.float32) / 255.0 if array.dtype == np.uint8 else array.astype(np.float32)
        mean = np.asarray(norm["mean"], dtype=np.float32).reshape(1, -1, 1, 1)
        std = np.asarray(norm["std"], dtype=np.float32).reshape(1, -1, 1, 1)
        return np.ascontiguousarray((x - mean) / std, dtype=self._input_dtype)

    def _check_input(self, x: Any) -> np.ndarray:
        if not isinstance(x, np.ndarray):
            raise TypeError(
                f"x must be a numpy array of shape {self._shape_text()} and dtype "
                f"{self._input_dtype}, got {type(x).__name__}"
            )
        if x.dtype != self._input_dtype:
            raise TypeError(
                f"x has dtype {x.dtype}, the graphs take {self._input_dtype}; convert it with "
                f"x.astype(np.{self._input_dtype})"
            )
        want = self._input_shape
        if x.ndim != len(want) or any(w is not None and w != d for w, d in zip(want, x.shape)) or x.shape[0] < 1:
            raise ValueError(
                f"x has shape {tuple(x.shape)}, the graphs take {self._shape_text()} (any batch "
                "size >= 1; the other dimensions are fixed at export)"
            )
        return np.ascontiguousarray(x)

    def _shape_text(self) -> str:
        return "[" + ", ".join("batch" if d is None else str(d) for d in self._input_shape) + "]"

    # ---------------------------------------------------------------- running
    def _run_graph(self, graph: _Graph) -> np.ndarray:
        values = self._values
        feeds = {name: values[name] for name in graph.inputs}
        # Plain numpy feeds and fetches: measured at batch 1 on resnet18, session.run costs
        # 0.22 ms for stage 1 against 0.26 ms with run_with_ort_values and 0.28 ms with a fresh
        # IO binding per call (the dense subnet: 0.20 ms).
        results = graph.session.run(graph.outputs, feeds)
        for state, value in zip(graph.states, results):
            if state is not None:
                values[state] = value
        return results[0]

    def _run_stage(self, s: int) -> np.ndarray:
        graph = self._graphs[s]
        assert graph is not None
        return self._run_graph(graph)

    def _reach_stage(self, x: np.ndarray, s: int) -> np.ndarray:
        """Reach subnet ``s`` with its fused graph if the export has one, else by stepping."""
        graph = self._reach.get(s)
        if graph is None:
            logits = self.start(x)
            while self._stage < s:
                logits = self.step()
            return logits
        x = self._check_input(x)
        self.reset()
        self._values[self._input_name] = x
        self._batch = int(x.shape[0])
        logits = self._run_graph(graph)
        self._stage = s
        self._macs_spent = sum(self._macs[1 : s + 1])
        return logits

    def start(self, x: np.ndarray) -> np.ndarray:
        """Forget the previous run, compute subnet 1 on ``x`` and return its logits."""
        x = self._check_input(x)
        self.reset()
        self._values[self._input_name] = x
        self._batch = int(x.shape[0])
        logits = self._run_stage(1)
        self._stage = 1
        self._macs_spent = self._macs[1]
        return logits

    def step(self) -> np.ndarray:
        """Extend the current subnet by one stage and return the new subnet's logits."""
        if self._stage == 0:
            raise RuntimeError("step() called before start(x); call start(x) first")
        if self._stage >= self.num_subnets:
            raise RuntimeError(
                f"the run is already at the last subnet ({self.num_subnets}); call start(x) for a new input"
            )
        logits = self._run_stage(self._stage + 1)
        self._stage += 1
        self._macs_spent += self._macs[self._stage]
        return logits

    def run(
        self,
        x: np.ndarray,
        until: int | None = None,
        *,
        deadline_s: float | None = None,
        max_macs: int | None = None,
    ) -> np.ndarray:
        """Compute up to subnet ``until`` (default N), or as far as a budget allows; same rules as
        :meth:`nni_steppingnet.IncrementalRunner.run` (subnet 1 always runs under a deadline; a
        step is never predicted shorter than the shortest stage so far). Returns the logits of
        the last subnet reached; :attr:`stage` says which."""
        given = [
            name
            for name, value in (("until", until), ("deadline_s", deadline_s), ("max_macs", max_macs))
            if value is not None
        ]
        if len(given) > 1:
            raise ValueError(f"give at most one of until, deadline_s, max_macs (got {', '.join(given)})")
        if until is not None:
            self._check_stage(until, "until")
            return self._reach_stage(x, until)
        if max_macs is not None:
            if isinstance(max_macs, bool) or not isinstance(max_macs, int) or max_macs <= 0:
                raise ValueError(f"max_macs must be a positive int (MACs per sample), got {max_macs!r}")
            if self._macs[1] > max_macs:
                raise ValueError(
                    f"max_macs={max_macs:,} is below subnet 1's {self._macs[1]:,} MACs per sample; "
                    f"allow at least {self._macs[1]:,}"
                )
            last, spent = 1, self._macs[1]
            while last < self.num_subnets and spent + self._macs[last + 1] <= max_macs:
                last += 1
                spent += self._macs[last]
            return self._reach_stage(x, last)
        if deadline_s is not None:
            if (
                isinstance(deadline_s, bool)
                or not isinstance(deadline_s, (int, float))
                or not math.isfinite(deadline_s)
                or deadline_s <= 0
            ):
                raise ValueError(f"deadline_s must be a positive number of seconds, got {deadline_s!r}")
            return self._run_deadline(x, float(deadline_s))
        return self._reach_stage(x, self.num_subnets)

    def _run_deadline(self, x: np.ndarray, deadline_s: float) -> np.ndarray:
        begin = time.perf_counter()
        end = begin + deadline_s
        logits = self.start(x)
        now = time.perf_counter()
        if now > end:
            logger.warning("subnet 1 alone took %.4f s, over the deadline of %.4f s", now - begin, deadline_s)
        spent_time, spent_macs = now - begin, self._macs_spent
        shortest = spent_time
        while self._stage < self.num_subnets:
            next_macs = self._macs[self._stage + 1]
            predicted = max(spent_time / max(spent_macs, 1) * next_macs, shortest)
            if now + predicted > end:
                break
            step_begin = now
            logits = self.step()
            now = time.perf_counter()
            shortest = min(shortest, now - step_begin)
            spent_time += now - step_begin
            spent_macs += next_macs
        return logits

    def __repr__(self) -> str:
        return f"OnnxStepRunner({str(self.directory)!r}, num_subnets={self.num_subnets}, stage={self._stage})"


# ---------------------------------------------------------------------- command line
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m nni_steppingnet.onnx_runner",
        description="Run an ONNX stage export stage by stage with onnxruntime (no torch) and print every "
        "subnet's predictions, time and MACs.",
    )
    parser.add_argument("directory", help="folder written by `nni-steppingnet export CKPT --onnx DIR`")
    parser.add_argument(
        "images", help=".npy file: N x C x H x W float32 inputs (normalised as in training), or raw images with --raw"
    )
    parser.add_argument(
        "--raw",
        action="store_true",
        help="the images are raw pixels (uint8 or [0, 1], channels first or last): normalise "
        "them with the manifest's mean/std",
    )
    parser.add_argument("--until", type=int, default=None, help="last subnet to run (default: all)")
    parser.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads")
    parser.add_argument("--expect-hash", default=None, help="refuse the directory unless its assignment hash is this")
    parser.add_argument("--show", type=int, default=10, help="predictions printed per stage (default 10)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point (prints; the library part above only logs)."""
    args = _parser().parse_args(argv)
    try:
        runner = OnnxStepRunner(args.directory, expect_hash=args.expect_hash, threads=args.threads)
        images = np.load(args.images, allow_pickle=False)
        x = runner.preprocess(images) if args.raw else images
        until = runner.num_subnets if args.until is None else args.until
        runner._check_stage(until, "--until")
        x = runner._check_input(x)
    except (ManifestError, ValueError, TypeError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{args.directory}: {runner.num_subnets} stages, input {runner._shape_text()}, {x.shape[0]} images")
    print("| subnet | step ms | total ms | MACs/sample (step) | MACs/sample (total) | predictions |")
    print("|---|---|---|---|---|---|")
    total = 0.0
    for s in range(1, until + 1):
        begin = time.perf_counter()
        logits = runner.start(x) if s == 1 else runner.step()
        spent = time.perf_counter() - begin
        total += spent
        shown = " ".join(str(int(p)) for p in logits.argmax(axis=-1)[: args.show])
        more = " ..." if x.shape[0] > args.show else ""
        print(
            f"| {s} | {1000 * spent:.3f} | {1000 * total:.3f} | {runner.step_macs(s):,} | {runner.macs_spent:,} "
            f"| {shown}{more} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
