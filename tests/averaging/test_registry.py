"""The registry of averaging rules: what each rule declares, specs, and a rule registered at runtime."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import pytest

from pmakit.averaging import (
    ALGORITHMS,
    AveragingRule,
    MissingParameterError,
    Param,
    RangeError,
    Rule,
    RuleError,
    UnknownRuleError,
    UnusedParameterError,
    fold_coefficients,
    merge_weights,
    parse_spec,
    register,
    rule_class,
    rule_names,
    spec_forms,
)
from pmakit.averaging.registry import unregister


def test_algorithms_are_the_registry_in_order():
    registered = ("sma", "ema", "ema_corrected", "wma", "weights", "decay", "ema_halflife", "bema")
    assert ALGORITHMS == rule_names() == registered
    for name in ALGORITHMS:
        cls = rule_class(name)
        assert issubclass(cls, Rule) and cls.name == name and cls.title and cls.__doc__
        assert all(p.help for p in cls.params), name
        assert cls.step_aware == (name in ("ema_halflife", "bema"))


@pytest.mark.parametrize(
    ("rule", "settings", "card"),
    [
        (AveragingRule("sma"), {}, {}),
        (AveragingRule("ema", alpha=0.3), {"alpha": 0.3}, {"alpha": 0.3}),
        (AveragingRule("ema_corrected", alpha=0.05), {"alpha": 0.05}, {"alpha": 0.05}),
        (AveragingRule("weights", weights=(1, 3)), {"weights": [1.0, 3.0], "normalize": True}, {}),
        (AveragingRule("decay", decay_shape="cosine"), {"decay_shape": "cosine"}, {"decay_shape": "cosine"}),
    ],
    ids=lambda x: getattr(x, "algo", None),
)
def test_each_rule_declares_what_recipes_and_cards_record(rule, settings, card):
    assert rule.settings() == settings
    assert rule.settings(card=True) == card


@pytest.mark.parametrize(
    ("spec", "algo", "params"),
    [
        ("sma", "sma", {}),
        ("ema:0.1", "ema", {"alpha": 0.1}),
        ("ema:alpha=0.1", "ema", {"alpha": 0.1}),
        ("ema_corrected:0.05", "ema_corrected", {"alpha": 0.05}),
        ("decay:cosine", "decay", {"decay_shape": "cosine"}),
        ("decay:decay_shape=1-sqrt", "decay", {"decay_shape": "1-sqrt"}),
    ],
)
def test_specs_parse_into_rule_and_parameters(spec, algo, params):
    assert parse_spec(spec) == (algo, params)
    rule = AveragingRule.from_spec(spec)
    assert rule == AveragingRule(algo, **params)
    assert rule.weights_for(7) == AveragingRule(algo, **params).weights_for(7)


@pytest.mark.parametrize(
    ("spec", "error", "param", "message"),
    [
        ("median", UnknownRuleError, None, "valid rules are sma, ema"),
        ("weights", UnknownRuleError, None, "cannot be written as a spec"),
        ("decay:exp", RuleError, "decay_shape", "decay shape must be one of linear, cosine, 1-sqrt"),
        ("decay", MissingParameterError, "decay_shape", "needs a `decay_shape`"),
        ("ema:2", RangeError, "alpha", r"`alpha` must lie in \(0, 1\), got 2.0"),
        ("ema:x", RuleError, "alpha", "must be a number in"),
        ("ema:beta=0.1", RuleError, None, "no spec parameter 'beta'"),
        ("sma:0.1", RuleError, None, "takes no parameters"),
    ],
)
def test_bad_specs_are_refused_by_the_rule(spec, error, param, message):
    with pytest.raises(error, match=message) as info:
        parse_spec(spec)
    assert info.value.param == param


def test_spec_forms_list_every_rule_a_spec_names_fully():
    assert spec_forms() == [
        *("sma", "ema", "ema_corrected", "wma", "decay:linear", "decay:cosine", "decay:1-sqrt", "ema_halflife", "bema")
    ]


def test_errors_name_the_setting_and_the_rules_that_use_it():
    with pytest.raises(UnusedParameterError) as info:
        AveragingRule("sma", decay_shape="cosine")
    assert (info.value.param, info.value.users) == ("decay_shape", ("decay",))
    unknown = "No averaging rule has a parameter `gamma`; the `ema` rule takes `alpha`"
    with pytest.raises(UnusedParameterError, match=unknown):
        AveragingRule("ema", params={"gamma": 1.0})
    with pytest.raises(ValueError, match="already registered"):

        @register
        class Clash(Rule):
            name, title = "sma", "another SMA"


class HalfLife(Rule):
    """Example of a step-aware rule: sample ``i`` weighs ``2^(-(t_n - t_i)/h)``, normalised."""

    name, title = "halflife_example", "half-life average"
    params = (Param("half_life", "Steps over which a sample's weight halves.", required=True, parse=float),)
    step_aware = True

    def check(self) -> None:
        if not self.half_life or self.half_life <= 0:
            raise RuleError("`half_life` must be a positive number of steps.", "half_life")

    def weights_for(self, n: int, steps: Sequence[int] | None = None) -> list[float]:
        raw = [2.0 ** (-(steps[n - 1] - t) / self.half_life) for t in steps[:n]]
        return [w / math.fsum(raw) for w in raw]

    def coefficient(self, k: int, n: int | None = None, steps: Sequence[int] | None = None) -> float:
        return self.weights_for(k, steps)[-1]  # the newest sample's share among the first k

    def words(self) -> str:
        return f"half-life average (h={self.half_life:g} steps)"


@pytest.fixture
def halflife():
    register(HalfLife)
    yield
    unregister(HalfLife.name)


def test_a_step_aware_rule_registered_at_runtime_works_everywhere(halflife):
    steps = [100, 250, 300, 700, 710]
    rule = AveragingRule.from_spec("halflife_example:200")
    assert rule == AveragingRule("halflife_example", params={"half_life": 200.0})
    # fp64 reference: 2^(-age/h) over the ages 610, 460, 410, 10, 0, normalised
    raw = [2.0 ** (-(710 - t) / 200) for t in steps]
    expected = [w / sum(raw) for w in raw]
    assert rule.weights_for(5, steps) == pytest.approx(expected, rel=1e-14)
    rng = random.Random(0)
    samples = [rng.uniform(-1, 1) for _ in steps]
    avg = 0.0
    for c, x in zip(fold_coefficients(rule, 5, steps), samples, strict=True):
        avg += c * (x - avg)
    assert avg == pytest.approx(math.fsum(w * x for w, x in zip(expected, samples, strict=True)), rel=1e-12)
    assert rule.describe(5) == "half-life average (h=200 steps) of 5 samples"
    assert rule.settings() == {"half_life": 200.0}
    assert "halflife_example" in rule_names() and "halflife_example:200" not in spec_forms()
    with pytest.raises(RuleError, match="pass `steps`"):
        rule.weights_for(5)
    with pytest.raises(RuleError, match="Got 4 steps for 5 samples"):
        rule.weights_for(5, steps[:4])
    with pytest.raises(RuleError, match="positive number of steps"):
        AveragingRule("halflife_example", params={"half_life": -1.0})


@pytest.mark.parametrize("algo", ["sma", "ema", "ema_corrected", "wma"])
def test_rules_that_are_not_step_aware_ignore_the_steps_bitwise(algo):
    rule = AveragingRule(algo, alpha=0.3)
    steps = [3, 10, 11, 40, 41, 90]
    assert rule.weights_for(6, steps) == rule.weights_for(6) == merge_weights(6, algo, alpha=0.3)
    assert fold_coefficients(rule, 6, steps) == fold_coefficients(rule, 6)
