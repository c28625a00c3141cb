"""Reliability as a user meets it through the command line: no command overwrites its inputs,
outputs stay in the output folder, unwritable folders fail before any training with one line,
stale temporary files go away, Ctrl-C says how to resume, eval needs only the checkpoint, and
misuse is reported clearly (wrong example_inputs, a pruner loop that ends early).

Each case checks the exit code, the one-line message and the files on disk before and after.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shlex
import shutil
from pathlib import Path
from typing import Any, Callable

import pytest
import timm
import torch

import nni_steppingnet.models  # noqa: F401  (registers lenet3c1l with timm)
from nni_steppingnet import SteppingNet
from nni_steppingnet.cli import main
from nni_steppingnet.testing import TINY_RUN_OVERRIDES

#: 64 synthetic 16x16 images and a quarter-width LeNet-3C1L: a whole run takes seconds.
TINY = list(TINY_RUN_OVERRIDES)
SETS = [arg for item in TINY for arg in ("--set", item)]


def _snapshot(folder: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under ``folder`` (hidden files included)."""
    if not folder.exists():
        return {}
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _error_line(capsys: pytest.CaptureFixture[str]) -> str:
    """The command's stderr, asserted to be exactly one ``error:`` line without a traceback."""
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("reliability") / "run"
    assert main(["run", "quickstart", "--out", str(out), "--device", "cpu", "--no-progress", *SETS]) == 0
    return out


