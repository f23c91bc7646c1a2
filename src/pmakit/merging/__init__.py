"""The offline merger: streaming, backbone-only, model card, Hub push.

``merge(...)`` is the Python API, its settings one `MergeOptions`; ``load_recipe`` reads the YAML
recipes that ``pmakit merge`` runs.
The FusionBench-style class lives in `pmakit.tools.fusionbench`.
"""

from ..errors import MergeError
from ..io.safetensors import parse_size
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
