"""NNI search spaces over a recipe's SteppingNet settings.

A search space is NNI's format, ``{key: {"_type": ..., "_value": [...]}}`` (YAML or JSON). Keys:

=================== ============================================================================
key                 recipe keys it sets
=================== ============================================================================
``alpha_growth``    ``construction.alpha_growth`` (eq. 3)
``beta``            ``construction.beta`` and ``retraining.beta`` (learning-rate suppression)
``gamma``           ``retraining.gamma`` (eq. 4)
``expansion``       ``steppingnet.expansion`` (width of the constructed network)
``m``               ``construction.batches_per_iteration``
``budget_scale``    every budget multiplied by it (the largest must stay <= 1)
``budget_split_i``  ``i = 1..N``, all N together: positive weights splitting the largest budget
                    ``B`` (the recipe's, times ``budget_scale``): budget ``i`` is
                    ``B * (w_1 + ... + w_i) / (w_1 + ... + w_N)`` (always strictly ascending)
``section.key``     any other recipe key by its dotted name, e.g. ``construction.lr``
=================== ============================================================================

:func:`validate_search_space` checks the keys, the ``_type`` and ``_value`` of every entry and the
ranges: every extreme value a key can take is applied to the recipe and must give a valid recipe.
:func:`params_to_overrides` turns the parameters NNI gives a trial into recipe overrides.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Mapping

import yaml

from ..config import Recipe, RecipeError, recipes_dir

__all__ = [
    "SearchSpaceError",
    "ALIASES",
    "NNI_TYPES",
    "load_search_space",
    "search_space_path",
    "validate_search_space",
    "params_to_overrides",
    "apply_params",
]

logger = logging.getLogger(__name__)

#: short search-space key -> the recipe keys it sets
ALIASES: dict[str, tuple[str, ...]] = {
    "alpha_growth": ("construction.alpha_growth",),
    "beta": ("construction.beta", "retraining.beta"),
    "gamma": ("retraining.gamma",),
    "expansion": ("steppingnet.expansion",),
    "m": ("construction.batches_per_iteration",),
}
BUDGET_SCALE = "budget_scale"
BUDGET_SPLIT = "budget_split_"

#: NNI's sampling types and the length of their ``_value``
NNI_TYPES: dict[str, tuple[int, ...]] = {
    "choice": (),
    "randint": (2,),
    "uniform": (2,),
    "quniform": (3,),
    "loguniform": (2,),
    "qloguniform": (3,),
    "normal": (2,),
    "qnormal": (3,),
    "lognormal": (2,),
    "qlognormal": (3,),
}
_UNBOUNDED = ("normal", "qnormal", "lognormal", "qlognormal")
# Recipe keys a search space may not set directly (they have dedicated keys or break the run).
_RESERVED = {
    "steppingnet.budgets": "use budget_scale / budget_split_1..N",
    "steppingnet.num_subnets": "the number of subnets is fixed by the recipe (budget_split_i depend on it)",
    "name": "the recipe name is not a hyperparameter",
    "description": "the description is not a hyperparameter",
}


class SearchSpaceError(ValueError):
    """A search space is invalid; the message names the key and what is allowed."""


def search_space_path(name_or_path: str | os.PathLike[str]) -> Path:
    """The file of a bundled search space (``search_space_<name>.yaml``) or a path."""
    text = str(name_or_path)
    if isinstance(name_or_path, os.PathLike) or text.endswith((".yaml", ".yml", ".json")) or os.sep in text:
        path = Path(name_or_path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"search space file not found: {path}")
        return path
    candidate = recipes_dir() / f"search_space_{text}.yaml"
    if candidate.is_file():
        return candidate
    known = sorted(p.stem[len("search_space_") :] for p in recipes_dir().glob("search_space_*.yaml"))
    raise SearchSpaceError(
        f"unknown search space {text!r}; bundled: {', '.join(known) or 'none'}. "
        "Pass a path ending in .yaml or .json for your own file"
    )


def load_search_space(name_or_path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a search space (bundled name, YAML or JSON file); not yet validated."""
    path = search_space_path(name_or_path)
    text = path.read_text(encoding="utf-8")
    try:
        raw = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise SearchSpaceError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {exc}") from exc
    if not isinstance(raw, dict):
        raise SearchSpaceError(f"{path}: a search space must be a mapping of keys to {{_type, _value}} entries")
    return raw


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _recipe_value(raw: Mapping[str, Any], dotted: str) -> Any:
    node: Any = raw
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def _targets(key: str) -> tuple[str, ...]:
    if key in ALIASES:
        return ALIASES[key]
    if key == BUDGET_SCALE or key.startswith(BUDGET_SPLIT):
        return ("steppingnet.budgets",)
    return (key,)


