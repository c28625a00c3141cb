"""Recipes: validated YAML descriptions of a whole SteppingNet run.

A recipe names the dataset, the ORIGINAL network, the subnets (count, MAC budgets as fractions of
the original network's MACs, expansion ratio of the network being constructed), the teacher, the
construction loop and the retraining. Bundled recipes live in the repository's top-level
``recipes/*.yaml`` (installed as the package ``nni_steppingnet.recipes``, see :func:`recipes_dir`)
and resolve by name from any working directory; a path to a YAML file works as well.

Every key is checked: an unknown key, a value of the wrong type or out of range is a
:class:`RecipeError` naming the key and what is allowed. ``overrides`` such as
``"construction.beta=0.8"`` replace single values; the value is parsed as YAML, so
``steppingnet.budgets=[0.2,0.4,0.6,0.8]`` gives a list and ``teacher.checkpoint=null`` gives None.

Relative paths in a recipe (``data.root``, ``teacher.checkpoint``) are resolved against the
current working directory, not the recipe file.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import logging
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import yaml

from .validation import (
    CONSTRUCTION_RULES,
    CRITERIA,
    DEFAULT_LANDING,
    EXECUTIONS,
    LANDINGS,
    NON_NEGATIVE,
    OPTIMIZERS,
    POSITIVE,
    UNIT_CLOSED,
    UNIT_CLOSED_OPEN,
    check_budgets,
)

__all__ = [
    "RecipeError",
    "Recipe",
    "DataSection",
    "ModelSection",
    "SteppingSection",
    "TeacherSection",
    "ConstructionSection",
    "RetrainingSection",
    "RUNTIME_KEYS",
    "load_recipe",
    "list_recipes",
    "recipe_descriptions",
    "recipe_path",
    "recipes_dir",
    "dump_recipe",
    "parse_override",
    "apply_overrides",
    "recipe_diff",
    "describe_keys",
]

logger = logging.getLogger(__name__)

#: Keys that may change between a run and its resumption (where data lives, how it is loaded).
RUNTIME_KEYS: frozenset[str] = frozenset({"description", "data.root", "data.download", "data.num_workers"})

_DATASETS = ("digits", "mnist", "cifar10", "cifar100", "imagefolder", "synthetic", "npz")
_AUGMENTATIONS = ("crop_flip", "none")
_LAYOUTS = ("auto", "nhwc", "nchw")
_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


class RecipeError(ValueError):
    """A recipe (file, name or override) is invalid; the message names the key and the fix."""


# ----------------------------------------------------------------------------- value checks
Check = Callable[[Any], "str | None"]


# Range checks come from nni_steppingnet.validation, shared with the library's config classes.
_positive = POSITIVE
_non_negative = NON_NEGATIVE
_unit_closed = UNIT_CLOSED
_fraction_below_one = UNIT_CLOSED_OPEN
_momentum = UNIT_CLOSED_OPEN  # SGD needs momentum < 1
_rule = CONSTRUCTION_RULES


def _optional_positive(value: Any) -> str | None:
    return None if value is None or value > 0 else "must be > 0 or null"


def _optional_non_negative(value: Any) -> str | None:
    return None if value is None or value >= 0 else "must be >= 0 or null (automatic)"


def _dataset_name(value: Any) -> str | None:
    return None if value in _DATASETS else f"must be one of {', '.join(_DATASETS)}"


def _criterion(value: Any) -> str | None:
    return None if value in CRITERIA else f"must be one of {', '.join(CRITERIA)}"


def _optimizer(value: Any) -> str | None:
    return None if value in OPTIMIZERS else f"must be one of {', '.join(OPTIMIZERS)}"


def _execution(value: Any) -> str | None:
    return None if value in EXECUTIONS else f"must be one of {', '.join(EXECUTIONS)}"


def _landing(value: Any) -> str | None:
    return None if value in LANDINGS else f"must be one of {', '.join(LANDINGS)}"


def _augmentation(value: Any) -> str | None:
    return None if value in _AUGMENTATIONS else f"must be one of {', '.join(_AUGMENTATIONS)} or null"


def _layout(value: Any) -> str | None:
    return None if value in _LAYOUTS else f"must be one of {', '.join(_LAYOUTS)}"


def _nonempty(value: Any) -> str | None:
    return None if value.strip() else "must not be empty"


def _at_least_one(value: Any) -> str | None:
    return None if value >= 1 else "must be >= 1"


_PLAIN_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


def _plain_name(value: Any) -> str | None:
    # The name becomes a folder (runs/<name>): a separator or '..' would put outputs elsewhere.
    if _PLAIN_NAME.match(value) and ".." not in value and value != ".":
        return None
    return (
        "must be a plain name of letters, digits, '-', '_' and '.' (no path separators, no '..'), "
        "because the run folder is runs/<name>"
    )


def _meta(check: Check | None = None, doc: str = "") -> dict[str, Any]:
    return {"check": check, "doc": doc}


# ----------------------------------------------------------------------------------- sections
@dataclass
class DataSection:
    """Where the images come from."""

    name: str = field(default="digits", metadata=_meta(_dataset_name, "dataset name"))
    root: str | None = field(
        default=None, metadata=_meta(None, "local dataset folder, or the .npz file for npz (null for digits/synthetic)")
    )
    batch_size: int = field(default=64, metadata=_meta(_at_least_one, "batch size of every loader"))
    num_workers: int | None = field(
        default=None, metadata=_meta(_optional_non_negative, "loader workers (null: 0 on CPU, up to 8 on CUDA)")
    )
    synthetic_size: int = field(default=512, metadata=_meta(_at_least_one, "training samples of the synthetic dataset"))
    img_size: int | None = field(default=None, metadata=_meta(_optional_positive, "resize images (null: native size)"))
    val_fraction: float = field(
        default=0.0,
        metadata=_meta(
            _fraction_below_one,
            "evaluate on this held-out share of the training set instead of the test set (for tuning)",
        ),
    )
    download: bool = field(default=False, metadata=_meta(None, "allow downloading the dataset (network access)"))
    augment: str | None = field(
        default=None,
        metadata=_meta(
            _augmentation,
            "training augmentation: crop_flip or none (null: crop_flip for cifar10/cifar100, none otherwise)",
        ),
    )
    layout: str = field(
        default="auto", metadata=_meta(_layout, "npz image layout: auto (inferred from the shape), nhwc or nchw")
    )
    train_subset: int | None = field(
        default=None,
        metadata=_meta(
            _optional_positive, "train on a seeded, stratified subset of about this many training images (null: all)"
        ),
    )


@dataclass
class ModelSection:
    """The ORIGINAL network (the teacher, and the MAC reference of the budgets)."""

    name: str = field(default="lenet3c1l", metadata=_meta(_nonempty, "timm model name"))
    width: float = field(default=1.0, metadata=_meta(_positive, "channel width factor of the original network"))
    kwargs: dict[str, Any] = field(default_factory=dict, metadata=_meta(None, "extra timm.create_model arguments"))


@dataclass
class SteppingSection:
    """The nested subnets."""

    num_subnets: int = field(default=4, metadata=_meta(_at_least_one, "number of subnets N"))
    budgets: list[float] = field(
        default_factory=lambda: [0.1, 0.3, 0.5, 0.85],
        metadata=_meta(None, "MAC budget of each subnet, fraction of the original's MACs"),
    )
    expansion: float = field(
        default=1.0, metadata=_meta(_positive, "width ratio of the constructed network to the original")
    )
    execution: str = field(
        default="auto",
        metadata=_meta(
            _execution,
            "how SteppingNet and the baselines train a subnet: sliced (its own channels only), masked "
            "(full width, masks), or auto (sliced where it checks equal to masked)",
        ),
    )


@dataclass
class TeacherSection:
    """The original network, trained first (or loaded) and used for distillation."""

    epochs: int = field(default=10, metadata=_meta(_non_negative, "training epochs (0 with a checkpoint)"))
    optimizer: str = field(
        default="sgd",
        metadata=_meta(
            _optimizer,
            "sgd (the paper's) or adamw (transformers train far better with it; momentum is then its beta1)",
        ),
    )
    lr: float = field(default=0.05, metadata=_meta(_positive, "learning rate (cosine schedule)"))
    momentum: float = field(default=0.9, metadata=_meta(_momentum, "SGD momentum (AdamW: beta1)"))
    weight_decay: float = field(default=5e-4, metadata=_meta(_non_negative, "weight decay (AdamW: decoupled)"))
    checkpoint: str | None = field(
        default=None, metadata=_meta(None, "local teacher weights to load instead of training")
    )


@dataclass
class ConstructionSection:
    """The Fig. 3 construction loop (paper Section III-A)."""

    batches_per_iteration: int = field(
        default=250, metadata=_meta(_rule["batches_per_iteration"], "m: training batches per subnet per iteration")
    )
    iterations: int = field(default=300, metadata=_meta(_rule["iterations"], "N_t: number of iterations"))
    alpha_growth: float = field(default=1.5, metadata=_meta(_rule["alpha_growth"], "alpha_{k+1} / alpha_k in eq. (3)"))
    beta: float = field(default=0.9, metadata=_meta(_rule["beta"], "learning-rate suppression of smaller subnets"))
    prune_threshold: float = field(
        default=1e-5, metadata=_meta(_rule["prune_threshold"], "unstructured pruning threshold")
    )
    lr: float = field(default=0.01, metadata=_meta(_rule["lr"], "SGD learning rate"))
    momentum: float = field(default=0.9, metadata=_meta(_rule["momentum"], "SGD momentum"))
    weight_decay: float = field(default=5e-4, metadata=_meta(_rule["weight_decay"], "SGD weight decay"))
    monitor_samples: int = field(
        default=1000, metadata=_meta(_non_negative, "test samples evaluated after every iteration (0: off)")
    )
    criterion: str = field(
        default="gradient",
        metadata=_meta(
            _criterion, "neuron criterion: gradient (paper eq. 2-3), class or noise (see nni_steppingnet.criteria)"
        ),
    )
    min_group_fraction: float = field(
        default=0.5,
        metadata=_meta(
            _rule["min_group_fraction"],
            "a neuron group keeps at least this fraction of the uniform width that meets a subnet's "
            "budget (0: only its last neuron)",
        ),
    )
    landing: str = field(
        default=DEFAULT_LANDING,
        metadata=_meta(
            _landing,
            "a subnet short of movable neurons that fit its budget: defer (stop short, finish in a "
            "later iteration), now (pass the budget by the cheapest neuron at once) or ahead (defer, and "
            "first move the most expensive group's neurons that the other groups cannot pay for)",
        ),
    )


@dataclass
class RetrainingSection:
    """Retraining with distillation (paper Section III-B, eq. 4)."""

    epochs: int = field(default=10, metadata=_meta(_non_negative, "retraining epochs"))
    gamma: float = field(default=0.4, metadata=_meta(_unit_closed, "weight of cross entropy vs distillation"))
    lr: float = field(default=0.01, metadata=_meta(_positive, "SGD learning rate (cosine schedule)"))
    beta: float = field(default=0.9, metadata=_meta(_rule["beta"], "learning-rate suppression of smaller subnets"))
    momentum: float = field(default=0.9, metadata=_meta(_momentum, "SGD momentum"))
    weight_decay: float = field(default=5e-4, metadata=_meta(_non_negative, "SGD weight decay"))
    temperature: float = field(default=1.0, metadata=_meta(_positive, "distillation temperature"))


_SECTIONS: dict[str, type] = {
    "data": DataSection,
    "model": ModelSection,
    "steppingnet": SteppingSection,
    "teacher": TeacherSection,
    "construction": ConstructionSection,
    "retraining": RetrainingSection,
}
_TOP_SCALARS: dict[str, tuple[Any, Check | None]] = {
    "name": (str, _plain_name),
    "description": (str, None),
    "seed": (int, _non_negative),
}


@dataclass
class Recipe:
    """A validated recipe; build one with :func:`load_recipe` or :meth:`Recipe.from_dict`."""

    name: str
    description: str = ""
    seed: int = 0
    data: DataSection = field(default_factory=DataSection)
    model: ModelSection = field(default_factory=ModelSection)
    steppingnet: SteppingSection = field(default_factory=SteppingSection)
    teacher: TeacherSection = field(default_factory=TeacherSection)
    construction: ConstructionSection = field(default_factory=ConstructionSection)
    retraining: RetrainingSection = field(default_factory=RetrainingSection)
    #: where the recipe came from (file path or "<dict>"); not part of :meth:`to_dict`
    source: str = field(default="<dict>", compare=False, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (YAML/JSON-ready); ``Recipe.from_dict(r.to_dict()) == r``."""
        out: dict[str, Any] = {"name": self.name, "description": self.description, "seed": self.seed}
        for section in _SECTIONS:
            out[section] = copy.deepcopy(dataclasses.asdict(getattr(self, section)))
        return out

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], source: str = "<dict>") -> Recipe:
        """Validate ``raw`` (as read from YAML) and build a recipe; raises :class:`RecipeError`."""
        return _build_recipe(raw, source)

    def with_overrides(self, overrides: Sequence[str]) -> Recipe:
        """A copy with ``key=value`` overrides applied (and validated)."""
        return Recipe.from_dict(apply_overrides(self.to_dict(), overrides), self.source)


