"""End-to-end flow on tiny synthetic data: run, results schema, eval, export, resume, errors."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn as nn

from nni_steppingnet.checkpoint import (
    atomic_write_text,
    capture_rng,
    load_checkpoint_file,
    restore_rng,
    save_checkpoint,
)
from nni_steppingnet.cli import main
from nni_steppingnet.config import RecipeError, load_recipe
from nni_steppingnet.data import DatasetInfo
from nni_steppingnet.errors import CheckpointError
from nni_steppingnet.flow import (
    build_data,
    build_model,
    evaluate_checkpoint,
    load_checkpoint,
    load_teacher,
    model_spec,
    reference_macs,
    resolve_device,
    run_recipe,
)
from nni_steppingnet.testing import TINY_RUN_OVERRIDES
from nni_steppingnet.train import evaluate

#: The shared tiny run: 64 synthetic 16x16 images, a quarter-width LeNet-3C1L.
TINY = list(TINY_RUN_OVERRIDES)
SETS = [arg for item in TINY for arg in ("--set", item)]


class _StopAt:
    """A reporter that raises KeyboardInterrupt at the ``count``-th event of ``kind`` (and of
    ``stage``, when given): simulates Ctrl-C."""

    def __init__(self, kind: str, count: int, stage: str | None = None) -> None:
        self.kind, self.count, self.stage, self.seen = kind, count, stage, 0

    def __call__(self, kind: str, payload: dict[str, Any]) -> None:
        if kind == self.kind and (self.stage is None or payload.get("stage") == self.stage):
            self.seen += 1
            if self.seen == self.count:
                raise KeyboardInterrupt


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One uninterrupted run through the command line; the reference for the other tests."""
    out = tmp_path_factory.mktemp("flow") / "run"
    assert main(["run", "quickstart", "--out", str(out), "--device", "cpu", "--no-progress", *SETS]) == 0
    return out


def _results(out: Path) -> dict[str, Any]:
    return json.loads((out / "results.json").read_text())


