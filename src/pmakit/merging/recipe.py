"""YAML recipes: the keys are the fields of :class:`MergeOptions`, plus ``models``/``run_dir``/``output``.

Example::

    run_dir: runs/pretrain        # or: models: [path-or-owner/name@rev, ...]
    last: 10
    every: 1000
    algo: ema
    alpha: 0.2
    output: merged/pma-ema
    push_to_hub:
      repo_id: me/model-pma
      private: true

Every merged folder holds its own ``pmakit_recipe.yaml``, with the inputs resolved, which
``pmakit merge`` runs again to reproduce it (``-o`` says where: it records no output). Paths
that start with ``./`` or ``../`` are relative to the recipe file, as the merged folder's
recipe writes its local inputs; other relative paths are relative to the working directory;
``~`` is the home folder.

mergekit's linear recipes are read as they are, so a mergekit user points pmakit at the same file::

    merge_method: linear
    base_model: org/base           # not averaged; gives config and tokenizer
    models:
      - model: org/model-a
        parameters: {weight: 0.3}
      - model: org/model-b
        parameters: {weight: 0.7}
    parameters: {normalize: true}  # a top-level `weight` is the default of every model
    dtype: bfloat16                # the output dtype (pmakit always accumulates in float32 or float64)
    tokenizer_source: base         # base, or one of the models (the first or the last)

Other merge methods (slerp, ties, dare...) and per-tensor or per-layer parameters are refused by name.

YAML aliases (``*name``) are refused: a kilobyte of nested aliases expands to billions of values
("billion laughs"), and no recipe needs them. Values shown in errors are bounded (:func:`~pmakit.errors.brief`).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import yaml

from ..deprecation import warn_deprecated
from ..errors import InputError, MergeError, brief
from ..io.hub_target import HubTarget
from .options import MergeOptions, recipe_fields


__all__ = ["INPUT_KEYS", "RECIPE_KEYS", "load_recipe", "options_from_recipe", "with_hub_flags"]

INPUT_KEYS: tuple[str, ...] = ("models", "run_dir", "output")
RECIPE_KEYS: tuple[str, ...] = (*INPUT_KEYS, *(f.name for f in recipe_fields()))
_PUSH_KEYS = ("repo_id", "private", "revision", "commit_message")
_LOOSE_PUSH_KEYS = ("private", "revision", "commit_message")  # the command line's flags; old top-level recipe keys
_MERGEKIT_KEYS = frozenset({"merge_method", "parameters", "dtype", "tokenizer_source", "tokenizer"})


def load_recipe(path: str | os.PathLike) -> dict[str, Any]:
    """Read a recipe file (pmakit's or a mergekit linear recipe) into keyword arguments for :func:`merge`.

    Args:
        path: the YAML file.

    Returns:
        ``models``/``run_dir``/``output`` when given, and the settings, all checked by `MergeOptions`.

    Raises:
        MergeError: the file is missing or not YAML, a key is unknown, a value has the wrong type
            (named), or a mergekit recipe uses a method or parameter pmakit does not support.
    """
    path = Path(path)
    data = _read_yaml(path)
    try:
        if _is_mergekit(data):
            data = _from_mergekit(data)
        inputs, settings = _split(data)
        MergeOptions(**settings)  # validate every value now, with the file's name in the message
    except MergeError as e:
        raise MergeError(f"Recipe {path}: {e}") from None
    return _relative_to_recipe({**inputs, **settings}, path.parent)


def _relative_to_recipe(kwargs: dict[str, Any], folder: Path) -> dict[str, Any]:
    """Paths written ``./x`` or ``../x`` are relative to the recipe file (others to the working directory).

    A merged folder's own recipe names its local inputs that way, so it runs from any directory.
    """

    def resolve(value: Any) -> Any:
        if isinstance(value, str) and value.startswith(("./", "../")):
            return str(folder / value)
        return value

    for key in ("run_dir", "output", "base_model"):
        if key in kwargs:
            kwargs[key] = resolve(kwargs[key])
    if isinstance(kwargs.get("models"), list):
        kwargs["models"] = [resolve(m) for m in kwargs["models"]]
    return kwargs


def options_from_recipe(path: str | os.PathLike) -> tuple[dict[str, Any], MergeOptions]:
    """The inputs (``models``/``run_dir``/``output``) and the `MergeOptions` of a recipe file."""
    kwargs = load_recipe(path)
    inputs = {k: kwargs.pop(k) for k in INPUT_KEYS if k in kwargs}
    return inputs, MergeOptions(**kwargs)


class _NoAliasLoader(yaml.SafeLoader):
    """``yaml.safe_load`` without aliases: each value is written out once, so its size is the file's."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark
            raise yaml.composer.ComposerError(
                None, None, "YAML aliases (*name) are not allowed in a recipe; write the value out", mark
            )
        return super().compose_node(parent, index)


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_NoAliasLoader)  # noqa: S506 - a SafeLoader
    except FileNotFoundError as e:
        raise MergeError(f"Recipe {path} does not exist.") from e
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        why = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise MergeError(f"Recipe {path} is not valid YAML{where}: {why}") from e
    if not isinstance(data, dict):
        raise MergeError(f"Recipe {path} must be a mapping of settings, got {type(data).__name__}.")
    return data