def _check_entry(key: str, entry: Any) -> tuple[str, list[Any]]:
    if not isinstance(entry, Mapping) or set(entry) != {"_type", "_value"}:
        raise SearchSpaceError(
            f"search space key {key!r}: each entry must be a mapping with exactly '_type' and '_value', got {entry!r}"
        )
    kind, value = entry["_type"], entry["_value"]
    if kind not in NNI_TYPES:
        raise SearchSpaceError(
            f"search space key {key!r}: unknown _type {kind!r}; NNI's types are {', '.join(NNI_TYPES)}"
        )
    if not isinstance(value, list) or not value:
        raise SearchSpaceError(f"search space key {key!r}: _value must be a non-empty list, got {value!r}")
    if kind == "choice":
        for v in value:
            if isinstance(v, (dict, list)):
                raise SearchSpaceError(f"search space key {key!r}: nested choices are not supported; give plain values")
        return kind, list(value)
    lengths = NNI_TYPES[kind]
    if len(value) not in lengths or not all(_is_number(v) for v in value):
        raise SearchSpaceError(
            f"search space key {key!r}: _type {kind} needs _value = "
            f"{'[low, high, q]' if lengths == (3,) else '[low, high]'} numbers, got {value!r}"
        )
    if kind in _UNBOUNDED:
        raise SearchSpaceError(
            f"search space key {key!r}: _type {kind} is unbounded; every SteppingNet "
            "setting has a valid range, so use uniform, quniform, loguniform, "
            "qloguniform, randint or choice with explicit bounds"
        )
    low, high = value[0], value[1]
    if not low < high:
        raise SearchSpaceError(f"search space key {key!r}: _type {kind} needs low < high, got {value!r}")
    if kind in ("loguniform", "qloguniform") and low <= 0:
        raise SearchSpaceError(f"search space key {key!r}: _type {kind} needs low > 0, got {value!r}")
    if kind in ("quniform", "qloguniform") and value[2] <= 0:
        raise SearchSpaceError(f"search space key {key!r}: _type {kind} needs q > 0, got {value!r}")
    if kind == "randint" and not all(float(v).is_integer() for v in value):
        raise SearchSpaceError(f"search space key {key!r}: randint needs integer bounds, got {value!r}")
    return kind, list(value)


def _extremes(kind: str, value: list[Any]) -> list[Any]:
    """The values a key can take that bound its range (all choices, or low and high)."""
    if kind == "choice":
        return list(value)
    if kind == "randint":
        return [int(value[0]), int(value[1]) - 1]
    return [value[0], value[1]]


def _integral(kind: str, value: list[Any]) -> bool:
    if kind == "choice":
        return all(_is_number(v) and float(v).is_integer() for v in value)
    if kind == "randint":
        return True
    if kind in ("quniform", "qloguniform"):
        return all(float(v).is_integer() for v in value)
    return False