# ----------------------------------------------------------------------------- the run
def test_run_writes_results_report_and_checkpoint(cli_run: Path) -> None:
    for name in ("results.json", "results.md", "accuracy_vs_macs.png", "checkpoint.pt", "teacher.pt"):
        assert (cli_run / name).is_file(), name
    assert not list(cli_run.glob(".*.tmp")), "temporary files left behind"
    assert (cli_run / "accuracy_vs_macs.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    res = _results(cli_run)
    recipe = load_recipe("quickstart", TINY)
    assert res["recipe"] == recipe.to_dict()
    original = res["original"]
    assert original["macs"] == reference_macs(recipe, DatasetInfo("synthetic", 4, 3, 16))
    assert 0.0 <= original["accuracy"] <= 1.0
    subnets = res["subnets"]
    assert [s["index"] for s in subnets] == [1, 2, 3, 4]
    assert [s["budget"] for s in subnets] == recipe.steppingnet.budgets
    for s in subnets:
        assert 0.0 <= s["accuracy"] <= 1.0
        assert s["mac_ratio"] == s["macs"] / original["macs"]
    macs = [s["macs"] for s in subnets]
    assert macs == sorted(macs) and macs[0] > 0
    met = [s["macs"] <= s["budget"] * original["macs"] for s in subnets]
    assert res["budgets_met_per_subnet"] == met and res["budgets_met"] == all(met)
    assert res["isolation_ok"] is True
    construction = res["construction"]
    history = construction["history"]
    assert 1 <= construction["iterations"] == len(history) <= 4
    assert [h["iteration"] for h in history] == list(range(1, len(history) + 1))
    assert construction["final_macs"] == macs  # retraining moves no neuron
    assert all(len(h["accuracies"]) == 4 for h in history)
    assert res["retraining"]["epochs"] == 2 and len(res["retraining"]["losses"]) == 2
    assert res["wall_time_s"] > 0 and res["device"] == "cpu"
    md = (cli_run / "results.md").read_text()
    assert "| Network | Dataset | Orig. Acc. | A_1 | M_1/M_t | A_2 | M_2/M_t | A_3 | M_3/M_t | A_4 | M_4/M_t |" in md
    assert f"| lenet3c1l | synthetic | {100 * original['accuracy']:.2f}% |" in md
    assert f"{100 * subnets[0]['mac_ratio']:.2f}%" in md


def test_checkpoint_loads_back_with_the_same_accuracy(cli_run: Path) -> None:
    loaded = load_checkpoint(cli_run / "checkpoint.pt")
    assert loaded.stage == "done"
    assert loaded.completed == ["teacher", "construction", "retraining", "evaluation"]
    res = _results(cli_run)
    net = loaded.net
    assert [net.macs(s) for s in range(1, 5)] == [s["macs"] for s in res["subnets"]]
    _, test_loader, _ = build_data(loaded.recipe, "cpu")
    assert evaluate(net, test_loader) == [s["accuracy"] for s in res["subnets"]]


def test_eval_command_reproduces_results(cli_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    res = _results(cli_run)
    again = evaluate_checkpoint(cli_run / "checkpoint.pt", device="cpu")
    assert [s["accuracy"] for s in again["subnets"]] == [s["accuracy"] for s in res["subnets"]]
    assert [s["macs"] for s in again["subnets"]] == [s["macs"] for s in res["subnets"]]
    assert again["original"] == res["original"]
    capsys.readouterr()
    assert main(["eval", str(cli_run / "checkpoint.pt"), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    row = " | ".join(f"{100 * s['accuracy']:.2f}% | {100 * s['mac_ratio']:.2f}%" for s in res["subnets"])
    assert row in printed


def test_export_command(cli_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "sub2.pt"
    assert main(["export", str(cli_run), "--subnet", "2", "--out", str(target)]) == 0
    printed = capsys.readouterr().out
    res = _results(cli_run)
    assert f"{res['subnets'][1]['macs']:,} nonzero MACs" in printed
    module = torch.load(target, weights_only=False)
    state = torch.load(tmp_path / "sub2.state_dict.pt", weights_only=True)
    assert isinstance(module, nn.Module)
    assert set(state) == set(module.state_dict())
    loaded = load_checkpoint(cli_run)
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    loaded.net.model.eval()
    module.eval()
    with torch.no_grad(), loaded.net.subnet(2):
        expected = loaded.net.model(x)
    with torch.no_grad():
        assert torch.allclose(module(x), expected, atol=1e-5)
    assert main(["export", str(cli_run), "--subnet", "5"]) == 2
    assert "subnet index must be an int in 1..4" in capsys.readouterr().err


def test_export_runner_command(cli_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import timm

    from nni_steppingnet.flow import model_spec
    from nni_steppingnet.runtime import IncrementalRunner

    target = tmp_path / "anytime.pt"
    assert main(["export", str(cli_run), "--runner", "--out", str(target)]) == 0
    printed = capsys.readouterr().out
    assert str(target) in printed and "IncrementalRunner.load(" in printed
    res = _results(cli_run)
    assert ", ".join(f"{100 * s['mac_ratio']:.2f}%" for s in res["subnets"]) in printed
    loaded = load_checkpoint(cli_run)
    name, kwargs = model_spec(loaded.recipe, loaded.info, width=loaded.recipe.steppingnet.expansion)
    assert f"timm.create_model({name!r}" in printed
    runner = IncrementalRunner.load(target, timm.create_model(name, **kwargs))
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    loaded.net.model.eval()
    with torch.inference_mode():
        for s in range(1, loaded.net.num_subnets + 1):
            got = runner.start(x) if s == 1 else runner.step()
            with loaded.net.subnet(s):
                expected = loaded.net.model(x)
            assert torch.allclose(got, expected, atol=1e-5), f"subnet {s}"
            assert runner.macs_spent == res["subnets"][s - 1]["macs"]
    assert main(["export", str(cli_run), "--runner", "--out", str(tmp_path / "runner.txt")]) == 2
    assert "must be a file name ending in .pt or .pth" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["export", str(cli_run), "--runner", "--subnet", "2"])  # one or the other


def test_existing_out_dir_without_resume_is_an_error(cli_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = (cli_run / "checkpoint.pt").stat().st_mtime_ns
    assert main(["run", "quickstart", "--out", str(cli_run), "--device", "cpu", "--no-progress", *SETS]) == 2
    err = capsys.readouterr().err
    assert "already holds a run" in err and "--resume" in err and "another --out" in err
    assert (cli_run / "checkpoint.pt").stat().st_mtime_ns == before


def test_resume_needs_a_checkpoint_and_the_same_recipe(cli_run: Path, tmp_path: Path) -> None:
    recipe = load_recipe("quickstart", TINY)
    with pytest.raises(FileNotFoundError, match="cannot resume: no checkpoint.pt"):
        run_recipe(recipe, tmp_path / "empty", resume=True, device="cpu")
    copy = tmp_path / "copy"
    copy.mkdir()
    shutil.copy(cli_run / "checkpoint.pt", copy / "checkpoint.pt")
    with pytest.raises(ValueError, match=r"the recipe differs .*construction\.beta: 0\.9 != 0\.5"):
        run_recipe(recipe.with_overrides(["construction.beta=0.5"]), copy, resume=True, device="cpu")


# ------------------------------------------------------------------------------- resume
def test_interrupted_and_resumed_run_equals_the_uninterrupted_one(cli_run: Path, tmp_path: Path) -> None:
    recipe = load_recipe("quickstart", TINY)
    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):  # right after the teacher: the expanded net is not built yet
        run_recipe(recipe, out, device="cpu", reporter=_StopAt("stage", 1, stage="construction"))
    partial = load_checkpoint_file(out / "checkpoint.pt")
    assert partial["stage"] == "construction" and partial["completed"] == ["teacher"]
    assert partial["stage_state"] is None and partial["history"] == []
    with pytest.raises(KeyboardInterrupt):
        run_recipe(recipe, out, resume=True, device="cpu", reporter=_StopAt("iteration", 2))
    partial = load_checkpoint_file(out / "checkpoint.pt")
    assert partial["stage"] == "construction" and len(partial["history"]) == 2
    assert not (out / "results.json").exists()
    with pytest.raises(KeyboardInterrupt):  # and once more inside retraining
        run_recipe(recipe, out, resume=True, device="cpu", reporter=_StopAt("epoch", 1))
    partial = load_checkpoint_file(out / "checkpoint.pt")
    assert partial["stage"] == "retraining" and partial["stage_state"]["epoch"] == 1
    results = run_recipe(recipe, out, resume=True, device="cpu")

    reference = _results(cli_run)
    assert results["subnets"] == reference["subnets"]
    assert results["construction"]["final_macs"] == reference["construction"]["final_macs"]
    assert [h["mac_ratios"] for h in results["construction"]["history"]] == [
        h["mac_ratios"] for h in reference["construction"]["history"]
    ]
    assert results["retraining"]["losses"] == reference["retraining"]["losses"]
    a, b = load_checkpoint(out).net, load_checkpoint(cli_run).net
    assert torch.equal(a.flat_assignment(), b.flat_assignment())
    assert a.prune_masks.keys() == b.prune_masks.keys()
    assert all(torch.equal(a.prune_masks[k], b.prune_masks[k]) for k in a.prune_masks)
    sa, sb = a.model_state_dict(), b.model_state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ------------------------------------------------------------------------------- teacher
def test_teacher_checkpoint_of_another_architecture_is_a_clear_error(cli_run: Path, tmp_path: Path) -> None:
    info = DatasetInfo("synthetic", 4, 3, 16)
    recipe = load_recipe("quickstart", TINY)
    model, meta = load_teacher(cli_run / "teacher.pt", recipe, info)
    assert meta["accuracy"] == _results(cli_run)["original"]["accuracy"]
    wider = recipe.with_overrides(["model.width=0.5"])
    with pytest.raises(CheckpointError, match=r"saved for another network \(width: file 0\.25 vs recipe 0\.5\)"):
        load_teacher(cli_run / "teacher.pt", wider, info)
    plain = tmp_path / "plain.pt"
    torch.save(model.state_dict(), plain)
    assert load_teacher(plain, recipe, info)[0].state_dict().keys() == model.state_dict().keys()
    other = tmp_path / "lenet5.pt"
    torch.save(build_model(recipe.with_overrides(["model.name=lenet5"]), info).state_dict(), other)
    with pytest.raises(CheckpointError, match="does not fit model 'lenet3c1l'"):
        load_teacher(other, recipe, info)
    with pytest.raises(FileNotFoundError, match="teacher checkpoint not found"):
        load_teacher(tmp_path / "missing.pt", recipe, info)
    with pytest.raises(CheckpointError, match="teacher checkpoint .* was saved for another network"):
        run_recipe(wider.with_overrides([f"teacher.checkpoint={cli_run / 'teacher.pt'}"]), tmp_path / "w", device="cpu")


# ---------------------------------------------------------------------------- building
def test_build_model_applies_width_and_expansion() -> None:
    info = DatasetInfo("synthetic", 4, 3, 16)
    recipe = load_recipe("quickstart", TINY)
    convs = [m.out_channels for m in build_model(recipe, info, 2.0).modules() if isinstance(m, nn.Conv2d)]
    assert convs == [16, 16, 32]  # (32, 32, 64) x 0.25 x 2.0
    original = build_model(recipe, info)
    assert original.get_classifier().out_features == 4
    resnet = load_recipe("resnet18_cifar10")
    wide = build_model(resnet, DatasetInfo("cifar10", 10, 3, 32), 1.5)
    assert [wide.get_submodule(f"layer{i}")[0].conv1.out_channels for i in range(1, 5)] == [96, 192, 384, 768]
    with pytest.raises(ValueError, match="width must be a positive number"):
        build_model(recipe, info, 0.0)


@pytest.mark.parametrize(
    ("recipe_name", "takes_img_size"), [("vit_p4_cifar10", True), ("convnext_atto_cifar10", False)]
)
def test_the_data_image_size_reaches_models_that_read_it(recipe_name: str, takes_img_size: bool) -> None:
    """timm's ViT entry points take ``img_size`` only through ``**kwargs``: the flow passes the
    data's size to them (else the patch embedding refuses 32x32), and not to ConvNeXt, whose
    constructor has no such argument."""
    info = DatasetInfo("npz", 10, 3, 32)
    recipe = load_recipe(recipe_name)
    name, kwargs = model_spec(recipe, info)
    assert ("img_size" in kwargs) is takes_img_size and kwargs.get("img_size", 32) == 32
    model = build_model(recipe, info).eval()
    with torch.no_grad():
        assert tuple(model(torch.randn(2, 3, 32, 32)).shape) == (2, 10)
    with pytest.raises(RecipeError, match="model.kwargs.img_size is set by the flow"):
        load_recipe(recipe_name, ["model.kwargs.img_size=32"])


@pytest.mark.parametrize("execution", ["masked", "sliced"])
def test_recipe_execution_reaches_steppingnet_and_baselines(execution: str) -> None:
    from nni_steppingnet.app.compare import BASELINES
    from nni_steppingnet.flow import build_stepping_net

    info = DatasetInfo("synthetic", 4, 3, 16)
    recipe = load_recipe("quickstart", [*TINY, f"steppingnet.execution={execution}"])
    assert build_stepping_net(recipe, info).execution == execution
    model = build_model(recipe, info, recipe.steppingnet.expansion)
    baseline = BASELINES["anywidth"](model, torch.randn(2, 3, 16, 16), 4, execution=recipe.steppingnet.execution)
    assert baseline.execution == execution


def test_device_and_stage_arguments(tmp_path: Path) -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        assert resolve_device("auto") == torch.device("cpu")
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda:0")
    with pytest.raises(ValueError, match="device must be 'auto', 'cpu', 'cuda' or 'cuda:K'"):
        resolve_device("gpu")
    recipe = load_recipe("quickstart", TINY)
    with pytest.raises(ValueError, match="stages must be distinct and in the order"):
        run_recipe(recipe, tmp_path / "x", stages=("construction", "teacher"))
    with pytest.raises(ValueError, match="unknown stage"):
        run_recipe(recipe, tmp_path / "x", stages=("teacher", "pruning"))
    assert not (tmp_path / "x").exists()


def test_missing_data_root_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "lenet5_mnist", "--out", str(tmp_path / "m"), "--device", "cpu", "--no-progress"]) == 2
    assert "--set data.root=" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


def test_recipes_command_lists_names_and_descriptions(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["recipes"]) == 0
    lines = capsys.readouterr().out.splitlines()
    names = [line.split()[0] for line in lines]
    assert {
        "quickstart",
        "lenet3c1l_cifar10",
        "lenet5_cifar10",
        "vgg16_cifar100",
        "resnet18_cifar10",
        "lenet5_mnist",
    } <= set(names)
    assert all(len(line.split(None, 1)) == 2 for line in lines)
    assert main(["recipes", "--keys"]) == 0
    keys = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert "construction.beta" in keys and "steppingnet.budgets" in keys and len(keys) == len(set(keys))


# --------------------------------------------------------------------------- file helpers
def test_atomic_write_keeps_the_old_file_on_error(tmp_path: Path) -> None:
    target = tmp_path / "a.txt"
    atomic_write_text(target, "old")

    class Boom(Exception):
        pass

    from nni_steppingnet.checkpoint import atomic_write

    def writer(handle: Any) -> None:
        handle.write(b"partial")
        raise Boom

    with pytest.raises(Boom):
        atomic_write(target, writer)
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


def test_checkpoint_files_round_trip_rng_and_reject_objects(tmp_path: Path) -> None:
    rng = capture_rng()
    state = {"rng": rng, "array": np.arange(5, dtype=np.uint32), "scalar": np.float64(1.5), "nan": math.nan}
    save_checkpoint(state, tmp_path / "c.pt")
    back = load_checkpoint_file(tmp_path / "c.pt")
    assert back["array"].dtype == np.uint32 and back["array"].tolist() == [0, 1, 2, 3, 4]
    assert back["scalar"] == 1.5 and math.isnan(back["nan"])
    expected = torch.rand(3)
    restore_rng(back["rng"])
    assert torch.equal(torch.rand(3), expected)
    with pytest.raises(TypeError, match=r"checkpoint value at obj\[1\] has type object"):
        save_checkpoint({"obj": [1, object()]}, tmp_path / "bad.pt")
    assert not (tmp_path / "bad.pt").exists()
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_checkpoint_file(tmp_path / "junk.pt")


def test_run_ends_with_anytime_inference_stepping_vs_recomputing(cli_run: Path) -> None:
    res = _results(cli_run)
    stepping = res["stepping"]
    subnets = res["subnets"]
    assert stepping["samples"] == 16 and stepping["layout"] in ("delta", "full") and stepping["repeats"] == 3
    assert [step["subnet"] for step in stepping["steps"]] == [1, 2, 3, 4]
    cumulative = 0
    for step, sub in zip(stepping["steps"], subnets):
        cumulative += sub["macs"]
        # The runner and the exported subnets compute subnet s exactly: the same accuracy.
        assert step["accuracy"] == sub["accuracy"] == step["exported_accuracy"]
        assert step["macs_stepping"] == sub["macs"]
        assert step["macs_recompute"] == cumulative
        assert step["mac_ratio_recompute"] == pytest.approx(cumulative / res["original"]["macs"])
        assert (
            step["time_stepping_s"] >= step["time_step_s"] > 0 and step["time_recompute_s"] >= step["time_subnet_s"] > 0
        )
    steps = stepping["steps"]
    assert all(
        b["time_stepping_s"] - a["time_stepping_s"] == pytest.approx(b["time_step_s"]) for a, b in zip(steps, steps[1:])
    )
    md = (cli_run / "results.md").read_text()
    assert "| Step to subnet | Accuracy | MACs spent: stepping | MACs: recomputing 1..s |" in md
    last = steps[-1]
    assert f"| 4 | {100 * last['accuracy']:.2f}% | {last['macs_stepping']:,} (" in md
