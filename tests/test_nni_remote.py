"""NNI's remote (SSH) training service, for real: an OpenSSH server on 127.0.0.1 with throwaway
keys, and a two-trial ``tune`` experiment whose trials run through it."""

from __future__ import annotations

import getpass
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import psutil
import pytest
import yaml

pytest.importorskip("nni")

from nni_steppingnet.config import load_recipe  # noqa: E402
from nni_steppingnet.nni.experiment import TuneOptions, check_port, run_tune  # noqa: E402
from nni_steppingnet.nni.remote import load_machines, parse_machines, write_python_shim  # noqa: E402

SSHD = shutil.which("sshd") or ("/usr/sbin/sshd" if os.access("/usr/sbin/sshd", os.X_OK) else None)
KEYGEN = shutil.which("ssh-keygen")

TINY = {
    "name": "tiny-remote",
    "seed": 0,
    "data": {"name": "synthetic", "batch_size": 32, "synthetic_size": 64},
    "model": {"name": "lenet3c1l", "width": 0.25},
    "steppingnet": {"num_subnets": 2, "budgets": [0.4, 0.8], "expansion": 1.0},
    "teacher": {"epochs": 1, "lr": 0.05},
    "construction": {"batches_per_iteration": 1, "iterations": 1, "monitor_samples": 16},
    "retraining": {"epochs": 0},
}
SPACE = {
    "alpha_growth": {"_type": "uniform", "_value": [1.0, 2.0]},
    "gamma": {"_type": "uniform", "_value": [0.2, 0.8]},
}

# Every test here drops the NNI experiments it started from NNI's registry (conftest).
pytestmark = pytest.mark.usefixtures("forget_nni_experiments")


def _free_port(pair: bool) -> int:
    for _ in range(50):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port < 65000:
            try:
                check_port(port, extra=pair)
                return port
            except ValueError:
                continue
    raise RuntimeError("no free port")


@pytest.fixture
def sshd(tmp_path: Path) -> Iterator[dict[str, Any]]:
    """An sshd on 127.0.0.1 accepting a throwaway key for the current user (stopped afterwards)."""
    if SSHD is None or KEYGEN is None:
        pytest.skip(
            "OpenSSH server/client not installed (apt-get install openssh-server openssh-client; .ci/run installs them)"
        )
    folder = tmp_path / "sshd"
    folder.mkdir()
    host_key, user_key = folder / "host_key", folder / "user_key"
    subprocess.run([KEYGEN, "-q", "-t", "ed25519", "-N", "", "-f", str(host_key)], check=True)
    # RSA in PEM form: the SSH library inside NNI's manager reads it everywhere.
    subprocess.run([KEYGEN, "-q", "-t", "rsa", "-b", "2048", "-m", "PEM", "-N", "", "-f", str(user_key)], check=True)
    authorized = folder / "authorized_keys"
    authorized.write_text((folder / "user_key.pub").read_text())
    authorized.chmod(0o600)
    port = _free_port(pair=False)
    config = folder / "sshd_config"
    config.write_text(
        "\n".join(
            [
                f"Port {port}",
                "ListenAddress 127.0.0.1",
                f"HostKey {host_key}",
                f"PidFile {folder / 'sshd.pid'}",
                f"AuthorizedKeysFile {authorized}",
                "PubkeyAuthentication yes",
                "PasswordAuthentication no",
                "KbdInteractiveAuthentication no",
                "PermitRootLogin prohibit-password",
                "UsePAM no",
                "StrictModes no",
                "Subsystem sftp internal-sftp",
                "",
            ]
        )
    )
    if os.geteuid() == 0:
        Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege-separation directory
    log = (folder / "sshd.log").open("w")
    proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 15
        while True:
            if proc.poll() is not None:
                pytest.fail(f"sshd exited: {(folder / 'sshd.log').read_text()}")
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if time.monotonic() > deadline:
                pytest.fail("sshd did not start listening")
            time.sleep(0.1)
        yield {"port": port, "key": str(user_key), "user": getpass.getuser(), "log": folder / "sshd.log"}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def test_machines_file_is_validated(tmp_path: Path) -> None:
    key = tmp_path / "key"
    key.write_text("not really a key")
    good = tmp_path / "machines.yaml"
    good.write_text(
        yaml.safe_dump(
            {
                "nni_manager_ip": "10.0.0.1",
                "machines": [
                    {
                        "host": "10.0.0.2",
                        "user": "alice",
                        "ssh_key_file": str(key),
                        "python_path": "/opt/venv/bin",
                        "gpu_indices": [0, 1],
                    }
                ],
            }
        )
    )
    machines, ip = load_machines(good)
    assert ip == "10.0.0.1"
    assert machines[0].host == "10.0.0.2" and machines[0].port == 22 and machines[0].gpu_indices == [0, 1]
    bad_cases = [
        ([], "non-empty list"),
        ([{"user": "alice", "ssh_key_file": str(key)}], "host must be"),
        ([{"host": "h", "user": "alice", "ssh_key_file": str(tmp_path / "missing")}], "is not a file"),
        ([{"host": "h", "user": "alice", "ssh_key_file": str(key), "port": 70000}], "port must be"),
        ([{"host": "h", "user": "alice", "ssh_key_file": str(key), "gpu": 1}], "unknown keys"),
        ({"machines": [], "manager": "x"}, "unknown keys"),
    ]
    for raw, match in bad_cases:
        with pytest.raises(ValueError, match=match):
            parse_machines(raw)
    with pytest.raises(FileNotFoundError):
        load_machines(tmp_path / "nope.yaml")


