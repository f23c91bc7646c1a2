"""pmakit: Pre-trained Model Averaging (PMA) for Hugging Face training, and checkpoint merges for the Hub.

Attributes are imported lazily so that the offline merger and the `pmakit` command do not pay
for importing torch and transformers.
"""

from importlib import import_module
from typing import TYPE_CHECKING


__version__ = "0.1.0"

_EXPORTS = {
    "ALGORITHMS": "averaging",
    "AveragingRule": "averaging",
    "fold_coefficients": "averaging",
    "merge_weights": "averaging",
    "PmaConfig": "config",
    "PmaArguments": "config",
    "PmaEngine": "engine",
    "PmaCallback": "callback",
    "PmaTrainer": "trainer",
    "PmaAdamW": "optim",
    "create_pma_optimizer": "optim",
    "merge": "merge",
    "MergeRecipe": "merge",
    "WeightedAverageForLLama": "merge",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'pmakit' has no attribute {name!r}")


def __dir__():
    return sorted(__all__)


if TYPE_CHECKING:
    from .averaging import ALGORITHMS, AveragingRule, fold_coefficients, merge_weights
    from .callback import PmaCallback
    from .config import PmaArguments, PmaConfig
    from .engine import PmaEngine
    from .merge import MergeRecipe, WeightedAverageForLLama, merge
    from .optim import PmaAdamW, create_pma_optimizer
    from .trainer import PmaTrainer
