"""Machines for NNI's remote (SSH) training service.

Machines come from a YAML file (``nni-steppingnet tune ... --training-service remote --machines
FILE``) or from the ``tune.machines`` list of a recipe. Either is a list of mappings (or a mapping
with a ``machines`` list and an optional ``nni_manager_ip``)::

    nni_manager_ip: 10.0.0.1        # address of this machine as the workers see it
    machines:
      - host: 10.0.0.2
        port: 22
        user: alice
        ssh_key_file: ~/.ssh/id_rsa
        python_path: /opt/venv/bin  # folder of the python that has nni_steppingnet installed
        gpu_indices: [0, 1]         # optional: GPUs NNI may schedule trials on
        max_trial_number_per_gpu: 1

NNI copies the trial code folder (here only the resolved recipe) to every machine over SSH and
runs the trial there with ``python3 -m nni_steppingnet.nni.trial``, with ``python_path``
prepended to ``PATH``; the package, its dependencies and any dataset files must already be
present on the machines (datasets at the recipe's ``data.root``).

NNI 3.0's remote service runs ``python -m pip install nni --upgrade`` on every worker whenever an
experiment starts: it needs network access there (it waits for pip to time out without) and may
change the worker's packages. :func:`write_python_shim` writes a ``python``/``python3`` pair that
runs the real interpreter but skips ``-m pip``; point ``python_path`` at its folder.
"""

from __future__ import annotations

import logging
import os
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

__all__ = ["MachineSpec", "load_machines", "parse_machines", "to_nni_machines", "all_loopback", "write_python_shim"]

logger = logging.getLogger(__name__)

_KEYS = (
    "host",
    "port",
    "user",
    "ssh_key_file",
    "password",
    "python_path",
    "gpu_indices",
    "max_trial_number_per_gpu",
    "use_active_gpu",
)


@dataclass
class MachineSpec:
    """One SSH worker of NNI's remote training service."""

    host: str
    user: str
    port: int = 22
    ssh_key_file: str | None = "~/.ssh/id_rsa"
    password: str | None = None
    python_path: str | None = None
    gpu_indices: list[int] | None = None
    max_trial_number_per_gpu: int = 1
    use_active_gpu: bool = False


def _fail(where: str, message: str) -> ValueError:
    return ValueError(f"{where}: {message}")


def parse_machines(raw: Any, where: str = "machines") -> tuple[list[MachineSpec], str | None]:
    """Validate a machines list (or ``{machines: [...], nni_manager_ip: ...}``).

    Returns ``(machines, nni_manager_ip)``; raises ``ValueError`` naming the bad entry.
    """
    manager_ip: str | None = None
    if isinstance(raw, Mapping):
        unknown = sorted(set(raw) - {"machines", "nni_manager_ip"})
        if unknown:
            raise _fail(where, f"unknown keys {unknown}; expected 'machines' (a list) and optionally 'nni_manager_ip'")
        manager_ip = raw.get("nni_manager_ip")
        if manager_ip is not None and (not isinstance(manager_ip, str) or not manager_ip.strip()):
            raise _fail(where, f"nni_manager_ip must be an address string, got {manager_ip!r}")
        raw = raw.get("machines")
    if not isinstance(raw, list) or not raw:
        raise _fail(where, "give a non-empty list of machines, each with host, user and ssh_key_file (see docs/nni.md)")
    machines: list[MachineSpec] = []
    for i, entry in enumerate(raw):
        at = f"{where}[{i}]"
        if not isinstance(entry, Mapping):
            raise _fail(at, f"each machine must be a mapping, got {entry!r}")
        unknown = sorted(set(entry) - set(_KEYS))
        if unknown:
            raise _fail(at, f"unknown keys {unknown}; allowed: {', '.join(_KEYS)}")
        host = entry.get("host")
        if not isinstance(host, str) or not host.strip():
            raise _fail(at, f"host must be a non-empty string, got {host!r}")
        user = entry.get("user")
        if not isinstance(user, str) or not user.strip():
            raise _fail(at, f"user must be a non-empty string, got {user!r}")
        port = entry.get("port", 22)
        if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
            raise _fail(at, f"port must be an int in 1..65535, got {port!r}")
        password = entry.get("password")
        key_file = entry.get("ssh_key_file", None if password is not None else "~/.ssh/id_rsa")
        if password is not None and not isinstance(password, str):
            raise _fail(at, "password must be a string")
        if password is None:
            if not isinstance(key_file, str) or not Path(key_file).expanduser().is_file():
                raise _fail(
                    at,
                    f"ssh_key_file {key_file!r} is not a file; give the private key that "
                    f"logs in as {user}@{host} (or a password, which NNI shows in its web UI)",
                )
            key_file = str(Path(key_file).expanduser().resolve())
        else:
            logger.warning("%s: SSH password given; NNI shows it in plain text in its web UI, prefer ssh_key_file", at)
        python_path = entry.get("python_path")
        if python_path is not None and (not isinstance(python_path, str) or not python_path.strip()):
            raise _fail(at, f"python_path must be the folder of the remote python, got {python_path!r}")
        gpus = entry.get("gpu_indices")
        if gpus is not None:
            if isinstance(gpus, int) and not isinstance(gpus, bool):
                gpus = [gpus]
            if not isinstance(gpus, list) or not all(
                isinstance(g, int) and not isinstance(g, bool) and g >= 0 for g in gpus
            ):
                raise _fail(at, f"gpu_indices must be a list of GPU numbers, got {gpus!r}")
        per_gpu = entry.get("max_trial_number_per_gpu", 1)
        if isinstance(per_gpu, bool) or not isinstance(per_gpu, int) or per_gpu < 1:
            raise _fail(at, f"max_trial_number_per_gpu must be an int >= 1, got {per_gpu!r}")
        active = entry.get("use_active_gpu", False)
        if not isinstance(active, bool):
            raise _fail(at, f"use_active_gpu must be true or false, got {active!r}")
        machines.append(
            MachineSpec(
                host=host.strip(),
                user=user.strip(),
                port=port,
                ssh_key_file=None if password is not None else key_file,
                password=password,
                python_path=python_path,
                gpu_indices=gpus,
                max_trial_number_per_gpu=per_gpu,
                use_active_gpu=active,
            )
        )
    return machines, manager_ip


