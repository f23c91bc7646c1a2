"""`PmaArguments`: `TrainingArguments` plus every PMA setting, each prefixed `pma_`.

`HfArgumentParser` then reads them from the command line, JSON and YAML like any other training
argument. The PMA, WSA and spike-recovery fields keep the defaults and help of `PmaConfig`,
`WsaConfig` and `SpikeConfig`, and are validated when the arguments are built.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from transformers import TrainingArguments

from ..errors import InputError
from ..online.config import PMA_FIELDS, PMA_HELP, PmaConfig, validate_pma_settings
from ..tools.spike import SPIKE_FIELDS, SPIKE_HELP, SpikeConfig, validate_spike_settings
from ..tools.wsa import WSA_FIELDS, WSA_HELP, WsaConfig, validate_wsa_settings


__all__ = ["PmaArguments"]


def _meta(name: str) -> dict:
    return {"help": PMA_HELP[name]}


def _spike_meta(name: str) -> dict:
    return {"help": "Spike recovery: " + SPIKE_HELP[name]}


def _wsa_meta(name: str) -> dict:
    return {"help": "WSA: " + WSA_HELP[name]}


def _deepspeed_optimizer_section(deepspeed: object) -> bool:
    """Whether a DeepSpeed config (dict, JSON string or path) brings its own optimizer."""
    config = deepspeed
    if isinstance(config, str):
        if os.path.isfile(config):
            with open(config, encoding="utf-8") as fh:
                config = json.load(fh)
        elif config.lstrip().startswith("{"):
            config = json.loads(config)
        else:
            return False
    return isinstance(config, dict) and "optimizer" in config


@dataclass
class PmaArguments(TrainingArguments):
    """`TrainingArguments` plus the PMA settings, each prefixed `pma_` (see `PmaConfig`).

    Example:

    ```python
    args = PmaArguments(output_dir="out", max_steps=5000, pma_interleave_step=100, pma_fused_num=10)
    trainer = PmaTrainer(model=model, args=args, train_dataset=ds)
    ```

    The ``pma_*`` fields (PMA, ``pma_wsa_*`` WSA and ``pma_spike_*`` spike recovery) are listed with
    their defaults in the docs' settings tables, generated from their ``help`` metadata.

    Raises:
        ValueError: a ``pma_*`` setting is out of range (the message names the ``pma_`` field), or a
            setting of `TrainingArguments` is invalid.
    """

    pma_fused_algo: str = field(default="sma", metadata=_meta("fused_algo"))
    pma_fused_num: int = field(default=10, metadata=_meta("fused_num"))
    pma_interleave_step: int = field(default=1000, metadata=_meta("interleave_step"))
    pma_ema_alpha: float = field(default=0.2, metadata=_meta("ema_alpha"))
    pma_fused_weights: list[float] | None = field(default=None, metadata=_meta("fused_weights"))
    pma_decay_shape: str | None = field(default=None, metadata=_meta("decay_shape"))
    pma_start_step: int = field(default=0, metadata=_meta("start_step"))
    pma_write_back: bool = field(default=False, metadata=_meta("write_back"))
    pma_eval: bool = field(default=False, metadata=_meta("eval"))
    pma_eval_lm_eval_tasks: list[str] | None = field(default=None, metadata=_meta("eval_lm_eval_tasks"))
    pma_eval_lm_eval_include_path: str | None = field(default=None, metadata=_meta("eval_lm_eval_include_path"))
    pma_eval_lm_eval_num_fewshot: int | None = field(default=None, metadata=_meta("eval_lm_eval_num_fewshot"))
    pma_eval_lm_eval_limit: float | None = field(default=None, metadata=_meta("eval_lm_eval_limit"))
    pma_offload: str = field(default="none", metadata=_meta("offload"))
    pma_save: bool = field(default=True, metadata=_meta("save"))
    pma_save_total_limit: int | None = field(default=None, metadata=_meta("save_total_limit"))
    pma_export: str = field(default="sync", metadata=_meta("export"))
    pma_sample_store: bool = field(default=False, metadata=_meta("sample_store"))
    pma_sample_store_limit: int | None = field(default=None, metadata=_meta("sample_store_limit"))
    pma_hub_model_id: str | None = field(default=None, metadata=_meta("hub_model_id"))
    # Weight Scope Alignment (pmakit.tools.wsa): off while pma_wsa_weight is 0. The paper fixes neither the weight
    # nor the target; the defaults below are ours.
    pma_wsa_weight: float = field(default=0.0, metadata=_wsa_meta("weight"))
    pma_wsa_target: str = field(default="init", metadata=_wsa_meta("target"))
    pma_wsa_reference: list[str] | None = field(default=None, metadata=_wsa_meta("reference"))
    pma_wsa_reference_weights: list[float] | None = field(default=None, metadata=_wsa_meta("reference_weights"))
    pma_wsa_layers: str | None = field(default=None, metadata=_wsa_meta("layers"))
    # Loss-spike recovery (pmakit.tools.spike): off by default; the other pma_spike_* fields are its settings.
    pma_spike_recovery: bool = field(
        default=False,
        metadata={
            "help": "Watch every step's loss and, on a spike, restart from the merge of the weights sampled "
            "before it (PMA-init). Settings: the `pma_spike_*` fields."
        },
    )
    pma_spike_factor: float = field(default=2.0, metadata=_spike_meta("factor"))
    pma_spike_patience: int = field(default=3, metadata=_spike_meta("patience"))
    pma_spike_window: int = field(default=50, metadata=_spike_meta("window"))
    pma_spike_min_history: int = field(default=10, metadata=_spike_meta("min_history"))
    pma_spike_num_samples: int = field(default=3, metadata=_spike_meta("num_samples"))
    pma_spike_interval: int = field(default=100, metadata=_spike_meta("interval"))
    pma_spike_fused_algo: str = field(default="sma", metadata=_spike_meta("fused_algo"))
    pma_spike_ema_alpha: float = field(default=0.2, metadata=_spike_meta("ema_alpha"))
    pma_spike_reset_optimizer: bool = field(default=True, metadata=_spike_meta("reset_optimizer"))
    pma_spike_rewarm_steps: int = field(default=100, metadata=_spike_meta("rewarm_steps"))
    pma_spike_lr_scale: float = field(default=1.0, metadata=_spike_meta("lr_scale"))
    pma_spike_max_recoveries: int = field(default=3, metadata=_spike_meta("max_recoveries"))
    pma_spike_offload: str = field(default="cpu", metadata=_spike_meta("offload"))

    def __post_init__(self) -> None:
        # Refuse before the DeepSpeed integration replaces our optimizer with its own (PMA silently lost).
        if self.deepspeed and _deepspeed_optimizer_section(self.deepspeed):
            raise InputError(
                "The DeepSpeed config has an `optimizer` section, so DeepSpeed would build its own optimizer and "
                "PMA (which lives in the Trainer's optimizer) would be silently lost. Remove the `optimizer` "
                "section and choose the optimizer with `optim` / `learning_rate` in the training arguments."
            )
        if self.pma_fused_weights is not None:
            self.pma_fused_weights = [float(w) for w in self.pma_fused_weights]
        validate_pma_settings({name: getattr(self, f"pma_{name}") for name in PMA_FIELDS}, prefix="pma_")
        validate_wsa_settings({name: getattr(self, f"pma_wsa_{name}") for name in WSA_FIELDS}, "pma_wsa_")
        validate_spike_settings({name: getattr(self, f"pma_spike_{name}") for name in SPIKE_FIELDS}, "pma_spike_")
        super().__post_init__()
        if self.max_steps and self.max_steps > 0:
            config = self.pma_config
            config.check_horizon(self.max_steps)
            self._pma_horizon_checked = (self.max_steps, config)  # so that `PmaCallback` does not warn again

    @property
    def pma_config(self) -> PmaConfig:
        """The PMA settings as a `PmaConfig`."""
        return PmaConfig(**{name: getattr(self, f"pma_{name}") for name in PMA_FIELDS})

    @property
    def pma_wsa_config(self) -> WsaConfig | None:
        """The WSA settings as a `pmakit.tools.wsa.WsaConfig`, or None while `pma_wsa_weight` is 0 (off)."""
        if not self.pma_wsa_weight:
            return None
        return WsaConfig(**{name: getattr(self, f"pma_wsa_{name}") for name in WSA_FIELDS})

    @property
    def pma_spike_config(self) -> SpikeConfig:
        """The loss-spike recovery settings as a `SpikeConfig` (used when `pma_spike_recovery` is on)."""
        return SpikeConfig(**{name: getattr(self, f"pma_spike_{name}") for name in SPIKE_FIELDS})
