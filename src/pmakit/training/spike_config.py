"""Loss-spike recovery settings: `SpikeConfig` (the ``pma_spike_*`` fields of `PmaArguments`).

Kept apart from the callback (`pmakit.training.spike`): settings are read by `PmaArguments` and
the docs' settings table, the rest is torch and Trainer glue.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..averaging import AveragingRule
from ..errors import InputError, brief
from ..settings import at_least, finite_number, one_of, setting, settle


__all__ = ["SPIKE_ALGORITHMS", "SPIKE_OFFLOAD", "SpikeConfig"]

SPIKE_ALGORITHMS = ("sma", "wma", "ema")
SPIKE_OFFLOAD = ("cpu", "none")


def _check_factor(key: str, values: dict, name) -> None:
    if not finite_number(values[key]) or values[key] <= 1:
        raise InputError(f"{name(key)} must be a finite number greater than 1; got {brief(values[key])}.")


def _check_min_history(key: str, values: dict, name) -> None:
    at_least(0)(key, values, name)
    if values[key] > values["window"]:
        raise InputError(f"{name(key)} ({values[key]}) cannot exceed {name('window')} ({values['window']}).")


def _check_ema_alpha(key: str, values: dict, name) -> None:
    if values["fused_algo"] == "ema" and not (0.0 < float(values[key]) < 1.0):
        raise InputError(f"{name(key)} must lie in the open interval (0, 1); got {brief(values[key])}.")


def _check_lr_scale(key: str, values: dict, name) -> None:
    scale = values[key]
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not (0.0 < scale <= 1.0):
        raise InputError(f"{name(key)} must lie in (0, 1]; got {brief(scale)}.")


@dataclass
class SpikeConfig:
    """Loss-spike recovery settings (in `PmaArguments` each is a ``pma_spike_*`` field).

    The defaults suit pre-training and fine-tuning alike: a spike is a loss above twice the recent
    median for 3 steps in a row, or any non-finite loss/gradient; the run restarts from the SMA of
    the last 3 samples (taken 100 steps apart) before it, with fresh optimizer moments and a
    100-step learning-rate re-warm, at most 3 times.

    Each field is listed with its default and meaning in the docs' settings table (generated from
    the fields' ``help`` metadata).

    Raises:
        ValueError: a setting is out of range; the message names the field.
    """

    factor: float = setting(
        2.0,
        "A step is suspect when its loss exceeds this multiple of the median loss of the last "
        "`window` normal steps (non-finite loss or gradient norm always triggers recovery at once).",
        _check_factor,
    )
    patience: int = setting(
        3, "Consecutive suspect steps that make a spike; the spike began at the first of them.", at_least(1)
    )
    window: int = setting(50, "Normal steps whose median loss is the reference for `factor`.", at_least(1))
    min_history: int = setting(
        10,
        "Normal steps needed before the loss-ratio test starts (non-finite checks run from step 1).",
        _check_min_history,
    )
    num_samples: int = setting(
        3,
        "Recovery samples kept in a ring: the merge of those taken before a spike replaces the "
        "live weights. Memory: this many copies of the trainable weights.",
        at_least(1),
    )
    interval: int = setting(100, "Optimizer steps between two recovery samples.", at_least(1))
    fused_algo: str = setting(
        "sma",
        f"How the pre-spike samples are merged: one of {', '.join(SPIKE_ALGORITHMS)} (ema uses `ema_alpha`).",
        one_of(SPIKE_ALGORITHMS),
    )
    ema_alpha: float = setting(
        0.2, "EMA weight of the newest sample, in (0, 1), when `fused_algo` is 'ema'.", _check_ema_alpha
    )
    reset_optimizer: bool = setting(
        True, "After a recovery reset the optimizer moments (they saw the spike's gradients); off: keep them."
    )
    rewarm_steps: int = setting(
        100,
        "After a recovery ramp the learning rate linearly from 0 back to its schedule over this "
        "many optimizer steps (0: no re-warm).",
        at_least(0),
    )
    lr_scale: float = setting(
        1.0,
        "Multiply the learning rate by this factor for the rest of training after each recovery "
        "(1.0: keep the schedule).",
        _check_lr_scale,
    )
    max_recoveries: int = setting(
        3, "Recoveries allowed; the next spike stops training with a clear error.", at_least(0)
    )
    offload: str = setting(
        "cpu",
        f"Where recovery samples live: one of {', '.join(SPIKE_OFFLOAD)} ('none': the parameters' device).",
        one_of(SPIKE_OFFLOAD),
    )

    def __post_init__(self) -> None:
        settle(SpikeConfig, asdict(self))

    @property
    def rule(self) -> AveragingRule:
        return AveragingRule(self.fused_algo, float(self.ema_alpha))

    def to_dict(self) -> dict:
        return asdict(self)
