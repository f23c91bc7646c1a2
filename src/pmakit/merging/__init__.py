"""The offline merger: streaming, backbone-only, model card, Hub push.

``merge(...)`` is the Python API, its settings one `MergeOptions`; ``load_recipe`` reads the YAML
recipes that ``pmakit merge`` runs.
The FusionBench-style class lives in `pmakit.tools.fusionbench`.

Names are imported on first use, so that ``pmakit.merging.options`` (what the command line's parser
needs) loads without numpy and the fold.
"""

from typing import TYPE_CHECKING

from ..lazy import lazy_exports


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


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, __all__)


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
