"""The averaging rules, one small class each; :func:`~pmakit.averaging.registry.register` lists them.

The order of the classes is the order of ``ALGORITHMS``. A new rule is one more class here (or in
any module that registers it when imported) and its tests.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from ..errors import brief
from .registry import MissingParameterError, Param, Rule, RuleError, register
from .shapes import DECAY_SHAPES, DecayShape, check_decay_shape, shape_name


__all__ = ["Decay", "Ema", "EmaCorrected", "Bema", "EmaHalfLife", "ExplicitWeights", "Sma", "Wma"]

ALPHA = Param(
    "alpha",
    "EMA weight of the newest sample, in (0, 1).",
    default=0.2,
    interval=(0.0, 1.0),
    parse=float,
    expects="a number in (0, 1)",
)


@register
class Sma(Rule):
    """Equal weights ``1/n``; ``c_k = 1/k``."""

    name, title = "sma", "SMA"

    def weights_for(self, n: int, steps: Sequence[int] | None = None) -> list[float]:
        return [1.0 / n] * n

    def coefficient(self, k: int, n: int | None = None, steps: Sequence[int] | None = None) -> float:
        return 1.0 / k


@register
class Ema(Rule):
    """EMA started at the first sample: ``(1-a)^(n-1)`` for ``x_1``, ``a(1-a)^(n-i)`` after; ``c_k = a``."""

    name, title, params = "ema", "EMA", (ALPHA,)

    def weights_for(self, n: int, steps: Sequence[int] | None = None) -> list[float]:
        a = self.alpha
        return [(1 - a) ** (n - 1)] + [a * (1 - a) ** (n - i) for i in range(2, n + 1)]

    def coefficient(self, k: int, n: int | None = None, steps: Sequence[int] | None = None) -> float:
        return self.alpha

    def words(self) -> str:
        return f"EMA (alpha={self.alpha:g})"


@register
class EmaCorrected(Rule):
    """Zero-start EMA divided by its total ``1-(1-a)^n``: ``a(1-a)^(n-i) / (1-(1-a)^n)``; ``c_k = a / (1-(1-a)^k)``."""

    name, title, params = "ema_corrected", "bias-corrected EMA", (ALPHA,)

    def weights_for(self, n: int, steps: Sequence[int] | None = None) -> list[float]:
        a = self.alpha
        total = -math.expm1(n * math.log1p(-a))  # 1 - (1-a)^n, accurate for tiny alpha
        return [a * (1 - a) ** (n - i) / total for i in range(1, n + 1)]

    def coefficient(self, k: int, n: int | None = None, steps: Sequence[int] | None = None) -> float:
        return self.alpha / -math.expm1(k * math.log1p(-self.alpha))

    def words(self) -> str:
        return f"bias-corrected EMA (alpha={self.alpha:g})"


@register
class Wma(Rule):
    """Linear weights ``i / (n(n+1)/2)`` (newest most); ``c_k = 2/(k+1)``."""

    name, title = "wma", "WMA"

    def weights_for(self, n: int, steps: Sequence[int] | None = None) -> list[float]:
        total = n * (n + 1) / 2
        return [i / total for i in range(1, n + 1)]

    def coefficient(self, k: int, n: int | None = None, steps: Sequence[int] | None = None) -> float:
        return 2.0 / (k + 1)


@register
class ExplicitWeights(Rule):
    """Given weights ``w_i / sum(w)`` (or as given, without a running form); ``c_k = w_k / sum_{j<=k} w_j``."""

    name, title = "weights", "weighted average"
    depends_on_cycle = True
    params = (
        Param(
            "weights",
            "Explicit per-sample weights, oldest first.",
            required=True,
            expects="one weight per sample",
            card=False,
        ),
        Param("normalize", "Divide the weights by their sum (off: use them as given).", default=True, card=False),
    )

    def check(self) -> None:
        if not self.weights:
            raise MissingParameterError("The `weights` rule needs a non-empty list of weights.", "weights")
        self.weights = tuple(float(w) for w in self.weights)
        if not all(math.isfinite(w) for w in self.weights):
            raise RuleError(f"Weights must be finite numbers, got {brief(list(self.weights))}.", "weights")
        if self.normalize and sum(self.weights) == 0:
            raise RuleError(
                f"Weights {brief(list(self.weights))} sum to zero, so they cannot be normalised; "
                "pass normalize=False to use them as given.",
                "weights",
            )

    def weights_for(self, n: int, steps: Sequence[int] | None = None) -> list[float]:
        if n != len(self.weights):
            raise RuleError(f"Got {len(self.weights)} weights for {n} samples; give one weight per sample.", "weights")
        if not self.normalize:
            return list(self.weights)
        total = sum(self.weights)
        return [w / total for w in self.weights]

    def coefficient(self, k: int, n: int | None = None, steps: Sequence[int] | None = None) -> float:
        if not self.normalize:
            message = "Unnormalised weights have no running form; use the closed form `weights_for`."
            raise RuleError(message, "normalize")
        if k > len(self.weights):
            raise RuleError(f"Only {len(self.weights)} weights were given, but sample {k} arrived.", "weights")
        partial = sum(self.weights[:k])
        if partial == 0:
            raise RuleError(
                f"The first {k} weights sum to zero, so the running average is undefined there; "
                "reorder the weights or merge offline with the closed form.",
                "weights",
            )
        return self.weights[k - 1] / partial

    def words(self) -> str:
        return "weighted average" if self.normalize else "weighted sum"

    def recorded(self, name: str) -> Any:
        return list(self.weights) if name == "weights" else super().recorded(name)


@register
class Decay(Rule):
    """A merge standing in for an LR decay ``d`` (WSM): ``d((i-1)/n) - d(i/n)``; ``c_k = w_k / (1 - d(k/n))``."""

    name, title = "decay", "decay-shaped merge"
    depends_on_cycle = True
    params = (
        Param(
            "decay_shape",
            "Shape d of the decay: a name in DECAY_SHAPES, or from Python a callable with d(0) = 1 and d(1) = 0.",
            required=True,
            parse=str,
            choices=tuple(DECAY_SHAPES),
        ),
    )

    def check(self) -> None:
        check_decay_shape(self.decay_shape)

    @property
    def shape(self) -> DecayShape:
        """The decay shape as a function."""
        return DECAY_SHAPES[self.decay_shape] if isinstance(self.decay_shape, str) else self.decay_shape

    @property
    def shape_name(self) -> str:
        """The decay shape's name (a callable's ``__name__``)."""
        return shape_name(self.decay_shape)

    def weights_for(self, n: int, steps: Sequence[int] | None = None) -> list[float]:
        d = self.shape
        levels = [float(d(i / n)) for i in range(n + 1)]
        levels[0], levels[n] = 1.0, 0.0  # the ends were checked to within tolerance: make them exact
        return [levels[i - 1] - levels[i] for i in range(1, n + 1)]

    def coefficient(self, k: int, n: int | None = None, steps: Sequence[int] | None = None) -> float:
        if n is None:
            raise RuleError("The `decay` rule's running form needs the window length n (online: `fused_num`).")
        if k > n:
            raise RuleError(f"The decay window holds {n} samples, but sample {k} arrived.")
        done = 1.0 - (0.0 if k == n else float(self.shape(k / n)))  # weight given to samples 1..k
        if done == 0:
            raise RuleError(
                f"The decay shape stays at 1 up to x={k}/{n}, so the first {k} samples weigh nothing and the "
                "running average is undefined there; merge offline with the closed form instead.",
                "decay_shape",
            )
        return self.weights_for(n)[k - 1] / done

    def words(self) -> str:
        return f"decay-shaped merge ({self.shape_name})"

    def recorded(self, name: str) -> Any:
        return self.shape_name if name == "decay_shape" else super().recorded(name)


def chained_weights(coefficients: Sequence[float]) -> list[float]:
    """The closed form of a running form: ``w_i = c_i * prod_{j>i} (1 - c_j)`` (``c_1 = 1``), oldest first."""
    weights, keep = [0.0] * len(coefficients), 1.0
    for i in range(len(coefficients) - 1, -1, -1):
        c = 1.0 if i == 0 else coefficients[i]
        weights[i] = c * keep
        keep *= 1.0 - c
    return weights


@register
class EmaHalfLife(Rule):
    """Half-life EMA (torchtitan): the EMA's half-life is a fraction ``h`` of the steps so far, ``h (s + b)``.

    The sample at step ``s_k`` enters with ``c_k = 1 - 2^(-(s_k - s_(k-1)) / (h (s_k + b)))``: the
    decay over the steps since the previous sample. With a sample every step that is torchtitan's
    per-update decay ``2^(-1/(h t))`` at ``t = s + step_bias``; with a sample every ``k`` steps it is
    the decay at ``t = s/k`` updates. The EMA starts at the first sample (``c_1 = 1``); the weights
    are that running form multiplied out.
    """

    name, title, step_aware = "ema_halflife", "half-life EMA", True
    params = (
        Param(
            "half_life_fraction",
            "The EMA's half-life as a fraction h of the training steps so far (torchtitan's `half_life_fraction`).",
            default=0.05,
            interval=(0.0, math.inf),
            parse=float,
            expects="a positive number",
        ),
        Param(
            "step_bias",
            "Steps added to the training step in the half-life h (step + step_bias) (torchtitan's `step_bias`).",
            default=0.0,
            parse=float,
            expects="a number",
        ),
    )

    def check(self) -> None:
        self.half_life_fraction, self.step_bias = float(self.half_life_fraction), float(self.step_bias)
        if not math.isfinite(self.step_bias) or not math.isfinite(self.half_life_fraction):
            raise RuleError("`half_life_fraction` and `step_bias` must be finite numbers.", "step_bias")

    def _coefficient_at(self, previous: int, step: int) -> float:
        t = step + self.step_bias
        if t <= 0:
            raise RuleError(
                f"The `ema_halflife` rule needs step + step_bias > 0; the sample at step {step} gives {t:g}.",
                "step_bias",
            )
        if step <= previous:
            raise RuleError(f"The `ema_halflife` rule needs rising steps; step {step} follows step {previous}.")
        # 1 - 2^(-gap/(h t)), accurate when tiny
        return -math.expm1(-math.log(2.0) * (step - previous) / (self.half_life_fraction * t))

    def weights_for(self, n: int, steps: Sequence[int] | None = None) -> list[float]:
        return chained_weights([1.0] + [self._coefficient_at(steps[k - 1], steps[k]) for k in range(1, n)])

    def coefficient(self, k: int, n: int | None = None, steps: Sequence[int] | None = None) -> float:
        return self._coefficient_at(steps[k - 2], steps[k - 1])

    def words(self) -> str:
        bias = f", step_bias={self.step_bias:g}" if self.step_bias else ""
        return f"half-life EMA (h={self.half_life_fraction:g}{bias})"


def _number(name: str, help: str, default: float) -> Param:
    return Param(name, help, default=default, parse=float, expects="a number")


@register
class Bema(Rule):
    """TRL's BEMA (arXiv 2508.00180): an EMA from a snapshot ``theta_0``, plus ``alpha_t (x_n - theta_0)``.

    The first sample is ``theta_0`` (TRL takes it at ``update_after``). With ``r(s) = lag + multiplier s``
    at a sample's step ``s``: the EMA starts at ``theta_0`` and folds sample ``k`` with
    ``beta = max(r(s_k)^-ema_power, min_ema_multiplier)``; the output adds
    ``alpha = r(s_n)^-bias_power`` times ``x_n - theta_0``. So ``theta_0`` weighs its EMA weight
    minus ``alpha`` (negative at TRL's defaults), the newest sample its EMA weight plus ``alpha``;
    the weights still sum to one. The output is not a running average of itself, so the running form
    keeps ``theta_0`` as an anchor: it folds the EMA (``c_k = beta``) and :meth:`finish` adds the
    correction after the last sample.
    """

    name, title, step_aware, anchors = "bema", "BEMA", True, ("theta0",)
    params = (
        _number("ema_power", "TRL's `ema_power` (kappa): the EMA folds with (lag + multiplier s)^-ema_power.", 0.5),
        _number("bias_power", "TRL's `bias_power` (eta): the correction is (lag + multiplier s)^-bias_power.", 0.2),
        _number("lag", "TRL's `lag` (rho): the offset of the schedule, in steps.", 10.0),
        _number("multiplier", "TRL's `multiplier` (gamma): the scale of the step in the schedule.", 1.0),
        _number("min_ema_multiplier", "TRL's `min_ema_multiplier`: the smallest EMA coefficient.", 0.0),
    )

    def check(self) -> None:
        for p in self.params:
            value = float(getattr(self, p.name))
            if not math.isfinite(value) or (value < 0 and p.name != "lag"):
                raise RuleError(
                    f"The `bema` rule's `{p.name}` must be a finite number >= 0, got {brief(value)}.", p.name
                )
            setattr(self, p.name, value)

    def _base(self, step: int) -> float:
        r = self.lag + self.multiplier * step
        if r <= 0:
            raise RuleError(f"The `bema` rule needs lag + multiplier * step > 0; step {step} gives {r:g}.", "lag")
        return r

    def ema_coefficient(self, step: int) -> float:
        """``beta`` of the EMA for a sample at ``step``."""
        return max(self._base(step) ** -self.ema_power, self.min_ema_multiplier)

    def correction(self, step: int) -> float:
        """``alpha``: the weight of ``x_n - theta_0`` in the output when the newest sample is at ``step``."""
        return self._base(step) ** -self.bias_power

    def weights_for(self, n: int, steps: Sequence[int] | None = None) -> list[float]:
        weights = chained_weights([1.0] + [self.ema_coefficient(s) for s in steps[1:n]])
        for alpha in self.finish(n, steps).values():  # theta_0 is the first sample
            weights[0] -= alpha
            weights[n - 1] += alpha
        return weights

    def coefficient(self, k: int, n: int | None = None, steps: Sequence[int] | None = None) -> float:
        return self.ema_coefficient(steps[k - 1])

    def finish(self, n: int, steps: Sequence[int] | None = None) -> dict[str, float]:
        return {"theta0": self.correction(steps[n - 1])} if n > 1 else {}

    def words(self) -> str:
        return f"BEMA (ema_power={self.ema_power:g}, bias_power={self.bias_power:g}, lag={self.lag:g})"
