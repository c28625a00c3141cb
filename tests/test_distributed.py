"""Data-parallel training (nni_steppingnet.distributed): two gloo processes on the CPU.

Workers are module-level functions started with the ``spawn`` method; each writes what it saw to
a file that the test compares.
"""

from __future__ import annotations

import copy
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

from nni_steppingnet import SteppingNet
from nni_steppingnet.construct import ConstructionConfig, Constructor
from nni_steppingnet.distributed import (
    DistributedContext,
    DistributedError,
    RankDivergenceError,
    SyncBatchNorm2d,
    all_reduce_mean,
    assignment_hash,
    check_same_assignment,
    context_from_env,
    convert_sync_batchnorm,
    wrap_ddp,
)
from nni_steppingnet.testing import TINY_RUN_OVERRIDES

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")

WORLD = 2
GLOBAL_BATCH = 16
IMAGE = 12
CLASSES = 4


class SmallBNNet(nn.Module):
    """conv-BN-ReLU x2, pooling, a hidden Linear and the logits: every kind of gate."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 12, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(12)
        self.fc1 = nn.Linear(12, 10)
        self.fc2 = nn.Linear(10, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.fc2(F.relu(self.fc1(x)))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _global_batches(count: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(GLOBAL_BATCH, 3, IMAGE, IMAGE, generator=g),
            torch.randint(0, CLASSES, (GLOBAL_BATCH,), generator=g),
        )
        for _ in range(count)
    ]


def _net(sync_bn: bool, execution: str) -> SteppingNet:
    torch.manual_seed(0)
    model = SmallBNNet()
    if sync_bn:
        convert_sync_batchnorm(model)
    return SteppingNet(model, torch.randn(2, 3, IMAGE, IMAGE), 2, execution=execution, verify=False)


def _config(net: SteppingNet, iterations: int, batches: int) -> ConstructionConfig:
    full = net.macs(net.num_subnets)
    return ConstructionConfig(
        budgets=[0.3, 0.7], reference_macs=full, iterations=iterations, batches_per_iteration=batches, lr=0.05, seed=0
    )


def _init(rank: int, port: int, timeout_s: float = 60.0) -> None:
    import datetime

    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=timeout_s))
    torch.set_num_threads(1)


def _shard(batch: tuple[torch.Tensor, torch.Tensor], rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    part = GLOBAL_BATCH // WORLD
    x, y = batch
    return x[rank * part : (rank + 1) * part], y[rank * part : (rank + 1) * part]


def _ddp_constructor(net: SteppingNet, rank: int, loader: list[Any], iterations: int, batches: int) -> Constructor:
    """A Constructor training through DDP with its scores averaged over the ranks."""
    return Constructor(
        net,
        _config(net, iterations=iterations, batches=batches),
        loader,
        forward_module=wrap_ddp(net.model, DistributedContext(rank=rank, world_size=WORLD), torch.device("cpu")),
        reduce=all_reduce_mean,
    )


# ---------------------------------------------------------------------------------- workers
def _scores_worker(rank: int, port: int, out: str, execution: str) -> None:
    """One construction iteration on this rank's half of every global batch, SyncBN on."""
    _init(rank, port)
    net = _net(sync_bn=True, execution=execution)
    constructor = _ddp_constructor(net, rank, [_shard(b, rank) for b in _global_batches(2)], iterations=3, batches=2)
    loss = constructor.train_iteration()
    torch.save(
        {
            "scores": constructor.tracker.scores.clone(),
            "weights": {k: v.detach().clone() for k, v in net.model.state_dict().items()},
            "loss": loss,
        },
        Path(out) / f"rank{rank}.pt",
    )
    dist.destroy_process_group()


