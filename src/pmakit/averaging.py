"""The averaging law, written once for online PMA and the offline merger.

Every rule averages an ordered list of samples ``x_1..x_n`` (oldest first). It has two
equivalent forms, and both are derived here from the same rule:

* closed form: ``avg = sum_i w_i x_i`` (:meth:`AveragingRule.weights`), which the offline
  merger accumulates directly (it knows ``n`` up front and may use unnormalised weights);
* running form: ``avg <- avg + c_k (x_k - avg)`` with ``c_1 = 1``
  (:meth:`AveragingRule.coefficient`), which the online engine uses so that the average is
  valid after every sample and needs no second buffer.

=========  ===============================================  =============================
rule       weight of ``x_i`` among ``n`` samples              ``c_k``
=========  ===============================================  =============================
sma        ``1/n``                                          ``1/k``
wma        ``i / (n(n+1)/2)``                               ``2/(k+1)``
ema        ``(1-a)^(n-1)`` for ``x_1``, ``a(1-a)^(n-i)``     ``a`` for ``k >= 2``
weights    ``w_i / sum(w)``                                 ``w_k / sum_{j<=k} w_j``
=========  ===============================================  =============================

The EMA starts at the first sample, so its weights sum to one. MindSpore's PmaAdamW starts
its EMA at zero without a correction; its weights sum to ``1-(1-a)^n`` (0.89 with its
defaults), which shrinks the weights it writes back. pmakit does not reproduce that.

This module imports nothing heavy: the offline merger uses it without torch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


__all__ = [
    "ALGORITHMS",
    "AVERAGED",
    "COPIED_FROM_NEWEST",
    "AveragingRule",
    "fold_coefficients",
    "merge_weights",
    "tensor_merge_action",
]

ALGORITHMS: tuple[str, ...] = ("sma", "ema", "wma", "weights")


@dataclass(frozen=True)
class AveragingRule:
    """An averaging rule: ``algo`` in ``ALGORITHMS``, ``alpha`` for EMA, ``weights`` for explicit weights.

    ``alpha`` is the weight of the newest sample (the paper's and MindSpore's convention; timm and
    torch's ``decay`` is ``1 - alpha``). ``normalize=False`` keeps explicit weights as given (for
    extrapolation such as ``theta_1 + a (theta_1 - theta_0)``); it has no running form.

    Args:
        algo: One of ``ALGORITHMS``: ``"sma"``, ``"ema"``, ``"wma"`` or ``"weights"``.
        alpha: EMA weight of the newest sample, in (0, 1); used by ``"ema"`` only.
        weights: Explicit per-sample weights, oldest first; used by ``"weights"`` only.
        normalize: Divide explicit weights by their sum (off: use them as given, negatives allowed).

    Raises:
        ValueError: an unknown rule, ``alpha`` outside (0, 1), or weights missing, empty, non-finite
            or summing to zero when normalised.
    """

    algo: str = "sma"
    alpha: float = 0.2
    weights: tuple[float, ...] | None = None
    normalize: bool = True

    def __post_init__(self) -> None:
        if self.algo not in ALGORITHMS:
            raise ValueError(f"Unknown averaging rule {self.algo!r}; valid rules are {', '.join(ALGORITHMS)}.")
        if self.algo == "ema" and not (0.0 < self.alpha < 1.0):
            raise ValueError(f"EMA `alpha` must lie in (0, 1), got {self.alpha}.")
        if self.algo == "weights":
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
        elif self.weights is not None:
            raise ValueError(f"`weights` are only used by the `weights` rule, not by {self.algo!r}.")

    def weights_for(self, n: int) -> list[float]:
        """Closed-form weights of ``n`` samples, oldest first (they sum to one unless ``normalize=False``)."""
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
        if n != len(self.weights):
            raise ValueError(f"Got {len(self.weights)} weights for {n} samples; give one weight per sample.")
        if not self.normalize:
            return list(self.weights)
        total = sum(self.weights)
        return [w / total for w in self.weights]

    def coefficient(self, k: int) -> float:
        """``c_k`` of the running form for the ``k``-th sample (1-based); ``c_1`` is always 1."""
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
            "weights": "weighted average" if self.normalize else "weighted sum",
        }[self.algo]
        return name if n is None else f"{name} of {n} sample{'s' if n != 1 else ''}"


def merge_weights(
    n: int,
    algo: str = "sma",
    alpha: float = 0.2,
    weights: Sequence[float] | None = None,
    normalize: bool = True,
) -> list[float]:
    """Closed-form weights of ``n`` samples under a rule; see :class:`AveragingRule`.

    Args:
        n: Number of samples.
        algo: The rule (see `AveragingRule`).
        alpha: EMA weight of the newest sample.
        weights: Explicit weights for ``algo="weights"``, one per sample.
        normalize: Whether explicit weights are divided by their sum.

    Returns:
        The weight of each sample, oldest first.

    Raises:
        ValueError: invalid settings, or a number of weights other than ``n``.
    """
    return AveragingRule(algo, alpha, tuple(weights) if weights is not None else None, normalize).weights_for(n)


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
    return [rule.coefficient(k) for k in range(1, n + 1)]


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
