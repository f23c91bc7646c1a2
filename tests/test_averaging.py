"""The averaging law: running form against the closed form, in fp64."""

import itertools
import math
import random
from fractions import Fraction as F

import pytest

from pmakit.averaging import ALGORITHMS, AveragingRule, fold_coefficients, merge_weights


def closed_form(rule: AveragingRule, n: int) -> list[float]:
    """Weights written straight from the definitions (independent of AveragingRule.weights_for)."""
    if rule.algo == "sma":
        return [1 / n] * n
    if rule.algo == "wma":
        return [i / sum(range(1, n + 1)) for i in range(1, n + 1)]
    if rule.algo == "ema":
        a = rule.alpha
        # the recursion avg_1 = x_1, avg_k = a x_k + (1 - a) avg_{k-1}
        weights = [1.0]
        for _ in range(1, n):
            weights = [w * (1 - a) for w in weights] + [a]
        return weights
    total = sum(rule.weights)
    return [w / total for w in rule.weights]


def fold(coefficients: list[float], samples: list[float]) -> float:
    avg = 0.0
    for c, x in zip(coefficients, samples, strict=True):
        avg = avg + c * (x - avg)
    return avg


RULES = [AveragingRule("sma"), AveragingRule("wma")] + [
    AveragingRule("ema", alpha=a) for a in (0.01, 0.1, 0.2, 0.5, 0.9, 0.999)
]


@pytest.mark.parametrize("rule", RULES, ids=lambda r: r.describe())
@pytest.mark.parametrize("n", [1, 2, 3, 5, 10, 17, 64])
def test_weights_match_closed_form(rule, n):
    expected = closed_form(rule, n)
    got = rule.weights_for(n)
    assert got == pytest.approx(expected, rel=1e-12, abs=1e-15)
    assert math.fsum(got) == pytest.approx(1.0, abs=1e-12)


# Weights worked out by hand from the definitions (fractions), for several (rule, n, alpha).
HAND_WORKED = [
    (AveragingRule("sma"), 1, [F(1)]),
    (AveragingRule("sma"), 4, [F(1, 4)] * 4),
    (AveragingRule("wma"), 2, [F(1, 3), F(2, 3)]),
    (AveragingRule("wma"), 4, [F(1, 10), F(2, 10), F(3, 10), F(4, 10)]),
    (AveragingRule("ema", alpha=0.5), 4, [F(1, 8), F(1, 8), F(1, 4), F(1, 2)]),  # (1-a)^3, a(1-a)^2, a(1-a), a
    (AveragingRule("ema", alpha=0.2), 3, [F(16, 25), F(4, 25), F(1, 5)]),
    (AveragingRule("ema", alpha=0.9), 2, [F(1, 10), F(9, 10)]),
    (AveragingRule("ema", alpha=0.3), 1, [F(1)]),
    (AveragingRule("weights", weights=(1.0, 3.0)), 2, [F(1, 4), F(3, 4)]),
    (AveragingRule("weights", weights=(2.0, 1.0, 1.0)), 3, [F(1, 2), F(1, 4), F(1, 4)]),
    (AveragingRule("weights", weights=(-0.5, 1.5), normalize=False), 2, [F(-1, 2), F(3, 2)]),
]


@pytest.mark.parametrize(("rule", "n", "expected"), HAND_WORKED, ids=lambda x: getattr(x, "algo", None))
def test_weights_match_hand_worked_fractions(rule, n, expected):
    assert rule.weights_for(n) == pytest.approx([float(x) for x in expected], rel=1e-15, abs=1e-17)


@pytest.mark.parametrize("rule", RULES, ids=lambda r: r.describe())
@pytest.mark.parametrize("n", [1, 2, 4, 10, 33])
def test_running_form_equals_closed_form(rule, n):
    rng = random.Random(n)
    samples = [rng.uniform(-3, 3) for _ in range(n)]
    expected = math.fsum(w * x for w, x in zip(closed_form(rule, n), samples, strict=True))
    assert fold(fold_coefficients(rule, n), samples) == pytest.approx(expected, rel=1e-10, abs=1e-12)


def test_explicit_weights_running_and_closed_form():
    rng = random.Random(0)
    for n in (1, 2, 5, 9):
        weights = tuple(rng.uniform(0.1, 2.0) for _ in range(n))
        rule = AveragingRule("weights", weights=weights)
        samples = [rng.uniform(-1, 1) for _ in range(n)]
        expected = math.fsum(w * x for w, x in zip(weights, samples, strict=True)) / math.fsum(weights)
        assert fold(fold_coefficients(rule, n), samples) == pytest.approx(expected, rel=1e-12)
        assert rule.weights_for(n) == pytest.approx([w / sum(weights) for w in weights])


def test_ema_starts_at_first_sample_unlike_mindspore():
    # MindSpore's zero-started EMA keeps only 1 - (1 - a)^n of the weights; ours sums to one.
    weights = merge_weights(10, "ema", alpha=0.2)
    assert math.fsum(weights) == pytest.approx(1.0)
    assert weights[0] == pytest.approx(0.8**9)
    assert weights[-1] == pytest.approx(0.2)


def test_unnormalised_weights_for_extrapolation():
    rule = AveragingRule("weights", weights=(-0.5, 1.5), normalize=False)
    assert rule.weights_for(2) == [-0.5, 1.5]
    with pytest.raises(ValueError, match="no running form"):
        rule.coefficient(2)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"algo": "median"}, "valid rules are sma, ema, ema_corrected, wma, weights, decay"),
        ({"algo": "ema", "alpha": 0.0}, r"alpha` must lie in \(0, 1\)"),
        ({"algo": "ema", "alpha": 1.0}, r"alpha` must lie in \(0, 1\)"),
        ({"algo": "weights"}, "non-empty list"),
        ({"algo": "weights", "weights": (1.0, -1.0)}, "sum to zero"),
        ({"algo": "sma", "weights": (1.0,)}, "only used by the `weights` rule"),
        ({"algo": "weights", "weights": (1.0, float("nan"))}, "finite"),
    ],
)
def test_invalid_rules(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AveragingRule(**kwargs)


def test_weight_count_must_match():
    with pytest.raises(ValueError, match="3 weights for 2 samples"):
        merge_weights(2, "weights", weights=[1, 2, 3])
    with pytest.raises(ValueError, match="first 2 weights sum to zero"):
        AveragingRule("weights", weights=(1.0, -1.0, 3.0)).coefficient(2)


def test_all_algorithms_listed():
    assert set(ALGORITHMS) == {"sma", "ema", "ema_corrected", "wma", "weights", "decay", "ema_halflife", "bema"}
    for algo, n in itertools.product(("sma", "ema", "wma"), (1, 7)):
        assert len(merge_weights(n, algo)) == n
