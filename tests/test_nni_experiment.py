"""nni-steppingnet tune: search-space checks, a real two-trial local NNI experiment, and the NNI
manager being stopped after success, failure and Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml

pytest.importorskip("nni")

from nni_steppingnet import cli  # noqa: E402
from nni_steppingnet.config import Recipe, load_recipe  # noqa: E402
from nni_steppingnet.nni.experiment import (  # noqa: E402
    TuneOptions,
    _sigterm_as_interrupt,
    check_port,
    check_tuner,
    load_tune_recipe,
    parse_gpus,
    run_tune,
    trials_markdown,
)
from nni_steppingnet.nni.search_space import (  # noqa: E402
    SearchSpaceError,
    load_search_space,
    params_to_overrides,
    validate_search_space,
)
from nni_steppingnet.nni.trial import anytime_auc, intermediate_metric  # noqa: E402

TINY = {
    "name": "tiny",
    "seed": 0,
    "data": {"name": "synthetic", "batch_size": 32, "synthetic_size": 64},
    "model": {"name": "lenet3c1l", "width": 0.25},
    "steppingnet": {"num_subnets": 2, "budgets": [0.4, 0.8], "expansion": 1.0},
    "teacher": {"epochs": 1, "lr": 0.05},
    "construction": {"batches_per_iteration": 1, "iterations": 2, "monitor_samples": 16},
    "retraining": {"epochs": 0, "gamma": 0.4},
}
SPACE = {
    "alpha_growth": {"_type": "uniform", "_value": [1.0, 2.0]},
    "beta": {"_type": "uniform", "_value": [0.7, 1.0]},
    "gamma": {"_type": "uniform", "_value": [0.2, 0.8]},
    "m": {"_type": "choice", "_value": [1, 2]},
    "budget_split_1": {"_type": "uniform", "_value": [0.5, 2.0]},
    "budget_split_2": {"_type": "uniform", "_value": [0.5, 2.0]},
}

# Every test here drops the NNI experiments it started from NNI's registry (conftest).
pytestmark = pytest.mark.usefixtures("forget_nni_experiments")


# ------------------------------------------------------------------------- helpers


def free_port_pair() -> int:
    for _ in range(50):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port < 65000:
            try:
                check_port(port, extra=True)
                return port
            except ValueError:
                continue
    raise RuntimeError("no free port pair")


@pytest.fixture
def tiny_recipe(tmp_path: Path) -> Recipe:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY), encoding="utf-8")
    return load_recipe(path)


# ------------------------------------------------------------------ search spaces
def test_bundled_search_spaces_validate() -> None:
    for name, recipe in (("quickstart", "quickstart"), ("default", "quickstart")):
        space = validate_search_space(load_search_space(name), load_recipe(recipe))
        assert set(space) == {
            "alpha_growth",
            "beta",
            "gamma",
            "expansion",
            "m",
            "budget_split_1",
            "budget_split_2",
            "budget_split_3",
            "budget_split_4",
        }


@pytest.mark.parametrize(
    ("space", "match"),
    [
        ({}, "non-empty"),
        ({"colour": {"_type": "choice", "_value": [1]}}, "unknown search space key 'colour'"),
        ({"beta": {"_type": "uniform", "_value": [0.5, 1.5]}}, r"value 1.5 .*beta must be in \(0, 1\]"),
        ({"beta": {"_type": "gaussian", "_value": [0.5, 1.0]}}, "unknown _type 'gaussian'"),
        ({"beta": {"_type": "normal", "_value": [0.9, 0.1]}}, "unbounded"),
        ({"beta": {"_type": "uniform", "_value": [0.9, 0.8]}}, "low < high"),
        ({"beta": {"_type": "uniform", "_value": [0.9]}}, r"\[low, high\]"),
        ({"beta": {"_value": [0.9, 1.0]}}, "exactly '_type' and '_value'"),
        ({"m": {"_type": "uniform", "_value": [1, 4]}}, "integer"),
        ({"m": {"_type": "choice", "_value": [0, 2]}}, "batches_per_iteration must be a positive int"),
        ({"gamma": {"_type": "loguniform", "_value": [0.0, 0.5]}}, "low > 0"),
        ({"budget_split_1": {"_type": "uniform", "_value": [1, 2]}}, r"missing \['budget_split_2'\]"),
        ({"budget_split_3": {"_type": "uniform", "_value": [1, 2]}}, "budget_split_1..budget_split_2"),
        ({"budget_scale": {"_type": "uniform", "_value": [0.5, 1.5]}}, "> 1"),
        (
            {"beta": {"_type": "choice", "_value": [0.9]}, "construction.beta": {"_type": "choice", "_value": [0.8]}},
            "both set construction.beta",
        ),
        ({"construction.lrr": {"_type": "choice", "_value": [0.1]}}, "not a recipe key"),
        ({"steppingnet.budgets": {"_type": "choice", "_value": [0.1]}}, "budget_scale"),
        ({"expansion": {"_type": "choice", "_value": [[1.0, 2.0]]}}, "nested"),
    ],
)
def test_bad_search_spaces_are_rejected(tiny_recipe: Recipe, space: dict[str, Any], match: str) -> None:
    with pytest.raises(SearchSpaceError, match=match):
        validate_search_space(space, tiny_recipe)


def test_params_map_to_recipe_keys(tiny_recipe: Recipe) -> None:
    params = {
        "alpha_growth": 1.25,
        "beta": 0.8,
        "gamma": 0.3,
        "m": 2.0,
        "construction.lr": 0.05,
        "budget_split_1": 1.0,
        "budget_split_2": 3.0,
        "budget_scale": 1.1,
    }
    overrides = params_to_overrides(params, tiny_recipe)
    assert overrides == [
        "construction.alpha_growth=1.25",
        "construction.beta=0.8",
        "retraining.beta=0.8",
        "retraining.gamma=0.3",
        "construction.batches_per_iteration=2",
        "construction.lr=0.05",
        f"steppingnet.budgets={json.dumps([0.8 * 1.1 * 0.25, 0.8 * 1.1])}",
    ]
    recipe = tiny_recipe.with_overrides(overrides)
    assert recipe.construction.batches_per_iteration == 2
    assert recipe.steppingnet.budgets == [0.8 * 1.1 * 0.25, 0.8 * 1.1]
    with pytest.raises(ValueError, match="must be an integer"):
        params_to_overrides({"m": 2.5}, tiny_recipe)


def test_anytime_auc_and_intermediate_metric() -> None:
    subnets = [
        {"mac_ratio": 0.5, "accuracy": 0.8},
        {"mac_ratio": 0.25, "accuracy": 0.6},
        {"mac_ratio": 1.3, "accuracy": 0.9},
    ]
    # A(x) = 0 below 0.25, 0.6 up to 0.5, 0.8 up to 1 (the 1.3 subnet never fits in 1).
    assert anytime_auc(subnets) == pytest.approx(0.6 * 0.25 + 0.8 * 0.5)
    assert intermediate_metric(
        {"iteration": 3, "accuracies": [0.5, 0.7], "mac_ratios": [0.2, 0.4], "budgets_met": [True, False]}
    )["default"] == pytest.approx(0.6)
    assert intermediate_metric({"iteration": 1, "budgets_met": [True, False, False, True]})["default"] == 0.5


# ------------------------------------------------------------------- option checks
def test_tuner_port_and_gpu_checks() -> None:
    assert check_tuner("tpe") == ("TPE", True)
    assert check_tuner("GridSearch") == ("GridSearch", False)
    with pytest.raises(ValueError, match="unknown tuner 'Hyperopt'"):
        check_tuner("Hyperopt")
    with pytest.raises(ValueError, match="does not fit a recipe search"):
        check_tuner("PPO")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        with pytest.raises(ValueError, match=f"port {port} is in use; pass --port"):
            check_port(port)
        with pytest.raises(ValueError, match="is in use"):
            check_port(port - 1, extra=True)
    assert parse_gpus("none") == [] and parse_gpus(None) == []
    assert parse_gpus("0, 2") == [0, 2]
    with pytest.raises(ValueError, match="comma-separated"):
        parse_gpus("first")
    with pytest.raises(ValueError, match="twice"):
        parse_gpus([1, 1])


def test_bad_input_fails_before_nni_starts(
    tmp_path: Path, tiny_recipe: Recipe, no_orphans: dict[int, psutil.Process]
) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        with pytest.raises(ValueError, match=f"port {port} is in use"):
            run_tune(tiny_recipe, SPACE, tmp_path / "a", TuneOptions(trials=2, port=port, gpus="none"))
    with pytest.raises(ValueError, match="unknown tuner"):
        run_tune(tiny_recipe, SPACE, tmp_path / "b", TuneOptions(tuner="Oracle", gpus="none"))
    with pytest.raises(SearchSpaceError):
        run_tune(
            tiny_recipe, {"beta": {"_type": "uniform", "_value": [0, 2]}}, tmp_path / "c", TuneOptions(gpus="none")
        )
    with pytest.raises(ValueError, match="needs machines"):
        run_tune(tiny_recipe, SPACE, tmp_path / "d", TuneOptions(training_service="remote", gpus="none"))
    if not parse_gpus("auto"):
        with pytest.raises(ValueError, match="no CUDA GPU"):
            run_tune(tiny_recipe, SPACE, tmp_path / "e", TuneOptions(gpus="0"))
    assert not no_orphans  # nothing was started


def test_cli_reports_bad_search_space_as_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump({**TINY, "tune": {"trials": 3, "tuner": "Random"}}), encoding="utf-8")
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({"beta": {"_type": "uniform", "_value": [0.5, 3.0]}}), encoding="utf-8")
    code = cli.main(["tune", str(recipe), "--search-space", str(space), "--out", str(tmp_path / "out")])
    assert code == 2
    assert "beta must be in (0, 1]" in capsys.readouterr().err
    loaded, tune = load_tune_recipe(recipe, ["construction.iterations=3"])
    assert tune == {"trials": 3, "tuner": "Random"} and loaded.construction.iterations == 3


def test_prepare_only_writes_the_trial_folder_for_clusters(
    tmp_path: Path, tiny_recipe: Recipe, no_orphans: dict[int, psutil.Process]
) -> None:
    result = run_tune(tiny_recipe, SPACE, tmp_path / "prep", TuneOptions(prepare_only=True, gpus="none"))
    assert result.status == "PREPARED"
    code = tmp_path / "prep" / "trial_code"
    assert load_recipe(code / "recipe.yaml") == tiny_recipe.with_overrides([])
    assert json.loads((tmp_path / "prep" / "search_space.json").read_text()) == SPACE
    assert (code / "trial_command.txt").read_text().strip() == (
        "python3 -m nni_steppingnet.nni.trial --recipe recipe.yaml --device auto"
    )
    assert not no_orphans


def test_sigterm_becomes_keyboard_interrupt() -> None:
    previous = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt):
        with _sigterm_as_interrupt():
            os.kill(os.getpid(), signal.SIGTERM)
            threading.Event().wait(5)
    assert signal.getsignal(signal.SIGTERM) is previous


# ------------------------------------------------------------------ real experiments
@pytest.mark.nni
@pytest.mark.parametrize("raised", [KeyboardInterrupt, RuntimeError])
def test_manager_is_stopped_on_ctrl_c_and_failure(
    tmp_path: Path, tiny_recipe: Recipe, raised: type[BaseException], no_orphans: dict[int, psutil.Process]
) -> None:
    calls = []

    def progress(line: str) -> None:  # runs while NNI's manager is up: Ctrl-C / a crash lands here
        calls.append(line)
        raise raised("stop here")

    with pytest.raises(raised, match="stop here"):
        run_tune(
            tiny_recipe,
            SPACE,
            tmp_path / "out",
            TuneOptions(trials=2, concurrency=1, port=free_port_pair(), gpus="none", poll_interval=0.5),
            progress=progress,
        )
    assert calls
    assert no_orphans  # the manager did start; the fixture checks that it is gone


@pytest.mark.nni
@pytest.mark.slow
def test_two_trial_local_experiment_pairs_metrics_with_parameters(
    tmp_path: Path, tiny_recipe: Recipe, no_orphans: dict[int, psutil.Process]
) -> None:
    out = tmp_path / "tune"
    lines: list[str] = []
    result = run_tune(
        tiny_recipe,
        SPACE,
        out,
        TuneOptions(
            trials=2,
            concurrency=2,
            tuner="Random",
            port=free_port_pair(),
            gpus="none",
            poll_interval=1.0,
            timeout_s=600,
        ),
        progress=lines.append,
    )
    assert result.status == "DONE"
    assert lines and lines[-1].startswith("done")
    assert [t["status"] for t in result.trials] == ["SUCCEEDED", "SUCCEEDED"]
    report = json.loads((out / "trials.json").read_text())
    assert report["trials"] == json.loads(json.dumps(result.trials))
    used = [json.dumps(t["params"], sort_keys=True) for t in result.trials]
    assert len(set(used)) == 2  # each parameter set NNI generated ran exactly once
    for trial in result.trials:
        final = trial["final"]
        params = trial["params"]
        # The trial echoes the parameters it received; they belong to the parameter id NNI
        # attached to its metric, and the run it reports on used exactly them.
        assert final["params"] == params
        assert trial["parameter_id"] is not None
        run_dir = Path(trial["log_path"]) / "run"
        assert json.loads((run_dir / "trial.json").read_text())["params"] == params
        assert json.loads((run_dir / "trial.json").read_text())["trial_id"] == trial["trial_id"]
        results = json.loads((run_dir / "results.json").read_text())
        recipe = results["recipe"]
        assert recipe == final["recipe"]
        assert recipe["construction"]["alpha_growth"] == params["alpha_growth"]
        assert recipe["construction"]["beta"] == params["beta"] == recipe["retraining"]["beta"]
        assert recipe["retraining"]["gamma"] == params["gamma"]
        assert recipe["construction"]["batches_per_iteration"] == params["m"]
        w1, w2 = params["budget_split_1"], params["budget_split_2"]
        assert recipe["steppingnet"]["budgets"] == pytest.approx([0.8 * w1 / (w1 + w2), 0.8])
        accuracies = [s["accuracy"] for s in results["subnets"]]
        assert final["accuracies"] == accuracies
        assert final["mean_accuracy"] == pytest.approx(sum(accuracies) / 2)
        assert final["auc"] == pytest.approx(anytime_auc(results["subnets"]))
        # One intermediate result per construction iteration, in order.
        history = results["construction"]["history"]
        assert [m["iteration"] for m in trial["intermediate"]] == [h["iteration"] for h in history]
    best = max(result.trials, key=lambda t: (t["default"], t["auc"]))
    assert result.best is not None and result.best["trial_id"] == best["trial_id"]
    best_recipe = load_recipe(out / "best.yaml")
    assert best_recipe.construction.alpha_growth == best["params"]["alpha_growth"]
    assert best_recipe.retraining.gamma == best["params"]["gamma"]
    table = (out / "trials.md").read_text()
    assert table == trials_markdown(result.trials, result.best)
    assert f"{best['trial_id']} (best)" in table
