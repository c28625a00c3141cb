"""Recipes: validation errors, overrides, name/path resolution, round trips (no training)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from nni_steppingnet.config import (
    Recipe,
    RecipeError,
    apply_overrides,
    describe_keys,
    dump_recipe,
    list_recipes,
    load_recipe,
    parse_override,
    recipe_descriptions,
    recipe_diff,
    recipe_path,
    recipes_dir,
)

REPO = Path(__file__).resolve().parents[1]

PAPER = {
    # name: (model, dataset, budgets, expansion, m)
    "lenet3c1l_cifar10": ("lenet3c1l", "cifar10", [0.10, 0.30, 0.50, 0.85], 1.8, 250),
    "lenet5_cifar10": ("lenet5", "cifar10", [0.15, 0.30, 0.60, 0.85], 2.0, 250),
    "vgg16_cifar100": ("vgg16_cifar", "cifar100", [0.20, 0.40, 0.50, 0.70], 1.8, 100),
}


def _minimal() -> dict:
    return {"name": "t", "steppingnet": {"num_subnets": 2, "budgets": [0.3, 0.7]}, "model": {"name": "lenet5"}}


def _error(raw: dict) -> str:
    with pytest.raises(RecipeError) as info:
        Recipe.from_dict(raw)
    return str(info.value)


# ------------------------------------------------------------------------------ validation
def test_unknown_key_suggests_the_close_one() -> None:
    raw = _minimal()
    raw["construction"] = {"bta": 0.8}
    assert "unknown key 'construction.bta' (did you mean 'beta'?)" in _error(raw)


def test_unknown_section_and_unknown_key_without_close_match() -> None:
    raw = _minimal()
    raw["constructon"] = {}
    assert "unknown key 'constructon' (did you mean 'construction'?)" in _error(raw)
    raw = _minimal()
    raw["data"] = {"zzzz": 1}
    message = _error(raw)
    assert "unknown key 'data.zzzz'" in message and "valid keys: name, root, batch_size" in message


@pytest.mark.parametrize(
    "budgets, fragment",
    [
        ([0.5, 0.3], "strictly ascending"),
        ([0.3, 0.3], "strictly ascending"),
        ([0.0, 0.5], "budgets[0] = 0.0 must be in (0, 1]"),
        ([0.5, 1.2], "budgets[1] = 1.2 must be in (0, 1]"),
    ],
)
def test_bad_budgets(budgets: list[float], fragment: str) -> None:
    raw = _minimal()
    raw["steppingnet"]["budgets"] = budgets
    assert fragment in _error(raw)


def test_num_subnets_must_match_budgets() -> None:
    raw = _minimal()
    raw["steppingnet"]["num_subnets"] = 3
    message = _error(raw)
    assert "num_subnets is 3 but steppingnet.budgets has 2 entries" in message


@pytest.mark.parametrize(
    "section, key, value, fragment",
    [
        ("teacher", "epochs", -1, "teacher.epochs must be >= 0, got -1"),
        ("retraining", "epochs", -2, "retraining.epochs must be >= 0, got -2"),
        ("data", "batch_size", "many", "data.batch_size must be an integer, got 'many'"),
        ("data", "batch_size", True, "data.batch_size must be an integer, got True"),
        ("construction", "beta", 1.5, "construction.beta must be in (0, 1], got 1.5"),
        ("construction", "beta", "high", "construction.beta must be a number, got 'high'"),
        ("retraining", "gamma", -0.1, "retraining.gamma must be in [0, 1], got -0.1"),
        ("steppingnet", "budgets", 0.5, "steppingnet.budgets must be a list, got 0.5"),
        ("data", "name", "imagenet", "data.name must be one of digits, mnist"),
        ("data", "download", "yes", "data.download must be true or false, got 'yes'"),
        ("model", "kwargs", [1], "model.kwargs must be a mapping with string keys"),
        ("data", "val_fraction", 1.0, "data.val_fraction must be in [0, 1), got 1.0"),
        ("steppingnet", "execution", "fast", "steppingnet.execution must be one of auto, sliced, masked, got 'fast'"),
        ("construction", "landing", "later", "construction.landing must be one of defer, now, ahead, got 'later'"),
        ("construction", "min_group_fraction", 2, "construction.min_group_fraction must be in [0, 1], got 2"),
        ("teacher", "optimizer", "adam", "teacher.optimizer must be one of sgd, adamw, got 'adam'"),
        ("construction", "criterion", "taylor", "construction.criterion must be one of gradient, class, noise"),
    ],
)
def test_wrong_types_and_ranges(section: str, key: str, value: object, fragment: str) -> None:
    raw = _minimal()
    raw.setdefault(section, {})[key] = value
    assert fragment in _error(raw)


def test_model_name_and_reserved_kwargs() -> None:
    raw = _minimal()
    raw["model"] = {"name": "lenet55"}
    assert "model.name 'lenet55' is not a timm model (did you mean 'lenet5'" in _error(raw)
    raw["model"] = {"name": "lenet5", "kwargs": {"num_classes": 3}}
    assert "model.kwargs.num_classes is set by the flow" in _error(raw)
    raw["model"] = {"name": "lenet5", "kwargs": {"pretrained": True}}
    assert "model.kwargs.pretrained is not supported" in _error(raw)


def test_teacher_needs_epochs_or_checkpoint() -> None:
    raw = _minimal()
    raw["teacher"] = {"epochs": 0}
    assert "teacher.epochs is 0 and teacher.checkpoint is null" in _error(raw)
    raw["teacher"] = {"epochs": 0, "checkpoint": "teacher.pt"}
    assert Recipe.from_dict(raw).teacher.checkpoint == "teacher.pt"


def test_coercions_and_defaults() -> None:
    raw = _minimal()
    raw["construction"] = {"prune_threshold": "1e-5", "lr": 1}  # YAML 1.1 reads 1e-5 as a string
    recipe = Recipe.from_dict(raw)
    assert recipe.construction.prune_threshold == 1e-5
    assert isinstance(recipe.construction.lr, float) and recipe.construction.lr == 1.0
    assert recipe.construction.alpha_growth == 1.5 and recipe.construction.beta == 0.9
    assert recipe.data.root is None and recipe.data.download is False
    assert Recipe.from_dict(recipe.to_dict()) == recipe


def test_name_defaults_to_the_file_stem(tmp_path: Path) -> None:
    raw = _minimal()
    del raw["name"]
    path = tmp_path / "my_recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert load_recipe(path).name == "my_recipe"
    with pytest.raises(RecipeError, match="needs a 'name'"):
        Recipe.from_dict(raw)


def test_yaml_errors_are_recipe_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(bad)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(RecipeError, match="the file is empty"):
        load_recipe(empty)
    listing = tmp_path / "list.yaml"
    listing.write_text("- 1\n- 2\n")
    with pytest.raises(RecipeError, match="must be a YAML mapping"):
        load_recipe(listing)


# ------------------------------------------------------------------------------- overrides
def test_parse_override_values_are_yaml() -> None:
    assert parse_override("construction.beta=0.8") == (["construction", "beta"], 0.8)
    assert parse_override("steppingnet.budgets=[0.2,0.4,0.6,0.8]") == (["steppingnet", "budgets"], [0.2, 0.4, 0.6, 0.8])
    assert parse_override("teacher.checkpoint=null") == (["teacher", "checkpoint"], None)
    assert parse_override("data.root=/data/x=y") == (["data", "root"], "/data/x=y")
    assert parse_override("data.download=true") == (["data", "download"], True)
    assert parse_override("seed=7") == (["seed"], 7)


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("construction.beta", "expected KEY=VALUE"),
        ("=0.8", "the key must be dotted names"),
        ("construction..beta=1", "the key must be dotted names"),
        ("construction.beta=[0.1,", "the value is not valid YAML"),
        ("constructin.beta=0.8", "unknown section 'constructin' (did you mean 'construction'?)"),
        ("construction.bta=0.8", "unknown key 'construction.bta' (did you mean 'beta'?)"),
        ("construction=3", "'construction' is a section"),
    ],
)
def test_bad_overrides(text: str, fragment: str) -> None:
    with pytest.raises(RecipeError) as info:
        load_recipe("quickstart", [text])
    assert fragment in str(info.value)


def test_overrides_apply_and_validate() -> None:
    recipe = load_recipe(
        "quickstart",
        ["construction.beta=0.8", "steppingnet.budgets=[0.2,0.4,0.6,0.8]", "model.kwargs.drop_rate=0.0", "seed=3"],
    )
    assert recipe.construction.beta == 0.8
    assert recipe.steppingnet.budgets == [0.2, 0.4, 0.6, 0.8]
    assert recipe.model.kwargs == {"drop_rate": 0.0}
    assert recipe.seed == 3
    with pytest.raises(RecipeError, match="num_subnets is 4 but steppingnet.budgets has 3 entries"):
        load_recipe("quickstart", ["steppingnet.budgets=[0.2,0.4,0.6]"])
    with pytest.raises(RecipeError, match="strictly ascending"):
        load_recipe("quickstart", ["steppingnet.budgets=[0.4,0.2,0.6,0.8]"])
    with pytest.raises(RecipeError, match="list of KEY=VALUE strings"):
        apply_overrides({}, "seed=1")  # type: ignore[arg-type]
    assert recipe.with_overrides(["construction.beta=0.5"]).construction.beta == 0.5


def test_recipe_diff_ignores_runtime_keys() -> None:
    a = load_recipe("quickstart").to_dict()
    b = load_recipe("quickstart", ["data.root=/elsewhere", "data.num_workers=2", "construction.beta=0.5"]).to_dict()
    assert recipe_diff(a, b) == ["construction.beta: 0.9 != 0.5"]


# ------------------------------------------------------------------------- names and paths
def test_bundled_recipes_resolve_from_any_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    names = list_recipes()
    expected = {
        "quickstart",
        "lenet3c1l_cifar10",
        "lenet5_cifar10",
        "vgg16_cifar100",
        "resnet18_cifar10",
        "lenet5_mnist",
    }
    assert expected <= set(names)
    for name in names:
        recipe = load_recipe(name)
        assert recipe.name == name
        assert recipe_path(name) == recipes_dir() / f"{name}.yaml"
    descriptions = recipe_descriptions()
    assert set(descriptions) == set(names) and all(descriptions[n] for n in names)
    with pytest.raises(RecipeError, match="unknown recipe 'quickstrat' \\(did you mean 'quickstart'\\?\\)"):
        load_recipe("quickstrat")


def test_path_to_a_yaml_file_works(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    recipe = load_recipe("quickstart", ["seed=5"])
    (tmp_path / "sub").mkdir()
    dump_recipe(recipe, tmp_path / "sub" / "mine.yaml")
    monkeypatch.chdir(tmp_path)
    again = load_recipe("sub/mine.yaml")
    assert again == recipe and again.seed == 5
    assert load_recipe(tmp_path / "sub" / "mine.yaml") == recipe
    with pytest.raises(FileNotFoundError, match="recipe file not found"):
        load_recipe("sub/missing.yaml")
    with pytest.raises(FileNotFoundError, match="for the bundled recipe write just 'quickstart'"):
        load_recipe("quickstart.yaml")


def test_search_space_files_are_not_recipes(tmp_path: Path) -> None:
    assert all((recipes_dir() / f"{n}.yaml").is_file() for n in list_recipes())
    for path in recipes_dir().glob("*.yaml"):
        raw = yaml.safe_load(path.read_text())
        assert (path.stem in list_recipes()) == ("steppingnet" in raw and "model" in raw)


def test_every_yaml_in_the_top_level_recipes_folder_is_a_recipe_or_search_space() -> None:
    from nni_steppingnet.nni.search_space import load_search_space, validate_search_space

    folder = REPO / "recipes"
    files = sorted(folder.glob("*.yaml"))
    assert files, f"no YAML files in {folder}"
    assert not (REPO / "nni_steppingnet" / "recipes").exists(), "recipes/ at the top level is the only copy"
    assert sorted(p.name for p in recipes_dir().glob("*.yaml")) == [p.name for p in files]
    names = list_recipes()
    for path in files:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        assert isinstance(raw, dict), f"{path.name}: not a YAML mapping"
        if path.stem.startswith("search_space_"):
            assert path.stem not in names
            space = load_search_space(path.stem[len("search_space_") :])
            assert space == raw
            validate_search_space(space, load_recipe("quickstart"))
        else:
            assert path.stem in names, f"{path.name} is neither a listed recipe nor a search space"
            assert load_recipe(path) == load_recipe(path.stem)


def test_recipes_dir_is_found_from_an_uninstalled_checkout(monkeypatch: pytest.MonkeyPatch) -> None:
    import nni_steppingnet.config as config

    if Path(config.__file__).resolve().parent.parent != REPO:
        pytest.skip("nni_steppingnet is imported from an installed copy, not this checkout")

    def missing(package: str) -> None:
        raise ModuleNotFoundError(f"No module named {package!r}")

    monkeypatch.setattr(config.resources, "files", missing)
    assert recipes_dir() == REPO / "recipes"
    assert "quickstart" in list_recipes()


def test_pyproject_lists_every_package_and_maps_the_recipes() -> None:
    tomllib = pytest.importorskip("tomllib")
    setuptools_config = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]
    on_disk = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "nni_steppingnet").rglob("__init__.py")}
    assert set(setuptools_config["packages"]) == on_disk | {"nni_steppingnet.recipes"}
    assert setuptools_config["package-dir"] == {"nni_steppingnet.recipes": "recipes"}
    assert setuptools_config["package-data"]["nni_steppingnet.recipes"] == ["*.yaml"]


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_recipes_use_section_iv_settings(name: str) -> None:
    model, dataset, budgets, expansion, m = PAPER[name]
    recipe = load_recipe(name)
    assert recipe.model.name == model and recipe.data.name == dataset
    assert recipe.steppingnet.budgets == budgets and recipe.steppingnet.num_subnets == 4
    assert recipe.steppingnet.expansion == expansion
    c = recipe.construction
    assert (c.batches_per_iteration, c.iterations, c.alpha_growth, c.beta, c.prune_threshold) == (
        m,
        300,
        1.5,
        0.9,
        1e-5,
    )
    assert recipe.retraining.gamma == 0.4 and recipe.retraining.beta == 0.9
    assert recipe.data.root is None and recipe.data.download is False


def test_mnist_recipe_has_no_hidden_data_root() -> None:
    recipe = load_recipe("lenet5_mnist")
    assert recipe.data.name == "mnist" and recipe.data.root is None


def test_describe_keys_covers_every_key_with_its_default() -> None:
    rows = {key: (default, doc) for key, default, doc in describe_keys()}
    flat = {
        f"{section}.{key}"
        for section, values in Recipe(name="x").to_dict().items()
        if isinstance(values, dict)
        for key in values
    }
    assert flat | {"name", "description", "seed"} == set(rows)
    assert rows["construction.beta"][0] == 0.9 and rows["construction.iterations"][0] == 300
    assert all(doc for _, doc in rows.values())


def test_tune_section_is_accepted_by_run_recipes(tmp_path: Path) -> None:
    """One recipe file serves `run` and `tune`: `run` ignores the tune section."""
    raw = load_recipe("quickstart").to_dict()
    raw["tune"] = {"trials": 4, "concurrency": 2}
    path = tmp_path / "with_tune.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    assert load_recipe(path).to_dict() == load_recipe("quickstart").to_dict() | {"name": raw["name"]}
