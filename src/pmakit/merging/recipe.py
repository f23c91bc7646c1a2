"""YAML recipes: the keys are the keyword arguments of :func:`pmakit.merge.merge`.

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
``pmakit merge`` runs again to reproduce it.
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path

import yaml

from ..errors import MergeError
from .merger import merge


__all__ = ["RECIPE_KEYS", "load_recipe"]

_SKIP = {"progress", "dry_run", "token", "block_elements", "reader"}
RECIPE_KEYS: tuple[str, ...] = tuple(p for p in inspect.signature(merge).parameters if p not in _SKIP)
_PUSH_KEYS = {
    "repo_id": "push_to_hub",
    "private": "private",
    "revision": "revision",
    "commit_message": "commit_message",
}


def load_recipe(path: str | os.PathLike) -> dict:
    """Read a recipe file into keyword arguments for :func:`merge`; unknown keys are refused by name."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise MergeError(f"Recipe {path} does not exist.") from e
    except yaml.YAMLError as e:
        raise MergeError(f"Recipe {path} is not valid YAML: {str(e).splitlines()[0]}") from e
    if not isinstance(data, dict):
        raise MergeError(f"Recipe {path} must be a mapping of settings, got {type(data).__name__}.")
    kwargs = dict(data)
    push = kwargs.get("push_to_hub")
    if isinstance(push, dict):
        unknown = sorted(set(push) - set(_PUSH_KEYS))
        if unknown or "repo_id" not in push:
            raise MergeError(
                f"Recipe `push_to_hub` takes {', '.join(_PUSH_KEYS)} (repo_id required), got {sorted(push)}."
            )
        for key, value in push.items():
            kwargs[_PUSH_KEYS[key]] = value
    unknown = sorted(set(kwargs) - set(RECIPE_KEYS))
    if unknown:
        raise MergeError(
            f"Unknown recipe key(s) {', '.join(unknown)} in {path}; valid keys: {', '.join(RECIPE_KEYS)}."
        )
    if isinstance(kwargs.get("models"), str):
        kwargs["models"] = [kwargs["models"]]
    return kwargs
