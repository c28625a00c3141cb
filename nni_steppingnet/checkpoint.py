"""Atomic file writes and safe ``torch.save`` / ``torch.load`` helpers for run checkpoints.

Every file is written to a temporary file in the destination folder and moved into place with
``os.replace``, so an interrupted write (Ctrl-C, a killed job, a full disk) leaves the previous
file intact and never a truncated one.

Run checkpoints are loaded with ``torch.load(weights_only=True)``: loading one never executes
pickled code. :func:`save_checkpoint` therefore accepts only tensors, numbers, strings, ``None``
and lists / tuples / dicts of them; numpy arrays and numpy scalars (random-number-generator
states) are encoded as tensors on save and decoded back on load.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import re
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable, Mapping

import numpy as np
import torch

from .errors import CheckpointError

__all__ = [
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_text",
    "atomic_write_json",
    "save_atomic",
    "save_checkpoint",
    "load_checkpoint_file",
    "capture_rng",
    "restore_rng",
    "seed_everything",
    "check_writable_dir",
    "remove_stale_temporaries",
]

_NUMPY_MARK = "__nni_steppingnet_ndarray__"
_FILE_MODE = 0o644


def atomic_write(path: str | os.PathLike[str], writer: Callable[[BinaryIO], object]) -> Path:
    """Call ``writer`` on a temporary file beside ``path``, then move it onto ``path``.

    The folder is created if needed. On any error (including ``KeyboardInterrupt``) the
    temporary file is removed and an existing ``path`` is left untouched.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            writer(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp_name, _FILE_MODE)
        os.replace(tmp_name, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    return target


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    return atomic_write(path, lambda handle: handle.write(data))


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    """Write ``obj`` as indented JSON (with a trailing newline) to ``path`` atomically."""
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def save_atomic(obj: Any, path: str | os.PathLike[str]) -> Path:
    """``torch.save(obj, path)`` atomically, for any picklable object (e.g. a whole module).

    Loading such a file needs ``torch.load(path, weights_only=False)``, which runs pickled code:
    only load files you trust. Use :func:`save_checkpoint` for plain state.
    """
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return atomic_write_bytes(path, buffer.getvalue())


def _encode(obj: Any, where: str) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu() if obj.device.type != "cpu" else obj.detach()
    if isinstance(obj, np.generic):  # before the primitives: np.float64 subclasses float
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str, torch.dtype, torch.device, torch.Size)):
        return obj
    if isinstance(obj, np.ndarray):
        return {_NUMPY_MARK: torch.from_numpy(np.ascontiguousarray(obj).copy())}
    if isinstance(obj, Mapping):
        out: dict[Any, Any] = {}
        for key, value in obj.items():
            if not isinstance(key, (str, int)):
                raise TypeError(
                    f"checkpoint key {key!r} at {where or '<root>'} must be a str or int, got {type(key).__name__}"
                )
            out[key] = _encode(value, f"{where}.{key}" if where else str(key))
        return out
    if isinstance(obj, (list, tuple)):
        items = [_encode(value, f"{where}[{i}]") for i, value in enumerate(obj)]
        return items if isinstance(obj, list) else tuple(items)
    raise TypeError(
        f"checkpoint value at {where or '<root>'} has type {type(obj).__name__}, which "
        "cannot be loaded back safely; store tensors, numbers, strings, None and "
        "lists/tuples/dicts of them"
    )


def _decode(obj: Any) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {_NUMPY_MARK}:
            return obj[_NUMPY_MARK].numpy()
        return {key: _decode(value) for key, value in obj.items()}
    if isinstance(obj, list):
        return [_decode(value) for value in obj]
    if isinstance(obj, tuple):
        return tuple(_decode(value) for value in obj)
    return obj


def save_checkpoint(state: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """Save a plain state mapping atomically; it loads back with :func:`load_checkpoint_file`.

    Raises ``TypeError`` naming the entry that could not be loaded back without unpickling code.
    """
    encoded = _encode(state, "")
    return save_atomic(encoded, path)


def load_checkpoint_file(path: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a file written by :func:`save_checkpoint` (``weights_only=True``: no code runs)."""
    source = Path(path)
    if not source.is_file():
        raise FileNotFoundError(f"checkpoint not found: {source}")
    try:
        state = torch.load(source, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError/RuntimeError/EOFError for bad files
        raise CheckpointError(
            f"cannot read checkpoint {source}: {type(exc).__name__}: {exc}. Is it a file written by nni-steppingnet?"
        ) from exc
    if not isinstance(state, dict):
        raise CheckpointError(f"{source} does not hold a checkpoint dict (got {type(state).__name__})")
    return _decode(state)


def capture_rng() -> dict[str, Any]:
    """The state of Python's, numpy's and torch's (CPU and CUDA) global random generators."""
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {
        "python": (version, list(internal), gauss),
        "numpy": list(np.random.get_state()),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: Mapping[str, Any]) -> None:
    """Restore a :func:`capture_rng` state."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np.random.set_state(tuple(state["numpy"]))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's global generators (all CUDA devices included)."""
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def check_writable_dir(path: str | os.PathLike[str]) -> Path:
    """Create folder ``path`` (with its parents) and prove it writable with a real test write.

    Raises an ``OSError`` of the failing call's kind and errno with ``filename`` set to the
    folder (or the part of its path that failed): permission denied, read-only file system, a
    file where a folder should be, no space left. ``os.access`` is not used: it says yes to root
    on a read-only mount and on full disks.
    """
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    probe: str | None = None
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".write-test.", suffix=".tmp")
        with os.fdopen(fd, "wb") as handle:
            handle.write(b"nni-steppingnet write test\n")
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as exc:
        # OSError(errno, ...) builds the matching subclass (PermissionError, ...).
        raise OSError(exc.errno, exc.strerror, str(folder)) from exc
    finally:
        if probe is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(probe)
    return folder


#: ``.<target name>.<mkstemp's 8 random characters>.tmp``, as :func:`atomic_write` and
#: :func:`check_writable_dir` name their temporary files.
_TEMPORARY = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$")


def remove_stale_temporaries(folder: str | os.PathLike[str]) -> list[Path]:
    """Remove the temporary files that interrupted atomic writes left in ``folder``.

    Call it only on a folder this process alone writes to (a run folder being started or
    resumed): a temporary file of a write in progress elsewhere would be removed too.
    Returns the removed paths.
    """
    removed: list[Path] = []
    base = Path(folder)
    if not base.is_dir():
        return removed
    for entry in sorted(base.iterdir()):
        if _TEMPORARY.match(entry.name) and entry.is_file() and not entry.is_symlink():
            with contextlib.suppress(FileNotFoundError):
                entry.unlink()
                removed.append(entry)
    return removed
