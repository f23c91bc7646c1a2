"""The `decay` and `ema_corrected` rules against their fp64 closed forms, written here independently."""

import math
import random

import pytest

from pmakit.averaging import ALGORITHMS, DECAY_SHAPES, AveragingRule, fold_coefficients, merge_weights


# the decay shapes as the WSM paper and the issue define them, written out again
SHAPES = {
    "linear": lambda x: 1 - x,
    "cosine": lambda x: 0.5 * (1 + math.cos(math.pi * x)),
    "1-sqrt": lambda x: 1 - x**0.5,
}


def decay_closed_form(d, n: int) -> list[float]:
    return [d((i - 1) / n) - d(i / n) for i in range(1, n + 1)]


def corrected_ema_closed_form(a: float, n: int) -> list[float]:
    """MindSpore's zero-start recursion avg_0 = 0, avg_k = a x_k + (1 - a) avg_{k-1}, divided by its total."""
    weights: list[float] = []
    for _ in range(n):
        weights = [w * (1 - a) for w in weights] + [a]
    return [w / (1 - (1 - a) ** n) for w in weights]


def fold(coefficients: list[float], samples: list[float]) -> float:
    avg = 0.0
    for c, x in zip(coefficients, samples, strict=True):
        avg = avg + c * (x - avg)
    return avg


def test_literal_weights_for_small_windows():
    # hand-computed: cosine over 2 samples splits at d(1/2) = 1/2; over 3: d(1/3) = 3/4, d(2/3) = 1/4
    assert merge_weights(2, "decay", decay_shape="cosine") == pytest.approx([0.5, 0.5], abs=1e-15)
    assert merge_weights(3, "decay", decay_shape="cosine") == pytest.approx([0.25, 0.5, 0.25], abs=1e-15)
    # 1-sqrt over 4 samples: 1 - sqrt(1/4) = 1/2, so the oldest sample weighs 1/2
    w = merge_weights(4, "decay", decay_shape="1-sqrt")
    assert w == pytest.approx([0.5, math.sqrt(0.5) - 0.5, math.sqrt(0.75) - math.sqrt(0.5), 1 - math.sqrt(0.75)])
    assert merge_weights(4, "decay", decay_shape="linear") == pytest.approx([0.25] * 4, abs=1e-15)
    # the example: alpha 0.2, 4 samples, 0.8^3 ... 0.2 for `ema`; the corrected form rises to the newest
    assert merge_weights(4, "ema", alpha=0.2) == pytest.approx([0.512, 0.128, 0.16, 0.2], abs=1e-15)
    total = 1 - 0.8**4  # 0.5904
    expected = [0.2 * 0.8**3 / total, 0.2 * 0.8**2 / total, 0.2 * 0.8 / total, 0.2 / total]
    assert merge_weights(4, "ema_corrected", alpha=0.2) == pytest.approx(expected, abs=1e-15)
    assert expected == pytest.approx([0.17344173, 0.21680217, 0.27100271, 0.33875339], abs=1e-8)


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("n", [1, 2, 3, 5, 10, 33])
def test_decay_weights_match_closed_form_and_the_wsm_duality(shape, n):
    got = AveragingRule("decay", decay_shape=shape).weights_for(n)
    assert got == pytest.approx(decay_closed_form(SHAPES[shape], n), rel=1e-12, abs=1e-15)
    assert math.fsum(got) == pytest.approx(1.0, abs=1e-12)
    # WSM: the weight still to come at sample i is the LR multiplier d((i-1)/n) the merge emulates
    for i in range(1, n + 1):
        assert math.fsum(got[i - 1 :]) == pytest.approx(SHAPES[shape]((i - 1) / n), abs=1e-12)


@pytest.mark.parametrize("n", [1, 4, 17])
def test_linear_decay_is_sma(n):
    assert merge_weights(n, "decay", decay_shape="linear") == pytest.approx(merge_weights(n, "sma"), abs=1e-15)


def test_shape_profiles():
    cosine = merge_weights(10, "decay", decay_shape="cosine")
    assert max(range(10), key=cosine.__getitem__) in (4, 5)  # most weight mid-window
    minus_sqrt = merge_weights(10, "decay", decay_shape="1-sqrt")
    assert minus_sqrt == sorted(minus_sqrt, reverse=True)  # most weight on the oldest samples


@pytest.mark.parametrize("alpha", [0.001, 0.1, 0.2, 0.5, 0.9])
@pytest.mark.parametrize("n", [1, 2, 4, 10, 50])
def test_corrected_ema_matches_closed_form(alpha, n):
    got = merge_weights(n, "ema_corrected", alpha=alpha)
    assert got == pytest.approx(corrected_ema_closed_form(alpha, n), rel=1e-10, abs=1e-15)
    assert math.fsum(got) == pytest.approx(1.0, abs=1e-12)
    assert got == sorted(got)  # rises toward the newest, at every window length