def _construction_worker(rank: int, port: int, out: str) -> None:
    """A whole construction on rank-specific data (no SyncBN), checking hashes every iteration."""
    _init(rank, port)
    net = _net(sync_bn=False, execution="auto")
    # Different images on every rank: without averaged scores the ranks would move different neurons.
    loader = [_shard(b, rank) for b in _global_batches(6, seed=1)]
    constructor = _ddp_constructor(net, rank, loader, iterations=4, batches=1)
    hashes = []
    while not constructor.done:
        constructor.step()
        hashes.append(check_same_assignment(net, f"after iteration {constructor.iteration}"))
    torch.save({"assignment": net.flat_assignment().clone(), "hashes": hashes}, Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()


def _divergence_worker(rank: int, port: int, out: str) -> None:
    _init(rank, port)
    net = _net(sync_bn=False, execution="masked")
    if rank == 1:
        group = net.groups[0]
        assignment = group.assignment.clone()
        assignment[0] = 2
        group.assignment = assignment
    try:
        check_same_assignment(net, "after the test's edit")
        message = "no error"
    except RankDivergenceError as exc:
        message = str(exc)
    Path(out, f"rank{rank}.txt").write_text(message)
    dist.destroy_process_group()


def _failing_peer_worker(rank: int, port: int, out: str) -> None:
    _init(rank, port, timeout_s=30.0)
    if rank == 1:
        os._exit(3)  # a crashed rank: no cleanup, its connections just close
    time.sleep(1.0)
    net = _net(sync_bn=False, execution="masked")
    try:
        check_same_assignment(net, "after a peer crashed")
        message = "no error"
    except DistributedError as exc:
        message = f"{type(exc).__name__}: {exc}"
    Path(out, "rank0.txt").write_text(message)
    os._exit(0)  # the process group cannot be destroyed cleanly without the peer


def _spawn(fn: Any, tmp_path: Path, *args: Any) -> None:
    mp.start_processes(fn, args=(_free_port(), str(tmp_path), *args), nprocs=WORLD, join=True, start_method="spawn")


def _spawn_bounded(fn: Any, tmp_path: Path, timeout_s: float = 120) -> None:
    """Start the ranks without joining them as one job (a failing rank must not stop its peer),
    and fail when one is still running after ``timeout_s``."""
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=fn, args=(r, port, str(tmp_path))) for r in range(WORLD)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=timeout_s)
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.kill()
    assert not alive, "a rank hung after its peer stopped"


# ------------------------------------------------------------------------------------ tests
@pytest.mark.parametrize("execution", ["masked", "sliced"])
def test_syncbn_scores_equal_one_process_full_batch(tmp_path: Path, execution: str) -> None:
    """With SyncBN and each global batch split over two ranks, the first iteration's importance
    scores (and the weights after it) equal one process's on the whole batches."""
    _spawn(_scores_worker, tmp_path, execution)
    net = _net(sync_bn=True, execution=execution)  # one process: SyncBatchNorm2d is plain BatchNorm
    assert any(isinstance(m, SyncBatchNorm2d) for m in net.model.modules())
    constructor = Constructor(net, _config(net, iterations=3, batches=2), _global_batches(2))
    constructor.train_iteration()
    single = constructor.tracker.scores
    assert float(single.abs().sum()) > 0
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        torch.testing.assert_close(got["scores"], single, rtol=1e-5, atol=1e-5 * float(single.abs().max()))
        for name, value in net.model.state_dict().items():
            torch.testing.assert_close(got["weights"][name], value, rtol=1e-5, atol=1e-6, msg=name)


def test_ranks_construct_identical_assignments(tmp_path: Path) -> None:
    _spawn(_construction_worker, tmp_path)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    assert torch.equal(results[0]["assignment"], results[1]["assignment"])
    assert results[0]["hashes"] == results[1]["hashes"] and len(results[0]["hashes"]) >= 1
    assert int(results[0]["assignment"][:-1].max()) > 1, "construction moved no neuron: the test proves nothing"


def test_divergent_assignments_stop_every_rank(tmp_path: Path) -> None:
    _spawn(_divergence_worker, tmp_path)
    for rank in range(WORLD):
        message = (tmp_path / f"rank{rank}.txt").read_text()
        assert "different neuron assignments" in message and "ranks [1]" in message, message


def test_a_crashed_rank_ends_the_peer_with_a_clear_error(tmp_path: Path) -> None:
    _spawn_bounded(_failing_peer_worker, tmp_path)
    message = (tmp_path / "rank0.txt").read_text()
    assert message.startswith("DistributedError") and "another rank stopped" in message, message


def test_syncbn_is_batchnorm_outside_a_process_group() -> None:
    torch.manual_seed(0)
    plain = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 4 * 4, 2), nn.BatchNorm1d(2)
    )
    synced = convert_sync_batchnorm(copy.deepcopy(plain))
    assert [type(m).__name__ for m in synced.modules()].count("SyncBatchNorm2d") == 1
    assert [type(m).__name__ for m in synced.modules()].count("SyncBatchNorm1d") == 1
    x = torch.randn(5, 3, 6, 6)
    torch.testing.assert_close(synced(x), plain(x), rtol=0, atol=0)
    assert set(synced.state_dict()) == set(plain.state_dict())
    for name, value in plain.state_dict().items():
        torch.testing.assert_close(synced.state_dict()[name], value, rtol=0, atol=0)


