"""`AveragingRule`: one rule of the registry with its settings, as every part of pmakit uses it.

It holds the settings by name (``algo``, ``alpha``, ``weights``, ``normalize``, ``decay_shape``, and
``params`` for parameters of other rules), hands each rule the parameters it declares, and refuses
the optional ones given to a rule that does not use them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import InputError, brief
from .registry import Rule, RuleError, parse_spec, rule_class
from .shapes import DecayShape


__all__ = ["AveragingRule", "fold_coefficients", "merge_weights"]


@dataclass(frozen=True)
class AveragingRule:
    """An averaging rule: ``algo`` in ``ALGORITHMS`` and the settings that rule reads.

    ``alpha`` is the weight of the newest sample for ``ema`` and ``ema_corrected`` (the paper's
    and MindSpore's convention; timm and torch's ``decay`` is ``1 - alpha``). ``normalize=False``
    keeps explicit weights as given (for extrapolation such as ``theta_1 + a (theta_1 - theta_0)``);
    it has no running form.

    Args:
        algo: One of ``ALGORITHMS``: ``"sma"``, ``"ema"``, ``"ema_corrected"``, ``"wma"``, ``"weights"``
            or ``"decay"``.
        alpha: EMA weight of the newest sample, in (0, 1); used by ``"ema"`` and ``"ema_corrected"``.
        weights: Explicit per-sample weights, oldest first; used by ``"weights"`` only.
        normalize: Divide explicit weights by their sum (off: use them as given, negatives allowed).
        decay_shape: Shape of the ``"decay"`` rule: a name in ``DECAY_SHAPES`` or a callable d on
            [0, 1] with d(0) = 1 and d(1) = 0.
        params: Parameters of rules that have no field here, by name (each rule declares its own).

    Raises:
        ValueError: an unknown rule or shape, ``alpha`` outside (0, 1), weights missing, empty,
            non-finite or summing to zero when normalised, or a setting the rule does not use
            (a `pmakit.averaging.RuleError`, whose ``param`` names the setting).
    """

    algo: str = "sma"
    alpha: float = 0.2
    weights: tuple[float, ...] | None = None
    normalize: bool = True
    decay_shape: str | DecayShape | None = None
    params: Mapping[str, Any] | None = field(default=None, hash=False)
    # the registry's rule object is set in __post_init__ as a plain attribute, not a field: code that walks
    # the fields (the engine's cycle settings, asdict) sees only the settings

    def __post_init__(self) -> None:
        cls = rule_class(self.algo)
        declared = cls.param_names()
        rule = cls(**{**self._given(declared), **dict(self.params or {})})
        object.__setattr__(self, "_rule", rule)
        for key in declared:  # the rule's own form of the value (weights as a tuple of floats)
            if key in _SETTING_FIELDS:
                object.__setattr__(self, key, getattr(rule, key))

    def _given(self, declared: tuple[str, ...]) -> dict[str, Any]:
        """The fields the rule declares, and the optional ones (default ``None``) that are set (refused)."""
        return {
            name: getattr(self, name)
            for name in _SETTING_FIELDS
            if name in declared or (_DEFAULTS[name] is None and getattr(self, name) is not None)
        }

    @classmethod
    def from_spec(cls, spec: str) -> AveragingRule:
        """The rule a spec names: ``"ema:0.1"``, ``"decay:cosine"`` (see `pmakit.averaging.parse_spec`)."""
        algo, params = parse_spec(spec)
        own = {k: v for k, v in params.items() if k in _SETTING_FIELDS}
        other = {k: v for k, v in params.items() if k not in _SETTING_FIELDS}
        return cls(algo, **own, params=other or None)

    @property
    def rule(self) -> Rule:
        """The registry's rule object, holding the parameters it declares."""
        return self._rule

    @property
    def shape(self) -> DecayShape:
        """The decay shape as a function (the ``decay`` rule only)."""
        return self._shaped().shape

    @property
    def shape_name(self) -> str:
        """The decay shape's name (a callable's ``__name__``), e.g. for model cards (the ``decay`` rule only)."""
        return self._shaped().shape_name

    def _shaped(self) -> Rule:
        if not hasattr(self._rule, "shape"):
            raise InputError(f"Only the `decay` rule has a decay shape, not {brief(self.algo)}.")
        return self._rule

    def weights_for(self, n: int, steps: Sequence[int] | None = None) -> list[float]:
        """Closed-form weights of ``n`` samples, oldest first (they sum to one unless ``normalize=False``).

        Args:
            n: Number of samples.
            steps: The samples' training steps, oldest first; needed by step-aware rules only.

        Raises:
            ValueError: ``n < 1``, ``n`` differs from the number of explicit weights, or a step-aware
                rule without ``n`` steps.
        """
        if n < 1:
            raise InputError(f"Need at least one sample to average, got n={n}.")
        self._check_steps(n, steps)
        return self._rule.weights_for(n, steps)

    def coefficient(self, k: int, n: int | None = None, steps: Sequence[int] | None = None) -> float:
        """``c_k`` of the running form for the ``k``-th sample (1-based); ``c_1`` is always 1.

        Args:
            k: the sample's position in the window, from 1.
            n: the window's length; needed by ``decay`` (online: ``fused_num``), ignored by the others.
            steps: the training steps of the samples so far (at least ``k``); step-aware rules only.

        Raises:
            ValueError: ``k`` outside the window, ``decay`` without ``n``, or a running form that is undefined.
        """
        if k < 1:
            raise InputError(f"Samples are counted from 1, got k={k}.")
        if k == 1:
            return 1.0
        self._check_steps(k, steps, at_least=True)
        return self._rule.coefficient(k, n, steps)

    @property
    def anchors(self) -> tuple[str, ...]:
        """The buffers the running form keeps beside the average, copies of the cycle's first sample (``bema``)."""
        return self._rule.anchors

    def finish(self, n: int, steps: Sequence[int] | None = None) -> dict[str, float]:
        """The running form's correction after the ``n``-th, last sample: ``{anchor: f}``, add ``f (x_n - anchor)``.

        Empty for the rules without `anchors`, whose running average is already the merge.
        """
        if n < 1:
            raise InputError(f"Need at least one sample to average, got n={n}.")
        self._check_steps(n, steps, at_least=True)
        return self._rule.finish(n, steps)

    def finish_factors(self, n: int, steps: Sequence[int] | None = None) -> list[float]:
        """`finish` as one factor per anchor, in `anchors` order (0.0 where none): what the fold kernel takes."""
        done = self.finish(n, steps)
        return [done.get(anchor, 0.0) for anchor in self.anchors]

    def _check_steps(self, n: int, steps: Sequence[int] | None, at_least: bool = False) -> None:
        if steps is None:
            if self._rule.step_aware:
                raise RuleError(f"The `{self.algo}` rule weighs samples by their training steps; pass `steps`.")
            return
        if len(steps) < n or (len(steps) != n and not at_least):
            raise RuleError(f"Got {len(steps)} steps for {n} samples; give one step per sample.")

    def settings(self, card: bool = False) -> dict[str, Any]:
        """The rule's parameters as a recipe records them (``card``: only those a model card names)."""
        return self._rule.settings(card=card)

    def describe(self, n: int | None = None) -> str:
        """A short human description, e.g. for model cards: ``"EMA (alpha=0.2) of 10 samples"``."""
        name = self._rule.words()
        return name if n is None else f"{name} of {n} sample{'s' if n != 1 else ''}"