def test_python_shim_skips_pip_and_runs_everything_else(tmp_path: Path) -> None:
    folder = write_python_shim(tmp_path / "shim")
    for name in ("python", "python3"):
        ran = subprocess.run(
            [str(folder / name), "-c", "import sys; print(sys.executable)"], capture_output=True, text=True, check=True
        )
        assert ran.stdout.strip() == sys.executable
        skipped = subprocess.run(
            [str(folder / name), "-m", "pip", "install", "nni", "--upgrade"], capture_output=True, text=True, check=True
        )
        assert "skipped" in skipped.stderr and skipped.stdout == ""
    with pytest.raises(ValueError, match="existing interpreter"):
        write_python_shim(tmp_path / "bad", python=str(tmp_path / "no-python"))


@pytest.mark.nni
@pytest.mark.slow
def test_two_trial_experiment_through_ssh(
    tmp_path: Path, sshd: dict[str, Any], no_orphans: dict[int, psutil.Process]
) -> None:
    recipe_file = tmp_path / "tiny.yaml"
    recipe_file.write_text(yaml.safe_dump(TINY))
    recipe = load_recipe(recipe_file)
    # NNI's worker setup runs "pip install nni --upgrade" (network): the shim skips it.
    shim = write_python_shim(tmp_path / "python")
    machines_file = tmp_path / "machines.yaml"
    machines_file.write_text(
        yaml.safe_dump(
            [
                {
                    "host": "127.0.0.1",
                    "port": sshd["port"],
                    "user": sshd["user"],
                    "ssh_key_file": sshd["key"],
                    "python_path": str(shim),
                }
            ]
        )
    )
    machines, _ = load_machines(machines_file)
    out = tmp_path / "tune"
    remote_root = Path.home() / "nni-experiments"
    try:
        result = run_tune(
            recipe,
            SPACE,
            out,
            TuneOptions(
                trials=2,
                concurrency=2,
                tuner="Random",
                training_service="remote",
                machines=machines,
                port=_free_port(pair=True),
                gpus="none",
                poll_interval=1.0,
                timeout_s=600,
            ),
        )
        assert result.status == "DONE"
        assert [t["status"] for t in result.trials] == ["SUCCEEDED", "SUCCEEDED"], sshd["log"].read_text()[-2000:]
        assert len({json.dumps(t["params"], sort_keys=True) for t in result.trials}) == 2
        for trial in result.trials:
            params, final = trial["params"], trial["final"]
            assert final["params"] == params
            # NNI ran the trial through SSH in the "remote" machine's own experiment folder.
            host, _, remote_dir = trial["log_path"].partition(":")
            assert host == "127.0.0.1" and remote_dir.startswith("~/nni-experiments/")
            run_dir = Path(remote_dir.replace("~", str(Path.home()), 1)) / "run"
            echoed = json.loads((run_dir / "trial.json").read_text())
            assert echoed["trial_id"] == trial["trial_id"] and echoed["params"] == params
            ran = json.loads((run_dir / "results.json").read_text())["recipe"]
            assert ran["construction"]["alpha_growth"] == params["alpha_growth"]
            assert ran["retraining"]["gamma"] == params["gamma"]
            assert len(trial["intermediate"]) == 1  # one construction iteration
        assert (out / "best.yaml").is_file() and (out / "trials.md").is_file()
    finally:
        for exp_dir in (out / "nni").glob("*"):
            if exp_dir.is_dir() and not exp_dir.is_symlink() and exp_dir.name != "_latest":
                shutil.rmtree(remote_root / exp_dir.name, ignore_errors=True)