def load_machines(path: str | os.PathLike[str]) -> tuple[list[MachineSpec], str | None]:
    """Read and validate a machines YAML file (see the module docstring)."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"machines file not found: {file}")
    try:
        raw = yaml.safe_load(file.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ValueError(f"{file}: not valid YAML: {exc}") from exc
    return parse_machines(raw, str(file))


def to_nni_machines(
    machines: Sequence[MachineSpec], gpus: Sequence[int] | None = None, trials_per_gpu: int | None = None
) -> list[Any]:
    """NNI ``RemoteMachineConfig`` objects; ``gpus`` fills machines without ``gpu_indices``."""
    from nni.experiment import RemoteMachineConfig

    out = []
    for spec in machines:
        config = RemoteMachineConfig()
        config.host = spec.host
        config.port = spec.port
        config.user = spec.user
        config.ssh_key_file = spec.ssh_key_file
        if spec.password is not None:
            config.password = spec.password
        config.python_path = spec.python_path
        indices = spec.gpu_indices if spec.gpu_indices is not None else (list(gpus) if gpus else None)
        config.gpu_indices = indices
        config.max_trial_number_per_gpu = (
            trials_per_gpu if trials_per_gpu is not None else spec.max_trial_number_per_gpu
        )
        config.use_active_gpu = spec.use_active_gpu
        out.append(config)
    return out


def all_loopback(machines: Sequence[MachineSpec]) -> bool:
    """True when every machine is this host (127.x / localhost / ::1)."""
    return all(m.host in ("localhost", "::1") or m.host.startswith("127.") for m in machines)


_SHIM = """#!/bin/sh
# Written by nni_steppingnet.nni.remote.write_python_shim: runs {python}, except that
# "-m pip ..." (NNI 3.0's worker setup runs "pip install nni --upgrade" at every start) is skipped;
# nni, nni_steppingnet and their dependencies must already be installed for {python}.
if [ "$1" = "-m" ] && [ "$2" = "pip" ]; then
  echo "python shim: skipped 'python $*' (packages are managed outside NNI)" >&2
  exit 0
fi
exec {quoted} "$@"
"""


def write_python_shim(folder: str | os.PathLike[str], python: str | None = None) -> Path:
    """Write ``python`` and ``python3`` wrappers of ``python`` (default: this interpreter) into
    ``folder`` that skip ``python -m pip ...``; use ``folder`` as a machine's ``python_path``.

    Run it on every worker (``python -c "from nni_steppingnet.nni.remote import write_python_shim;
    write_python_shim('/opt/steppingnet-python')"``). Returns the folder.
    """
    from ..checkpoint import atomic_write_text

    interpreter = python or sys.executable
    if not interpreter or not Path(interpreter).is_file():
        raise ValueError(f"python must be an existing interpreter file, got {interpreter!r}")
    target = Path(folder).expanduser().resolve()
    target.mkdir(parents=True, exist_ok=True)
    text = _SHIM.format(python=interpreter, quoted=shlex.quote(interpreter))
    for name in ("python", "python3"):
        path = atomic_write_text(target / name, text)
        path.chmod(0o755)
    return target