def _split(data: dict) -> tuple[dict, dict]:
    """Separate the inputs from the settings; ``push_to_hub`` becomes one `HubTarget`; refuse unknown keys."""
    data = dict(data)
    _fold_push(data)
    unknown = sorted(set(data) - set(RECIPE_KEYS), key=str)
    if unknown:
        raise MergeError(
            f"Unknown recipe key(s) {', '.join(map(str, unknown))}; valid keys: {', '.join(RECIPE_KEYS)}."
        )
    if "models" in data and "kind" in data and data["kind"] != "pma-state":
        raise MergeError(
            f"`kind: {data['kind']}` selects the subfolders of a `run_dir`; it has no effect on `models` "
            "(only `kind: pma-state` applies to listed folders): remove `kind` or give `run_dir`."
        )
    inputs = {k: data.pop(k) for k in INPUT_KEYS if k in data}
    _check_inputs(inputs)
    return inputs, data


def _fold_push(data: dict) -> None:
    """``push_to_hub`` (a repo id or a mapping) as one `HubTarget`; old top-level push keys fold in, with a warning."""
    loose = {k: data.pop(k) for k in _LOOSE_PUSH_KEYS if k in data}
    for key in loose:
        warn_deprecated(f"The top-level recipe key `{key}`", f"write it under `push_to_hub:` ({key}: ...)")
    push = data.get("push_to_hub")
    push = {"repo_id": push} if isinstance(push, str) else dict(push) if isinstance(push, dict) else None
    if push is None:
        return  # no push (loose keys alone never pushed), or a value MergeOptions names
    if sorted(set(push) - set(_PUSH_KEYS)) or "repo_id" not in push:
        raise MergeError(
            f"`push_to_hub` takes {', '.join(_PUSH_KEYS)} (repo_id required), got {brief(sorted(map(str, push)))}."
        )
    twice = sorted(set(loose) & set(push))
    if twice:
        raise MergeError(f"`{twice[0]}` is given under `push_to_hub:` and at the top level; give it once.")
    data["push_to_hub"] = _hub_target(push.pop("repo_id"), {**push, **loose})


def _hub_target(repo: str | HubTarget, settings: dict) -> HubTarget:
    """``repo`` (a repo id or a target) with ``settings`` on top, as one `HubTarget`."""
    try:
        return dataclasses.replace(repo if isinstance(repo, HubTarget) else HubTarget(repo), **settings)
    except InputError as e:
        raise MergeError(f"`push_to_hub`: {e}") from None


def with_hub_flags(settings: dict[str, Any]) -> dict[str, Any]:
    """``settings`` with ``private``/``revision``/``commit_message`` (the command line's flags) folded into
    ``push_to_hub``: one `HubTarget`, the flags over a recipe's values. Without a push the flags do nothing."""
    settings = dict(settings)
    flags = {k: settings.pop(k) for k in _LOOSE_PUSH_KEYS if k in settings}
    if settings.get("push_to_hub") is not None:
        settings["push_to_hub"] = _hub_target(settings["push_to_hub"], flags)
    return settings


def _check_inputs(inputs: dict) -> None:
    if isinstance(inputs.get("models"), str):
        inputs["models"] = [inputs["models"]]
    models = inputs.get("models")
    if models is not None and not (isinstance(models, list) and all(isinstance(m, str) for m in models)):
        raise MergeError(f"`models` must be a list of folders or Hub ids, got {brief(models)}.")
    for key in ("run_dir", "output"):
        if key in inputs and inputs[key] is not None and not isinstance(inputs[key], str):
            raise MergeError(f"`{key}` must be a folder path, got {brief(inputs[key])}.")


