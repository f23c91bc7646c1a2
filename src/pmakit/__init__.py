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
    "PmaConfig": "online.config",
    "PmaArguments": "training.arguments",
    "PmaEngine": "online.engine",
    "attach_engine": "online.engine",
    "PmaCallback": "training.callback",
    "PmaTrainer": "training.trainer",
    "PmaAdamW": "training.optim",
    "create_pma_optimizer": "training.optim",
    "finish_pma": "training.optim",
    "gather_averaged_state_dict": "online.gather",
    "merge": "merging",
    "plan_merge": "merging",
    "load_recipe": "merging",
    "PmakitError": "errors",
    "InputError": "errors",
    "MergeError": "errors",
    "HubError": "errors",
    "TrainingError": "errors",
    "MergeResult": "merging",
    "MergeOptions": "merging",
    "WeightedAverageForLLama": "tools.fusionbench",
    "push_folder_to_hub": "io.hub",
    "download_model": "io.hub",
    "HubPushError": "io.hub",
    "HubDownloadError": "io.hub",
    "HubTarget": "io.hub_target",
    "SpikeConfig": "tools.spike",
    "SpikeRecoveryCallback": "tools.spike",
    "SpikeRecoveryError": "tools.spike",
    "average_lora_adapters": "tools.lora",
    "greedy_soup": "tools.greedy_soup",
    "GreedySoupResult": "tools.greedy_soup",
    "LearnedSoup": "tools.learned_soup",
    "fit_learned_soup": "tools.learned_soup",
    "Scope": "tools.scope",
    "compute_scopes": "tools.scope",
    "compare_scopes": "tools.scope",
    "fuse_scopes": "tools.scope",
    "format_scope_report": "tools.scope",
    "warn_if_scopes_differ": "tools.scope",
    "WsaConfig": "tools.wsa",
    "WsaRegularizer": "tools.wsa",
    "WsaCallback": "tools.wsa",
    "add_wsa": "tools.wsa",
    "merge_buffers": "tools.buffers",
    "average_models": "tools.buffers",
    "update_bn": "tools.buffers",
    "sweep": "tools.sweep",
    "SweepResult": "tools.sweep",
    "text_loss_scorer": "tools.sweep",
    "trainer_scorer": "tools.sweep",
    "lm_eval_scorer": "tools.lm_eval_scorer",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    from .errors import brief

    raise AttributeError(f"module 'pmakit' has no attribute {brief(name)}")


def __dir__():
    return sorted(__all__)


if TYPE_CHECKING:
    from .averaging import ALGORITHMS, AveragingRule, fold_coefficients, merge_weights
    from .errors import HubError, InputError, MergeError, PmakitError, TrainingError
    from .io.hub import HubDownloadError, HubPushError, HubTarget, download_model, push_folder_to_hub
    from .merging import MergeOptions, MergeResult, load_recipe, merge, plan_merge
    from .online.config import PmaConfig
    from .online.engine import PmaEngine, attach_engine
    from .online.gather import gather_averaged_state_dict
    from .tools.buffers import average_models, merge_buffers, update_bn
    from .tools.fusionbench import WeightedAverageForLLama
    from .tools.greedy_soup import GreedySoupResult, greedy_soup
    from .tools.learned_soup import LearnedSoup, fit_learned_soup
    from .tools.lm_eval_scorer import lm_eval_scorer
    from .tools.lora import average_lora_adapters
    from .tools.scope import (
        Scope,
        compare_scopes,
        compute_scopes,
        format_scope_report,
        fuse_scopes,
        warn_if_scopes_differ,
    )
    from .tools.spike import SpikeConfig, SpikeRecoveryCallback, SpikeRecoveryError
    from .tools.sweep import SweepResult, sweep, text_loss_scorer, trainer_scorer
    from .tools.wsa import WsaCallback, WsaConfig, WsaRegularizer, add_wsa
    from .training.arguments import PmaArguments
    from .training.callback import PmaCallback
    from .training.optim import PmaAdamW, create_pma_optimizer, finish_pma
    from .training.trainer import PmaTrainer