@pytest.fixture
def run_copy(finished_run: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(finished_run, copy)
    return copy


# ------------------------------------------------------------------ 1. inputs are never outputs
@pytest.mark.parametrize(
    "kind, target",
    [
        (["--subnet", "1"], "checkpoint.pt"),
        (["--runner"], "checkpoint.pt"),
        (["--subnet", "2"], "teacher.pt"),
        (["--runner"], "teacher.pt"),
    ],
)
def test_export_never_overwrites_its_checkpoint_or_teacher(
    run_copy: Path, kind: list[str], target: str, capsys: pytest.CaptureFixture[str]
) -> None:
    before = _snapshot(run_copy)
    code = main(["export", str(run_copy / "checkpoint.pt"), *kind, "--out", str(run_copy / target)])
    line = _error_line(capsys)
    assert code == 2
    assert f"would overwrite {run_copy / target}, an input of this command" in line
    assert "choose another --out" in line
    assert _snapshot(run_copy) == before


def test_export_through_another_spelling_of_the_same_file_is_refused(
    run_copy: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    link = tmp_path / "link.pt"
    link.symlink_to(run_copy / "checkpoint.pt")
    monkeypatch.chdir(run_copy)
    before = _snapshot(run_copy)
    assert main(["export", "checkpoint.pt", "--subnet", "1", "--out", str(link)]) == 2
    assert "an input of this command" in _error_line(capsys)
    assert _snapshot(run_copy) == before and link.is_symlink()


def test_run_never_overwrites_its_teacher_checkpoint(
    run_copy: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A new run whose --out is the folder its teacher.checkpoint lives in would rewrite that teacher.
    out = tmp_path / "second"
    out.mkdir()
    shutil.copy(run_copy / "teacher.pt", out / "teacher.pt")
    before = _snapshot(out)
    code = main(
        [
            "run",
            "quickstart",
            "--out",
            str(out),
            "--no-progress",
            *SETS,
            "--set",
            f"teacher.checkpoint={out / 'teacher.pt'}",
        ]
    )
    line = _error_line(capsys)
    assert code == 2 and f"would overwrite {out / 'teacher.pt'}, an input of this command" in line
    assert _snapshot(out) == before


@pytest.mark.parametrize("name", ["../escaped", "/tmp/absolute", "a/b", "..", ".", "x..y", "with space"])
def test_recipe_name_must_be_a_plain_name(
    name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    recipe = tmp_path / "shared.yaml"
    recipe.write_text(f"name: {name!r}\nteacher:\n  epochs: 1\n")
    code = main(["run", str(recipe), "--no-progress", *SETS])
    line = _error_line(capsys)
    assert code == 2
    assert "name must be a plain name" in line and "no path separators" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shared.yaml"]  # nothing written anywhere
    assert not (tmp_path.parent / "escaped").exists()


def test_plain_recipe_name_with_dots_and_dashes_is_accepted() -> None:
    from nni_steppingnet.config import load_recipe

    assert load_recipe("quickstart", ["name=my-run_2.v1"]).name == "my-run_2.v1"


# ------------------------------------------------------- 2. unwritable output before any training
@pytest.fixture
def no_training(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any training started by the flow fails the test: the error must come first."""
    import nni_steppingnet.train as train

    def fail(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("training started before the output folder was checked")

    monkeypatch.setattr(train, "train_dense", fail)


def test_out_under_a_regular_file_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], no_training: None
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    code = main(["run", "quickstart", "--out", str(blocker / "run"), "--no-progress", *SETS])
    line = _error_line(capsys)
    assert code == 2
    assert line == (
        f"error: {blocker / 'run'}: Not a directory (a part of this path is a file, not a folder: "
        "choose another path (e.g. another --out))"
    )
    assert blocker.read_text() == "not a folder"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_out_that_is_a_regular_file_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], no_training: None
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("keep me")
    assert main(["run", "quickstart", "--out", str(blocker), "--no-progress", *SETS]) == 2
    line = _error_line(capsys)
    assert line.startswith(f"error: {blocker}: File exists (it exists and is not a folder")
    assert blocker.read_text() == "keep me"


def _failing_open(folder: Path, code: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """``os.open`` raises ``OSError(code)`` for files created in ``folder`` (a read-only mount or
    a full disk, which root cannot otherwise get in a test)."""
    real_open = os.open

    def fake_open(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if flags & os.O_CREAT and Path(os.fsdecode(path)).parent == folder:
            raise OSError(code, os.strerror(code), os.fsdecode(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", fake_open)


@pytest.mark.parametrize(
    "code, reason, advice",
    [
        (errno.EROFS, "Read-only file system", "the file system is read-only: choose a path on a writable disk"),
        (errno.ENOSPC, "No space left on device", "no space left on the device: free some space"),
        (errno.EACCES, "Permission denied", "permission denied: choose a path you may write"),
    ],
)
def test_unwritable_out_fails_before_training_with_one_line(
    code: int,
    reason: str,
    advice: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    no_training: None,
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    _failing_open(out, code, monkeypatch)
    assert main(["run", "quickstart", "--out", str(out), "--no-progress", *SETS]) == 2
    line = _error_line(capsys)
    assert line.startswith(f"error: {out}: {reason} ({advice}"), line
    assert list(out.iterdir()) == []


def test_unwritable_export_target_is_one_line(
    run_copy: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "exports"
    target.mkdir()
    _failing_open(target, errno.ENOSPC, monkeypatch)
    assert main(["export", str(run_copy), "--subnet", "1", "--out", str(target / "s1.pt")]) == 2
    assert "No space left on device (no space left on the device" in _error_line(capsys)
    assert list(target.iterdir()) == []


def test_traceback_only_with_vv(tmp_path: Path, capsys: pytest.CaptureFixture[str], no_training: None) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(NotADirectoryError):
        main(["-vv", "run", "quickstart", "--out", str(blocker / "run"), "--no-progress", *SETS])


# ------------------------------------------------- 3. stale temporary files, interruption, resume
def _interrupt_at(kind: str, count: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C at the ``count``-th progress event of ``kind`` the CLI receives."""
    from nni_steppingnet import flow_cli

    seen = {"n": 0}
    original: Callable[..., None] = flow_cli.CliReporter.__call__

    def reporter(self: Any, event: str, payload: dict[str, Any]) -> None:
        original(self, event, payload)
        if event == kind:
            seen["n"] += 1
            if seen["n"] == count:
                raise KeyboardInterrupt

    monkeypatch.setattr(flow_cli.CliReporter, "__call__", reporter)


def test_interrupted_run_prints_the_resume_command_and_resume_clears_stale_files(
    tmp_path: Path, finished_run: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    out = Path("runs") / "interrupted"
    argv = ["run", "quickstart", "--out", str(out), "--device", "cpu", "--no-progress", *SETS]
    with monkeypatch.context() as patch:
        _interrupt_at("iteration", 2, patch)
        assert main(argv) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("interrupted; continue the run with: "), err
    command = err[0].split(": ", 1)[1]
    assert command == shlex.join(
        [
            "nni-steppingnet",
            *argv[:1],
            "quickstart",
            *SETS,
            "--out",
            str(out),
            "--resume",
            "--device",
            "cpu",
            "--no-progress",
        ]
    )
    assert (out / "checkpoint.pt").is_file() and not (out / "results.json").exists()
    # A killed atomic write leaves its temporary file behind; the resumed run removes it.
    stale = [out / ".checkpoint.pt.abcd_123.tmp", out / ".results.json.zz99yy88.tmp"]
    for path in stale:
        path.write_bytes(b"partial")
    keep = out / "notes.tmp"
    keep.write_text("the user's file")
    words = shlex.split(command)
    assert words[0] == "nni-steppingnet"
    assert main(words[1:]) == 0
    assert not any(path.exists() for path in stale)
    assert keep.read_text() == "the user's file"
    assert (out / "results.json").is_file()
    assert not list(out.glob(".*.tmp"))
    # The resumed run ends where the uninterrupted one did.
    resumed = torch.load(out / "checkpoint.pt", weights_only=True)["results"]["subnets"]
    reference = torch.load(finished_run / "checkpoint.pt", weights_only=True)["results"]["subnets"]
    assert [s["accuracy"] for s in resumed] == [s["accuracy"] for s in reference]


def test_interrupt_before_the_first_checkpoint_says_to_start_again(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import nni_steppingnet.train as train

    def interrupted(*args: Any, **kwargs: Any) -> Any:
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "train_dense", interrupted)
    out = tmp_path / "early"
    assert main(["run", "quickstart", "--out", str(out), "--no-progress", *SETS]) == 130
    err = capsys.readouterr().err.strip()
    assert err.startswith("interrupted before the first checkpoint; start again with: nni-steppingnet run quickstart ")
    assert "--resume" not in err and f"--out {out}" in err
    assert not (out / "checkpoint.pt").exists()


def test_a_new_run_removes_stale_temporaries_of_its_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "fresh"
    out.mkdir()
    stale = out / ".teacher.pt.q1w2e3r4.tmp"
    stale.write_bytes(b"half a teacher")
    import nni_steppingnet.train as train

    def stop(*args: Any, **kwargs: Any) -> Any:
        raise KeyboardInterrupt  # the cleanup happened before training; no need to train

    monkeypatch.setattr(train, "train_dense", stop)
    assert main(["run", "quickstart", "--out", str(out), "--no-progress", *SETS]) == 130
    assert not stale.exists()
    assert list(out.iterdir()) == []


# ------------------------------------------------------------------------------- 4. eval, misuse
@pytest.mark.parametrize("damage", ["garbage", "missing", "unreadable-folder"])
def test_eval_needs_only_the_checkpoint(run_copy: Path, damage: str, capsys: pytest.CaptureFixture[str]) -> None:
    teacher = run_copy / "teacher.pt"
    if damage == "garbage":
        teacher.write_bytes(b"not a torch file")
    elif damage == "missing":
        teacher.unlink()
    else:
        teacher.unlink()
        teacher.mkdir()  # reading it raises IsADirectoryError
    before = _snapshot(run_copy)
    assert main(["eval", str(run_copy / "checkpoint.pt"), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    recorded = torch.load(run_copy / "checkpoint.pt", weights_only=True)["teacher_accuracy"]
    assert f"| original | {100 * recorded:.2f}% |" in out
    assert _snapshot(run_copy) == before


@pytest.mark.parametrize("shape", [(2, 1, 16, 16), (2, 3, 8, 8), (3, 16, 16)])
def test_wrong_example_inputs_name_the_expected_and_the_given_shape(shape: tuple[int, ...]) -> None:
    model = timm.create_model("lenet3c1l", num_classes=10, in_chans=3, img_size=16)
    with pytest.raises(ValueError) as info:
        SteppingNet(model, torch.randn(*shape), num_subnets=2)
    text = str(info.value)
    assert text.startswith(
        f"example_inputs of shape {shape} do not fit the model; the model expects "
        "(batch, 3, 16, 16): its forward raised "
    ), text
    assert "cannot wrap this model" not in text


def test_pruner_loop_that_returns_early_warns_without_logging_configured() -> None:
    pytest.importorskip("nni")
    import nni
    import torch.nn.functional as F
    from nni.compression import TorchEvaluator

    from nni_steppingnet.nni import SteppingNetPruner

    torch.manual_seed(0)
    model = timm.create_model("lenet3c1l", num_classes=4, in_chans=3, img_size=16, width=0.25)
    batch = (torch.randn(2, 3, 16, 16), torch.randint(0, 4, (2,)))

    def training_step(data: Any, model: torch.nn.Module) -> torch.Tensor:
        return F.cross_entropy(model(data[0]), data[1])

    def training_func(
        model: torch.nn.Module,
        optimizers: Any,
        training_step: Any,
        lr_schedulers: Any = None,
        max_steps: int | None = None,
        max_epochs: int | None = None,
    ) -> None:
        optimizers.zero_grad()
        training_step(batch, model).backward()
        optimizers.step()  # one step, then the loop returns: construction cannot finish

    optimizer = nni.trace(torch.optim.SGD)(model.parameters(), lr=0.01)
    evaluator = TorchEvaluator(training_func, optimizer, training_step, dummy_input=batch[0])
    pruner = SteppingNetPruner(
        model, [{"op_types": ["Conv2d"]}], evaluator, [0.3, 0.6], batches_per_iteration=2, iterations=2
    )
    with pytest.warns(UserWarning) as record:
        pruner.compress()
    messages = [str(w.message) for w in record]
    assert any(
        "training function returned after 1 optimizer steps, before the construction finished (0 of "
        "at most 2 iterations" in m
        for m in messages
    ), messages
    assert any("budgets met [False, False] after 0 iterations" in m for m in messages), messages
    assert pruner.result is not None and not pruner.result.all_met
