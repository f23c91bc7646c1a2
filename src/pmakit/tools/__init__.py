"""Tools around a merge: sweeps of merge candidates and their scorers, and the FusionBench-style class.

Soups, LoRA averaging, buffers and weight scopes moved to `pmakit.soups`; spike recovery and WSA
(Trainer callbacks) to `pmakit.training`; the lm-eval scorer into the sweep package
(`pmakit.tools.sweep.lm_eval`). Their old module paths (``pmakit.tools.greedy_soup``, ...) still import,
with a ``FutureWarning``: the import returns the new module itself, so names, identity and monkeypatching
are unchanged. No file stays at the old paths, so git follows the renames.
"""

import importlib
import importlib.abc
import importlib.util
import sys
import warnings


MOVED = {
    "pmakit.tools.buffers": "pmakit.soups.buffers",
    "pmakit.tools.greedy_soup": "pmakit.soups.greedy",
    "pmakit.tools.learned_soup": "pmakit.soups.learned",
    "pmakit.tools.lora": "pmakit.soups.lora",
    "pmakit.tools.scope": "pmakit.soups.scopes",
    "pmakit.tools.weighted_sum": "pmakit.soups.weighted_sum",
    "pmakit.tools.spike": "pmakit.training.spike",
    "pmakit.tools.wsa": "pmakit.training.wsa",
    "pmakit.tools.lm_eval_scorer": "pmakit.tools.sweep.lm_eval",
}


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports an old path as the module it moved to (a ``FutureWarning`` naming the new path)."""

    def find_spec(self, fullname, path=None, target=None):
        return importlib.util.spec_from_loader(fullname, self) if fullname in MOVED else None

    def create_module(self, spec):
        return None  # a placeholder; exec_module puts the real module in its place in sys.modules

    def exec_module(self, module) -> None:
        new = MOVED[module.__name__]
        warnings.warn(
            f"`{module.__name__}` moved to `{new}`; import it from there (the old path goes in a future release).",
            FutureWarning,
            stacklevel=2,  # past the import machinery's frames: the line that imports the old path
        )
        sys.modules[module.__name__] = importlib.import_module(new)


if not any(isinstance(finder, _MovedModules) for finder in sys.meta_path):
    sys.meta_path.insert(0, _MovedModules())
