"""The averaging law, written once for online PMA and the offline merger.

Every rule averages an ordered list of samples ``x_1..x_n`` (oldest first). It has two
equivalent forms, and both are derived here from the same rule:

* closed form: ``avg = sum_i w_i x_i`` (:meth:`AveragingRule.weights_for`), which the offline
  merger accumulates directly (it knows ``n`` up front and may use unnormalised weights);
* running form: ``avg <- avg + c_k (x_k - avg)`` with ``c_1 = 1``
  (:meth:`AveragingRule.coefficient`), which the online engine uses so that the average is
  valid after every sample and needs no second buffer. One rule, ``bema``, is no running average
  of itself: it keeps the first sample as an anchor (:attr:`AveragingRule.anchors`) and corrects
  the average after the last one (:meth:`AveragingRule.finish`).

=============  ==================================================  ==================================
rule           weight of ``x_i`` among ``n`` samples                 ``c_k``
=============  ==================================================  ==================================
sma            ``1/n``                                             ``1/k``
wma            ``i / (n(n+1)/2)``                                  ``2/(k+1)``
ema            ``(1-a)^(n-1)`` for ``x_1``, ``a(1-a)^(n-i)``        ``a`` for ``k >= 2``
ema_corrected  ``a(1-a)^(n-i) / (1-(1-a)^n)``                      ``a / (1-(1-a)^k)``
weights        ``w_i / sum(w)``                                    ``w_k / sum_{j<=k} w_j``
decay          ``d((i-1)/n) - d(i/n)``                             ``w_k / (1 - d(k/n))`` (needs ``n``)
ema_halflife   the running form multiplied out (step-aware)         ``1 - 2^(-(s_k - s_(k-1)) / (h (s_k + b)))``
bema           EMA from ``x_1`` + ``a (x_n - x_1)`` (step-aware)     ``beta(s_k)``, then ``finish``
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

Each rule is one small class in :mod:`pmakit.averaging.rules`, listed by the registry
(:mod:`pmakit.averaging.registry`): its name, its parameters with their help, both forms of its
weights, its checks and its card words. ``ALGORITHMS`` lists the registered rules; specs such as
``decay:cosine`` or ``ema:0.1`` are parsed by :func:`parse_spec`. A rule may be step-aware: its
weights then depend on the samples' training steps (``weights_for(n, steps)``): ``ema_halflife``, torchtitan's
EMA whose half-life is a fraction ``h`` of the steps so far; the others ignore the steps.

This package imports nothing heavy: the offline merger uses it without torch.
"""

from __future__ import annotations

from . import rules as _rules  # noqa: F401 (registers the rules)
from .law import AveragingRule, fold_coefficients, merge_weights
from .registry import *  # noqa: F403 (the registry's public names, listed once in its __all__)
from .registry import __all__ as _registry_names
from .registry import rule_names
from .shapes import DECAY_SHAPES, DecayShape
from .tensors import AVERAGED, COPIED_FROM_NEWEST, tensor_merge_action


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
    *_registry_names,
]

ALGORITHMS: tuple[str, ...] = rule_names()
"""The registered rules, in registration order: ``sma``, ``ema``, ``ema_corrected``, ``wma``, ``weights``,
``decay``, ``ema_halflife``, ``bema``."""
