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
    "attach_engine": "engine",
    "PmaCallback": "callback",
    "PmaTrainer": "trainer",
    "PmaAdamW": "optim",
    "create_pma_optimizer": "optim",
    "gather_averaged_state_dict": "export",
    "merge": "merge",
    "plan_merge": "merge",
    "load_recipe": "merge",
    "MergeError": "merge",
    "MergeResult": "merge",
    "WeightedAverageForLLama": "merge",
    "push_folder_to_hub": "hub",
    "download_model": "hub",
    "HubPushError": "hub",
    "HubDownloadError": "hub",
    "SpikeConfig": "spike",
    "SpikeRecoveryCallback": "spike",
    "SpikeRecoveryError": "spike",
    "average_lora_adapters": "lora",
    "greedy_soup": "greedy_soup",
    "GreedySoupResult": "greedy_soup",
    "LearnedSoup": "soup",
    "fit_learned_soup": "soup",
    "Scope": "scope",
    "compute_scopes": "scope",
    "compare_scopes": "scope",
    "fuse_scopes": "scope",
    "format_scope_report": "scope",
    "warn_if_scopes_differ": "scope",
    "WsaConfig": "wsa",
    "WsaRegularizer": "wsa",
    "WsaCallback": "wsa",
    "add_wsa": "wsa",
    "merge_buffers": "buffers",
    "average_models": "buffers",
    "update_bn": "buffers",
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
    from .buffers import average_models, merge_buffers, update_bn
    from .callback import PmaCallback
    from .config import PmaArguments, PmaConfig
    from .engine import PmaEngine, attach_engine
    from .export import gather_averaged_state_dict
    from .greedy_soup import GreedySoupResult, greedy_soup
    from .hub import HubDownloadError, HubPushError, download_model, push_folder_to_hub
    from .lora import average_lora_adapters
    from .merge import MergeError, MergeResult, WeightedAverageForLLama, load_recipe, merge, plan_merge
    from .optim import PmaAdamW, create_pma_optimizer
    from .scope import Scope, compare_scopes, compute_scopes, format_scope_report, fuse_scopes, warn_if_scopes_differ
    from .soup import LearnedSoup, fit_learned_soup
    from .spike import SpikeConfig, SpikeRecoveryCallback, SpikeRecoveryError
    from .trainer import PmaTrainer
    from .wsa import WsaCallback, WsaConfig, WsaRegularizer, add_wsa