def test_timm_batchnorm_act_becomes_sync_and_keeps_its_activation() -> None:
    timm = pytest.importorskip("timm")
    from timm.layers.norm_act import BatchNormAct2d

    torch.manual_seed(0)
    plain = timm.create_model("mobilenetv3_small_050", pretrained=False, num_classes=10)
    before = sum(type(m) is BatchNormAct2d for m in plain.modules())
    assert before > 0
    synced = convert_sync_batchnorm(copy.deepcopy(plain))
    kinds = [type(m).__name__ for m in synced.modules()]
    assert "BatchNormAct2d" not in kinds and kinds.count("SyncBatchNormAct2d") == before
    assert all(isinstance(m, BatchNormAct2d) for m in synced.modules() if type(m).__name__ == "SyncBatchNormAct2d")
    x = torch.randn(4, 3, 64, 64)
    for train in (True, False):
        plain.train(train)
        synced.train(train)
        with torch.no_grad():
            torch.testing.assert_close(synced(x), plain(x), rtol=0, atol=0)
    assert set(synced.state_dict()) == set(plain.state_dict())
    for name, value in plain.state_dict().items():
        torch.testing.assert_close(synced.state_dict()[name], value, rtol=0, atol=0)


def test_single_process_helpers_are_identities() -> None:
    net = _net(sync_bn=False, execution="masked")
    t = torch.randn(5)
    assert all_reduce_mean(t) is t
    assert check_same_assignment(net, "alone") == assignment_hash(net)
    before = assignment_hash(net)
    group = net.groups[0]
    assignment = group.assignment.clone()
    assignment[0] = 2
    group.assignment = assignment
    assert assignment_hash(net) != before
    assert wrap_ddp(net.model, DistributedContext(), torch.device("cpu")) is net.model