RUNNING = [AveragingRule("decay", decay_shape=s) for s in SHAPES] + [
    AveragingRule("ema_corrected", alpha=a) for a in (0.01, 0.2, 0.7)
]


@pytest.mark.parametrize("rule", RUNNING, ids=lambda r: r.describe())
@pytest.mark.parametrize("n", [1, 2, 3, 8, 25])
def test_running_form_equals_closed_form(rule, n):
    rng = random.Random(n)
    samples = [rng.uniform(-3, 3) for _ in range(n)]
    if rule.algo == "decay":
        reference = decay_closed_form(SHAPES[rule.decay_shape], n)
    else:
        reference = corrected_ema_closed_form(rule.alpha, n)
    expected = math.fsum(w * x for w, x in zip(reference, samples, strict=True))
    assert fold(fold_coefficients(rule, n), samples) == pytest.approx(expected, rel=1e-10, abs=1e-12)


def test_corrected_ema_running_average_is_the_corrected_ema_so_far():
    rule, samples = AveragingRule("ema_corrected", alpha=0.3), [2.0, -1.0, 5.0, 0.5, 3.0]
    avg = 0.0
    for k, x in enumerate(samples, start=1):
        avg += rule.coefficient(k) * (x - avg)
        expected = math.fsum(w * s for w, s in zip(corrected_ema_closed_form(0.3, k), samples[:k], strict=True))
        assert avg == pytest.approx(expected, rel=1e-12)


def test_callable_shape():
    def quadratic(x):
        return (1 - x) ** 2

    rule = AveragingRule("decay", decay_shape=quadratic)
    assert rule.weights_for(4) == pytest.approx([7 / 16, 5 / 16, 3 / 16, 1 / 16], abs=1e-15)
    assert fold(fold_coefficients(rule, 4), [1.0, 2.0, 3.0, 4.0]) == pytest.approx((7 + 10 + 9 + 4) / 16)
    assert rule.describe(4) == "decay-shaped merge (quadratic) of 4 samples"


def test_descriptions():
    assert AveragingRule("decay", decay_shape="1-sqrt").describe(8) == "decay-shaped merge (1-sqrt) of 8 samples"
    assert AveragingRule("ema_corrected", alpha=0.25).describe() == "bias-corrected EMA (alpha=0.25)"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"algo": "decay"}, "needs a `decay_shape`: one of linear, cosine, 1-sqrt"),
        ({"algo": "decay", "decay_shape": "exp"}, "Unknown `decay_shape` 'exp'"),
        ({"algo": "decay", "decay_shape": lambda x: 0.9 - x}, r"d\(0\) = 1; <lambda> gives 0.9"),
        ({"algo": "decay", "decay_shape": lambda x: 1 - x / 2}, r"d\(1\) = 0; <lambda> gives 0.5"),
        ({"algo": "decay", "decay_shape": lambda x: float("nan")}, r"d\(0\) = 1"),
        ({"algo": "decay", "decay_shape": 3}, "must be a shape name or a callable"),
        ({"algo": "sma", "decay_shape": "cosine"}, "only used by the `decay` rule"),
        ({"algo": "ema_corrected", "alpha": 1.0}, r"alpha` must lie in \(0, 1\)"),
    ],
)
def test_invalid_decay_and_corrected_rules(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AveragingRule(**kwargs)


def test_decay_running_form_needs_the_window():
    rule = AveragingRule("decay", decay_shape="cosine")
    with pytest.raises(ValueError, match="needs the window length n"):
        rule.coefficient(2)
    with pytest.raises(ValueError, match="holds 3 samples, but sample 4"):
        rule.coefficient(4, 3)
    flat_start = AveragingRule("decay", decay_shape=lambda x: 1.0 if x < 0.5 else 2 - 2 * x)
    assert flat_start.weights_for(4) == pytest.approx([0.0, 0.0, 0.5, 0.5])
    with pytest.raises(ValueError, match="first 2 samples weigh nothing"):
        fold_coefficients(flat_start, 4)


def test_named_shapes_and_rules_are_exported():
    assert set(DECAY_SHAPES) == set(SHAPES) and {"decay", "ema_corrected"} <= set(ALGORITHMS)
    for name, d in DECAY_SHAPES.items():
        assert (d(0.0), d(1.0)) == (1.0, pytest.approx(0.0, abs=1e-15)), name
