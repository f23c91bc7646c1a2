"""pmakit: Pre-trained Model Averaging (PMA) for Hugging Face training, and checkpoint merges for the Hub.

Attributes are imported lazily so that the offline merger and the `pmakit` command do not pay
for importing torch and transformers.
"""

from typing import TYPE_CHECKING

from .lazy import lazy_exports


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
    "SpikeConfig": "training.spike_config",
    "SpikeRecoveryCallback": "training.spike",
    "SpikeRecoveryError": "training.spike",
    "average_lora_adapters": "soups.lora",
    "greedy_soup": "soups.greedy",
    "GreedySoupResult": "soups.greedy",
    "LearnedSoup": "soups.learned",
    "fit_learned_soup": "soups.learned",
    "Scope": "soups.scopes",
    "compute_scopes": "soups.scopes",
    "compare_scopes": "soups.scopes",
    "fuse_scopes": "soups.scopes",
    "format_scope_report": "soups.scopes",
    "warn_on_scope_differences": "soups.scopes",
    "warn_if_scopes_differ": "soups.scopes",
    "WsaConfig": "training.wsa_config",
    "WsaRegularizer": "training.wsa",
    "WsaCallback": "training.wsa",
    "add_wsa": "training.wsa",
    "merge_buffers": "soups.buffers",
    "average_models": "soups.buffers",
    "update_bn": "soups.buffers",
    "sweep": "tools.sweep",
    "SweepResult": "tools.sweep",
    "text_loss_scorer": "tools.sweep",
    "trainer_scorer": "tools.sweep",
    "lm_eval_scorer": "tools.sweep.lm_eval",
}

__all__ = ["__version__", *_EXPORTS]


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, __all__)


if TYPE_CHECKING:
    from .averaging import ALGORITHMS, AveragingRule, fold_coefficients, merge_weights
    from .errors import HubError, InputError, MergeError, PmakitError, TrainingError
    from .io.hub import HubDownloadError, HubPushError, HubTarget, download_model, push_folder_to_hub
    from .merging import MergeOptions, MergeResult, load_recipe, merge, plan_merge
    from .online.config import PmaConfig
    from .online.engine import PmaEngine, attach_engine
    from .online.gather import gather_averaged_state_dict
    from .soups.buffers import average_models, merge_buffers, update_bn
    from .soups.greedy import GreedySoupResult, greedy_soup
    from .soups.learned import LearnedSoup, fit_learned_soup
    from .soups.lora import average_lora_adapters
    from .soups.scopes import (
        Scope,
        compare_scopes,
        compute_scopes,
        format_scope_report,
        fuse_scopes,
        warn_if_scopes_differ,
        warn_on_scope_differences,
    )
    from .tools.fusionbench import WeightedAverageForLLama
    from .tools.sweep import SweepResult, sweep, text_loss_scorer, trainer_scorer
    from .tools.sweep.lm_eval import lm_eval_scorer
    from .training.arguments import PmaArguments
    from .training.callback import PmaCallback
    from .training.optim import PmaAdamW, create_pma_optimizer, finish_pma
    from .training.spike import SpikeRecoveryCallback, SpikeRecoveryError
    from .training.spike_config import SpikeConfig
    from .training.trainer import PmaTrainer
    from .training.wsa import WsaCallback, WsaRegularizer, add_wsa
    from .training.wsa_config import WsaConfig