@pytest.mark.parametrize(
    "env, message",
    [
        ({"WORLD_SIZE": "two"}, "WORLD_SIZE='two' is not an integer"),
        ({"WORLD_SIZE": "2", "RANK": "2"}, "need 0 <= RANK < WORLD_SIZE"),
    ],
)
def test_bad_torchrun_environment_is_refused(env: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        context_from_env(env)


def test_context_from_env_reads_torchrun_variables() -> None:
    ctx = context_from_env({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1"})
    assert (ctx.rank, ctx.world_size, ctx.local_rank, ctx.enabled, ctx.is_main) == (3, 4, 1, True, False)
    assert not context_from_env({}).enabled


# ------------------------------------------------------------------------- torchrun, the CLI
def _torchrun(
    args: list[str], cwd: Path, timeout: float = 240, subcommand: str = "run"
) -> subprocess.CompletedProcess[str]:
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={WORLD}",
        f"--master_port={_free_port()}",
        "-m",
        "nni_steppingnet",
        subcommand,
        *args,
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


def _tiny_sets() -> list[str]:
    return [word for item in TINY_RUN_OVERRIDES for word in ("--set", item)]


def test_torchrun_resumes_a_run_and_rank0_writes_it(tmp_path: Path) -> None:
    """Teacher and construction on one process, then retraining and evaluation under torchrun
    with two ranks and SyncBN from the checkpoint: rank 0 reads it and writes the results."""
    from nni_steppingnet.config import load_recipe
    from nni_steppingnet.flow import load_checkpoint, run_recipe

    out = tmp_path / "run"
    recipe = load_recipe("quickstart", list(TINY_RUN_OVERRIDES))
    run_recipe(recipe, out, device="cpu", stages=("teacher", "construction"))
    constructed = load_checkpoint(out / "checkpoint.pt").net.flat_assignment()
    done = _torchrun(
        ["quickstart", "--out", str(out), "--resume", "--no-progress", "--sync-bn", *_tiny_sets()], tmp_path
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("| Subnet | Accuracy |") == 1, "only rank 0 prints the results"
    results = json.loads((out / "results.json").read_text())
    assert results["world_size"] == WORLD and results["sync_bn"] is True
    assert results["retraining"]["epochs"] == 2
    assert torch.equal(load_checkpoint(out / "checkpoint.pt").net.flat_assignment(), constructed)
    assert not list(out.glob("*.tmp*")), "an interrupted atomic write was left behind"


def test_torchrun_resumes_a_run_interrupted_mid_construction(tmp_path: Path) -> None:
    """One process stops after construction iteration 2 of 4 (Ctrl-C); two ranks resume it from
    the checkpoint: the first two iterations are kept as they were, the last two run on both
    ranks with identical assignments (hashed every iteration), and rank 0 writes the results."""
    from nni_steppingnet.config import load_recipe
    from nni_steppingnet.flow import run_recipe

    out = tmp_path / "run"
    recipe = load_recipe("quickstart", list(TINY_RUN_OVERRIDES))
    seen: list[dict[str, Any]] = []

    def stop_after_two(kind: str, payload: dict[str, Any]) -> None:
        if kind == "iteration":
            seen.append(payload)
            if len(seen) == 2:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_recipe(recipe, out, device="cpu", reporter=stop_after_two)
    assert (out / "checkpoint.pt").is_file() and not (out / "results.json").exists()
    done = _torchrun(["quickstart", "--out", str(out), "--resume", "--no-progress", *_tiny_sets()], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["world_size"] == WORLD
    history = results["construction"]["history"]
    assert [entry["iteration"] for entry in history] == [1, 2, 3, 4]
    for before, after in zip(seen, history[:2]):
        assert after["macs"] == before["macs"] and "assignment_hash" not in after
    assert all(len(entry["assignment_hash"]) == 64 for entry in history[2:])
    assert not list(out.glob("*.tmp*"))


def test_torchrun_full_run_checks_assignments_every_iteration(tmp_path: Path) -> None:
    out = tmp_path / "run"
    done = _torchrun(["quickstart", "--out", str(out), "--no-progress", *_tiny_sets()], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    history = results["construction"]["history"]
    assert history and all(len(entry["assignment_hash"]) == 64 for entry in history)
    accuracies = [s["accuracy"] for s in results["subnets"]]
    # 64 synthetic images, 16 in the test split: every count is a multiple of 1/16 over both ranks.
    assert all(abs(a * 16 - round(a * 16)) < 1e-9 for a in accuracies)


def test_torchrun_refuses_an_existing_run_on_every_rank(tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint.pt").write_bytes(b"not a checkpoint")
    done = _torchrun(["quickstart", "--out", str(out), "--no-progress", *_tiny_sets()], tmp_path, timeout=120)
    assert done.returncode != 0
    assert "already holds a run" in done.stderr
    assert (out / "checkpoint.pt").read_bytes() == b"not a checkpoint"


# ------------------------------------------------------------------------ compare and ablate
#: a compare of seconds: 64 synthetic 8x8 images (16 in the test split), two construction iterations
COMPARE_TINY = [
    "data.name=synthetic",
    "data.synthetic_size=64",
    "data.batch_size=16",
    "data.img_size=8",
    "model.width=0.25",
    "teacher.epochs=1",
    "construction.iterations=2",
    "construction.batches_per_iteration=1",
    "retraining.epochs=1",
    "construction.monitor_samples=0",
]


def _compare_recipe() -> Any:
    from nni_steppingnet.config import load_recipe

    return load_recipe("quickstart", COMPARE_TINY)


def _rank_folder(out: str, rank: int) -> None:
    """Run in a folder of this rank's own, given the same relative ``out`` (as on two machines)."""
    here = Path(out, f"rank{rank}")
    here.mkdir()
    os.chdir(here)


def _compare_worker(rank: int, port: int, out: str) -> None:
    from nni_steppingnet.app.compare import run_compare

    _init(rank, port)
    _rank_folder(out, rank)
    first = run_compare(_compare_recipe(), "cmp", device="cpu")  # without --sync-bn: per-rank BN statistics
    if rank == 0:  # an unfinished baseline: the resumed compare trains it again
        Path("cmp", "seed0", "anywidth", "results.json").unlink()
    again = run_compare(_compare_recipe(), "cmp", device="cpu", resume=True)
    Path(out, f"rank{rank}.json").write_text(json.dumps({"first": first, "again": again}))
    dist.destroy_process_group()


def _failing_compare_worker(rank: int, port: int, out: str) -> None:
    from nni_steppingnet.app import compare

    _init(rank, port, timeout_s=30.0)
    _rank_folder(out, rank)
    if rank == 1:

        def crash(*args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("injected failure on rank 1")

        compare.train_baseline = crash  # type: ignore[assignment]
    try:
        compare.run_compare(_compare_recipe(), "cmp", methods=["anywidth"], device="cpu")
        message = "no error"
    except (DistributedError, RuntimeError) as exc:
        message = f"{type(exc).__name__}: {exc}"
    Path(out, f"rank{rank}.txt").write_text(message)
    os._exit(0)  # the process group cannot be destroyed cleanly without the peer


def test_compare_over_two_ranks_agrees_with_rank0_files(tmp_path: Path) -> None:
    """compare under two gloo ranks (each in its own folder): every method ends with the same
    weights (and SteppingNet with the same assignment) on both ranks as in rank 0's checkpoints,
    rank 1 writes nothing, the reported accuracies are those of the saved networks on the whole
    test set, and a resumed compare reuses the finished runs and retrains the unfinished one alike."""
    from nni_steppingnet.app.compare import load_baseline
    from nni_steppingnet.app.parallel import weights_hash
    from nni_steppingnet.flow import build_data, load_checkpoint, load_teacher
    from nni_steppingnet.train import evaluate, evaluate_model

    _spawn(_compare_worker, tmp_path)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    assert list((tmp_path / "rank1").iterdir()) == [], "rank 1 wrote files"
    out = tmp_path / "rank0" / "cmp"
    assert sorted(p.name for p in out.iterdir()) == ["compare.json", "compare.md", "compare.png", "seed0"]
    assert json.loads((out / "compare.json").read_text())["summary"] == ranks[0]["again"]["summary"]
    recipe = _compare_recipe()
    _, whole_test, info = build_data(recipe)  # one process: the whole test split
    assert len(whole_test.dataset) == 16
    stepping = load_checkpoint(out / "seed0" / "steppingnet").net
    nets = {
        "steppingnet": stepping,
        "anywidth": load_baseline(out / "seed0" / "anywidth")[0],
        "slimmable": load_baseline(out / "seed0" / "slimmable")[0],
    }
    teacher, _ = load_teacher(out / "seed0" / "teacher.pt", recipe, info)
    teacher_accuracy = evaluate_model(teacher, whole_test)
    for method, net in nets.items():
        runs = [rank[key]["runs"][method][0] for rank in ranks for key in ("first", "again")]
        assert {run["world_size"] for run in runs} == {WORLD}
        assert {run["weights_hash"] for run in runs} == {weights_hash(net.model)}, method
        assert all(run["subnets"] == runs[0]["subnets"] for run in runs), method
        assert [s["accuracy"] for s in runs[0]["subnets"]] == pytest.approx(evaluate(net, whole_test), abs=1e-12)
        if "original" in runs[0]:
            assert runs[0]["original"]["accuracy"] == pytest.approx(teacher_accuracy, abs=1e-12)
    from nni_steppingnet.distributed import assignment_hash

    sn_runs = [rank[key]["runs"]["steppingnet"][0] for rank in ranks for key in ("first", "again")]
    assert {run["assignment_hash"] for run in sn_runs} == {assignment_hash(stepping)}
    assert int(stepping.flat_assignment()[:-1].max()) > 1, "construction moved no neuron: the test proves nothing"


def test_compare_rank_failure_stops_the_peer_with_a_clear_error(tmp_path: Path) -> None:
    _spawn_bounded(_failing_compare_worker, tmp_path)
    assert (tmp_path / "rank1.txt").read_text() == "RuntimeError: injected failure on rank 1"
    message = (tmp_path / "rank0.txt").read_text()
    # The peer fails in DDP's next collective (an explicit one, or DDP's own buffer broadcast,
    # whose plain RuntimeError distributed_failures recognises): a DistributedError naming the step.
    assert message.startswith("DistributedError") and "training the anywidth baseline" in message, message


def test_torchrun_ablate_prints_and_writes_on_rank0_only(tmp_path: Path) -> None:
    out = tmp_path / "abl"
    sets = [word for item in COMPARE_TINY for word in ("--set", item)]
    argv = ["quickstart", "--out", str(out), "--device", "cpu", "--no-progress", "--sync-bn"]
    done = _torchrun([*argv, "--variants", "beta+kd", "--expansions", "none", *sets], tmp_path, subcommand="ablate")
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("results: ") == 1, "only rank 0 prints the tables"
    report = json.loads((out / "ablate.json").read_text())
    assert report["world_size"] == WORLD and report["sync_bn"] is True
    assert report["runs"]["beta+kd"][0]["world_size"] == WORLD
    history = json.loads((out / "seed0" / "beta-kd" / "results.json").read_text())["construction"]["history"]
    assert history and all(len(entry["assignment_hash"]) == 64 for entry in history)


def test_distributed_failures_names_the_step_of_a_backend_failure() -> None:
    from nni_steppingnet.distributed import distributed_failures

    with pytest.raises(DistributedError, match="rank 0: averaging scores failed because another rank stopped"):
        with distributed_failures("averaging scores"):
            raise torch.distributed.DistBackendError("peer gone")
    # Without a process group a RuntimeError is the user's own error, whatever its text.
    with pytest.raises(RuntimeError, match="Connection reset by peer") as info:
        with distributed_failures("step"):
            raise RuntimeError("Connection reset by peer")
    assert not isinstance(info.value, DistributedError)
    with pytest.raises(ValueError, match="bad shape"):
        with distributed_failures("step"):
            raise ValueError("bad shape")