_DEFAULTS = {f.name: f.default for f in dataclasses.fields(AveragingRule) if f.name not in ("algo", "params")}
_SETTING_FIELDS = tuple(_DEFAULTS)  # the settings held as fields, in field order


def merge_weights(
    n: int,
    algo: str = "sma",
    alpha: float = 0.2,
    weights: Sequence[float] | None = None,
    normalize: bool = True,
    decay_shape: str | DecayShape | None = None,
) -> list[float]:
    """Closed-form weights of ``n`` samples under a rule; see :class:`AveragingRule`.

    Args:
        n: Number of samples.
        algo: The rule (see `AveragingRule`).
        alpha: EMA weight of the newest sample.
        weights: Explicit weights for ``algo="weights"``, one per sample.
        normalize: Whether explicit weights are divided by their sum.
        decay_shape: Shape of the ``"decay"`` rule.

    Returns:
        The weight of each sample, oldest first.

    Raises:
        ValueError: invalid settings, or a number of weights other than ``n``.
    """
    explicit = tuple(weights) if weights is not None else None
    return AveragingRule(algo, alpha, explicit, normalize, decay_shape).weights_for(n)


def fold_coefficients(rule: AveragingRule, n: int, steps: Sequence[int] | None = None) -> list[float]:
    """``[c_1, ..., c_n]``: folding samples with these, then `AveragingRule.finish`, gives ``rule.weights_for(n)``.

    Args:
        rule: The averaging rule.
        n: Number of samples.
        steps: The samples' training steps, oldest first (step-aware rules only).

    Returns:
        ``c_k`` for ``k = 1..n``; ``c_1`` is 1.

    Raises:
        ValueError: the rule has no running form (``normalize=False``) or too few weights.
    """
    return [rule.coefficient(k, n, steps) for k in range(1, n + 1)]