def _is_mergekit(data: dict) -> bool:
    models = data.get("models")
    listed = isinstance(models, list) and any(isinstance(m, dict) for m in models)
    return listed or bool(_MERGEKIT_KEYS & set(data))


def _from_mergekit(data: dict) -> dict:
    """A mergekit linear recipe as pmakit settings: weights, normalize, out_dtype, base, config source."""
    data = dict(data)
    method = data.pop("merge_method", "linear")
    if method != "linear":
        raise MergeError(
            f"mergekit merge_method {brief(method)} is not supported; pmakit reads mergekit recipes with "
            "`merge_method: linear` (weighted averages) only."
        )
    for key in ("slices", "modules"):
        if key in data:
            raise MergeError(f"mergekit `{key}` is not supported; pmakit merges whole models (use `models`).")
    defaults = _mapping(data.pop("parameters", None) or {}, "parameters")
    normalize = defaults.pop("normalize", True)
    default_weight = defaults.pop("weight", None)
    _refuse_parameters(defaults, "parameters")
    models, weights = _mergekit_models(data.pop("models", None), default_weight)
    out = {"models": models, "weights": weights, "normalize": normalize}
    dtype = data.pop("dtype", None)
    if dtype is not None and "out_dtype" not in data:
        out["out_dtype"] = dtype
    source = _tokenizer_source(data)
    out.update(data)
    if "config_source" not in out:
        out["config_source"] = _config_source(source, models, out.get("base_model"))
    return out


def _mapping(value: Any, key: str) -> dict:
    if not isinstance(value, dict):
        raise MergeError(f"`{key}` must be a mapping, got {brief(value)}.")
    return dict(value)


def _refuse_parameters(parameters: dict, where: str) -> None:
    if parameters:
        raise MergeError(
            f"mergekit parameter(s) {', '.join(map(str, parameters))} in `{where}` are not supported by the "
            "linear merge of pmakit (it takes `weight` and `normalize`)."
        )


def _mergekit_models(entries: Any, default_weight: Any) -> tuple[list[str], list]:
    """``[{model: ..., parameters: {weight: ...}}, ...]`` as the models and their weights, in order."""
    if not isinstance(entries, list) or not entries:
        raise MergeError("`models` must be a non-empty list of `{model: ..., parameters: {weight: ...}}`.")
    models, weights = [], []
    for i, entry in enumerate(entries):
        entry = {"model": entry} if isinstance(entry, str) else _mapping(entry, f"models[{i}]")
        name = entry.pop("model", None)
        if not isinstance(name, str):
            raise MergeError(f"`models[{i}].model` must be a folder or Hub id, got {brief(name)}.")
        parameters = _mapping(entry.pop("parameters", None) or {}, f"models[{i}].parameters")
        weight = parameters.pop("weight", default_weight)
        _refuse_parameters(parameters, f"models[{i}].parameters")
        if entry:
            raise MergeError(f"Unknown key(s) {', '.join(map(str, entry))} in `models[{i}]` ({name}).")
        if weight is None:
            raise MergeError(f"`models[{i}]` ({name}) has no `parameters.weight` (and no default weight).")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise MergeError(
                f"`models[{i}].parameters.weight` ({name}) must be a number; per-tensor or per-layer "
                f"weights are not supported, got {brief(weight)}."
            )
        models.append(name)
        weights.append(weight)
    return models, weights


def _tokenizer_source(data: dict) -> Any:
    """mergekit's ``tokenizer_source``, or ``tokenizer.source`` (its newer form), popped from ``data``."""
    source = data.pop("tokenizer_source", None)
    tokenizer = data.pop("tokenizer", None)
    if tokenizer is not None:
        tokenizer = _mapping(tokenizer, "tokenizer")
        source = tokenizer.pop("source", source)
        if tokenizer:
            raise MergeError(f"mergekit `tokenizer` key(s) {', '.join(map(str, tokenizer))} are not supported.")
    return source


def _config_source(source: Any, models: list[str], base: Any) -> str:
    """The input that gives config and tokenizer: mergekit's default is the base, else the first model."""
    if source is None or source == "base":
        if source == "base" and base is None:
            raise MergeError("`tokenizer_source: base` needs a `base_model`.")
        return "base" if base is not None else "first"
    if source == base:
        return "base"
    if source == models[0]:
        return "first"
    if source == models[-1]:
        return "newest"
    raise MergeError(
        f"`tokenizer_source: {source}` is not supported: pmakit copies the config and tokenizer of one input "
        "(base, the first or the last model); it does not build union vocabularies or take other donors."
    )
