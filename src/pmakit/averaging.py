"""The averaging law, written once for online PMA and the offline merger.

Every rule averages an ordered list of samples ``x_1..x_n`` (oldest first). It has two
equivalent forms, and both are derived here from the same rule:

* closed form: ``avg = sum_i w_i x_i`` (:meth:`AveragingRule.weights_for`), which the offline
  merger accumulates directly (it knows ``n`` up front and may use unnormalised weights);
* running form: ``avg <- avg + c_k (x_k - avg)`` with ``c_1 = 1``
  (:meth:`AveragingRule.coefficient`), which the online engine uses so that the average is
  valid after every sample and needs no second buffer.

=============  ==================================================  ==================================
rule           weight of ``x_i`` among ``n`` samples                 ``c_k``
=============  ==================================================  ==================================
sma            ``1/n``                                             ``1/k``
wma            ``i / (n(n+1)/2)``                                  ``2/(k+1)``
ema            ``(1-a)^(n-1)`` for ``x_1``, ``a(1-a)^(n-i)``        ``a`` for ``k >= 2``
ema_corrected  ``a(1-a)^(n-i) / (1-(1-a)^n)``                      ``a / (1-(1-a)^k)``
weights        ``w_i / sum(w)``                                    ``w_k / sum_{j<=k} w_j``
decay          ``d((i-1)/n) - d(i/n)``                             ``w_k / (1 - d(k/n))`` (needs ``n``)
=============  ==================================================  ==================================

Two EMA forms, for two situations:

* ``ema`` starts at the first sample (``avg_1 = x_1``). It is the right form for long cycles
  (``n`` well above ``1/a``), where the first sample's weight ``(1-a)^(n-1)`` has decayed away;
  with few samples the *oldest* weighs most (``a = 0.2``, 4 samples: 0.512, 0.128, 0.16, 0.2).
* ``ema_corrected`` is MindSpore's zero-start EMA divided by its total weight ``1-(1-a)^n``
  (Adam's bias correction). Its weights rise toward the newest sample at every ``n`` and sum to
  one, so it is the form to use for short cycles (``n`` of a few ``1/a`` or less). Its running
  form needs no ``n``: after ``k`` samples the average is the corrected EMA of those ``k``.

MindSpore's PmaAdamW starts its EMA at zero without the correction; its weights sum to
``1-(1-a)^n`` (0.89 with its defaults), which shrinks the weights it writes back. pmakit does
not reproduce that.

``decay`` emulates a learning-rate decay by a merge of constant-LR samples (WSM, arXiv
2507.17634): with decay shape ``d`` on ``[0, 1]``, ``d(0) = 1`` and ``d(1) = 0``, the weight
still to come at sample ``i``, ``sum_{j>=i} w_j``, equals ``d((i-1)/n)``, the LR multiplier
the merge stands in for. The named shapes (``DECAY_SHAPES``) are ``linear`` ``1 - x`` (equal
weights: SMA), ``cosine`` ``(1 + cos(pi x))/2`` (most weight mid-window) and ``1-sqrt``
``1 - sqrt(x)`` (most weight on the oldest samples); any callable ``d`` is accepted from
Python. The running form divides by ``1 - d(k/n)``, so it needs ``n`` (online: ``fused_num``);
before the ``n``-th sample the running average holds the samples so far with their final
weights, renormalised.

This module imports nothing heavy: the offline merger uses it without torch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass


__all__ = [
    "ALGORITHMS",
    "AVERAGED",
    "COPIED_FROM_NEWEST",
    "DECAY_SHAPES",
    "AveragingRule",
    "DecayShape",
    "fold_coefficients",
    "merge_weights",
    "tensor_merge_action",
]

ALGORITHMS: tuple[str, ...] = ("sma", "ema", "ema_corrected", "wma", "weights", "decay")

DecayShape = Callable[[float], float]
"""A decay shape: the LR multiplier ``d(x)`` at the fraction ``x`` of the window, ``d(0) = 1``, ``d(1) = 0``."""


def _linear(x: float) -> float:
    return 1.0 - x


def _cosine(x: float) -> float:
    return (1.0 + math.cos(math.pi * x)) / 2.0


def _one_minus_sqrt(x: float) -> float:
    return 1.0 - math.sqrt(x)


DECAY_SHAPES: dict[str, DecayShape] = {"linear": _linear, "cosine": _cosine, "1-sqrt": _one_minus_sqrt}
"""The named decay shapes of the `decay` rule: ``1 - x``, ``(1 + cos(pi x))/2`` and ``1 - sqrt(x)``."""

_END_TOLERANCE = 1e-9


def _check_decay_shape(shape: str | DecayShape | None) -> None:
    """Refuse an unknown name, or a callable that does not run from ``d(0) = 1`` to ``d(1) = 0``."""
    if shape is None:
        raise ValueError(
            f"The `decay` rule needs a `decay_shape`: one of {', '.join(DECAY_SHAPES)}, "
            "or a callable d on [0, 1] with d(0) = 1 and d(1) = 0."
        )
    if isinstance(shape, str):
        if shape not in DECAY_SHAPES:
            raise ValueError(f"Unknown `decay_shape` {shape!r}; valid shapes are {', '.join(DECAY_SHAPES)}.")
        return
    if not callable(shape):
        raise ValueError(f"`decay_shape` must be a shape name or a callable, got {type(shape).__name__}.")
    for x, want in ((0.0, 1.0), (1.0, 0.0)):
        got = float(shape(x))
        if not (math.isfinite(got) and abs(got - want) <= _END_TOLERANCE):
            raise ValueError(f"`decay_shape` must satisfy d({x:g}) = {want:g}; {_shape_name(shape)} gives {got!r}.")


def _shape_name(shape: str | DecayShape) -> str:
    return shape if isinstance(shape, str) else getattr(shape, "__name__", repr(shape))


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

    Raises:
        ValueError: an unknown rule or shape, ``alpha`` outside (0, 1), or weights missing, empty,
            non-finite or summing to zero when normalised.
    """

    algo: str = "sma"
    alpha: float = 0.2
    weights: tuple[float, ...] | None = None
    normalize: bool = True
    decay_shape: str | DecayShape | None = None

    def __post_init__(self) -> None:
        if self.algo not in ALGORITHMS:
            raise ValueError(f"Unknown averaging rule {self.algo!r}; valid rules are {', '.join(ALGORITHMS)}.")
        if self.algo in ("ema", "ema_corrected") and not (0.0 < self.alpha < 1.0):
            raise ValueError(f"EMA `alpha` must lie in (0, 1), got {self.alpha}.")
        if self.algo == "weights":
            self._check_weights()
        elif self.weights is not None:
            raise ValueError(f"`weights` are only used by the `weights` rule, not by {self.algo!r}.")
        if self.algo == "decay":
            _check_decay_shape(self.decay_shape)
        elif self.decay_shape is not None:
            raise ValueError(f"`decay_shape` is only used by the `decay` rule, not by {self.algo!r}.")

    def _check_weights(self) -> None:
        if not self.weights:
            raise ValueError("The `weights` rule needs a non-empty list of weights.")
        object.__setattr__(self, "weights", tuple(float(w) for w in self.weights))
        if not all(math.isfinite(w) for w in self.weights):
            raise ValueError(f"Weights must be finite numbers, got {list(self.weights)}.")
        if self.normalize and sum(self.weights) == 0:
            raise ValueError(
                f"Weights {list(self.weights)} sum to zero, so they cannot be normalised; "
                "pass normalize=False to use them as given."
            )

    @property
    def shape(self) -> DecayShape:
        """The decay shape as a function (the ``decay`` rule only)."""
        if self.algo != "decay":
            raise ValueError(f"Only the `decay` rule has a decay shape, not {self.algo!r}.")
        shape = self.decay_shape
        return DECAY_SHAPES[shape] if isinstance(shape, str) else shape

    @property
    def shape_name(self) -> str:
        """The decay shape's name (a callable's ``__name__``), e.g. for model cards (the ``decay`` rule only)."""
        if self.algo != "decay":
            raise ValueError(f"Only the `decay` rule has a decay shape, not {self.algo!r}.")
        return _shape_name(self.decay_shape)

    def weights_for(self, n: int) -> list[float]:
        """Closed-form weights of ``n`` samples, oldest first (they sum to one unless ``normalize=False``).

        Raises:
            ValueError: ``n < 1``, or ``n`` differs from the number of explicit weights.
        """
        if n < 1:
            raise ValueError(f"Need at least one sample to average, got n={n}.")
        if self.algo == "sma":
            return [1.0 / n] * n
        if self.algo == "wma":
            total = n * (n + 1) / 2
            return [i / total for i in range(1, n + 1)]
        if self.algo == "ema":
            a = self.alpha
            return [(1 - a) ** (n - 1)] + [a * (1 - a) ** (n - i) for i in range(2, n + 1)]
        if self.algo == "ema_corrected":
            a = self.alpha
            total = -math.expm1(n * math.log1p(-a))  # 1 - (1-a)^n, accurate for tiny alpha
            return [a * (1 - a) ** (n - i) / total for i in range(1, n + 1)]
        if self.algo == "decay":
            return self._decay_weights(n)
        return self._explicit_weights(n)

    def _decay_weights(self, n: int) -> list[float]:
        d = self.shape
        levels = [float(d(i / n)) for i in range(n + 1)]
        levels[0], levels[n] = 1.0, 0.0  # the ends were checked to within tolerance: make them exact
        return [levels[i - 1] - levels[i] for i in range(1, n + 1)]

    def _explicit_weights(self, n: int) -> list[float]:
        if n != len(self.weights):
            raise ValueError(f"Got {len(self.weights)} weights for {n} samples; give one weight per sample.")
        if not self.normalize:
            return list(self.weights)
        total = sum(self.weights)
        return [w / total for w in self.weights]

    def coefficient(self, k: int, n: int | None = None) -> float:
        """``c_k`` of the running form for the ``k``-th sample (1-based); ``c_1`` is always 1.

        Args:
            k: the sample's position in the window, from 1.
            n: the window's length; needed by ``decay`` (online: ``fused_num``), ignored by the others.

        Raises:
            ValueError: ``k`` outside the window, ``decay`` without ``n``, or a running form that is undefined.
        """
        if k < 1:
            raise ValueError(f"Samples are counted from 1, got k={k}.")
        if k == 1:
            return 1.0
        if self.algo == "sma":
            return 1.0 / k
        if self.algo == "wma":
            return 2.0 / (k + 1)
        if self.algo == "ema":
            return self.alpha
        if self.algo == "ema_corrected":
            return self.alpha / -math.expm1(k * math.log1p(-self.alpha))
        if self.algo == "decay":
            return self._decay_coefficient(k, n)
        return self._explicit_coefficient(k)

    def _decay_coefficient(self, k: int, n: int | None) -> float:
        if n is None:
            raise ValueError("The `decay` rule's running form needs the window length n (online: `fused_num`).")
        if k > n:
            raise ValueError(f"The decay window holds {n} samples, but sample {k} arrived.")
        d = self.shape
        done = 1.0 - (0.0 if k == n else float(d(k / n)))  # weight given to samples 1..k
        if done == 0:
            raise ValueError(
                f"The decay shape stays at 1 up to x={k}/{n}, so the first {k} samples weigh nothing and the "
                "running average is undefined there; merge offline with the closed form instead."
            )
        return self._decay_weights(n)[k - 1] / done

    def _explicit_coefficient(self, k: int) -> float:
        if not self.normalize:
            raise ValueError("Unnormalised weights have no running form; use the closed form `weights_for`.")
        if k > len(self.weights):
            raise ValueError(f"Only {len(self.weights)} weights were given, but sample {k} arrived.")
        partial = sum(self.weights[:k])
        if partial == 0:
            raise ValueError(
                f"The first {k} weights sum to zero, so the running average is undefined there; "
                "reorder the weights or merge offline with the closed form."
            )
        return self.weights[k - 1] / partial

    def describe(self, n: int | None = None) -> str:
        """A short human description, e.g. for model cards: ``"EMA (alpha=0.2) of 10 samples"``."""
        name = {
            "sma": "SMA",
            "wma": "WMA",
            "ema": f"EMA (alpha={self.alpha:g})",
            "ema_corrected": f"bias-corrected EMA (alpha={self.alpha:g})",
            "weights": "weighted average" if self.normalize else "weighted sum",
        }.get(self.algo) or f"decay-shaped merge ({self.shape_name})"
        return name if n is None else f"{name} of {n} sample{'s' if n != 1 else ''}"


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