def validate_search_space(space: Mapping[str, Any], recipe: Recipe) -> dict[str, Any]:
    """Check ``space`` against ``recipe`` and return a JSON-ready copy for NNI.

    Raises :class:`SearchSpaceError` naming the first bad key: unknown keys, keys set twice
    (``beta`` and ``construction.beta``), bad ``_type``/``_value``, unbounded distributions,
    non-integer ranges for integer settings, incomplete ``budget_split_i`` sets and any extreme
    value that makes the recipe invalid (e.g. ``beta`` above 1).
    """
    if not isinstance(space, Mapping) or not space:
        raise SearchSpaceError("the search space must be a non-empty mapping of keys to {_type, _value}")
    raw = recipe.to_dict()
    n = recipe.steppingnet.num_subnets
    seen: dict[str, str] = {}
    entries: dict[str, tuple[str, list[Any]]] = {}
    for key in space:
        if not isinstance(key, str) or not key:
            raise SearchSpaceError(f"search space keys must be non-empty strings, got {key!r}")
        kind, value = _check_entry(key, space[key])
        entries[key] = (kind, value)
        if key in _RESERVED:
            raise SearchSpaceError(f"search space key {key!r} cannot be searched: {_RESERVED[key]}")
        if key.startswith(BUDGET_SPLIT):
            suffix = key[len(BUDGET_SPLIT) :]
            if not suffix.isdigit() or not 1 <= int(suffix) <= n:
                raise SearchSpaceError(
                    f"search space key {key!r}: the recipe has {n} subnets, so the "
                    f"split keys are budget_split_1..budget_split_{n}"
                )
        elif key not in ALIASES and key != BUDGET_SCALE:
            if "." not in key and key != "seed":
                known = sorted(ALIASES) + [BUDGET_SCALE, f"{BUDGET_SPLIT}1..{n}"]
                raise SearchSpaceError(
                    f"unknown search space key {key!r}; use one of {', '.join(known)} "
                    "or a dotted recipe key such as construction.lr"
                )
            try:
                recipe.with_overrides([f"{key}={json.dumps(_recipe_value(raw, key))}"])
            except RecipeError as exc:
                raise SearchSpaceError(f"search space key {key!r} is not a recipe key: {exc}") from exc
        for target in _targets(key):
            if target == "steppingnet.budgets":
                continue
            if target in seen:
                raise SearchSpaceError(f"search space keys {seen[target]!r} and {key!r} both set {target}; keep one")
            seen[target] = key
    splits = sorted(k for k in entries if k.startswith(BUDGET_SPLIT))
    if splits and len(splits) != n:
        missing = [f"{BUDGET_SPLIT}{i}" for i in range(1, n + 1) if f"{BUDGET_SPLIT}{i}" not in entries]
        raise SearchSpaceError(f"budget split keys come as a set of {n} (one per subnet); missing {missing}")
    for key, (kind, value) in entries.items():
        if key.startswith(BUDGET_SPLIT) or key == BUDGET_SCALE:
            extremes = _extremes(kind, value)
            if not all(_is_number(v) and v > 0 for v in extremes):
                raise SearchSpaceError(f"search space key {key!r} must take positive numbers, got range {extremes}")
            if key == BUDGET_SCALE:
                top = max(extremes) * recipe.steppingnet.budgets[-1]
                if top > 1:
                    raise SearchSpaceError(
                        f"search space key {key!r}: {max(extremes)} x the largest budget "
                        f"{recipe.steppingnet.budgets[-1]} = {top:.4g} > 1; budgets are "
                        "fractions of the original network's MACs"
                    )
            continue
        targets = _targets(key)
        current = [_recipe_value(raw, t) for t in targets]
        if any(isinstance(c, int) and not isinstance(c, bool) for c in current) and not _integral(kind, value):
            raise SearchSpaceError(
                f"search space key {key!r} sets the integer {targets[0]}: use choice of "
                "integers, randint, or quniform/qloguniform with integer bounds and q"
            )
        for v in _extremes(kind, value):
            try:
                recipe.with_overrides(params_to_overrides({key: v}, recipe))
            except (RecipeError, ValueError) as exc:
                raise SearchSpaceError(
                    f"search space key {key!r}: the value {v!r} in its range gives an invalid recipe: {exc}"
                ) from exc
    return json.loads(json.dumps({k: {"_type": kind, "_value": value} for k, (kind, value) in entries.items()}))


def _format(value: Any) -> str:
    return json.dumps(value)


def params_to_overrides(params: Mapping[str, Any], recipe: Recipe) -> list[str]:
    """Recipe overrides (``"section.key=value"``) for the parameters NNI gave a trial."""
    if not isinstance(params, Mapping):
        raise ValueError(f"trial parameters must be a mapping, got {type(params).__name__}")
    raw = recipe.to_dict()
    out: list[str] = []
    for key, value in params.items():
        if key == BUDGET_SCALE or key.startswith(BUDGET_SPLIT):
            continue
        for target in _targets(key):
            current = _recipe_value(raw, target)
            if isinstance(current, int) and not isinstance(current, bool) and _is_number(value):
                if not float(value).is_integer():
                    raise ValueError(f"parameter {key!r} = {value!r} must be an integer ({target})")
                value = int(value)
            out.append(f"{target}={_format(value)}")
    budgets = _budgets(params, recipe)
    if budgets is not None:
        out.append(f"steppingnet.budgets={_format(budgets)}")
    return out


def _budgets(params: Mapping[str, Any], recipe: Recipe) -> list[float] | None:
    n = recipe.steppingnet.num_subnets
    base = list(recipe.steppingnet.budgets)
    scale = params.get(BUDGET_SCALE)
    splits = [params.get(f"{BUDGET_SPLIT}{i}") for i in range(1, n + 1)]
    given = [s for s in splits if s is not None]
    extra = [
        k for k in params if k.startswith(BUDGET_SPLIT) and k not in {f"{BUDGET_SPLIT}{i}" for i in range(1, n + 1)}
    ]
    if extra:
        raise ValueError(f"unknown budget split parameters {extra}; the recipe has {n} subnets")
    if scale is None and not given:
        return None
    if scale is not None and (not _is_number(scale) or scale <= 0):
        raise ValueError(f"{BUDGET_SCALE} must be a positive number, got {scale!r}")
    factor = 1.0 if scale is None else float(scale)
    if not given:
        return [b * factor for b in base]
    if len(given) != n or not all(_is_number(s) and s > 0 for s in given):
        raise ValueError(f"budget_split_1..{n} must all be given as positive numbers, got {splits}")
    top = base[-1] * factor
    total = float(sum(given))
    out: list[float] = []
    running = 0.0
    for s in given:
        running += float(s)
        out.append(top * running / total)
    out[-1] = top
    return out


def apply_params(recipe: Recipe, params: Mapping[str, Any]) -> Recipe:
    """``recipe`` with a trial's parameters applied (validated)."""
    return recipe.with_overrides(params_to_overrides(copy.deepcopy(dict(params)), recipe))
