"""The offline merger: streaming, backbone-only, model card, Hub push.

``merge(...)`` is the Python API; :class:`WeightedAverageForLLama` the FusionBench-style class;
``load_recipe`` reads the YAML recipes that ``pmakit merge`` runs.
"""

import sys
import types

from .api import RECIPE_FILE, MergeResult, merge, plan_merge
from .classes import WeightedAverageForLLama
from .errors import MergeError
from .plan import DEFAULT_BACKBONE_PATTERNS, MergePlan
from .recipe import load_recipe
from .safetensors_io import parse_size
from .sources import (
    CheckpointInfo,
    ModelSource,
    is_run_dir,
    list_checkpoints,
    resolve_inputs,
    select_checkpoints,
)


__all__ = [
    "DEFAULT_BACKBONE_PATTERNS",
    "RECIPE_FILE",
    "CheckpointInfo",
    "MergeError",
    "MergePlan",
    "MergeResult",
    "ModelSource",
    "WeightedAverageForLLama",
    "is_run_dir",
    "list_checkpoints",
    "load_recipe",
    "merge",
    "parse_size",
    "plan_merge",
    "resolve_inputs",
    "select_checkpoints",
]


class _CallableModule(types.ModuleType):
    """Lets ``pmakit.merge(...)`` work whether ``pmakit.merge`` names this package or the function."""

    def __call__(self, *args, **kwargs) -> MergeResult:
        return merge(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
