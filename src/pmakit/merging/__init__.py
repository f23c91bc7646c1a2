"""The offline merger: streaming, backbone-only, model card, Hub push.

``merge(...)`` is the Python API, its settings one `MergeOptions`; ``load_recipe`` reads the YAML
recipes that ``pmakit merge`` runs.
The FusionBench-style class lives in `pmakit.tools.fusionbench`.

Names are imported on first use, so that ``pmakit.merging.options`` (what the command line's parser
needs) loads without numpy and the fold.
"""

from importlib import import_module
from typing import TYPE_CHECKING


_EXPORTS = {
    "DEFAULT_BACKBONE_PATTERNS": "plan",
    "RECIPE_FILE": "merger",
    "CheckpointInfo": "sources",
    "MergeError": "..errors",
    "MergeOptions": "options",
    "MergePlan": "plan",
    "MergeResult": "merger",
    "ModelSource": "sources",
    "is_run_dir": "sources",
    "list_checkpoints": "sources",
    "load_recipe": "recipe",
    "merge": "merger",
    "parse_size": "..io.dtype_names",
    "plan_merge": "merger",
    "resolve_inputs": "sources",
    "select_checkpoints": "sources",
}

__all__ = [
    "DEFAULT_BACKBONE_PATTERNS",
    "RECIPE_FILE",
    "CheckpointInfo",
    "MergeError",
    "MergeOptions",
    "MergePlan",
    "MergeResult",
    "ModelSource",
    "is_run_dir",
    "list_checkpoints",
    "load_recipe",
    "merge",
    "parse_size",
    "plan_merge",
    "resolve_inputs",
    "select_checkpoints",
]


def __getattr__(name: str):
    if name in _EXPORTS:
        where = _EXPORTS[name]
        value = getattr(import_module(where if where.startswith("..") else f".{where}", __name__), name)
        globals()[name] = value
        return value
    from ..errors import brief

    raise AttributeError(f"module 'pmakit.merging' has no attribute {brief(name)}")


def __dir__():
    return sorted(__all__)


if TYPE_CHECKING:
    from ..errors import MergeError
    from ..io.dtype_names import parse_size
    from .merger import RECIPE_FILE, MergeResult, merge, plan_merge
    from .options import MergeOptions
    from .plan import DEFAULT_BACKBONE_PATTERNS, MergePlan
    from .recipe import load_recipe
    from .sources import (
        CheckpointInfo,
        ModelSource,
        is_run_dir,
        list_checkpoints,
        resolve_inputs,
        select_checkpoints,
    )
