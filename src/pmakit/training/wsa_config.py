"""WSA settings: `WsaConfig` (the ``pma_wsa_*`` fields of `PmaArguments`) and their checks.

Kept apart from the loss and the callback (`pmakit.training.wsa`): settings are read by
`PmaArguments` and the docs' settings table, the rest is torch and Trainer glue.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

from ..errors import InputError, brief
from ..settings import finite_number, one_of, setting, settle


__all__ = ["WSA_TARGETS", "WsaConfig"]

WSA_TARGETS = ("init", "reference", "fused")


def _check_weight(key: str, values: Mapping, name) -> None:
    if not finite_number(values[key]) or values[key] < 0:
        raise InputError(f"{name(key)} must be a finite number >= 0 (0 turns WSA off); got {brief(values[key])}.")


def _check_reference(key: str, values: Mapping, name) -> None:
    reference, target = values[key], values["target"]
    if reference is not None and (isinstance(reference, (str, bytes)) or not isinstance(reference, Sequence)):
        raise InputError(f"{name(key)} must be a list of model folders; got {brief(reference)}.")
    reference = list(reference or [])
    if target == "init" and reference:
        raise InputError(f"{name(key)} is only used with {name('target')}='reference' or 'fused'.")
    if target == "reference" and len(reference) != 1:
        raise InputError(f"{name('target')}='reference' needs exactly one folder in {name(key)}; got {reference}.")
    if target == "fused" and not reference:
        raise InputError(f"{name('target')}='fused' needs one or more folders in {name(key)}.")


def _check_reference_weights(key: str, values: Mapping, name) -> None:
    weights, reference = values[key], list(values["reference"] or [])
    if weights is None:
        return
    if values["target"] != "fused":
        raise InputError(f"{name(key)} is only used with {name('target')}='fused'.")
    if len(weights) != len(reference):
        raise InputError(f"{name(key)} has {len(weights)} entries for {len(reference)} {name('reference')} folders.")
    if any(not math.isfinite(float(w)) or float(w) < 0 for w in weights) or sum(map(float, weights)) <= 0:
        raise InputError(f"{name(key)} must be finite, non-negative, not all zero; got {weights}.")


def _check_layers(key: str, values: Mapping, name) -> None:
    if values[key] is not None:
        try:
            re.compile(values[key])
        except re.error as err:
            raise InputError(f"{name(key)} is not a valid regular expression ({err}): {brief(values[key])}.") from None


def _folders(reference: object) -> object:
    """Paths as strings (a lone string is left for the check to refuse)."""
    if isinstance(reference, (str, bytes)) or not isinstance(reference, Sequence):
        return reference
    return [os.fspath(r) for r in reference]


@dataclass
class WsaConfig:
    """WSA settings for `WsaCallback` / `add_wsa` (in `PmaArguments` the same fields are ``pma_wsa_*``).

    Each field is listed with its default and meaning in the docs' settings table (generated from
    the fields' ``help`` metadata).

    Raises:
        ValueError: a setting is out of range or inconsistent (e.g. ``reference`` without a
            target that uses it); the message names the field.
    """

    weight: float = setting(
        0.5,
        "Weight of the WSA loss (KL between each layer's Gaussian fit and the target's, averaged over "
        "layers) added to the training loss; 0 turns WSA off. The paper does not fix it: 0.1-1 is our suggestion.",
        _check_weight,
    )
    target: str = setting(
        "init",
        f"WSA target scope: one of {', '.join(WSA_TARGETS)}. 'init': the weights at the start of training "
        "(our default; the paper does not fix the target); 'reference': the model folder in `reference`; "
        "'fused': the fused scope of the folders in `reference` (weights `reference_weights`).",
        one_of(WSA_TARGETS),
    )
    reference: list[str] | None = setting(
        None,
        "Model folder(s) giving the WSA target ('reference': exactly one; 'fused': one or more).",
        _check_reference,
        convert=_folders,
    )
    reference_weights: list[float] | None = setting(
        None,
        "Weights of the `reference` folders when fusing their scopes (default: equal).",
        _check_reference_weights,
        convert=lambda weights: [float(w) for w in weights],
    )
    layers: str | None = setting(
        None,
        "Regex: only parameters whose name matches are aligned (default: every trainable parameter with "
        "2 or more dimensions: weight matrices and embeddings).",
        _check_layers,
    )

    def __post_init__(self) -> None:
        vars(self).update(settle(WsaConfig, asdict(self)))

    def to_dict(self) -> dict:
        return asdict(self)