# ----------------------------------------------------------------------------- validation
def _did_you_mean(key: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(key, list(choices), n=1, cutoff=0.6)
    if close:
        return f" (did you mean {close[0]!r}?)"
    return f" (valid keys: {', '.join(choices)})"


def _type_name(annotation: Any) -> str:
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(
        annotation, str(annotation)
    )


def _coerce(value: Any, annotation: Any, key: str, source: str) -> Any:
    """Check ``value`` against a field annotation, converting ints and numeric strings to float."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key, source)
    if origin is list:
        if not isinstance(value, list):
            raise RecipeError(f"{source}: {key} must be a list, got {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]", source) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise RecipeError(f"{source}: {key} must be a mapping with string keys, got {value!r}")
        return copy.deepcopy(value)
    if annotation is float:
        if isinstance(value, str) and _NUMBER.match(value.strip()):
            value = float(value)  # YAML 1.1 reads "1e-5" (no dot) as a string
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RecipeError(f"{source}: {key} must be a number, got {value!r}")
        value = float(value)
        if not math.isfinite(value):
            raise RecipeError(f"{source}: {key} must be finite, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise RecipeError(f"{source}: {key} must be an integer, got {value!r}")
        return value
    if annotation is bool:
        if not isinstance(value, bool):
            raise RecipeError(f"{source}: {key} must be true or false, got {value!r}")
        return value
    if annotation is str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)
        if not isinstance(value, str):
            raise RecipeError(f"{source}: {key} must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported annotation {annotation!r} for {key}")  # a bug in this module


def _build_section(cls: type, raw: Any, section: str, source: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise RecipeError(f"{source}: section {section!r} must be a mapping of keys to values, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            raise RecipeError(f"{source}: unknown key '{section}.{key}'{_did_you_mean(str(key), list(fields))}")
    values: dict[str, Any] = {}
    for name, fld in fields.items():
        if name not in raw:
            continue
        dotted = f"{section}.{name}"
        value = _coerce(raw[name], hints[name], dotted, source)
        check = fld.metadata.get("check")
        if check is not None and value is not None:
            problem = check(value)
            if problem:
                raise RecipeError(f"{source}: {dotted} {problem}, got {raw[name]!r}")
        values[name] = value
    return cls(**values)


def _build_recipe(raw: Mapping[str, Any], source: str) -> Recipe:
    if not isinstance(raw, Mapping):
        raise RecipeError(f"{source}: a recipe must be a YAML mapping of sections, got {type(raw).__name__}")
    # ``tune:`` belongs to ``nni-steppingnet tune``, which validates it; ``run`` ignores it so
    # one recipe file serves both commands.
    allowed = list(_TOP_SCALARS) + list(_SECTIONS) + ["tune"]
    for key in raw:
        if key not in allowed:
            raise RecipeError(f"{source}: unknown key '{key}'{_did_you_mean(str(key), allowed)}")
    top: dict[str, Any] = {}
    for key, (annotation, check) in _TOP_SCALARS.items():
        if key in raw:
            value = _coerce(raw[key], annotation, key, source)
            problem = check(value) if check is not None else None
            if problem:
                raise RecipeError(f"{source}: {key} {problem}, got {raw[key]!r}")
            top[key] = value
    if "name" not in top:
        stem = Path(source).stem if source not in ("<dict>", "") else ""
        if not stem:
            raise RecipeError(f"{source}: the recipe needs a 'name'")
        if _plain_name(stem):
            raise RecipeError(
                f"{source}: the recipe has no 'name' and its file name {stem!r} is not a plain "
                "name (letters, digits, '-', '_', '.'); add a 'name:' line"
            )
        top["name"] = stem
    sections = {name: _build_section(cls, raw.get(name), name, source) for name, cls in _SECTIONS.items()}
    recipe = Recipe(**top, **sections, source=source)
    _check_recipe(recipe)
    return recipe


def _check_recipe(recipe: Recipe) -> None:
    """Checks across keys."""
    source = recipe.source
    sn = recipe.steppingnet
    budgets = sn.budgets
    if len(budgets) != sn.num_subnets:
        raise RecipeError(
            f"{source}: steppingnet.num_subnets is {sn.num_subnets} but steppingnet.budgets "
            f"has {len(budgets)} entries {budgets}; give one budget per subnet"
        )
    try:  # the same check as ConstructionConfig's and the NNI pruner's
        check_budgets(budgets, name="steppingnet.budgets")
    except ValueError as exc:
        raise RecipeError(f"{source}: {exc}") from None
    if recipe.teacher.epochs == 0 and recipe.teacher.checkpoint is None:
        raise RecipeError(
            f"{source}: teacher.epochs is 0 and teacher.checkpoint is null; train the "
            "teacher (teacher.epochs >= 1) or give a local checkpoint file"
        )
    _check_model_name(recipe)
    if "pretrained" in recipe.model.kwargs:
        raise RecipeError(
            f"{source}: model.kwargs.pretrained is not supported (no network access at run "
            "time); put local weights in teacher.checkpoint instead"
        )
    for reserved in ("num_classes", "in_chans", "img_size", "width"):
        if reserved in recipe.model.kwargs:
            raise RecipeError(
                f"{source}: model.kwargs.{reserved} is set by the flow (num_classes, "
                "in_chans and img_size come from the data, width from model.width and "
                "steppingnet.expansion); remove it"
            )


def _check_model_name(recipe: Recipe) -> None:
    import timm

    from . import models  # noqa: F401  (registers the paper models with timm)

    name = recipe.model.name
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.7)
        hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
        raise RecipeError(
            f"{recipe.source}: model.name {name!r} is not a timm model{hint}; the paper "
            "models are lenet3c1l, lenet5 and vgg16_cifar"
        )


# ------------------------------------------------------------------------------- overrides
def parse_override(text: str) -> tuple[list[str], Any]:
    """``"a.b=value"`` -> (``["a", "b"]``, YAML-parsed value); raises :class:`RecipeError`."""
    if not isinstance(text, str) or "=" not in text:
        raise RecipeError(f"bad override {text!r}: expected KEY=VALUE, e.g. construction.beta=0.8")
    key, _, value_text = text.partition("=")
    key = key.strip()
    parts = key.split(".")
    if not key or any(not p or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", p) for p in parts):
        raise RecipeError(f"bad override {text!r}: the key must be dotted names like 'construction.beta' or 'seed'")
    try:
        value = yaml.safe_load(value_text) if value_text.strip() else None
    except yaml.YAMLError as exc:
        detail = " ".join(str(exc).split())
        raise RecipeError(f"bad override {text!r}: the value is not valid YAML ({detail})") from exc
    return parts, value


def apply_overrides(raw: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``key=value`` overrides to a raw recipe dict (validation happens afterwards)."""
    if isinstance(overrides, str):
        raise RecipeError(f"overrides must be a list of KEY=VALUE strings, got the string {overrides!r}")
    out = copy.deepcopy(dict(raw))
    for text in overrides:
        parts, value = parse_override(text)
        if len(parts) == 1:
            if parts[0] in _SECTIONS:
                raise RecipeError(
                    f"bad override {text!r}: {parts[0]!r} is a section; set one of its "
                    f"keys, e.g. {parts[0]}.{dataclasses.fields(_SECTIONS[parts[0]])[0].name}=..."
                )
            out[parts[0]] = value
            continue
        section = parts[0]
        if section not in _SECTIONS:
            allowed = list(_SECTIONS)
            raise RecipeError(f"bad override {text!r}: unknown section '{section}'{_did_you_mean(section, allowed)}")
        node = out.setdefault(section, {})
        if node is None:
            node = out[section] = {}
        if not isinstance(node, dict):
            raise RecipeError(f"bad override {text!r}: section {section!r} is not a mapping")
        fields = {f.name for f in dataclasses.fields(_SECTIONS[section])}
        if parts[1] not in fields:
            raise RecipeError(
                f"bad override {text!r}: unknown key '{section}.{parts[1]}'{_did_you_mean(parts[1], sorted(fields))}"
            )
        for part in parts[1:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise RecipeError(f"bad override {text!r}: '{part}' holds {child!r}, not a mapping")
            node = child
        node[parts[-1]] = value
    return out


# --------------------------------------------------------------------------- files and names
def recipes_dir() -> Path:
    """The folder of the bundled recipes: the repository's top-level ``recipes/`` folder.

    There is one copy. Installed (``pip install .`` or ``pip install -e .``), the folder is the
    package ``nni_steppingnet.recipes`` (pyproject.toml maps that package to ``recipes/``): inside
    the installed package, or the checkout's ``recipes/`` for an editable install. Imported from a
    checkout that is not installed (``PYTHONPATH=.``, or a stale editable install), the mapping is
    not active and the folder is found next to the package directory instead.
    """
    try:
        folder: Path | None = Path(str(resources.files("nni_steppingnet.recipes")))
    except (ImportError, TypeError):  # TypeError: a namespace package without a location
        folder = None
    if folder is not None and folder.is_dir():
        return folder
    checkout = Path(__file__).resolve().parent.parent / "recipes"
    if (checkout / "__init__.py").is_file() and (checkout.parent / "pyproject.toml").is_file():
        return checkout
    return folder if folder is not None else checkout


def _is_recipe_file(path: Path) -> bool:
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return False
    return isinstance(raw, dict) and "steppingnet" in raw and "model" in raw


def list_recipes() -> list[str]:
    """Names of the bundled recipes (search-space and other non-recipe YAML files excluded)."""
    folder = recipes_dir()
    if not folder.is_dir():
        return []
    return sorted(p.stem for p in folder.glob("*.yaml") if _is_recipe_file(p))


def recipe_descriptions() -> dict[str, str]:
    """Bundled recipe name -> its one-line description."""
    out: dict[str, str] = {}
    for name in list_recipes():
        raw = yaml.safe_load((recipes_dir() / f"{name}.yaml").read_text(encoding="utf-8"))
        description = raw.get("description") or ""
        out[name] = str(description).strip().splitlines()[0] if str(description).strip() else ""
    return out


def _looks_like_path(text: str) -> bool:
    return text.endswith((".yaml", ".yml")) or os.sep in text or (os.altsep is not None and os.altsep in text)


def recipe_path(name_or_path: str | os.PathLike[str]) -> Path:
    """The YAML file of a bundled recipe name, or ``name_or_path`` itself when it is a path."""
    if isinstance(name_or_path, os.PathLike) or _looks_like_path(str(name_or_path)):
        path = Path(name_or_path).expanduser()
        if not path.is_file():
            hint = ""
            if path.stem in list_recipes():
                hint = f"; for the bundled recipe write just {path.stem!r}"
            raise FileNotFoundError(f"recipe file not found: {path} (resolved against {Path.cwd()}){hint}")
        return path
    name = str(name_or_path)
    candidate = recipes_dir() / f"{name}.yaml"
    if candidate.is_file() and _is_recipe_file(candidate):
        return candidate
    names = list_recipes()
    close = difflib.get_close_matches(name, names, n=1, cutoff=0.5)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise RecipeError(
        f"unknown recipe {name!r}{hint}; bundled recipes: {', '.join(names) or 'none'}. "
        "Pass a path ending in .yaml to use your own file"
    )


def load_recipe(name_or_path: str | os.PathLike[str], overrides: Sequence[str] = ()) -> Recipe:
    """Load a bundled recipe by name (or a YAML file by path), apply overrides and validate."""
    path = recipe_path(name_or_path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path}: not valid YAML: {exc}") from exc
    if raw is None:
        raise RecipeError(f"{path}: the file is empty")
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: a recipe must be a YAML mapping of sections, got {type(raw).__name__}")
    raw = apply_overrides(raw, overrides)
    recipe = Recipe.from_dict(raw, source=str(path))
    logger.debug("loaded recipe %s from %s with overrides %s", recipe.name, path, list(overrides))
    return recipe


def dump_recipe(recipe: Recipe, path: str | os.PathLike[str]) -> Path:
    """Write ``recipe`` as YAML (atomically); it loads back equal with :func:`load_recipe`."""
    from .checkpoint import atomic_write_text

    text = yaml.safe_dump(recipe.to_dict(), sort_keys=False, default_flow_style=None)
    return atomic_write_text(path, text)


def recipe_diff(a: Mapping[str, Any], b: Mapping[str, Any], ignore: frozenset[str] = RUNTIME_KEYS) -> list[str]:
    """Dotted keys whose values differ between two recipe dicts (``ignore``d keys skipped)."""
    diffs: list[str] = []

    def walk(x: Any, y: Any, prefix: str) -> None:
        if prefix in ignore:
            return
        if isinstance(x, Mapping) and isinstance(y, Mapping) and prefix.count(".") < 1:
            for key in sorted(set(x) | set(y), key=str):
                walk(x.get(key), y.get(key), f"{prefix}.{key}" if prefix else str(key))
        elif x != y:
            diffs.append(f"{prefix}: {x!r} != {y!r}")

    walk(a, b, "")
    return diffs


def describe_keys() -> list[tuple[str, Any, str]]:
    """Every recipe key as ``(dotted key, default, one-line meaning)``, in file order."""
    rows: list[tuple[str, Any, str]] = [
        ("name", None, "recipe name (default: the file name)"),
        ("description", "", "one line shown by `nni-steppingnet recipes`"),
        ("seed", 0, "seeds Python, numpy, torch and the data order"),
    ]
    for section, cls in _SECTIONS.items():
        defaults = cls()
        for fld in dataclasses.fields(cls):
            rows.append((f"{section}.{fld.name}", getattr(defaults, fld.name), fld.metadata.get("doc", "")))
    return rows