def fold_coefficients(rule: AveragingRule, n: int) -> list[float]:
    """``[c_1, ..., c_n]``: folding samples with these reproduces ``rule.weights_for(n)``.

    Args:
        rule: The averaging rule.
        n: Number of samples.

    Returns:
        ``c_k`` for ``k = 1..n``; ``c_1`` is 1.

    Raises:
        ValueError: the rule has no running form (``normalize=False``) or too few weights.
    """
    return [rule.coefficient(k, n) for k in range(1, n + 1)]


AVERAGED = "average"
COPIED_FROM_NEWEST = "newest"


def tensor_merge_action(is_floating_point: bool) -> str:
    """The buffer rule: what a merge does with a tensor of this kind, whatever the rule.

    Floating-point tensors (parameters, and buffers such as BatchNorm's running mean and variance)
    are averaged like parameters: :data:`AVERAGED`. Integer and bool tensors (BatchNorm's
    ``num_batches_tracked``, masks, position ids) are copied from the newest sample:
    :data:`COPIED_FROM_NEWEST`, because averaging a counter turns it into a fraction and the
    newest model's count is the one that goes with its statistics. The offline merger (from
    safetensors dtypes) and `pmakit.tools.buffers` (from torch dtypes) both follow it.

    Args:
        is_floating_point: whether the tensor holds floating-point values.

    Returns:
        ``"average"`` or ``"newest"``.
    """
    return AVERAGED if is_floating_point else COPIED_FROM_NEWEST
